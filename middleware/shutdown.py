"""Graceful shutdown of `switchboard serve`: drain first, then let uvicorn stop.

uvicorn alone closes the listening socket at the first SIGTERM: a load balancer still sending here
gets refused connections, and turns in flight are cut when the lifespan ends. `GracefulServer`
runs the app's `state.drain()` first, with the port still open:

1. webhooks get 503 with Retry-After and `/readyz` 503 (the load balancer takes the node out);
2. turns in flight finish and their outbox is flushed; conversations with work left, and leases
   kept for a delivery's retry, are handed back and the other nodes told (`free`) to take them now;
3. turns still running at the bound (`dispatch.shutdown_seconds`) are cancelled: nothing of them
   was stored, so the node that takes the conversation redoes them;

then uvicorn's own shutdown: the socket closes, open connections get a few seconds
(`CONNECTIONS_SECONDS`), the lifespan ends (scheduler, store). A second signal skips the wait for
the drain's end (the lifespan still bounds it); uvicorn re-raises the signal at the end, so the exit
status is that of the signal (-15 for SIGTERM), as without the drain.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn
from starlette.applications import Starlette

log = logging.getLogger("switchboard.shutdown")

#: how long uvicorn waits for open connections after the drain, seconds
CONNECTIONS_SECONDS = 3


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self.app = app
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        drain: Callable[[], Awaitable[None]] | None = getattr(self.app.state, "drain", None)
        if self.draining or drain is None or self._loop is None or not self.started:
            super().handle_exit(sig, frame)
            return
        self.draining = True
        log.info("%s: draining before shutdown", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start, drain, sig)

    def _start(self, drain: Callable[[], Awaitable[None]], sig: int) -> None:
        self._task = asyncio.get_running_loop().create_task(self._drain_then_exit(drain, sig))

    async def _drain_then_exit(self, drain: Callable[[], Awaitable[None]], sig: int) -> None:
        try:
            await drain()
        except Exception:
            log.exception("drain failed; shutting down anyway")
        finally:
            super().handle_exit(sig, None)


__all__ = ["CONNECTIONS_SECONDS", "GracefulServer"]
