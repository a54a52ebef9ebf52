"""Open-loop paced sender: webhooks at a fixed rate, each send time kept for webhook-to-reply latency.

Runs in the bench process (on the load core). Send times are `time.monotonic()`, the clock the fake
platform stamps arrivals with.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from bench.payload import WEBHOOK_HEADERS, webhook_body


@dataclass(frozen=True)
class Pace:
    rate: float
    warmup: float
    seconds: float
    conversations: int = 100
    prefix: str = "p"
    max_in_flight: int = 256


@dataclass
class PacedResult:
    #: message_id -> send time, for the messages sent after the warm-up
    sent_at: dict[str, float] = field(default_factory=dict)
    #: ack latencies (seconds) of those messages
    acks: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    #: how far behind its schedule the sender fell at worst (seconds)
    max_lag: float = 0.0

    def achieved_rate(self, rate: float) -> float:
        """Sends per second over the measured window as it really went."""
        times = self.sent_at.values()
        if len(times) < 2:
            return 0.0
        return len(times) / (max(times) - min(times) + 1 / rate)


async def _send(
    session: aiohttp.ClientSession,
    url: str,
    message_id: str,
    conversation: int,
    measured: bool,
    result: PacedResult,
) -> None:
    body = webhook_body(message_id, conversation)
    started = time.monotonic()
    if measured:
        result.sent_at[message_id] = started
    try:
        async with session.post(url, data=body, headers=WEBHOOK_HEADERS) as resp:
            await resp.read()
            status = resp.status
    except (TimeoutError, aiohttp.ClientError):
        result.errors += 1
        return
    if measured:
        result.acks.append(time.monotonic() - started)
        result.statuses[status] += 1


async def send_paced(url: str, pace: Pace) -> PacedResult:
    """Send `rate` webhooks per second for warmup + seconds, then wait for the last acks."""
    result = PacedResult()
    total = int(pace.rate * (pace.warmup + pace.seconds))
    connector = aiohttp.TCPConnector(limit=pace.max_in_flight)
    timeout = aiohttp.ClientTimeout(total=10)
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.monotonic()
        for i in range(total):
            at = i / pace.rate
            delay = start + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            result.max_lag = max(result.max_lag, time.monotonic() - start - at)
            measured = at >= pace.warmup
            coro = _send(session, url, f"{pace.prefix}-{i}", i % pace.conversations, measured, result)
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=15)
    return result
