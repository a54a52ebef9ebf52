"""A fake chat platform: takes the service's outbound POSTs, answers 200 fast, records arrivals.

`python -m bench.fake_platform --port P`. Every POST to /messages is recorded as (reply_to, arrival time)
with `time.monotonic()`, which on Linux is one system-wide clock, so the bench process can subtract its own
send times from it. GET /arrivals returns what was recorded, GET /count how many; POST /reset forgets it.
"""

from __future__ import annotations

import argparse
import json
import time

from aiohttp import web

from bench.aio import new_loop

OK = b'{"ok": true}'
ARRIVALS = web.AppKey("arrivals", list[tuple[str, float]])
OTHER = web.AppKey("other", dict[str, int])


async def messages(request: web.Request) -> web.Response:
    now = time.monotonic()
    try:
        body = json.loads(await request.read())
        reply_to = str(body.get("reply_to"))
    except (ValueError, AttributeError):
        return web.Response(status=400, body=b'{"error": "bad json"}', content_type="application/json")
    request.app[ARRIVALS].append((reply_to, now))
    return web.Response(body=OK, content_type="application/json")


async def other(request: web.Request) -> web.Response:
    await request.read()
    counts = request.app[OTHER]
    counts[request.path] = counts.get(request.path, 0) + 1
    return web.Response(body=OK, content_type="application/json")


async def arrivals(request: web.Request) -> web.Response:
    body = {"arrivals": request.app[ARRIVALS], "other": request.app[OTHER]}
    return web.Response(body=json.dumps(body).encode(), content_type="application/json")


async def count(request: web.Request) -> web.Response:
    """How many /messages POSTs arrived, and for how many distinct reply_to (cheaper than /arrivals)."""
    recorded = request.app[ARRIVALS]
    body = {"messages": len(recorded), "distinct": len({reply_to for reply_to, _ in recorded})}
    return web.Response(body=json.dumps(body).encode(), content_type="application/json")


async def reset(request: web.Request) -> web.Response:
    request.app[ARRIVALS].clear()
    request.app[OTHER].clear()
    return web.Response(body=OK, content_type="application/json")


def make_app() -> web.Application:
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app[ARRIVALS] = []
    app[OTHER] = {}
    app.router.add_post("/messages", messages)
    app.router.add_post("/typing", other)
    app.router.add_post("/read", other)
    app.router.add_get("/arrivals", arrivals)
    app.router.add_get("/count", count)
    app.router.add_post("/reset", reset)
    app.router.add_get("/healthz", other)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(make_app(), host="127.0.0.1", port=args.port, access_log=None, print=None, loop=new_loop())


if __name__ == "__main__":
    main()
