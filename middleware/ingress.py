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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from middleware.dispatch import Dispatcher
from middleware.flood import SenderLimiter
from middleware.jsoncodec import dumps
from middleware.metrics import Metrics
from middleware.model import Inbound
from middleware.platforms.base import MAX_ID_LENGTH, Platform, Rejected, WebhookRequest, id_problem, run_follow_ups
from middleware.store import PendingMessage, Store, StoreUnavailable

log = logging.getLogger("switchboard.ingress")


#: the query of a webhook URL without one (shared, read-only)
NO_QUERY: Mapping[str, str] = MappingProxyType({})


class TooLarge(Exception):
    """The body is larger than `server.max_body_bytes` (raised by a `BodyReader`)."""


class ClientGone(Exception):
    """The client closed the connection before its body arrived (raised by a `BodyReader`)."""


#: reads the request's body, at most `limit` bytes (TooLarge past them; ClientGone if the client left)
BodyReader = Callable[[int], Awaitable[bytes]]

JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"


class Answer(NamedTuple):  # one a webhook: a named tuple is built by one C call, a frozen dataclass by one a field
    """What the ingress answers a webhook: status, body, its content type and any other headers.
    The server writes it (middleware/server_protocol.py), or a Starlette route (`Answer.response`)."""

    status: int
    body: bytes
    content_type: bytes = JSON
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, value: Any, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> Answer:
        return cls(status, dumps(value), JSON, headers)

    def response(self) -> Response:
        return Response(self.body, self.status, dict(self.headers), self.content_type.decode("latin-1"))


INTERNAL_ERROR = Answer(500, b"Internal Server Error", TEXT)


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
        """The webhook as a Starlette endpoint (GETs, sub-paths, other methods, and POSTs when the
        server is not `switchboard serve`'s own protocol)."""

        async def read(limit: int) -> bytes:
            chunks = []
            size = 0
            try:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise TooLarge
                    chunks.append(chunk)
            except ClientDisconnect as exc:
                raise ClientGone from exc
            return b"".join(chunks)

        query = request.query_params if request.scope.get("query_string") else NO_QUERY
        name = request.path_params["name"]
        rest = request.path_params.get("rest", "")
        answer = await self.answer(name, request.method, rest, request.headers, query, read)
        return answer.response()

    async def answer(
        self,
        name: str,
        method: str,
        rest: str,
        headers: Mapping[str, str],
        query: Mapping[str, str],
        read: BodyReader,
    ) -> Answer:
        """Answer the webhook `method /webhooks/{name}/{rest}`; the body is read (`read`) only once
        the platform, the method and the room for it are known. An unexpected error is answered
        500 and logged once, naming the platform; the next webhook is served as usual."""
        try:
            return await self._answer(name, method, rest, headers, query, read)
        except ClientGone:
            log.info("webhook client left before its body arrived", extra={"platform": name})
            return Answer(400, b"", TEXT)  # nobody reads it: the connection is gone
        except Exception:
            log.exception("webhook failed", extra={"platform": name})
            return INTERNAL_ERROR

    async def _answer(
        self,
        name: str,
        method: str,
        rest: str,
        headers: Mapping[str, str],
        query: Mapping[str, str],
        read: BodyReader,
    ) -> Answer:
        platform = self.platforms.get(name)
        if platform is None:
            return Answer.json({"error": f"unknown platform {name!r}"}, 404)
        if method not in platform.methods:
            allow = ", ".join(sorted(platform.methods))
            self.metrics.webhooks.labels(name, "rejected").inc()
            return Answer.json(
                {"error": f"{method} is not how {name!r} takes webhooks" + (f"; use {allow}" if allow else "")},
                405,
                (("Allow", allow),),
            )
        if rest and not platform.subpaths:
            self.metrics.webhooks.labels(name, "rejected").inc()
            return Answer.json({"error": f"no webhook at /webhooks/{name}/{rest[:80]}"}, 404)
        if not self.dispatcher.accepting:
            return self._unavailable("shutting down")
        if self.dispatcher.crowded:  # hold the answer while the turns catch up (dispatch.hold_backlog)
            await self.dispatcher.room(self.hold_seconds)
            if not self.dispatcher.accepting:
                return self._unavailable("shutting down")
        if self.dispatcher.overloaded:
            return self._unavailable("backlog full")
        try:
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                raise TooLarge
            body = await read(self.max_body_bytes)
        except TooLarge:
            self.metrics.webhooks.labels(name, "rejected").inc()
            return Answer.json({"error": f"body larger than {self.max_body_bytes} bytes"}, 413)
        webhook = WebhookRequest(method, body, headers, query, rest)
        try:
            parsed = platform.parse(webhook)
            check_messages(parsed.messages)
        except Rejected as exc:
            self.metrics.webhooks.labels(name, "rejected").inc()
            log.info("webhook rejected: %s", exc.message, extra={"platform": name, "status": exc.status})
            return Answer.json(exc.body(), exc.status)
        if self.senders.per_second is None:  # no flood control configured
            flooded = [False] * len(parsed.messages)
        else:
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
            self.metrics.webhooks.labels(name, "accepted").inc(accepted)
        if stored_flooded:
            self.metrics.webhooks.labels(name, "flooded").inc(stored_flooded)
        if duplicates:
            self.metrics.webhooks.labels(name, "duplicate").inc(duplicates)
        if isinstance(parsed.response, str):
            return Answer(parsed.status, parsed.response.encode(), TEXT)
        if parsed.response is not None:
            return Answer.json(parsed.response, parsed.status)
        answer = {"accepted": accepted + stored_flooded, "duplicates": duplicates}
        if stored_flooded:
            answer["flooded"] = stored_flooded
        return Answer.json(answer, parsed.status)

    async def close(self) -> None:
        """At shutdown: give the platforms' follow-ups in flight a moment to finish (a join a
        webhook asked for), then cut them off; the platform repeats an invite that was not acted on."""
        if self._follow_ups:
            _, pending = await asyncio.wait(list(self._follow_ups), timeout=2)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _unavailable(self, why: str) -> Answer:
        return Answer.json(
            {"error": f"temporarily unavailable: {why}; retry later"}, 503, (("Retry-After", self.retry_after),)
        )


def check_messages(messages: Sequence[Inbound]) -> None:
    """The edge's last check, whatever the platform: ids the store can hold (`Rejected` 400 otherwise)."""
    for i, m in enumerate(messages):
        mid, cid, sid = m.message_id, m.conversation_id, m.sender.id
        if type(mid) is str and type(cid) is str and type(sid) is str:  # the usual case, at a glance
            joined = mid + cid + sid
            short = 0 < len(mid) <= MAX_ID_LENGTH and 0 < len(cid) <= MAX_ID_LENGTH and 0 < len(sid) <= MAX_ID_LENGTH
            if short and joined.isascii() and "\x00" not in joined:
                continue
        at = f"[{i}]." if len(messages) > 1 else ""
        for field, value in (
            ("message_id", m.message_id),
            ("conversation_id", m.conversation_id),
            ("sender.id", m.sender.id),
        ):
            problem = id_problem(value) if isinstance(value, str) else "is not a string"
            if problem is not None:
                raise Rejected(400, f"{at}{field} {problem}", f"{at}{field}")


def webhook_name(path: str) -> str | None:
    """The platform name of a plain webhook URL (`/webhooks/{name}`, no sub-path), else None."""
    if len(path) > 10 and path.startswith("/webhooks/") and path.count("/") == 2:
        return path[10:]
    return None
