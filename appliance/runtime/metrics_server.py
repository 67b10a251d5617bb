"""The metrics endpoint: prometheus_client and an HTTP server on a Unix socket or a
loopback address, turning the loop's snapshots (:mod:`appliance.runtime.metrics`) into
metric families at scrape time. Imported only when ``metrics:`` is configured, so a
daemon without it does not carry prometheus_client and http.server in its memory."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from appliance.config.schema import MetricsSettings
from appliance.errors import KnockgateError
from appliance.runtime.metrics import (
    CLIENT_TIMEOUT,
    REPLY_TIMEOUT,
    Buckets,
    FleetNumbers,
    MetricsRequest,
    MetricsSnapshot,
)

log = logging.getLogger("knockgate.metrics")


# Counters read from ``counters`` by key: (family, help, key).
PLAIN_COUNTERS = (
    ("knockgate_packets", "Knock-port packets the engine saw.", "packets"),
    ("knockgate_capture_frames", "Frames the kernel filter passed to capture.", "frames"),
    (
        "knockgate_capture_kernel_drops",
        "Frames the kernel dropped before capture read them (its ring was full).",
        "frames_dropped",
    ),
    (
        "knockgate_attempts_evicted",
        "Knock attempts dropped because max_attempts was reached (a flood).",
        "evictions",
    ),
    ("knockgate_grant_failures", "Grants the firewall refused.", "grant_failures"),
    (
        "knockgate_firewall_repairs",
        "Times knockgate's rules were found changed and restored.",
        "firewall_repairs",
    ),
    ("knockgate_internal_errors", "Bugs caught by the loop (each also logged).", "internal_errors"),
)
CAPTURE_DISCARDS = ("bad_checksums", "not_for_host", "fragments", "malformed_frames", "martians")
SPA_DROPS = {"unauthenticated": "spa_unauthenticated", "undecodable": "spa_undecodable"}


class SnapshotCollector:
    """prometheus_client's custom collector: metric families from the latest snapshot."""

    def __init__(self, source: Callable[[], MetricsSnapshot | None], clock: Callable[[], float]):
        self.source = source
        self.clock = clock

    def describe(self) -> list[Metric]:
        return []  # registering must not ask the loop for anything

    def collect(self) -> Iterator[Metric]:
        snapshot = self.source()
        if snapshot is None:
            return
        yield from families(snapshot, self.clock())


def families(snap: MetricsSnapshot, now: float) -> Iterator[Metric]:
    counters = snap.counters
    for name, text, key in PLAIN_COUNTERS:
        yield CounterMetricFamily(name, text, value=counters.get(key, 0))
    discarded = CounterMetricFamily(
        "knockgate_capture_discarded",
        "Captured frames that are not knocks: what the host's own stack would drop.",
        labels=["reason"],
    )
    for reason in CAPTURE_DISCARDS:
        discarded.add_metric([reason], counters.get(reason, 0))
    yield discarded
    spa_dropped = CounterMetricFamily(
        "knockgate_spa_dropped",
        "SPA packets dropped at the edge (no key verifies them, or not a valid message).",
        labels=["reason"],
    )
    for reason, key in SPA_DROPS.items():
        spa_dropped.add_metric([reason], counters.get(key, 0))
    yield spa_dropped
    knocks = CounterMetricFamily(
        "knockgate_knocks",
        "Knocks by door and outcome: first_knock, stage (a later step, not the last), completed, "
        "reset, timed_out; a completed knock's answer: opened, held_off (scanner), unrecorded.",
        labels=["door", "outcome"],
    )
    for (door, outcome), count in sorted(snap.knocks.items()):
        knocks.add_metric([door, outcome], count)
    yield knocks
    spa = CounterMetricFamily(
        "knockgate_spa_refused",
        "Authenticated SPA packets refused, by door and reason.",
        labels=["door", "reason"],
    )
    for (door, reason), count in sorted(snap.spa_refused.items()):
        spa.add_metric([door, reason], count)
    yield spa
    grants = GaugeMetricFamily(
        "knockgate_grants_open",
        "Grants knockgate made that have not expired or been closed, by door.",
        labels=["door"],
    )
    for door in snap.doors:
        grants.add_metric([door], snap.grants_open.get(door, 0))
    yield grants
    yield _histogram(
        "knockgate_open_latency_seconds",
        "From the completing knock's receipt by the monitor to the grant in the firewall.",
        "door",
        snap.open_latency,
    )
    starts = CounterMetricFamily(
        "knockgate_service_starts",
        "Service starts by outcome (ready, failed).",
        labels=["service", "outcome"],
    )
    for (service, outcome), count in sorted(snap.service_starts.items()):
        starts.add_metric([service, outcome], count)
    yield starts
    yield _histogram(
        "knockgate_service_cold_start_seconds",
        "From a service's start asked of the launcher to the service answering.",
        "service",
        snap.cold_start,
    )
    running = GaugeMetricFamily(
        "knockgate_service_up", "1 while the service runs, else 0.", labels=["service"]
    )
    for service, up in sorted(snap.services_running.items()):
        running.add_metric([service], up)
    yield running
    reloads = CounterMetricFamily(
        "knockgate_reloads", "Configuration reloads by outcome.", labels=["outcome"]
    )
    reloads.add_metric(["ok"], counters.get("reloads", 0))
    reloads.add_metric(["refused"], counters.get("reload_failures", 0))
    yield reloads
    yield CounterMetricFamily(
        "knockgate_events_followers_dropped",
        "Event followers cut off because they read too slowly.",
        value=snap.events_followers_dropped,
    )
    if snap.fleet is not None:
        yield from _fleet_families(snap.fleet)
    sent = CounterMetricFamily(
        "knockgate_notifications",
        "Notifications by notifier and outcome: sent, failed (an attempt; retried), "
        "rejected (refused by the receiver for good), dropped (queue full or shutdown).",
        labels=["notifier", "outcome"],
    )
    for (notifier, outcome), count in sorted(snap.notifications.items()):
        sent.add_metric([notifier, outcome], count)
    yield sent
    queued = GaugeMetricFamily(
        "knockgate_notifications_queued",
        "Notifications waiting for delivery (a receiver that is down), by notifier.",
        labels=["notifier"],
    )
    for notifier, count in sorted(snap.notifications_queued.items()):
        queued.add_metric([notifier], count)
    yield queued
    yield GaugeMetricFamily(
        "knockgate_snapshot_age_seconds",
        "How old the numbers served are (the loop answers each scrape unless it is busy).",
        value=round(max(0.0, now - snap.taken), 3),
    )


