"""`canned`: answers from a list of rules, for conversation tests and demos without an engine.

```yaml
connectors:
  rasa:
    type: canned
    answers:
      - when: {contains: order}            # equals | contains | matches; omitted = anything
        intent: {name: order_status, confidence: 0.93}
        entities: {order_id: "123456"}
        replies: ["Let me check your order."]
      - when: {matches: "(?i)agent"}
        handoff: tier1
      - when: {equals: crash}
        fail: unavailable                   # timeout | unavailable | auth | bad_response
      - when: {contains: refund, call: ask} # only the flow's `ask`, not the NLU call before routing
        fail: timeout                       # (`call: parse`: only that one); omitted = both
      - replies: ["Sorry, I did not get that."]
        intent: {name: nlu_fallback, confidence: 0.3}
```
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from connectors.base import (
    NLU,
    Connector,
    ConnectorAuthError,
    ConnectorBadResponse,
    ConnectorConfig,
    ConnectorResult,
    ConnectorTimeout,
    ConnectorTurn,
    ConnectorUnavailable,
    Entity,
)
from middleware.model import Action, Handoff, Reply, SetVariable

_FAILURES = {
    "timeout": ConnectorTimeout,
    "unavailable": ConnectorUnavailable,
    "auth": ConnectorAuthError,
    "bad_response": ConnectorBadResponse,
}


class CannedWhen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    equals: str | None = None
    contains: str | None = None
    matches: str | None = None
    #: only this kind of call: `parse` (the flow's `nlu:` before routing) or `ask`; omitted = both
    call: Literal["parse", "ask"] | None = None

    @field_validator("matches")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            re.compile(v)
        return v

    def fits(self, text: str) -> bool:
        folded = text.strip().casefold()
        if self.equals is not None and folded != self.equals.strip().casefold():
            return False
        if self.contains is not None and self.contains.casefold() not in folded:
            return False
        return not (self.matches is not None and re.search(self.matches, text) is None)


class CannedIntent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    confidence: float = Field(default=1.0, ge=0, le=1)


class CannedAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    when: CannedWhen = CannedWhen()
    replies: list[str] = Field(default_factory=list)
    intent: CannedIntent | None = None
    entities: dict[str, Any] = Field(default_factory=dict)
    handoff: str | None = None
    set: dict[str, Any] = Field(default_factory=dict)
    end: bool = False
    fail: Literal["timeout", "unavailable", "auth", "bad_response"] | None = None


class CannedConfig(ConnectorConfig):
    type: str = "canned"
    answers: list[CannedAnswer] = Field(default_factory=list)


class CannedConnector(Connector):
    """Answers by the first rule whose `when` fits the message text."""

    Config = CannedConfig
    config: CannedConfig

    def __init__(self, name: str, config: ConnectorConfig, http: Any) -> None:
        super().__init__(name, config, http)
        self.calls: list[str] = []

    async def ask(self, turn: ConnectorTurn) -> ConnectorResult:
        return self._answer(turn, "ask")

    async def parse(self, turn: ConnectorTurn) -> NLU:
        return self._answer(turn, "parse").nlu or NLU()

    def _answer(self, turn: ConnectorTurn, call: Literal["parse", "ask"]) -> ConnectorResult:
        text = turn.message.text
        self.calls.append(text)
        for answer in self.config.answers:
            if answer.when.call in (None, call) and answer.when.fits(text):
                return self._result(answer)
        return ConnectorResult()

    def _result(self, answer: CannedAnswer) -> ConnectorResult:
        if answer.fail is not None:
            raise _FAILURES[answer.fail](f"canned {answer.fail}")
        actions: list[Action] = [SetVariable(k, v) for k, v in answer.set.items()]
        if answer.handoff is not None:
            actions.append(Handoff(answer.handoff, f"connector {self.name}"))
        nlu = None
        if answer.intent is not None or answer.entities:
            nlu = NLU(
                answer.intent.name if answer.intent else None,
                answer.intent.confidence if answer.intent else 0.0,
                tuple(Entity(k, v) for k, v in answer.entities.items()),
            )
        return ConnectorResult(tuple(Reply(r) for r in answer.replies), tuple(actions), nlu, answer.end)
