"""Metrics: the settings, the collector from a snapshot, bounded labels, the HTTP endpoint."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.config import load_config
from appliance.config.listen import parse_listen
from appliance.config.values import Invalid
from appliance.core.events import Packet
from appliance.core.model import Step
from appliance.errors import ConfigError, KnockgateError
from appliance.firewall.memory import MemoryBackend
from appliance.runtime.daemon import Daemon
from appliance.runtime.items import Signal
from appliance.runtime.metrics import Buckets, MetricsRequest, MetricsSnapshot
from appliance.runtime.metrics_server import MetricsHub, MetricsServer

CONFIG = """\
status_socket: {tmp}/status.sock
state_dir: {tmp}/state
firewall:
  scan: {{ports: 10, window: 2, hold: 60}}
{metrics}doors:
  ssh:
    knock: {{sequence: [7113, 2231/udp, 9157], seq_timeout: 5}}
    open: {{ports: [22/tcp], duration: 30}}
  web:
    knock: {{sequence: [5001, 5002], seq_timeout: 5}}
    open: {{ports: [443/tcp], duration: 30}}
"""
A = "198.18.5.1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def exposition(snapshot: MetricsSnapshot) -> str:
    hub = MetricsHub(lambda item: item.reply(snapshot), clock=lambda: snapshot.taken)
    return hub.exposition().decode()


def write(tmp_path: Path, metrics: str = "", doors: str | None = None) -> Path:
    path = tmp_path / "k.yaml"
    text = CONFIG.format(tmp=tmp_path, metrics=metrics)
    if doors is not None:
        text = text[: text.index("doors:")] + doors
    path.write_text(text)
    return path


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Daemon, MemoryBackend, Clock]]:
    clock = Clock()
    backend = MemoryBackend(clock)
    daemon = Daemon(
        load_config(str(write(tmp_path))), backend, clock=clock, wall=clock, capture=False
    )
    daemon.start()
    yield daemon, backend, clock
    daemon.shutdown()


def knock(daemon: Daemon, clock: Clock, src: str, *ports: int) -> None:
    for port in ports:
        clock.now += 0.01
        proto = "udp" if port == 2231 else "tcp"
        daemon._item(Packet(clock.now, src, "198.18.0.1", proto, port, 0x02))


def scrape(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return samples(exposition(daemon.metrics_snapshot()))


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("listen", "where"),
    [
        ("unix:/run/knockgate/metrics.sock", ("/run/knockgate/metrics.sock", "", 0)),
        ("127.0.0.1:9464", (None, "127.0.0.1", 9464)),
        ("127.0.0.53:9464", (None, "127.0.0.53", 9464)),
        ("[::1]:9464", (None, "::1", 9464)),
        ("localhost:9100", (None, "127.0.0.1", 9100)),
    ],
)
def test_loopback_and_unix_listen_addresses_are_accepted(
    listen: str, where: tuple[str | None, str, int]
) -> None:
    settings = parse_listen(listen, allow_remote=False)
    assert (settings.unix_path, settings.host, settings.port) == where
    assert settings.listen == listen


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("0.0.0.0:9464", "is not a loopback address"),
        ("198.18.0.1:9464", "is not a loopback address"),
        ("[::]:9464", "is not a loopback address"),
        ("metrics.example:9464", "is not an IP address"),
        ("127.0.0.1", "has no port"),
        ("127.0.0.1:0", "the port must be 1 to 65535"),
        ("127.0.0.1:70000", "the port must be 1 to 65535"),
        ("::1:9464", "an IPv6 address goes in brackets"),
        ("unix:run/metrics.sock", "must be absolute"),
        ("unix:/" + "x" * 120, "over 107 bytes"),
        ("", "is not a listen address"),
    ],
)
def test_bad_listen_addresses_are_refused_with_what_was_expected(
    listen: str, expected: str
) -> None:
    with pytest.raises(Invalid, match=expected):
        parse_listen(listen, allow_remote=False)


def test_a_remote_listen_address_is_refused_at_check_without_allow_remote(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, "metrics: {listen: 0.0.0.0:9464}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    (line,) = caught.value.problems
    assert line.startswith(f"{path}:5: metrics.listen: '0.0.0.0:9464' is not a loopback address")
    assert "allow_remote: true" in line


def test_allow_remote_accepts_it_with_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path, "metrics: {listen: '198.18.0.1:9464', allow_remote: true}\n")
    loaded = load_config(str(path))
    assert loaded.config.settings.metrics is not None
    assert loaded.config.settings.metrics.host == "198.18.0.1"
    assert any("not loopback: the metrics are reachable" in w for w in loaded.warnings)


def test_metrics_without_listen_is_an_error_and_off_by_default(tmp_path: Path) -> None:
    assert load_config(str(write(tmp_path))).config.settings.metrics is None
    with pytest.raises(ConfigError, match=r"metrics\.listen: missing"):
        load_config(str(write(tmp_path, "metrics: {allow_remote: false}\n")))


# --------------------------------------------------------------------------- collector


def test_the_collector_turns_a_snapshot_into_families() -> None:
    latency = Buckets((0.01, 0.1))
    for value in (0.005, 0.02, 0.5):
        latency.observe(value)
    snapshot = MetricsSnapshot(
        taken=10.0,
        counters={"packets": 7, "frames": 9, "frames_dropped": 2, "reloads": 1, "martians": 3},
        knocks={("ssh", "opened"): 2, ("ssh", "first_knock"): 5},
        spa_refused={("spa", "replay"): 4},
        grants_open={"ssh": 1},
        open_latency={"ssh": latency},
        service_starts={("git", "ready"): 1},
        cold_start={"git": Buckets((1.0,))},
        services_running={"git": 1},
        doors=("ssh", "web"),
    )
    got = samples(exposition(snapshot))
    assert got[("knockgate_packets_total", ())] == 7
    assert got[("knockgate_capture_frames_total", ())] == 9
    assert got[("knockgate_capture_kernel_drops_total", ())] == 2
    assert got[("knockgate_capture_discarded_total", (("reason", "martians"),))] == 3
    assert got[("knockgate_knocks_total", (("door", "ssh"), ("outcome", "opened")))] == 2
    assert got[("knockgate_spa_refused_total", (("door", "spa"), ("reason", "replay")))] == 4
    assert got[("knockgate_grants_open", (("door", "ssh"),))] == 1
    assert got[("knockgate_grants_open", (("door", "web"),))] == 0
    bucket = "knockgate_open_latency_seconds_bucket"
    assert got[(bucket, (("door", "ssh"), ("le", "0.01")))] == 1
    assert got[(bucket, (("door", "ssh"), ("le", "0.1")))] == 2
    assert got[(bucket, (("door", "ssh"), ("le", "+Inf")))] == 3
    assert got[("knockgate_open_latency_seconds_count", (("door", "ssh"),))] == 3
    assert got[("knockgate_open_latency_seconds_sum", (("door", "ssh"),))] == pytest.approx(0.525)
    assert got[("knockgate_service_starts_total", (("outcome", "ready"), ("service", "git")))] == 1
    assert got[("knockgate_reloads_total", (("outcome", "ok"),))] == 1
    assert got[("knockgate_reloads_total", (("outcome", "refused"),))] == 0
    assert got[("knockgate_snapshot_age_seconds", ())] == 0


def test_a_scrape_the_loop_does_not_answer_serves_the_last_snapshot() -> None:
    first = MetricsSnapshot(1.0, {"packets": 1}, {}, {}, {}, {}, {}, {}, {}, ())
    answers = [first]

    def enqueue(item: Any) -> None:
        assert isinstance(item, MetricsRequest)
        if answers:
            item.reply(answers.pop())

    hub = MetricsHub(enqueue, clock=lambda: 3.0)
    assert samples(hub.exposition().decode())[("knockgate_packets_total", ())] == 1
    import appliance.runtime.metrics as metrics

    metrics_timeout, metrics.REPLY_TIMEOUT = metrics.REPLY_TIMEOUT, 0.05
    try:
        got = samples(hub.exposition().decode())  # the loop is busy: the last one, aged
    finally:
        metrics.REPLY_TIMEOUT = metrics_timeout
    assert got[("knockgate_packets_total", ())] == 1
    assert got[("knockgate_snapshot_age_seconds", ())] == 2


# --------------------------------------------------------------------------- the daemon's numbers


def test_counts_match_what_happened(daemon: tuple[Daemon, MemoryBackend, Clock]) -> None:
    dmn, backend, clock = daemon
    knock(dmn, clock, A, 7113, 2231, 9157)  # opens
    knock(dmn, clock, "198.18.5.2", 7113, 2231)  # two steps, then a wrong one
    knock(dmn, clock, "198.18.5.2", 5001, 7113)  # reset on web, first knock on ssh
    backend.held.add("198.18.5.3")
    knock(dmn, clock, "198.18.5.3", 5001, 5002)  # held off
    got = scrape(dmn)

    def knocks(door: str, outcome: str) -> float:
        return got.get(("knockgate_knocks_total", (("door", door), ("outcome", outcome))), 0)

    assert knocks("ssh", "opened") == 1
    assert knocks("ssh", "completed") == 1
    assert knocks("web", "held_off") == 1
    assert knocks("web", "completed") == 1
    assert knocks("web", "opened") == 0
    assert knocks("ssh", "first_knock") == 3  # A, .2, .2 again after its reset on ssh
    assert knocks("ssh", "reset") == 1  # .2 at stage 2 on ssh by 5001
    assert got[("knockgate_grants_open", (("door", "ssh"),))] == 1
    assert got[("knockgate_grants_open", (("door", "web"),))] == 0
    assert got[("knockgate_open_latency_seconds_count", (("door", "ssh"),))] == 1
    assert got[("knockgate_packets_total", ())] == 9
    clock.now += 31
    dmn._upkeep()  # the grant's end is seen: no longer open
    assert scrape(dmn)[("knockgate_grants_open", (("door", "ssh"),))] == 0


def test_a_spoofed_flood_adds_no_series(daemon: tuple[Daemon, MemoryBackend, Clock]) -> None:
    """Label values are doors and fixed words: 2 000 sources leave the series count as it
    was after one, and no address appears in the exposition."""
    dmn, _, clock = daemon
    knock(dmn, clock, "198.18.9.1", 7113)
    before = scrape(dmn)
    for i in range(2000):
        knock(dmn, clock, f"198.18.{10 + i // 250}.{i % 250 + 1}", 7113, 5001)
    after = scrape(dmn)
    assert set(after) == set(before) | {
        ("knockgate_knocks_total", (("door", "web"), ("outcome", "first_knock")))
    }
    assert after[("knockgate_knocks_total", (("door", "ssh"), ("outcome", "first_knock")))] == 2001
    assert "198.18." not in exposition(dmn.metrics_snapshot())


def test_a_door_removed_at_reload_loses_its_series(
    tmp_path: Path, daemon: tuple[Daemon, MemoryBackend, Clock]
) -> None:
    dmn, backend, clock = daemon
    knock(dmn, clock, A, 5001, 5002)
    knock(dmn, clock, A, 7113, 2231, 9157)
    assert any(labels and ("door", "web") in labels for _, labels in scrape(dmn))
    write(
        tmp_path,
        doors="doors:\n  ssh:\n    knock: {sequence: [7113, 2231/udp, 9157]}\n"
        "    open: {ports: [22/tcp], duration: 30}\n",
    )
    dmn._item(Signal("reload"))
    got = scrape(dmn)
    assert not any(labels and ("door", "web") in labels for _, labels in got)
    assert got[("knockgate_knocks_total", (("door", "ssh"), ("outcome", "opened")))] == 1
    assert got[("knockgate_reloads_total", (("outcome", "ok"),))] == 1
    assert backend.is_open(A, Step(22, "tcp"))


# --------------------------------------------------------------------------- the endpoint


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self.path)


def get(connection: http.client.HTTPConnection, path: str = "/metrics") -> tuple[int, str, str]:
    connection.request("GET", path)
    response = connection.getresponse()
    body = response.read().decode()
    connection.close()
    return response.status, response.getheader("Content-Type") or "", body


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("where", ["unix", "loopback"])
def test_the_endpoint_serves_the_loops_numbers(tmp_path: Path, where: str) -> None:
    snapshot = MetricsSnapshot(1.0, {"packets": 42}, {}, {}, {}, {}, {}, {}, {}, ())
    hub = MetricsHub(lambda item: item.reply(snapshot), clock=lambda: 1.0)
    listen = f"unix:{tmp_path}/m.sock" if where == "unix" else f"127.0.0.1:{free_port()}"
    server = MetricsServer(parse_listen(listen, allow_remote=False), hub)
    server.start()
    try:
        connection: http.client.HTTPConnection
        if where == "unix":
            assert (tmp_path / "m.sock").stat().st_mode & 0o777 == 0o600
            connection = UnixHTTPConnection(str(tmp_path / "m.sock"))
        else:
            connection = http.client.HTTPConnection("127.0.0.1", server.settings.port, timeout=5)
        status, kind, body = get(connection)
        assert status == 200
        assert kind.startswith("text/plain")
        assert samples(body)[("knockgate_packets_total", ())] == 42
        assert get(connection, "/other")[0] == 404
    finally:
        server.stop()
    assert not (tmp_path / "m.sock").exists()


def test_a_listen_address_in_use_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        hub = MetricsHub(lambda item: None)
        server = MetricsServer(parse_listen(f"127.0.0.1:{port}", allow_remote=False), hub)
        with pytest.raises(KnockgateError, match=f"metrics: cannot listen on 127.0.0.1:{port}"):
            server.start()


def test_the_daemon_serves_metrics_when_configured(tmp_path: Path) -> None:
    path = write(tmp_path, f"metrics: {{listen: 'unix:{tmp_path}/metrics.sock'}}\n")
    clock = Clock()
    dmn = Daemon(
        load_config(str(path)), MemoryBackend(clock), clock=clock, wall=clock, capture=False
    )
    dmn.start()
    try:
        knock(dmn, clock, A, 7113, 2231, 9157)
        import threading

        result: list[tuple[int, str, str]] = []
        scraper = threading.Thread(
            target=lambda: result.append(get(UnixHTTPConnection(str(tmp_path / "metrics.sock"))))
        )
        scraper.start()
        while not result:  # the loop's side: answer the scrape's request
            dmn._drain_queue()
            scraper.join(0.01)
        status, _, body = result[0]
        assert status == 200
        assert (
            samples(body)[("knockgate_knocks_total", (("door", "ssh"), ("outcome", "opened")))] == 1
        )
    finally:
        dmn.shutdown()
    assert not (tmp_path / "metrics.sock").exists()
