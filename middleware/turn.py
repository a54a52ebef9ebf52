"""One turn: mark read, typing on (after a delay, refreshed), run the flow, store the replies.

The replies, the conversation's new state and the message's "handled" mark are written in one
transaction (`Store.commit_turn`); a typing-off goes into the outbox behind the replies, so it
reaches the platform after them. Typing is never left on: every path out of a turn that
turned it on either queues the typing-off or sends it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

from middleware.cutoff import cutoff, first_step, resume
from middleware.engine import Engine, FlowFailed
from middleware.helpdesk import TARGET
from middleware.metrics import Metrics
from middleware.model import (
    HUMAN_OWNERS,
    ConversationState,
    Handoff,
    Inbound,
    Outgoing,
    Owner,
    Reply,
    SetVariable,
    TurnResult,
)
from middleware.platforms.base import DeliveryError, Platform, deliver
from middleware.settings import Settings
from middleware.store import Lease, OutboxItem, PendingMessage, Store, idempotency_key

log = logging.getLogger("switchboard.turn")


class Typing:
    """A typing indicator's lifecycle within one turn."""

    def __init__(
        self,
        platform: Platform,
        conversation_id: str,
        message_id: str,
        key_of: Callable[[int | str], str],
        delay: float,
    ) -> None:
        self.platform = platform
        self.conversation_id = conversation_id
        self.message_id = message_id
        #: the turn's idempotency keys, by suffix: typing's are derived only when typing goes on
        self.key_of = key_of
        self.delay = delay
        self.refresh = max(0.5, platform.typing_ttl * 0.6)
        self.sent_on = False
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run(self._stop))

    async def _run(self, stop: asyncio.Event) -> None:
        if self.delay > 0:  # 0: typing goes on with every turn, however short
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.delay):
                    await stop.wait()
                return
        n = 0
        prefix = self.key_of("typing")
        while not stop.is_set():
            n += 1
            try:
                await deliver(
                    self.platform,
                    Outgoing("typing", self.conversation_id, typing=True, message_id=self.message_id),
                    f"{prefix}-on-{n}",
                )
                self.sent_on = True
            except DeliveryError as exc:
                log.info("typing on failed: %s", exc, extra={"platform": self.platform.name})
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.refresh):
                    await stop.wait()

    async def stop(self) -> bool:
        """Stop refreshing; waits for a typing-on in flight. True if typing was turned on."""
        if self._stop is not None and self._task is not None:
            self._stop.set()
            await self._task
        return self.sent_on


TurnObserver = Callable[[Inbound, TurnResult, float], None]


def merge_burst(messages: Sequence[Inbound]) -> Inbound:
    """Several quick text messages as one: their texts joined by newlines, the last one's id."""
    last = messages[-1]
    if len(messages) == 1:
        return last
    text = "\n".join(m.text for m in messages if m.text)
    return dataclasses.replace(last, text=text, type="text")


