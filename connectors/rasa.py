"""`rasa`: a Rasa server through its REST channel, and `/model/parse` for NLU-only routing.

```yaml
connectors:
  rasa:
    type: rasa
    url: http://localhost:5005            # `rasa run --enable-api` (the API is needed for parse only)
    token: ${RASA_TOKEN}                  # optional: Rasa's --auth-token, sent as ?token= to /model/parse
    timeout: 8                            # the whole call, Rasa's action calls included
    actions:                              # Switchboard's own action server, POST /rasa/webhook
      modules: [myproject.rasa_actions]   # your rasa-sdk Action subclasses, registered at start
      handoff_queue: tier1                # action_handoff's queue when the `handoff_queue` slot is empty
      token: ${RASA_ACTIONS_TOKEN}        # endpoints.yml `action_endpoint: {url, token}`; without it (or
                                          # allow_unauthenticated: true) /rasa/webhook refuses this Rasa's calls
```

Each turn posts `{"sender": <conversation key>, "message": <text>, "metadata": {<the conversation's
variables>, "switchboard": {conversation, platform, sender, message_id}}}` to
`{url}/webhooks/rest/webhook`. The REST channel answers a list of bot messages; each becomes a reply:
`text` (+ `buttons` as {title, payload}), `image` and `attachment` as attachments, and `custom`
payloads of the shapes below. A custom payload `{"switchboard": {"handoff": QUEUE | {queue, reason},
"set": {NAME: VALUE}, "resolve": true}}` is not shown to the user: it becomes actions, so that any
action server (not only Switchboard's) can hand off or set variables.

The REST call is not retried (Rasa would process the message twice); `/model/parse` is.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from connectors import rasa_actions
from connectors.base import NLU, ConnectorBadResponse, ConnectorConfig, ConnectorResult, ConnectorTurn, Entity
from connectors.resilience import Call, HttpConnector, HttpConnectorConfig, obj, result_of
from middleware.model import Action, Attachment, Button, Card, Handoff, Reply, Resolve, SetVariable

log = logging.getLogger("switchboard.connectors.rasa")


class RasaActionsConfig(BaseModel):
    """Settings of Switchboard's Rasa action endpoint (`POST /rasa/webhook`) for this Rasa."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: modules to import; their rasa-sdk `Action` subclasses are registered with the executor
    modules: tuple[str, ...] = ()
    #: Rasa must send it as `?token=` (endpoints.yml: action_endpoint: {url, token}); without a token
    #: the action endpoint refuses calls for this Rasa unless `allow_unauthenticated` is true
    token: str | None = None
    #: serve /rasa/webhook to anyone who can reach it, with no token (a warning at start-up says so)
    allow_unauthenticated: bool = False
    #: action_handoff: the queue when the `queue_slot` slot is empty
    handoff_queue: str = "default"
    queue_slot: str = "handoff_queue"
    reason_slot: str = "handoff_reason"
    #: action_set_variable: the slots copied to variables (default: every filled slot but Rasa's own)
    variable_slots: tuple[str, ...] | None = None


class RasaConfig(HttpConnectorConfig):
    type: str = "rasa"
    url: str
    #: Rasa's HTTP API token (`rasa run --auth-token`), sent as `?token=` to /model/parse
    token: str | None = None
    #: the REST input channel's name (`/webhooks/{channel}/webhook`)
    channel: str = "rest"
    #: send the conversation's variables as the message's metadata
    send_vars: bool = True
    actions: RasaActionsConfig = RasaActionsConfig()

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return v.rstrip("/")


class RasaConnector(HttpConnector):
    """A Rasa assistant: replies and actions through the REST channel, NLU through /model/parse."""

    Config = RasaConfig
    config: RasaConfig

    def __init__(self, name: str, config: ConnectorConfig, http: Any) -> None:
        super().__init__(name, config, http)
        #: rasa-sdk's ActionExecutor with the built-in and the configured actions (for /rasa/webhook)
        self.executor = rasa_actions.build_executor(self)
        actions = self.config.actions
        if not actions.token and actions.allow_unauthenticated:
            log.warning(
                "connector %r: POST /rasa/webhook runs this Rasa's actions (handoff, variables) for anyone who "
                "can reach it: actions.allow_unauthenticated is true and no actions.token is set",
                name,
            )
        elif not actions.token and actions.modules:
            log.warning(
                "connector %r: actions.modules are set but no actions.token: POST /rasa/webhook refuses every "
                "call for this Rasa (set actions.token, or actions.allow_unauthenticated: true)",
                name,
            )

    async def call_ask(self, call: Call, turn: ConnectorTurn) -> ConnectorResult:
        cfg = self.config
        m = turn.message
        metadata: dict[str, Any] = dict(turn.vars) if cfg.send_vars else {}
        metadata["switchboard"] = {
            "conversation": turn.conversation_key,
            "platform": m.platform,
            "sender": m.sender.id,
            "message_id": m.message_id,
        }
        body = {"sender": turn.conversation_key, "message": _text_of(turn), "metadata": metadata}
        pending = rasa_actions.begin_turn(turn.conversation_key, self)
        try:
            response = await self.send(call, "POST", f"{cfg.url}/webhooks/{cfg.channel}/webhook", json=body)
            data = self.json_of(response)
        finally:
            requested = rasa_actions.end_turn(turn.conversation_key, pending)
        if not isinstance(data, list):
            raise ConnectorBadResponse(f"the REST channel answered {type(data).__name__}, not a list")
        replies: list[Reply] = []
        actions: list[Action] = list(requested)
        for item in data:
            if not isinstance(item, dict):
                raise ConnectorBadResponse(f"a REST channel message is {type(item).__name__}, not an object")
            reply, more = rasa_message(item)
            if reply is not None:
                replies.append(reply)
            actions += more
        return result_of(replies, actions)

    async def call_parse(self, call: Call, turn: ConnectorTurn) -> NLU:
        params = {"token": self.config.token} if self.config.token else None
        body = {"text": _text_of(turn), "message_id": turn.message.message_id}
        response = await self.send(call, "POST", f"{self.config.url}/model/parse", json=body, params=params, safe=True)
        return parse_result(self.json_of(response))

    def health(self) -> dict[str, Any]:
        return {**super().health(), "actions": sorted(self.executor.actions)}


