"""Several nodes on one store, in one process: node ids, cross-node wake-ups, delivery fencing.

Two Switchboard apps (node ids `a` and `b`) share a store and a fake platform; each listens on its
own port. On PostgreSQL their signals go through LISTEN/NOTIFY; on SQLite through the in-process
bus (two apps on one SQLite file behave like two nodes). Nothing of ours is patched; the one
reach-in is detaching a node from its bus to show the sweep covering a lost signal.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from middleware.app import create_app
from middleware.cluster import NodeIdInUse, host_fingerprint, join, process_start
from middleware.metrics import Metrics
from middleware.model import Outgoing, Reply
from middleware.outbox import Outbox
from middleware.platforms import PLATFORM_TYPES
from middleware.services import Services
from middleware.store import Lease, LeaseLost, Store, idempotency_key
from tests.conftest import Server, fake_platform, generic_config, message, running

KEY = "myapp:c-1"


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    s = Store(store_url)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


# -- node ids -------------------------------------------------------------------------------------


async def test_a_default_node_id_in_use_by_a_live_process_gets_a_unique_variant(store: Store) -> None:
    first = await join(store, "host:8080", configured=False, lease_seconds=5)
    second = await join(store, "host:8080", configured=False, lease_seconds=5)
    assert first.node_id == "host:8080"
    assert second.node_id == f"host:8080~{second.incarnation}"
    assert first.owner != second.owner and first.owner.endswith("@host:8080")
    with pytest.raises(NodeIdInUse, match="in use by process"):
        await join(store, "host:8080", configured=True, lease_seconds=5)


async def test_a_restart_under_its_id_ends_the_dead_incarnations_leases_at_once(store: Store) -> None:
    # a process that died (its pid runs nothing) held a lease
    dead_pid = 2**22 - 7
    assert process_start(dead_pid) is None
    took = await store.take_node("n1", "deadbeef", host_fingerprint(), dead_pid, 123, lambda row: True)
    assert took is None
    old = await store.claim(KEY, "myapp", "c-1", "deadbeef@n1", 30)
    assert old is not None
    assert await store.claim(KEY, "myapp", "c-1", "someone@n2", 30) is None
    node = await join(store, "n1", configured=True, lease_seconds=30)
    assert node.incarnation != "deadbeef"
    after = await store.claim(KEY, "myapp", "c-1", node.owner, 30)
    assert after is not None and after.epoch == old.epoch + 1, "the dead incarnation's lease ended"
    assert not await store.node_heartbeat("n1", "deadbeef"), "the old incarnation is told it was replaced"
    assert await store.node_heartbeat("n1", node.incarnation)


async def test_a_configured_id_held_on_another_machine_waits_for_its_heartbeat_to_go_stale(store: Store) -> None:
    elsewhere = "other-host|boot|pid:[1]|net:[2]"
    assert await store.take_node("n1", "aaaa0000", elsewhere, 1, 1, lambda row: True) is None

    async def beat() -> None:  # the other machine's process is alive
        while True:
            assert await store.node_heartbeat("n1", "aaaa0000")
            await asyncio.sleep(0.2)

    alive = asyncio.create_task(beat())
    started = time.monotonic()
    with pytest.raises(NodeIdInUse, match="another machine"):
        await join(store, "n1", configured=True, lease_seconds=1.2)
    waited = time.monotonic() - started
    assert 2.0 < waited < 6, waited
    alive.cancel()
    # its heartbeat stops: it is taken over once a lease has passed
    started = time.monotonic()
    node = await join(store, "n1", configured=True, lease_seconds=1.2)
    assert node.node_id == "n1" and 0.5 < time.monotonic() - started < 4
    # and a process that shut down cleanly is replaced at once
    assert await store.node_heartbeat("n1", node.incarnation, state="down")
    started = time.monotonic()
    again = await join(store, "n1", configured=True, lease_seconds=30)
    assert again.incarnation != node.incarnation and time.monotonic() - started < 1


# -- wake-ups across nodes --------------------------------------------------------------------------


def cluster_config(store_url: str, platform_url: str, flows: Path, node: str, sweep: float) -> Any:
    return generic_config(
        store_url,
        platform_url,
        flows,
        f"""\
        node_id: {node}
        reload: false
        dispatch: {{sweep_seconds: {sweep}, lease_seconds: 30}}
        outbox: {{backoff_base: 0.05, backoff_max: 0.5}}
        """,
    )


async def handled_within(services: Services, message_id: str, seconds: float) -> float:
    """Seconds until the message's turn is stored (its inbox row is done); fails after `seconds`."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        conv = await services.store.conversation(KEY)
        if conv and any(m["message_id"] == message_id and m["status"] == "done" for m in conv["messages"]):
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"{message_id} not handled within {seconds}s")


