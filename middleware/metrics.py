"""Prometheus metrics, one registry per app so several apps (tests, benchmarks) can share a process."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

#: a labelled metric (Counter, Histogram) whose children `Metrics.child` keeps
M = TypeVar("M", Counter, Histogram)


class Metrics:
    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.webhooks = Counter(
            "switchboard_webhooks",
            "Webhook messages by result (accepted, duplicate, rejected).",
            ["platform", "result"],
            registry=r,
        )
        self.turn_seconds = Histogram(
            "switchboard_turn_seconds",
            "Time from a message's turn starting to its replies being stored.",
            ["platform"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.turn_failures = Counter(
            "switchboard_turn_failures",
            "Turns that fell back to the fallback reply, by reason.",
            ["platform", "reason"],
            registry=r,
        )
        self.deliveries = Counter(
            "switchboard_deliveries",
            "Platform API calls from the outbox by outcome.",
            ["platform", "kind", "status"],
            registry=r,
        )
        self.outbox_retries = Counter(
            "switchboard_outbox_retries", "Outbox deliveries scheduled for another attempt.", ["platform"], registry=r
        )
        self.rate_limited = Counter(
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

    def child(self, counter: M, *labels: str) -> M:
        """`counter.labels(*labels)` (a counter's or a histogram's), kept: labels() takes a lock and
        a lookup on every call, which the per-message paths (ingress, turn, outbox) would pay for
        each message."""
        key = (id(counter), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = counter.labels(*labels)
        child: M = found
        return child


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
