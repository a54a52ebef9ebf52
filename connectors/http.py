"""`http`: any bot behind a URL, speaking a small JSON protocol (docs/connectors.md, "http").

```yaml
connectors:
  mybot:
    type: http
    url: https://bot.internal/turn
    headers: {Authorization: "Bearer ${MYBOT_TOKEN}"}
    secret: ${MYBOT_SECRET}     # optional: X-Switchboard-Signature: sha256=<HMAC-SHA256 of the body>
    parse_url: https://bot.internal/parse   # optional: NLU only, for flows with `nlu: mybot`
    retry: false                # true if the bot's answer does not change when asked twice
```

Request (POST, JSON): `{"message": {"id", "type", "text", "payload", "platform", "channel", "sender":
{"id", "name"}, "attachments": [{"type", "url", "name"}]}, "conversation": {"key", "id", "platform"},
"vars": {...}, "history": [{"role": "user" | "bot", "text"}], "options": {...}, "deadline_ms": N}`.

Response: `{"replies": ["text", {"text", "buttons": [{"title", "payload"}], "quick_replies": [...],
"cards": [{"title", "text", "image_url", "buttons"}], "attachments": [{"type", "url", "name"}]}],
"actions": [{"handoff": QUEUE | {"queue", "reason"}}, {"set": {NAME: VALUE}}, {"resolve": REASON | true}],
"nlu": {"intent", "confidence", "entities": {NAME: VALUE} | [{"name", "value", "confidence"}]},
"end": false}`; every key is optional.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from typing import Any

from pydantic import Field, field_validator

from connectors.base import NLU, ConnectorBadResponse, ConnectorResult, ConnectorTurn, Entity
from connectors.resilience import Call, HttpConnector, HttpConnectorConfig, result_of
from middleware.model import Action, Attachment, Button, Card, Handoff, Reply, Resolve, SetVariable

VAR_NAME = re.compile(r"^(user\.)?[A-Za-z_][A-Za-z0-9_]*$")


class HttpBotConfig(HttpConnectorConfig):
    type: str = "http"
    url: str
    parse_url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    #: HMAC-SHA256 signs each request body (X-Switchboard-Signature), as the generic platform does
    secret: str | None = None
    #: the bot answers the same when asked twice (then 429/5xx are retried)
    retry: bool = False

    @field_validator("url", "parse_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v


def request_body(turn: ConnectorTurn) -> dict[str, Any]:
    m = turn.message
    return {
        "message": {
            "id": m.message_id,
            "type": m.type,
            "text": m.text,
            "payload": m.payload,
            "platform": m.platform,
            "channel": m.channel,
            "sender": {"id": m.sender.id, "name": m.sender.name},
            "attachments": [{"type": a.type, "url": a.url, "name": a.name} for a in m.attachments],
        },
        "conversation": {"key": turn.conversation_key, "id": m.conversation_id, "platform": m.platform},
        "vars": dict(turn.vars),
        "history": [{"role": h.role, "text": h.text} for h in turn.history],
        "options": dict(turn.options),
        "deadline_ms": max(0, int((turn.deadline - time.monotonic()) * 1000)),
    }


def _buttons(raw: Any, where: str) -> tuple[Button, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConnectorBadResponse(f"{where} must be a list")
    out = []
    for b in raw:
        if isinstance(b, str):
            out.append(Button(b, b))
        elif isinstance(b, dict) and "title" in b:
            out.append(Button(str(b["title"]), str(b.get("payload", b["title"]))))
        else:
            raise ConnectorBadResponse(f"a button in {where} is a string or {{title, payload}}")
    return tuple(out)


def parse_reply(raw: Any) -> Reply:
    if isinstance(raw, str):
        return Reply(raw)
    if not isinstance(raw, dict):
        raise ConnectorBadResponse("a reply is a string or an object")
    cards = []
    for c in raw.get("cards") or ():
        if not isinstance(c, dict) or "title" not in c:
            raise ConnectorBadResponse("a card is {title, text, image_url, buttons}")
        cards.append(
            Card(str(c["title"]), str(c.get("text") or ""), c.get("image_url"), _buttons(c.get("buttons"), "a card"))
        )
    attachments = []
    for a in raw.get("attachments") or ():
        if not isinstance(a, dict) or "url" not in a:
            raise ConnectorBadResponse("an attachment is {type, url, name}")
        attachments.append(Attachment(str(a.get("type") or "file"), str(a["url"]), a.get("name")))
    return Reply(
        str(raw.get("text") or ""),
        _buttons(raw.get("buttons"), "buttons"),
        tuple(attachments),
        _buttons(raw.get("quick_replies"), "quick_replies"),
        tuple(cards),
    )


def parse_actions(raw: Any) -> list[Action]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConnectorBadResponse("actions must be a list")
    out: list[Action] = []
    for a in raw:
        if not isinstance(a, dict) or len(a) != 1:
            raise ConnectorBadResponse("an action is one of {handoff}, {set}, {resolve}")
        ((key, value),) = a.items()
        if key == "handoff":
            if isinstance(value, dict):
                out.append(Handoff(str(value.get("queue") or "default"), str(value.get("reason") or "http bot")))
            else:
                out.append(Handoff(str(value or "default"), "http bot"))
        elif key == "set" and isinstance(value, dict):
            for name, v in value.items():
                if not VAR_NAME.match(str(name)):
                    raise ConnectorBadResponse(f"bad variable name {name!r}")
                out.append(SetVariable(str(name), v))
        elif key == "resolve":
            out.append(Resolve(value if isinstance(value, str) else "http bot"))
        else:
            raise ConnectorBadResponse(f"unknown action {key!r}")
    return out


def parse_nlu(raw: Any) -> NLU | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConnectorBadResponse("nlu must be an object")
    entities: list[Entity] = []
    raw_entities = raw.get("entities") or {}
    if isinstance(raw_entities, dict):
        entities = [Entity(str(k), v) for k, v in raw_entities.items()]
    elif isinstance(raw_entities, list):
        for e in raw_entities:
            if not isinstance(e, dict) or "name" not in e:
                raise ConnectorBadResponse("an entity is {name, value, confidence}")
            entities.append(Entity(str(e["name"]), e.get("value"), float(e.get("confidence", 1.0))))
    try:
        confidence = float(raw.get("confidence") or 0.0)
    except (TypeError, ValueError) as exc:
        raise ConnectorBadResponse("nlu.confidence must be a number") from exc
    intent = raw.get("intent")
    return NLU(str(intent) if intent else None, confidence, tuple(entities))


def parse_response(data: Any) -> ConnectorResult:
    """The documented response JSON -> ConnectorResult (ConnectorBadResponse when it is not that)."""
    if not isinstance(data, dict):
        raise ConnectorBadResponse("the bot must answer a JSON object")
    replies = data.get("replies") or []
    if not isinstance(replies, list):
        raise ConnectorBadResponse("replies must be a list")
    actions = parse_actions(data.get("actions"))
    return result_of([parse_reply(r) for r in replies], actions, parse_nlu(data.get("nlu")), bool(data.get("end")))


class HttpBotConnector(HttpConnector):
    """Any bot behind a URL: POST the turn as JSON, read replies, actions and NLU back."""

    Config = HttpBotConfig
    config: HttpBotConfig

    async def _post(self, call: Call, url: str, turn: ConnectorTurn) -> Any:
        cfg = self.config
        raw = json.dumps(request_body(turn), separators=(",", ":"), default=str).encode()
        headers = {**cfg.headers, "content-type": "application/json"}
        if cfg.secret:
            digest = hmac.new(cfg.secret.encode(), raw, hashlib.sha256).hexdigest()
            headers["x-switchboard-signature"] = f"sha256={digest}"
        response = await self.send(call, "POST", url, content=raw, headers=headers, safe=cfg.retry)
        return self.json_of(response)

    async def call_ask(self, call: Call, turn: ConnectorTurn) -> ConnectorResult:
        return parse_response(await self._post(call, self.config.url, turn))

    async def call_parse(self, call: Call, turn: ConnectorTurn) -> NLU:
        if self.config.parse_url is None:
            return (await self.call_ask(call, turn)).nlu or NLU()
        data = await self._post(call, self.config.parse_url, turn)
        if not isinstance(data, dict):
            raise ConnectorBadResponse("the parse endpoint must answer a JSON object")
        return parse_nlu(data.get("nlu", data)) or NLU()


__all__ = ["HttpBotConfig", "HttpBotConnector", "parse_response", "request_body"]
