"""The browser pages (playground at `/`, agent inbox at `/inbox`): templates, static files, live events.

`ui_routes(settings)` gives the routes for `create_app`; `attach_ui(app, services)` (called by the
lifespan once the services run) makes the live-event hub, points the playground platforms at it
and feeds it from `TurnRunner.observers`.

Pages are Jinja2 templates with autoescaping on (the flow engine's templates are another, text-only
environment), plain JavaScript under `static/`, no build step, nothing from another origin: every
page is sent with a Content-Security-Policy that allows only this origin's scripts and styles.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import signal
import threading
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from middleware.hub import INBOX_TOPIC, Hub, LocalHub, conversation_topic, playground_topic
from middleware.model import HUMAN_OWNERS, Inbound, TurnResult
from middleware.platforms.playground import PlaygroundPlatform
from middleware.services import Services
from middleware.settings import Settings

log = logging.getLogger("switchboard.web")

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _clock(ts: float | None) -> str:
    """HH:MM in UTC (the page shows the agent's local time once its script runs)."""
    if not ts:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%H:%M")


def _iso(ts: float | None) -> str:
    if not ts:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def duration(seconds: float | None) -> str:
    """A wait as a person reads it: 45s, 3m 05s, 2h 10m."""
    if seconds is None or seconds < 0:
        return "0s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def safe_url(url: Any) -> str:
    """A URL fit for an href: http(s) or a path on this site; anything else (javascript:, data:) is '#'."""
    text = str(url or "")
    parts = urlsplit(text)
    if parts.scheme in ("http", "https") and parts.netloc:
        return text
    if not parts.scheme and not parts.netloc and text.startswith("/") and not text.startswith("//"):
        return text
    return "#"


def _pretty(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=2, sort_keys=True, default=str)


def make_templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,  # everything a user, an agent or a flow wrote is escaped
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(clock=_clock, iso=_iso, duration=duration, safe_url=safe_url, pretty=_pretty)
    return Jinja2Templates(env=env)


TEMPLATE_SET = make_templates()


def page(request: Request, name: str, context: Mapping[str, Any], status_code: int = 200) -> Response:
    """Render a template as an HTML page with the security headers."""
    return TEMPLATE_SET.TemplateResponse(
        request, name, dict(context), status_code=status_code, headers=SECURITY_HEADERS
    )


def ui_routes(settings: Settings) -> list[BaseRoute]:
    from middleware.web.inbox import InboxPages
    from middleware.web.playground import PlaygroundPages

    return [
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        *PlaygroundPages().routes(),
        *InboxPages(settings.inbox).routes(),
    ]


def attach_ui(app: Starlette, services: Services, hub: Hub | None = None) -> Hub:
    """Start live events for this app: the hub, the playground platforms' deliveries, turn observers.

    `hub`: a hub to use instead of a new LocalHub (the lifespan passes a ClusterHub, whose events
    reach the pages of every node: middleware/hub_cluster.py)."""
    hub = hub if hub is not None else LocalHub()
    app.state.hub = hub
    playgrounds = {name for name, p in services.platforms.items() if isinstance(p, PlaygroundPlatform)}
    for name in playgrounds:
        platform = services.platforms[name]
        assert isinstance(platform, PlaygroundPlatform)
        platform.hub = hub
    services.turns.observers.append(turn_observer(hub, playgrounds))
    _end_streams_on_exit_signal(hub)
    return hub


def turn_observer(hub: Hub, playgrounds: set[str]) -> Callable[[Inbound, TurnResult, float], None]:
    """Publish each stored turn: to the conversation's topic, to the inbox when a human is or was
    involved, and its trace to the playground page when the conversation is a playground's."""
    from middleware.web.playground import trace_event

    def observe(message: Inbound, result: TurnResult, seconds: float) -> None:
        key = message.conversation_key
        state = result.state
        handoff = state.handoff or {}
        change = {
            "kind": "turn",
            "conversation": key,
            "owner": state.owner._value_,  # = .value, without Enum's Python-level property (every turn)
            "queue": handoff.get("queue"),
            "agent": handoff.get("agent"),
            "event": message.payload.get("event") if message.type == "event" else None,
            "changed": bool(result.transitions),
        }
        hub.publish(conversation_topic(key), change)
        if result.transitions or state.owner in HUMAN_OWNERS:
            hub.publish(INBOX_TOPIC, change)
        if message.platform in playgrounds:
            hub.publish(playground_topic(key), trace_event(message, result, seconds))

    return observe


_LIVE_HUBS: weakref.WeakSet[Any] = weakref.WeakSet()


def _end_streams_on_exit_signal(hub: Hub) -> None:
    """On Ctrl-C or SIGTERM, end the live-event streams at once, so the server's graceful shutdown
    does not wait for browsers to hang up; then the handler that was there (uvicorn's) runs as before."""
    _LIVE_HUBS.add(hub)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)
        if not callable(previous) or getattr(previous, "ends_live_streams", False):
            continue

        def handler(signum: int, frame: FrameType | None, previous: Callable[..., Any] = previous) -> None:
            for live in list(_LIVE_HUBS):
                live.close()
            previous(signum, frame)

        handler.ends_live_streams = True  # type: ignore[attr-defined]
        signal.signal(sig, handler)
