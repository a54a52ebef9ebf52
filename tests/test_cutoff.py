"""middleware/cutoff.py: asyncio.timeout's semantics on shared, coarse loop timers."""

from __future__ import annotations

import asyncio
import time

import pytest

from middleware import cutoff as cutoff_module
from middleware.cutoff import Cutoff, cutoff


def near(seconds: float) -> Cutoff:
    """A shared-slot limit `seconds` from now (cutoff() itself gives those only to long delays)."""
    return Cutoff(asyncio.get_running_loop().time() + seconds)


async def test_a_block_past_its_limit_raises_timeout_error() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with near(0.05) as cut:
            await asyncio.sleep(5)
    late = time.monotonic() - started
    assert cut.expired()
    assert 0.05 <= late < 0.05 + cutoff_module.RESOLUTION + 0.5


async def test_a_block_within_its_limit_is_left_alone() -> None:
    async with near(0.3) as cut:
        await asyncio.sleep(0.01)
    assert not cut.expired()
    await asyncio.sleep(0.5)  # its slot's timer fires later and finds nothing to cancel
    assert not cut.expired()


async def test_many_limits_share_a_slot_and_only_the_late_ones_fire() -> None:
    results: list[str] = []

    async def work(seconds: float) -> None:
        try:
            async with near(0.1):
                await asyncio.sleep(seconds)
            results.append("done")
        except TimeoutError:
            results.append("timeout")

    await asyncio.gather(*(work(0.0 if i % 2 else 5.0) for i in range(20)))
    assert sorted(results) == ["done"] * 10 + ["timeout"] * 10


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    async def guarded() -> None:
        async with near(30):
            await asyncio.sleep(30)

    task = asyncio.create_task(guarded())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_inner_limit_does_not_claim_an_outer_ones_timeout() -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05) as outer:
            async with near(30) as inner:
                await asyncio.sleep(5)
    assert outer.expired()
    assert not inner.expired()


async def test_short_delays_and_none_take_asyncio_timeout() -> None:
    assert isinstance(cutoff(None), asyncio.Timeout)
    assert isinstance(cutoff(cutoff_module.SHORT / 2), asyncio.Timeout)
    assert isinstance(cutoff(cutoff_module.SHORT), Cutoff)
    async with cutoff(None):
        await asyncio.sleep(0)


async def test_the_error_in_the_block_passes_through_and_the_slot_forgets_the_block() -> None:
    with pytest.raises(ValueError, match="boom"):
        async with cutoff(60):
            raise ValueError("boom")
    slots = cutoff_module._slots(asyncio.get_running_loop())
    assert all(not members for members in slots.slots.values())
