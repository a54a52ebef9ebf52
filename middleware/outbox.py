"""Delivery of the outbox: in order per conversation, retried, dead-lettered, never reordered.

A conversation's rows go out strictly in id order. A retryable failure (5xx, timeout,
connection error, 429) parks the head row until its next attempt and the conversation waits
behind it; other conversations are untouched. A permanent failure (other 4xx) or exhausted
retries move the row to the dead letters (`GET /api/v1/outbox/dead`) and the next row goes.
"""

from __future__ import annotations

import logging
import random
import time

from middleware.helpdesk import HelpdeskWebhook
from middleware.metrics import Metrics
from middleware.platforms.base import DeliveryError, Platform
from middleware.settings import OutboxSettings
from middleware.store import OutboxItem, Store

log = logging.getLogger("switchboard.outbox")


class Outbox:
    def __init__(
        self, store: Store, settings: OutboxSettings, metrics: Metrics, helpdesk: HelpdeskWebhook | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.helpdesk = helpdesk

    async def drain(self, key: str, platform: Platform) -> float | None:
        """Deliver the conversation's due rows in order.

        Returns None when nothing is left, or the time (epoch seconds) the head row may be tried again.
        """
        while True:
            items = await self.store.due_outbox(key)
            if not items:
                return None
            for item in items:
                if item.next_attempt_at > time.time():
                    return item.next_attempt_at
                retry_at = await self._one(item, platform)
                if retry_at is not None:
                    return retry_at

    async def _one(self, item: OutboxItem, platform: Platform) -> float | None:
        kind = item.item.kind
        try:
            if item.platform == HelpdeskWebhook.row_platform:
                if self.helpdesk is None:
                    raise DeliveryError("no handoff.webhook_url configured for the helpdesk", retryable=False)
                await self.helpdesk.send(item.conversation_key, item.item, item.idempotency_key)
            else:
                await platform.deliver(item.item, item.idempotency_key)
        except DeliveryError as exc:
            attempts = item.attempts + 1
            if not exc.retryable or attempts >= self.settings.max_attempts:
                await self.store.mark_dead(item.id, attempts, str(exc))
                self.metrics.deliveries.labels(item.platform, kind, "dead").inc()
                log.error(
                    "outbox dead letter",
                    extra={
                        "platform": item.platform,
                        "conversation": item.conversation_key,
                        "outbox_id": item.id,
                        "attempts": attempts,
                        "error": str(exc),
                    },
                )
                return None
            delay = self.backoff(attempts, exc.retry_after)
            await self.store.mark_retry(item.id, attempts, time.time() + delay, str(exc))
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
                    "error": str(exc),
                },
            )
            return time.time() + delay
        await self.store.mark_sent(item.id)
        self.metrics.deliveries.labels(item.platform, kind, "sent").inc()
        return None

    def backoff(self, attempts: int, retry_after: float | None) -> float:
        """Retry-After when the platform gives one (capped); else exponential with full jitter."""
        if retry_after is not None:
            return min(retry_after, self.settings.retry_after_max)
        ceiling = min(self.settings.backoff_max, self.settings.backoff_base * 2 ** (attempts - 1))
        return random.uniform(ceiling / 2, ceiling)
