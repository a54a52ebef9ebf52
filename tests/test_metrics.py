"""middleware/metrics.py: the per-message counters and the turn histogram, kept in plain numbers,
are exported exactly as prometheus_client's own Counter and Histogram export the same observations."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from middleware.metrics import LabelledCounter, LabelledHistogram

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def text(registry: CollectorRegistry) -> str:
    """The exposition, creation times blanked (they differ by when each was made)."""
    return re.sub(r"(_created(?:\{[^}]*\})?) \S+", r"\1 T", generate_latest(registry).decode())


def test_counter_and_histogram_export_as_prometheus_clients_do() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counters = [
        LabelledCounter("sb_webhooks", "Webhooks.", ["platform", "result"], ours),
        Counter("sb_webhooks", "Webhooks.", ["platform", "result"], registry=theirs),
    ]
    histograms = [
        LabelledHistogram("sb_turn_seconds", "Turns.", ["platform"], BUCKETS, ours),
        Histogram("sb_turn_seconds", "Turns.", ["platform"], buckets=BUCKETS, registry=theirs),
    ]
    for counter in counters:
        counter.labels("a", "accepted").inc(3)
        counter.labels("a", "duplicate").inc()
        counter.labels("b", "accepted").inc(0.5)
    for histogram in histograms:
        for value in (0.0, 0.0005, 0.001, 0.003, 0.2, 1, 7, 30, 100):  # on bounds, between, past the last
            histogram.labels("a").observe(value)
        histogram.labels("b").observe(0.01)
    assert text(ours) == text(theirs)
    assert 'sb_turn_seconds_bucket{le="0.001",platform="a"} 3.0' in text(ours)  # le: value <= bound


def test_wrong_labels_and_a_negative_count_are_refused() -> None:
    registry = CollectorRegistry()
    counter = LabelledCounter("sb_x", "X.", ["platform"], registry)
    with pytest.raises(ValueError, match="takes the labels"):
        counter.labels("a", "b")
    with pytest.raises(ValueError, match="only go up"):
        counter.labels("a").inc(-1)
