"""A fake Rasa server: the REST channel, /model/parse, and Rasa's calls to an action server.

Shapes, from Rasa's documentation and recorded from a real Rasa 3.6.21 (tests/data/rasa/SOURCES.md):

- REST channel, https://rasa.com/docs/rasa/connectors/your-own-website/#rest-channels :
  `POST /webhooks/rest/webhook {"sender", "message", "metadata"}` answers a JSON list of bot messages,
  each `{"recipient_id", "text"?, "buttons"?, "image"?, "attachment"?, "custom"?}` with the None
  values left out (rasa/core/channels/channel.py, CollectingOutputChannel._message).
- NLU, https://rasa.com/docs/rasa/pages/http-api (POST /model/parse): `{"text", "intent": {"name",
  "confidence"}, "entities": [{"entity", "value", "start", "end", "extractor"}], "intent_ranking"}`;
  needs `--enable-api`, and `?token=` with `--auth-token`.
- Action server, https://rasa.com/docs/rasa/custom-actions : when a rule predicts a custom action,
  Rasa POSTs `{"next_action", "sender_id", "tracker", "domain", "version"}` to the action endpoint
  and sends the answer's `responses` on to the channel. The fake replays the recorded request
  (tests/data/rasa/action_call_*.json) with this conversation's sender and action name.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.engines import FakeEngine

DATA = Path(__file__).resolve().parent.parent / "data" / "rasa"


def recorded(name: str) -> Any:
    return json.loads((DATA / name).read_text())


@dataclass
class FakeRasa(FakeEngine):
    #: message text -> the bot messages to answer (without recipient_id); default: an echo
    answers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: message text -> custom action Rasa runs for it (through `action_url`), before answering
    actions: dict[str, str] = field(default_factory=dict)
    action_url: str | None = None
    #: endpoints.yml `action_endpoint: {token}`: Rasa sends it as `?token=` on every action call
    action_token: str | None = None
    #: the HTTP client the fake calls the action server with
    action_http: httpx.AsyncClient | None = None
    action_calls: list[tuple[int, Any]] = field(default_factory=list)
    token: str | None = None
    #: text -> (intent, confidence, entities) for /model/parse
    intents: dict[str, tuple[str, float, list[dict[str, Any]]]] = field(default_factory=dict)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/webhooks/{channel}/webhook", self._rest, methods=["POST"]),
                Route("/model/parse", self._parse, methods=["POST"]),
            ]
        )

    async def _rest(self, request: Request) -> Response:
        rec = await self.record(request)
        failed = await self.failure()
        if failed is not None:
            return failed
        sender, text = rec.body["sender"], rec.body["message"]
        messages: list[dict[str, Any]] = []
        action = self.actions.get(text)
        if action is not None:
            messages += await self._run_action(sender, text, action, rec.body.get("metadata") or {})
        messages += copy.deepcopy(self.answers.get(text, [{"text": f"rasa heard: {text}"}]))
        return JSONResponse([{"recipient_id": sender, **m} for m in messages])

    async def _run_action(self, sender: str, text: str, action: str, metadata: dict[str, Any]) -> list[dict[str, Any]]:
        assert self.action_url is not None and self.action_http is not None
        call = recorded("action_call_handoff.json")
        call["next_action"] = action
        call["sender_id"] = sender
        call["tracker"]["sender_id"] = sender
        call["tracker"]["latest_message"]["text"] = text
        call["tracker"]["latest_message"]["metadata"] = metadata
        params = {"token": self.action_token} if self.action_token is not None else None
        response = await self.action_http.post(self.action_url, json=call, params=params)
        body = response.json() if response.content else None
        self.action_calls.append((response.status_code, body))
        if response.status_code != 200 or not isinstance(body, dict):
            # Rasa logs the failed action and answers with what it has (no responses from the action)
            return []
        return [{k: v for k, v in r.items() if v not in (None, [], {})} for r in body.get("responses", [])]

    async def _parse(self, request: Request) -> Response:
        rec = await self.record(request)
        if self.token is not None and rec.query.get("token") != self.token:
            return JSONResponse(
                {"version": "3.6.21", "status": "failure", "reason": "NotAuthenticated", "code": 401}, status_code=401
            )
        failed = await self.failure()
        if failed is not None:
            return failed
        text = rec.body["text"]
        data = recorded("model_parse.json")
        data["text"] = text
        if text in self.intents:
            name, confidence, entities = self.intents[text]
            data["intent"] = {"name": name, "confidence": confidence}
            data["entities"] = entities
            data["intent_ranking"] = [data["intent"]]
        return JSONResponse(data)
