"""Graceful shutdown (SIGTERM) of one of two `switchboard serve` nodes on PostgreSQL, under load.

While webhooks for many conversations go to both nodes, node n1 gets SIGTERM. It must:
- stop taking webhooks at once: 503 with Retry-After, and `/readyz` 503, while it drains;
- finish the turns in flight (or hand them back), hand every lease back, and tell n2 (`free`), so
  n2 carries on at once - leases here last 30 s and the sweep runs every 30 s, so anything left to
  a lease's expiry or a sweep would show as a 30 s stall;
- exit within `dispatch.shutdown_seconds` plus a few seconds, with SIGTERM's status (uvicorn
  re-raises it after a clean shutdown), without a traceback.
Then n1 is started again under its node id. Every acknowledged message is answered exactly once,
in order per conversation, by whichever node.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from httpx_aiohttp import AiohttpTransport

from tests.conftest import PG_DSN, Server, pg_available
from tests.fakes.platform import FakePlatform
from tests.faults.cluster import (
    Node,
    Sender,
    add_nodes,
    check_exactly_once_in_order,
    msg,
    no_tracebacks,
    start_nodes,
    write_flows,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

CONVERSATIONS = 30
PER_CONVERSATION = 8
SHUTDOWN_SECONDS = 8
#: past the drain's bound: uvicorn's wait for open connections and the lifespan's end
EXIT_SLACK = 5


@pytest.fixture
def pg_store() -> Iterator[str]:
    if not pg_available():
        pytest.fail(f"PostgreSQL is not reachable at {PG_DSN} (.ci/run starts it)")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_DSN}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    made: list[Node] = []
    yield made
    for node in made:
        node.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(transport=AiohttpTransport(limits=limits), timeout=30) as client:
        yield client


async def test_sigterm_under_load_drains_hands_over_and_exits_in_time(
    tmp_path: Path, pg_store: str, nodes: list[Node], http: httpx.AsyncClient
) -> None:
    fake = FakePlatform()
    async with Server(fake.app()) as server:
        flows = write_flows(tmp_path, wait="300ms")
        add_nodes(
            nodes,
            tmp_path,
            ("n1", "n2"),
            pg_store,
            server.url,
            flows,
            dispatch=f"lease_seconds: 30, sweep_seconds: 30, shutdown_seconds: {SHUTDOWN_SECONDS}",
        )
        await start_nodes(nodes)
        n1, n2 = nodes
        sender = Sender(http, [n1.url, n2.url], rng=random.Random(6))
        rng = random.Random(12)
        sent: dict[str, list[str]] = defaultdict(list)
        term: dict[str, float] = {}
        termed = asyncio.Event()
        seen_after_term: Counter[str] = Counter()
        total = CONVERSATIONS * PER_CONVERSATION

        async def conversation(c: int) -> None:
            await asyncio.sleep(rng.random() * 0.3)
            for n in range(PER_CONVERSATION):
                m = msg(c, n)
                await sender.post(m)
                sent[m["conversation_id"]].append(m["message_id"])
                if not term and len(sender.acked_at) >= 0.4 * total:
                    term["at"] = time.monotonic()
                    term["acks"] = len(sender.acked_at)
                    n1.signal(signal.SIGTERM)
                    termed.set()
                    sender.urls = [n2.url]  # the load balancer sees /readyz fail
                await asyncio.sleep(rng.random() * 0.2)

        async def watch_n1() -> None:
            """What n1 answers from the signal until it is gone."""
            await termed.wait()
            probe = 0
            while n1.alive():
                try:
                    ready = await http.get(f"{n1.url}/readyz")
                    seen_after_term[f"readyz {ready.status_code}"] += 1
                    probe += 1
                    hook = await http.post(f"{n1.url}/webhooks/myapp", json=msg(900, probe))
                    label = f"webhook {hook.status_code}"
                    if hook.status_code == 503 and hook.headers.get("retry-after"):
                        label += " retry-after"
                    seen_after_term[label] += 1
                    if hook.status_code == 200:  # taken in before the drain began: it must be answered
                        sent["c-900"].append(f"m-900-{probe:03d}")
                except httpx.TransportError:
                    seen_after_term["refused"] += 1
                await asyncio.sleep(0.05)

        started = time.monotonic()
        watcher = asyncio.create_task(watch_n1())
        async with asyncio.timeout(120):
            await asyncio.gather(*(conversation(c) for c in range(CONVERSATIONS)))
        proc = n1.proc
        assert proc is not None
        code = await proc.wait(SHUTDOWN_SECONDS + EXIT_SLACK + 10)
        exited_after = time.monotonic() - term["at"]
        await watcher
        assert code in (0, -signal.SIGTERM), f"exit status {code}:\n{proc.tail()}"
        assert exited_after < SHUTDOWN_SECONDS + EXIT_SLACK, f"took {exited_after:.1f}s to exit"
        assert seen_after_term["readyz 503"] > 0, dict(seen_after_term)
        assert seen_after_term["webhook 503 retry-after"] > 0, dict(seen_after_term)
        assert seen_after_term["webhook 503"] == 0, "a 503 without Retry-After"
        log = proc.log.read_text()
        assert "draining before shutdown" in log and "dispatcher drained" in log, log[-3000:]
        assert "Application shutdown complete" in log

        every = {m for ms in sent.values() for m in ms}
        # n2 carries on at once (leases 30 s, sweep 30 s: nothing may wait for either)
        await fake.wait_for(lambda: every <= {c.body["reply_to"] for c in fake.delivered()}, timeout=20)
        all_answered = time.monotonic() - term["at"]

        # n1 comes back under its node id and takes work again
        n1.start()
        await n1.ready(60)
        sender.urls = [n1.url, n2.url]
        for n in range(3):
            m = msg(950, n)
            await sender.post(m, n1.url)
            sent[m["conversation_id"]].append(m["message_id"])
        every = {m for ms in sent.values() for m in ms}
        await fake.wait_for(lambda: every <= {c.body["reply_to"] for c in fake.delivered()}, timeout=20)
        await asyncio.sleep(1)
        verdict = check_exactly_once_in_order(fake, sent)
        no_tracebacks(nodes)
        drained = next(line for line in log.splitlines() if "dispatcher drained" in line)
        print(
            f"\nSIGTERM to n1 after {term['acks']:.0f} of {total} acks ({time.monotonic() - started:.0f}s run): exited "
            f"{exited_after:.2f}s later with {code}; n1 answered meanwhile {dict(seen_after_term)}; "
            f"{drained.split('dispatcher drained', 1)[1].strip()}; every message answered "
            f"{all_answered:.2f}s after the signal; redelivered keys {verdict.repeats}"
        )


async def test_a_turn_longer_than_the_shutdown_bound_is_cut_and_redone_by_the_other_node(
    tmp_path: Path, pg_store: str, nodes: list[Node], http: httpx.AsyncClient
) -> None:
    """A turn that would outlast `dispatch.shutdown_seconds` (a slow engine, say) is cancelled at the
    bound: nothing of it was stored, its lease is handed back, and n2 runs it again at once. n1
    exits within the bound; the user gets one reply, and typing is turned off."""
    fake = FakePlatform()
    async with Server(fake.app()) as server:
        flows = write_flows(tmp_path, wait="5s")
        add_nodes(
            nodes,
            tmp_path,
            ("n1", "n2"),
            pg_store,
            server.url,
            flows,
            dispatch="lease_seconds: 30, sweep_seconds: 30, shutdown_seconds: 2",
        )
        await start_nodes(nodes)
        n1, _n2 = nodes
        sender = Sender(http, [n1.url])
        m = msg(1, 0)
        await sender.post(m, n1.url)
        await fake.wait_for(lambda: bool(fake.typing("c-001")), timeout=10)  # n1's turn is running
        term_at = time.monotonic()
        n1.signal(signal.SIGTERM)
        proc = n1.proc
        assert proc is not None
        code = await proc.wait(2 + EXIT_SLACK + 10)
        exited_after = time.monotonic() - term_at
        assert code in (0, -signal.SIGTERM), f"exit status {code}:\n{proc.tail()}"
        assert exited_after < 2 + EXIT_SLACK, f"took {exited_after:.1f}s to exit"
        log = proc.log.read_text()
        drained = next(line for line in log.splitlines() if "dispatcher drained" in line)
        assert "cancelled=1" in drained, drained
        await fake.wait_for(lambda: len(fake.delivered()) == 1, timeout=15)
        answered_after = time.monotonic() - term_at
        await asyncio.sleep(1)
        assert [c.body["reply_to"] for c in fake.delivered()] == ["m-001-000"]
        typing = [c.body["typing"] for c in fake.typing("c-001")]
        assert typing[-1] is False, f"typing left on: {typing}"
        no_tracebacks(nodes)
        print(
            f"\nSIGTERM with a 5 s turn running (bound 2 s): n1 exited after {exited_after:.2f}s "
            f"({drained.split('dispatcher drained', 1)[1].strip()}); n2 redid the turn, replied "
            f"{answered_after:.2f}s after the signal; typing calls {typing}"
        )
