"""Flow objects: what a YAML flow compiles to, and the context a turn runs in.

A flow is states with `enter` actions and ordered routes (`when` -> `do`). Conditions and
actions are small classes (`conditions.py`, `actions.py`), each with a `from_yaml` that the
loader calls; the language grows by adding a class to one of those registries.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

from connectors.base import NLU, Connector
from middleware.engine.hours import Hours
from middleware.model import Action as CoreAction
from middleware.model import ConversationState, Inbound, Reply, Timer, Transition

if TYPE_CHECKING:
    import httpx

    from middleware.engine.loader import Compiler
    from middleware.handoff import HandoffMachine
    from middleware.yamlfile import PathKey


@dataclass(slots=True)
class Resources:
    """What actions may use beyond the turn: connectors, the shared HTTP client, limits."""

    connectors: Mapping[str, Connector] = field(default_factory=dict)
    http: httpx.AsyncClient | None = None
    #: hosts the `http` action may call; empty means any
    http_allow: tuple[str, ...] = ()
    #: how `wait` pauses; conversation tests replace it with a clock that only moves forward
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    #: ownership transitions and queues (set by the Engine when not given)
    handoff: HandoffMachine | None = None


@dataclass(slots=True, init=False)
class TurnContext:
    """What conditions and actions see and change during one turn."""

    message: Inbound
    state: ConversationState
    flow: Flow
    resources: Resources
    deadline: float
    now: datetime
    first: bool
    nlu: NLU | None
    replies: list[Reply]
    actions: list[CoreAction]
    timers: list[Timer]
    cancel_timers: list[str]
    transitions: list[Transition]
    trace: list[str]
    goto: str | None
    #: a `call` or `return` switched flows: (flow name, state)
    switch: tuple[str, str] | None
    stopped: bool
    missed: bool
    #: who the turn's replies come from, as the history records them ("agent" for an agent's message)
    speaker: str

    def __init__(
        self,
        message: Inbound,
        state: ConversationState,
        flow: Flow,
        resources: Resources,
        deadline: float,
        now: datetime | None = None,
        first: bool = False,
        nlu: NLU | None = None,
    ) -> None:
        # written out: the generated __init__ calls a factory per list field (one context a turn)
        self.message = message
        self.state = state
        self.flow = flow
        self.resources = resources
        self.deadline = deadline
        self.now = datetime.now(UTC) if now is None else now
        self.first = first
        self.nlu = nlu
        self.replies = []
        self.actions = []
        self.timers = []
        self.cancel_timers = []
        self.transitions = []
        self.trace = []
        self.goto = None
        self.switch = None
        self.stopped = False
        self.missed = False
        self.speaker = "bot"

    @property
    def vars(self) -> dict[str, Any]:
        return self.state.vars

    @property
    def handoff(self) -> HandoffMachine:
        machine = self.resources.handoff
        assert machine is not None, "Engine sets resources.handoff"
        return machine

    def template_context(self) -> dict[str, Any]:
        m = self.message
        nlu = self.nlu
        return {
            "message": {
                "text": m.text,
                "type": m.type,
                "payload": m.payload,
                "id": m.message_id,
                "platform": m.platform,
                "channel": m.channel,
            },
            "vars": self.state.vars,
            "counters": {"misses": self.state.misses, **self.state.counters},
            "user": {
                # attributes first: a platform's free-form ones (Chatwoot contacts set their own custom
                # attributes) must not pass for the sender's id or name
                **m.sender.attributes,
                "id": m.sender.id,
                "name": m.sender.name or "",
                **(self.state.vars.get("user") or {}),
            },
            "conversation": {
                "id": m.conversation_id,
                "platform": m.platform,
                "state": self.state.state,
                "flow": self.flow.name,
                "turns": self.state.turns,
                "owner": self.state.owner.value,
            },
            "nlu": {
                "intent": nlu.intent if nlu else None,
                "confidence": nlu.confidence if nlu else 0.0,
                "entities": {e.name: e.value for e in nlu.entities} if nlu else {},
            },
            "now": self.now,
        }


class Condition(ABC):
    """A test on the turn. `key` is its name in a `when:` mapping."""

    key: ClassVar[str]
    #: the condition needs NLU (the flow's `nlu` connector is asked before routing)
    needs_nlu: ClassVar[bool] = False

    @abstractmethod
    def test(self, ctx: TurnContext) -> bool: ...

    @classmethod
    @abstractmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Condition: ...

    def children(self) -> tuple[Condition, ...]:
        return ()


class Action(ABC):
    """One step of a `do:` or `enter:` list. `key` is its name in YAML."""

    key: ClassVar[str]

    @abstractmethod
    async def run(self, ctx: TurnContext) -> None: ...

    @classmethod
    @abstractmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Action | None: ...

    def targets(self) -> tuple[str, ...]:
        """States this action may move to (for graphs and reachability)."""
        return ()


@dataclass(frozen=True, slots=True)
class Route:
    when: Condition | None
    do: tuple[Action, ...]
    where: str  # "file:line" of the route, for traces
    #: this route means "the bot did not understand" (counts toward the flow's fallback)
    miss: bool = False


@dataclass(frozen=True, slots=True)
class StateTimeout:
    after: float
    do: tuple[Action, ...]


@dataclass(frozen=True, slots=True)
class State:
    name: str
    enter: tuple[Action, ...] = ()
    routes: tuple[Route, ...] = ()
    timeout: StateTimeout | None = None


@dataclass(frozen=True, slots=True)
class Fallback:
    after: int
    do: tuple[Action, ...]


@dataclass(frozen=True, slots=True)
class Coalesce:
    window: float
    cancel_inflight: bool = False


@dataclass(frozen=True, slots=True)
class Match:
    platforms: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    sender: tuple[tuple[str, Any], ...] = ()

    def fits(self, message: Inbound) -> bool:
        if self.platforms and message.platform not in self.platforms:
            return False
        if self.channels and message.channel not in self.channels:
            return False
        return all(message.sender.attributes.get(k) == v for k, v in self.sender)


@dataclass(frozen=True, slots=True)
class Flow:
    name: str
    file: str
    states: dict[str, State]
    start: str
    always: tuple[Route, ...] = ()
    vars: dict[str, Any] = field(default_factory=dict)
    match: Match = Match()
    hours: dict[str, Hours] = field(default_factory=dict)
    #: event name -> actions (conversation.started, agent.resolved, connector.failed, ...)
    on: dict[str, tuple[Action, ...]] = field(default_factory=dict)
    fallback: Fallback | None = None
    coalesce: Coalesce | None = None
    #: connector asked for NLU before routing, when a route uses `intent` or `entity`
    nlu: str | None = None
    #: everything `schedule` may run later, by reference
    scheduled: dict[str, tuple[Action, ...]] = field(default_factory=dict)
    #: the flow reads or writes user-scope variables (`user.NAME`), kept across conversations
    user_scope: bool = False

    def serves(self, message: Inbound) -> bool:
        return self.match.fits(message)
