"""Prometheus metrics, one registry per app so several apps (tests, benchmarks) can share a process.

What the per-message paths count (webhooks, turn latency, deliveries) is kept in plain numbers by
`LabelledCounter` and `LabelledHistogram` and read by the registry at scrape time: prometheus_client's
own Counter and Histogram check, lock and look up on every increment, about 400 interpreted steps a
reply of the service's ~8,400 (bench/README.md). They are only bumped on the event loop's thread.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample


class Count:
    """One label set's count."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


C = TypeVar("C")


class _Labelled(Collector, Generic[C]):
    """A labelled metric: one cell per label set, made by `make` on first use, read at scrape time."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str],
        registry: CollectorRegistry,
        make: Callable[[], C],
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._make = make
        self._cells: dict[tuple[str, ...], C] = {}
        registry.register(self)

    def labels(self, *values: str) -> C:
        cell = self._cells.get(values)
        if cell is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes the labels {self.labelnames}, got {values!r}")
            cell = self._cells[values] = self._make()
        return cell

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def _family(self) -> Metric:
        raise NotImplementedError


class LabelledCounter(_Labelled[Count]):
    """A labelled Prometheus counter (`labels(*values).inc()`), exported as prometheus_client's
    Counter is: `<name>_total` and `<name>_created` per label set."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str], registry: CollectorRegistry) -> None:
        super().__init__(name, documentation, labelnames, registry, Count)

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, cell in list(self._cells.items()):
            family.add_metric(values, cell.value, created=cell.created)
        yield family


class Observations:
    """One label set's histogram: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class LabelledHistogram(_Labelled[Observations]):
    """A labelled Prometheus histogram (`labels(*values).observe(x)`), exported as prometheus_client's
    Histogram is: `_bucket` (cumulative, `le`), `_count`, `_sum` and `_created` per label set."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str],
        buckets: Iterable[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        super().__init__(name, documentation, labelnames, registry, lambda: Observations(self.bounds))

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, cell in list(self._cells.items()):
            total = 0
            buckets: list[tuple[str, float]] = []
            for bound, n in zip(self.bounds, list(cell.counts), strict=True):
                total += n
                buckets.append((_go_float(bound), float(total)))
            family.add_metric(values, buckets, cell.sum)
            family.samples.append(
                Sample(f"{self.name}_created", dict(zip(self.labelnames, values, strict=True)), cell.created)
            )
        yield family


def _go_float(bound: float) -> str:
    """A bucket's `le` label as prometheus_client writes it ("0.005", "1.0", "+Inf")."""
    return "+Inf" if bound == math.inf else repr(float(bound))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.webhooks = LabelledCounter(
            "switchboard_webhooks",
            "Webhook messages by result (accepted, duplicate, rejected).",
            ["platform", "result"],
            r,
        )
        self.turn_seconds = LabelledHistogram(
            "switchboard_turn_seconds",
            "Time from a message's turn starting to its replies being stored.",
            ["platform"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.turn_failures = LabelledCounter(
            "switchboard_turn_failures",
            "Turns that fell back to the fallback reply, by reason.",
            ["platform", "reason"],
            registry=r,
        )
        self.deliveries = LabelledCounter(
            "switchboard_deliveries",
            "Platform API calls from the outbox by outcome.",
            ["platform", "kind", "status"],
            registry=r,
        )
        self.outbox_retries = LabelledCounter(
            "switchboard_outbox_retries", "Outbox deliveries scheduled for another attempt.", ["platform"], registry=r
        )
        self.rate_limited = LabelledCounter(
            "switchboard_rate_limited",
            "Outbox sends held back by a platform's or a conversation's token bucket.",
            ["platform"],
            registry=r,
        )
        self.outbox = Gauge(
            "switchboard_outbox", "Outbox rows by state (pending, retrying, dead).", ["state"], registry=r
        )
        self.backlog = Gauge("switchboard_backlog", "Accepted messages whose turn has not run yet.", registry=r)
        self.active = Gauge(
            "switchboard_active_conversations", "Conversations being worked on by this node.", registry=r
        )


class ConnectorCollector(Collector):
    """Per-connector numbers read at scrape time from the connectors' own statistics
    (`connectors.resilience.Guard`): calls, errors by kind, retries, latency, breaker state."""

    def __init__(self, source: Callable[[], Mapping[str, object]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        from connectors.resilience import BUCKETS, HttpConnector

        calls = CounterMetricFamily(
            "switchboard_connector_calls", "Connector calls by outcome (ok, error).", labels=["connector", "outcome"]
        )
        errors = CounterMetricFamily(
            "switchboard_connector_errors",
            "Connector errors by kind (timeout, unavailable, auth, bad_response, circuit_open).",
            labels=["connector", "kind"],
        )
        retries = CounterMetricFamily(
            "switchboard_connector_retries",
            "Requests repeated after 429, 5xx or a transport error.",
            labels=["connector"],
        )
        seconds = HistogramMetricFamily(
            "switchboard_connector_seconds", "Connector call latency, retries included.", labels=["connector"]
        )
        breaker = GaugeMetricFamily(
            "switchboard_connector_breaker",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            labels=["connector"],
        )
        in_flight = GaugeMetricFamily("switchboard_connector_in_flight", "Calls in flight.", labels=["connector"])
        states = {"closed": 0, "half_open": 1, "open": 2}
        for name, connector in sorted(self.source().items()):
            if not isinstance(connector, HttpConnector):
                continue
            s = connector.guard.stats
            calls.add_metric([name, "ok"], s.ok)
            calls.add_metric([name, "error"], s.calls - s.ok)
            for kind, n in sorted(s.errors.items()):
                errors.add_metric([name, kind], n)
            retries.add_metric([name], s.retries)
            buckets = [(str(le), float(n)) for le, n in zip(BUCKETS, s.buckets, strict=False)]
            buckets.append(("+Inf", float(s.buckets[-1])))
            seconds.add_metric([name], buckets, s.seconds_sum)
            breaker.add_metric([name], states[connector.guard.breaker.state])
            in_flight.add_metric([name], s.in_flight)
        yield from (calls, errors, retries, seconds, breaker, in_flight)


def observe_connectors(metrics: Metrics, source: Callable[[], Mapping[str, object]]) -> None:
    """Export the connectors that `source()` returns (read at each scrape) in `metrics.registry`."""
    metrics.registry.register(ConnectorCollector(source))


class StoreCollector(Collector):
    """The store's group commit, read at scrape time: transactions, the operations they carried
    (operations / transactions = how many webhooks and turns share a commit) and conflicts rerun."""

    def __init__(self, source: Callable[[], object | None]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        store = self.source()
        transactions = CounterMetricFamily("switchboard_store_transactions", "Transactions the store committed.")
        operations = CounterMetricFamily(
            "switchboard_store_operations", "Store operations, several to a group-committed transaction."
        )
        conflicts = CounterMetricFamily(
            "switchboard_store_conflicts", "Operations rerun after a deadlock or serialization failure."
        )
        transactions.add_metric([], getattr(store, "batches", 0))
        operations.add_metric([], getattr(store, "operations", 0))
        conflicts.add_metric([], getattr(store, "conflicts", 0))
        yield from (transactions, operations, conflicts)
