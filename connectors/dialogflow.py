"""`dialogflow`: Dialogflow ES (v2) and CX (v3) detectIntent over REST, with service-account auth.

```yaml
connectors:
  support-es:
    type: dialogflow
    edition: es                         # projects/*/agent/sessions/*:detectIntent
    project: acme-support
    credentials_file: /run/secrets/dialogflow.json    # or credentials_env: DIALOGFLOW_KEY_JSON
    language: en
  support-cx:
    type: dialogflow
    edition: cx                         # projects/*/locations/*/agents/*/sessions/*:detectIntent
    project: acme-support
    location: europe-west1              # the API URL follows: https://europe-west1-dialogflow.googleapis.com
    agent: 0d6f4c1e-1111-2222-3333-444455556666
    credentials_env: DIALOGFLOW_KEY_JSON
```

Auth: a service-account key (a file, or its JSON in an environment variable; else the file named by
GOOGLE_APPLICATION_CREDENTIALS) through google-auth's `service_account.Credentials`, whose token is
refreshed before it expires; `token_url` and `api_url` point elsewhere for tests.

Session ids are the conversation key when it fits Dialogflow's rule (at most 36 characters of
letters, digits, `-` and `_`), else `sb-` and 32 hex digits of its SHA-256.

Variables go in and come back: ES sends them as the parameters of a context (`context`, default
`switchboard`) and in `queryParams.payload.switchboard`, and reads back that output context's
parameters; CX sends them as session parameters (`queryParams.parameters`) and reads back
`queryResult.parameters`. A value that changed or appeared becomes a set-variable action.

Replies: text, quick replies, cards and images (ES messages; CX Messenger `richContent` payloads),
and `{"switchboard": {...}}` custom payloads (as for Rasa) become actions; other custom payloads and
voice-only messages are skipped. The matched intent and its confidence are the NLU (with the intent's
parameters as entities). ES intents marked `liveAgentHandoff` / `endInteraction` and CX
`liveAgentHandoff` (its metadata may name a `queue` and `reason`) / `endInteraction` messages become
a handoff and the end of the conversation.

detectIntent is not idempotent (it moves the session on), so it is not retried except when the
connection itself failed; a 401 refreshes the token and tries once more.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import httpx
from google.auth import exceptions as google_exceptions
from google.auth import transport as google_transport
from google.oauth2 import service_account
from pydantic import Field, model_validator

from connectors.base import (
    NLU,
    ConnectorAuthError,
    ConnectorBadResponse,
    ConnectorConfig,
    ConnectorResult,
    ConnectorTurn,
    ConnectorUnavailable,
    Entity,
)
from connectors.rasa import switchboard_actions
from connectors.resilience import Call, HttpConnector, HttpConnectorConfig, obj, result_of
from middleware.model import Action, Attachment, Button, Card, Handoff, Reply, SetVariable

log = logging.getLogger("switchboard.connectors.dialogflow")

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,36}$")
VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SCOPES = ("https://www.googleapis.com/auth/cloud-platform", "https://www.googleapis.com/auth/dialogflow")


class DialogflowConfig(HttpConnectorConfig):
    type: str = "dialogflow"
    edition: Literal["es", "cx"] = "es"
    project: str
    location: str = "global"
    #: CX only: the agent id
    agent: str | None = None
    #: an environment (ES: `agent/environments/{env}/users/-`; CX: `agents/{agent}/environments/{env}`)
    environment: str | None = None
    language: str = "en"
    time_zone: str | None = None
    credentials_file: str | None = None
    #: the name of an environment variable holding the service account's JSON key
    credentials_env: str | None = None
    #: default: https://dialogflow.googleapis.com, or https://{location}-dialogflow.googleapis.com
    api_url: str | None = None
    #: default: the key's token_uri
    token_url: str | None = None
    scopes: tuple[str, ...] = SCOPES
    #: ES: the context carrying the conversation's variables
    context: str = "switchboard"
    context_lifespan: int = Field(default=50, ge=1)
    #: ES: keep fulfillment messages of this platform (e.g. TELEGRAM); default: those of no platform.
    #: CX: sent as queryParams.channel
    channel: str | None = None
    #: the queue of a handoff Dialogflow asks for without naming one
    handoff_queue: str = "default"

    @model_validator(mode="after")
    def _agent(self) -> DialogflowConfig:
        if self.edition == "cx" and not self.agent:
            raise ValueError("a CX connector needs `agent` (the agent id)")
        return self


def session_id(conversation_key: str) -> str:
    """A session id within Dialogflow's limit of 36 characters, stable per conversation."""
    if SESSION_ID.match(conversation_key):
        return conversation_key
    return "sb-" + hashlib.sha256(conversation_key.encode()).hexdigest()[:32]


