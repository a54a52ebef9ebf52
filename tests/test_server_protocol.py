"""middleware/server_protocol.py: uvicorn's protocol with each answer written in one piece (its
webhook lane is tested in tests/test_webhook_lane.py).

The writes are counted on a recording stand-in for asyncio's transport (the object uvicorn writes
to); the answers themselves are checked end to end against a real uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from middleware.server_protocol import OneWriteHttpToolsProtocol, _JoinedWrites
from tests.conftest import Server


class RecordingTransport:
    """What the joined writes reach: every write, in order, and whether it was closed."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 8000) if name == "sockname" else default


async def test_writes_of_one_callback_leave_as_one() -> None:
    inner = RecordingTransport()
    joined = _JoinedWrites(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    joined.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    joined.write(b"")
    joined.write(b"ok")
    assert inner.writes == []
    assert joined.get_write_buffer_size() == len(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    await asyncio.sleep(0)
    assert inner.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
    joined.write(b"next")
    await asyncio.sleep(0)
    assert inner.writes[-1] == b"next" and len(inner.writes) == 2


async def test_close_flushes_first_and_a_flush_after_close_writes_nothing() -> None:
    inner = RecordingTransport()
    joined = _JoinedWrites(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    joined.write(b"last words")
    joined.close()
    assert inner.writes == [b"last words"] and inner.closed
    assert joined.is_closing()  # delegated
    assert joined.get_extra_info("sockname") == ("127.0.0.1", 8000)
    await asyncio.sleep(0)  # the scheduled flush finds nothing to send
    assert inner.writes == [b"last words"]


async def stream(_: Request) -> StreamingResponse:
    async def parts() -> AsyncIterator[bytes]:
        for n in range(3):
            yield f"part {n}\n".encode()
            await asyncio.sleep(0.01)

    return StreamingResponse(parts(), media_type="text/plain")


async def plain(request: Request) -> Response:
    return JSONResponse({"got": (await request.body()).decode()})


async def big(_: Request) -> Response:
    return Response(b"x" * 3_000_000, media_type="application/octet-stream")


APP = Starlette(routes=[Route("/plain", plain, methods=["POST"]), Route("/stream", stream), Route("/big", big)])


async def test_answers_through_a_real_uvicorn_keep_alive_streaming_big_and_head() -> None:
    async with (
        Server(APP, http=OneWriteHttpToolsProtocol) as server,
        httpx.AsyncClient(base_url=server.url, timeout=5) as client,
    ):
        for n in range(3):  # one keep-alive connection, answer after answer
            answer = await client.post("/plain", content=f"hello {n}")
            assert answer.status_code == 200 and answer.json() == {"got": f"hello {n}"}
        streamed = await client.get("/stream")
        assert streamed.text == "part 0\npart 1\npart 2\n"
        large = await client.get("/big")
        assert len(large.content) == 3_000_000
        head = await client.head("/stream")
        assert head.status_code == 200 and head.content == b""
        closing = await client.post("/plain", content="bye", headers={"Connection": "close"})
        assert closing.json() == {"got": "bye"}