@pytest.mark.parametrize("signal", ["wake", "sweep"])
async def test_a_message_taken_in_by_another_node_is_handled_by_the_lease_holder_at_once(
    store_url: str, echo_flows: Path, client: httpx.AsyncClient, signal: str
) -> None:
    """Node a holds c-1 while its first reply waits 3 s to be retried (503 + Retry-After); node b
    takes the next message in. The holder runs its turn at once: told by b (`wake`), or, with b's
    signal lost, at its next sweep (1 s) - either way long before its wake-up for the retry."""
    sweep = 30.0 if signal == "wake" else 1.0
    async with fake_platform() as (platform, fake):
        fake.script.append((503, {"Retry-After": "3"}))
        a_cfg = cluster_config(store_url, platform.url, echo_flows, "a", sweep)
        b_cfg = cluster_config(store_url, platform.url, echo_flows, "b", sweep)
        async with running(a_cfg) as (a, a_services), running(b_cfg) as (b, b_services):
            if signal == "sweep":
                b_services.dispatcher.bus = None  # its signals are lost
            r = await client.post(f"{a.url}/webhooks/myapp", json=message(1))
            assert r.status_code == 200
            await fake.wait_for(lambda: any(c.path == "/messages#503" for c in fake.calls), timeout=10)
            await asyncio.sleep(0.1)
            assert a_services.dispatcher.holds(KEY), "a keeps the lease while its reply waits"
            sent = time.monotonic()
            r = await client.post(f"{b.url}/webhooks/myapp", json=message(2))
            assert r.status_code == 200
            took = await handled_within(a_services, "m-2", 2.5)
            if signal == "wake":
                assert took < 1.0, took
                assert a_services.dispatcher.stats["woken"] >= 1
                assert b_services.dispatcher.stats["wakes_sent"] >= 1
            assert time.monotonic() - sent < 2.9, "handled before the retry's wake-up"
            await fake.wait_for(lambda: len(fake.delivered()) == 2, timeout=10)
            assert [c.body["reply_to"] for c in fake.delivered()] == ["m-1", "m-2"]
            print(f"\n[{signal}] m-2 taken in by b, handled by a after {took:.3f}s")


