"""Per-conversation ordered execution: one turn at a time per conversation, many at once.

A conversation is worked on by whoever holds its lease row in the store. The node that took
a webhook in claims the conversation at once (`notify`) and, holding the lease, runs the
pending messages' turns oldest first and delivers the outbox after each. When nothing is
left it releases the lease. A sweep (`resume`, run by the scheduler) picks up conversations
whose work was left pending: by a crash, a store outage, or a delivery waiting to retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Mapping

from middleware.metrics import Metrics
from middleware.model import ConversationState
from middleware.outbox import Outbox
from middleware.platforms.base import Platform
from middleware.settings import DispatchSettings
from middleware.store import Lease, LeaseLost, PendingMessage, Store, StoreUnavailable
from middleware.turn import TurnRunner

log = logging.getLogger("switchboard.dispatch")


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
    ) -> None:
        self.store = store
        self.turns = turns
        self.outbox = outbox
        self.platforms = platforms
        self.settings = settings
        self.metrics = metrics
        self.node_id = node_id
        self.backlog = 0
        self.accepting = True
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        self._active: set[str] = set()
        self._again: set[str] = set()
        self._wakeups: dict[str, asyncio.TimerHandle] = {}
        self._held: dict[str, Lease] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        #: conversations whose running turn a newer message may cancel
        self._interrupts: dict[str, asyncio.Event] = {}

    @property
    def overloaded(self) -> bool:
        return self.backlog >= self.settings.max_backlog

    def accepted(self, n: int) -> None:
        self.backlog += n
        self.metrics.backlog.set(self.backlog)

    def notify(self, key: str) -> None:
        """Work on this conversation now (or right after the turn running for it)."""
        if key in self._active:
            self._again.add(key)
            interrupt = self._interrupts.get(key)
            if interrupt is not None:
                interrupt.set()
            return
        handle = self._wakeups.pop(key, None)
        if handle is not None:
            handle.cancel()
        self._active.add(key)
        self.metrics.active.set(len(self._active))
        task = asyncio.create_task(self._actor(key), name=f"conversation {key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def is_busy(self, key: str) -> bool:
        return key in self._active or key in self._wakeups

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
                async with self._slots:
                    await self._work(key)
                if key not in self._again:
                    return
                self._again.discard(key)
        except Exception:
            log.exception("conversation worker crashed", extra={"conversation": key})
            self._wake_later(key, 1.0)
        finally:
            self._active.discard(key)
            self.metrics.active.set(len(self._active))
            self._settle(key)

    async def _work(self, key: str) -> None:
        platform_name, _, external_id = key.partition(":")
        platform = self.platforms.get(platform_name)
        if platform is None:
            log.error("pending work for a platform not in the config", extra={"conversation": key})
            return
        try:
            lease = await self.store.claim(key, platform_name, external_id, self.node_id, self.settings.lease_seconds)
            if lease is None:
                return  # another node holds it and will see the work
            self._held[key] = lease
            await self._run_claimed(lease, platform)
        except LeaseLost:
            self._held.pop(key, None)
            log.warning("lease lost mid-turn; the new holder redoes the turn", extra={"conversation": key})
        except StoreUnavailable as exc:
            log.warning("store unavailable, retrying soon: %s", exc, extra={"conversation": key})
            self._wake_later(key, 1.0)

    async def _run_claimed(self, lease: Lease, platform: Platform) -> None:
        key = lease.key
        state = lease.state
        while True:
            messages = await self.store.pending_messages(key)
            while messages:
                batch, messages = await self._next_batch(key, messages, state)
                new_state = await self._turn(lease, platform, batch, state)
                if new_state is None:  # cancelled by a newer message: gather again
                    messages = await self.store.pending_messages(key)
                    continue
                state = new_state
                lease = dataclasses.replace(lease, state=state)
                self.backlog = max(0, self.backlog - len(batch))
                retry_at = await self.outbox.drain(key, platform)
                if retry_at is not None:
                    self._wake_at(key, retry_at)
                if not messages:
                    messages = await self.store.pending_messages(key)
            self.metrics.backlog.set(self.backlog)
            retry_at = await self.outbox.drain(key, platform)
            if retry_at is not None:
                self._wake_at(key, retry_at)
                return  # keep the lease: our outbox is waiting to retry
            if await self.store.release(lease):
                self._held.pop(key, None)
                return

    async def _next_batch(
        self, key: str, messages: list[PendingMessage], state: ConversationState
    ) -> tuple[list[PendingMessage], list[PendingMessage]]:
        """The next turn's messages: one, or a burst of text messages when the flow coalesces."""
        first = messages[0].inbound
        window, _ = self.turns.engine.coalesce_window(first, state)
        if window <= 0 or first.type == "event":
            return messages[:1], messages[1:]
        await asyncio.sleep(window)
        messages = await self.store.pending_messages(key)
        burst = list(itertools.takewhile(lambda p: p.inbound.type != "event", messages))
        return burst or messages[:1], messages[len(burst or messages[:1]) :]

    async def _turn(
        self, lease: Lease, platform: Platform, batch: list[PendingMessage], state: ConversationState
    ) -> ConversationState | None:
        _, cancels = self.turns.engine.coalesce_window(batch[0].inbound, state)
        if not cancels:
            return await self.turns.run(lease, platform, batch, state)
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
        self.notify(key)

    async def resume(self) -> int:
        """Pick up every conversation with work left and no live lease elsewhere; returns how many."""
        keys = await self.store.work_to_resume(self.node_id)
        started = 0
        for key in keys:
            if not self.is_busy(key):
                self.notify(key)
                started += 1
        return started

    async def renew_leases(self) -> None:
        keys = list(self._held)
        if not keys:
            return
        ours = await self.store.renew(keys, self.node_id, self.settings.lease_seconds)
        for key in keys:
            if key not in ours:
                self._held.pop(key, None)

    async def resync_backlog(self) -> None:
        self.backlog = await self.store.pending_count()
        self.metrics.backlog.set(self.backlog)

    async def close(self, grace: float = 10.0) -> None:
        """Let running turns finish (bounded), then stop."""
        self.accepting = False
        for handle in self._wakeups.values():
            handle.cancel()
        self._wakeups.clear()
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
