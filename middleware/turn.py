"""One turn: mark read, typing on (after a delay, refreshed), run the flow, store the replies.

The replies, the conversation's new state and the message's "handled" mark are written in one
transaction (`Store.commit_turn`); a typing-off goes into the outbox behind the replies, so it
reaches the platform after them. Typing is never left on: every path out of a turn that
turned it on either queues the typing-off or sends it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from middleware.engine import Engine, FlowFailed
from middleware.metrics import Metrics
from middleware.model import ConversationState, Outgoing, Reply
from middleware.platforms.base import DeliveryError, Platform
from middleware.settings import Settings
from middleware.store import Lease, PendingMessage, Store, idempotency_key

log = logging.getLogger("switchboard.turn")


class Typing:
    """A typing indicator's lifecycle within one turn."""

    def __init__(
        self, platform: Platform, conversation_id: str, message_id: str, key_prefix: str, delay: float
    ) -> None:
        self.platform = platform
        self.conversation_id = conversation_id
        self.message_id = message_id
        self.key_prefix = key_prefix
        self.delay = delay
        self.refresh = max(0.5, platform.typing_ttl * 0.6)
        self.sent_on = False
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.platform.supports_typing:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), self.delay)
            return
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                await self.platform.deliver(
                    Outgoing("typing", self.conversation_id, typing=True, message_id=self.message_id),
                    f"{self.key_prefix}-on-{n}",
                )
                self.sent_on = True
            except DeliveryError as exc:
                log.info("typing on failed: %s", exc, extra={"platform": self.platform.name})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.refresh)

    async def stop(self) -> bool:
        """Stop refreshing; waits for a typing-on in flight. True if typing was turned on."""
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.sent_on


class TurnRunner:
    def __init__(self, store: Store, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self.store = store
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self._background: set[asyncio.Task[None]] = set()

    async def run(
        self, lease: Lease, platform: Platform, pending: PendingMessage, state: ConversationState
    ) -> ConversationState:
        """Run and store one turn; returns the conversation's new state."""
        message = pending.inbound
        started = time.perf_counter()

        def key_of(n: int | str) -> str:
            return idempotency_key(message.platform, message.message_id, n)

        if platform.supports_read:
            self._spawn(
                self._send_now(
                    platform, Outgoing("read", message.conversation_id, message_id=message.message_id), key_of("read")
                )
            )
        delay = platform.config.typing_delay if platform.config.typing_delay is not None else self.settings.typing.delay
        typing = Typing(platform, message.conversation_id, message.message_id, key_of("typing"), delay)
        typing.start()
        replies: tuple[Reply, ...]
        try:
            result = await asyncio.wait_for(self.engine.decide(message, state), self.settings.dispatch.turn_timeout)
            replies, new_state = result.replies, result.state
        except Exception as exc:  # the user still gets an answer; the operator gets one line
            reason = "timeout" if isinstance(exc, TimeoutError) else "flow" if isinstance(exc, FlowFailed) else "error"
            self.metrics.turn_failures.labels(message.platform, reason).inc()
            log.error(
                "turn failed, fallback reply sent",
                exc_info=not isinstance(exc, FlowFailed | TimeoutError),
                extra={
                    "platform": message.platform,
                    "conversation": lease.key,
                    "flow": state.flow,
                    "state": state.state,
                    "reason": reason,
                    "error": str(exc),
                },
            )
            replies = (Reply(text=self.settings.fallback_reply),)
            new_state = ConversationState(state.flow, state.state, state.vars, state.turns + 1, state.owner)
        typing_was_on = await typing.stop()
        outgoing = [
            (Outgoing("message", message.conversation_id, reply=r, reply_to=message.message_id), key_of(i))
            for i, r in enumerate(replies)
        ]
        if typing_was_on:
            outgoing.append(
                (
                    Outgoing("typing", message.conversation_id, typing=False, message_id=message.message_id),
                    key_of("typing-off"),
                )
            )
        try:
            await self.store.commit_turn(lease, [pending.inbox_id], new_state, outgoing)
        except BaseException:
            if typing_was_on:
                self._spawn(
                    self._send_now(
                        platform,
                        Outgoing("typing", message.conversation_id, typing=False, message_id=message.message_id),
                        key_of("typing-off"),
                    )
                )
            raise
        self.metrics.turn_seconds.labels(message.platform).observe(time.perf_counter() - started)
        return new_state

    async def _send_now(self, platform: Platform, item: Outgoing, key: str) -> None:
        """Best-effort platform call outside the outbox (read receipts, a typing-off after a failed turn)."""
        for attempt in range(3):
            try:
                await platform.deliver(item, key)
                self.metrics.deliveries.labels(platform.name, item.kind, "sent").inc()
                return
            except DeliveryError as exc:
                if not exc.retryable or attempt == 2:
                    self.metrics.deliveries.labels(platform.name, item.kind, "failed").inc()
                    log.info("%s not delivered: %s", item.kind, exc, extra={"platform": platform.name})
                    return
                await asyncio.sleep(0.2 * 2**attempt)

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in list(self._background):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 2)
