"""Live events for the browser pages: a small publish/subscribe hub keyed by topic.

The agent inbox and the playground show what happens in a conversation as it happens: a turn
was stored (TurnRunner.observers), a reply reached the playground platform, the owner changed.
Producers call `publish(topic, data)` (synchronously, from the event loop: observers are plain
callables); each server-sent-events response holds one `Subscription` to the topics it shows.

`LocalHub` is the in-process implementation: events reach the subscribers of this process only;
`ClusterHub` (middleware/hub_cluster.py) carries them between nodes behind the same interface.

Events carry ids (`<hub epoch>.<n>`) so a reconnecting EventSource can send `Last-Event-ID` and get
what it missed from a short per-topic backlog; when that is not possible (the backlog moved on,
another process, a restart), the subscriber gets one `resync` event and reloads what it shows.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

#: the `kind` of the event a subscriber gets when it missed events and must reload its view
RESYNC = "resync"


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    topic: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return str(self.data.get("kind", "message"))


class Subscription(Protocol):
    async def next(self, wait: float) -> Event | None:
        """The next event; None when `wait` seconds passed without one, or when the hub closed
        (then `closed` is True)."""
        ...

    @property
    def closed(self) -> bool: ...

    def close(self) -> None: ...


class Hub(Protocol):
    def publish(self, topic: str, data: dict[str, Any]) -> None:
        """Send `data` (JSON-able, with a `kind`) to the topic's subscribers; never blocks."""
        ...

    def subscribe(self, topics: Iterable[str], last_event_id: str | None = None) -> Subscription:
        """Subscribe to topics; with `last_event_id`, first replay what came after it (or a resync)."""
        ...

    def close(self) -> None:
        """End every subscription (shutdown): their streams finish at once."""
        ...


class _LocalSubscription:
    def __init__(self, hub: LocalHub, topics: tuple[str, ...], queue_size: int) -> None:
        self.hub = hub
        self.topics = topics
        self.queue: asyncio.Queue[Event] = asyncio.Queue(queue_size)
        self.overflowed = False
        self._closed = False
        self._wake = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self._closed

    def offer(self, event: Event) -> None:
        if self._closed:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True  # a slow reader: drop, and tell it to reload once it catches up
        self._wake.set()

    async def next(self, wait: float) -> Event | None:
        if self._closed:
            return None
        if self.overflowed:
            self.overflowed = False
            while not self.queue.empty():
                self.queue.get_nowait()
            return self.hub.resync_event()
        if self.queue.empty():
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                return None
            if self._closed:
                return None
            if self.overflowed:
                return await self.next(wait)
        return self.queue.get_nowait() if not self.queue.empty() else None

    def end(self) -> None:
        self._closed = True
        self._wake.set()

    def close(self) -> None:
        if not self._closed:
            self.end()
        self.hub.forget(self)


class LocalHub:
    """The in-process hub: subscribers of this process only, with a short backlog per topic."""

    def __init__(self, backlog: int = 64, topics_kept: int = 2000, queue_size: int = 256) -> None:
        self.epoch = secrets.token_hex(4)
        self.backlog = backlog
        self.topics_kept = topics_kept
        self.queue_size = queue_size
        self._ids = itertools.count(1)
        #: the last event id given out
        self._last = 0
        self._subscribers: dict[str, set[_LocalSubscription]] = {}
        #: topic -> (highest id dropped from its backlog, recent events)
        self._recent: OrderedDict[str, tuple[int, deque[tuple[int, Event]]]] = OrderedDict()
        #: the newest event id not kept in any backlog (a topic's backlog dropped to keep `topics_kept`,
        #: or an event on a topic nobody watched): a reconnect from before it, on a topic without a
        #: backlog, resyncs
        self._forgotten = 0
        self.closed = False

    def publish(self, topic: str, data: dict[str, Any]) -> None:
        if self.closed:
            return
        n = self._last = next(self._ids)
        kept = self._recent.pop(topic, None)
        if kept is None:
            if topic not in self._subscribers:
                # nobody watches it, nor did lately: nothing to deliver, and no backlog kept for every
                # conversation a turn runs in; a reconnect that names an older id is told to resync
                self._forgotten = n
                return
            kept = (n - 1, deque())  # its backlog was forgotten: what came before is unknown
        event = Event(f"{self.epoch}.{n}", topic, data)
        dropped, recent = kept
        if len(recent) >= self.backlog:
            dropped = recent.popleft()[0]
        recent.append((n, event))
        self._recent[topic] = (dropped, recent)
        while len(self._recent) > self.topics_kept:
            self._forget_oldest()
        for subscriber in list(self._subscribers.get(topic, ())):
            subscriber.offer(event)

    def _forget_oldest(self) -> None:
        _, (dropped, gone) = self._recent.popitem(last=False)
        self._forgotten = max(self._forgotten, gone[-1][0] if gone else dropped)

    def subscribe(self, topics: Iterable[str], last_event_id: str | None = None) -> Subscription:
        wanted = tuple(dict.fromkeys(topics))
        sub = _LocalSubscription(self, wanted, self.queue_size)
        if self.closed:
            sub.end()
            return sub
        for topic in wanted:
            self._subscribers.setdefault(topic, set()).add(sub)
            if topic not in self._recent:  # its backlog starts now: a reconnect can replay from here
                self._recent[topic] = (self._last, deque())
        while len(self._recent) > self.topics_kept:
            self._forget_oldest()
        if last_event_id:
            self._replay(sub, last_event_id)
        return sub

    def _replay(self, sub: _LocalSubscription, last_event_id: str) -> None:
        epoch, _, raw = last_event_id.partition(".")
        if epoch != self.epoch or not raw.isdigit():
            sub.offer(self.resync_event())
            return
        after = int(raw)
        missed: list[tuple[int, Event]] = []
        for topic in sub.topics:
            dropped, recent = self._recent.get(topic, (None, deque()))
            if dropped is None:
                if after < self._forgotten:  # it may have had events whose backlog is gone
                    sub.offer(self.resync_event())
                    return
                continue  # nothing was published on it since
            if dropped > after:
                sub.offer(self.resync_event())
                return
            missed += [(n, e) for n, e in recent if n > after]
        for _, event in sorted(missed, key=lambda pair: pair[0]):
            sub.offer(event)

    def resync_event(self) -> Event:
        self._last = next(self._ids)
        return Event(f"{self.epoch}.{self._last}", "", {"kind": RESYNC})

    def resync(self, sub: Subscription) -> None:
        """Tell one subscription (of this hub, still open) to reload what it shows."""
        if isinstance(sub, _LocalSubscription) and sub.hub is self:
            sub.offer(self.resync_event())

    def forget(self, sub: _LocalSubscription) -> None:
        for topic in sub.topics:
            subs = self._subscribers.get(topic)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subscribers[topic]

    def subscribers(self, topic: str) -> int:
        return len(self._subscribers.get(topic, ()))

    def close(self) -> None:
        self.closed = True
        for subs in list(self._subscribers.values()):
            for sub in list(subs):
                sub.end()
        self._subscribers.clear()


def conversation_topic(key: str) -> str:
    """Everything that happens in one conversation (turns, owner changes): the inbox's transcript view."""
    return f"conversation:{key}"


#: handed-off conversations changed (queued, claimed, given back): the inbox's queue view
INBOX_TOPIC = "inbox"


def playground_topic(key: str) -> str:
    """What the playground's browser shows for one conversation: replies, typing, read, traces."""
    return f"playground:{key}"
