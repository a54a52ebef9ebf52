"""`Slots`: at most `size` holders at once, first come first served (asyncio.Semaphore's contract),
where taking a free slot is a plain call rather than two coroutines.

Every reply takes two (a conversation worker's place, an HTTP connection's); `async with
asyncio.Semaphore` builds an `__aenter__` and an `acquire` coroutine and scans the waiters each time.

    if not slots.take():
        await slots.wait()
    try:
        ...
    finally:
        slots.release()
"""

from __future__ import annotations

import asyncio
import collections


class Slots:
    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("slots need a size of at least 1")
        self.free = size
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def take(self) -> bool:
        """Take a free slot now (True), or not when none is free or others wait for one (False)."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        return False

    async def wait(self) -> None:
        """Wait for a slot, in turn with the others waiting (after `take()` said no). A slot handed
        over to a waiter cancelled meanwhile goes on to the next one."""
        if self.take():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():  # not handed over: out of the queue (unless a release took it out)
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            else:  # handed over, but this task is cancelled: on to the next one
                self.release()
            raise

    def release(self) -> None:
        """Give a slot back: to the first waiter still waiting, else to the free ones."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1

    def locked(self) -> bool:
        """No slot can be taken now."""
        return not (self.free > 0 and not self._waiters)