class TurnRunner:
    def __init__(self, store: Store, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self.store = store
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        #: called after each stored turn with (message, result, seconds); `switchboard chat` prints traces
        self.observers: list[TurnObserver] = []
        self._background: set[asyncio.Task[None]] = set()

    async def run(
        self,
        lease: Lease,
        platform: Platform,
        pending: Sequence[PendingMessage],
        state: ConversationState,
        interrupt: asyncio.Event | None = None,
    ) -> tuple[ConversationState, list[OutboxItem]] | None:
        """Run and store one turn for one message (or a burst merged into one); returns the new state
        and the outbox rows the turn added.

        If `interrupt` is set while the flow works (a newer message arrived and the flow says
        a newer message cancels the turn), the turn is dropped before anything is stored and
        None is returned: its messages stay pending for the next turn.
        """
        message = pending[0].inbound if len(pending) == 1 else merge_burst([p.inbound for p in pending])
        started = time.perf_counter()
        is_event = message.type == "event"

        inbox_id = pending[-1].inbox_id  # the merged message's own row

        def key_of(n: int | str) -> str:
            return idempotency_key(message.platform, message.message_id, n, inbox_id)

        if platform.supports_read and not is_event:
            for p in pending:
                read = Outgoing("read", p.inbound.conversation_id, message_id=p.inbound.message_id)
                self._spawn(
                    self._send_now(
                        platform, read, idempotency_key(p.inbound.platform, p.inbound.message_id, "read", p.inbox_id)
                    )
                )
        user_key = f"{message.platform}:{message.sender.id}"  # the store's name for user-scope variables
        if not is_event and self.engine.uses_user_scope(message, state):
            state = state.copy()
            state.vars["user"] = await self.store.user_vars(user_key)
        typing: Typing | None = None  # none for a platform without typing, an event, a human's conversation
        if platform.supports_typing and not is_event and state.owner not in HUMAN_OWNERS:
            delay = platform.config.typing_delay
            delay = self.settings.typing.delay if delay is None else delay
            typing = Typing(platform, message.conversation_id, message.message_id, key_of, delay)
            typing.start()
        deadline = time.monotonic() + self.settings.dispatch.turn_timeout
        decide = self.engine.decide(message, state, deadline)
        decision: asyncio.Future[TurnResult] | None = None  # the engine in a task of its own
        if interrupt is not None:  # only then: a task and a timeout task cost ~5 % of a turn's CPU
            decision = asyncio.ensure_future(asyncio.wait_for(decide, self.settings.dispatch.turn_timeout))
            waiter = asyncio.ensure_future(interrupt.wait())
            await asyncio.wait([decision, waiter], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if not decision.done():
                decision.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await decision
                if typing is not None and await typing.stop():
                    off = Outgoing("typing", message.conversation_id, typing=False, message_id=message.message_id)
                    self._spawn(self._send_now(platform, off, key_of("typing-off")))
                log.info("turn cancelled by a newer message", extra={"conversation": lease.key})
                return None
        try:
            if decision is None:
                if typing is not None:
                    await asyncio.sleep(0)  # typing's task gets its first step (delay 0: on at once)
                done, value = first_step(decide)
                if not done:  # it awaits something (a connector, a pause): under the turn's limit
                    with cutoff(self.settings.dispatch.turn_timeout):
                        value = await resume(decide, value)
                result = value
            else:
                result = await decision
        except asyncio.CancelledError:  # cut off (a shutdown's bound): nothing stored, the next holder redoes it
            if decision is not None:
                decision.cancel()
            if typing is None:
                raise
            await asyncio.wait([asyncio.ensure_future(typing.stop())], timeout=1.0)
            if typing.sent_on:
                off = Outgoing("typing", message.conversation_id, typing=False, message_id=message.message_id)
                self._spawn(self._send_now(platform, off, key_of("typing-off")))
            raise
        except Exception as exc:  # the user still gets an answer; the operator gets one line
            result = self._failed(lease, message, state, exc)
        typing_was_on = typing is not None and await typing.stop()
        handoff_items = self._handoff_items(platform, message, result, key_of)
        # the platform gives the conversation back to the bot (bot on) before the bot speaks again;
        # a handoff goes after the bot's last words
        outgoing = [(o, k) for o, k in handoff_items if o.kind == "release" and o.to is None] if handoff_items else []
        outgoing += [
            (Outgoing("message", message.conversation_id, reply=r, reply_to=message.message_id), key_of(i))
            for i, r in enumerate(result.replies)
        ]
        if typing_was_on:
            off = Outgoing("typing", message.conversation_id, typing=False, message_id=message.message_id)
            outgoing.append((off, key_of("typing-off")))
        if handoff_items:
            outgoing += [(o, k) for o, k in handoff_items if not (o.kind == "release" and o.to is None)]
        user_changes = (
            {a.name[5:]: a.value for a in result.actions if isinstance(a, SetVariable) and a.name.startswith("user.")}
            if result.actions
            else None
        )
        new_state = result.state  # nothing changes a turn's state in place once the turn is done
        if "user" in new_state.vars:  # user-scope variables live in their own table, not the state
            new_state = new_state.copy()
            del new_state.vars["user"]
        try:
            added = await self.store.commit_turn(
                lease,
                [p.inbox_id for p in pending],
                new_state,
                outgoing,
                timers=result.timers,
                cancel_timers=result.cancel_timers,
                user_vars=(user_key, user_changes) if user_changes else None,
                transitions=result.transitions,
            )
        except BaseException:
            if typing_was_on:
                off = Outgoing("typing", message.conversation_id, typing=False, message_id=message.message_id)
                self._spawn(self._send_now(platform, off, key_of("typing-off")))
            raise
        elapsed = time.perf_counter() - started
        self.metrics.turn_seconds.labels(message.platform).observe(elapsed)
        for observer in self.observers:
            observer(message, result, elapsed)
        return new_state, added

    def _failed(self, lease: Lease, message: Inbound, state: ConversationState, exc: Exception) -> TurnResult:
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
        kept = state.copy()
        if message.type != "event":
            kept.turns += 1
        return TurnResult((Reply(text=self.settings.fallback_reply),), (), kept, (f"failed ({reason}): {exc}",))

    def _handoff_items(
        self, platform: Platform, message: Inbound, result: TurnResult, key_of: Callable[[int | str], str]
    ) -> list[tuple[Outgoing, str]]:
        """Where humans are told (in the outbox, after the replies; a platform release before them):
        the platform's own agent tools, or the helpdesk webhook; the built-in inbox reads the store."""
        target = self.settings.handoff.target
        to_platform = platform.supports_handoff and target in ("auto", "platform")
        to_helpdesk = target == "webhook"
        if not (to_platform or to_helpdesk):
            return []
        conv = message.conversation_id
        out: list[tuple[Outgoing, str]] = []
        for i, action in enumerate(result.actions):
            if isinstance(action, Handoff):
                if to_platform:
                    out.append((Outgoing("handoff", conv, handoff=action), key_of(f"handoff-{i}")))
                if to_helpdesk:
                    transcript = tuple((str(r), str(t)) for r, t in result.state.history[-50:])
                    item = Outgoing("handoff", conv, handoff=action, to=TARGET, transcript=transcript)
                    out.append((item, key_of(f"helpdesk-handoff-{i}")))
        for i, change in enumerate(result.transitions):
            if change.after == Owner.BOT and change.before in HUMAN_OWNERS:
                if to_platform:
                    out.append((Outgoing("release", conv), key_of(f"release-{i}")))
                if to_helpdesk:
                    out.append((Outgoing("release", conv, to=TARGET), key_of(f"helpdesk-release-{i}")))
        handed_off = result.state.owner in HUMAN_OWNERS
        if to_helpdesk and handed_off and message.type != "event" and not result.transitions:
            item = Outgoing("message", conv, reply=Reply(message.text), reply_to=message.message_id, to=TARGET)
            out.append((item, key_of("helpdesk-message")))
        return out

    async def _send_now(self, platform: Platform, item: Outgoing, key: str) -> None:
        """Best-effort platform call outside the outbox (read receipts, a typing-off after a failed turn)."""
        for attempt in range(3):
            try:
                await deliver(platform, item, key)
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
