"""Server-sent events: one response per open page, fed by a hub subscription.

Each stream starts with `retry:` and a `ready` event (sent once the subscription exists, so a page
that waits for it misses nothing), then the topics' events with ids (a reconnecting EventSource
sends `Last-Event-ID` and gets what it missed, or one `resync`), a comment every
`HEARTBEAT_SECONDS` (keeps proxies from closing an idle stream, and finds browsers that left), and
it ends after `STREAM_SECONDS` (the browser reconnects at once): no stream outlives its welcome.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

from middleware.hub import Hub

HEARTBEAT_SECONDS = 10.0
STREAM_SECONDS = 300.0


def format_event(kind: str, data: dict[str, Any], event_id: str | None = None) -> str:
    lines = []
    if event_id:
        lines.append(f"id: {event_id}")
    lines.append(f"event: {kind}")
    # json.dumps never emits a raw newline, so the data is one `data:` line
    lines.append("data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str))
    return "\n".join(lines) + "\n\n"


def event_stream(
    request: Request,
    hub: Hub,
    topics: Sequence[str],
    *,
    still_allowed: Callable[[], Awaitable[bool]] | None = None,
) -> StreamingResponse:
    """A text/event-stream response with the topics' events. `still_allowed` is asked at every
    heartbeat; when it says no (the agent's session ended), the stream sends `signed-out` and ends."""
    last_event_id = request.headers.get("last-event-id") or None

    async def body() -> AsyncIterator[str]:
        subscription = hub.subscribe(topics, last_event_id)
        loop = asyncio.get_running_loop()
        ends = loop.time() + STREAM_SECONDS
        try:
            yield "retry: 1500\n\n"
            yield format_event("ready", {"kind": "ready"})
            while True:
                left = ends - loop.time()
                if left <= 0 or subscription.closed:
                    return
                event = await subscription.next(min(HEARTBEAT_SECONDS, left))
                if event is None:
                    if subscription.closed:
                        return
                    if still_allowed is not None and not await still_allowed():
                        yield format_event("signed-out", {"kind": "signed-out"})
                        return
                    yield ": keep-alive\n\n"
                    continue
                yield format_event(event.kind, event.data, event.id)
        finally:
            subscription.close()

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no", "X-Content-Type-Options": "nosniff"},
    )