async def test_messages_sent_in_turn_to_two_nodes_are_answered_in_order_while_one_lingers(
    store_url: str, echo_flows: Path, client: httpx.AsyncClient
) -> None:
    """One conversation, each message sent after the last was acknowledged, to a and b in turn,
    some while the other node is still running or lingering on it (linger 30 s, sweep 30 s: only
    the wake signal and the reads of the store can keep order and pace)."""
    async with fake_platform() as (platform, fake):
        configs = [
            generic_config(
                store_url,
                platform.url,
                echo_flows,
                f"node_id: {node}\nreload: false\n"
                "dispatch: {sweep_seconds: 30, lease_seconds: 30, linger_seconds: 30}\n",
            )
            for node in ("a", "b")
        ]
        async with running(configs[0]) as (a, _), running(configs[1]) as (b, _):
            sent: dict[str, list[str]] = {}

            async def conversation(c: int) -> None:
                key = sent.setdefault(f"c-{c}", [])
                for n in range(12):
                    url = (a, b)[n % 2 if n < 6 else (n // 2) % 2].url  # a b a b a b a a b b ...
                    m = message(f"{c}-{n}", f"c-{c}", text=f"{'two' if n % 3 else 'x'} {n}")
                    r = await client.post(f"{url}/webhooks/myapp", json=m)
                    assert r.status_code == 200
                    key.append(m["message_id"])
                    await asyncio.sleep(0.01 * (n % 3))

            started = time.monotonic()
            await asyncio.gather(*(conversation(c) for c in range(3)))
            replies = 3 * sum(2 if n % 3 else 1 for n in range(12))  # "two ..." gets two replies
            await fake.wait_for(lambda: len(fake.delivered()) >= replies, timeout=10)
            took = time.monotonic() - started
            await asyncio.sleep(0.2)  # a reply sent twice would show now
            for conv, ids in sent.items():
                order = [c.body["reply_to"] for c in fake.delivered() if c.body["conversation_id"] == conv]
                assert list(dict.fromkeys(order)) == ids, order
            assert len(fake.delivered()) == replies
            assert took < 5, f"{took:.1f}s: a message waited for a linger or a sweep"


async def test_a_draining_node_hands_its_conversations_to_the_others(
    store_url: str, tmp_path: Path, client: httpx.AsyncClient
) -> None:
    """Node a drains (the first part of a graceful shutdown) with a slow turn running and more
    messages waiting: webhooks get 503 + Retry-After, /readyz 503, the turn in flight finishes and
    its reply goes out, and b takes the rest at once (`free`), long before any lease or sweep."""
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "slow.yaml").write_text(
        'flow: slow\nstates:\n  start:\n    routes:\n      - do: [{wait: 400ms}, {reply: "re {{ message.text }}"}]\n'
    )
    async with fake_platform() as (platform, fake):
        a_cfg = cluster_config(store_url, platform.url, flows, "a", 30)
        b_cfg = cluster_config(store_url, platform.url, flows, "b", 30)
        a_app = create_app(a_cfg)
        async with Server(a_app) as a, running(b_cfg) as (_b, b_services):
            a_services: Services = a_app.state.services
            for n in range(1, 5):
                r = await client.post(f"{a.url}/webhooks/myapp", json=message(n))
                assert r.status_code == 200
            await asyncio.sleep(0.1)  # m-1's turn is running on a
            drain = asyncio.create_task(a_app.state.drain())
            await asyncio.sleep(0.05)
            r = await client.post(f"{a.url}/webhooks/myapp", json=message(5))
            assert r.status_code == 503 and r.headers["retry-after"] == "5"
            assert (await client.get(f"{a.url}/readyz")).status_code == 503
            await asyncio.wait_for(drain, 5)
            assert not a_services.dispatcher.holds(KEY)
            assert a_services.dispatcher.stats["handed_back"] == 1
            await fake.wait_for(lambda: len(fake.delivered()) == 4, timeout=10)
            assert [c.body["reply_to"] for c in fake.delivered()] == ["m-1", "m-2", "m-3", "m-4"]
            assert b_services.dispatcher.stats["taken_free"] >= 1
            conv = await b_services.store.conversation(KEY)
            assert conv is not None and conv["lease"]["owner"] in (None, b_services.dispatcher.owner)


# -- delivery fencing -----------------------------------------------------------------------------------


def slow_platform_app(calls: list[str], delay: float) -> Starlette:
    async def messages(request: Request) -> Response:
        body = await request.json()
        calls.append(body["text"])
        await asyncio.sleep(delay)
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/messages", messages, methods=["POST"])])


async def test_an_outbox_send_never_outlives_the_lease(store: Store, echo_flows: Path) -> None:
    """The outbox asks the fence before each send and cuts a send off before the lease would end:
    a fence that says "not yours" sends nothing; a send slower than the lease left is abandoned
    (the row stays pending for the next holder, with its Idempotency-Key)."""
    calls: list[str] = []
    async with Server(slow_platform_app(calls, 1.5)) as server, httpx.AsyncClient() as http:
        settings = generic_config(store.url, server.url, echo_flows)
        platform = PLATFORM_TYPES["generic"]("myapp", settings.platforms["myapp"], http)
        lease = await store.claim(KEY, "myapp", "c-1", "a", 30)
        assert lease is not None
        items = [
            (Outgoing("message", "c-1", reply=Reply(f"r{i}"), reply_to="m-1"), idempotency_key("myapp", "m-1", i))
            for i in range(2)
        ]
        await store.commit_turn(lease, [], lease.state, items)
        outbox = Outbox(store, settings.outbox, Metrics())

        async def not_ours() -> float:
            raise LeaseLost(KEY)

        with pytest.raises(LeaseLost):
            await outbox.drain(KEY, platform, not_ours)
        assert calls == []

        async def short() -> float:
            return 0.9  # less than the platform's 1.5 s answer

        started = time.monotonic()
        with pytest.raises(LeaseLost):
            await outbox.drain(KEY, platform, short)
        assert time.monotonic() - started < 1.2, "cut off before the lease would end"
        assert calls == ["r0"]
        pending = await store.due_outbox(KEY)
        assert [p.item.reply.text for p in pending if p.item.reply] == ["r0", "r1"]

        async def plenty() -> float:
            return 30.0

        assert await outbox.drain(KEY, platform, plenty) is None
        assert calls == ["r0", "r0", "r1"]
        assert await store.due_outbox(KEY) == []
        released: Lease = lease
        assert await store.release(released)


# -- what else crosses nodes: hot reload, live events ---------------------------------------------------


async def test_a_reload_on_one_node_and_a_turn_on_another_reach_every_node(
    store_url: str, echo_flows: Path, client: httpx.AsyncClient
) -> None:
    """`POST /api/v1/flows/reload` on node a swaps the flows of node b too; a turn node b runs is
    a live event on node a's hub (the agent inbox's stream there shows it)."""
    async with fake_platform() as (platform, fake):
        extra = "admin: {token: t0k}\n"
        a_cfg = cluster_config(store_url, platform.url, echo_flows, "a", 30).model_copy(
            update={"admin": generic_config(store_url, platform.url, echo_flows, extra).admin}
        )
        b_cfg = cluster_config(store_url, platform.url, echo_flows, "b", 30)
        a_app, b_app = create_app(a_cfg), create_app(b_cfg)
        async with Server(a_app) as a, Server(b_app) as b:
            page_on_a = a_app.state.hub.subscribe(["conversation:myapp:c-9"])
            r = await client.post(f"{b.url}/webhooks/myapp", json=message(1, "c-9"))
            assert r.status_code == 200
            event = await page_on_a.next(5)
            assert event is not None and event.kind == "turn" and event.data["conversation"] == "myapp:c-9"
            page_on_a.close()

            (echo_flows / "echo.yaml").write_text(
                'flow: echo\nstates:\n  start:\n    routes:\n      - do: [{reply: "v2 {{ message.text }}"}]\n'
            )
            started = time.monotonic()
            r = await client.post(f"{a.url}/api/v1/flows/reload", headers={"Authorization": "Bearer t0k"})
            assert r.status_code == 200 and r.json()["reloaded"], r.text
            b_reloader = b_app.state.reloader
            while b_reloader.generation < 1:
                assert time.monotonic() - started < 5, "node b did not reload"
                await asyncio.sleep(0.02)
            followed = time.monotonic() - started
            assert b_reloader.digest == a_app.state.reloader.digest
            await client.post(f"{b.url}/webhooks/myapp", json=message(2, "c-8"))
            await fake.wait_for(lambda: any(c.body.get("text") == "v2 hello 2" for c in fake.delivered()), 10)
            print(f"\nnode b reloaded {followed * 1000:.0f} ms after node a's reload")
