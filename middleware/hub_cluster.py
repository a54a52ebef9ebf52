"""The live-event hub across nodes: `ClusterHub` is a `Hub` (middleware/hub.py) that also carries
events over the notify bus (middleware/notify.py, channel `hub`) to the nodes that want them, so an
agent whose inbox page streams from node 1 sees the message node 2 took in.

Each node keeps its own `LocalHub` for its subscribers: an event published here goes to them at
once, and to the bus only when another node has a live subscriber for its topic; an event from
another node is published into the local hub on arrival (with a local event id, so `Last-Event-ID`
replay works against the node the browser reconnects to, and a reconnect to another node gets the
`resync` the hub already sends for foreign ids). Most topics (a conversation's turns) have no
watcher anywhere, and sending them would cost every node work (a NOTIFY in the store's commit, a
JSON parse on every other node) for every turn of the cluster.

Interest (channel `hub_interest`): a node announces the topics of a subscription when it opens,
re-announces all its live topics every `refresh` seconds, and the others forward a topic's events
for `ttl` seconds after hearing of it (so a closed page stops costing after at most `ttl`).
`{"ask": true}` makes every node re-announce: a node sends it when it starts using the bus and
after a reconnect, and forwards everything for a moment (`2 * settle`) while the answers arrive.
An event published elsewhere between a subscription opening and its announcement arriving is
not forwarded: the new subscription gets a `resync` `settle` seconds after it opened (its page
reloads what it shows), which covers it.

An event too large for one signal (`notify.MAX_PAYLOAD`) crosses as a `resync` for its topic: the
pages on other nodes reload what they show. Signals lost while the bus reconnects are covered the
same way: once the reconnected node has re-announced its interest (`settle` seconds later), every
local subscriber gets a `resync`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any

from middleware.hub import RESYNC, LocalHub, Subscription
from middleware.notify import MAX_PAYLOAD, Bus, Signal

log = logging.getLogger("switchboard.hub")

CHANNEL = "hub"
#: where nodes say which topics they have subscribers for (and ask each other to say it again)
INTEREST = "hub_interest"

#: how long another node's interest in a topic lasts unless renewed (seconds)
INTEREST_TTL = 60.0
#: how often a node re-announces its live topics (well under the TTL: two renewals may be lost)
REFRESH_SECONDS = 20.0
#: how long an announcement may take to reach the other nodes: a new subscription's resync comes
#: this long after it opened; after an ask, every event is forwarded for twice this long
SETTLE_SECONDS = 0.5


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


class ClusterHub:
    def __init__(
        self,
        local: LocalHub,
        bus: Bus,
        *,
        ttl: float = INTEREST_TTL,
        refresh: float = REFRESH_SECONDS,
        settle: float = SETTLE_SECONDS,
    ) -> None:
        self.local = local
        self.bus = bus
        self.ttl = ttl
        self.refresh = refresh
        self.settle = settle
        #: events sent on the bus; events not sent (no other node wanted their topic)
        self.sent = 0
        self.withheld = 0
        self.received = 0
        #: interest signals sent (announcements and asks)
        self.announced = 0
        self._tasks: set[asyncio.Task[bool]] = set()
        #: open subscriptions and their topics (forgotten with them)
        self._live: weakref.WeakKeyDictionary[Subscription, tuple[str, ...]] = weakref.WeakKeyDictionary()
        #: topics other nodes have subscribers for -> when that expires (time.monotonic())
        self._remote: dict[str, float] = {}
        #: until then every event is forwarded (the answers to our ask are on their way)
        self._forward_all_until = 0.0
        self._started = False  # asked the other nodes for their interest once the bus could carry it
        self._closed = False
        self._tick_handle: asyncio.TimerHandle | None = None
        self._timers: set[asyncio.TimerHandle] = set()
        self._unsubscribe = bus.subscribe(CHANNEL, self._on_signal)
        self._unsubscribe_interest = bus.subscribe(INTEREST, self._on_interest)
        bus.on_reconnect(self._on_reconnect)
        self._kick()

    # -- the Hub interface ---------------------------------------------------------------------------

    def publish(self, topic: str, data: dict[str, Any]) -> None:
        self.local.publish(topic, data)
        if self.local.closed or self.bus.alone:  # no other node to tell
            return
        if not self._started:
            self._kick()
        if not self._wanted(topic):
            self.withheld += 1
            return
        payload = _dumps({"t": topic, "d": data})
        if len(payload.encode()) > MAX_PAYLOAD:
            payload = _dumps({"t": topic, "d": {"kind": RESYNC}})
        self.sent += 1
        self._spawn(self.bus.publish(CHANNEL, payload))

    def subscribe(self, topics: Iterable[str], last_event_id: str | None = None) -> Subscription:
        wanted = tuple(topics)
        subscription = self.local.subscribe(wanted, last_event_id)
        self._live[subscription] = wanted
        if subscription.closed or self.bus.alone:
            return subscription
        if not self._kick():  # (a first kick announced every live topic, these included)
            self._announce(wanted)
        # what another node published before our announcement reached it was not sent: reload then
        ref = weakref.ref(subscription)
        self._later(self.settle, lambda: self._resync_one(ref))
        return subscription

    def subscribers(self, topic: str) -> int:
        return self.local.subscribers(topic)

    def close(self) -> None:
        self._closed = True
        self._unsubscribe()
        self._unsubscribe_interest()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        self.local.close()

    # -- interest --------------------------------------------------------------------------------------

    def wanted_remotely(self) -> set[str]:
        """The topics another node has (unexpired) interest in."""
        now = time.monotonic()
        return {topic for topic, until in self._remote.items() if until > now}

    def _wanted(self, topic: str) -> bool:
        now = time.monotonic()
        if now < self._forward_all_until:
            return True
        until = self._remote.get(topic)
        if until is None:
            return False
        if until <= now:
            del self._remote[topic]
            return False
        return True

    def _live_topics(self) -> list[str]:
        return sorted({t for sub, wanted in list(self._live.items()) if not sub.closed for t in wanted})

    def _announce(self, topics: Iterable[str]) -> None:
        for payload in self._announcements(topics):
            self.announced += 1
            self._spawn(self.bus.publish(INTEREST, payload))

    def _announcements(self, topics: Iterable[str]) -> Iterator[str]:
        """`{"w": [topics], "ttl": seconds}` signals, as many as it takes to stay under MAX_PAYLOAD."""
        tail = _dumps({"ttl": self.ttl})
        overhead = len(b'{"w":[],') + len(tail.encode()) - 1  # the braces of `tail` less one
        batch: list[str] = []
        size = overhead
        for topic in dict.fromkeys(topics):
            cost = len(_dumps(topic).encode())
            if overhead + cost > MAX_PAYLOAD:
                log.warning("hub topic too long to announce: %.80s", topic)
                continue
            if batch and size + 1 + cost > MAX_PAYLOAD:
                yield _dumps({"w": batch, "ttl": self.ttl})
                batch, size = [], overhead
            size += cost + (1 if batch else 0)
            batch.append(topic)
        if batch:
            yield _dumps({"w": batch, "ttl": self.ttl})

    def _ask(self) -> None:
        """Ask the other nodes to announce their topics; forward everything until they have."""
        self._forward_all_until = time.monotonic() + 2 * self.settle
        self.announced += 1
        self._spawn(self.bus.publish(INTEREST, _dumps({"ask": True})))

    def _on_interest(self, signal: Signal) -> None:
        if signal.mine(self.bus) or self._closed:
            return
        try:
            message = json.loads(signal.payload)
            if not isinstance(message, dict):
                raise TypeError
            if message.get("ask"):
                self._announce(self._live_topics())
                return
            topics = [str(t) for t in message["w"]]
            ttl = float(message.get("ttl", self.ttl))
        except (ValueError, KeyError, TypeError):
            log.warning("malformed hub interest signal dropped")
            return
        until = time.monotonic() + max(0.0, ttl)
        for topic in topics:
            if self._remote.get(topic, 0.0) < until:
                self._remote[topic] = until

    def _kick(self) -> bool:
        """Once the bus can carry signals to others: ask them for their interest, announce ours
        (True when it did that now), and keep the periodic re-announcement going."""
        if self._closed:
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop yet (made outside one) or any more: the next call does it
            return False
        if self._tick_handle is None:
            self._tick_handle = loop.call_later(self.refresh, self._tick)
        if self._started or not self.bus.connected or self.bus.alone:
            return False
        self._started = True
        self._ask()
        self._announce(self._live_topics())
        return True

    def _tick(self) -> None:
        self._tick_handle = None
        if self._closed:
            return
        now = time.monotonic()
        for topic in [t for t, until in self._remote.items() if until <= now]:
            del self._remote[topic]
        # schedules the next tick; the first time it can, it announces everything itself
        if not self._kick() and self._started and not self.bus.alone:
            self._announce(self._live_topics())

    def _resync_one(self, ref: weakref.ref[Subscription]) -> None:
        subscription = ref()
        if subscription is not None and not subscription.closed:
            self.local.resync(subscription)

    # -- the bus -----------------------------------------------------------------------------------------

    def _on_signal(self, signal: Signal) -> None:
        if signal.mine(self.bus) or self.local.closed:
            return
        try:
            message = json.loads(signal.payload)
            topic, data = str(message["t"]), message["d"]
        except (ValueError, KeyError, TypeError):
            log.warning("malformed hub signal dropped")
            return
        if not isinstance(data, dict):
            return
        # published here even without subscribers now: a page reconnecting with Last-Event-ID gets it
        self.received += 1
        self.local.publish(topic, data)

    def _on_reconnect(self) -> None:
        """Signals may have been missed both ways: tell the others our topics again and ask for
        theirs; once ours have arrived, every page here reloads once."""
        if self._closed:
            return
        self._started = False
        self._kick()
        self._later(self.settle, self._resync_all)

    def _resync_all(self) -> None:
        for topic in self._live_topics():
            self.local.publish(topic, {"kind": RESYNC})

    def _later(self, delay: float, callback: Callable[[], None]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        def run() -> None:
            self._timers.discard(handle)
            if not self._closed:
                callback()

        handle = loop.call_later(delay, run)
        self._timers.add(handle)

    def _spawn(self, coro: Coroutine[Any, Any, bool]) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop (a publish at interpreter exit): local subscribers had it
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


__all__ = ["CHANNEL", "INTEREST", "ClusterHub"]
