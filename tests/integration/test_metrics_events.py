"""Metrics and events of the real daemon after real knocks, in network namespaces.

The daemon runs in the server namespace; its metrics are scraped with a real HTTP
client over its Unix socket (from here) and over loopback (inside the server's
namespace, with urllib); ``knockgate events`` reads the event stream over the status
socket. Each test removes its topology, daemon and rules, even on failure.
"""

from __future__ import annotations

import http.client
import json
import selectors
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import require_root_tools
from tests.integration.daemon import PYTHON, REPO, Knockgate, connect, serve
from tests.integration.netns import Topology, cleanup_stale

pytestmark = pytest.mark.integration

CONFIG = """\
interfaces: [eth0]
status_socket: @SOCKET@
firewall: {{backend: nftables}}
{metrics}
doors:
  ssh:
    knock: {{sequence: [7113, 2231/udp, 9157], seq_timeout: 5, tcpflags: "syn,!ack"}}
    open: {{ports: [22/tcp], duration: 30}}
  ssh-close:
    knock: {{sequence: [9157, 2231/udp, 7113], seq_timeout: 5}}
    close: [ssh]
"""
LOOPBACK_PORT = 9464


@pytest.fixture
def topo() -> Iterator[Topology]:
    require_root_tools("nft")
    cleanup_stale()
    with Topology(vlan=False) as topology:
        serve(topology, "server", 22)
        yield topology


def our_knock(topo: Topology, client: str, address: str, *ports: str) -> None:
    topo.run(client, [PYTHON, "-m", "appliance.cli", "knock", address, *ports], cwd=str(REPO))


def wait_open(topo: Topology, client: str, address: str, port: int, timeout: float = 3) -> str:
    deadline = time.monotonic() + timeout
    state = connect(topo, client, address, port)
    while state != "open" and time.monotonic() < deadline:
        time.sleep(0.1)
        state = connect(topo, client, address, port)
    return state


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client (what urllib uses) over a Unix socket."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self.unix_path)


def scrape_unix(path: Path) -> str:
    connection = UnixHTTPConnection(str(path))
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        assert response.status == 200
        return response.read().decode()
    finally:
        connection.close()


def scrape_url(topo: Topology, host: str, url: str) -> str:
    code = f"import urllib.request,sys\nsys.stdout.write(urllib.request.urlopen({url!r}, timeout=10).read().decode())\n"
    return topo.run(host, [PYTHON, "-c", code], timeout=30).stdout


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def knocks(got: dict[tuple[str, tuple[tuple[str, str], ...]], float], outcome: str) -> float:
    return got.get(("knockgate_knocks_total", (("door", "ssh"), ("outcome", outcome))), 0)


@pytest.mark.parametrize("where", ["unix", "loopback"])
def test_scraped_counts_match_the_knocks_that_happened(
    topo: Topology, tmp_path: Path, where: str
) -> None:
    sock = tmp_path / "metrics.sock"
    listen = f"unix:{sock}" if where == "unix" else f"127.0.0.1:{LOOPBACK_PORT}"
    config = CONFIG.format(metrics=f"metrics: {{listen: '{listen}'}}")
    daemon = Knockgate(topo, tmp_path, config).start()
    server = topo.host("server").ipv4

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        if where == "unix":
            return samples(scrape_unix(sock))
        return samples(scrape_url(topo, "server", f"http://127.0.0.1:{LOOPBACK_PORT}/metrics"))

    try:
        before = scrape()
        assert knocks(before, "opened") == 0
        our_knock(topo, "client", server, "7113", "2231:udp", "9157")
        assert wait_open(topo, "client", server, 22) == "open"
        our_knock(topo, "other", server, "7113", "2231:udp")  # two steps, never finished
        time.sleep(0.3)
        got = scrape()
        assert knocks(got, "opened") == 1
        assert knocks(got, "completed") == 1
        assert knocks(got, "first_knock") == 2
        assert knocks(got, "stage") == 2  # the last step counts as completed
        assert got[("knockgate_grants_open", (("door", "ssh"),))] == 1
        assert got[("knockgate_open_latency_seconds_count", (("door", "ssh"),))] == 1
        assert got[("knockgate_packets_total", ())] == 5
        assert got[("knockgate_capture_frames_total", ())] >= 5
        assert got[("knockgate_capture_kernel_drops_total", ())] == 0
        # the endpoint is not reachable from the network
        assert connect(topo, "client", server, LOOPBACK_PORT) != "open"
    finally:
        assert daemon.stop() == 0
    if where == "unix":
        assert not sock.exists()


