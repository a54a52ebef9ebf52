"""The admin JSON API under /api/v1, behind a bearer token, described at /api/v1/openapi.json."""

from __future__ import annotations

import hmac
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from middleware.handoff import AGENT_EVENTS
from middleware.model import Inbound, Owner, Sender
from middleware.services import Services

Handler = Callable[[Request, Services], Awaitable[Response]]

_UNAUTHORIZED = {"401": {"description": "no or bad bearer token"}}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Switchboard admin API", "version": "1"},
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "security": [{"bearer": []}],
    "paths": {
        "/api/v1/status": {
            "get": {
                "summary": "Node identity, backlog, outbox counts, flows and platforms.",
                "responses": {"200": {"description": "status"}, **_UNAUTHORIZED},
            }
        },
        "/api/v1/outbox/dead": {
            "get": {
                "summary": "Dead letters: outbox rows a platform refused or that ran out of retries, newest first.",
                "parameters": [
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                    {"name": "platform", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {"description": "dead letters"},
                    "400": {"description": "bad limit"},
                    **_UNAUTHORIZED,
                },
            }
        },
        "/api/v1/outbox/{id}/redeliver": {
            "post": {
                "summary": "Put a dead letter back in line; it keeps its Idempotency-Key.",
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}],
                "responses": {
                    "200": {"description": "requeued"},
                    "404": {"description": "no such dead letter"},
                    **_UNAUTHORIZED,
                },
            }
        },
        "/api/v1/flows/reload": {
            "post": {
                "summary": "Load the flows again; a broken set is refused and the running flows stay.",
                "responses": {
                    "200": {"description": "reloaded"},
                    "422": {"description": "problems, as file:line:col: message"},
                    **_UNAUTHORIZED,
                },
            }
        },
        "/api/v1/queues": {
            "get": {
                "summary": "Handoff queues: conversations waiting and with agents, the longest wait, capacity.",
                "responses": {"200": {"description": "queues"}, **_UNAUTHORIZED},
            }
        },
        "/api/v1/conversations": {
            "get": {
                "summary": "Conversations by owner (bot, queued, agent, resolved) and queue, longest waiting first.",
                "parameters": [
                    {"name": "owner", "in": "query", "schema": {"type": "string"}},
                    {"name": "queue", "in": "query", "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                ],
                "responses": {
                    "200": {"description": "conversations"},
                    "400": {"description": "bad filter"},
                    **_UNAUTHORIZED,
                },
            }
        },
        "/api/v1/conversations/{key}/events": {
            "post": {
                "summary": "An agent-side event: message, assigned, resolved, released, transfer, note. "
                "Give an id to make retries safe.",
                "parameters": [{"name": "key", "in": "path", "required": True, "schema": {"type": "string"}}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["event"],
                                "properties": {
                                    "event": {
                                        "type": "string",
                                        "enum": ["message", "assigned", "resolved", "released", "transfer", "note"],
                                    },
                                    "agent": {"type": "string"},
                                    "text": {"type": "string", "maxLength": 10000},
                                    "queue": {"type": "string"},
                                    "reason": {"type": "string"},
                                    "id": {"type": "string"},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "202": {"description": "accepted; applied in the conversation's order"},
                    "200": {"description": "a duplicate of an earlier id"},
                    "400": {"description": "bad event"},
                    "404": {"description": "unknown conversation"},
                    **_UNAUTHORIZED,
                },
            }
        },
        "/api/v1/conversations/{key}": {
            "get": {
                "summary": "A conversation (key is platform:conversation_id): state, lease, messages, outbox.",
                "parameters": [{"name": "key", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "the conversation"},
                    "404": {"description": "unknown conversation"},
                    **_UNAUTHORIZED,
                },
            }
        },
    },
}


class AdminApi:
    """Routes of the admin API; with no `admin.token` configured every call answers 401."""

    def __init__(self, token: str | None) -> None:
        self.token = token or None

    def routes(self) -> list[Route]:
        return [
            Route("/api/v1/openapi.json", self.openapi, methods=["GET"]),
            Route("/api/v1/status", self.guard(status), methods=["GET"]),
            Route("/api/v1/outbox/dead", self.guard(dead_letters), methods=["GET"]),
            Route("/api/v1/outbox/{id:int}/redeliver", self.guard(redeliver), methods=["POST"]),
            Route("/api/v1/queues", self.guard(queues), methods=["GET"]),
            Route("/api/v1/conversations", self.guard(conversations), methods=["GET"]),
            Route("/api/v1/conversations/{key:path}/events", self.guard(conversation_event), methods=["POST"]),
            Route("/api/v1/conversations/{key:path}", self.guard(conversation), methods=["GET"]),
            Route("/api/v1/flows/reload", self.guard(reload_flows), methods=["POST"]),
        ]

    def guard(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            if self.token is None:
                return JSONResponse({"error": "admin API disabled: set admin.token in the config"}, status_code=401)
            scheme, _, value = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
                return JSONResponse(
                    {"error": "missing or bad bearer token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
                )
            return await handler(request, request.app.state.services)

        return guarded

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(OPENAPI)


async def status(request: Request, s: Services) -> Response:
    return JSONResponse(
        {
            "node": s.node_id,
            "uptime_seconds": round(time.time() - s.started_at, 1),
            "backlog": s.dispatcher.backlog,
            "outbox": await s.store.outbox_counts(),
            "flows": sorted(s.engine.flows),
            "platforms": sorted(s.platforms),
        }
    )


async def dead_letters(request: Request, s: Services) -> Response:
    raw = request.query_params.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        return JSONResponse({"error": "limit must be an integer from 1 to 1000", "field": "limit"}, status_code=400)
    rows = await s.store.dead_letters(int(raw), request.query_params.get("platform"))
    return JSONResponse({"dead": rows})


async def redeliver(request: Request, s: Services) -> Response:
    outbox_id = request.path_params["id"]
    key = await s.store.redeliver(outbox_id)
    if key is None:
        return JSONResponse({"error": f"no dead letter with id {outbox_id}"}, status_code=404)
    s.dispatcher.notify(key)
    return JSONResponse({"requeued": outbox_id})


async def reload_flows(request: Request, s: Services) -> Response:
    problems = await request.app.state.reloader.reload()
    if problems:
        return JSONResponse(
            {"reloaded": False, "problems": [str(p) for p in problems], "flows": sorted(s.engine.flows)},
            status_code=422,
        )
    return JSONResponse({"reloaded": True, "flows": sorted(s.engine.flows)})


async def queues(request: Request, s: Services) -> Response:
    counts = {row["queue"]: row for row in await s.store.queue_counts()}
    now = time.time()
    out = []
    for name, queue in s.settings.handoff.queues.items():
        row = counts.pop(name, {"queue": name, "waiting": 0, "with_agent": 0})
        since = row.pop("oldest_waiting_since", None)
        row["longest_wait_seconds"] = round(now - since, 1) if since else 0.0
        row.update({"capacity": queue.capacity, "priority": queue.priority, "skills": list(queue.skills)})
        out.append(row)
    for row in counts.values():  # conversations in queues no longer in the config
        since = row.pop("oldest_waiting_since", None)
        row["longest_wait_seconds"] = round(now - since, 1) if since else 0.0
        out.append(row)
    return JSONResponse({"queues": out})


async def conversations(request: Request, s: Services) -> Response:
    owner = request.query_params.get("owner")
    valid = [o.value for o in Owner]
    if owner is not None and owner not in valid:
        return JSONResponse({"error": f"owner must be one of {', '.join(valid)}", "field": "owner"}, status_code=400)
    raw = request.query_params.get("limit", "200")
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        return JSONResponse({"error": "limit must be an integer from 1 to 1000", "field": "limit"}, status_code=400)
    rows = await s.store.conversations(owner, request.query_params.get("queue"), int(raw))
    return JSONResponse({"conversations": rows})


async def conversation_event(request: Request, s: Services) -> Response:
    """An agent-side event: a message to the user, assign, resolve, release, transfer, a note."""
    key = request.path_params["key"]
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return JSONResponse({"error": "body must be JSON"}, status_code=400)
    if not isinstance(body, dict):
        return JSONResponse({"error": "body must be a JSON object"}, status_code=400)
    names = {e.removeprefix("agent."): e for e in AGENT_EVENTS}
    event = body.get("event")
    if event not in names:
        return JSONResponse(
            {"error": f"event must be one of {', '.join(sorted(names))}", "field": "event"}, status_code=400
        )
    for field in ("agent", "text", "queue", "reason", "id"):
        if field in body and not isinstance(body[field], str):
            return JSONResponse({"error": f"{field} must be a string", "field": field}, status_code=400)
    if event in ("message", "note") and not body.get("text"):
        return JSONResponse({"error": f"{event} needs a text", "field": "text"}, status_code=400)
    if len(body.get("text", "")) > 10_000:
        return JSONResponse({"error": "text is longer than 10000 characters", "field": "text"}, status_code=400)
    if not await s.store.conversation_exists(key):
        return JSONResponse({"error": "no such conversation"}, status_code=404)
    platform, _, conversation_id = key.partition(":")
    agent = body.get("agent") or "admin"
    payload = {k: body[k] for k in ("text", "queue", "reason") if k in body}
    message = Inbound(
        platform=platform,
        message_id=f"agent:{body.get('id') or uuid.uuid4().hex}",
        conversation_id=conversation_id,
        sender=Sender(agent, agent, {"role": "agent"}),
        type="event",
        payload={"event": names[event], "agent": agent, **payload},
    )
    (new,) = await s.store.accept([message])
    if new:
        s.dispatcher.notify(key)
    return JSONResponse({"accepted": new, "duplicate": not new}, status_code=202 if new else 200)


async def conversation(request: Request, s: Services) -> Response:
    found = await s.store.conversation(request.path_params["key"])
    if found is None:
        return JSONResponse({"error": "no such conversation"}, status_code=404)
    return JSONResponse(found)