def _fleet_families(fleet: FleetNumbers) -> Iterator[Metric]:
    """The fleet's health (issue 14): present only with ``fleet:`` configured."""
    yield GaugeMetricFamily(
        "knockgate_fleet_reachable",
        "1 while the fleet's shared state (Redis) answers.",
        value=int(fleet.reachable),
    )
    yield CounterMetricFamily(
        "knockgate_fleet_published",
        "Grants and revocations made here and written to the fleet.",
        value=fleet.published,
    )
    applied = CounterMetricFamily(
        "knockgate_fleet_applied", "Fleet messages from other hosts applied here.", labels=["kind"]
    )
    applied.add_metric(["grant"], fleet.applied)
    applied.add_metric(["revoke"], fleet.revocations_applied)
    yield applied
    yield GaugeMetricFamily(
        "knockgate_fleet_backlog",
        "Messages waiting for the shared state to come back.",
        value=fleet.backlog,
    )
    claims = CounterMetricFamily(
        "knockgate_fleet_claims",
        "Shared claims (SPA packets, TOTP steps, one-time lines) by outcome.",
        labels=["outcome"],
    )
    for outcome, count in sorted(fleet.claims.items()):
        claims.add_metric([outcome], count)
    yield claims
    refused = CounterMetricFamily(
        "knockgate_fleet_refused",
        "Fleet entries not applied as they came, by reason: malformed, capped (applied, "
        "shortened to this host's door), expired, stale (a backlog grant closed elsewhere "
        "meanwhile), own_address.",
        labels=["reason"],
    )
    for reason, count in sorted(fleet.refused.items()):
        refused.add_metric([reason], count)
    yield refused


def _histogram(name: str, text: str, label: str, by: Mapping[str, Buckets]) -> Metric:
    family = HistogramMetricFamily(name, text, labels=[label])
    for value, buckets in sorted(by.items()):
        family.add_metric([value], buckets.cumulative(), sum_value=buckets.total)
    return family


class MetricsHub:
    """Between the scrapers' threads and the loop: asks the loop for a snapshot through
    its queue (one request for every scrape waiting), keeps the last answer."""

    def __init__(
        self, enqueue: Callable[[Any], None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.enqueue = enqueue
        self.clock = clock
        self._lock = threading.Lock()
        self._asked: threading.Event | None = None
        self.last: MetricsSnapshot | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(self.snapshot, clock))

    def snapshot(self) -> MetricsSnapshot | None:
        with self._lock:
            asked, first = self._asked, self._asked is None
            if asked is None:
                asked = self._asked = threading.Event()
        if first:
            self.enqueue(MetricsRequest(self._answer))
        if not asked.wait(REPLY_TIMEOUT):
            with self._lock:  # the next scrape asks again (a late answer still counts)
                if self._asked is asked:
                    self._asked = None
        return self.last

    def _answer(self, snapshot: MetricsSnapshot) -> None:
        """In the loop."""
        with self._lock:
            self.last = snapshot
            asked, self._asked = self._asked, None
        if asked is not None:
            asked.set()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Handler(BaseHTTPRequestHandler):
    server_version = "knockgate"
    sys_version = ""
    timeout = CLIENT_TIMEOUT
    hub: MetricsHub

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404, "only /metrics here")
            return
        body = self.hub.exposition()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:
        return str(self.client_address[0])

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: %s", format % args)  # quiet: one scrape every few seconds


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)  # http.server wants a (host, port) client address


class _TcpServer(ThreadingHTTPServer):
    daemon_threads = True


class _Tcp6Server(_TcpServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """The HTTP endpoint, on a Unix socket (mode 0600) or a TCP address."""

    def __init__(self, settings: MetricsSettings, hub: MetricsHub) -> None:
        self.settings = settings
        self.hub = hub
        self.server: socketserver.BaseServer | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        handler = type("Handler", (_Handler,), {"hub": self.hub})
        settings = self.settings
        try:
            if settings.unix_path is not None:
                path = settings.unix_path
                directory = os.path.dirname(path)
                if directory:
                    os.makedirs(directory, mode=0o755, exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                server: socketserver.BaseServer = _UnixServer(path, handler)
                os.chmod(path, 0o600)
            else:
                tcp = _Tcp6Server if ":" in settings.host else _TcpServer
                server = tcp((settings.host, settings.port), handler)
        except OSError as error:
            raise KnockgateError(
                f"metrics: cannot listen on {settings.listen}: {error.strerror or error}"
            ) from None
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        self.thread.start()
        log.info("metrics on %s", settings.listen)

    def stop(self) -> None:
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        if self.settings.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.settings.unix_path)
        self.server = None
