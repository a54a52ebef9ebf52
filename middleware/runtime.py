"""The interpreter tuned for a long-running server: garbage collection and the GIL's hand-over.

`tune()` runs once, when `switchboard serve` has loaded everything. `SwitchInterval` then follows
the load: the store's writer thread gives the GIL up around every COMMIT (on PostgreSQL around every
round trip) and, while the event loop holds it, waits up to the switch interval to get it back
before the batch's callers wake. A short interval hands the GIL back sooner (lower latency); a long
one lets each side run longer and lets commits grow (less CPU per message). Measured at saturation
and at half that rate (bench/README.md), when the writer thread still ran SQLite's statements too:
2 ms throughout took the webhook-to-reply p99 at half rate from 25-47 ms to 14-16 ms but cost 7-18 %
of the replies per second at saturation. CPython's 5 ms only while more than 128 messages wait for
their turns kept saturation as it was, with the p99 at half rate at ~22 ms; a mark of 32 was crossed
by the bursts of a sender at half rate too, and gave up most of the gain. With SQLite's statements
on the loop (the writer thread needs the GIL once a batch), 2 ms still paid at 1,400 messages/s
(3 alternating pairs): p99 5.7/8.6/75 ms against 16.7/19.5/34.3 with 5 ms throughout.
"""

from __future__ import annotations

import gc
import sys

#: the switch interval while the service keeps up: the writer gets the GIL back fast
QUICK = 0.002
#: while messages wait for their turns: CPython's default, for bigger commits and fewer switches
BATCHING = 0.005
#: accepted messages waiting for a turn above which the service counts as busy (turns falling behind,
#: not a burst; `dispatch.hold_backlog`, where webhooks start to wait, is 256 by default)
BUSY_BACKLOG = 128


def tune() -> None:
    """Garbage collection: what is loaded by now (modules, flows, the app) is frozen out of every
    future scan, and the young generation is collected after 20,000 allocations instead of 700.
    Under load this took 13-28 % off the CPU time per message (bench/README.md): the default
    thresholds ran a collection every few requests. The switch interval starts quick."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    sys.setswitchinterval(QUICK)


class SwitchInterval:
    """The GIL's switch interval by the dispatcher's backlog (changed only when the load crosses
    `busy_backlog`; the interval is the interpreter's, one per process)."""

    def __init__(self, busy_backlog: int = BUSY_BACKLOG) -> None:
        self.busy_backlog = busy_backlog
        self.busy = False

    def load(self, backlog: int) -> None:
        busy = backlog > self.busy_backlog
        if busy != self.busy:
            self.busy = busy
            sys.setswitchinterval(BATCHING if busy else QUICK)
