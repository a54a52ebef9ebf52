"""The ceiling: a bare Starlette webhook endpoint that reads the body, parses JSON and acks.

Run by the `bare` scenario as `uvicorn bench.bare:app` with the same loop and HTTP parser the service uses.
"""

from __future__ import annotations

import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

ACK = b'{"accepted": 1, "duplicates": 0}'


async def webhook(request: Request) -> Response:
    try:
        json.loads(await request.body())
    except ValueError:
        return JSONResponse({"error": "body is not JSON"}, status_code=400)
    return Response(ACK, media_type="application/json")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[
        Route("/webhooks/{name}", webhook, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
)