def test_a_listen_address_that_is_not_loopback_is_refused_without_the_option(
    topo: Topology, tmp_path: Path
) -> None:
    server = topo.host("server").ipv4
    config = CONFIG.format(metrics=f"metrics: {{listen: '{server}:{LOOPBACK_PORT}'}}")
    daemon = Knockgate(topo, tmp_path, config)
    with pytest.raises(RuntimeError, match="knockgate exited 2") as caught:
        daemon.start(timeout=10)
    assert "metrics.listen" in str(caught.value)
    assert "is not a loopback address" in str(caught.value)
    tables = topo.run("server", ["nft", "list", "tables"]).stdout
    assert "knockgate" not in tables  # refused before anything was touched
    # With the explicit option it listens there, with a warning.
    config = CONFIG.format(
        metrics=f"metrics: {{listen: '{server}:{LOOPBACK_PORT}', allow_remote: true}}"
    )
    (tmp_path / "knockgate.yaml").unlink()
    daemon = Knockgate(topo, tmp_path, config).start()
    try:
        assert "not loopback: the metrics are reachable" in daemon.log()
        text = scrape_url(topo, "client", f"http://{server}:{LOOPBACK_PORT}/metrics")
        assert "knockgate_packets_total" in text
    finally:
        daemon.stop()


def read_until(process: subprocess.Popen[str], kind: str, timeout: float) -> list[dict[str, str]]:
    """Lines of ``knockgate events --json`` until one of ``kind`` (bounded in time)."""
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    seen: list[dict[str, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not selector.select(max(0.0, deadline - time.monotonic())):
            break
        line = process.stdout.readline()
        if not line:
            break
        seen.append(json.loads(line))
        if seen[-1].get("kind") == kind:
            break
    selector.close()
    return seen


def test_events_shows_the_open_and_follow_sees_a_live_close(topo: Topology, tmp_path: Path) -> None:
    daemon = Knockgate(topo, tmp_path, CONFIG.format(metrics="")).start()
    server, client = topo.host("server").ipv4, topo.host("client").ipv4
    try:
        our_knock(topo, "client", server, "7113", "2231:udp", "9157")
        assert wait_open(topo, "client", server, 22) == "open"
        done = daemon.cli("events", "--socket", str(daemon.socket), "--json")
        records = [json.loads(line) for line in done.stdout.splitlines()]
        assert records == [
            {
                "time": records[0]["time"],
                "kind": "opened",
                "door": "ssh",
                "address": client,
                "detail": "22/tcp for 30 s",
            }
        ]
        assert abs(records[0]["time"] - time.time()) < 30
        text = daemon.cli("events", "--socket", str(daemon.socket)).stdout
        assert f"opened door ssh for {client}: 22/tcp for 30 s" in text
        follow = topo.popen(
            "server",
            [
                PYTHON,
                "-m",
                "appliance.cli",
                "events",
                "--socket",
                str(daemon.socket),
                "--follow",
                "--json",
                "--last",
                "0",
            ],
            stdout=subprocess.PIPE,
            cwd=str(REPO),
        )
        time.sleep(0.5)  # subscribed
        our_knock(topo, "client", server, "9157", "2231:udp", "7113")
        seen = read_until(follow, "closed", timeout=5)
        assert [(r["kind"], r.get("door"), r.get("address")) for r in seen] == [
            ("closed", "ssh", client)
        ]
        assert connect(topo, "client", server, 22) == "refused"
        follow.terminate()
        follow.wait(5)
    finally:
        assert daemon.stop() == 0
