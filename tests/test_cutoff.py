"""middleware/cutoff.py: asyncio.timeout's semantics on shared, coarse loop timers (and on a timer
of its own for short delays), as a plain context manager."""

from __future__ import annotations

import asyncio
import time

import pytest

from middleware import cutoff as cutoff_module
from middleware.cutoff import Cutoff, cutoff, first_step, resume


def near(seconds: float) -> Cutoff:
    """A shared-slot limit `seconds` from now (cutoff() itself gives those only to long delays)."""
    loop = asyncio.get_running_loop()
    return Cutoff(loop.time() + seconds, cutoff_module._slots(loop))


async def test_a_block_past_its_limit_raises_timeout_error() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError), near(0.05) as cut:
        await asyncio.sleep(5)
    late = time.monotonic() - started
    assert cut.expired()
    assert 0.05 <= late < 0.05 + cutoff_module.RESOLUTION + 0.5


async def test_a_block_within_its_limit_is_left_alone() -> None:
    with near(0.3) as cut:
        await asyncio.sleep(0.01)
    assert not cut.expired()
    await asyncio.sleep(0.5)  # its slot's timer fires later and finds nothing to cancel
    assert not cut.expired()


async def test_many_limits_share_a_slot_and_only_the_late_ones_fire() -> None:
    results: list[str] = []

    async def work(seconds: float) -> None:
        try:
            with near(0.1):
                await asyncio.sleep(seconds)
            results.append("done")
        except TimeoutError:
            results.append("timeout")

    await asyncio.gather(*(work(0.0 if i % 2 else 5.0) for i in range(20)))
    assert sorted(results) == ["done"] * 10 + ["timeout"] * 10


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    async def guarded() -> None:
        with near(30):
            await asyncio.sleep(30)

    task = asyncio.create_task(guarded())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_inner_limit_does_not_claim_an_outer_ones_timeout() -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05) as outer:
            with near(30) as inner:
                await asyncio.sleep(5)
    assert outer.expired()
    assert not inner.expired()


async def test_a_short_delay_gets_a_timer_of_its_own_and_none_no_limit() -> None:
    slots = cutoff_module._slots(asyncio.get_running_loop())
    started = time.monotonic()
    with pytest.raises(TimeoutError), cutoff(0.05) as cut:
        assert not any(cut in members for members in slots.slots.values())
        await asyncio.sleep(5)
    assert cut.expired()
    assert 0.05 <= time.monotonic() - started < 0.05 + cutoff_module.RESOLUTION / 2 + 0.2
    with cutoff(0.05) as cut:  # left in time: its timer is gone with it
        await asyncio.sleep(0)
    await asyncio.sleep(0.1)
    assert not cut.expired()
    with cutoff(None) as unlimited:
        await asyncio.sleep(0)
    assert not unlimited.expired()
    assert isinstance(cutoff(cutoff_module.SHORT), Cutoff)


async def test_the_error_in_the_block_passes_through_and_the_slot_forgets_the_block() -> None:
    with pytest.raises(ValueError, match="boom"), cutoff(60):
        raise ValueError("boom")
    slots = cutoff_module._slots(asyncio.get_running_loop())
    assert all(not members for members in slots.slots.values())


async def test_a_coroutine_done_at_its_first_step_needs_no_limit_and_the_rest_runs_under_one() -> None:
    async def at_once() -> str:
        return "now"

    assert first_step(at_once()) == (True, "now")

    async def after(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "later"

    coro = after(0.01)
    done, value = first_step(coro)
    assert not done
    with cutoff(5):
        assert await resume(coro, value) == "later"

    cleaned = []

    async def slow() -> None:
        try:
            await asyncio.sleep(5)
        finally:
            cleaned.append(True)

    coro = slow()
    done, value = first_step(coro)
    with pytest.raises(TimeoutError), cutoff(0.05) as cut:
        await resume(coro, value)
    assert cut.expired() and cleaned == [True]  # the coroutine itself was cancelled


async def test_errors_of_the_first_step_and_of_the_rest_reach_the_caller() -> None:
    async def broken() -> None:
        raise ValueError("first")

    with pytest.raises(ValueError, match="first"):
        first_step(broken())

    async def broken_later() -> None:
        await asyncio.sleep(0)
        raise ValueError("later")

    coro = broken_later()
    _, value = first_step(coro)
    with pytest.raises(ValueError, match="later"):
        await resume(coro, value)