class _Response(google_transport.Response):
    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    @property
    def status(self) -> int:
        return self._response.status_code

    @property
    def headers(self) -> Mapping[str, str]:
        return dict(self._response.headers)

    @property
    def data(self) -> bytes:
        return self._response.content


class _LoopRequest(google_transport.Request):
    """google-auth's (blocking) transport, run in a worker thread, making its requests on the event
    loop with the service's shared HTTP client."""

    def __init__(self, http: httpx.AsyncClient, loop: asyncio.AbstractEventLoop, call: Call) -> None:
        self.http = http
        self.loop = loop
        self.call = call

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> google_transport.Response:
        limit = max(0.1, min(timeout or 60.0, self.call.remaining()))
        future = asyncio.run_coroutine_threadsafe(
            self.http.request(method, url, content=body, headers=headers, timeout=limit), self.loop
        )
        try:
            return _Response(future.result(limit + 1))
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise google_exceptions.TransportError(  # type: ignore[no-untyped-call]
                f"token request timed out after {limit:.1f}s"
            ) from exc
        except httpx.HTTPError as exc:
            raise google_exceptions.TransportError(f"{type(exc).__name__}: {exc}") from exc  # type: ignore[no-untyped-call]


class ServiceAccountAuth:
    """An access token from a service-account key, refreshed (once, under a lock) when it expires."""

    def __init__(self, config: DialogflowConfig, http: httpx.AsyncClient) -> None:
        self.config = config
        self.http = http
        self._credentials: service_account.Credentials | None = None
        self._lock = asyncio.Lock()

    def _load(self) -> service_account.Credentials:
        cfg = self.config
        try:
            if cfg.credentials_env:
                raw = os.environ.get(cfg.credentials_env)
                if not raw:
                    raise ConnectorAuthError(f"environment variable {cfg.credentials_env} is not set")
                info = json.loads(raw)
            else:
                path = cfg.credentials_file or os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
                if not path:
                    raise ConnectorAuthError(
                        "no service-account key: set credentials_file or credentials_env "
                        "(or GOOGLE_APPLICATION_CREDENTIALS)"
                    )
                info = json.loads(Path(path).read_text())
            credentials: service_account.Credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
                info, scopes=list(cfg.scopes)
            )
        except (OSError, ValueError, KeyError) as exc:
            # never echo the key: only the kind of problem
            raise ConnectorAuthError(f"cannot read the service-account key: {type(exc).__name__}") from exc
        if cfg.token_url:
            credentials = credentials.with_token_uri(cfg.token_url)
        return credentials

    async def token(self, call: Call) -> str:
        async with self._lock:
            if self._credentials is None:
                self._credentials = self._load()
            credentials = self._credentials
            if not credentials.valid:
                request = _LoopRequest(self.http, asyncio.get_running_loop(), call)
                try:
                    await asyncio.to_thread(credentials.refresh, request)
                except google_exceptions.RefreshError as exc:
                    if getattr(exc, "retryable", False):
                        raise ConnectorUnavailable(f"token endpoint unavailable: {exc}") from exc
                    raise ConnectorAuthError(f"token refused: {exc}") from exc
                except google_exceptions.TransportError as exc:
                    raise ConnectorUnavailable(f"token endpoint unreachable: {exc}") from exc
            return str(credentials.token)

    def invalidate(self) -> None:
        if self._credentials is not None:
            self._credentials.token = None


