"""A fake chat platform playing the generic protocol's receiving side (DESIGN.md, "Outbound").

It records every call (post-message, typing, read) with its headers and arrival time, and can be
told to fail: answer 503 for a while, 429 with Retry-After, or 400 for chosen texts. Calls that
reuse an Idempotency-Key are recorded, flagged as repeats, and answered 200, as a platform that
honours idempotency keys would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


@dataclass
class Call:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    at: float
    repeat: bool = False


@dataclass
class FakePlatform:
    secret: str | None = None
    calls: list[Call] = field(default_factory=list)
    #: scripted answers, consumed one per call to /messages: (status, headers)
    script: deque[tuple[int, dict[str, str]]] = field(default_factory=deque)
    #: texts answered 400 every time (a permanent refusal)
    refuse_texts: set[str] = field(default_factory=set)
    bad_signatures: int = 0
    seen_keys: set[str] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/messages", self._messages, methods=["POST"]),
                Route("/typing", self._record, methods=["POST"]),
                Route("/read", self._record, methods=["POST"]),
            ]
        )

    async def _verify(self, request: Request) -> tuple[dict[str, Any], dict[str, str]]:
        raw = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        if self.secret is not None:
            expected = "sha256=" + hmac.new(self.secret.encode(), raw, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(expected, headers.get("x-switchboard-signature", "")):
                self.bad_signatures += 1
        return json.loads(raw), headers

    def _add(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> Call:
        key = headers.get("idempotency-key", "")
        call = Call(path, body, headers, time.monotonic(), repeat=key in self.seen_keys)
        self.calls.append(call)
        self.changed.set()
        return call

    async def _record(self, request: Request) -> Response:
        body, headers = await self._verify(request)
        self._add(request.url.path, body, headers)
        self.seen_keys.add(headers.get("idempotency-key", ""))
        return JSONResponse({"ok": True})

    async def _messages(self, request: Request) -> Response:
        body, headers = await self._verify(request)
        key = headers.get("idempotency-key", "")
        if key not in self.seen_keys:
            if body.get("text") in self.refuse_texts:
                self._add("/messages#refused", body, headers)
                return JSONResponse({"error": "refused"}, status_code=400)
            if self.script:
                status, extra = self.script.popleft()
                if status != 200:
                    self._add(f"/messages#{status}", body, headers)
                    return JSONResponse({"error": "scripted"}, status_code=status, headers=extra)
        self._add("/messages", body, headers)
        self.seen_keys.add(key)
        return JSONResponse({"ok": True, "id": key})

    # -- views for assertions ------------------------------------------------------------------

    def delivered(self) -> list[Call]:
        """Accepted post-message calls, first delivery of each Idempotency-Key only."""
        return [c for c in self.calls if c.path == "/messages" and not c.repeat]

    def typing(self, conversation_id: str) -> list[Call]:
        return [c for c in self.calls if c.path == "/typing" and c.body["conversation_id"] == conversation_id]

    async def wait_for(self, predicate: Any, timeout: float = 30.0) -> None:  # noqa: ASYNC109 (a test helper's bound)
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for the fake platform")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.5))
