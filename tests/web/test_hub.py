"""The in-process live-event hub: delivery by topic, replay after a reconnect, resync, overflow, close."""

from __future__ import annotations

import asyncio

from middleware.hub import RESYNC, LocalHub


async def test_subscribers_get_the_events_of_their_topics_only_in_order() -> None:
    hub = LocalHub()
    both = hub.subscribe(["a", "b"])
    only_b = hub.subscribe(["b"])
    hub.publish("a", {"kind": "x", "n": 1})
    hub.publish("c", {"kind": "x", "n": 2})
    hub.publish("b", {"kind": "x", "n": 3})
    got = [await both.next(1), await both.next(1)]
    assert [e.data["n"] for e in got if e] == [1, 3]
    first = await only_b.next(1)
    assert first is not None and first.data["n"] == 3 and first.topic == "b"
    assert await only_b.next(0.05) is None  # nothing more: a timeout, not the end
    assert not only_b.closed


async def test_a_waiting_subscriber_wakes_when_an_event_comes() -> None:
    hub = LocalHub()
    sub = hub.subscribe(["t"])
    waiter = asyncio.create_task(sub.next(5))
    await asyncio.sleep(0.01)
    hub.publish("t", {"kind": "turn"})
    event = await asyncio.wait_for(waiter, 1)
    assert event is not None and event.kind == "turn"


async def test_a_reconnect_with_last_event_id_replays_what_it_missed() -> None:
    hub = LocalHub()
    sub = hub.subscribe(["t"])
    hub.publish("t", {"kind": "x", "n": 1})
    seen = await sub.next(1)
    assert seen is not None
    sub.close()
    assert hub.subscribers("t") == 0
    hub.publish("t", {"kind": "x", "n": 2})
    hub.publish("other", {"kind": "x", "n": 99})
    hub.publish("t", {"kind": "x", "n": 3})
    again = hub.subscribe(["t"], last_event_id=seen.id)
    replayed = [await again.next(1), await again.next(1)]
    assert [e.data["n"] for e in replayed if e] == [2, 3]
    assert await again.next(0.05) is None


async def test_a_stale_or_foreign_last_event_id_gets_one_resync() -> None:
    hub = LocalHub(backlog=2)
    for n in range(5):
        hub.publish("t", {"kind": "x", "n": n})
    gone = hub.subscribe(["t"], last_event_id=f"{hub.epoch}.1")  # its successors left the backlog
    event = await gone.next(1)
    assert event is not None and event.kind == RESYNC
    other_process = hub.subscribe(["t"], last_event_id="someone-else.3")
    event = await other_process.next(1)
    assert event is not None and event.kind == RESYNC


async def test_a_slow_reader_is_told_to_resync_instead_of_growing_without_bound() -> None:
    hub = LocalHub(queue_size=3)
    sub = hub.subscribe(["t"])
    for n in range(10):
        hub.publish("t", {"kind": "x", "n": n})
    event = await sub.next(1)
    assert event is not None and event.kind == RESYNC
    assert await sub.next(0.05) is None  # the backlog of the slow reader was dropped
    hub.publish("t", {"kind": "x", "n": 10})
    event = await sub.next(1)
    assert event is not None and event.data["n"] == 10


async def test_close_ends_every_subscription_at_once() -> None:
    hub = LocalHub()
    sub = hub.subscribe(["t"])
    waiter = asyncio.create_task(sub.next(30))
    await asyncio.sleep(0.01)
    hub.close()
    assert await asyncio.wait_for(waiter, 1) is None
    assert sub.closed
    late = hub.subscribe(["t"])
    assert late.closed
    hub.publish("t", {"kind": "x"})  # after close: dropped, no error


async def test_forgotten_topics_are_bounded_and_resync_a_reconnect() -> None:
    hub = LocalHub(topics_kept=2)
    sub = hub.subscribe(["old"])
    hub.publish("old", {"kind": "x"})
    first = await sub.next(1)
    assert first is not None
    sub.close()
    hub.publish("old", {"kind": "x", "n": 2})
    watchers = [hub.subscribe([topic]) for topic in ("t1", "t2", "t3")]  # watched topics take the slots
    for topic in ("t1", "t2", "t3"):
        hub.publish(topic, {"kind": "x"})
    again = hub.subscribe(["old"], last_event_id=first.id)
    event = await again.next(1)
    assert event is not None and event.kind == RESYNC
    for watcher in watchers:
        watcher.close()


async def test_topics_nobody_watches_keep_no_backlog_and_a_reconnect_to_one_resyncs() -> None:
    hub = LocalHub()
    sub = hub.subscribe(["watched"])
    hub.publish("watched", {"kind": "x", "n": 1})
    seen = await sub.next(1)
    assert seen is not None
    for n in range(100):  # every conversation's turns: none of it kept
        hub.publish(f"conversation:{n}", {"kind": "turn"})
    assert list(hub._recent) == ["watched"]
    late = hub.subscribe(["conversation:7"], last_event_id=seen.id)  # it may have missed turns
    event = await late.next(1)
    assert event is not None and event.kind == RESYNC
    hub.publish("conversation:7", {"kind": "turn", "n": 2})  # watched now: delivered and kept
    event = await late.next(1)
    assert event is not None and event.data["n"] == 2
    late.close()
    hub.publish("conversation:7", {"kind": "turn", "n": 3})
    back = hub.subscribe(["conversation:7"], last_event_id=event.id)  # a reconnect replays exactly
    replayed = await back.next(1)
    assert replayed is not None and replayed.data["n"] == 3
    assert await back.next(0.05) is None
