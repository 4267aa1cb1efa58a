"""Prometheus metrics, one registry per app so tests and replicas count on their own."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from gateway.models import JobEvent
from gateway.states import State


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.transitions = Counter(
            "gateway_job_transitions",
            "Job transitions recorded, by the state entered.",
            ["state"],
            registry=self.registry,
        )
        self.callbacks = Counter(
            "gateway_callbacks",
            "Terminal calls on continue URLs, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.sweeper_lag = Gauge(
            "gateway_sweeper_lag_seconds",
            "How late the oldest deadline fired in the last sweep was.",
            registry=self.registry,
        )
        self.expired = Counter(
            "gateway_deadlines_expired",
            "Jobs failed by the sweeper, by failure reason.",
            ["reason"],
            registry=self.registry,
        )

        self.webhook_attempts = Counter(
            "gateway_webhook_attempts",
            "Webhook delivery attempts, by outcome.",
            ["outcome"],
            registry=self.registry,
        )

    def record(self, events: Iterable[JobEvent]) -> None:
        """Count the transitions of `events` (one increment per state: a sweep reports
        thousands of events at once)."""
        counts: dict[State, int] = {}
        for event in events:
            counts[event.state] = counts.get(event.state, 0) + 1
        for state, count in counts.items():
            self.transitions.labels(state.value).inc(count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
