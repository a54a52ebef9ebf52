"""Outbound rate limits: token buckets per platform instance and per conversation.

Every conversation of a platform instance draws from the instance's bucket, and from its own.
A 429 from the platform slows the instance's bucket down (its rate halves, then creeps back
by 10 % of the configured rate per second of success) and pauses it for the Retry-After.
Waiting never blocks a worker: `delay()` says how long until a send may go, and the outbox
parks the conversation until then, as it does for a retry.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class RateLimit(BaseModel):
    """`per_second` and `burst` for the platform instance; the same per conversation. None = no limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_second: float | None = Field(default=None, gt=0)
    burst: int = Field(default=10, ge=1)
    conversation_per_second: float | None = Field(default=None, gt=0)
    conversation_burst: int = Field(default=3, ge=1)


@dataclass
class TokenBucket:
    rate: float
    burst: float
    tokens: float
    stamp: float
    paused_until: float = 0.0
    ceiling: float = 0.0

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now, 0.0, rate)

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            if self.rate < self.ceiling:  # additive recovery after a 429
                self.rate = min(self.ceiling, self.rate + 0.1 * self.ceiling * (now - self.stamp))
            self.stamp = now

    def wait(self, now: float) -> float:
        """Seconds until one token is there (0 if now)."""
        self._refill(now)
        if now < self.paused_until:
            return self.paused_until - now
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1

    def slow_down(self, now: float, retry_after: float | None) -> None:
        self._refill(now)
        self.rate = max(self.ceiling / 16, self.rate / 2)
        self.tokens = min(self.tokens, 0.0)
        if retry_after:
            self.paused_until = max(self.paused_until, now + retry_after)


class RateLimiter:
    """The buckets of one platform instance."""

    MAX_CONVERSATIONS = 10_000

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        now = time.monotonic()
        self.platform = TokenBucket.full(limit.per_second, limit.burst, now) if limit.per_second else None
        self.conversations: OrderedDict[str, TokenBucket] = OrderedDict()

    def _conversation(self, key: str, now: float) -> TokenBucket | None:
        rate = self.limit.conversation_per_second
        if rate is None:
            return None
        bucket = self.conversations.get(key)
        if bucket is None:
            bucket = TokenBucket.full(rate, self.limit.conversation_burst, now)
            self.conversations[key] = bucket
            if len(self.conversations) > self.MAX_CONVERSATIONS:
                self.conversations.popitem(last=False)
        else:
            self.conversations.move_to_end(key)
        return bucket

    def delay(self, conversation: str) -> float:
        """Seconds before this conversation may send; 0 means go (and the tokens are taken)."""
        if self.platform is None and self.limit.conversation_per_second is None:
            return 0.0  # no limit configured (the default)
        now = time.monotonic()
        buckets = [b for b in (self.platform, self._conversation(conversation, now)) if b is not None]
        wait = max((b.wait(now) for b in buckets), default=0.0)
        if wait > 0:
            return wait
        for b in buckets:
            b.take(now)
        return 0.0

    def rate_limited(self, retry_after: float | None) -> None:
        if self.platform is not None:
            self.platform.slow_down(time.monotonic(), retry_after)