class DialogflowConnector(HttpConnector):
    """Dialogflow ES or CX: detectIntent per turn, variables as session parameters, NLU for routing."""

    Config = DialogflowConfig
    config: DialogflowConfig

    def __init__(self, name: str, config: ConnectorConfig, http: httpx.AsyncClient) -> None:
        super().__init__(name, config, http)
        self.auth = ServiceAccountAuth(self.config, http)

    @property
    def api_url(self) -> str:
        cfg = self.config
        if cfg.api_url:
            return cfg.api_url.rstrip("/")
        host = "dialogflow.googleapis.com" if cfg.location == "global" else f"{cfg.location}-dialogflow.googleapis.com"
        return f"https://{host}"

    def session_path(self, conversation_key: str) -> str:
        cfg = self.config
        sid = session_id(conversation_key)
        if cfg.edition == "cx":
            agent = f"projects/{cfg.project}/locations/{cfg.location}/agents/{cfg.agent}"
            if cfg.environment:
                return f"{agent}/environments/{cfg.environment}/sessions/{sid}"
            return f"{agent}/sessions/{sid}"
        base = f"projects/{cfg.project}" + (f"/locations/{cfg.location}" if cfg.location != "global" else "")
        if cfg.environment:
            return f"{base}/agent/environments/{cfg.environment}/users/-/sessions/{sid}"
        return f"{base}/agent/sessions/{sid}"

    def request_body(self, turn: ConnectorTurn, session: str) -> dict[str, Any]:
        cfg = self.config
        m = turn.message
        text = str(m.payload.get("payload") or m.text) if m.type == "postback" else m.text
        variables = {k: v for k, v in turn.vars.items() if VAR_NAME.match(k)}
        if cfg.edition == "cx":
            params: dict[str, Any] = {"parameters": variables}
            if cfg.channel:
                params["channel"] = cfg.channel
            if cfg.time_zone:
                params["timeZone"] = cfg.time_zone
            return {"queryInput": {"text": {"text": text}, "languageCode": cfg.language}, "queryParams": params}
        es_params: dict[str, Any] = {
            "contexts": [
                {
                    "name": f"{session}/contexts/{cfg.context}",
                    "lifespanCount": cfg.context_lifespan,
                    "parameters": variables,
                }
            ],
            "payload": {"switchboard": {"conversation": turn.conversation_key, "platform": m.platform}},
        }
        if cfg.time_zone:
            es_params["timeZone"] = cfg.time_zone
        return {"queryInput": {"text": {"text": text, "languageCode": cfg.language}}, "queryParams": es_params}

    async def _detect(self, call: Call, turn: ConnectorTurn) -> dict[str, Any]:
        session = self.session_path(turn.conversation_key)
        version = "v3" if self.config.edition == "cx" else "v2"
        url = f"{self.api_url}/{version}/{session}:detectIntent"
        body = self.request_body(turn, session)
        for attempt in (1, 2):
            headers = {"authorization": f"Bearer {await self.auth.token(call)}"}
            try:
                response = await self.send(call, "POST", url, json=body, headers=headers)
            except ConnectorAuthError:
                # a 401 means the request was refused, not processed: a fresh token may be all it needs
                self.auth.invalidate()
                if attempt == 2:
                    raise
                continue
            data = self.json_of(response)
            if not isinstance(data, dict) or not isinstance(data.get("queryResult"), dict):
                raise ConnectorBadResponse("detectIntent answered without a queryResult")
            return data
        raise AssertionError("unreachable")

    async def call_ask(self, call: Call, turn: ConnectorTurn) -> ConnectorResult:
        result = (await self._detect(call, turn))["queryResult"]
        if self.config.edition == "cx":
            return self._cx(result, turn)
        return self._es(result, turn)

    async def call_parse(self, call: Call, turn: ConnectorTurn) -> NLU:
        return (await self.call_ask(call, turn)).nlu or NLU()

    def _changed(self, params: Any, turn: ConnectorTurn) -> list[Action]:
        if not isinstance(params, dict):
            return []
        return [
            SetVariable(k, v)
            for k, v in params.items()
            if VAR_NAME.match(k) and (k not in turn.vars or turn.vars[k] != v)
        ]

    def _es(self, result: dict[str, Any], turn: ConnectorTurn) -> ConnectorResult:
        cfg = self.config
        messages = [m for m in result.get("fulfillmentMessages") or () if isinstance(m, dict)]
        wanted = cfg.channel or "PLATFORM_UNSPECIFIED"
        # ES returns every platform's variant of a response; keep one platform's, as the console shows
        chosen = [m for m in messages if m.get("platform", "PLATFORM_UNSPECIFIED") == wanted]
        if not chosen and cfg.channel:
            chosen = [m for m in messages if m.get("platform", "PLATFORM_UNSPECIFIED") == "PLATFORM_UNSPECIFIED"]
        replies, actions = _es_messages(chosen)
        if not chosen and result.get("fulfillmentText"):
            replies.append(Reply(str(result["fulfillmentText"])))
        intent = obj(result.get("intent"))
        context_params: Any = None
        for ctx in result.get("outputContexts") or ():
            if isinstance(ctx, dict) and str(ctx.get("name", "")).endswith(f"/contexts/{cfg.context}"):
                context_params = {k: v for k, v in (ctx.get("parameters") or {}).items() if not k.endswith(".original")}
        actions = self._changed(context_params, turn) + actions
        if intent.get("liveAgentHandoff"):
            actions.append(Handoff(cfg.handoff_queue, "dialogflow liveAgentHandoff"))
        nlu = NLU(
            intent.get("displayName") or None,
            float(result.get("intentDetectionConfidence") or 0.0),
            _entities(result.get("parameters")),
        )
        return result_of(replies, actions, nlu, bool(intent.get("endInteraction")))

    def _cx(self, result: dict[str, Any], turn: ConnectorTurn) -> ConnectorResult:
        cfg = self.config
        replies: list[Reply] = []
        actions: list[Action] = []
        end = False
        for message in result.get("responseMessages") or ():
            if not isinstance(message, dict):
                continue
            if "text" in message:
                text = "\n".join(str(t) for t in (message["text"] or {}).get("text") or () if t)
                if text:
                    replies.append(Reply(text))
            elif "payload" in message:
                more_replies, more_actions = _custom_payload(message["payload"])
                replies += more_replies
                actions += more_actions
            elif "liveAgentHandoff" in message:
                meta = obj(obj(message["liveAgentHandoff"]).get("metadata"))
                queue = str(meta.get("queue") or cfg.handoff_queue)
                actions.append(Handoff(queue, str(meta.get("reason") or "dialogflow liveAgentHandoff")))
            elif "endInteraction" in message:
                end = True
        actions = self._changed(result.get("parameters"), turn) + actions
        match = obj(result.get("match"))
        intent = obj(match.get("intent")) or obj(result.get("intent"))
        confidence = match.get("confidence", result.get("intentDetectionConfidence", 0.0))
        name = intent.get("displayName")
        if match.get("matchType") in ("NO_MATCH", "NO_INPUT"):
            name = None
        nlu = NLU(name or None, float(confidence or 0.0), _entities(match.get("parameters")))
        return result_of(replies, actions, nlu, end)


