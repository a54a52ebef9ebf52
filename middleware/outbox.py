"""Delivery of the outbox: in order per conversation, retried, dead-lettered, never reordered.

A conversation's rows go out strictly in id order. A retryable failure (5xx, timeout,
connection error, 429) parks the head row until its next attempt and the conversation waits
behind it; other conversations are untouched. A permanent failure (other 4xx) or exhausted
retries move the row to the dead letters (`GET /api/v1/outbox/dead`) and the next row goes.

Deliveries are fenced by the conversation's lease (middleware/dispatch.py): `fence()` is asked
before each call and gives the seconds the lease is sure to stay this node's (or raises LeaseLost);
the call is cut off before then, so a node that lost its lease never sends.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence

from middleware.cutoff import cutoff
from middleware.helpdesk import HelpdeskWebhook
from middleware.logs import redact
from middleware.metrics import Metrics
from middleware.platforms.base import DeliveryError, Platform, deliver
from middleware.ratelimit import RateLimiter
from middleware.settings import OutboxSettings
from middleware.store import LeaseLost, OutboxItem, Store

log = logging.getLogger("switchboard.outbox")

#: seconds of a lease left unused at the end of a fenced send (clock granularity, the store's round trip)
FENCE_MARGIN = 0.5

Fence = Callable[[], Awaitable[float]]


class Outbox:
    #: rows read per query
    PAGE = 32

    def __init__(
        self, store: Store, settings: OutboxSettings, metrics: Metrics, helpdesk: HelpdeskWebhook | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.helpdesk = helpdesk
        self._limiters: dict[str, RateLimiter] = {}

    def limiter(self, platform: Platform) -> RateLimiter:
        limiter = self._limiters.get(platform.name)
        if limiter is None:
            limiter = self._limiters[platform.name] = RateLimiter(platform.rate_limit)
        return limiter

    async def drain(
        self, key: str, platform: Platform, fence: Fence | None = None, known: Sequence[OutboxItem] | None = None
    ) -> float | None:
        """Deliver the conversation's due rows in order (each under `fence`, when given).

        `known`: the conversation's whole pending queue, when the caller knows it (the rows its turn
        just added to an outbox it had emptied): no query for them.
        Returns None when nothing is left, or the time (epoch seconds) the head row may be tried again.
        Raises LeaseLost (nothing more sent) when the fence says the lease is not ours.
        """
        if known is not None:
            for item in known:
                retry_at = await self._one(item, platform, fence)
                if retry_at is not None:
                    return retry_at
            return None
        while True:
            items = await self.store.due_outbox(key, self.PAGE)
            for item in items:
                if item.next_attempt_at > time.time():
                    return item.next_attempt_at
                retry_at = await self._one(item, platform, fence)
                if retry_at is not None:
                    return retry_at
            if len(items) < self.PAGE:
                # a short page was the whole queue: rows are only added under the lease we hold
                # (a requeued dead letter notifies the conversation, which drains again)
                return None

    async def _one(self, item: OutboxItem, platform: Platform, fence: Fence | None = None) -> float | None:
        kind = item.item.kind
        to_platform = item.platform != HelpdeskWebhook.row_platform
        limiter = self.limiter(platform) if to_platform else None
        if limiter is not None and kind == "message":
            wait = limiter.delay(item.conversation_key)
            if wait > 0:
                self.metrics.rate_limited.labels(item.platform).inc()
                return time.time() + wait
        left = await fence() if fence is not None else None
        try:
            with cutoff(None if left is None else max(0.0, left - FENCE_MARGIN)) as cut:
                if not to_platform:
                    if self.helpdesk is None:
                        raise DeliveryError("no handoff.webhook_url configured for the helpdesk", retryable=False)
                    await self.helpdesk.send(item.conversation_key, item.item, item.idempotency_key)
                else:
                    await deliver(platform, item.item, item.idempotency_key)
        except TimeoutError:
            if not cut.expired():
                raise
            # the lease could run out before the platform answers: stop; the next holder resends
            # under the same Idempotency-Key
            raise LeaseLost(item.conversation_key) from None
        except DeliveryError as exc:
            if exc.status == 429 and limiter is not None:
                limiter.rate_limited(exc.retry_after)
            attempts = item.attempts + 1
            error = redact(str(exc))  # kept in the store and shown by the admin API: no tokens from URLs or answers
            if not exc.retryable or attempts >= self.settings.max_attempts:
                await self.store.mark_dead(item.id, attempts, error)
                self.metrics.deliveries.labels(item.platform, kind, "dead").inc()
                log.error(
                    "outbox dead letter",
                    extra={
                        "platform": item.platform,
                        "conversation": item.conversation_key,
                        "outbox_id": item.id,
                        "attempts": attempts,
                        "error": error,
                    },
                )
                return None
            delay = self.backoff(attempts, exc.retry_after)
            await self.store.mark_retry(item.id, attempts, time.time() + delay, error)
            self.metrics.deliveries.labels(item.platform, kind, "retry").inc()
            self.metrics.outbox_retries.labels(item.platform).inc()
            log.warning(
                "outbox retry",
                extra={
                    "platform": item.platform,
                    "conversation": item.conversation_key,
                    "outbox_id": item.id,
                    "attempts": attempts,
                    "retry_in": round(delay, 3),
                    "error": error,
                },
            )
            return time.time() + delay
        # the next row goes at once; the mark joins the next group commit (a later read sees it)
        self.store.mark_sent_soon(item.id)
        self.metrics.deliveries.labels(item.platform, kind, "sent").inc()
        return None

    def backoff(self, attempts: int, retry_after: float | None) -> float:
        """Retry-After when the platform gives one (capped); else exponential with full jitter."""
        if retry_after is not None:
            return min(retry_after, self.settings.retry_after_max)
        ceiling = min(self.settings.backoff_max, self.settings.backoff_base * 2 ** (attempts - 1))
        return random.uniform(ceiling / 2, ceiling)
