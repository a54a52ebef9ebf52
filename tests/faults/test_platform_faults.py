"""The platform's API misbehaves while two nodes deliver: down (503) for a while, then slow (each
call takes 1.2 s), then answering 429 with Retry-After. Messages keep coming to both nodes
throughout. Nothing is dropped or dead-lettered, and once the platform is well again the outbox
drains: every message answered once, in order per conversation, with no reply overtaking another.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tests.conftest import Server
from tests.fakes.platform import FakePlatform
from tests.faults.cluster import (
    Node,
    PrivatePostgres,
    Sender,
    add_nodes,
    check_exactly_once_in_order,
    metric,
    msg,
    no_tracebacks,
    start_nodes,
    write_flows,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]

CONVERSATIONS = 24
PER_CONVERSATION = 6


@dataclass
class FlakyPlatform(FakePlatform):
    """The fake platform with a `mode` for /messages: ok, down (503), slow, limited (429)."""

    mode: str = "ok"
    slow_seconds: float = 1.2
    answers: Counter[str] = field(default_factory=Counter)

    async def _messages(self, request: Request) -> Response:
        mode = self.mode
        self.answers[mode] += 1
        if mode == "down":
            body, headers = await self._verify(request)
            self._add("/messages#503", body, headers)
            return JSONResponse({"error": "down"}, status_code=503)
        if mode == "limited":
            body, headers = await self._verify(request)
            self._add("/messages#429", body, headers)
            return JSONResponse({"error": "slow down"}, status_code=429, headers={"Retry-After": "1"})
        if mode == "slow":
            await asyncio.sleep(self.slow_seconds)
        return await super()._messages(request)


async def test_platform_down_slow_and_429_then_the_outbox_drains_in_order(
    tmp_path: Path, pg: PrivatePostgres, nodes: list[Node], http: httpx.AsyncClient
) -> None:
    fake = FlakyPlatform()
    async with Server(fake.app()) as server:
        store = pg.new_store()
        flows = write_flows(tmp_path, wait="20ms")
        add_nodes(
            nodes,
            tmp_path,
            ("n1", "n2"),
            store,
            server.url,
            flows,
            extra="outbox: {backoff_base: 0.2, backoff_max: 1.5, max_attempts: 60, timeout: 5}\n",
            dispatch="lease_seconds: 6, sweep_seconds: 1",
        )
        await start_nodes(nodes)
        sender = Sender(http, [n.url for n in nodes], rng=random.Random(8))
        rng = random.Random(1)
        sent: dict[str, list[str]] = defaultdict(list)
        phases: list[tuple[str, float]] = []

        async def conversation(c: int) -> None:
            for n in range(PER_CONVERSATION):
                m = msg(c, n)
                await sender.post(m)
                sent[m["conversation_id"]].append(m["message_id"])
                await asyncio.sleep(0.5 + rng.random())

        async def script() -> None:
            for mode, seconds in (("ok", 1), ("down", 4), ("slow", 4), ("limited", 3), ("ok", 0)):
                fake.mode = mode
                phases.append((mode, time.monotonic()))
                await asyncio.sleep(seconds)

        started = time.monotonic()
        async with asyncio.timeout(120):
            await asyncio.gather(script(), *(conversation(c) for c in range(CONVERSATIONS)))
        well_at = phases[-1][1]
        every = {m for ms in sent.values() for m in ms}
        await fake.wait_for(lambda: every <= {c.body["reply_to"] for c in fake.delivered()}, timeout=60)
        drained = time.monotonic() - well_at
        await asyncio.sleep(1.5)
        verdict = check_exactly_once_in_order(fake, sent)
        dead = [await _dead(http, n) for n in nodes]
        assert sum(dead) == 0, "a reply was dead-lettered"
        retries = sum([await metric(http, n, "switchboard_outbox_retries_total") for n in nodes])
        for status in ("503", "429"):
            assert any(c.path == f"/messages#{status}" for c in fake.calls), f"no {status} was answered"
        assert fake.answers["slow"] > 0
        no_tracebacks(nodes)
        print(
            f"\nplatform answers by mode {dict(fake.answers)}; {len(every)} messages; outbox drained "
            f"{drained:.1f}s after the platform was well ({time.monotonic() - started:.0f}s in all); "
            f"retries scheduled {retries:.0f}; redelivered keys {verdict.repeats}"
        )


async def _dead(http: httpx.AsyncClient, node: Node) -> float:
    r = await http.get(f"{node.url}/api/v1/outbox/dead", headers={"Authorization": "Bearer fault-token"})
    assert r.status_code == 200, r.text
    return float(len(r.json()["dead"]))
