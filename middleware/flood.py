"""Flood control at ingress: a token bucket per sender, so one user cannot make a bot run turns without end.

Each (platform, sender id) has a bucket of `ingress.sender_burst` tokens refilled at
`ingress.sender_per_second`. A message that finds a token gets its turn as usual. One that finds
none is still accepted (200) and stored, so nothing acknowledged is lost, but with the status
`flooded`: it gets no turn, no reply, no typing or read receipt, and it does not count in the
backlog. It stays in the conversation's history (admin API, agent inbox) and its id still
dedupes a retry. Events (an agent's resolve, a conversation opened) are never held back.

Buckets live in each node's memory: behind a load balancer that spreads one sender's webhooks
over N nodes, a sender gets up to N times the rate. The least recently seen senders are
forgotten past `MAX_SENDERS` (a forgotten sender starts again with a full bucket).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from middleware.model import Inbound
from middleware.ratelimit import TokenBucket

log = logging.getLogger("switchboard.ingress")


@dataclass(slots=True)
class _Sender:
    bucket: TokenBucket
    #: over the limit since its last admitted message (the log line is written once per flood)
    flooding: bool = False


class SenderLimiter:
    """Token buckets per (platform, sender id); `per_second=None` admits everything."""

    MAX_SENDERS = 100_000

    def __init__(self, per_second: float | None, burst: int) -> None:
        self.per_second = per_second
        self.burst = burst
        self._senders: OrderedDict[tuple[str, str], _Sender] = OrderedDict()

    def admit(self, message: Inbound, now: float | None = None) -> bool:
        """True if the message gets a turn (its token is taken), False if it is over its sender's rate."""
        if self.per_second is None or message.type == "event":
            return True
        now = time.monotonic() if now is None else now
        key = (message.platform, message.sender.id)
        sender = self._senders.get(key)
        if sender is None:
            sender = _Sender(TokenBucket.full(self.per_second, self.burst, now))
            self._senders[key] = sender
            if len(self._senders) > self.MAX_SENDERS:
                self._senders.popitem(last=False)
        else:
            self._senders.move_to_end(key)
        if sender.bucket.wait(now) <= 0:
            sender.bucket.take(now)
            sender.flooding = False
            return True
        if not sender.flooding:
            sender.flooding = True
            log.warning(
                "sender flooding: messages past its rate are stored without a turn",
                extra={
                    "platform": message.platform,
                    "sender": message.sender.id,
                    "conversation": message.conversation_key,
                    "per_second": self.per_second,
                    "burst": self.burst,
                },
            )
        return False

    def refund(self, message: Inbound) -> None:
        """Give back the token of an admitted message that turned out to be a duplicate (no turn runs)."""
        sender = self._senders.get((message.platform, message.sender.id))
        if sender is not None and message.type != "event":
            sender.bucket.tokens = min(sender.bucket.burst, sender.bucket.tokens + 1)
