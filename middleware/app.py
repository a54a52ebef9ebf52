"""create_app(settings): the routes and the lifespan that owns the store, HTTP client, scheduler and dispatcher."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from connectors import connector_class
from connectors.rasa_actions import webhook as rasa_action_webhook
from middleware.cluster import join
from middleware.dispatch import Dispatcher
from middleware.engine import Engine, Known, Resources, load_flows
from middleware.flood import SenderLimiter
from middleware.handoff import HandoffMachine
from middleware.helpdesk import HelpdeskWebhook
from middleware.http1 import Http1Pool, SwitchboardClient
from middleware.hub import LocalHub
from middleware.hub_cluster import ClusterHub
from middleware.ingress import Ingress, webhook_name
from middleware.logs import add_secrets, secret_values
from middleware.metrics import Metrics, StoreCollector, observe_connectors
from middleware.notify import Bus, LocalBus, PostgresBus
from middleware.outbox import Outbox
from middleware.platforms import PLATFORM_TYPES
from middleware.reload import FlowReloader
from middleware.scheduler import build_scheduler
from middleware.services import Services
from middleware.settings import Settings
from middleware.store import Store, StoreUnavailable
from middleware.turn import TurnRunner
from middleware.web.api import AdminApi
from middleware.web.ui import attach_ui, ui_routes

log = logging.getLogger("switchboard")


def make_http_client(settings: Settings) -> httpx.AsyncClient:
    """The one HTTP client for platforms and connectors: httpx's API over aiohttp's pool, and a lean
    HTTP/1.1 pool for the platform POSTs every reply makes (middleware/http1.py).

    httpx's own pool spends most of its time in pool bookkeeping under concurrency, and httpx's
    request and response models cost more than the rest of a turn (bench/README.md, "Transport").
    """
    from httpx_aiohttp import AiohttpTransport

    limits = httpx.Limits(
        max_connections=settings.outbox.max_connections, max_keepalive_connections=settings.outbox.max_connections
    )
    transport = AiohttpTransport(limits=limits)
    fast = Http1Pool(settings.outbox.max_connections, settings.outbox.timeout)
    return SwitchboardClient(fast=fast, transport=transport, timeout=httpx.Timeout(settings.outbox.timeout))


def make_bus(store: Store) -> Bus:
    """The notify bus between nodes: LISTEN/NOTIFY on PostgreSQL, in-process on SQLite."""
    if store.dialect == "postgresql":
        return PostgresBus(store.url, store.notify)
    return LocalBus(scope=store.url)


def create_app(settings: Settings, *, http: httpx.AsyncClient | None = None) -> Starlette:
    """Build the ASGI app; nothing is opened until its lifespan starts.

    Raises ConfigError if a flow is invalid: nothing is served with a broken flow.
    """
    # every secret of the config is scrubbed from every log line from here on (middleware/logs.py)
    add_secrets(secret_values(settings.model_dump(mode="json", exclude={"platforms", "connectors"})))
    for part in (*settings.platforms.values(), *settings.connectors.values()):
        add_secrets(secret_values(part.model_dump(mode="json")))
    metrics = Metrics()
    known = Known(connectors=frozenset(settings.connectors), queues=frozenset(settings.handoff.queues))
    flows = load_flows(settings.flows, known)
    resources = Resources(http_allow=settings.http_allow, handoff=HandoffMachine(settings.handoff))
    observe_connectors(metrics, lambda: resources.connectors)
    stores: list[Store] = []
    metrics.registry.register(StoreCollector(lambda: stores[-1] if stores else None))
    engine = Engine(flows, resources)
    reloader = FlowReloader(engine, settings.flows, known)

    @contextlib.asynccontextmanager
    async def lifespan(app: SwitchboardApp) -> AsyncIterator[None]:
        client = http or make_http_client(settings)
        resources.http = client
        resources.connectors = {
            name: connector_class(cfg.type)(name, cfg, client) for name, cfg in settings.connectors.items()
        }
        store = Store(
            settings.store.url, batch_max=settings.store.batch_max, gather=settings.store.commit_gather_ms / 1000
        )
        await store.start(migrate=settings.store.migrate)
        stores[:] = [store]
        platforms = {name: PLATFORM_TYPES[cfg.type](name, cfg, client) for name, cfg in settings.platforms.items()}
        # unique per live process (middleware/cluster.py); a restart under the same id resumes at once
        node = await join(
            store,
            settings.node_id or f"{socket.gethostname()}:{settings.server.port}",
            configured=settings.node_id is not None,
            lease_seconds=settings.dispatch.lease_seconds,
        )
        node_id = node.node_id
        bus = make_bus(store)
        turns = TurnRunner(store, engine, settings, metrics)
        helpdesk = None
        if settings.handoff.webhook_url:
            helpdesk = HelpdeskWebhook(settings.handoff.webhook_url, settings.handoff.webhook_secret, client)
        outbox = Outbox(store, settings.outbox, metrics, helpdesk)
        dispatcher = Dispatcher(
            store, turns, outbox, platforms, settings.dispatch, metrics, node_id, node=node, bus=bus
        )
        services = Services(
            settings, store, client, engine, platforms, metrics, dispatcher, turns, node_id, time.time(), bus=bus
        )
        app.state.services = services
        # live events for the playground and the inbox, to the pages of every node
        hub = attach_ui(app, services, ClusterHub(LocalHub(), bus))
        reloader.attach(bus)  # a reload on one node reloads the others
        await reloader.start()
        await bus.start()  # after every subscription: its first connection listens to them all
        app.state.reloader = reloader
        ingress = Ingress(
            platforms,
            store,
            dispatcher,
            metrics,
            settings.server.max_body_bytes,
            settings.dispatch.retry_after_seconds,
            SenderLimiter(settings.ingress.sender_per_second, settings.ingress.sender_burst),
            settings.dispatch.hold_seconds,
        )
        app.ingress = ingress
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

        async def drain() -> None:
            """Graceful shutdown's first part (SIGTERM, middleware/cli.py; or the lifespan's end):
            503 to webhooks, turns in flight finished or handed to other nodes, leases handed back."""
            await dispatcher.drain(settings.dispatch.shutdown_seconds)

        app.state.drain = drain
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
            await dispatcher.close(settings.dispatch.shutdown_seconds)
            await scheduler.stop()
            await turns.close()
            await ingress.close()
            for platform in platforms.values():
                await platform.aclose()
            hub.close()
            await reloader.close()
            with contextlib.suppress(StoreUnavailable):
                if not dispatcher.superseded:
                    await store.expire_leases(node.owner)
                    await store.node_heartbeat(node.node_id, node.incarnation, state="down")
            await bus.close()
            await store.close()
            for connector in resources.connectors.values():
                await connector.close()
            if http is None:
                await client.aclose()

    async def webhook(request: Request) -> Response:
        ingress = cast(SwitchboardApp, request.app).ingress
        assert ingress is not None  # routes are served only while the lifespan runs
        return await ingress(request)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        s: Services = request.app.state.services
        checks: dict[str, Any] = {
            "flows": sorted(s.engine.flows),
            "accepting": s.dispatcher.accepting,
            "node": s.node_id,
            # signals between nodes (not needed for readiness: the sweep covers for them)
            "bus": "ok" if s.bus is None or s.bus.connected else "reconnecting",
        }
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
        Route("/rasa/webhook", rasa_action_webhook, methods=["POST"]),
        *admin.routes(),
        *ui_routes(settings),  # the playground at /, the agent inbox at /inbox, /static
    ]
    return SwitchboardApp(routes=routes, lifespan=lifespan)


class SwitchboardApp(Starlette):
    """The app; a webhook POST goes straight to the ingress.

    Webhooks are nearly all of the traffic, and Starlette's error and exception middleware, its
    router (a regex per route, tried in order) and its per-route wrapper cost about as much as the
    ingress's own work on a message. A POST to `/webhooks/{name}` skips them; what the ingress
    returns is the same (an unexpected error is its 500 and one log line: `Ingress.answer`).
    Everything else (other methods, sub-paths, every other route) takes the normal way.
    `switchboard serve`'s own protocol goes further and skips ASGI for those POSTs
    (middleware/server_protocol.py); this lane serves them under any other ASGI server.
    """

    #: the webhook ingress, once the lifespan has started it (an attribute, not in `state`:
    #: Starlette's State answers through `__getattr__`, CPython's slow lookup, on every webhook)
    ingress: Ingress | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            name = webhook_name(scope["path"])
            ingress = self.ingress
            if ingress is not None and name is not None:
                scope["app"] = self
                scope["path_params"] = {"name": name}
                response = await ingress(Request(scope, receive))
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)
