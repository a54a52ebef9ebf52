"""Request bodies of the admin API and the pages' JSON calls: bounded in size, checked as webhooks are."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from middleware.platforms.base import Rejected, loads_json

#: an admin or page call carries one small JSON object; webhooks have `server.max_body_bytes`
MAX_JSON_BYTES = 64 * 1024


async def read_json(request: Request, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The body as JSON: `Rejected` 415 for another content type (none is taken as JSON), 413 past
    `max_bytes`, 400 for what `loads_json` refuses (malformed, too deep, NaN, surrogates)."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype not in ("", "application/json"):
        raise Rejected(415, f"expected Content-Type application/json, got {ctype!r}")
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise Rejected(413, f"body larger than {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise Rejected(413, f"body larger than {max_bytes} bytes")
        chunks.append(chunk)
    return loads_json(b"".join(chunks))


def refused(exc: Rejected) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)
