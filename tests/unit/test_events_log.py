"""The event stream: records from the daemon's decisions, flood summaries, followers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.core.events import Packet
from appliance.firewall.memory import MemoryBackend
from appliance.runtime.daemon import Daemon
from appliance.runtime.events_log import (
    REFUSAL_BUDGET,
    SUMMARY_SECONDS,
    EventLog,
    EventRecord,
)
from appliance.runtime.items import StatusRequest
from appliance.runtime.status import StatusServer, events, query

CONFIG = """\
status_socket: {tmp}/status.sock
state_dir: {tmp}/state
firewall:
  scan: {{ports: 10, window: 2, hold: 60}}
doors:
  ssh:
    knock: {{sequence: [7113, 2231/udp, 9157], seq_timeout: 5}}
    open: {{ports: [22/tcp], duration: 30}}
  ssh-close:
    knock: {{sequence: [9157, 2231/udp, 7113], seq_timeout: 5}}
    close: [ssh]
"""
A = "198.18.5.1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Daemon, MemoryBackend, Clock]]:
    path = tmp_path / "k.yaml"
    path.write_text(CONFIG.format(tmp=tmp_path))
    clock = Clock()
    backend = MemoryBackend(clock)
    dmn = Daemon(load_config(str(path)), backend, clock=clock, wall=clock, capture=False)
    dmn.start()
    yield dmn, backend, clock
    dmn.shutdown()


def knock(daemon: Daemon, clock: Clock, src: str, *ports: int) -> None:
    for port in ports:
        clock.now += 0.01
        proto = "udp" if port == 2231 else "tcp"
        daemon._item(Packet(clock.now, src, "198.18.0.1", proto, port, 0x02))


def kinds(daemon: Daemon) -> list[tuple[str, str, str]]:
    return [(r.kind, r.door, r.address) for r in daemon.events.recent()]


def test_open_close_and_expiry_are_events(daemon: tuple[Daemon, MemoryBackend, Clock]) -> None:
    dmn, _, clock = daemon
    knock(dmn, clock, A, 7113, 2231, 9157)
    knock(dmn, clock, A, 9157, 2231, 7113)  # the close door
    knock(dmn, clock, "198.18.5.2", 7113, 2231, 9157)
    assert kinds(dmn) == [
        ("opened", "ssh", A),
        ("closed", "ssh", A),
        ("opened", "ssh", "198.18.5.2"),
    ]
    opened = dmn.events.recent()[0]
    assert opened.detail == "22/tcp for 30 s"
    assert opened.time == pytest.approx(clock.now, abs=1)  # wall clock (the test's)
    clock.now += 31
    dmn._upkeep()
    assert kinds(dmn)[-2] == ("expired", "ssh", "198.18.5.2")  # A's was closed: no expiry
    assert kinds(dmn)[-1][0] == "knocks"  # the steps, summed up once


def test_a_flood_of_first_knocks_is_one_summary_not_an_event_each(
    daemon: tuple[Daemon, MemoryBackend, Clock],
) -> None:
    dmn, _, clock = daemon
    for i in range(5000):
        knock(dmn, clock, f"198.18.{10 + i // 250}.{i % 250 + 1}", 7113)
    assert dmn.events.recent() == []
    dmn._upkeep()
    clock.now += SUMMARY_SECONDS
    dmn._upkeep()
    (summary,) = dmn.events.recent()
    assert summary.kind == "knocks"
    assert summary.counts == {"ssh": {"first_knock": 5000}}
    assert "5000 first_knock" in summary.text()
    clock.now += SUMMARY_SECONDS * 3
    dmn._upkeep()
    assert len(dmn.events.recent()) == 1  # quiet once the flood is over


def test_refusals_are_events_up_to_a_budget_then_summed(
    daemon: tuple[Daemon, MemoryBackend, Clock],
) -> None:
    dmn, backend, clock = daemon
    for i in range(REFUSAL_BUDGET + 20):
        address = f"198.18.7.{i + 1}"
        backend.held.add(address)
        knock(dmn, clock, address, 7113, 2231, 9157)
    held = [r for r in dmn.events.recent() if r.kind == "held-off"]
    assert len(held) == REFUSAL_BUDGET
    assert held[0].detail == "held off as a port scanner"
    clock.now += SUMMARY_SECONDS
    dmn._upkeep()
    summary = dmn.events.recent()[-1]
    assert summary.kind == "knocks"
    assert "20 more refusals not shown one by one" in summary.detail


def test_a_reload_is_an_event(daemon: tuple[Daemon, MemoryBackend, Clock]) -> None:
    dmn, _, _ = daemon
    dmn.reload()
    assert kinds(dmn) == [("reload", "", "")]
    Path(dmn.config.path).write_text("doors: [")
    dmn.reload()
    record = dmn.events.recent()[-1]
    assert record.kind == "reload-refused"
    assert "k.yaml" in record.detail


def test_history_is_bounded_and_a_slow_follower_is_dropped_without_blocking() -> None:
    log = EventLog(history=5)
    _, slow = log.subscribe(buffer=3)
    _, fast = log.subscribe(buffer=100)
    started = time.monotonic()
    for i in range(10):
        log.event("opened", door="ssh", address=f"198.18.0.{i}")
    assert time.monotonic() - started < 0.5
    assert [r.address for r in log.recent()] == [f"198.18.0.{i}" for i in range(5, 10)]
    assert slow.dropped and not fast.dropped
    assert log.followers_dropped == 1
    got = [slow.next(0), slow.next(0), slow.next(0), slow.next(0)]
    assert [r.address for r in got if r] == ["198.18.0.0", "198.18.0.1", "198.18.0.2"]
    assert [fast.next(0) is not None for _ in range(10)] == [True] * 10
    recent, _ = log.subscribe(history=2)
    assert [r.address for r in recent] == ["198.18.0.8", "198.18.0.9"]


def test_a_record_round_trips_through_json_and_reads_as_a_line() -> None:
    record = EventRecord(0.0, "opened", door="ssh", address=A, detail="22/tcp for 30 s")
    assert EventRecord.from_dict(record.as_dict()) == record
    assert record.text().endswith(f"opened door ssh for {A}: 22/tcp for 30 s")
    service = EventRecord(0.0, "service-ready", service="git", detail="in 420 ms")
    assert service.text().endswith("service-ready service git: in 420 ms")


def test_events_over_the_status_socket_history_then_live(tmp_path: Path) -> None:
    log = EventLog()
    log.event("opened", door="ssh", address=A)

    def enqueue(item: object) -> None:
        assert isinstance(item, StatusRequest)
        item.reply({"pid": 1})

    server = StatusServer(str(tmp_path / "s.sock"), enqueue, events=log)
    server.start()
    try:
        path = str(tmp_path / "s.sock")
        assert [r["kind"] for r in events(path)] == ["opened"]
        assert query(path) == {"pid": 1}  # the status as before
        seen: list[dict[str, object]] = []
        stream = events(path, follow=True)

        def follow() -> None:
            for record in stream:
                seen.append(record)
                if len(seen) == 2:
                    return

        reader = threading.Thread(target=follow)
        reader.start()
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        log.event("closed", door="ssh", address=A)
        reader.join(5)
        assert [r["kind"] for r in seen] == ["opened", "closed"]
        stream.close()
    finally:
        server.stop()


def test_a_service_start_is_events_and_a_cold_start_time(tmp_path: Path) -> None:
    """A knock on a service door through the daemon with a fake container runtime: the
    service's start and readiness are events; the metrics count the start and its time."""
    from appliance.core.lifecycle import ServiceEvent
    from appliance.services.fake import FakeRuntime
    from appliance.services.launcher import ServiceLauncher

    banner = socket.socket()
    banner.bind(("127.0.0.1", 0))
    banner.listen(4)
    port = banner.getsockname()[1]
    stop = threading.Event()

    def greet() -> None:
        banner.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = banner.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"SSH-2.0-test\r\n")

    greeter = threading.Thread(target=greet, daemon=True)
    greeter.start()
    path = tmp_path / "k.yaml"
    path.write_text(
        f"status_socket: {tmp_path}/status.sock\nstate_dir: {tmp_path}/state\n"
        "services:\n  git:\n    image: git:test\n"
        f"    container_port: {port}\n    host_port: 2222\n"
        '    ready: {banner: "SSH-", timeout: 2}\n'
        "doors:\n  git:\n    knock: {sequence: [5001, 5002]}\n    service: git\n"
    )
    loaded = load_config(str(path))
    backend = MemoryBackend(time.monotonic)
    launcher = ServiceLauncher(FakeRuntime(), loaded.config.services, "o1")
    dmn = Daemon(loaded, backend, capture=False, launcher=launcher)
    dmn.start()
    try:
        for step in (5001, 5002):
            dmn._item(Packet(time.monotonic(), A, "198.18.0.1", "tcp", step, 0x02))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
            r.kind == "service-ready" for r in dmn.events.recent()
        ):
            try:
                item = dmn.queue.get(timeout=0.1)
            except Exception:
                continue
            if isinstance(item, ServiceEvent):
                dmn._item(item)
        got = [(r.kind, r.service, r.door) for r in dmn.events.recent()]
        assert got[:3] == [
            ("opened", "git", "git"),
            ("service-started", "git", ""),
            ("service-ready", "git", ""),
        ]
        assert dmn.events.recent()[2].detail.startswith("in ")
        snapshot = dmn.metrics_snapshot()
        assert snapshot.service_starts == {("git", "ready"): 1}
        assert snapshot.cold_start["git"].count == 1
        assert snapshot.services_running == {"git": 1}
    finally:
        dmn.shutdown()
        stop.set()
        greeter.join()
        banner.close()
