"""The spine (webhook in, reply out) under load, duplicates, slow turns, outages and broken templates.

Everything runs for real: Switchboard and a fake platform on 127.0.0.1 ports in the test's loop,
the store on SQLite or PostgreSQL; nothing of ours is patched. Assertions read what the fake
platform received (`fake.calls`), what the webhooks answered, `/metrics`, and the admin API.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_aiohttp import AiohttpTransport
from prometheus_client.parser import text_string_to_metric_families

from middleware.services import Services
from tests.conftest import fake_platform, generic_config, message, running
from tests.fakes.platform import Call, FakePlatform

TOKEN = "spine-admin-token"
FAST_OUTBOX = """\
outbox: {backoff_base: 0.05, backoff_max: 0.5}
admin: {token: spine-admin-token}
"""


@pytest.fixture
async def wide_client() -> AsyncIterator[httpx.AsyncClient]:
    """A client allowed 64 connections; the tests bound what is in flight with a semaphore.

    httpx's API over aiohttp's pool, as the middleware does (middleware/app.py, make_http_client):
    httpx's own pool spends most of the load test's CPU in its bookkeeping.
    """
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(transport=AiohttpTransport(limits=limits), timeout=30) as c:
        yield c


# -- helpers -------------------------------------------------------------------------------------


def replies_by_conversation(calls: Iterable[Call]) -> dict[str, list[str]]:
    """reply_to of each delivered reply, per conversation, in arrival order."""
    out: dict[str, list[str]] = defaultdict(list)
    for call in calls:
        out[call.body["conversation_id"]].append(call.body["reply_to"])
    return dict(out)


def assert_exactly_once_in_order(fake: FakePlatform, sent: dict[str, list[str]]) -> None:
    """One reply per sent message (by Idempotency-Key), reply_to set, per conversation in sending order."""
    delivered = fake.delivered()
    keys = [c.headers["idempotency-key"] for c in delivered]
    assert all(keys), "every post-message call carries an Idempotency-Key"
    assert len(keys) == len(set(keys))
    every = [m for ids in sent.values() for m in ids]
    got = Counter(c.body["reply_to"] for c in delivered)
    missing = [m for m in every if got[m] == 0]
    doubled = {m: n for m, n in got.items() if n != 1}
    assert not missing, f"{len(missing)} messages got no reply, e.g. {missing[:5]}"
    assert not doubled, f"messages answered more than once: {dict(list(doubled.items())[:5])}"
    assert set(got) == set(every)
    assert replies_by_conversation(delivered) == sent


async def settle(services: Services, conversations: Iterable[str]) -> None:
    """Wait (30 s at most) until this node has nothing running or waiting for these conversations."""
    keys = [f"myapp:{c}" for c in conversations]
    await asyncio.wait_for(asyncio.gather(*(services.dispatcher.settled(k) for k in keys)), 30)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text -> {(sample name, labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of every sample of `name` whose labels include `labels` (0 when there is none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in parsed.items() if n == name and want <= ls)


async def get_metrics(client: httpx.AsyncClient, url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = await client.get(f"{url}/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return samples(r.text)


async def send_in_order(
    client: httpx.AsyncClient, url: str, conversation: str, texts: list[str], prefix: str
) -> list[str]:
    """Send one conversation's messages one after the other; returns their ids."""
    ids = []
    for i, text in enumerate(texts):
        msg = message(f"{prefix}-{conversation}-{i}", conversation, text=text)
        r = await client.post(f"{url}/webhooks/myapp", json=msg)
        assert r.status_code == 200, r.text
        assert r.json() == {"accepted": 1, "duplicates": 0}
        ids.append(msg["message_id"])
    return ids


# -- 1. many conversations, every message delivered four times --------------------------------

CONVERSATIONS = 50
PER_CONVERSATION = 10
IN_FLIGHT = 48
REDELIVERERS = 16
#: deliveries of every message: the original and three duplicates
COPIES = 4


