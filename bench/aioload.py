"""Closed-loop aiohttp load generator, the fallback when wrk is not installed.

`python -m bench.aioload URL --seconds S --connections C --conversations K --prefix P` keeps C requests in
flight for S seconds and prints one `BENCH_JSON {...}` line in the same shape as bench/webhook.lua's.
It needs most of a core for itself at a few thousand req/s; wrk needs less, so prefer wrk.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time

import aiohttp

from bench import aio
from bench.payload import WEBHOOK_HEADERS, webhook_body
from bench.stats import percentile


class Counters:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.non_2xx = 0
        self.errors = 0


async def worker(
    session: aiohttp.ClientSession,
    url: str,
    ids: itertools.count[int],
    args: argparse.Namespace,
    stop_at: float,
    counters: Counters,
) -> None:
    while time.monotonic() < stop_at:
        n = next(ids)
        body = webhook_body(f"{args.prefix}0-{n}", args.offset + n % args.conversations)
        started = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=WEBHOOK_HEADERS) as resp:
                await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError):
            counters.errors += 1
            continue
        counters.latencies.append(time.perf_counter() - started)
        if not 200 <= status < 300:
            counters.non_2xx += 1


async def run(args: argparse.Namespace) -> dict[str, float]:
    counters = Counters()
    ids = itertools.count(1)
    connector = aiohttp.TCPConnector(limit=args.connections)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.monotonic()
        stop_at = started + args.seconds
        await asyncio.gather(
            *(worker(session, args.url, ids, args, stop_at, counters) for _ in range(args.connections))
        )
        duration = time.monotonic() - started
    lat = counters.latencies
    return {
        "requests": len(lat),
        "duration_s": duration,
        "connect_errors": 0,
        "read_errors": counters.errors,
        "write_errors": 0,
        "non_2xx": counters.non_2xx,
        "timeouts": 0,
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "max_ms": max(lat, default=0.0) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument("--prefix", default="m")
    parser.add_argument("--offset", type=int, default=0, help="conversation ids start here (default 0)")
    args = parser.parse_args()
    result = aio.run(run(args))
    print("BENCH_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
