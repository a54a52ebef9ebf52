"""The lean HTTP/1.1 pool (middleware/http1.py) against real servers on 127.0.0.1.

The servers here are raw asyncio servers that write HTTP/1.1 answers by hand, so that each test
controls exactly what a platform's server might do: keep the connection, close it, chunk the
answer, say 100 Continue first, answer garbage, or never answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from middleware.http1 import Http1Error, Http1Pool, Http1Timeout, SwitchboardClient
from middleware.platforms.base import DeliveryError, post_bytes
from tests.conftest import Server

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "RawServer"], Awaitable[None]]


class RawServer:
    """Counts connections and records each request (head and body) it reads."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.port = 0
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[object]] = set()

    async def read_request(self, reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
        self.requests.append((head, body))
        return head, body

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        self.writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.handler(reader, writer, self)
        finally:
            self.open -= 1
            self.writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def raw_server(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[RawServer]:
    raw = RawServer(handler)
    server = await asyncio.start_server(raw._serve, "127.0.0.1", 0, ssl=tls)
    raw.port = server.sockets[0].getsockname()[1]
    try:
        yield raw
    finally:
        server.close()
        for writer in raw.writers:
            writer.close()
        await asyncio.gather(*raw.tasks, return_exceptions=True)
        await server.wait_closed()


async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: RawServer) -> None:
    while await raw.read_request(reader) is not None:
        writer.write(OK)
        await writer.drain()


async def test_post_sends_the_body_and_headers_and_reuses_the_connection() -> None:
    pool = Http1Pool(max_connections=4, timeout=5)
    async with raw_server(keep_alive) as raw:
        url = f"http://127.0.0.1:{raw.port}/v1/messages?x=1"
        for i in range(3):
            answer = await pool.post(url, b'{"n":%d}' % i, {"content-type": "application/json", "X-Sig": "abc"})
            assert answer.status_code == 200
            assert answer.headers["content-type"] == "application/json"
            assert answer.content == b'{"ok":true}'
            assert answer.text == '{"ok":true}'
        await pool.aclose()
    assert raw.connections == 1
    head, body = raw.requests[2]
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/messages?x=1 HTTP/1.1"
    assert f"Host: 127.0.0.1:{raw.port}" in lines
    assert "content-type: application/json" in lines
    assert "X-Sig: abc" in lines
    assert "Content-Length: 7" in lines
    assert body == b'{"n":2}'


async def test_chunked_answer_and_interim_100_continue() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: RawServer) -> None:
        while await raw.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            writer.write(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\nX-A: 2\r\n\r\n")
            writer.write(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            await writer.drain()

    pool = Http1Pool(max_connections=4, timeout=5)
    async with raw_server(chunked) as raw:
        for _ in range(2):
            answer = await pool.post(f"http://127.0.0.1:{raw.port}/", b"x", {})
            assert (answer.status_code, answer.content) == (201, b"hello world")
            assert answer.headers["x-a"] == "1, 2"
        await pool.aclose()
    assert raw.connections == 1


async def test_connection_close_answer_is_not_reused() -> None:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: RawServer) -> None:
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    pool = Http1Pool(max_connections=4, timeout=5)
    async with raw_server(closing) as raw:
        for _ in range(3):
            assert (await pool.post(f"http://127.0.0.1:{raw.port}/", b"", {})).content == b"ok"
        await pool.aclose()
    assert raw.connections == 3


async def test_answer_without_length_ends_with_the_connection() -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: RawServer) -> None:
        await raw.read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nall of it")
        await writer.drain()

    pool = Http1Pool(max_connections=4, timeout=5)
    async with raw_server(until_close) as raw:
        assert (await pool.post(f"http://127.0.0.1:{raw.port}/", b"", {})).content == b"all of it"
        await pool.aclose()