async def test_duplicates_under_load_one_reply_each_in_order(
    store_url: str, echo_flows: Path, wide_client: httpx.AsyncClient
) -> None:
    """500 messages over 50 conversations, each delivered 4 times: one reply each, in order."""
    rng = random.Random(20261128)
    async with fake_platform() as (platform_server, fake):
        settings = generic_config(store_url, platform_server.url, echo_flows)
        async with running(settings) as (server, services):
            url = f"{server.url}/webhooks/myapp"
            gate = asyncio.Semaphore(IN_FLIGHT)
            totals: Counter[str] = Counter()
            in_flight = 0
            peak = 0
            #: copies of accepted messages waiting to be delivered again, taken out in random order
            pool: list[dict[str, Any]] = []
            senders_done = asyncio.Event()
            sent: dict[str, list[str]] = {f"c-{c}": [] for c in range(CONVERSATIONS)}

            async def post(body: dict[str, Any] | list[dict[str, Any]]) -> dict[str, int]:
                nonlocal in_flight, peak
                async with gate:
                    in_flight += 1
                    peak = max(peak, in_flight)
                    try:
                        r = await wide_client.post(url, json=body)
                    finally:
                        in_flight -= 1
                assert r.status_code == 200, r.text
                answer: dict[str, int] = r.json()
                assert set(answer) == {"accepted", "duplicates"}
                assert answer["accepted"] + answer["duplicates"] == (len(body) if isinstance(body, list) else 1)
                totals["accepted"] += answer["accepted"]
                totals["duplicates"] += answer["duplicates"]
                totals["requests"] += 1
                totals["arrays"] += isinstance(body, list)
                return answer

            def take(n: int) -> list[dict[str, Any]]:
                return [pool.pop(rng.randrange(len(pool))) for _ in range(min(n, len(pool)))]

            async def conversation(c: int) -> None:
                conv = f"c-{c}"
                msgs = [message(f"{c}-{k}", conv, text=f"hello {c}-{k}") for k in range(PER_CONVERSATION)]
                k = 0
                while k < len(msgs):
                    # The next message goes only after the previous one is in the store (a 200 for any of
                    # its copies means that), so the order the middleware accepts them in is the sending
                    # order. The first copies go in one of several shapes; the rest join the pool.
                    msg = msgs[k]
                    bodies: list[dict[str, Any] | list[dict[str, Any]]]
                    group = [msg]
                    roll = rng.random()
                    if roll < 0.1 and k + 1 < len(msgs):
                        group = [msg, msgs[k + 1]]
                        bodies = [group, msg]  # two new messages in order in one array, racing a copy of the first
                    elif roll < 0.3:
                        mixed = [*take(rng.randint(1, 4)), msg]  # among re-deliveries of other messages
                        rng.shuffle(mixed)
                        bodies = [mixed, msg]
                    elif roll < 0.4:
                        bodies = [[msg], msg]  # an array of one, racing a plain copy
                    elif roll < 0.5:
                        bodies = [[msg, msg]]  # the same new message twice in one array
                    else:
                        bodies = [msg, msg]  # two plain copies racing each other
                    answers = await asyncio.gather(*(post(b) for b in bodies))
                    assert sum(a["accepted"] for a in answers) == len(group), (bodies, answers)
                    flat = [m for b in bodies for m in (b if isinstance(b, list) else [b])]
                    for m in group:
                        sent[conv].append(m["message_id"])
                        pool.extend([m] * (COPIES - sum(x is m for x in flat)))
                    k += len(group)

            async def redeliver() -> None:
                while True:
                    if not pool:
                        if senders_done.is_set():
                            return
                        await asyncio.sleep(0.005)
                        continue
                    batch = take(rng.choice((1, 1, 1, 2, 3, 5)))
                    body: dict[str, Any] | list[dict[str, Any]] = batch[0] if len(batch) == 1 else batch
                    answer = await post(body)
                    assert answer == {"accepted": 0, "duplicates": len(batch)}, (body, answer)

            async def senders() -> None:
                await asyncio.gather(*(conversation(c) for c in range(CONVERSATIONS)))
                senders_done.set()

            started = time.monotonic()
            await asyncio.wait_for(asyncio.gather(senders(), *(redeliver() for _ in range(REDELIVERERS))), 90)
            sending = time.monotonic() - started
            total = CONVERSATIONS * PER_CONVERSATION
            assert totals["accepted"] == total
            assert totals["duplicates"] == (COPIES - 1) * total
            assert totals["arrays"] > 50, totals  # some deliveries came in JSON arrays
            assert peak > 16, f"only {peak} webhooks were in flight at once"

            await fake.wait_for(lambda: len(fake.delivered()) >= total, timeout=60)
            await fake.wait_for(lambda: len([c for c in fake.calls if c.path == "/read"]) >= total, timeout=30)
            await settle(services, sent)
            elapsed = time.monotonic() - started

            assert_exactly_once_in_order(fake, sent)
            for call in fake.delivered():
                mid = call.body["reply_to"]
                assert call.body["text"] == f"echo hello {mid.removeprefix('m-')}"
            # a healthy run re-sends nothing: no post-message call reused a key
            assert [c for c in fake.calls if c.path == "/messages" and c.repeat] == []
            reads = [c.body for c in fake.calls if c.path == "/read"]
            assert sorted(r["message_id"] for r in reads) == sorted(m for ids in sent.values() for m in ids)
            for conv in sent:
                typing = fake.typing(conv)
                assert not typing or typing[-1].body["typing"] is False, f"typing left on in {conv}"
            assert await services.store.outbox_counts() == {"pending": 0, "dead": 0, "retrying": 0}

            m = await get_metrics(wide_client, server.url)
            assert metric(m, "switchboard_webhooks_total", platform="myapp", result="accepted") == total
            assert metric(m, "switchboard_webhooks_total", platform="myapp", result="duplicate") == (COPIES - 1) * total
            assert metric(m, "switchboard_deliveries_total", kind="message", status="sent") == total
            # gauges read from the dispatcher when scraped
            assert m[("switchboard_backlog", frozenset())] == services.dispatcher.backlog == 0
            assert ("switchboard_active_conversations", frozenset()) in m
            print(
                f"{store_url.split(':')[0]}: {totals['requests']} webhooks, peak {peak} in flight,"
                f" sent in {sending:.1f}s, all replies in {elapsed:.1f}s"
            )