def _entities(params: Any) -> tuple[Entity, ...]:
    if not isinstance(params, dict):
        return ()
    return tuple(
        Entity(str(k), v) for k, v in params.items() if not str(k).endswith(".original") and v not in ("", None, [], {})
    )


def _es_messages(messages: list[dict[str, Any]]) -> tuple[list[Reply], list[Action]]:
    replies: list[Reply] = []
    actions: list[Action] = []
    for m in messages:
        if "text" in m:
            text = "\n".join(str(t) for t in (m["text"] or {}).get("text") or () if t)
            if text:
                replies.append(Reply(text))
        elif "quickReplies" in m:
            q = m["quickReplies"] or {}
            options = tuple(Button(str(o), str(o)) for o in q.get("quickReplies") or ())
            replies.append(Reply(str(q.get("title") or ""), quick_replies=options))
        elif "card" in m:
            c = m["card"] or {}
            buttons = tuple(
                Button(str(b.get("text") or ""), str(b.get("postback") or b.get("text") or ""))
                for b in c.get("buttons") or ()
                if isinstance(b, dict) and b.get("text")
            )
            card = Card(str(c.get("title") or ""), str(c.get("subtitle") or ""), c.get("imageUri"), buttons)
            if replies and replies[-1].cards and not replies[-1].text:
                # consecutive cards make one carousel
                replies[-1] = Reply(cards=(*replies[-1].cards, card))
            else:
                replies.append(Reply(cards=(card,)))
        elif "image" in m:
            image = m["image"] or {}
            if image.get("imageUri"):
                replies.append(
                    Reply(attachments=(Attachment("image", str(image["imageUri"]), image.get("accessibilityText")),))
                )
        elif "payload" in m:
            more_replies, more_actions = _custom_payload(m["payload"])
            replies += more_replies
            actions += more_actions
        else:
            log.info("dialogflow message kind %s skipped", sorted(m))
    return replies, actions


