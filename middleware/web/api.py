"""The admin JSON API under /api/v1, behind a bearer token, described at /api/v1/openapi.json."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from middleware.agents import queue_summary, submit_agent_event
from middleware.handoff import AGENT_EVENTS
from middleware.model import Owner
from middleware.platforms.base import Rejected
from middleware.services import Services
from middleware.web.body import read_json, refused

Handler = Callable[[Request, Services], Awaitable[Response]]

_UNAUTHORIZED = {"401": {"description": "no or bad bearer token"}}
#: a string parameter: any text but NUL (PostgreSQL stores and compares none)
_TEXT = {"type": "string", "pattern": "^[^\\x00]*$"}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Switchboard admin API", "version": "1"},
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "security": [{"bearer": []}],
    "paths": {
        "/api/v1/connectors": {
            "get": {
                "summary": "Connectors: type, circuit breaker state, calls, errors by kind (total and recent).",
                "responses": {"200": {"description": "connectors"}, **_UNAUTHORIZED},
            }
        },
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
                    {"name": "platform", "in": "query", "schema": _TEXT},
                ],
                "responses": {
                    "200": {"description": "dead letters"},
                    "400": {"description": "bad limit, NUL in a parameter, or an unknown parameter"},
                    **_UNAUTHORIZED,
                },
            }
        },
        "/api/v1/outbox/{id}/redeliver": {
            "post": {
                "summary": "Put a dead letter back in line; it keeps its Idempotency-Key.",
                "parameters": [
                    {
                        "name": "id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                    }
                ],
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
                    {"name": "owner", "in": "query", "schema": {"type": "string", "enum": [o.value for o in Owner]}},
                    {"name": "queue", "in": "query", "schema": _TEXT},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                ],
                "responses": {
                    "200": {"description": "conversations"},
                    "400": {"description": "bad filter, NUL in a parameter, or an unknown parameter"},
                    **_UNAUTHORIZED,
                },
            }
        },
        "/api/v1/conversations/{key}/events": {
            "post": {
                "summary": "An agent-side event: message, assigned, resolved, released, transfer, note. "
                "Give an id to make retries safe.",
                "parameters": [
                    {"name": "key", "in": "path", "required": True, "schema": _TEXT, "example": "myapp:c-1"}
                ],
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
                                    # NUL is refused in every field (PostgreSQL stores none)
                                    "agent": {"type": "string", "maxLength": 200, "pattern": "^[^\\x00]*$"},
                                    "text": {"type": "string", "maxLength": 10000, "pattern": "^[^\\x00]*$"},
                                    "queue": {"type": "string", "maxLength": 128, "pattern": "^[^\\x00]*$"},
                                    "reason": {"type": "string", "maxLength": 500, "pattern": "^[^\\x00]*$"},
                                    "id": {"type": "string", "maxLength": 200, "pattern": "^[^\\x00]*$"},
                                },
                                "additionalProperties": True,
                                # a message or a note says something
                                "if": {"properties": {"event": {"enum": ["message", "note"]}}},
                                "then": {"required": ["text"], "properties": {"text": {"minLength": 1}}},
                            }
                        }
                    },
                },
                "responses": {
                    "202": {"description": "accepted; applied in the conversation's order"},
                    "200": {"description": "a duplicate of an earlier id"},
                    "400": {"description": "bad event: not a JSON object, a missing or mistyped field"},
                    "404": {"description": "unknown conversation"},
                    "413": {"description": "body larger than 64 KiB"},
                    "415": {"description": "Content-Type is not application/json"},
                    **_UNAUTHORIZED,
                },
            }
        },
        "/api/v1/conversations/{key}": {
            "get": {
                "summary": "A conversation (key is platform:conversation_id): state, lease, messages, outbox.",
                "parameters": [
                    {"name": "key", "in": "path", "required": True, "schema": _TEXT, "example": "myapp:c-1"}
                ],
                "responses": {
                    "200": {"description": "the conversation"},
                    "404": {"description": "unknown conversation"},
                    **_UNAUTHORIZED,
                },
            }
        },
    },
}

for _item in OPENAPI["paths"].values():
    for _operation in _item.values():
        _operation["responses"].setdefault("400", {"description": "an unknown query parameter"})


class AdminApi:
    """Routes of the admin API; with no `admin.token` configured every call answers 401."""

    def __init__(self, token: str | None) -> None:
        self.token = token or None

    def routes(self) -> list[Route]:
        return [
            Route("/api/v1/openapi.json", self.openapi, methods=["GET"]),
            Route("/api/v1/status", self.guard(status), methods=["GET"]),
            Route("/api/v1/outbox/dead", self.guard(dead_letters, query=("limit", "platform")), methods=["GET"]),
            Route("/api/v1/outbox/{id:int}/redeliver", self.guard(redeliver), methods=["POST"]),
            Route("/api/v1/queues", self.guard(queues), methods=["GET"]),
            Route("/api/v1/connectors", self.guard(connectors), methods=["GET"]),
            Route(
                "/api/v1/conversations", self.guard(conversations, query=("owner", "queue", "limit")), methods=["GET"]
            ),
            Route("/api/v1/conversations/{key:path}/events", self.guard(conversation_event), methods=["POST"]),
            Route("/api/v1/conversations/{key:path}", self.guard(conversation), methods=["GET"]),
            Route("/api/v1/flows/reload", self.guard(reload_flows), methods=["POST"]),
        ]

    def guard(self, handler: Handler, query: tuple[str, ...] = ()) -> Callable[[Request], Awaitable[Response]]:
        """`handler` behind the bearer token (compared in constant time), taking only the `query` parameters."""

        async def guarded(request: Request) -> Response:
            if self.token is None:
                return JSONResponse({"error": "admin API disabled: set admin.token in the config"}, status_code=401)
            scheme, _, value = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
                return JSONResponse(
                    {"error": "missing or bad bearer token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
                )
            for name, param in request.query_params.multi_items():
                if name not in query:
                    return _bad(f"unknown query parameter {name[:40]!r}", name[:40])
                if "\x00" in param:  # PostgreSQL cannot compare with a NUL
                    return _bad(f"{name} must not contain NUL characters", name)
            if "\x00" in str(request.path_params.get("key", "")):
                return JSONResponse({"error": "no such conversation"}, status_code=404)
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


def _bad(error: str, field: str) -> JSONResponse:
    return JSONResponse({"error": error, "field": field}, status_code=400)


def _limit_ok(raw: str) -> bool:
    # isdigit() alone takes "²" and 5000 digits, which int() refuses
    return raw.isascii() and raw.isdigit() and len(raw) <= 4 and 1 <= int(raw) <= 1000


async def dead_letters(request: Request, s: Services) -> Response:
    raw = request.query_params.get("limit", "100")
    if not _limit_ok(raw):
        return JSONResponse({"error": "limit must be an integer from 1 to 1000", "field": "limit"}, status_code=400)
    rows = await s.store.dead_letters(int(raw), request.query_params.get("platform"))
    return JSONResponse({"dead": rows})


async def redeliver(request: Request, s: Services) -> Response:
    outbox_id = request.path_params["id"]
    if outbox_id > 2**63 - 1:  # past a 64-bit row id: no such row
        return JSONResponse({"error": f"no dead letter with id {outbox_id}"}, status_code=404)
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
    return JSONResponse({"queues": await queue_summary(s)})


async def conversations(request: Request, s: Services) -> Response:
    owner = request.query_params.get("owner")
    valid = [o.value for o in Owner]
    if owner is not None and owner not in valid:
        return JSONResponse({"error": f"owner must be one of {', '.join(valid)}", "field": "owner"}, status_code=400)
    raw = request.query_params.get("limit", "200")
    if not _limit_ok(raw):
        return JSONResponse({"error": "limit must be an integer from 1 to 1000", "field": "limit"}, status_code=400)
    rows = await s.store.conversations(owner, request.query_params.get("queue"), int(raw))
    return JSONResponse({"conversations": rows})


async def conversation_event(request: Request, s: Services) -> Response:
    """An agent-side event: a message to the user, assign, resolve, release, transfer, a note."""
    key = request.path_params["key"]
    try:
        body = await read_json(request)
    except Rejected as exc:
        return refused(exc)
    if not isinstance(body, dict):
        return JSONResponse({"error": "body must be a JSON object"}, status_code=400)
    names = {e.removeprefix("agent."): e for e in AGENT_EVENTS}
    event = body.get("event")
    if not isinstance(event, str) or event not in names:
        return JSONResponse(
            {"error": f"event must be one of {', '.join(sorted(names))}", "field": "event"}, status_code=400
        )
    # the lengths of the store's columns (ownership.actor, conversation.queue, ...): longer would fail there
    for field, longest in (("agent", 200), ("text", 10_000), ("queue", 128), ("reason", 500), ("id", 200)):
        if field not in body:
            continue
        if not isinstance(body[field], str):
            return _bad(f"{field} must be a string", field)
        if len(body[field]) > longest:
            return _bad(f"{field} is longer than {longest} characters", field)
        if "\x00" in body[field]:
            return _bad(f"{field} must not contain NUL characters", field)
    if event in ("message", "note") and not body.get("text"):
        return JSONResponse({"error": f"{event} needs a text", "field": "text"}, status_code=400)
    if not await s.store.conversation_exists(key):
        return JSONResponse({"error": "no such conversation"}, status_code=404)
    new = await submit_agent_event(
        s,
        key,
        names[event],
        body.get("agent") or "admin",
        text=body.get("text"),
        queue=body.get("queue"),
        reason=body.get("reason"),
        event_id=body.get("id") or None,
    )
    return JSONResponse({"accepted": new, "duplicate": not new}, status_code=202 if new else 200)


async def conversation(request: Request, s: Services) -> Response:
    found = await s.store.conversation(request.path_params["key"])
    if found is None:
        return JSONResponse({"error": "no such conversation"}, status_code=404)
    return JSONResponse(found)


async def connectors(request: Request, s: Services) -> Response:
    out = []
    for name, connector in sorted(s.engine.resources.connectors.items()):
        cfg = connector.config
        health = getattr(connector, "health", None)
        out.append(
            {
                "name": name,
                "type": cfg.type,
                "class": f"{type(connector).__module__}.{type(connector).__qualname__}",
                "timeout": cfg.timeout,
                # connectors built on connectors.resilience.HttpConnector report their guard's numbers
                **(health() if callable(health) else {"breaker": None}),
            }
        )
    return JSONResponse({"connectors": out})