# -- 2. typing and read receipts ----------------------------------------------------------------


async def test_typing_lifecycle_and_read_receipts(tmp_path: Path, echo_flows: Path, client: httpx.AsyncClient) -> None:
    async with fake_platform() as (platform_server, fake):
        settings = generic_config(
            f"sqlite:///{tmp_path}/sb.db", platform_server.url, echo_flows, platform_keys={"typing_ttl": 1.0}
        )
        async with running(settings) as (server, services):
            t0 = time.monotonic()
            slow_ids, fast_ids = await asyncio.gather(
                send_in_order(client, server.url, "slow", ["slow one", "slow two"], "t"),
                send_in_order(client, server.url, "fast", ["quick one", "quick two", "quick three"], "t"),
            )
            total = len(slow_ids) + len(fast_ids)
            await fake.wait_for(lambda: len(fake.delivered()) == total, timeout=10)
            await settle(services, ["slow", "fast"])  # the outbox is drained: typing-offs went out too

            assert_exactly_once_in_order(fake, {"slow": slow_ids, "fast": fast_ids})

            # a fast turn shows no typing at all
            assert fake.typing("fast") == []

            # the slow conversation: per turn on (after the delay), refreshed within the TTL, off after the reply
            slow_calls = [
                c for c in fake.calls if c.body.get("conversation_id") == "slow" and c.path in ("/typing", "/messages")
            ]
            # split into turns: a turn's calls end with its typing-off
            turns: list[list[Call]] = [[]]
            for call in slow_calls:
                turns[-1].append(call)
                if call.path == "/typing" and call.body["typing"] is False:
                    turns.append([])
            assert turns.pop() == [], "calls after the last typing-off"
            shapes = [[(c.path, c.body.get("typing")) for c in turn] for turn in turns]
            assert len(turns) == 2, shapes
            turn_started = t0  # the first turn starts at once; the second right after the first's typing-off
            for turn, mid in zip(turns, slow_ids, strict=True):
                ons = [c for c in turn if c.path == "/typing" and c.body["typing"] is True]
                reply = [c for c in turn if c.path == "/messages"]
                off = [c for c in turn if c.path == "/typing" and c.body["typing"] is False]
                assert len(ons) >= 2, f"typing was not refreshed during a 1.6 s turn: {shapes}"
                assert len(reply) == 1 and reply[0].body["reply_to"] == mid, shapes
                assert len(off) == 1, shapes
                # order of arrival: on, refreshes, the reply, then off
                assert [c.path for c in turn] == ["/typing"] * len(ons) + ["/messages", "/typing"], shapes
                assert ons[-1].at <= reply[0].at <= off[0].at
                # on only after the typing delay (0.8 s)
                assert ons[0].at - turn_started >= 0.7, f"typing on {ons[0].at - turn_started:.3f}s into the turn"
                turn_started = off[0].at
                # refreshed within the platform's TTL (1 s)
                for a, b in itertools.pairwise(ons):
                    assert b.at - a.at < 1.0
                assert reply[0].at - ons[-1].at < 1.0
                # each typing call has its own key
                keys = [c.headers["idempotency-key"] for c in turn if c.path == "/typing"]
                assert len(set(keys)) == len(keys)
            # typing is never left on
            assert fake.typing("slow")[-1].body == {"conversation_id": "slow", "typing": False}

            # a read receipt for every message
            reads = [c.body for c in fake.calls if c.path == "/read"]
            assert sorted(reads, key=lambda b: b["message_id"]) == sorted(
                [{"conversation_id": "slow", "message_id": m} for m in slow_ids]
                + [{"conversation_id": "fast", "message_id": m} for m in fast_ids],
                key=lambda b: b["message_id"],
            )


