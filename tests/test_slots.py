"""middleware/slots.py: asyncio.Semaphore's contract (a bound, first come first served, no slot lost
to a cancelled waiter), with a free slot taken by a plain call."""

from __future__ import annotations

import asyncio

import pytest

from middleware.slots import Slots


async def test_at_most_size_holders_and_waiters_served_in_order() -> None:
    slots = Slots(2)
    held = 0
    most = 0
    order: list[int] = []

    async def worker(n: int) -> None:
        nonlocal held, most
        if not slots.take():
            await slots.wait()
        try:
            held += 1
            most = max(most, held)
            order.append(n)
            await asyncio.sleep(0.01)
        finally:
            held -= 1
            slots.release()

    await asyncio.gather(*(worker(n) for n in range(10)))
    assert most == 2
    assert order == list(range(10))
    assert slots.free == 2 and not slots.locked()


async def test_a_free_slot_is_not_taken_past_those_waiting() -> None:
    slots = Slots(1)
    assert slots.take()
    waiting = asyncio.ensure_future(slots.wait())
    await asyncio.sleep(0)
    slots.release()  # handed to the waiter, not left free
    assert not slots.take()
    await waiting
    slots.release()
    assert slots.take()


async def test_a_cancelled_waiter_loses_no_slot() -> None:
    slots = Slots(1)
    assert slots.take()
    before = asyncio.ensure_future(slots.wait())
    after = asyncio.ensure_future(slots.wait())
    await asyncio.sleep(0)
    before.cancel()  # cancelled while waiting
    with pytest.raises(asyncio.CancelledError):
        await before
    slots.release()
    await asyncio.wait_for(after, 1)  # the slot went to the next one
    slots.release()
    assert slots.free == 1


async def test_a_slot_handed_to_a_waiter_cancelled_meanwhile_goes_on() -> None:
    slots = Slots(1)
    assert slots.take()
    first = asyncio.ensure_future(slots.wait())
    second = asyncio.ensure_future(slots.wait())
    await asyncio.sleep(0)
    slots.release()  # handed to `first`...
    first.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1)
    slots.release()
    assert slots.free == 1 and slots.take()


def test_a_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Slots(0)