def _drops_the_second_request() -> Handler:
    """Answers the first request on a connection; closes the connection unanswered when the next comes,
    as a server does whose idle timeout ends the keep-alive just as the client reuses it."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: RawServer) -> None:
        if await raw.read_request(reader) is None:
            return
        writer.write(OK)  # says nothing of closing: the client keeps the connection
        await writer.drain()
        await raw.read_request(reader)

    return handler


async def test_stale_keep_alive_is_replayed_only_with_an_idempotency_key() -> None:
    pool = Http1Pool(max_connections=4, timeout=5)
    async with raw_server(_drops_the_second_request()) as raw:
        url = f"http://127.0.0.1:{raw.port}/"
        await pool.post(url, b"1", {})
        answer = await pool.post(url, b"2", {"Idempotency-Key": "k-2"})
        assert answer.status_code == 200
        assert [body for _, body in raw.requests] == [b"1", b"2", b"2"]  # dropped, then sent again
        assert raw.connections == 2
        with pytest.raises(Http1Error, match="closed"):
            await pool.post(url, b"3", {})
        assert [body for _, body in raw.requests] == [b"1", b"2", b"2", b"3"]  # without a key: not again
        await pool.aclose()


async def test_no_answer_in_time_is_a_timeout_and_the_connection_is_dropped() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: RawServer) -> None:
        await raw.read_request(reader)
        await reader.read()  # until the client gives up and closes

    pool = Http1Pool(max_connections=4, timeout=0.3)
    async with raw_server(silent) as raw:
        with pytest.raises(Http1Timeout):
            await pool.post(f"http://127.0.0.1:{raw.port}/", b"", {})
        for _ in range(50):
            if raw.open == 0:
                break
            await asyncio.sleep(0.02)
        assert raw.open == 0
        await pool.aclose()


async def test_the_timeout_counts_the_wait_for_a_free_connection_and_leaves_nothing_behind() -> None:
    """One connection allowed: the second call waits for it, and its deadline runs meanwhile; the
    pool's deadline timer stops once nothing is in flight."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: RawServer) -> None:
        await raw.read_request(reader)
        await reader.read()

    pool = Http1Pool(max_connections=1, timeout=0.3)
    loop = asyncio.get_running_loop()
    async with raw_server(silent) as raw:
        url = f"http://127.0.0.1:{raw.port}/"
        started = loop.time()
        first, second = await asyncio.gather(pool.post(url, b"1", {}), pool.post(url, b"2", {}), return_exceptions=True)
        took = loop.time() - started
        assert isinstance(first, Http1Timeout) and isinstance(second, Http1Timeout)
        assert 0.3 <= took < 0.3 + 1.0  # both within their own 0.3 s (plus the timer's step), not one after the other
        assert [body for _, body in raw.requests] == [b"1"]  # the second never got a connection
    await asyncio.sleep(0.3)
    assert not pool._due and pool._check is None
    await pool.aclose()


async def test_refused_and_garbage_and_cut_answers_are_errors() -> None:
    pool = Http1Pool(max_connections=4, timeout=5)
    async with raw_server(keep_alive) as raw:
        port = raw.port
    with pytest.raises(Http1Error, match="cannot connect"):
        await pool.post(f"http://127.0.0.1:{port}/", b"", {})

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: RawServer) -> None:
        await raw.read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)

    async with raw_server(garbage) as raw:
        with pytest.raises(Http1Error, match="bad HTTP answer"):
            await pool.post(f"http://127.0.0.1:{raw.port}/", b"", {})

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: RawServer) -> None:
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()

    async with raw_server(cut) as raw:
        with pytest.raises(Http1Error, match="before the answer ended"):
            await pool.post(f"http://127.0.0.1:{raw.port}/", b"", {})
    await pool.aclose()


async def test_an_answer_too_large_is_refused() -> None:
    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: RawServer) -> None:
        await raw.read_request(reader)
        size = 17 * 1024 * 1024
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        with contextlib.suppress(ConnectionError):
            for _ in range(17):
                writer.write(b"x" * 1024 * 1024)
                await writer.drain()

    pool = Http1Pool(max_connections=4, timeout=10)
    async with raw_server(huge) as raw:
        with pytest.raises(Http1Error, match="larger than"):
            await pool.post(f"http://127.0.0.1:{raw.port}/", b"", {})
        await pool.aclose()


