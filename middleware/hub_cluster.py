"""The live-event hub across nodes: `ClusterHub` is a `Hub` (middleware/hub.py) that also carries
every event over the notify bus (middleware/notify.py, channel `hub`), so an agent whose inbox page
streams from node 1 sees the message node 2 took in.

Each node keeps its own `LocalHub` for its subscribers: an event published here goes to them at
once and to the bus; an event from another node is published into the local hub on arrival (with
a local event id, so `Last-Event-ID` replay works against the node the browser reconnects to, and
a reconnect to another node gets the `resync` the hub already sends for foreign ids).

An event too large for one signal (`notify.MAX_PAYLOAD`) crosses as a `resync` for its topic: the
pages on other nodes reload what they show. Signals lost while the bus reconnects are covered the
same way: after a reconnect every local subscriber gets a `resync`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import Coroutine, Iterable
from typing import Any

from middleware.hub import RESYNC, LocalHub, Subscription
from middleware.notify import MAX_PAYLOAD, Bus, Signal

log = logging.getLogger("switchboard.hub")

CHANNEL = "hub"


class ClusterHub:
    def __init__(self, local: LocalHub, bus: Bus) -> None:
        self.local = local
        self.bus = bus
        self.sent = 0
        self.received = 0
        self._tasks: set[asyncio.Task[bool]] = set()
        #: open subscriptions and their topics (forgotten with them)
        self._live: weakref.WeakKeyDictionary[Subscription, tuple[str, ...]] = weakref.WeakKeyDictionary()
        self._unsubscribe = bus.subscribe(CHANNEL, self._on_signal)
        bus.on_reconnect(self._on_reconnect)

    def publish(self, topic: str, data: dict[str, Any]) -> None:
        self.local.publish(topic, data)
        if self.local.closed or self.bus.alone:  # no other node to tell
            return
        payload = json.dumps({"t": topic, "d": data}, ensure_ascii=False, separators=(",", ":"), default=str)
        if len(payload.encode()) > MAX_PAYLOAD:
            payload = json.dumps({"t": topic, "d": {"kind": RESYNC}}, separators=(",", ":"))
        self.sent += 1
        self._spawn(self.bus.publish(CHANNEL, payload))

    def subscribe(self, topics: Iterable[str], last_event_id: str | None = None) -> Subscription:
        wanted = tuple(topics)
        subscription = self.local.subscribe(wanted, last_event_id)
        self._live[subscription] = wanted
        return subscription

    def subscribers(self, topic: str) -> int:
        return self.local.subscribers(topic)

    def close(self) -> None:
        self._unsubscribe()
        self.local.close()

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
        """Events from other nodes may have been missed: every page here reloads once."""
        topics = {t for sub, wanted in list(self._live.items()) if not sub.closed for t in wanted}
        for topic in sorted(topics):
            self.local.publish(topic, {"kind": RESYNC})

    def _spawn(self, coro: Coroutine[Any, Any, bool]) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop (a publish at interpreter exit): local subscribers had it
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


__all__ = ["CHANNEL", "ClusterHub"]
