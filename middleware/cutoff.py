"""`with cutoff(delay):` `asyncio.timeout`'s limit for the hot path, at a fraction of its cost.

Every message runs under a few limits that almost never fire (the turn's `turn_timeout`, a
delivery's lease fence, the HTTP pool's timeout). `asyncio.timeout` gives each its own event-loop
timer, started on entry and cancelled on exit; under uvloop that is a libuv handle allocated,
started, stopped and closed per use (3.9-4.7 us per use alone, 1.35 us here; in the service, taking
the three away outright saved ~27 us of a reply's ~470: bench/README.md). Here limits of `SHORT`
seconds or more share one loop timer per `RESOLUTION` slot: entry and exit are a set insert and
removal, and a slot's timer, when it fires, cancels whatever is still inside it. Such a limit may
so fire up to `RESOLUTION` late; a shorter one, where that would be felt, gets a timer of its own.

It is a plain (not async) context manager: entering and leaving await nothing, and an `async with`
would build two coroutines per use for nothing. A block may await as any other.

On expiry the semantics are `asyncio.timeout`'s: the task is cancelled, and leaving the block turns
that cancellation into `TimeoutError` (`expired()` tells it from a timeout further out).
"""

from __future__ import annotations

import asyncio
import math
import types
from collections.abc import Coroutine, Generator
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

#: seconds: how late a shared-slot limit may fire
RESOLUTION = 0.1
#: delays below this many seconds get a timer of their own
SHORT = 2.0

#: loop -> its running task: what `asyncio.current_task()` reads, without its Python-level call and
#: its `get_running_loop()` (a getpid() system call on Python 3.11); None where asyncio keeps no such map
_CURRENT: dict[asyncio.AbstractEventLoop, asyncio.Task[Any]] | None = getattr(asyncio.tasks, "_current_tasks", None)


class _Slots:
    """Per event loop: slot end -> the guards whose limit falls in it, and the slot's one timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.slots: dict[float, set[Cutoff]] = {}

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
    """The context manager `cutoff()` returns for a delay: cancels the block's task at loop time
    `when` (in a shared slot, or, with `own_timer`, on a timer of its own)."""

    __slots__ = ("_cancelling", "_end", "_handle", "_slots", "_state", "_task", "_when")

    def __init__(self, when: float, slots: _Slots, own_timer: bool = False) -> None:
        self._when = when
        self._slots = slots
        self._state = "created"
        self._end = -1.0 if own_timer else math.ceil(when / RESOLUTION) * RESOLUTION
        self._handle: asyncio.TimerHandle | None = None

    def __enter__(self) -> Cutoff:
        if self._state != "created":
            raise RuntimeError("a cutoff is entered once")
        loop = self._slots.loop
        task = _CURRENT.get(loop) if _CURRENT is not None else asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("cutoff() should be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._state = "entered"
        end = self._end
        if end < 0:
            self._handle = loop.call_at(self._when, self._on_timeout)
            return self
        slots = self._slots.slots
        members = slots.get(end)
        if members is None:
            members = slots[end] = set()
            loop.call_at(end, self._slots._fire, end)
        members.add(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
    ) -> None:
        if self._state == "expiring":
            self._state = "expired"
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc_val
            return
        self._state = "exited"
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            return
        members = self._slots.slots.get(self._end)
        if members is not None:
            members.discard(self)

    def _on_timeout(self) -> None:
        self._handle = None
        if self._state == "entered":
            self._state = "expiring"
            self._task.cancel()

    def expired(self) -> bool:
        """The limit was reached (the block's TimeoutError is this limit's, not another one's)."""
        return self._state in ("expiring", "expired")


class _NoLimit:
    """`cutoff(None)`: a block without a limit."""

    __slots__ = ()

    def __enter__(self) -> _NoLimit:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def expired(self) -> bool:
        return False


NO_LIMIT = _NoLimit()


def cutoff(delay: float | None) -> Cutoff | _NoLimit:
    """`with cutoff(seconds) as cut:` the block's task is cancelled after `seconds` and the block
    raises TimeoutError, as under `asyncio.timeout(seconds)`; `None`: no limit."""
    if delay is None:
        return NO_LIMIT
    loop = asyncio.get_running_loop()
    return Cutoff(loop.time() + delay, _BY_LOOP.get(loop) or _slots(loop), delay < SHORT)


def first_step(coro: Coroutine[Any, Any, T]) -> tuple[bool, Any]:
    """Run `coro` up to its first await: (True, its result) if it finished there, else (False, what
    it awaits), to be handed on with `resume`. A limit only acts at an await, so a coroutine done in
    its first step (a flow that matched a route and rendered a reply) needs none:

        done, value = first_step(coro)
        if not done:
            with cutoff(seconds):
                value = await resume(coro, value)

    An exception the coroutine raises in its first step is raised here."""
    try:
        return False, coro.send(None)
    except StopIteration as stop:
        return True, stop.value


@types.coroutine
def resume(coro: Coroutine[Any, Any, T], awaiting: Any) -> Generator[Any, Any, T]:
    """The rest of a coroutine `first_step` began, as `await coro` would run it: what it awaits goes
    to the task, and what the task sends or throws (a result, a cancellation) goes back to it."""
    while True:
        try:
            sent = yield awaiting
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                awaiting = coro.throw(exc)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
        else:
            try:
                awaiting = coro.send(sent)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