# -- 3. platform outage, rate limit, dead letter -------------------------------------------------


async def test_outage_retries_in_order_and_dead_letters(
    store_url: str, echo_flows: Path, client: httpx.AsyncClient
) -> None:
    failures_503 = 6
    conversations = [f"o-{i}" for i in range(4)]
    per_conversation = 4
    async with fake_platform() as (platform_server, fake):
        fake.script = deque([(503, {})] * failures_503 + [(429, {"Retry-After": "1"})])
        settings = generic_config(store_url, platform_server.url, echo_flows, extra=FAST_OUTBOX)
        async with running(settings) as (server, services):
            before = await get_metrics(client, server.url)
            assert metric(before, "switchboard_outbox_retries_total") == 0

            ids = await asyncio.gather(
                *(
                    send_in_order(client, server.url, conv, [f"hi {i}" for i in range(per_conversation)], "o")
                    for conv in conversations
                )
            )
            sent = dict(zip(conversations, ids, strict=True))
            total = len(conversations) * per_conversation
            await fake.wait_for(lambda: len(fake.delivered()) == total, timeout=20)
            await settle(services, conversations)

            assert not fake.script, "every scripted failure was served"
            assert_exactly_once_in_order(fake, sent)
            assert [c for c in fake.calls if c.path == "/messages" and c.repeat] == [], "a reply was sent twice"
            failed = [c for c in fake.calls if c.path in ("/messages#503", "/messages#429")]
            assert len(failed) == failures_503 + 1
            delivered = {c.headers["idempotency-key"]: c for c in fake.delivered()}
            for call in failed:
                # the retry reused the failed call's key and carried the same reply
                key = call.headers["idempotency-key"]
                assert key in delivered, "a retried reply came with a new Idempotency-Key"
                assert delivered[key].body == call.body
            # the 429 said Retry-After: 1; its retry came no sooner
            (limited,) = [c for c in failed if c.path == "/messages#429"]
            retried = next(
                c
                for c in fake.calls
                if c.at > limited.at and c.headers["idempotency-key"] == limited.headers["idempotency-key"]
            )
            assert retried.at - limited.at >= 0.95, f"retried {retried.at - limited.at:.3f}s after a 429"

            during = await get_metrics(client, server.url)
            retries = failures_503 + 1
            assert metric(during, "switchboard_outbox_retries_total", platform="myapp") == retries
            assert metric(during, "switchboard_deliveries_total", kind="message", status="retry") == retries
            assert metric(during, "switchboard_deliveries_total", kind="message", status="sent") == total
            assert metric(during, "switchboard_deliveries_total", status="dead") == 0

            # a permanent refusal: dead-lettered once, never retried, and the conversation goes on
            fake.refuse_texts.add("echo poison")
            dead_ids = await send_in_order(client, server.url, "d-1", ["before", "poison", "after", "later"], "d")
            await fake.wait_for(
                lambda: sum(c.body["conversation_id"] == "d-1" for c in fake.delivered()) == 3, timeout=10
            )
            await settle(services, ["d-1"])
            d_replies = [c.body for c in fake.delivered() if c.body["conversation_id"] == "d-1"]
            assert [(b["reply_to"], b["text"]) for b in d_replies] == [
                (dead_ids[0], "echo before"),
                (dead_ids[2], "echo after"),
                (dead_ids[3], "echo later"),
            ]
            refused = [c for c in fake.calls if c.path == "/messages#refused"]
            assert len(refused) == 1, "a 400 must not be retried"

            r = await client.get(f"{server.url}/api/v1/outbox/dead")
            assert r.status_code == 401
            r = await client.get(f"{server.url}/api/v1/outbox/dead", headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200, r.text
            dead = r.json()["dead"]
            assert len(dead) == 1, dead
            assert dead[0]["conversation"] == "myapp:d-1"
            assert dead[0]["item"]["reply_to"] == dead_ids[1]
            assert dead[0]["item"]["reply"]["text"] == "echo poison"
            assert dead[0]["idempotency_key"] == refused[0].headers["idempotency-key"]
            assert dead[0]["attempts"] == 1

            after = await get_metrics(client, server.url)
            assert metric(after, "switchboard_deliveries_total", kind="message", status="dead") == 1
            assert metric(after, "switchboard_deliveries_total", kind="message", status="sent") == total + 3
            assert metric(after, "switchboard_outbox_retries_total") == retries
            assert metric(after, "switchboard_outbox", state="dead") == 1
            assert metric(after, "switchboard_outbox", state="pending") == 0


# -- 4. a template error at run time --------------------------------------------------------------


async def test_template_error_falls_back_and_conversation_continues(
    tmp_path: Path, echo_flows: Path, client: httpx.AsyncClient
) -> None:
    async with fake_platform() as (platform_server, fake):
        settings = generic_config(f"sqlite:///{tmp_path}/sb.db", platform_server.url, echo_flows)
        async with running(settings) as (server, services):
            ids = await send_in_order(client, server.url, "b-1", ["broken please", "hello again"], "b")
            await fake.wait_for(lambda: len(fake.delivered()) == 2, timeout=10)
            await settle(services, ["b-1"])
            assert [(c.body["reply_to"], c.body["text"]) for c in fake.delivered()] == [
                (ids[0], settings.fallback_reply),
                (ids[1], "echo hello again"),
            ]
            m = await get_metrics(client, server.url)
            assert metric(m, "switchboard_turn_failures_total", platform="myapp", reason="flow") == 1


# -- 5. health ------------------------------------------------------------------------------------


async def test_health_ready_metrics(tmp_path: Path, echo_flows: Path, client: httpx.AsyncClient) -> None:
    async with fake_platform() as (platform_server, fake):
        settings = generic_config(f"sqlite:///{tmp_path}/sb.db", platform_server.url, echo_flows)
        async with running(settings) as (server, _services):
            r = await client.get(f"{server.url}/healthz")
            assert r.status_code == 200
            assert r.json() == {"status": "ok"}
            r = await client.get(f"{server.url}/readyz")
            assert r.status_code == 200, r.text
            assert r.json()["ready"] is True
            assert r.json()["store"] == "ok"
            msg = message("h-1", "h")
            answers = [(await client.post(f"{server.url}/webhooks/myapp", json=msg)) for _ in range(2)]
            assert [(a.status_code, a.json()) for a in answers] == [
                (200, {"accepted": 1, "duplicates": 0}),
                (200, {"accepted": 0, "duplicates": 1}),
            ]
            m = await get_metrics(client, server.url)
            assert metric(m, "switchboard_webhooks_total", platform="myapp", result="accepted") == 1
            assert metric(m, "switchboard_webhooks_total", platform="myapp", result="duplicate") == 1
            await fake.wait_for(lambda: len(fake.delivered()) == 1, timeout=10)


async def test_the_backlog_resync_keeps_what_moved_while_the_store_counted(tmp_path: Path, echo_flows: Path) -> None:
    """The sweep sets the backlog to the store's count of pending messages; a message accepted or
    handled on this node while the store counted is not in that answer, so the count must not
    overwrite it (a stale count left the backlog gauge off until the next sweep)."""
    async with fake_platform() as (platform_server, _fake):
        settings = generic_config(f"sqlite:///{tmp_path}/sb.db", platform_server.url, echo_flows)
        async with running(settings) as (_server, services):
            dispatcher = services.dispatcher
            dispatcher.accepted(5)
            await dispatcher.resync_backlog()  # nothing moved meanwhile: the store's count (none pending)
            assert dispatcher.backlog == 0
            counting = asyncio.ensure_future(dispatcher.resync_backlog())
            await asyncio.sleep(0)  # the store is counting
            dispatcher.accepted(1)  # ...while a webhook's message is counted here
            await counting
            assert dispatcher.backlog == 1
            dispatcher.accepted(-1)
