"""A fake bot behind a URL, speaking the `http` connector's documented protocol (docs/connectors.md,
"http": the request JSON {message, conversation, vars, history, options, deadline_ms} and the
response JSON {replies, actions, nlu, end}); tests/data/http holds the documented examples.

It answers "menu" with the recorded rich response, "agent" with a handoff, "bye" with a resolve,
"odd" with a response that breaks the protocol, and anything else with an echo. With a `secret` it
checks the X-Switchboard-Signature header (HMAC-SHA256 of the body) and answers 401 when it is wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.engines import FakeEngine

DATA = Path(__file__).resolve().parent.parent / "data" / "http"


def recorded(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / name).read_text())
    return data


@dataclass
class FakeHttpBot(FakeEngine):
    secret: str | None = None

    def app(self) -> Starlette:
        return Starlette(
            routes=[Route("/turn", self._turn, methods=["POST"]), Route("/parse", self._parse, methods=["POST"])]
        )

    async def _check(self, request: Request) -> Response | None:
        raw = await request.body()
        if self.secret is not None:
            expected = "sha256=" + hmac.new(self.secret.encode(), raw, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(expected, request.headers.get("x-switchboard-signature", "")):
                return JSONResponse({"error": "bad signature"}, status_code=401)
        return await self.failure()

    async def _turn(self, request: Request) -> Response:
        rec = await self.record(request)
        problem = await self._check(request)
        if problem is not None:
            return problem
        text = rec.body["message"]["text"]
        if text == "menu":
            return JSONResponse(recorded("response_rich.json"))
        if text == "agent":
            return JSONResponse({"replies": ["A person will answer."], "actions": [{"handoff": "tier1"}]})
        if text == "bye":
            return JSONResponse({"replies": ["Bye!"], "actions": [{"resolve": "done"}]})
        if text == "odd":
            return JSONResponse({"replies": [{"buttons": "not a list"}]})
        return JSONResponse({"replies": [f"bot heard: {text}"], "nlu": {"intent": "echo", "confidence": 0.5}})

    async def _parse(self, request: Request) -> Response:
        await self.record(request)
        problem = await self._check(request)
        if problem is not None:
            return problem
        return JSONResponse({"nlu": {"intent": "order_status", "confidence": 0.88, "entities": {"order": "123456"}}})
