"""Prometheus metrics, produced at scrape time from a snapshot the loop hands over.

The hot path keeps plain counters (the engine's, the packet process's, the knock tally
by door); nothing is locked or formatted per packet. A scrape asks the loop for a
snapshot through its queue (scrapes waiting at the same time share one), and a custom
collector turns that into metric families::

    HTTP GET /metrics (a thread of the server) --> MetricsHub.snapshot()
        --> enqueue(MetricsRequest) --> loop: Daemon.metrics_snapshot() --> reply
        --> SnapshotCollector.collect() --> prometheus_client's text format

When the loop does not answer within :data:`REPLY_TIMEOUT` the last snapshot is served
again (``knockgate_snapshot_age_seconds`` says how old it is). The server listens only on
a Unix socket or a loopback address unless the configuration says ``allow_remote``.
Label values are door and service names from the configuration and fixed words, never
addresses: a spoofed flood cannot add a series.

This module holds what the loop keeps and hands over (plain data); the collector and the
HTTP server are in :mod:`appliance.runtime.metrics_server`, imported only when metrics are
configured.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

log = logging.getLogger("knockgate.metrics")

REPLY_TIMEOUT = 2.0  # for the loop to answer a scrape
CLIENT_TIMEOUT = 5.0  # for a scraper to send its request and take the answer

# Knock -> open: from the completing packet's receipt by the monitor to the grant in place.
OPEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# A service's cold start: from the start asked of the launcher to the service answering.
COLD_START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)


class Buckets:
    """A histogram the loop fills (one ``bisect`` per observation, not per packet)."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def copy(self) -> Buckets:
        other = Buckets(self.bounds)
        other.counts, other.count, other.total = list(self.counts), self.count, self.total
        return other

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus' buckets: (upper bound, observations at or below it), +Inf last."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


@dataclass
class Observations:
    """What the loop measures for the metrics besides counters it keeps anyway."""

    open_latency: dict[str, Buckets] = field(default_factory=dict)  # by door
    cold_start: dict[str, Buckets] = field(default_factory=dict)  # by service
    service_starts: dict[tuple[str, str], int] = field(default_factory=dict)  # service, outcome

    def latency(self, door: str, seconds: float) -> None:
        buckets = self.open_latency.get(door)
        if buckets is None:
            buckets = self.open_latency[door] = Buckets(OPEN_LATENCY_BUCKETS)
        buckets.observe(seconds)

    def started(self, service: str, outcome: str, seconds: float | None = None) -> None:
        key = (service, outcome)
        self.service_starts[key] = self.service_starts.get(key, 0) + 1
        if seconds is not None:
            buckets = self.cold_start.get(service)
            if buckets is None:
                buckets = self.cold_start[service] = Buckets(COLD_START_BUCKETS)
            buckets.observe(seconds)

    def keep(self, doors: set[str], services: set[str]) -> None:
        """A reload: the series of doors and services that are gone go."""
        self.open_latency = {d: b for d, b in self.open_latency.items() if d in doors}
        self.cold_start = {s: b for s, b in self.cold_start.items() if s in services}
        self.service_starts = {k: n for k, n in self.service_starts.items() if k[0] in services}


@dataclass(frozen=True)
class MetricsSnapshot:
    """Plain data, copied by the loop: the collector reads it on another thread."""

    taken: float  # monotonic
    counters: Mapping[str, int]  # engine, capture and daemon counters (knockgate status's)
    knocks: Mapping[tuple[str, str], int]  # (door, outcome)
    spa_refused: Mapping[tuple[str, str], int]  # (door, reason)
    grants_open: Mapping[str, int]  # by door
    open_latency: Mapping[str, Buckets]
    service_starts: Mapping[tuple[str, str], int]  # (service, outcome)
    cold_start: Mapping[str, Buckets]
    services_running: Mapping[str, int]  # 1 while the service runs (ready or serving)
    doors: tuple[str, ...]
    events_followers_dropped: int = 0
    notifications: Mapping[tuple[str, str], int] = field(default_factory=dict)  # name, outcome
    notifications_queued: Mapping[str, int] = field(default_factory=dict)  # by notifier
    fleet: FleetNumbers | None = None  # with fleet: configured


@dataclass(frozen=True)
class FleetNumbers:
    """The fleet's health and traffic (issue 14), copied by the loop."""

    reachable: bool
    published: int  # grants and revocations written to the store
    applied: int  # grants from other hosts applied here
    revocations_applied: int
    backlog: int  # messages waiting for the store to come back
    claims: Mapping[str, int]  # shared claims by outcome: claimed, taken, unreachable, local
    refused: Mapping[str, int] = field(default_factory=dict)  # entries not applied as they came


@dataclass(frozen=True, slots=True)
class MetricsRequest:
    """A scrape asks the loop for a snapshot; ``reply`` gets it (in the loop)."""

    reply: Callable[[MetricsSnapshot], None]
