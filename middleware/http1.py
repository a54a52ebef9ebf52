"""A lean HTTP/1.1 client for the calls every reply makes: one POST to a platform, a short answer.

httpx builds a Request, URL, Headers, cookie jar, auth and redirect machinery and a streamed Response
for each call; over aiohttp's pool that came to ~0.3 ms of Python per reply, more than the rest of
the turn (bench/README.md, "Outbound calls"). This client keeps only what a platform POST needs:
a keep-alive pool per origin (bounded), the request written in one piece, the answer parsed by
httptools (the parser uvicorn uses), a deadline for the whole call, TLS with the same trust httpx
would use. Everything else (proxies, redirects, cookies, other methods) stays with httpx:
`SwitchboardClient` is an `httpx.AsyncClient` whose `fast` pool `post_bytes` uses where it can
(middleware/platforms/base.py).

A reused connection the server closed while it lay idle fails before any answer arrives; the
request is then sent again on a new connection only if it carries an Idempotency-Key (as Go's
net/http does: the key makes a repeat harmless); otherwise the caller sees a connection error,
which the outbox retries.
"""

from __future__ import annotations

import asyncio
import collections
import os
import ssl
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar, cast
from urllib.parse import urlsplit

import httptools
import httpx

from middleware.cutoff import cutoff
from middleware.slots import Slots

T = TypeVar("T")

#: the largest answer body kept (platform answers are a few hundred bytes)
MAX_ANSWER_BYTES = 16 * 1024 * 1024
#: environment variables that send httpx through a proxy: with any set, the fast path is off
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


class Http1Error(Exception):
    """The call failed before a whole answer arrived (connection refused, reset, closed, bad answer)."""


class Http1Timeout(Http1Error):
    """No whole answer within the deadline; the connection is closed."""


class Answer:
    """A platform's answer, with the attributes of httpx.Response that the platform modules read.
    Its headers (lower-case names; a repeated one's values joined by ", ") are read from the raw
    pairs when first asked for: most answers are only looked at for their status."""

    __slots__ = ("_headers", "_raw", "content", "status_code")

    def __init__(self, status_code: int, raw_headers: list[tuple[bytes, bytes]], content: bytes) -> None:
        self.status_code = status_code
        self._raw = raw_headers
        self._headers: dict[str, str] | None = None
        self.content = content

    @property
    def headers(self) -> Mapping[str, str]:
        if self._headers is None:
            self._headers = _header_map(self._raw)
        return self._headers

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


