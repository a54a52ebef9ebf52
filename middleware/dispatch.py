"""Per-conversation ordered execution: one turn at a time per conversation, many at once.

A conversation is worked on by whoever holds its lease row in the store. The node that took
a webhook in claims the conversation at once (`notify`) and, holding the lease, runs the
pending messages' turns oldest first and delivers the outbox after each. When nothing is
left it releases the lease. A sweep (`resume`, run by the scheduler) picks up conversations
whose work was left pending: by a crash, a store outage, or a delivery waiting to retry.

Across nodes (middleware/notify.py):
- a node whose claim fails because another node holds the lease signals `wake` with the key;
  the holder, if it is idle on that conversation (waiting to retry a delivery) or running a turn a
  newer message may cancel, works on it at once instead of at its next wake-up;
- a node shutting down (`drain`) hands its leases back and signals `free`: any node claims them now.
Signals can be lost (the listener reconnecting); the sweep then finds the same work within
`dispatch.sweep_seconds`, including messages waiting behind a lease held here for a retry.

A conversation just worked on keeps its lease (and its state, in memory) for
`dispatch.linger_seconds`: a message that comes in meanwhile runs at once, without a claim. On
SQLite with no other node (the store's only writer), the ingress hands the stored message over
(`notify(key, hint=...)`) instead of it being read back; with other nodes another one may have
stored an earlier message of the same conversation a moment before, so the pending messages are
always read from the store then (as for any other news: a timer, an agent's event, another
node's `wake`, the sweep). When the linger ends the lease is released, in the same statement that
checks nothing is pending.

Deliveries are fenced like turns: before each platform call the outbox asks `fence(key)`, which
renews the lease in the store when less than a send's time is left, and raises LeaseLost if the
lease moved; the send itself is cut off before the lease could run out. A node stalled past its
lease (a long pause, a partition) therefore never sends what its successor now owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Mapping

from middleware.cluster import Node
from middleware.metrics import Metrics
from middleware.model import ConversationState
from middleware.notify import Bus, Signal
from middleware.outbox import Outbox
from middleware.platforms.base import Platform
from middleware.runtime import SwitchInterval
from middleware.settings import DispatchSettings
from middleware.slots import Slots
from middleware.store import Lease, LeaseLost, OutboxItem, PendingMessage, Store, StoreUnavailable
from middleware.turn import TurnRunner

log = logging.getLogger("switchboard.dispatch")

#: signal channels (middleware/notify.py)
WAKE = "wake"
FREE = "free"
#: inbox ids a held conversation remembers as handled (a hint can only repeat a recent one)
RECENT = 64


class Dispatcher:
    def __init__(
        self,
        store: Store,
        turns: TurnRunner,
        outbox: Outbox,
        platforms: Mapping[str, Platform],
        settings: DispatchSettings,
        metrics: Metrics,
        node_id: str,
        *,
        node: Node | None = None,
        bus: Bus | None = None,
    ) -> None:
        self.store = store
        self.turns = turns
        self.outbox = outbox
        self.platforms = platforms
        self.settings = settings
        self.metrics = metrics
        # read when scraped: set on every change they cost a lock each, four times a message
        metrics.backlog.set_function(lambda: self.backlog)
        metrics.active.set_function(lambda: len(self._active))
        self.node_id = node_id
        self.node = node
        #: the lease owner written on conversations: unique per process (middleware/cluster.py)
        self.owner = node.owner if node is not None else node_id
        self.bus = bus
        self.backlog = 0
        #: how many times the backlog was changed here (`resync_backlog` tells a stale count by it)
        self._moves = 0
        #: the GIL's hand-over follows the backlog (middleware/runtime.py)
        self.switch_interval = SwitchInterval()
        #: set while the backlog is below `hold_backlog` (webhooks answered at once)
        self._room = asyncio.Event()
        self._room.set()
        self.accepting = True
        #: shutting down (or superseded): no new work starts here; leases go back as turns end
        self.draining = False
        self.superseded = False
        self._slots = Slots(settings.max_concurrency)
        self._active: set[str] = set()
        self._again: set[str] = set()
        self._wakeups: dict[str, asyncio.TimerHandle] = {}
        self._held: dict[str, Lease] = {}
        #: per held lease, the monotonic instant before which it is sure to be ours
        self._until: dict[str, float] = {}
        #: conversations notified for new work: if another node holds them, it is told (`wake`)
        self._fresh: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        #: conversations whose running turn a newer message may cancel
        self._interrupts: dict[str, asyncio.Event] = {}
        self._drained: asyncio.Task[dict[str, float]] | None = None
        #: leases kept between turns (linger), with the timer that ends the linger
        self._idle: dict[str, tuple[Lease, asyncio.TimerHandle]] = {}
        #: messages the ingress stored for a conversation, handed over with `notify`: used only
        #: where they are the whole story (SQLite, no other node: we are the store's only writer)
        self._hints: dict[str, list[PendingMessage]] = {}
        self._hints_complete = store.dialect == "sqlite"
        #: conversations notified without a hint: their pending messages are read from the store
        self._stale: set[str] = set()
        #: lingering conversations whose linger is over: release the lease if nothing is pending
        self._expired: set[str] = set()
        #: per held lease, the inbox ids whose turns were stored lately (a hint may repeat one), oldest
        #: first: a dict as an ordered set, at most RECENT ids
        self._recent: dict[str, dict[int, None]] = {}
        self._background: set[asyncio.Task[object]] = set()
        self.stats = {"woken": 0, "wakes_sent": 0, "handed_back": 0, "taken_free": 0}
        if bus is not None:
            bus.subscribe(WAKE, self._on_wake)
            bus.subscribe(FREE, self._on_free)
            bus.on_reconnect(self._on_reconnect)

    @property
    def overloaded(self) -> bool:
        return self.backlog >= self.settings.max_backlog

    @property
    def crowded(self) -> bool:
        """The backlog is past `hold_backlog`: webhooks wait for `room` before they are answered."""
        return not self._room.is_set()

    async def room(self, within: float) -> None:
        """Return when the backlog is below `hold_backlog`, or after `within` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._room.wait()

    def accepted(self, n: int) -> None:
        self.backlog += n
        self._moves += 1
        self._measure_room()

    def _measure_room(self) -> None:
        self.switch_interval.load(self.backlog)
        limit = self.settings.hold_backlog
        if limit is None or self.backlog < limit:
            self._room.set()
        else:
            self._room.clear()

    def notify(self, key: str, *, fresh: bool = True, hint: PendingMessage | None = None) -> None:
        """Work on this conversation now (or right after the turn running for it).

        `fresh`: there is new work (a message, an event) rather than a sweep's guess; if another
        node holds the conversation, it is told. `hint`: the one new message, as the ingress stored
        it; without it, the pending messages are read from the store."""
        if hint is not None and self._hints_complete and (self.bus is None or self.bus.alone):
            self._hints.setdefault(key, []).append(hint)
        else:
            self._stale.add(key)
        self._start(key, fresh)

    def _start(self, key: str, fresh: bool) -> None:
        if key in self._active:
            self._again.add(key)
            interrupt = self._interrupts.get(key)
            if interrupt is not None:
                interrupt.set()
            return
        if self.draining:
            if fresh:  # another node takes it now rather than at its next sweep
                self._signal(FREE, key)
            return
        handle = self._wakeups.pop(key, None)
        if handle is not None:
            handle.cancel()
        idle = self._idle.get(key)
        if idle is not None:
            idle[1].cancel()
        if fresh:
            self._fresh.add(key)
        self._active.add(key)
        # the loop's own create_task: asyncio.create_task adds a Python-level call and a naming one
        task = asyncio.get_running_loop().create_task(self._actor(key), name=f"conversation {key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def is_busy(self, key: str) -> bool:
        return key in self._active or key in self._wakeups

    def holds(self, key: str) -> bool:
        return key in self._held

    async def settled(self, key: str) -> None:
        """Wait until nothing runs or waits for this conversation on this node."""
        while self.is_busy(key):
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(key, []).append(waiter)
            await waiter

    def _settle(self, key: str) -> None:
        if self.is_busy(key):
            return
        for waiter in self._waiters.pop(key, []):
            if not waiter.done():
                waiter.set_result(None)

    async def _actor(self, key: str) -> None:
        try:
            while True:
                if not self._slots.take():
                    await self._slots.wait()
                try:
                    await self._work(key)
                finally:
                    self._slots.release()
                if key not in self._again or self.draining:
                    return
                self._again.discard(key)
        except Exception:
            log.exception("conversation worker crashed", extra={"conversation": key})
            if not self.draining:
                self._wake_later(key, 1.0)
        finally:
            self._again.discard(key)
            self._fresh.discard(key)
            if key not in self._held:
                self._hints.pop(key, None)
                self._stale.discard(key)
            self._active.discard(key)
            self._settle(key)

    async def _work(self, key: str) -> None:
        platform_name, _, external_id = key.partition(":")
        platform = self.platforms.get(platform_name)
        if platform is None:
            log.error("pending work for a platform not in the config", extra={"conversation": key})
            return
        if self.draining:
            return
        try:
            idle = self._idle.pop(key, None)
            if idle is not None:
                idle[1].cancel()
                if key in self._held and self._until.get(key, 0.0) - time.monotonic() > self._fence_need():
                    await self._run_claimed(idle[0], platform, cached=True)
                    return
            self._expired.discard(key)
            asked = time.monotonic()
            lease = await self.store.claim(key, platform_name, external_id, self.owner, self.settings.lease_seconds)
            if lease is None:  # another node holds it: it sees the work, and is told if it is idle
                if key in self._fresh:
                    self._fresh.discard(key)
                    self.stats["wakes_sent"] += 1
                    self._signal(WAKE, key)
                return
            self._fresh.discard(key)
            self._held[key] = lease
            self._until[key] = asked + self.settings.lease_seconds
            self._recent[key] = {}
            self._stale.discard(key)  # the claim read the pending messages
            await self._run_claimed(lease, platform)
        except LeaseLost:
            self._forget(key)
            log.warning(
                "lease lost (it expired or moved): the node holding it now redoes what was not stored or sent",
                extra={"conversation": key},
            )
        except StoreUnavailable as exc:  # the store logs the outage (once every few seconds)
            log.debug("store unavailable, retrying soon: %s", exc, extra={"conversation": key})
            if not self.draining:
                self._wake_later(key, 1.0)

    async def _run_claimed(self, lease: Lease, platform: Platform, *, cached: bool = False) -> None:
        """Work on a conversation whose lease we hold: its pending turns in order, each followed by
        its deliveries; then linger with the lease, or release it.

        `cached`: the lease was kept from the last run (linger); its outbox is empty and its state
        current, and what is pending comes from the hints (or the store, when a notice had none)."""
        key = lease.key
        state = lease.state

        fence = functools.partial(self._fence, key)
        messages = [] if self.draining else self._merge(key, list(lease.messages))
        #: the last drain emptied the outbox (rows are only added here, under our lease)
        outbox_clear = cached
        worked = False
        while True:
            if key in self._stale and not self.draining:
                self._stale.discard(key)
                messages = self._merge(key, await self.store.pending_messages(key))
            while messages:
                first = messages[0].inbound
                window, cancels = self.turns.engine.coalesce_window(first, state)
                if window <= 0 or first.type == "event":
                    batch, messages = messages[:1], messages[1:]
                else:
                    batch, messages = await self._burst(key, window)
                    _, cancels = self.turns.engine.coalesce_window(batch[0].inbound, state)
                if cancels:
                    done = await self._interruptible_turn(lease, platform, batch, state)
                else:
                    done = await self.turns.run(lease, platform, batch, state)
                if done is None:  # cancelled by a newer message: gather again
                    messages = self._merge(key, await self.store.pending_messages(key))
                    continue
                state, added = done
                worked = True
                self._handled(key, batch)
                lease = Lease(lease.key, lease.owner, lease.epoch, state)
                self.backlog = max(0, self.backlog - len(batch))
                self._moves += 1
                self._measure_room()
                retry_at = await self.outbox.drain(key, platform, fence, added if outbox_clear else None)
                outbox_clear = retry_at is None
                if retry_at is not None:
                    self._wake_at(key, retry_at)
                if self.draining:
                    break  # the turn in flight is done; what is left goes to another node
                if key in self._stale:
                    self._stale.discard(key)
                    messages = self._merge(key, await self.store.pending_messages(key))
                else:
                    messages = self._merge(key, messages)
            retry_at = None if outbox_clear else await self.outbox.drain(key, platform, fence)
            if self.draining:
                if retry_at is None and await self.store.release(lease):
                    self._forget(key)
                else:
                    await self._hand_back(lease)
                return
            if retry_at is not None:
                self._wake_at(key, retry_at)
                return  # keep the lease: our outbox is waiting to retry
            if self._linger(lease, worked):
                return
            # release only if nothing is pending (the store checks in the same statement);
            # otherwise new messages came in meanwhile, or a dead letter was requeued
            if await self.store.release(lease):
                self._forget(key)
                return
            messages = self._merge(key, await self.store.pending_messages(key))
            outbox_clear = False

    def _merge(self, key: str, messages: list[PendingMessage]) -> list[PendingMessage]:
        """`messages` with the hints handed over since, without those already worked on, in inbox
        order (ids are not a clock across nodes: a filter on "newer than the last one" would drop
        a message another node stored a moment late)."""
        hints = self._hints.pop(key, None)
        if not hints:
            return messages
        recent = self._recent.get(key, {})
        if not messages and len(hints) == 1:  # the usual case: one new message, nothing read
            return [] if hints[0].inbox_id in recent else hints
        merged = {m.inbox_id: m for m in (*messages, *hints) if m.inbox_id not in recent}
        return [merged[i] for i in sorted(merged)]

    def _handled(self, key: str, batch: list[PendingMessage]) -> None:
        recent = self._recent.setdefault(key, {})
        for p in batch:
            recent[p.inbox_id] = None
        while len(recent) > RECENT:
            del recent[next(iter(recent))]

    def _linger(self, lease: Lease, worked: bool) -> bool:
        """Keep the lease for `linger_seconds` after a run that worked (True), unless the linger is
        over, the node is draining, or news came that needs the store."""
        key = lease.key
        expired = key in self._expired
        self._expired.discard(key)
        linger = self.settings.linger_seconds
        if linger <= 0 or self.draining or key in self._stale or self._hints.get(key):
            return False
        if expired and not worked:
            return False
        loop = asyncio.get_running_loop()
        self._idle[key] = (lease, loop.call_later(linger, self._linger_over, key))
        return True

    def _linger_over(self, key: str) -> None:
        if key in self._idle and key not in self._active:
            self._expired.add(key)
            self._start(key, False)

    async def _fence(self, key: str) -> float:
        """Seconds the lease on `key` is sure to stay ours (renewed first if a send could outlast
        it); LeaseLost if it is not ours any more."""
        if key not in self._held:
            raise LeaseLost(key)
        need = self._fence_need()
        left = self._until.get(key, 0.0) - time.monotonic()
        if left > need:
            return left
        asked = time.monotonic()
        ours = await self.store.renew([key], self.owner, self.settings.lease_seconds)
        if key not in ours:
            self._forget(key)
            log.warning("lease lost before a delivery; the new holder delivers", extra={"conversation": key})
            raise LeaseLost(key)
        self._until[key] = asked + self.settings.lease_seconds
        return self._until[key] - time.monotonic()

    def _fence_need(self) -> float:
        return min(self.outbox.settings.timeout + 1.0, self.settings.lease_seconds / 2)

    def _forget(self, key: str) -> None:
        self._held.pop(key, None)
        self._until.pop(key, None)
        self._recent.pop(key, None)
        self._expired.discard(key)
        idle = self._idle.pop(key, None)
        if idle is not None:
            idle[1].cancel()

    async def _hand_back(self, lease: Lease) -> None:
        """Give a lease up with its work pending, and tell the other nodes to take it now."""
        self._forget(lease.key)
        try:
            if await self.store.hand_back(lease):
                self.stats["handed_back"] += 1
                self._signal(FREE, lease.key)
        except StoreUnavailable as exc:
            log.warning("lease not handed back (it expires by itself): %s", exc, extra={"conversation": lease.key})

    async def _burst(self, key: str, window: float) -> tuple[list[PendingMessage], list[PendingMessage]]:
        """The next turn's messages when the flow coalesces: after `window` seconds, the text
        messages pending by then (or the first one), and the rest."""
        await asyncio.sleep(window)
        messages = await self.store.pending_messages(key)
        burst = list(itertools.takewhile(lambda p: p.inbound.type != "event", messages))
        return burst or messages[:1], messages[len(burst or messages[:1]) :]

    async def _interruptible_turn(
        self, lease: Lease, platform: Platform, batch: list[PendingMessage], state: ConversationState
    ) -> tuple[ConversationState, list[OutboxItem]] | None:
        """The turn for `batch`, cancelled by a newer message (the flow's coalesce says so)."""
        interrupt = asyncio.Event()
        self._interrupts[lease.key] = interrupt
        try:
            return await self.turns.run(lease, platform, batch, state, interrupt)
        finally:
            self._interrupts.pop(lease.key, None)

    def _wake_at(self, key: str, when: float) -> None:
        self._wake_later(key, max(0.0, when - time.time()))

    def _wake_later(self, key: str, delay: float) -> None:
        old = self._wakeups.pop(key, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._wakeups[key] = loop.call_later(delay, self._wake, key)

    def _wake(self, key: str) -> None:
        self._wakeups.pop(key, None)
        self.notify(key, fresh=False)

    # -- signals from other nodes ------------------------------------------------------------

    def _signal(self, channel: str, key: str) -> None:
        if self.bus is None:
            return
        task: asyncio.Task[object] = asyncio.create_task(self.bus.publish(channel, key))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_wake(self, signal: Signal) -> None:
        """Another node has new work for a conversation it could not claim: ours, if we hold it."""
        if self.bus is not None and signal.mine(self.bus):
            return
        key = signal.payload
        if key in self._active:  # the turn running here: read the store before lingering
            self._stale.add(key)
        if (key in self._held and key not in self._active) or key in self._interrupts:
            self.stats["woken"] += 1
            self.notify(key, fresh=False)

    def _on_free(self, signal: Signal) -> None:
        """A node shutting down handed a conversation back with work pending: take it."""
        if self.bus is not None and signal.mine(self.bus):
            return
        if self.accepting and not self.draining and not self.is_busy(signal.payload):
            self.stats["taken_free"] += 1
            self.notify(signal.payload, fresh=False)

    def _on_reconnect(self) -> None:
        """Signals may have been missed while the bus reconnected: look for work now."""
        task: asyncio.Task[object] = asyncio.create_task(self._sweep_quietly())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _sweep_quietly(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.resume()

    # -- the sweep, lease renewal, backlog -----------------------------------------------------

    async def resume(self) -> int:
        """Pick up every conversation with work left and no live lease elsewhere; returns how many.

        A conversation whose lease this node keeps while a delivery waits to retry is started
        too when a message waits in it (a `wake` signal from the node that took it in was lost)."""
        if self.draining:
            return 0
        keys = await self.store.work_to_resume(self.owner)
        started = 0
        waiting = []
        for key in keys:
            if not self.is_busy(key):
                self.notify(key, fresh=False)
                started += 1
            elif key in self._wakeups and key not in self._active:
                waiting.append(key)
        if waiting:
            for key in await self.store.with_pending_messages(waiting):
                if key in self._wakeups and not self.draining:
                    self.notify(key, fresh=False)
                    started += 1
        return started

    async def renew_leases(self) -> None:
        node = self.node
        if (
            node is not None
            and not self.superseded
            and not await self.store.node_heartbeat(node.node_id, node.incarnation)
        ):
            self._supersede()
            return
        keys = list(self._held)
        if not keys:
            return
        asked = time.monotonic()
        ours = await self.store.renew(keys, self.owner, self.settings.lease_seconds)
        for key in keys:
            if key in ours:
                if key in self._held:
                    self._until[key] = asked + self.settings.lease_seconds
            else:
                self._forget(key)

    def _supersede(self) -> None:
        """Another process took this node id over (this one stalled past its lease): stop working."""
        log.error(
            "another process took over node id %s; this process stops working (not ready) and should be restarted",
            self.node_id,
        )
        self.superseded = True
        self.accepting = False
        self.draining = True
        for handle in self._wakeups.values():
            handle.cancel()
        self._wakeups.clear()
        for _, handle in self._idle.values():
            handle.cancel()
        self._idle.clear()
        self._held.clear()
        self._until.clear()
        for task in list(self._tasks):
            task.cancel()

    async def resync_backlog(self) -> None:
        """Set the backlog to the store's count of pending messages (what other nodes accepted, what
        a restart left), unless it moved while the store counted: messages accepted or handled
        meanwhile are counted here but not in the store's answer, or the other way round, and
        the count would overwrite them (the next sweep tries again)."""
        moves = self._moves
        count = await self.store.pending_count()
        if self._moves == moves:
            self.backlog = count
            self._measure_room()

    # -- shutdown ---------------------------------------------------------------------------

    async def drain(self, bound: float) -> dict[str, float]:
        """Stop taking work, let turns in flight finish (flushing their outbox) within `bound`
        seconds, then hand every lease still held back to the other nodes. Idempotent."""
        if self._drained is None:
            self._drained = asyncio.ensure_future(self._drain(bound))
        return await asyncio.shield(self._drained)

    async def _drain(self, bound: float) -> dict[str, float]:
        started = time.monotonic()
        self.accepting = False
        self.draining = True
        for handle in self._wakeups.values():
            handle.cancel()
        self._wakeups.clear()
        lingering = [lease for lease, _ in self._idle.values()]
        for lease in lingering:  # nothing left to do, unless a message came in since
            self._forget(lease.key)
            try:
                if not await self.store.release(lease):
                    await self._hand_back(lease)
            except StoreUnavailable as exc:
                log.warning("lease not released (it expires by itself): %s", exc, extra={"conversation": lease.key})
        waiting = [lease for key, lease in self._held.items() if key not in self._active]
        for lease in waiting:  # a delivery waiting to retry: the next holder retries it
            await self._hand_back(lease)
        in_flight = len(self._tasks)
        cancelled = 0
        if self._tasks:
            budget = max(0.0, bound - 1.0 - (time.monotonic() - started))
            _, pending = await asyncio.wait(list(self._tasks), timeout=budget)
            cancelled = len(pending)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for lease in list(self._held.values()):
            await self._hand_back(lease)
        if self._background:
            await asyncio.wait(list(self._background), timeout=max(0.1, bound - (time.monotonic() - started)))
        result = {
            "in_flight": in_flight,
            "cancelled": cancelled,
            "handed_back": self.stats["handed_back"],
            "seconds": round(time.monotonic() - started, 3),
        }
        log.info("dispatcher drained", extra=result)
        return result

    async def close(self, grace: float = 10.0) -> None:
        """Drain (if a signal did not already) and stop."""
        await self.drain(grace)
        for task in list(self._background):
            task.cancel()
