"""Signals between nodes (middleware/notify.py) and what rides on them: the cross-node live-event hub
(middleware/hub_cluster.py) and hot reload of flows on every node (middleware/reload.py).

The PostgreSQL cases run on the server at 127.0.0.1:5432, a schema of their own each; the
listener's connection is killed with pg_terminate_backend to show the reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from middleware.engine import Engine, Known, Resources, load_flows
from middleware.hub import RESYNC, LocalHub
from middleware.hub_cluster import ClusterHub
from middleware.notify import MAX_PAYLOAD, LocalBus, PostgresBus, Signal, libpq_dsn
from middleware.reload import FlowReloader
from middleware.store import Store
from tests.conftest import PG_DSN, pg_available


class Inbox:
    """Signals a bus handed to a subscriber, with a wait."""

    def __init__(self) -> None:
        self.got: list[Signal] = []
        self.changed = asyncio.Event()

    def __call__(self, signal: Signal) -> None:
        self.got.append(signal)
        self.changed.set()

    async def until(self, predicate: Callable[[list[Signal]], bool], within: float = 5.0) -> None:
        deadline = time.monotonic() + within
        while not predicate(self.got):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; got {self.got}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.2))


def payloads(signals: list[Signal]) -> list[str]:
    return [s.payload for s in signals]


# -- in process -----------------------------------------------------------------------------------


async def test_local_buses_of_one_scope_hear_each_other_and_no_one_else() -> None:
    a, b, other = LocalBus("store-1"), LocalBus("store-1"), LocalBus("store-2")
    for bus in (a, b, other):
        await bus.start()
    heard_a, heard_b, heard_other = Inbox(), Inbox(), Inbox()
    a.subscribe("wake", heard_a)
    b.subscribe("wake", heard_b)
    other.subscribe("wake", heard_other)
    assert await a.publish("wake", "k-1")
    await heard_b.until(lambda got: payloads(got) == ["k-1"])
    await heard_a.until(lambda got: payloads(got) == ["k-1"])  # its own too, marked as such
    assert heard_a.got[0].mine(a) and not heard_b.got[0].mine(b)
    await asyncio.sleep(0.05)
    assert heard_other.got == []
    await b.close()
    assert await a.publish("wake", "k-2")
    await heard_a.until(lambda got: payloads(got) == ["k-1", "k-2"])
    assert payloads(heard_b.got) == ["k-1"]
    assert not await a.publish("wake", "x" * (MAX_PAYLOAD + 1)), "an oversized payload is refused"
    with pytest.raises(ValueError):
        await a.publish("Bad Channel", "x")
    await a.close()
    await other.close()


def test_libpq_dsn_keeps_the_options_and_adds_a_connect_timeout() -> None:
    dsn = libpq_dsn("postgresql+psycopg://u@h:5/db?options=-csearch_path%3Dt_1")
    assert dsn == "postgresql://u@h:5/db?options=-csearch_path%3Dt_1&connect_timeout=3"
    assert libpq_dsn("postgresql://u@h/db?connect_timeout=9") == "postgresql://u@h/db?connect_timeout=9"


# -- PostgreSQL LISTEN/NOTIFY -----------------------------------------------------------------------


@pytest.fixture
def pg_schema() -> Iterator[Callable[[], str]]:
    """Makes fresh schemas on the test server; drops them at the end."""
    if not pg_available():
        pytest.fail(f"PostgreSQL is not reachable at {PG_DSN} (.ci/run starts it)")
    made: list[str] = []

    def make() -> str:
        schema = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        made.append(schema)
        return f"{PG_DSN}?options=-csearch_path%3D{schema}"

    yield make
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        for schema in made:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
async def pg_buses(pg_schema: Callable[[], str]) -> AsyncIterator[Callable[[str], Awaitable[PostgresBus]]]:
    """PostgresBuses on stores of their own (as two nodes have), started; all closed at the end."""
    stores: list[Store] = []
    buses: list[PostgresBus] = []

    async def make(url: str) -> PostgresBus:
        store = Store(url)
        await store.start()
        stores.append(store)
        bus = PostgresBus(store.url, store.notify, backoff=(0.05, 0.5), ping_seconds=0.5)
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.close()
    for store in stores:
        await store.close()


@pytest.mark.postgres
async def test_postgres_signals_reach_every_node_on_the_schema_and_only_there(
    pg_schema: Callable[[], str], pg_buses: Callable[[str], Awaitable[PostgresBus]]
) -> None:
    url, elsewhere = pg_schema(), pg_schema()
    node1 = await pg_buses(url)
    node2 = await pg_buses(url)
    stranger = await pg_buses(elsewhere)
    heard1, heard2, heard_stranger = Inbox(), Inbox(), Inbox()
    node1.subscribe("wake", heard1)
    node2.subscribe("wake", heard2)
    stranger.subscribe("wake", heard_stranger)
    for bus in (node1, node2, stranger):
        await bus.start()
        assert bus.connected
    assert node1.prefix == node2.prefix != stranger.prefix, "a schema's channels are its own"
    started = time.perf_counter()
    assert await node1.publish("wake", "myapp:c-1")
    await heard2.until(lambda got: payloads(got) == ["myapp:c-1"])
    latency = time.perf_counter() - started
    assert not heard2.got[0].mine(node2) and heard2.got[0].origin == node1.origin
    await heard1.until(lambda got: len(got) == 1)
    assert heard1.got[0].mine(node1)
    # a channel subscribed after start is listened to as well
    late = Inbox()
    node2.subscribe("reload", late)
    await asyncio.sleep(0.7)
    assert await node1.publish("reload", '{"digest":"x"}')
    await late.until(lambda got: payloads(got) == ['{"digest":"x"}'])
    await asyncio.sleep(0.1)
    assert heard_stranger.got == []
    print(f"\nNOTIFY node1 -> node2 in {latency * 1000:.1f} ms")


@pytest.mark.postgres
async def test_postgres_listener_reconnects_and_says_so(
    pg_schema: Callable[[], str], pg_buses: Callable[[str], Awaitable[PostgresBus]]
) -> None:
    url = pg_schema()
    listener = await pg_buses(url)
    sender = await pg_buses(url)
    heard = Inbox()
    reconnected = asyncio.Event()
    listener.subscribe("wake", heard)
    listener.on_reconnect(reconnected.set)
    await listener.start()
    await sender.start()
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        killed = conn.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,)).fetchone()
    assert killed == (True,), "the listener's connection was not found"
    await asyncio.wait_for(reconnected.wait(), 10)
    assert listener.connected and listener.reconnects == 1
    assert await sender.publish("wake", "after")
    await heard.until(lambda got: "after" in payloads(got))


# -- the live-event hub across nodes --------------------------------------------------------------


async def test_cluster_hub_carries_events_to_the_other_nodes_pages() -> None:
    bus1, bus2 = LocalBus("s"), LocalBus("s")
    await bus1.start()
    await bus2.start()
    hub1, hub2 = ClusterHub(LocalHub(), bus1), ClusterHub(LocalHub(), bus2)
    page_on_1 = hub1.subscribe(["conversation:myapp:c-1"])
    page_on_2 = hub2.subscribe(["conversation:myapp:c-1", "inbox"])
    hub1.publish("conversation:myapp:c-1", {"kind": "turn", "n": 1})
    mine = await page_on_1.next(1)
    theirs = await page_on_2.next(1)
    assert mine is not None and mine.data == {"kind": "turn", "n": 1}
    assert theirs is not None and theirs.data == {"kind": "turn", "n": 1}
    assert await page_on_1.next(0.1) is None, "a node does not get its own event twice"
    # too large for one signal: the other node's pages reload instead
    hub2.publish("inbox", {"kind": "turn", "blob": "x" * (MAX_PAYLOAD + 10)})
    assert (await page_on_2.next(1)) is not None
    hub1_inbox = hub1.subscribe(["inbox"])
    hub2.publish("inbox", {"kind": "turn", "blob": "y" * (MAX_PAYLOAD + 10)})
    got = await hub1_inbox.next(1)
    assert got is not None and got.kind == RESYNC
    # a reconnect of the bus: every open page reloads once
    hub1._on_reconnect()
    kinds = {(await sub.next(1) or got).kind for sub in (page_on_1, hub1_inbox)}
    assert kinds == {RESYNC}
    hub1.close()
    hub2.close()
    await bus1.close()
    await bus2.close()


# -- the hub sends a topic's events only to nodes that want them ------------------------------------

#: small TTL and intervals, so the tests see them pass
FAST = {"ttl": 0.4, "refresh": 0.1, "settle": 0.05}


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def local_nodes(scope: str, **options: float) -> AsyncIterator[tuple[ClusterHub, ClusterHub, Inbox]]:
    """Two ClusterHubs on LocalBuses of one scope, and what crossed on the `hub` channel."""
    buses = [LocalBus(scope), LocalBus(scope)]
    for bus in buses:
        await bus.start()
    a, b = (ClusterHub(LocalHub(), bus, **(FAST | options)) for bus in buses)
    crossed = Inbox()
    buses[0].subscribe("hub", crossed)
    try:
        yield a, b, crossed
    finally:
        a.close()
        b.close()
        await asyncio.sleep(0.02)  # the last signals' tasks finish
        for bus in buses:
            await bus.close()


async def past_warm_up(*hubs: ClusterHub) -> None:
    """A hub that asked the others for their interest forwards everything for 2 * settle."""
    await asyncio.sleep(max(2 * hub.settle for hub in hubs) + 0.05)


async def test_cluster_hub_sends_nothing_no_other_node_wants() -> None:
    async with local_nodes("interest-none") as (a, b, crossed):
        await past_warm_up(a, b)
        a.publish("conversation:myapp:c-1", {"kind": "turn"})
        a.publish("inbox", {"kind": "turn"})
        await asyncio.sleep(0.1)
        assert (a.sent, a.withheld) == (0, 2)
        assert crossed.got == [] and b.received == 0
    # alone on its bus: neither events nor interest are sent, and no resync is needed
    solo = LocalBus("interest-solo")
    await solo.start()
    hub = ClusterHub(LocalHub(), solo, **FAST)
    page = hub.subscribe(["inbox"])
    hub.publish("inbox", {"kind": "turn"})
    got = await page.next(1)
    assert got is not None and got.kind == "turn"
    await asyncio.sleep(0.15)
    assert (hub.sent, hub.withheld, hub.announced) == (0, 0, 0)
    assert await page.next(0.05) is None
    hub.close()
    await solo.close()


async def test_cluster_hub_sends_a_topics_events_once_another_node_subscribes_to_it() -> None:
    topic = "conversation:myapp:c-1"
    async with local_nodes("interest-some") as (a, b, crossed):
        await past_warm_up(a, b)
        page = b.subscribe([topic])
        await until(lambda: topic in a.wanted_remotely())
        first = await page.next(1)
        assert first is not None and first.kind == RESYNC, "the new subscription's resync"
        a.publish(topic, {"kind": "turn", "n": 1})
        a.publish("conversation:myapp:c-2", {"kind": "turn", "n": 2})
        got = await page.next(1)
        assert got is not None and got.topic == topic and got.data == {"kind": "turn", "n": 1}
        await asyncio.sleep(0.05)
        assert (a.sent, a.withheld) == (1, 1)
        assert [json.loads(s.payload)["t"] for s in crossed.got] == [topic]
        assert b.wanted_remotely() == set(), "a has no subscribers"


async def test_cluster_hub_interest_lasts_while_renewed_and_expires_after_the_subscription() -> None:
    topic = "conversation:myapp:c-1"
    async with local_nodes("interest-expiry") as (a, b, _):
        page = b.subscribe([topic])
        await until(lambda: topic in a.wanted_remotely())
        await asyncio.sleep(3 * a.ttl)  # renewed every `refresh` seconds
        assert topic in a.wanted_remotely()
        page.close()
        closed = time.monotonic()
        await until(lambda: topic not in a.wanted_remotely(), within=3 * a.ttl)
        assert time.monotonic() - closed <= a.ttl + 0.1
        withheld = a.withheld
        a.publish(topic, {"kind": "turn"})
        assert a.withheld == withheld + 1
        assert topic not in a._remote, "expired interest is forgotten"


async def test_cluster_hub_resyncs_a_new_subscription_for_what_was_not_sent_before_its_announcement() -> None:
    topic = "conversation:myapp:c-1"
    async with local_nodes("interest-race", settle=0.2) as (a, b, _):
        await past_warm_up(a, b)
        page = b.subscribe([topic])
        a.publish(topic, {"kind": "turn"})  # before b's announcement arrived: not sent
        assert a.withheld == 1
        started = time.monotonic()
        got = await page.next(1)
        assert got is not None and got.kind == RESYNC
        assert time.monotonic() - started >= 0.15, "once the announcement had time to arrive"
        # a subscription that ended before then gets nothing (and nothing fails)
        gone = b.subscribe(["inbox"])
        gone.close()
        await asyncio.sleep(0.3)
        assert await gone.next(0.01) is None and not b._timers
        assert await page.next(0.05) is None, "one resync"


async def test_cluster_hub_learns_the_interest_of_nodes_that_were_there_before_it() -> None:
    topic = "conversation:myapp:c-1"
    async with local_nodes("interest-ask", refresh=30) as (a, b, _):  # no periodic re-announcement
        b_page = b.subscribe([topic])
        await until(lambda: topic in a.wanted_remotely())
        late_bus = LocalBus("interest-ask")
        await late_bus.start()
        late = ClusterHub(LocalHub(), late_bus, **(FAST | {"settle": 0.3}))
        await until(lambda: topic in late.wanted_remotely(), within=1)  # asked, and b answered
        # while the answers come, everything is sent; after, only what is wanted
        late.publish(topic, {"kind": "turn"})
        late.publish("conversation:myapp:c-2", {"kind": "turn"})
        assert (late.sent, late.withheld) == (2, 0)
        await past_warm_up(late)
        late.publish("conversation:myapp:c-2", {"kind": "turn"})
        assert (late.sent, late.withheld) == (2, 1)
        # a reconnect: interest announced again, asked again, then a resync for every open page
        await asyncio.sleep(0.1)
        while await b_page.next(0.01) is not None:
            pass
        announced = b.announced
        b._on_reconnect()
        assert b.announced == announced + 2  # the ask, then b's topics
        got = await b_page.next(1)
        assert got is not None and got.kind == RESYNC
        late.close()
        await asyncio.sleep(0.02)
        await late_bus.close()


def test_cluster_hub_splits_a_long_topic_list_over_signals() -> None:
    hub = ClusterHub(LocalHub(), LocalBus("interest-split"), **FAST)
    topics = [f"conversation:myapp:ç-{i:05d}" for i in range(2000)]
    signals = list(hub._announcements([*topics, "x" * MAX_PAYLOAD]))  # too long a topic is left out
    assert len(signals) > 1 and all(len(s.encode()) <= MAX_PAYLOAD for s in signals)
    assert [t for s in signals for t in json.loads(s)["w"]] == topics
    hub.close()


@pytest.mark.postgres
async def test_cluster_hub_on_postgres_sends_only_what_another_node_wants(
    pg_schema: Callable[[], str], pg_buses: Callable[[str], Awaitable[PostgresBus]]
) -> None:
    url = pg_schema()
    bus1, bus2 = await pg_buses(url), await pg_buses(url)
    options = {"ttl": 2.0, "refresh": 0.5, "settle": 0.2}
    # as the app does: the hubs subscribe to the bus before it starts
    hub1, hub2 = ClusterHub(LocalHub(), bus1, **options), ClusterHub(LocalHub(), bus2, **options)
    await bus1.start()
    await bus2.start()
    topic = "conversation:myapp:c-1"
    hub1.publish("inbox", {"kind": "turn"})  # its first use on a connected bus: asks the others
    page = hub2.subscribe([topic])
    await until(lambda: topic in hub1.wanted_remotely())
    await past_warm_up(hub1)
    sent = hub1.sent
    hub1.publish(topic, {"kind": "turn", "n": 1})
    hub1.publish("conversation:myapp:c-2", {"kind": "turn", "n": 2})
    assert hub1.sent == sent + 1
    events = [await page.next(2), await page.next(2)]
    assert {e.kind for e in events if e is not None} == {RESYNC, "turn"}
    assert [e.data for e in events if e is not None and e.kind == "turn"] == [{"kind": "turn", "n": 1}]
    assert await page.next(0.3) is None
    page.close()
    await until(lambda: topic not in hub1.wanted_remotely(), within=4)
    hub1.close()
    hub2.close()
    await asyncio.sleep(0.1)


# -- hot reload on every node -----------------------------------------------------------------------

FLOW = """\
flow: hello
states:
  start:
    routes:
      - do: [{reply: "%s"}]
"""


async def test_a_reload_on_one_node_reloads_the_others(tmp_path: Path) -> None:
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "hello.yaml").write_text(FLOW % "v1")
    buses = [LocalBus("shared"), LocalBus("shared")]
    nodes = []
    for bus in buses:
        await bus.start()
        engine = Engine(load_flows(flows, Known()), Resources())
        reloader = FlowReloader(engine, flows, Known())
        reloader.attach(bus)
        await reloader.start()
        nodes.append(reloader)
    one, two = nodes
    assert one.digest == two.digest
    (flows / "hello.yaml").write_text(FLOW % "v2")
    assert await one.reload() == []
    for _ in range(100):
        if two.generation == 1:
            break
        await asyncio.sleep(0.02)
    assert two.generation == 1 and two.digest == one.digest
    # the announcement of a reload it already has changes nothing on the first node
    await asyncio.sleep(0.1)
    assert one.generation == 1
    # a broken change: the node that tries it keeps its flows, and announces nothing
    (flows / "hello.yaml").write_text("flow: hello\nstates: [\n")
    assert await two.reload() != []
    await asyncio.sleep(0.1)
    assert one.generation == 1 and two.generation == 1
    for reloader in nodes:
        await reloader.close()
    for bus in buses:
        await bus.close()
