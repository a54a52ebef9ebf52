"""Three nodes on one PostgreSQL, no sticky sessions: webhooks for many conversations sprayed at random
nodes, with duplicates (some sent at once to two nodes, some resent later to another node).

Each message must get exactly one reply (a repeat is only a redelivery under the same
Idempotency-Key), in order per conversation, and exactly one of its webhooks must say "accepted"
across all nodes. The sweep is set to 30 s: a message left waiting for a sweep (say, taken in by one
node while another holds the conversation) would take 30 s to answer, and the test would see it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

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
    metric,
    msg,
    no_tracebacks,
    percentile,
    start_nodes,
    write_flows,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]

CONVERSATIONS = 90
PER_CONVERSATION = 8
#: share of messages sent twice
DUPLICATES = 0.25
SWEEP_SECONDS = 30


async def test_three_nodes_sprayed_with_duplicates_answer_each_message_once_in_order(
    tmp_path: Path,
    pg: PrivatePostgres,
    nodes: list[Node],
    platform: tuple[Server, FakePlatform],
    http: httpx.AsyncClient,
) -> None:
    server, fake = platform
    store = pg.new_store()
    flows = write_flows(tmp_path, wait="30ms")
    add_nodes(
        nodes,
        tmp_path,
        ("n1", "n2", "n3"),
        store,
        server.url,
        flows,
        dispatch=f"lease_seconds: 10, sweep_seconds: {SWEEP_SECONDS}",
    )
    ready = await start_nodes(nodes)
    sender = Sender(http, [n.url for n in nodes], rng=random.Random(11))
    rng = random.Random(5)
    sent: dict[str, list[str]] = {f"c-{c:03d}": [] for c in range(CONVERSATIONS)}
    duplicates: Counter[str] = Counter()
    extra: list[asyncio.Task[dict[str, Any]]] = []

    async def conversation(c: int) -> None:
        await asyncio.sleep(rng.random() * 0.5)
        for n in range(PER_CONVERSATION):
            m = msg(c, n)
            roll = rng.random()
            if roll < DUPLICATES / 2:  # the same webhook to two nodes at once
                first, second = rng.sample(sender.urls, 2)
                await asyncio.gather(sender.post(m, first), sender.post(m, second))
                duplicates["concurrent"] += 1
            else:
                await sender.post(m)
                if roll < DUPLICATES:  # the platform retries it later, to any node
                    extra.append(asyncio.create_task(later(m)))
                    duplicates["later"] += 1
            sent[m["conversation_id"]].append(m["message_id"])
            await asyncio.sleep(rng.random() * 0.05)

    async def later(m: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(rng.random() * 2)
        return await sender.post(m)

    started = time.monotonic()
    async with asyncio.timeout(240):
        await asyncio.gather(*(conversation(c) for c in range(CONVERSATIONS)))
        await asyncio.gather(*extra)
    sent_in = time.monotonic() - started
    every = {m for ms in sent.values() for m in ms}
    await fake.wait_for(lambda: every <= {c.body["reply_to"] for c in fake.delivered()}, timeout=SWEEP_SECONDS - 5)
    answered_in = time.monotonic() - started
    await asyncio.sleep(1.5)  # a late duplicate reply would show now

    verdict = check_exactly_once_in_order(fake, sent)
    accepted = sender.accepted_once()
    assert set(accepted) == every
    assert all(n == 1 for n in accepted.values()), {m: n for m, n in accepted.items() if n != 1}
    assert sender.bare_503 == 0

    # ack -> reply latency: nothing waited for a sweep
    delivered_at = {c.body["reply_to"]: c.at for c in fake.delivered()}
    latency = [delivered_at[m] - sender.acked_at[m] for m in every]
    assert max(latency) < 10, f"a message waited {max(latency):.1f}s: a sweep, not a signal, found it"

    per_node = {n.name: await metric(http, n, "switchboard_turn_seconds_count") for n in nodes}
    webhooks = {n.name: await metric(http, n, "switchboard_webhooks_total") for n in nodes}
    assert all(v > 0 for v in per_node.values()), per_node
    assert sum(per_node.values()) == len(every), (per_node, len(every))
    no_tracebacks(nodes)
    print(
        f"\n3 nodes ready in {max(ready):.1f}s; {len(every)} messages in {CONVERSATIONS} conversations, duplicates "
        f"{dict(duplicates)}; sent in {sent_in:.1f}s, all answered {answered_in:.1f}s after the start; "
        f"ack->reply p50 {percentile(latency, 50) * 1000:.0f} ms, p99 {percentile(latency, 99) * 1000:.0f} ms, "
        f"max {max(latency) * 1000:.0f} ms; turns per node {per_node}; webhooks per node {webhooks}; "
        f"redelivered keys {verdict.repeats}; answers {dict(sender.statuses)}"
    )
