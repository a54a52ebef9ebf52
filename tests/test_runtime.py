"""The interpreter's tuning for `switchboard serve` (middleware/runtime.py)."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator

import pytest

from middleware import runtime


@pytest.fixture(autouse=True)
def interpreter_restored() -> Iterator[None]:
    interval, threshold = sys.getswitchinterval(), gc.get_threshold()
    try:
        yield
    finally:
        sys.setswitchinterval(interval)
        gc.set_threshold(*threshold)
        gc.unfreeze()


def test_tune_freezes_what_is_loaded_and_starts_quick() -> None:
    runtime.tune()
    assert gc.get_threshold() == (20_000, 50, 100)
    assert gc.get_freeze_count() > 0
    assert sys.getswitchinterval() == pytest.approx(runtime.QUICK)


def test_switch_interval_follows_the_backlog_across_its_mark() -> None:
    sys.setswitchinterval(runtime.QUICK)
    policy = runtime.SwitchInterval(busy_backlog=4)
    seen = []
    for backlog in (0, 3, 4, 5, 9, 5, 4, 0, 7):
        policy.load(backlog)
        seen.append((policy.busy, sys.getswitchinterval()))
    quick, batching = (False, pytest.approx(runtime.QUICK)), (True, pytest.approx(runtime.BATCHING))
    assert seen == [quick, quick, quick, batching, batching, batching, quick, quick, batching]


def test_the_interval_is_only_set_when_the_load_crosses_the_mark() -> None:
    policy = runtime.SwitchInterval(busy_backlog=4)
    policy.load(10)
    sys.setswitchinterval(0.01)  # another setting meanwhile: a load on the same side leaves it
    policy.load(20)
    assert sys.getswitchinterval() == pytest.approx(0.01)
    policy.load(1)
    assert sys.getswitchinterval() == pytest.approx(runtime.QUICK)