async def test_connections_per_origin_are_bounded() -> None:
    release = asyncio.Event()

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: RawServer) -> None:
        while await raw.read_request(reader) is not None:
            await release.wait()
            writer.write(OK)
            await writer.drain()

    pool = Http1Pool(max_connections=2, timeout=5)
    async with raw_server(held) as raw:
        url = f"http://127.0.0.1:{raw.port}/"
        calls = [asyncio.create_task(pool.post(url, b"%d" % i, {})) for i in range(10)]
        await asyncio.sleep(0.2)
        assert raw.open == 2 and len(raw.requests) == 2
        release.set()
        answers = await asyncio.gather(*calls)
        assert [a.status_code for a in answers] == [200] * 10
        assert raw.most_open == 2
        assert sorted(body for _, body in raw.requests) == sorted(b"%d" % i for i in range(10))
        await pool.aclose()


async def test_a_line_break_in_a_header_is_refused_before_sending() -> None:
    pool = Http1Pool(max_connections=2, timeout=5)
    async with raw_server(keep_alive) as raw:
        with pytest.raises(ValueError, match="line break"):
            await pool.post(f"http://127.0.0.1:{raw.port}/", b"", {"X-A": "1\r\nX-Injected: 2"})
        assert raw.requests == []
        await pool.aclose()


def test_what_the_pool_leaves_to_httpx() -> None:
    pool = Http1Pool(max_connections=2, timeout=5)
    assert pool.target("ftp://example.com/x") is None
    assert pool.target("http://user:pw@example.com/x") is None
    assert pool.target("http://example.com:99999/x") is None
    origin, head = pool.target("https://example.com/a b?c=d") or (None, b"")
    assert origin is not None and (origin.scheme, origin.port) == ("https", 443)
    assert head == b"POST /a b?c=d HTTP/1.1\r\nHost: example.com\r\n"
    origin, head = pool.target("http://[::1]:8080") or (None, b"")
    assert head == b"POST / HTTP/1.1\r\nHost: [::1]:8080\r\n"


async def test_client_turns_the_pool_off_under_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    async with SwitchboardClient(fast=Http1Pool(2, 5)) as client:
        assert client.fast is not None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    async with SwitchboardClient(fast=Http1Pool(2, 5)) as client:
        assert client.fast is None


async def test_post_bytes_maps_answers_the_same_on_both_paths() -> None:
    """429 with Retry-After, 503, 400 and 200 mean the same through the lean pool and through httpx."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        status = int(str(scope["path"]).strip("/"))
        headers = [(b"retry-after", b"7")] if status == 429 else []
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"status %d" % status})

    async with Server(app) as server:
        url = server.url
        fast = SwitchboardClient(fast=Http1Pool(4, 5))
        slow = httpx.AsyncClient()
        for client in (fast, slow):
            assert (await post_bytes(client, f"{server.url}/200", b"{}", {})).text == "status 200"
            with pytest.raises(DeliveryError) as exc:
                await post_bytes(client, f"{server.url}/429", b"{}", {})
            assert (exc.value.retryable, exc.value.status, exc.value.retry_after) == (True, 429, 7.0)
            with pytest.raises(DeliveryError) as exc:
                await post_bytes(client, f"{server.url}/503", b"{}", {})
            assert (exc.value.retryable, exc.value.status) == (True, 503)
            with pytest.raises(DeliveryError) as exc:
                await post_bytes(client, f"{server.url}/400", b"{}", {})
            assert (exc.value.retryable, exc.value.status) == (False, 400)
            assert "status 400" in str(exc.value)
            await client.aclose()
    async with SwitchboardClient(fast=Http1Pool(4, 5)) as fast:  # the server is gone
        with pytest.raises(DeliveryError) as exc:
            await post_bytes(fast, f"{url}/200", b"{}", {})
    assert exc.value.retryable and "connection" in str(exc.value)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_https_verifies_the_server(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    async with raw_server(keep_alive, tls=server_tls) as raw:
        url = f"https://localhost:{raw.port}/m"
        trusting = Http1Pool(2, 5, ssl_context=ssl.create_default_context(cafile=str(cert)))
        for _ in range(2):
            assert (await trusting.post(url, b"{}", {})).status_code == 200
        await trusting.aclose()
        assert raw.connections == 1
        default = Http1Pool(2, 5)  # httpx's trust (certifi): a self-signed server is refused
        with pytest.raises(Http1Error, match="cannot connect"):
            await default.post(url, b"{}", {})
        await default.aclose()
