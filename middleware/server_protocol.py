"""uvicorn's httptools protocol, with each answer written to the socket in one piece.

uvicorn writes an answer's status line and headers when the app sends `http.response.start`, and
its body when the app sends `http.response.body`: two writes, so two `send` calls, two TCP segments
and two wake-ups of the client per webhook. On loopback and on a LAN the kernel's work for a segment
(the receiver's side included, on loopback) is most of a small answer's cost. Here the writes made
while one event-loop callback runs are joined and go out when it returns (`loop.call_soon`): an
app that sends start and body in one step (every plain response) costs one write; a streamed answer
still goes out as it is produced. A close, an abort or a pause of writing flushes first.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _JoinedWrites:
    """The transport uvicorn's protocol writes to: writes in one callback leave as one."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(chunk) for chunk in self._pending)

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, pause_reading, abort...
        return getattr(self._transport, name)


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` whose answers leave in one write (see the module's docstring)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_JoinedWrites(transport, asyncio.get_running_loop()))  # type: ignore[arg-type]
