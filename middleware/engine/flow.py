"""Flow objects: what a YAML flow compiles to, and how they decide.

Conditions and actions are small classes with one method each, so the language grows by
adding a class and its parser entry in `loader.py`.
"""

from __future__ import annotations

import asyncio
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from middleware.engine.templates import Template
from middleware.model import Button, Inbound, Reply


@dataclass(slots=True)
class TurnContext:
    """What conditions and actions see during one turn."""

    message: Inbound
    vars: dict[str, Any]
    state: str
    flow: str
    turns: int
    replies: list[Reply] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)
    goto: str | None = None
    stopped: bool = False

    def template_context(self) -> dict[str, Any]:
        m = self.message
        return {
            "message": {
                "text": m.text,
                "type": m.type,
                "payload": m.payload,
                "id": m.message_id,
                "platform": m.platform,
            },
            "vars": self.vars,
            "user": {"id": m.sender.id, "name": m.sender.name or "", **m.sender.attributes},
            "conversation": {"id": m.conversation_id, "platform": m.platform, "state": self.state, "flow": self.flow},
        }


# -- conditions ------------------------------------------------------------------------------


class Condition(ABC):
    """A test on the turn; `when:` mappings compile to these."""

    @abstractmethod
    def test(self, ctx: TurnContext) -> bool: ...


@dataclass(frozen=True, slots=True)
class TextEquals(Condition):
    values: tuple[str, ...]

    def test(self, ctx: TurnContext) -> bool:
        text = ctx.message.text.strip().casefold()
        return any(text == v.casefold() for v in self.values)


@dataclass(frozen=True, slots=True)
class TextContains(Condition):
    values: tuple[str, ...]

    def test(self, ctx: TurnContext) -> bool:
        text = ctx.message.text.casefold()
        return any(v.casefold() in text for v in self.values)


@dataclass(frozen=True, slots=True)
class TextMatches(Condition):
    pattern: re.Pattern[str]

    def test(self, ctx: TurnContext) -> bool:
        return self.pattern.search(ctx.message.text) is not None


@dataclass(frozen=True, slots=True)
class TypeIs(Condition):
    types: tuple[str, ...]

    def test(self, ctx: TurnContext) -> bool:
        return ctx.message.type in self.types


@dataclass(frozen=True, slots=True)
class PostbackIs(Condition):
    payloads: tuple[str, ...]

    def test(self, ctx: TurnContext) -> bool:
        if ctx.message.type != "postback":
            return False
        value = ctx.message.payload.get("payload", ctx.message.text)
        return str(value) in self.payloads


@dataclass(frozen=True, slots=True)
class AllOf(Condition):
    parts: tuple[Condition, ...]

    def test(self, ctx: TurnContext) -> bool:
        return all(p.test(ctx) for p in self.parts)


@dataclass(frozen=True, slots=True)
class AnyOf(Condition):
    parts: tuple[Condition, ...]

    def test(self, ctx: TurnContext) -> bool:
        return any(p.test(ctx) for p in self.parts)


@dataclass(frozen=True, slots=True)
class Not(Condition):
    part: Condition

    def test(self, ctx: TurnContext) -> bool:
        return not self.part.test(ctx)


class Always(Condition):
    def test(self, ctx: TurnContext) -> bool:
        return True


# -- actions ---------------------------------------------------------------------------------


class Action(ABC):
    """One step of a route's `do:` list."""

    @abstractmethod
    async def run(self, ctx: TurnContext) -> None: ...


@dataclass(frozen=True, slots=True)
class ReplyAction(Action):
    text: Template
    buttons: tuple[tuple[Template, str], ...] = ()

    async def run(self, ctx: TurnContext) -> None:
        tctx = ctx.template_context()
        buttons = tuple(Button(t.render(tctx), p) for t, p in self.buttons)
        ctx.replies.append(Reply(text=self.text.render(tctx), buttons=buttons))


@dataclass(frozen=True, slots=True)
class SetAction(Action):
    values: tuple[tuple[str, Template | Any], ...]

    async def run(self, ctx: TurnContext) -> None:
        tctx = ctx.template_context()
        for name, value in self.values:
            ctx.vars[name] = value.render(tctx) if isinstance(value, Template) else value


@dataclass(frozen=True, slots=True)
class GotoAction(Action):
    state: str

    async def run(self, ctx: TurnContext) -> None:
        ctx.goto = self.state


class StopAction(Action):
    async def run(self, ctx: TurnContext) -> None:
        ctx.stopped = True


@dataclass(frozen=True, slots=True)
class WaitAction(Action):
    """Pause the turn (typing shows meanwhile where the platform has it)."""

    seconds: float

    async def run(self, ctx: TurnContext) -> None:
        await asyncio.sleep(self.seconds)


# -- structure -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    when: Condition
    do: tuple[Action, ...]
    where: str  # "file:line" of the route, for traces


@dataclass(frozen=True, slots=True)
class State:
    name: str
    enter: tuple[Action, ...] = ()
    routes: tuple[Route, ...] = ()


@dataclass(frozen=True, slots=True)
class Flow:
    name: str
    file: str
    states: dict[str, State]
    start: str
    always: tuple[Route, ...] = ()
    vars: dict[str, Any] = field(default_factory=dict)
    platforms: tuple[str, ...] = ()

    def serves(self, message: Inbound) -> bool:
        return not self.platforms or message.platform in self.platforms
