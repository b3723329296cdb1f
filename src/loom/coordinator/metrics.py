"""Prometheus metrics of one coordinator app: a registry per app (tests run many apps in one
process), API latency by route template, placement latency, and a snapshot collector for
what is read from the database at scrape time (see ``api/metrics.py``).

Code that runs deep in services (placement) finds its app's metrics through a context
variable that `MetricsMiddleware` sets for every ASGI scope — lifespan included, so the
background loops started there inherit it too.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loom.core.placement import PlacementFailure

P = ParamSpec("P")
T = TypeVar("T")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Snapshot:
    """Facts read from the database (and the hub) just before each scrape."""

    nodes_by_state: dict[str, int] = field(default_factory=dict)
    #: (kind, state) → devices
    devices_by_state: dict[tuple[str, str], int] = field(default_factory=dict)
    clusters_by_state: dict[str, int] = field(default_factory=dict)
    members_by_state: dict[str, int] = field(default_factory=dict)
    challenges_by_outcome: dict[str, int] = field(default_factory=dict)
    ledger_by_kind: dict[str, int] = field(default_factory=dict)
    #: micro-credits, by where the money sits (see services.explorer_ledger.totals_micro)
    ledger_totals: dict[str, int] = field(default_factory=dict)
    heartbeats_total: int = 0
    heartbeats_per_s: float = 0.0
    agents_connected: int = 0
    utilization: dict[str, float] = field(default_factory=dict)


class SnapshotCollector(Collector):
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        s = self.snapshot
        nodes = GaugeMetricFamily("loom_nodes", "Nodes by state", labels=["state"])
        for state, n in sorted(s.nodes_by_state.items()):
            nodes.add_metric([state], n)
        yield nodes
        devices = GaugeMetricFamily(
            "loom_devices", "Devices by kind and state", labels=["kind", "state"]
        )
        for (kind, state), n in sorted(s.devices_by_state.items()):
            devices.add_metric([kind, state], n)
        yield devices
        clusters = GaugeMetricFamily("loom_clusters", "Clusters by state", labels=["state"])
        for state, n in sorted(s.clusters_by_state.items()):
            clusters.add_metric([state], n)
        yield clusters
        members = GaugeMetricFamily("loom_members", "Cluster members by state", labels=["state"])
        for state, n in sorted(s.members_by_state.items()):
            members.add_metric([state], n)
        yield members
        challenges = CounterMetricFamily(
            "loom_challenges", "Hardware challenges by outcome", labels=["outcome"]
        )
        for outcome, n in sorted(s.challenges_by_outcome.items()):
            challenges.add_metric([outcome], n)
        yield challenges
        txns = CounterMetricFamily(
            "loom_ledger_transactions", "Ledger transactions by kind", labels=["kind"]
        )
        for kind, n in sorted(s.ledger_by_kind.items()):
            txns.add_metric([kind], n)
        yield txns
        totals = GaugeMetricFamily(
            "loom_ledger_credits", "Credits by where they sit (and ever earned)", labels=["bucket"]
        )
        for bucket, micro in sorted(s.ledger_totals.items()):
            totals.add_metric([bucket], micro / 1_000_000)
        yield totals
        yield CounterMetricFamily(
            "loom_heartbeats", "Agent heartbeats received", value=s.heartbeats_total
        )
        yield GaugeMetricFamily(
            "loom_heartbeats_per_second", "Heartbeat rate (last 10 s)", value=s.heartbeats_per_s
        )
        yield GaugeMetricFamily(
            "loom_agents_connected", "Agents with an open WebSocket", value=s.agents_connected
        )
        util = GaugeMetricFamily(
            "loom_utilization_ratio", "Allocated units / online units", labels=["kind"]
        )
        for kind, ratio in sorted(s.utilization.items()):
            util.add_metric([kind], ratio)
        yield util


class CoordinatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.api_latency = Histogram(
            "loom_api_request_duration_seconds",
            "HTTP request latency by route template",
            ["method", "route", "status"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.placement_latency = Histogram(
            "loom_placement_duration_seconds",
            "Placement latency (index build and plan), by outcome",
            ["outcome"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        #: One row's failure in a background loop (isolated; the loop goes on with the rest).
        self.loop_item_errors = Counter(
            "loom_loop_item_errors",
            "Items a background loop failed on (each isolated; the others still progress)",
            ["loop"],
            registry=self.registry,
        )
        self.snapshot = Snapshot()
        self.registry.register(SnapshotCollector(self.snapshot))


current: ContextVar[CoordinatorMetrics | None] = ContextVar("loom_metrics", default=None)

#: Loop item errors counted outside any app (no registry current), by loop.
unattached_loop_errors: dict[str, int] = {}


def count_loop_item_error(loop: str) -> None:
    """Count one isolated failure of a background loop's item (see loops/isolation.py)."""
    metrics = current.get()
    if metrics is not None:
        metrics.loop_item_errors.labels(loop).inc()
    else:
        unattached_loop_errors[loop] = unattached_loop_errors.get(loop, 0) + 1


def timed_placement(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Observe how long a placement takes, in the current app's histogram (if any)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await fn(*args, **kwargs)
            outcome = "no_capacity" if isinstance(result, PlacementFailure) else "placed"
            return result
        finally:
            metrics = current.get()
            if metrics is not None:
                metrics.placement_latency.labels(outcome).observe(time.perf_counter() - started)

    return wrapper


class MetricsMiddleware:
    """Pure ASGI: makes the app's metrics current and times every HTTP request."""

    def __init__(self, app: ASGIApp, metrics: CoordinatorMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = current.set(self.metrics)
        try:
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            started = time.perf_counter()
            status = 500

            async def send_status(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                await send(message)

            try:
                await self.app(scope, receive, send_status)
            finally:
                route = getattr(scope.get("route"), "path", None) or "<unmatched>"
                self.metrics.api_latency.labels(scope["method"], route, str(status)).observe(
                    time.perf_counter() - started
                )
        finally:
            current.reset(token)
