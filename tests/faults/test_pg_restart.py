"""PostgreSQL restarted under load (the tests' private server, stopped with `-m immediate`, as a crash).

Two nodes take webhooks for many conversations while the database goes away for a few seconds:
- `/readyz` turns 503 on both nodes, and back to 200 by itself once the database is back;
- while it is down, every webhook gets 503 with a Retry-After (never a 200: nothing can be stored);
- the sender retries as a platform does; afterwards every message acknowledged (before, during, or
  after the outage) is in the store and answered exactly once, in order per conversation;
- the nodes' LISTEN connections reconnect: a message taken in by one node for a conversation the
  other holds is handled at once again (the sweep is slow in this test).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server
from tests.fakes.platform import FakePlatform
from tests.faults.cluster import (
    Node,
    PrivatePostgres,
    Sender,
    add_nodes,
    check_exactly_once_in_order,
    msg,
    start_nodes,
    write_flows,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]

CONVERSATIONS = 30
PER_CONVERSATION = 12
OUTAGE_SECONDS = 6


async def test_postgres_restart_under_load_503s_then_recovers_losing_nothing(
    tmp_path: Path,
    pg: PrivatePostgres,
    nodes: list[Node],
    platform: tuple[Server, FakePlatform],
    http: httpx.AsyncClient,
) -> None:
    server, fake = platform
    store = pg.new_store()
    flows = write_flows(tmp_path, wait="100ms")
    add_nodes(
        nodes,
        tmp_path,
        ("n1", "n2"),
        store,
        server.url,
        flows,
        extra="outbox: {backoff_base: 0.1, backoff_max: 1}\n",
        dispatch="lease_seconds: 5, sweep_seconds: 10, retry_after_seconds: 1",
    )
    await start_nodes(nodes)
    sender = Sender(http, [n.url for n in nodes], rng=random.Random(2), retry_cap=0.5)
    rng = random.Random(4)
    sent: dict[str, list[str]] = defaultdict(list)
    outage: dict[str, float] = {}
    during: Counter[str] = Counter()
    ready_seen: dict[str, set[int]] = defaultdict(set)
    refused: list[str] = []
    stop_probes = asyncio.Event()

    def down(since: float) -> bool:
        """Was the database down all the time from `since` until now?"""
        return "stopped" in outage and outage["stopped"] <= since and "starting" not in outage

    async def probe() -> None:
        """What /readyz and a webhook answer, every 100 ms, while the database is down."""
        n = 0
        while not stop_probes.is_set():
            for node in nodes:
                sent_at = time.monotonic()
                r = await http.get(f"{node.url}/readyz")
                ready_seen["down" if down(sent_at) else "up"].add(r.status_code)
                if not down(time.monotonic()):
                    continue
                n += 1
                sent_at = time.monotonic()
                w = await http.post(f"{node.url}/webhooks/myapp", json=msg(999, n))
                if not down(sent_at):
                    continue  # the database came back meanwhile
                during[str(w.status_code)] += 1
                refused.append(f"m-999-{n:03d}")
                assert w.status_code == 503, f"{w.status_code} for a webhook while the database is down"
                assert w.headers.get("retry-after"), "a 503 without Retry-After"
            await asyncio.sleep(0.1)

    async def conversation(c: int) -> None:
        await asyncio.sleep(rng.random() * 2)
        for n in range(PER_CONVERSATION):
            m = msg(c, n)
            await sender.post(m, within=120)
            sent[m["conversation_id"]].append(m["message_id"])
            await asyncio.sleep(rng.random() * 0.4)

    async def restart() -> None:
        await asyncio.sleep(2.5)
        await asyncio.to_thread(pg.stop, "immediate")
        outage["stopped"] = time.monotonic()
        await asyncio.sleep(OUTAGE_SECONDS)
        outage["starting"] = time.monotonic()
        await asyncio.to_thread(pg.start)
        outage["started"] = time.monotonic()

    probes = asyncio.create_task(probe())
    started = time.monotonic()
    async with asyncio.timeout(180):
        await asyncio.gather(restart(), *(conversation(c) for c in range(CONVERSATIONS)))
        # both nodes ready again by themselves
        recovered = {}
        for node in nodes:
            for _ in range(300):
                if (await http.get(f"{node.url}/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            recovered[node.name] = round(time.monotonic() - outage["started"], 2)
    stop_probes.set()
    await probes
    assert 503 in ready_seen["down"] and 200 not in ready_seen["down"], dict(ready_seen)
    assert during and set(during) == {"503"}, during

    every = {m for ms in sent.values() for m in ms}
    await fake.wait_for(lambda: every <= {c.body["reply_to"] for c in fake.delivered()}, timeout=60)
    done = time.monotonic() - started
    await asyncio.sleep(1.5)
    verdict = check_exactly_once_in_order(fake, sent)
    stored = {r[0] for r in pg.query(store, "SELECT message_id FROM inbox WHERE message_id LIKE %s", ("m-999-%",))}
    assert not stored & set(refused), f"a webhook answered 503 during the outage was stored: {sorted(stored)[:5]}"
    acked_during = [m for m, at in sender.acked_at.items() if outage["stopped"] < at < outage["starting"]]
    assert not acked_during, f"acknowledged while the database was down: {acked_during[:5]}"

    # LISTEN reconnected: a message for a conversation n1 holds, taken in by n2, is handled at once
    fake.script.append((503, {"Retry-After": "4"}))
    await sender.post(msg(500, 0), nodes[0].url)
    await fake.wait_for(lambda: any(c.path == "/messages#503" for c in fake.calls), timeout=10)
    await asyncio.sleep(0.3)
    at = time.monotonic()
    await sender.post(msg(500, 1), nodes[1].url)
    while True:
        rows = pg.query(store, "SELECT status FROM inbox WHERE message_id = 'm-500-001'")
        if rows and rows[0][0] == "done":
            break
        assert time.monotonic() - at < 3, "the holder was not woken after the database came back"
        await asyncio.sleep(0.05)
    woken_in = time.monotonic() - at
    logs = "\n".join(n.log_text() for n in nodes)
    assert "notify listener reconnected" in logs
    print(
        f"\noutage {OUTAGE_SECONDS}s: readyz {dict(ready_seen)}, probe webhooks during it {dict(during)}; "
        f"ready again {recovered} s after the restart; {len(every)} messages all answered {done:.1f}s after "
        f"the start; redelivered keys {verdict.repeats}; sender answers {dict(sender.statuses)}; "
        f"cross-node wake after the restart {woken_in * 1000:.0f} ms"
    )
