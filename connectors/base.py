"""The connector interface: AI engines and bots behind one small async call.

A connector gets a `ConnectorTurn` (the message, the conversation's variables, recent history,
a deadline) and returns a `ConnectorResult` (replies, actions such as handoff or set-variable,
and NLU: intent, confidence, entities). It never sees a platform: only the typed core.

Failures are raised as the small `ConnectorError` family below, never as an httpx or JSON
error; the flow engine turns them into the flow's fallback chain.

    ConnectorError
    ├── ConnectorTimeout       the deadline passed
    ├── ConnectorUnavailable   connection refused, 5xx, circuit breaker open, rate limited
    ├── ConnectorAuthError     401/403 or credentials refused
    └── ConnectorBadResponse   the engine answered something we cannot read
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import httpx
from pydantic import BaseModel, ConfigDict

from middleware.model import Action, Inbound, Reply


class ConnectorError(Exception):
    """A connector could not answer; `kind` names the family member for metrics and logs."""

    kind: ClassVar[str] = "error"


class ConnectorTimeout(ConnectorError):
    kind = "timeout"


class ConnectorUnavailable(ConnectorError):
    kind = "unavailable"


class ConnectorAuthError(ConnectorError):
    kind = "auth"


class ConnectorBadResponse(ConnectorError):
    kind = "bad_response"


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    role: Literal["user", "bot"]
    text: str


@dataclass(frozen=True, slots=True)
class Entity:
    name: str
    value: Any
    confidence: float = 1.0


@dataclass(frozen=True, slots=True)
class NLU:
    intent: str | None = None
    confidence: float = 0.0
    entities: tuple[Entity, ...] = ()


@dataclass(frozen=True, slots=True)
class ConnectorTurn:
    """What a connector is asked with. `deadline` is a `time.monotonic()` instant."""

    message: Inbound
    vars: Mapping[str, Any]
    history: Sequence[HistoryEntry]
    deadline: float
    conversation_key: str
    #: extra instructions from the flow's `ask` action (e.g. an LLM system prompt already rendered)
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ConnectorResult:
    replies: tuple[Reply, ...] = ()
    actions: tuple[Action, ...] = ()
    nlu: NLU | None = None
    #: the engine ended the conversation (Dialogflow CX endInteraction, a Rasa `action_resolve`)
    end: bool = False


class ConnectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    timeout: float = 10.0


class Connector(ABC):
    """An engine the flows can `ask`. Subclasses set `Config` and implement `ask` (and `parse` for NLU)."""

    Config: ClassVar[type[ConnectorConfig]] = ConnectorConfig

    def __init__(self, name: str, config: ConnectorConfig, http: httpx.AsyncClient) -> None:
        self.name = name
        self.config = config
        #: the service's one shared HTTP client (created in the app's lifespan); never closed here
        self.http = http

    @abstractmethod
    async def ask(self, turn: ConnectorTurn) -> ConnectorResult:
        """Answer one turn: replies, actions and NLU."""

    async def parse(self, turn: ConnectorTurn) -> NLU:
        """NLU only (intent, confidence, entities) for routing; by default, `ask` and keep its NLU."""
        result = await self.ask(turn)
        return result.nlu or NLU()

    async def close(self) -> None:  # noqa: B027 (an optional hook: most connectors hold nothing)
        """Release what the connector holds (not the shared HTTP client)."""
