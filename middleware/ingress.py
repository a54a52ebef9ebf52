"""The webhook endpoint: verify, parse, reject, dedupe, persist, ack.

Nothing is acknowledged before it is in the store; a retried webhook gets 200 and no second
turn; past the backlog limit, or with the store down, the platform gets 503 + Retry-After and
keeps the message. Before that limit, past `dispatch.hold_backlog`, the answer waits (up to
`dispatch.hold_seconds`) for the turns to catch up: a sender faster than the bots is slowed to
their pace rather than refused. A method the platform does not use is 405 and a sub-path it does not call
404, before the body is read; a body is bounded in size (413) and, as JSON, in depth (400,
`platforms.base.loads_json`). A sender past its rate (middleware/flood.py) is still answered 200:
its messages are stored as `flooded`, without a turn.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from middleware.dispatch import Dispatcher
from middleware.flood import SenderLimiter
from middleware.metrics import Metrics
from middleware.model import Inbound
from middleware.platforms.base import Platform, Rejected, WebhookRequest, id_problem, run_follow_ups
from middleware.store import PendingMessage, Store, StoreUnavailable

log = logging.getLogger("switchboard.ingress")


_NO_QUERY: Mapping[str, str] = MappingProxyType({})


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
        senders: SenderLimiter | None = None,
        hold_seconds: float = 1.0,
    ) -> None:
        self.platforms = platforms
        self.store = store
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.retry_after = str(retry_after)
        self.senders = senders or SenderLimiter(None, 1)
        self.hold_seconds = hold_seconds
        #: platforms' follow-ups running in the background (platforms.base.run_follow_ups)
        self._follow_ups: set[asyncio.Task[None]] = set()

    async def __call__(self, request: Request) -> Response:
        name = request.path_params["name"]
        platform = self.platforms.get(name)
        if platform is None:
            return JSONResponse({"error": f"unknown platform {name!r}"}, status_code=404)
        if request.method not in platform.methods:
            allow = ", ".join(sorted(platform.methods))
            self.metrics.webhooks.labels(name, "rejected").inc()
            return JSONResponse(
                {"error": f"{request.method} is not how {name!r} takes webhooks" + (f"; use {allow}" if allow else "")},
                status_code=405,
                headers={"Allow": allow},
            )
        rest = request.path_params.get("rest", "")
        if rest and not platform.subpaths:
            self.metrics.webhooks.labels(name, "rejected").inc()
            return JSONResponse({"error": f"no webhook at /webhooks/{name}/{rest[:80]}"}, status_code=404)
        if not self.dispatcher.accepting:
            return self._unavailable("shutting down")
        if self.dispatcher.crowded:  # hold the answer while the turns catch up (dispatch.hold_backlog)
            await self.dispatcher.room(self.hold_seconds)
            if not self.dispatcher.accepting:
                return self._unavailable("shutting down")
        if self.dispatcher.overloaded:
            return self._unavailable("backlog full")
        try:
            body = await self._body(request)
        except TooLarge:
            self.metrics.webhooks.labels(name, "rejected").inc()
            return JSONResponse({"error": f"body larger than {self.max_body_bytes} bytes"}, status_code=413)
        query = request.query_params if request.scope.get("query_string") else _NO_QUERY
        webhook = WebhookRequest(request.method, body, request.headers, query, rest)
        try:
            parsed = platform.parse(webhook)
            check_messages(parsed.messages)
        except Rejected as exc:
            self.metrics.webhooks.labels(name, "rejected").inc()
            log.info("webhook rejected: %s", exc.message, extra={"platform": name, "status": exc.status})
            return JSONResponse(exc.body(), status_code=exc.status)
        flooded = [not self.senders.admit(m) for m in parsed.messages]
        try:
            ids = await self.store.accept_ids(parsed.messages, flooded)
        except StoreUnavailable:
            for message, flood in zip(parsed.messages, flooded, strict=True):
                if not flood:
                    self.senders.refund(message)
            return self._unavailable("store unavailable")
        if parsed.follow_ups:  # accepted: what the platform module does besides the messages, after the answer
            task = asyncio.create_task(run_follow_ups(platform, parsed.follow_ups))
            self._follow_ups.add(task)
            task.add_done_callback(self._follow_ups.discard)
        accepted = stored_flooded = 0
        for message, inbox_id, flood in zip(parsed.messages, ids, flooded, strict=True):
            if inbox_id is not None and flood:
                stored_flooded += 1
            elif inbox_id is not None:
                accepted += 1
                self.dispatcher.notify(message.conversation_key, hint=PendingMessage(inbox_id, message))
            elif not flood:
                self.senders.refund(message)  # a duplicate runs no turn: its token goes back
        duplicates = len(ids) - accepted - stored_flooded
        if accepted:
            self.dispatcher.accepted(accepted)
            self.metrics.child(self.metrics.webhooks, name, "accepted").inc(accepted)
        if stored_flooded:
            self.metrics.webhooks.labels(name, "flooded").inc(stored_flooded)
        if duplicates:
            self.metrics.webhooks.labels(name, "duplicate").inc(duplicates)
        if isinstance(parsed.response, str):
            return PlainTextResponse(parsed.response, status_code=parsed.status)
        if parsed.response is not None:
            return JSONResponse(parsed.response, status_code=parsed.status)
        answer = {"accepted": accepted + stored_flooded, "duplicates": duplicates}
        if stored_flooded:
            answer["flooded"] = stored_flooded
        return Response(orjson.dumps(answer), status_code=parsed.status, media_type="application/json")

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

    async def close(self) -> None:
        """At shutdown: give the platforms' follow-ups in flight a moment to finish (a join a
        webhook asked for), then cut them off; the platform repeats an invite that was not acted on."""
        if self._follow_ups:
            _, pending = await asyncio.wait(list(self._follow_ups), timeout=2)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _unavailable(self, why: str) -> Response:
        return JSONResponse(
            {"error": f"temporarily unavailable: {why}; retry later"},
            status_code=503,
            headers={"Retry-After": self.retry_after},
        )


def check_messages(messages: Sequence[Inbound]) -> None:
    """The edge's last check, whatever the platform: ids the store can hold (`Rejected` 400 otherwise)."""
    for i, m in enumerate(messages):
        at = f"[{i}]." if len(messages) > 1 else ""
        for field, value in (
            ("message_id", m.message_id),
            ("conversation_id", m.conversation_id),
            ("sender.id", m.sender.id),
        ):
            problem = id_problem(value) if isinstance(value, str) else "is not a string"
            if problem is not None:
                raise Rejected(400, f"{at}{field} {problem}", f"{at}{field}")
