"""`kill -9` of one of three nodes mid-turn under load.

Conversations are sprayed at every node; after a share of the webhooks are acknowledged, the node
holding the most leases is killed with SIGKILL. Webhooks sent to it from then on fail to connect
and are resent to the others (as a load balancer or the platform would). Its conversations continue
on the other nodes once its leases expire (no earlier: the others must not take a live lease), and
every acknowledged message is answered exactly once (a repeat only under the same Idempotency-Key).
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import defaultdict
from dataclasses import dataclass
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
    no_tracebacks,
    start_nodes,
    write_flows,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]

CONVERSATIONS = 45
PER_CONVERSATION = 10
LEASE_SECONDS = 4
KILL_AFTER = 0.4  # share of all messages acknowledged before the kill
#: the killed node's own platform calls already sent at the kill arrive within this (seconds)
IN_FLIGHT_GRACE = 0.5


async def test_kill_9_of_a_node_mid_turn_its_conversations_continue_elsewhere(
    tmp_path: Path,
    pg: PrivatePostgres,
    nodes: list[Node],
    platform: tuple[Server, FakePlatform],
    http: httpx.AsyncClient,
) -> None:
    server, fake = platform
    store = pg.new_store()
    flows = write_flows(tmp_path, wait="250ms")
    add_nodes(
        nodes,
        tmp_path,
        ("n1", "n2", "n3"),
        store,
        server.url,
        flows,
        dispatch=f"lease_seconds: {LEASE_SECONDS}, sweep_seconds: 0.5",
    )
    await start_nodes(nodes)
    sender = Sender(http, [n.url for n in nodes], rng=random.Random(3))
    rng = random.Random(9)
    total = CONVERSATIONS * PER_CONVERSATION
    sent: dict[str, list[str]] = defaultdict(list)
    kills: list[Kill] = []
    kill_lock = asyncio.Lock()

    async def kill_the_busiest() -> None:
        rows = await asyncio.to_thread(
            pg.query,
            store,
            "SELECT lease_owner, external_id, lease_until FROM conversation "
            "WHERE lease_owner IS NOT NULL AND lease_until > extract(epoch from clock_timestamp())",
        )
        held: dict[str, dict[str, float]] = defaultdict(dict)
        for owner, cid, until in rows:
            held[owner.split("@", 1)[1]][cid] = float(until)
        victim = max(nodes, key=lambda n: len(held.get(n.name, {})))
        victim.signal(signal.SIGKILL)
        answered = {c.body["reply_to"] for c in fake.delivered()}
        kills.append(Kill(victim, time.monotonic(), time.time(), held.get(victim.name, {}), answered))
        sender.urls = [n.url for n in nodes if n is not victim]

    async def conversation(c: int) -> None:
        await asyncio.sleep(rng.random() * 0.3)
        for n in range(PER_CONVERSATION):
            m = msg(c, n)
            await sender.post(m)
            sent[m["conversation_id"]].append(m["message_id"])
            if not kills and len(sender.acked_at) >= KILL_AFTER * total:
                async with kill_lock:
                    if not kills:
                        await kill_the_busiest()
            await asyncio.sleep(rng.random() * 0.1)

    started = time.monotonic()
    async with asyncio.timeout(180):
        await asyncio.gather(*(conversation(c) for c in range(CONVERSATIONS)))
    assert kills, "the kill never happened"
    kill = kills[0]
    assert kill.node.proc is not None and await kill.node.proc.wait(10) == -signal.SIGKILL
    assert kill.leases, "the killed node held no lease"
    every = {m for ms in sent.values() for m in ms}
    await fake.wait_for(lambda: every <= {c.body["reply_to"] for c in fake.delivered()}, timeout=60)
    done = time.monotonic() - started
    await asyncio.sleep(1.5)
    verdict = check_exactly_once_in_order(fake, sent)

    # The victim's conversations went on elsewhere, but only once its lease on them had expired.
    # (Its own sends that were on their way at the kill reach the fake platform in the next moments.)
    to_wall = time.time() - time.monotonic()
    first_after: dict[str, float] = {}
    for call in fake.calls:
        if call.path == "/messages" and call.at > kill.at + IN_FLIGHT_GRACE:
            first_after.setdefault(call.body["conversation_id"], call.at + to_wall)
    early = {
        cid: (first_after[cid], until)
        for cid, until in kill.leases.items()
        if cid in first_after and first_after[cid] < until - 0.05
    }
    assert not early, f"a live lease of the dead node was taken: {early}"
    resumed = [first_after[cid] - kill.wall for cid in kill.leases if cid in first_after]
    waiting = {cid for cid in kill.leases if any(m not in kill.answered for m in sent[cid])}
    assert waiting, "none of the dead node's conversations had work left"
    no_tracebacks([n for n in nodes if n is not kill.node])
    print(
        f"\nkilled {kill.node.name} holding {len(kill.leases)} leases ({len(waiting)} with work left) after "
        f"{len(kill.answered)} replies; its conversations resumed {min(resumed):.2f}-{max(resumed):.2f}s "
        f"after the kill (lease {LEASE_SECONDS}s); {len(every)} messages all answered {done:.1f}s after the start; "
        f"redelivered keys {verdict.repeats}; answers {dict(sender.statuses)}"
    )


@dataclass
class Kill:
    node: Node
    at: float
    wall: float
    #: conversation id -> lease end (epoch seconds) the killed node held
    leases: dict[str, float]
    #: messages answered at the kill
    answered: set[str]