def _header_map(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        old = headers.get(key)
        headers[key] = text if old is None else f"{old}, {text}"
    return headers


class Origin(NamedTuple):  # a dict key on every request: a tuple's hash is C's, a dataclass's Python's
    scheme: str
    host: str
    port: int


class _Stale(Http1Error):
    """A reused connection closed before any byte of the answer: the request may be sent again."""


@dataclass(eq=False)
class _Connection(asyncio.Protocol):
    origin: Origin
    transport: asyncio.Transport | None = None
    closed: bool = False
    reused: bool = False
    _answer: asyncio.Future[Answer] | None = None
    _parser: Any = None
    _loop: asyncio.AbstractEventLoop | None = None
    _status: int = 0
    _headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    _body: list[bytes] = field(default_factory=list)
    _size: int = 0
    _got_bytes: bool = False
    _keep_alive: bool = False

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        if self._answer is None:  # bytes before any request: the connection is not in a sane state
            self.close()
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(Http1Error(f"bad HTTP answer from {self.origin.host}: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._answer is not None and not self._answer.done():
            if exc is None and self._status >= 200 and self._until_close():
                # an answer without a length ends with its connection (RFC 9112, 6.3 point 8);
                # httptools exposes no end-of-input call, so the end is taken here
                self._keep_alive = False
                self._answer.set_result(Answer(self._status, self._headers, b"".join(self._body)))
            elif self.reused and not self._got_bytes:
                self._fail(_Stale("connection closed by the server before answering"))
            else:
                self._fail(Http1Error(f"connection closed by {self.origin.host} before the answer ended"))

    # -- httptools callbacks ------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._keep_alive = self._parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_ANSWER_BYTES:
            self._fail(Http1Error(f"answer from {self.origin.host} larger than {MAX_ANSWER_BYTES} bytes"))
            self.close()
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._status < 200:  # 1xx (100 Continue): the real answer follows on the same parser
            self._headers = []
            return
        answer = Answer(self._status, self._headers, b"".join(self._body))
        if not self._keep_alive:
            self.close()
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(answer)

    # -- use --------------------------------------------------------------------------------------

    def send(self, request: bytes) -> asyncio.Future[Answer]:
        assert self.transport is not None and self._loop is not None
        self._answer = self._loop.create_future()
        if self._parser is None:  # one parser for the connection's answers, one after the other
            self._parser = httptools.HttpResponseParser(self)
        self._status, self._headers, self._body, self._size, self._got_bytes = 0, [], [], 0, False
        self.transport.write(request)
        return self._answer

    def _until_close(self) -> bool:
        headers = _header_map(self._headers)
        return "content-length" not in headers and "chunked" not in headers.get("transfer-encoding", "")

    def idle(self) -> bool:
        """Ready for another request: open, and its last answer read to the end."""
        return not self.closed and self._answer is not None and self._answer.done() and self._keep_alive

    def time_out(self) -> None:
        """The answer is overdue: the call fails with Http1Timeout and the connection is dropped."""
        self._fail(Http1Timeout(f"no answer from {self.origin.host}:{self.origin.port} in time"))
        self.close()

    def _fail(self, exc: Exception) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Http1Pool:
    """Keep-alive connections per origin, at most `max_connections` per origin open at once.

    The whole call has `timeout` seconds. While an answer is awaited the deadline is kept by the
    connection's entry in `_due`, which one pool timer checks every `_step` seconds while calls are
    in flight (a call may so fail up to `_step` late): no timer or cancel scope per call. The rare
    waits before it (a free connection slot, a new connection) are under a `cutoff` of their own."""

    def __init__(self, max_connections: int, timeout: float, ssl_context: ssl.SSLContext | None = None) -> None:
        self.max_connections = max_connections
        self.timeout = timeout
        self._ssl = ssl_context
        self._idle: dict[Origin, collections.deque[_Connection]] = {}
        self._slots: dict[Origin, Slots] = {}
        self._origins: dict[str, tuple[Origin, bytes]] = {}
        self._closing = False
        #: connections whose answer is awaited -> the loop time it is due by
        self._due: dict[_Connection, float] = {}
        self._step = max(0.01, min(0.1, timeout / 4))
        self._check: asyncio.TimerHandle | None = None

    def target(self, url: str) -> tuple[Origin, bytes] | None:
        """The origin and request target of an http(s) URL; None for what this client leaves to httpx."""
        known = self._origins.get(url)
        if known is not None:
            return known
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
            return None
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return None
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        default = (parts.scheme == "https" and port == 443) or (parts.scheme == "http" and port == 80)
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        host_header = host if default else f"{host}:{port}"
        head = f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\n".encode("latin-1")
        found = (Origin(parts.scheme, parts.hostname, port), head)
        if len(self._origins) < 1024:  # platforms post to a handful of URLs; a per-room URL is not kept
            self._origins[url] = found
        return found

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Answer:
        """POST `body` to `url`; the whole call (connect, send, answer) within the pool's timeout."""
        found = self.target(url)
        if found is None:
            raise ValueError(f"not an http(s) URL this client takes: {url[:80]}")
        origin, head = found
        lines = [head]
        replayable = False
        for name, value in headers.items():
            if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
                raise ValueError(f"header {name!r} holds a line break")
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
            replayable = replayable or name.lower() == "idempotency-key"
        lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
        lines.append(body)
        request = b"".join(lines)
        loop = asyncio.get_running_loop()
        due = loop.time() + self.timeout
        slots = self._slots.get(origin)
        if slots is None:
            slots = self._slots[origin] = Slots(self.max_connections)
        if not slots.take():
            await self._within(due, origin, slots.wait())
        try:
            return await self._exchange(origin, request, due)
        except _Stale:
            if not replayable:
                raise Http1Error("connection closed by the server before answering") from None
            return await self._exchange(origin, request, due, fresh=True)
        finally:
            slots.release()

    async def _within(self, due: float, origin: Origin, waiting: Coroutine[Any, Any, T]) -> T:
        """`waiting`, cut off at the call's deadline (Http1Timeout)."""
        try:
            with cutoff(max(0.0, due - asyncio.get_running_loop().time())):
                return await waiting
        except TimeoutError:
            raise Http1Timeout(f"no answer from {origin.host}:{origin.port} in time") from None

    async def _exchange(self, origin: Origin, request: bytes, due: float, fresh: bool = False) -> Answer:
        conn = None if fresh else self._take(origin)
        if conn is None:
            conn = await self._within(due, origin, self._connect(origin))
        self._due[conn] = due
        if self._check is None:
            self._check = asyncio.get_running_loop().call_later(self._step, self._overdue)
        try:
            answer = await conn.send(request)
        except BaseException:
            conn.close()  # cancelled, failed or overdue mid-answer: the connection's state is unknown
            raise
        finally:
            self._due.pop(conn, None)
        if conn.idle() and not self._closing:
            conn.reused = True
            self._idle.setdefault(origin, collections.deque()).append(conn)
        else:
            conn.close()
        return answer

    def _overdue(self) -> None:
        """The pool's timer: time out the calls past their deadline; again while calls are in flight."""
        self._check = None
        if not self._due:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn, due in list(self._due.items()):
            if due <= now:
                del self._due[conn]
                conn.time_out()
        self._check = loop.call_later(self._step, self._overdue)

    def _take(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have been closed
            if not conn.closed:
                return conn
        return None

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if origin.scheme == "https":
            if self._ssl is None:
                self._ssl = httpx.create_ssl_context()
            tls = self._ssl
        try:
            _, conn = await loop.create_connection(
                lambda: _Connection(origin),
                origin.host,
                origin.port,
                ssl=tls,
                server_hostname=origin.host if tls is not None else None,
            )
        except OSError as exc:  # refused, unreachable, DNS, TLS handshake (ssl.SSLError is an OSError)
            raise Http1Error(f"cannot connect to {origin.host}:{origin.port}: {exc}") from exc
        return conn

    async def aclose(self) -> None:
        self._closing = True
        if self._check is not None:
            self._check.cancel()
            self._check = None
        for idle in self._idle.values():
            while idle:
                idle.pop().close()


class SwitchboardClient(httpx.AsyncClient):
    """httpx's client, with the lean pool (`fast`) for platform POSTs where nothing asks for httpx's
    extras: not when a proxy is configured in the environment (httpx would use it), and not when the
    client was built with another transport (tests give platforms fakes through httpx)."""

    def __init__(self, *, fast: Http1Pool | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fast = None if any(os.environ.get(v) for v in PROXY_VARIABLES) else fast

    async def aclose(self) -> None:
        if self.fast is not None:
            await self.fast.aclose()
        await super().aclose()