def _anchor_button(title: Any, item: dict[str, Any]) -> Button:
    anchor = obj(item.get("anchor"))
    event = obj(item.get("event"))
    return Button(str(title or ""), str(anchor.get("href") or event.get("event") or event.get("name") or title or ""))


def _rich_content(rows: Any) -> list[Reply]:
    """CX Messenger's `richContent`: one reply per inner list (a card on screen)."""
    replies: list[Reply] = []
    for row in rows if isinstance(rows, list) else ():
        text: list[str] = []
        buttons: list[Button] = []
        quick: list[Button] = []
        cards: list[Card] = []
        attachments: list[Attachment] = []
        for item in row if isinstance(row, list) else ():
            if not isinstance(item, dict):
                continue
            kind = item.get("type")
            if kind == "info":
                image = obj(item.get("image"))
                card_buttons = (_anchor_button("Open", item),) if obj(item.get("anchor")).get("href") else ()
                title, subtitle = str(item.get("title") or ""), str(item.get("subtitle") or "")
                cards.append(Card(title, subtitle, image.get("rawUrl"), card_buttons))
            elif kind == "description":
                lines = [str(item.get("title") or "")] + [str(t) for t in item.get("text") or ()]
                text.append("\n".join(line for line in lines if line))
            elif kind == "image" and item.get("rawUrl"):
                attachments.append(Attachment("image", str(item["rawUrl"]), item.get("accessibilityText")))
            elif kind == "button":
                buttons.append(_anchor_button(item.get("text"), item))
            elif kind == "chips":
                quick += [_anchor_button(o.get("text"), o) for o in item.get("options") or () if isinstance(o, dict)]
            elif kind == "list":
                buttons.append(_anchor_button(item.get("title"), item))
            elif kind == "accordion":
                cards.append(Card(str(item.get("title") or ""), str(item.get("text") or item.get("subtitle") or "")))
        reply = Reply("\n".join(text), tuple(buttons), tuple(attachments), tuple(quick), tuple(cards))
        if reply.text or reply.buttons or reply.attachments or reply.quick_replies or reply.cards:
            replies.append(reply)
    return replies


def _custom_payload(payload: Any) -> tuple[list[Reply], list[Action]]:
    if not isinstance(payload, dict):
        return [], []
    if "switchboard" in payload:
        return [], switchboard_actions(payload["switchboard"])
    if "richContent" in payload:
        return _rich_content(payload["richContent"]), []
    log.info("dialogflow custom payload skipped: keys %s", sorted(payload))
    return [], []


__all__ = ["DialogflowConfig", "DialogflowConnector", "ServiceAccountAuth", "session_id"]
