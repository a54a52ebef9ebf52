"""`cutoff(delay)`: `asyncio.timeout` for the long limits of the hot path, at a fraction of its cost.

Every message runs under a few limits that almost never fire (the turn's `turn_timeout`, a
delivery's lease fence, the HTTP pool's timeout). `asyncio.timeout` gives each its own event-loop
timer, started on entry and cancelled on exit; under uvloop that is a libuv handle allocated,
started, stopped and closed per use (3.9-4.7 us per use alone, 1.35 us here; in the service, taking
the three away outright saved ~27 us of a reply's ~470: bench/README.md). Here limits share one loop
timer per `RESOLUTION` slot: entry and exit are a set insert and removal, and a slot's timer, when it
fires, cancels whatever is still inside it. A limit may so fire up to `RESOLUTION` late. Delays
shorter than `SHORT` take `asyncio.timeout` itself, where a late firing would be felt.

On expiry the semantics are `asyncio.timeout`'s: the task is cancelled, and leaving the block turns
that cancellation into `TimeoutError` (`expired()` tells it from a timeout further out).
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType

#: seconds: how late a shared-slot limit may fire
RESOLUTION = 0.1
#: delays below this many seconds get a timer of their own (asyncio.timeout)
SHORT = 2.0


class _Slots:
    """Per event loop: slot end -> the guards whose limit falls in it, and the slot's one timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.slots: dict[float, set[Cutoff]] = {}

    def add(self, guard: Cutoff, when: float) -> float:
        end = math.ceil(when / RESOLUTION) * RESOLUTION
        members = self.slots.get(end)
        if members is None:
            members = self.slots[end] = set()
            self.loop.call_at(end, self._fire, end)
        members.add(guard)
        return end

    def remove(self, guard: Cutoff, end: float) -> None:
        members = self.slots.get(end)
        if members is not None:
            members.discard(guard)

    def _fire(self, end: float) -> None:
        for guard in self.slots.pop(end, ()):
            guard._on_timeout()


_BY_LOOP: dict[asyncio.AbstractEventLoop, _Slots] = {}


def _slots(loop: asyncio.AbstractEventLoop) -> _Slots:
    slots = _BY_LOOP.get(loop)
    if slots is None:
        for old in [old for old in _BY_LOOP if old.is_closed()]:
            del _BY_LOOP[old]
        slots = _BY_LOOP[loop] = _Slots(loop)
    return slots


class Cutoff:
    """The async context manager `cutoff()` returns for delays of `SHORT` or more."""

    __slots__ = ("_cancelling", "_end", "_slots", "_state", "_task", "_when")

    def __init__(self, when: float) -> None:
        self._when = when
        self._state = "created"
        self._end = 0.0

    async def __aenter__(self) -> Cutoff:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("cutoff() should be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._state = "entered"
        self._slots = _slots(task.get_loop())
        self._end = self._slots.add(self, self._when)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
    ) -> None:
        if self._state == "expiring":
            self._state = "expired"
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc_val
            return
        self._state = "exited"
        self._slots.remove(self, self._end)

    def _on_timeout(self) -> None:
        if self._state == "entered":
            self._state = "expiring"
            self._task.cancel()

    def expired(self) -> bool:
        """The limit was reached (the block's TimeoutError is this limit's, not another one's)."""
        return self._state in ("expiring", "expired")


def cutoff(delay: float | None) -> asyncio.Timeout | Cutoff:
    """`async with cutoff(seconds) as cut:`: `asyncio.timeout(seconds)`, sharing loop timers
    for limits of `SHORT` seconds or more. `None`: no limit."""
    if delay is None or delay < SHORT:
        return asyncio.timeout(delay)
    return Cutoff(asyncio.get_running_loop().time() + delay)