def _text_of(turn: ConnectorTurn) -> str:
    m = turn.message
    if m.type == "postback":
        # a button's payload (Rasa buttons carry "/intent{...}" payloads) is what Rasa expects back
        return str(m.payload.get("payload") or m.text)
    return m.text


def parse_result(data: Any) -> NLU:
    """A /model/parse answer: {"intent": {"name", "confidence"}, "entities": [{"entity", "value", ...}]}."""
    if not isinstance(data, dict):
        raise ConnectorBadResponse("/model/parse did not answer an object")
    intent = data.get("intent") or {}
    entities = []
    for e in data.get("entities") or ():
        if isinstance(e, dict) and "entity" in e:
            # DIET reports `confidence_entity`; regex and lookup extractors report none
            confidence = e.get("confidence_entity", e.get("confidence", 1.0))
            entities.append(Entity(str(e["entity"]), e.get("value"), float(confidence or 1.0)))
    name = intent.get("name") if isinstance(intent, dict) else None
    confidence = float(intent.get("confidence") or 0.0) if isinstance(intent, dict) else 0.0
    return NLU(str(name) if name else None, confidence, tuple(entities))


def _button(raw: Any) -> Button | None:
    if not isinstance(raw, dict) or not raw.get("title"):
        return None
    return Button(str(raw["title"]), str(raw.get("payload") or raw.get("url") or raw["title"]))


def _buttons(raw: Any) -> tuple[Button, ...]:
    return tuple(b for b in (_button(x) for x in raw or ()) if b is not None) if isinstance(raw, list) else ()


def _attachment(raw: Any) -> Attachment | None:
    if isinstance(raw, str) and raw:
        return Attachment("file", raw)
    if isinstance(raw, dict):
        # Messenger-style {"type": "file", "payload": {"url": ...}}, or a plain {"url", "name"}
        inner = obj(raw.get("payload")) or raw
        url = inner.get("url") or inner.get("src")
        if url:
            return Attachment(str(raw.get("type") or "file"), str(url), raw.get("name") or inner.get("name"))
    return None


def switchboard_actions(spec: Any) -> list[Action]:
    """Actions from a `{"switchboard": {"handoff", "set", "resolve"}}` custom payload."""
    out: list[Action] = []
    if not isinstance(spec, dict):
        return out
    for name, value in (spec.get("set") or {}).items() if isinstance(spec.get("set"), dict) else ():
        out.append(SetVariable(str(name), value))
    handoff = spec.get("handoff")
    if isinstance(handoff, str):
        out.append(Handoff(handoff, "rasa"))
    elif isinstance(handoff, dict):
        out.append(Handoff(str(handoff.get("queue") or "default"), str(handoff.get("reason") or "rasa")))
    if spec.get("resolve"):
        out.append(Resolve(str(spec["resolve"]) if isinstance(spec["resolve"], str) else "rasa"))
    return out


def rasa_message(item: dict[str, Any]) -> tuple[Reply | None, list[Action]]:
    """One REST channel message -> (a reply or None, actions)."""
    custom = item.get("custom")
    if isinstance(custom, dict) and "switchboard" in custom:
        return None, switchboard_actions(custom["switchboard"])
    text = str(item.get("text") or "")
    buttons = _buttons(item.get("buttons"))
    attachments: list[Attachment] = []
    if item.get("image"):
        attachments.append(Attachment("image", str(item["image"])))
    attachment = _attachment(item.get("attachment"))
    if attachment is not None:
        attachments.append(attachment)
    quick: tuple[Button, ...] = ()
    cards: tuple[Card, ...] = ()
    if isinstance(custom, dict):
        text = text or str(custom.get("text") or "")
        quick = _buttons(custom.get("quick_replies"))
        cards = tuple(
            Card(
                str(e.get("title") or ""),
                str(e.get("subtitle") or e.get("text") or ""),
                e.get("image_url") or e.get("image"),
                _buttons(e.get("buttons")),
            )
            for e in custom.get("elements") or custom.get("cards") or ()
            if isinstance(e, dict)
        )
        if not (text or quick or cards):
            log.info("rasa custom payload with no text, quick_replies or elements skipped: keys %s", sorted(custom))
    reply = Reply(text, buttons, tuple(attachments), quick, cards)
    if not (reply.text or reply.buttons or reply.attachments or reply.quick_replies or reply.cards):
        return None, []
    return reply, []


__all__ = ["RasaActionsConfig", "RasaConfig", "RasaConnector", "parse_result", "rasa_message"]
