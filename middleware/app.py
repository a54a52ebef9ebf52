"""create_app(settings): the routes and the lifespan that owns the store, HTTP client, scheduler and dispatcher."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from connectors import connector_class
from middleware.dispatch import Dispatcher
from middleware.engine import Engine, Known, Resources, load_flows
from middleware.handoff import HandoffMachine
from middleware.helpdesk import HelpdeskWebhook
from middleware.ingress import Ingress
from middleware.metrics import Metrics
from middleware.outbox import Outbox
from middleware.platforms import PLATFORM_TYPES
from middleware.reload import FlowReloader
from middleware.scheduler import build_scheduler
from middleware.services import Services
from middleware.settings import Settings
from middleware.store import Store, StoreUnavailable
from middleware.turn import TurnRunner
from middleware.web.api import AdminApi

log = logging.getLogger("switchboard")


def make_http_client(settings: Settings) -> httpx.AsyncClient:
    """The one HTTP client for platforms and connectors: httpx's API over aiohttp's pool.

    httpx's own pool spends most of its time in pool bookkeeping under concurrency
    (bench/README.md, "Transport"); aiohttp's connector does not.
    """
    from httpx_aiohttp import AiohttpTransport

    limits = httpx.Limits(
        max_connections=settings.outbox.max_connections, max_keepalive_connections=settings.outbox.max_connections
    )
    transport = AiohttpTransport(limits=limits)
    return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(settings.outbox.timeout))


def create_app(settings: Settings, *, http: httpx.AsyncClient | None = None) -> Starlette:
    """Build the ASGI app; nothing is opened until its lifespan starts.

    Raises ConfigError if a flow is invalid: nothing is served with a broken flow.
    """
    metrics = Metrics()
    known = Known(connectors=frozenset(settings.connectors), queues=frozenset(settings.handoff.queues))
    flows = load_flows(settings.flows, known)
    resources = Resources(http_allow=settings.http_allow, handoff=HandoffMachine(settings.handoff))
    engine = Engine(flows, resources)
    reloader = FlowReloader(engine, settings.flows, known)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = http or make_http_client(settings)
        resources.http = client
        resources.connectors = {
            name: connector_class(cfg.type)(name, cfg, client) for name, cfg in settings.connectors.items()
        }
        store = Store(settings.store.url, batch_max=settings.store.batch_max)
        await store.start()
        platforms = {name: PLATFORM_TYPES[cfg.type](name, cfg, client) for name, cfg in settings.platforms.items()}
        node_id = settings.node_id or f"{socket.gethostname()}:{settings.server.port}"
        turns = TurnRunner(store, engine, settings, metrics)
        helpdesk = None
        if settings.handoff.webhook_url:
            helpdesk = HelpdeskWebhook(settings.handoff.webhook_url, settings.handoff.webhook_secret, client)
        outbox = Outbox(store, settings.outbox, metrics, helpdesk)
        dispatcher = Dispatcher(store, turns, outbox, platforms, settings.dispatch, metrics, node_id)
        services = Services(
            settings, store, client, engine, platforms, metrics, dispatcher, turns, node_id, time.time()
        )
        app.state.services = services
        app.state.reloader = reloader
        ingress = Ingress(
            platforms, store, dispatcher, metrics, settings.server.max_body_bytes, settings.dispatch.retry_after_seconds
        )
        app.state.ingress = ingress
        await dispatcher.resync_backlog()
        await dispatcher.resume()
        scheduler = build_scheduler(
            store,
            dispatcher,
            settings.dispatch.sweep_seconds,
            settings.dispatch.lease_seconds,
            settings.store.dedupe_days,
        )
        scheduler.start()
        watcher = asyncio.create_task(reloader.watch()) if settings.reload else None
        log.info(
            "switchboard ready", extra={"node": node_id, "flows": sorted(engine.flows), "platforms": sorted(platforms)}
        )
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            scheduler.shutdown(wait=False)
            await dispatcher.close()
            await turns.close()
            for platform in platforms.values():
                await platform.aclose()
            await store.close()
            for connector in resources.connectors.values():
                await connector.close()
            if http is None:
                await client.aclose()

    async def webhook(request: Request) -> Response:
        ingress: Ingress = request.app.state.ingress
        return await ingress(request)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        s: Services = request.app.state.services
        checks: dict[str, Any] = {"flows": sorted(s.engine.flows), "accepting": s.dispatcher.accepting}
        try:
            await s.store.ping()
            checks["store"] = "ok"
        except StoreUnavailable as exc:
            checks["store"] = f"unavailable: {exc}"
        ready = checks["store"] == "ok" and bool(s.engine.flows) and s.dispatcher.accepting
        return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)

    async def metrics_endpoint(request: Request) -> Response:
        s: Services = request.app.state.services
        with contextlib.suppress(StoreUnavailable):
            for state, n in (await s.store.outbox_counts()).items():
                metrics.outbox.labels(state).set(n)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    admin = AdminApi(settings.admin.token)
    routes = [
        Route("/webhooks/{name}", webhook, methods=["GET", "POST"]),
        # sub-paths and other methods, for platforms that need them (verification GETs, Matrix PUTs)
        Route("/webhooks/{name}/{rest:path}", webhook, methods=["GET", "POST", "PUT"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *admin.routes(),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
