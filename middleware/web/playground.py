"""The playground at `/`: chat with any loaded flow in the browser, with each turn's trace and the
flow's graph beside it.

The page talks through a platform of `type: playground` (middleware/platforms/playground.py):

1. `POST /playground/conversations {"flow": NAME}` starts a conversation with that flow (the
   store gets its starting state, so the flow is chosen whatever the flows' `match` say);
2. the page opens `GET /playground/events/{platform}/{conversation}` (server-sent events) and waits
   for `ready`;
3. what the user types is POSTed to `/webhooks/{platform}` as the generic protocol's JSON, and
   travels like any webhook: ingress, store, dispatcher, turn, outbox;
4. the platform's deliveries (`reply`, `typing`, `read`) and each turn's `trace` (as
   `switchboard chat` prints it: route, actions, variables, owner, latency) come back as events.

The graph is SVG drawn by Graphviz's `dot` when it is installed (apt-get install graphviz),
otherwise the flow's Mermaid text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from middleware.engine import Flow
from middleware.engine.graph import dot, mermaid
from middleware.hub import playground_topic
from middleware.model import ConversationState, Inbound, TurnResult, conversation_key
from middleware.platforms.base import Rejected
from middleware.platforms.playground import PlaygroundPlatform
from middleware.services import Services
from middleware.web.body import read_json, refused
from middleware.web.sse import event_stream
from middleware.web.ui import page

log = logging.getLogger("switchboard.playground")

CONVERSATION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: "route at /long/path/flows/x.yaml:12" is shown as "route at x.yaml:12"
_ROUTE_FILE = re.compile(r"(route at )\S*/([^/\s]+:\d+)")
SVG_NS = "http://www.w3.org/2000/svg"
XLINK_NS = "http://www.w3.org/1999/xlink"
ET.register_namespace("", SVG_NS)
ET.register_namespace("xlink", XLINK_NS)
#: elements an SVG from `dot` never needs and that could run or load something
_DROP = {"script", "foreignObject", "iframe", "object", "embed", "image", "use", "style"}


def node_id(state: str) -> str:
    """The id `middleware.engine.graph` gives a state (the `<title>` of its node in dot's SVG)."""
    return "n_" + re.sub(r"[^A-Za-z0-9_]", "_", state)


def trace_event(message: Inbound, result: TurnResult, seconds: float) -> dict[str, Any]:
    """One turn as the playground shows it: what `switchboard chat` prints after each turn."""
    state = result.state
    shown = {k: v for k, v in state.vars.items() if k != "user"}
    return {
        "kind": "trace",
        "message": {
            "id": message.message_id,
            "type": message.type,
            "text": message.text,
            "event": message.payload.get("event") if message.type == "event" else None,
            "by": message.sender.name or message.sender.id,
        },
        "lines": [_ROUTE_FILE.sub(r"\1\2", line) for line in result.trace],
        "flow": state.flow,
        "state": state.state,
        "node": node_id(state.state) if state.state else None,
        "owner": state.owner.value,
        "queue": (state.handoff or {}).get("queue"),
        "vars": json.loads(json.dumps(shown, default=str)),
        "actions": [str(a) for a in result.actions],
        "replies": len(result.replies),
        "ms": round(seconds * 1000, 1),
    }


@dataclass(frozen=True, slots=True)
class Graph:
    svg: Markup | None
    mermaid: str
    why_text: str = ""


class GraphCache:
    """Each flow's drawing, made once per loaded flow object (a reload makes new objects)."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[Flow, Graph]] = {}
        self._dot: str | bool | None = False

    def dot_program(self) -> str | None:
        if self._dot is False:
            self._dot = shutil.which("dot")
        return self._dot if isinstance(self._dot, str) else None

    async def graph(self, flow: Flow) -> Graph:
        cached = self._cache.get(flow.name)
        if cached is not None and cached[0] is flow:
            return cached[1]
        text = mermaid(flow)
        program = self.dot_program()
        if program is None:
            made = Graph(None, text, "Graphviz is not installed (apt-get install graphviz): the flow as Mermaid text.")
        else:
            svg = await render_svg(program, dot(flow))
            made = Graph(svg, text) if svg is not None else Graph(None, text, "Graphviz could not draw this flow.")
        self._cache[flow.name] = (flow, made)
        return made


async def render_svg(program: str, source: str, limit: float = 10.0) -> Markup | None:
    """Run `dot -Tsvg` in a worker thread (the event loop never waits on it) and sanitise its SVG."""

    def run() -> subprocess.CompletedProcess[bytes] | None:
        try:
            return subprocess.run([program, "-Tsvg"], input=source.encode(), capture_output=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return None

    done = await asyncio.to_thread(run)
    if done is None:
        log.warning("dot took longer than %ss; showing Mermaid text", limit)
        return None
    if done.returncode != 0:
        log.warning("dot failed: %s", done.stderr.decode(errors="replace")[:300])
        return None
    return sanitize_svg(done.stdout.decode())


def sanitize_svg(svg: str) -> Markup | None:
    """dot's SVG, fit to put inline in a page: no scripts, styles, links, event handlers or
    external references."""
    try:
        root = ET.fromstring(svg)
    except ET.ParseError:
        return None
    if root.tag != f"{{{SVG_NS}}}svg":
        return None
    for parent in list(root.iter()):
        for child in list(parent):
            local = child.tag.rsplit("}", 1)[-1] if isinstance(child.tag, str) else ""
            if local in _DROP or not isinstance(child.tag, str):
                parent.remove(child)
            elif local == "a":  # keep what a link holds, not the link
                index = list(parent).index(child)
                parent.remove(child)
                for n, grandchild in enumerate(list(child)):
                    parent.insert(index + n, grandchild)
    for element in root.iter():
        for name in list(element.attrib):
            local = name.rsplit("}", 1)[-1].lower()
            value = element.attrib[name].strip().lower()
            active = local.startswith("on") or local in ("href", "style")
            outside = value.startswith(("javascript:", "data:")) or ("url(" in value and not value.startswith("url(#"))
            if active or outside:
                del element.attrib[name]
    root.set("class", "flow-graph")
    root.set("role", "img")
    return Markup(ET.tostring(root, encoding="unicode"))


def _serves(flow: Flow, platform: str) -> bool:
    return not flow.match.platforms or platform in flow.match.platforms


class PlaygroundPages:
    def __init__(self) -> None:
        self.graphs = GraphCache()

    def routes(self) -> list[Route]:
        return [
            Route("/", self.index, methods=["GET"]),
            Route("/playground/conversations", self.start, methods=["POST"]),
            Route("/playground/events/{platform}/{conversation}", self.events, methods=["GET"]),
            Route("/playground/graph/{flow}", self.graph, methods=["GET"]),
        ]

    @staticmethod
    def _playgrounds(s: Services) -> list[str]:
        return [name for name, p in s.platforms.items() if isinstance(p, PlaygroundPlatform)]

    async def index(self, request: Request) -> Response:
        s: Services = request.app.state.services
        platforms = self._playgrounds(s)
        flows = sorted(s.engine.flows)
        chosen = request.query_params.get("flow")
        if chosen not in s.engine.flows:
            served = [n for n in flows if platforms and _serves(s.engine.flows[n], platforms[0])]
            chosen = "demo" if "demo" in flows else next(iter(served or flows), None)
        graph = await self.graphs.graph(s.engine.flows[chosen]) if chosen else None
        context = {
            "platform": platforms[0] if platforms else None,
            "flows": flows,
            "flow": chosen,
            "graph": graph,
            "start": s.engine.flows[chosen].start if chosen else None,
        }
        return page(request, "playground.html", context, status_code=200 if platforms else 404)

    async def start(self, request: Request) -> Response:
        s: Services = request.app.state.services
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return JSONResponse({"error": "send JSON (Content-Type: application/json)"}, status_code=415)
        try:
            body = await read_json(request)  # bounded in size and depth, as a webhook's
        except Rejected as exc:
            return refused(exc)
        if not isinstance(body, dict):
            return JSONResponse({"error": "body must be a JSON object"}, status_code=400)
        platforms = self._playgrounds(s)
        platform = body.get("platform") or (platforms[0] if platforms else None)
        if platform not in platforms:
            return JSONResponse(
                {"error": "no playground platform by that name in the config", "field": "platform"}, status_code=404
            )
        flow = body.get("flow")
        if not isinstance(flow, str) or flow not in s.engine.flows:
            return JSONResponse(
                {"error": f"flow must be one of {', '.join(sorted(s.engine.flows))}", "field": "flow"},
                status_code=400,
            )
        conversation = f"pg-{secrets.token_hex(8)}"
        key = conversation_key(platform, conversation)
        await s.store.seed_conversation(key, platform, conversation, ConversationState(flow=flow))
        return JSONResponse(
            {
                "platform": platform,
                "conversation_id": conversation,
                "conversation": key,
                "flow": flow,
                "webhook": f"/webhooks/{platform}",
                "events": f"/playground/events/{platform}/{conversation}",
            },
            status_code=201,
        )

    async def events(self, request: Request) -> Response:
        s: Services = request.app.state.services
        platform = request.path_params["platform"]
        conversation = request.path_params["conversation"]
        if platform not in self._playgrounds(s) or not CONVERSATION_ID.match(conversation):
            return JSONResponse({"error": "no such playground conversation"}, status_code=404)
        topic = playground_topic(conversation_key(platform, conversation))
        return event_stream(request, request.app.state.hub, [topic])

    async def graph(self, request: Request) -> Response:
        s: Services = request.app.state.services
        flow = s.engine.flows.get(request.path_params["flow"])
        if flow is None:
            return JSONResponse({"error": "no such flow"}, status_code=404)
        graph = await self.graphs.graph(flow)
        return page(request, "_graph.html", {"graph": graph, "flow": flow.name})
