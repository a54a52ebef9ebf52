"""The ingest path alone, for the `ingest` scenario: verify + dedupe + durable persist + 200.

`python -m bench.ingest --port P` (with SWITCHBOARD_BENCH_CONFIG naming a service config) serves the
service's own webhook path: `SwitchboardApp`'s webhook lane, `Ingress`, the configured platform's
`parse`, flood control, and `Store.accept_ids` (group commit; SQLite in WAL with synchronous=FULL,
or PostgreSQL), each acknowledgement sent only once its messages are committed. What it leaves
out is everything behind the ack: the messages stay pending, no turn runs, nothing is delivered
(the `roundtrip` scenario measures that, and its `ack_s` is the webhooks acked by the whole
service). The dispatcher's place is taken by `Taken`, which counts what the ingress hands it and
applies the same backlog limit (503 past `dispatch.max_backlog`).

The process is tuned as `switchboard serve` tunes itself (uvloop, its httptools protocol that writes
each answer in one piece, no access log, the same garbage-collector settings, the GIL's switch
interval following the backlog: middleware/runtime.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator
from typing import cast

import httpx
import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from middleware.app import SwitchboardApp
from middleware.dispatch import Dispatcher
from middleware.flood import SenderLimiter
from middleware.ingress import Ingress
from middleware.metrics import Metrics
from middleware.platforms import PLATFORM_TYPES
from middleware.runtime import SwitchInterval, tune
from middleware.server_protocol import OneWriteHttpToolsProtocol
from middleware.settings import load_settings
from middleware.store import PendingMessage, Store


class Taken:
    """Stands where the dispatcher stands for the ingress: counts the messages handed over."""

    def __init__(self, max_backlog: int) -> None:
        self.max_backlog = max_backlog
        self.backlog = 0
        self.notified = 0
        self.accepting = True
        self.crowded = False
        self.switch_interval = SwitchInterval()

    @property
    def overloaded(self) -> bool:
        return self.backlog >= self.max_backlog

    def notify(self, key: str, *, fresh: bool = True, hint: PendingMessage | None = None) -> None:
        self.notified += 1

    def accepted(self, n: int) -> None:
        self.backlog += n
        self.switch_interval.load(self.backlog)


def build() -> SwitchboardApp:
    settings = load_settings(os.environ["SWITCHBOARD_BENCH_CONFIG"])

    @contextlib.asynccontextmanager
    async def lifespan(app: SwitchboardApp) -> AsyncIterator[None]:
        async with httpx.AsyncClient() as http:
            store = Store(
                settings.store.url,
                batch_max=settings.store.batch_max,
                gather=settings.store.commit_gather_ms / 1000,
            )
            await store.start(migrate=settings.store.migrate)
            platforms = {name: PLATFORM_TYPES[c.type](name, c, http) for name, c in settings.platforms.items()}
            taken = Taken(settings.dispatch.max_backlog)
            app.state.taken = taken
            app.ingress = ingress = Ingress(
                platforms,
                store,
                cast(Dispatcher, taken),
                Metrics(),
                settings.server.max_body_bytes,
                settings.dispatch.retry_after_seconds,
                SenderLimiter(settings.ingress.sender_per_second, settings.ingress.sender_burst),
            )
            try:
                yield
            finally:
                await ingress.close()
                await store.close()

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "taken": request.app.state.taken.notified})

    async def webhook(request: Request) -> Response:  # the lane takes POSTs before routing
        return JSONResponse({"error": "POST only"}, status_code=405)

    routes = [Route("/webhooks/{name}", webhook), Route("/healthz", healthz)]
    app = SwitchboardApp(routes=routes, lifespan=lifespan)
    tune()
    return app


app = build() if "SWITCHBOARD_BENCH_CONFIG" in os.environ else None


def main() -> None:
    """`python -m bench.ingest --port P [--log-level L]`: serve `app` as `switchboard serve` serves
    its own (uvloop, its one-write httptools protocol, no access log)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    assert app is not None, "SWITCHBOARD_BENCH_CONFIG names no config"
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http=OneWriteHttpToolsProtocol,
        access_log=False,
        log_level=args.log_level,
    )


if __name__ == "__main__":
    main()
