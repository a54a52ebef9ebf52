"""What every fake engine shares: recorded requests, and scripted failures.

A test pushes failures onto `fail` (consumed one per request, oldest first):

- an int: answer that HTTP status with a small error body (`retry-after: 0` on 429);
- `"malformed"`: a 200 whose body is not JSON;
- `"drop"`: close the connection without an answer (an httpx transport error);
- `("slow", seconds)`: answer normally after sleeping that long.

The fakes are Starlette apps; tests reach them through `httpx.ASGITransport` (`client()`) or on a
real port (`tests.conftest.Server`).
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

Failure = int | str | tuple[str, float]


class Dropped(Exception):
    """Raised inside a fake to make the transport fail (ASGITransport re-raises app errors)."""


@dataclass
class Recorded:
    path: str
    body: Any
    headers: dict[str, str]
    query: dict[str, str]


@dataclass
class FakeEngine:
    requests: list[Recorded] = field(default_factory=list)
    fail: deque[Failure] = field(default_factory=deque)

    async def record(self, request: Request) -> Recorded:
        raw = await request.body()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        rec = Recorded(
            request.url.path,
            body,
            {k.lower(): v for k, v in request.headers.items()},
            dict(request.query_params),
        )
        self.requests.append(rec)
        return rec

    async def failure(self) -> Response | None:
        """The scripted failure for this request, if any (a slow one sleeps, then returns None)."""
        if not self.fail:
            return None
        what = self.fail.popleft()
        if isinstance(what, tuple):
            await asyncio.sleep(what[1])
            return None
        if what == "malformed":
            return Response("<html>502 Bad Gateway</html>", media_type="text/html")
        if what == "drop":
            raise Dropped("connection dropped by the fake")
        assert isinstance(what, int)
        headers = {"retry-after": "0"} if what == 429 else {}
        return JSONResponse({"error": {"code": what, "message": f"scripted {what}"}}, status_code=what, headers=headers)


class _DroppingTransport(httpx.AsyncBaseTransport):
    """ASGITransport that turns a fake's `Dropped` into the transport error a real drop gives."""

    def __init__(self, app: Any) -> None:
        self.inner = httpx.ASGITransport(app=app)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self.inner.handle_async_request(request)
        except Dropped as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc


def client(app: Any) -> httpx.AsyncClient:
    """An httpx client whose requests reach the fake app in process."""
    return httpx.AsyncClient(transport=_DroppingTransport(app), timeout=30)
