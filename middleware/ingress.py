"""The webhook endpoint: verify, parse, reject, dedupe, persist, ack.

Nothing is acknowledged before it is in the store; a retried webhook gets 200 and no second
turn; past the backlog limit, or with the store down, the platform gets 503 + Retry-After and
keeps the message.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from middleware.dispatch import Dispatcher
from middleware.metrics import Metrics
from middleware.platforms.base import Platform, Rejected, WebhookRequest
from middleware.store import Store, StoreUnavailable

log = logging.getLogger("switchboard.ingress")


class TooLarge(Exception):
    pass


class Ingress:
    def __init__(
        self,
        platforms: Mapping[str, Platform],
        store: Store,
        dispatcher: Dispatcher,
        metrics: Metrics,
        max_body_bytes: int,
        retry_after: int,
    ) -> None:
        self.platforms = platforms
        self.store = store
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.retry_after = str(retry_after)

    async def __call__(self, request: Request) -> Response:
        name = request.path_params["name"]
        platform = self.platforms.get(name)
        if platform is None:
            return JSONResponse({"error": f"unknown platform {name!r}"}, status_code=404)
        if not self.dispatcher.accepting:
            return self._unavailable("shutting down")
        if self.dispatcher.overloaded:
            return self._unavailable("backlog full")
        try:
            body = await self._body(request)
        except TooLarge:
            self.metrics.webhooks.labels(name, "rejected").inc()
            return JSONResponse({"error": f"body larger than {self.max_body_bytes} bytes"}, status_code=413)
        webhook = WebhookRequest(
            request.method, body, request.headers, request.query_params, request.path_params.get("rest", "")
        )
        try:
            parsed = platform.parse(webhook)
        except Rejected as exc:
            self.metrics.webhooks.labels(name, "rejected").inc()
            log.info("webhook rejected: %s", exc.message, extra={"platform": name, "status": exc.status})
            return JSONResponse(exc.body(), status_code=exc.status)
        try:
            fresh = await self.store.accept(parsed.messages)
        except StoreUnavailable:
            return self._unavailable("store unavailable")
        accepted = 0
        notified: set[str] = set()
        for message, new in zip(parsed.messages, fresh, strict=True):
            if new:
                accepted += 1
                key = message.conversation_key
                if key not in notified:
                    notified.add(key)
                    self.dispatcher.notify(key)
        duplicates = len(fresh) - accepted
        if accepted:
            self.dispatcher.accepted(accepted)
            self.metrics.webhooks.labels(name, "accepted").inc(accepted)
        if duplicates:
            self.metrics.webhooks.labels(name, "duplicate").inc(duplicates)
        if isinstance(parsed.response, str):
            return PlainTextResponse(parsed.response, status_code=parsed.status)
        if parsed.response is not None:
            return JSONResponse(parsed.response, status_code=parsed.status)
        return JSONResponse({"accepted": accepted, "duplicates": duplicates}, status_code=parsed.status)

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise TooLarge
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise TooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    def _unavailable(self, why: str) -> Response:
        return JSONResponse(
            {"error": f"temporarily unavailable: {why}; retry later"},
            status_code=503,
            headers={"Retry-After": self.retry_after},
        )
