"""uvicorn's httptools protocol, with each answer written to the socket in one piece, and webhook
POSTs answered by the ingress without ASGI.

One write: uvicorn writes an answer's status line and headers when the app sends
`http.response.start`, and its body when the app sends `http.response.body`: two writes, so two
`send` calls, two TCP segments and two wake-ups of the client per webhook. On loopback and on a LAN
the kernel's work for a segment (the receiver's side included, on loopback) is most of a small
answer's cost. Here the writes made while one event-loop callback runs are joined and go out when it
returns (`loop.call_soon`): an app that sends start and body in one step (every plain response)
costs one write; a streamed answer still goes out as it is produced. A close, an abort or a pause of
writing flushes first.

Webhooks: a `POST /webhooks/{name}` to a `SwitchboardApp` whose ingress is running goes to
`Ingress.answer` directly: no ASGI scope round (uvicorn's proxy-headers middleware, the app, a
Starlette request and response, two ASGI messages each checked header by header), which cost about
a tenth of a webhook's work (bench/README.md). uvicorn's protocol still parses the request, keeps
the connection (keep-alive, pipelining, flow control, `Expect: 100-continue`, shutdown) and counts
the request; the answer is written as uvicorn would write the same response. Everything else, and
every request when the app has no running ingress, takes the ASGI way.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Iterable
from typing import Any, cast

from starlette.datastructures import QueryParams
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from middleware.ingress import NO_QUERY, Answer, ClientGone, Ingress, TooLarge, webhook_name

log = logging.getLogger("switchboard.server")


class _JoinedWrites(asyncio.Transport):
    """The transport uvicorn's protocol writes to: writes in one callback leave as one.

    Every other call goes to the socket's transport by a method of its own, not `__getattr__`: a
    class with `__getattr__` makes every attribute read on it, its own included, take CPython's
    slow lookup (`slot_tp_getattr_hook`, two type lookups a read; a failed one first builds the
    AttributeError), a dozen times a webhook here."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        pending = self._pending
        if not pending:
            self._loop.call_soon(self.flush)
        pending.append(bytes(data))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for chunk in list_of_data:
            self.write(chunk)

    def flush(self) -> None:
        pending = self._pending
        if pending:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            transport = self._transport
            if not transport.is_closing():
                transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(chunk) for chunk in self._pending)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:  # an upgrade (websockets)
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` whose answers leave in one write, and whose webhook POSTs go to the
    ingress without ASGI (see the module's docstring)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_JoinedWrites(transport, asyncio.get_running_loop()))

    def on_headers_complete(self) -> None:
        # uvicorn's, for a POST to a plain webhook URL (no query, no escapes, no root path, no
        # upgrade, no concurrency limit) of a running ingress: the path is the URL as it came, so
        # httptools' URL parse and uvicorn's path handling are skipped, and the lane starts at once
        url = self.url
        path = url.decode("ascii") if url.isascii() else ""
        # tested on the str: bytes' `in` first tries its operand as an int (a TypeError built, dropped)
        plain = "?" not in path and "%" not in path and "#" not in path
        name = webhook_name(path) if plain else None
        ingress = getattr(self.config.app, "ingress", None)
        parser = self.parser
        if not (
            name is not None
            and isinstance(ingress, Ingress)
            and parser.get_method() == b"POST"
            and not self.root_path
            and self.limit_concurrency is None
            and not parser.should_upgrade()
        ):
            super().on_headers_complete()
            return
        http_version = parser.get_http_version()
        scope = self.scope
        scope["method"] = "POST"
        if http_version != "1.1":
            scope["http_version"] = http_version
        scope["path"] = path
        scope["raw_path"] = url
        scope["query_string"] = b""
        existing = self.cycle
        self.cycle = RequestResponseCycle(
            scope=scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=self.expect_100_continue,
            keep_alive=http_version != "1.0" and parser.should_keep_alive(),
            on_response=self.on_response_complete,
        )
        if existing is None or existing.response_complete:
            self._start_webhook(ingress, name, self.cycle)
        else:  # pipelined: started when the answers before it are written (`_start_asgi_task`)
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, self.app))

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        scope = cycle.scope
        ingress = getattr(self.config.app, "ingress", None)
        name = webhook_name(scope["path"]) if scope["method"] == "POST" and not scope["root_path"] else None
        # `app` is not ours when uvicorn answers for itself (its concurrency limit's 503)
        if name is None or not isinstance(ingress, Ingress) or app is not self.app:
            super()._start_asgi_task(cycle, app)
            return
        self._start_webhook(ingress, name, cycle)

    def _start_webhook(self, ingress: Ingress, name: str, cycle: RequestResponseCycle) -> None:
        webhook = _webhook(ingress, name, cycle, self.transport)
        if self.config.reset_contextvars:  # as uvicorn does for an ASGI task
            task = self.loop.create_task(webhook, context=contextvars.Context())
        else:
            task = self.loop.create_task(webhook)
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)


async def _webhook(ingress: Ingress, name: str, cycle: RequestResponseCycle, transport: asyncio.Transport) -> None:
    """One webhook POST on `cycle` (uvicorn's state of the request on its connection): answered by
    the ingress, written as `RequestResponseCycle.send` writes a response with a content-length."""
    scope = cycle.scope
    try:
        query_string = scope["query_string"]
        query = QueryParams(query_string) if query_string else NO_QUERY
        # names as uvicorn lower-cased them; a repeated header's first value, as Starlette's Headers
        # gives it (a dict: a platform's few lookups are C's, not a scan of the list each)
        headers = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in reversed(cast(list[tuple[bytes, bytes]], scope["headers"]))
        }

        answer = await ingress.answer(name, "POST", "", headers, query, functools.partial(_body, cycle, transport))
        if cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()
        if cycle.disconnected:
            return
        cycle.response_started = cycle.response_complete = True
        cycle.waiting_for_100_continue = False
        try:
            transport.write(_encode(answer, cycle))
        except Exception:  # an answer uvicorn could not write either (a status it has no line for)
            log.exception("webhook answer not written", extra={"platform": name, "status": answer.status})
            transport.close()
            return
        if cycle.access_log:
            cycle.access_logger.info(
                '%s - "%s %s HTTP/%s" %d',
                get_client_addr(scope),
                scope["method"],
                get_path_with_query_string(scope),
                scope["http_version"],
                answer.status,
            )
        cycle.message_event.set()
        if not cycle.keep_alive:
            transport.close()
        cycle.on_response()
    finally:
        cycle.on_response = lambda: None


#: uvicorn's default headers (date, server), as last written: it makes a new list when the date moves on
_defaults: tuple[object, bytes] = (None, b"")


def _encode(answer: Answer, cycle: RequestResponseCycle) -> bytes:
    global _defaults
    known, encoded = _defaults
    if known is not cycle.default_headers:
        encoded = b"".join(b"%s: %s\r\n" % (name, value) for name, value in cycle.default_headers)
        _defaults = (cycle.default_headers, encoded)
    content = [STATUS_LINE[answer.status], encoded]
    content += [b"content-length: ", b"%d" % len(answer.body), b"\r\ncontent-type: ", answer.content_type, b"\r\n"]
    for header, text in answer.headers:
        content += [header.lower().encode("latin-1"), b": ", text.encode("latin-1"), b"\r\n"]
    if not cycle.keep_alive:
        content.append(b"connection: close\r\n")
    content += [b"\r\n", answer.body]
    return b"".join(content)


async def _body(cycle: RequestResponseCycle, transport: asyncio.Transport, limit: int) -> bytes:
    """The request's body as uvicorn's `receive` hands it over, at most `limit` bytes."""
    if cycle.waiting_for_100_continue and not transport.is_closing():
        transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        cycle.waiting_for_100_continue = False
    chunks: list[bytes] = []
    size = 0
    while True:
        if cycle.more_body and not cycle.disconnected:  # the rest is still on its way
            cycle.flow.resume_reading()
            await cycle.message_event.wait()
            cycle.message_event.clear()
        if cycle.disconnected:
            raise ClientGone
        size += len(cycle.body)
        if size > limit:
            raise TooLarge
        chunks.append(bytes(cycle.body))
        cycle.body = bytearray()
        if not cycle.more_body:
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
