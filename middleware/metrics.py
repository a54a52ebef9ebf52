"""Prometheus metrics, one registry per app so several apps (tests, benchmarks) can share a process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
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
        self.outbox = Gauge(
            "switchboard_outbox", "Outbox rows by state (pending, retrying, dead).", ["state"], registry=r
        )
        self.backlog = Gauge("switchboard_backlog", "Accepted messages whose turn has not run yet.", registry=r)
        self.active = Gauge(
            "switchboard_active_conversations", "Conversations being worked on by this node.", registry=r
        )
