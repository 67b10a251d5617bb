"""The kernel scan detector against long knocks and real port sweeps (default policy).

The detector holds off a source that hits more than ``scan.ports`` (10) distinct new
ports within ``scan.window`` (2 s). A door's own knock ports are not counted, so a
knocker sending a 12- or 32-port sequence at 50 packets/s opens its door, while an
nmap sweep over a range that holds a door's ports is still held off (the other ports
count) and opens nothing.

Each test runs the real daemon in the server namespace of its own topology; the
knocker is ``client``, the scanner ``attacker``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import require_root_tools
from tests.integration.daemon import PYTHON, REPO, Knockgate, connect, serve
from tests.integration.netns import Topology, cleanup_stale

pytestmark = pytest.mark.integration

BACKENDS = ["nftables", "iptables"]
# 12 TCP ports going up through 7000-7100 (a sequential sweep of that range completes
# it), and 32 ports of both protocols in mixed order.
LONG12 = [7005 + 8 * i for i in range(12)]
LONG32 = [(40000 + (i * 37) % 300, "udp" if i % 3 == 0 else "tcp") for i in range(32)]
SWEEP = "7000-7100"
CONFIG = """\
interfaces: [eth0]
status_socket: @SOCKET@
firewall:
  backend: {backend}
  scan: {{ports: 10, window: 2, hold: 60}}
doors:
  long12:
    knock: {{sequence: [{long12}], seq_timeout: 10, tcpflags: "syn,!ack"}}
    open: {{ports: [22/tcp], duration: 60}}
  long32:
    knock: {{sequence: [{long32}], seq_timeout: 10}}
    open: {{ports: [2222/tcp], duration: 60}}
"""


@pytest.fixture
def topo() -> Iterator[Topology]:
    require_root_tools("nft", "iptables", "ipset", "nmap", "knock")
    cleanup_stale()
    with Topology(vlan=False) as topology:
        serve(topology, "server", 22)
        serve(topology, "server", 2222)
        yield topology


def start(topo: Topology, tmp_path: Path, backend: str) -> Knockgate:
    config = CONFIG.format(
        backend=backend,
        long12=", ".join(str(port) for port in LONG12),
        long32=", ".join(f"{port}/{proto}" for port, proto in LONG32),
    )
    return Knockgate(topo, tmp_path, config).start()


def wait_state(
    topo: Topology, client: str, address: str, port: int, want: str, timeout: float = 5
) -> str:
    deadline = time.monotonic() + timeout
    state = connect(topo, client, address, port)
    while state != want and time.monotonic() < deadline:
        time.sleep(0.1)
        state = connect(topo, client, address, port)
    return state


def held(topo: Topology, backend: str, address: str) -> bool:
    """Whether the kernel's scan detector holds ``address`` off, asked in the server."""
    if backend == "nftables":
        listing = topo.run("server", ["nft", "list", "set", "inet", "knockgate", "held4"]).stdout
        return address in listing.replace(",", " ").split()
    done = topo.run("server", ["ipset", "test", "knockgate-held4", address], check=False)
    return done.returncode == 0


def sweep(topo: Topology, address: str, *options: str) -> None:
    """An nmap SYN sweep of SWEEP from the attacker at a modest, bounded rate."""
    argv = ["nmap", "-n", "-Pn", "-sS", "-p", SWEEP, "--max-retries", "0"]
    argv += ["--max-rate", "300", "--host-timeout", "30s", *options, address]
    topo.run("attacker", argv, timeout=60)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_knock_sent_fast_is_not_held_off_as_a_scan(
    topo: Topology, tmp_path: Path, backend: str
) -> None:
    """12 and 32 knocks at 50 packets/s (20 ms apart): more distinct ports than
    scan.ports within scan.window, but a door's own, so the doors open."""
    server = topo.host("server").ipv4
    client = topo.host("client").ipv4
    daemon = start(topo, tmp_path, backend)
    try:
        assert connect(topo, "client", server, 22) == "refused"
        topo.run("client", ["knock", "-d", "20", server, *map(str, LONG12)], timeout=30)
        assert wait_state(topo, "client", server, 22, "open") == "open", daemon.log()
        knocks = [f"{port}:{proto}" for port, proto in LONG32]
        topo.run(
            "client",
            [PYTHON, "-m", "appliance.cli", "knock", "-d", "20", server, *knocks],
            cwd=str(REPO),
            timeout=30,
        )
        assert wait_state(topo, "client", server, 2222, "open") == "open", daemon.log()
        assert not held(topo, backend, client)
        assert daemon.status()["counters"]["held_off"] == 0  # type: ignore[index]
        assert connect(topo, "other", server, 22) == "refused"
    finally:
        daemon.stop()
    assert "held off" not in daemon.log()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequential_sweep_over_a_doors_ports_opens_nothing(
    topo: Topology, tmp_path: Path, backend: str
) -> None:
    """`nmap -r` over 7000-7100 hits long12's ports in order, so the knock completes;
    the 11th other port already made the attacker a scanner, so nothing opens."""
    server = topo.host("server").ipv4
    attacker = topo.host("attacker").ipv4
    daemon = start(topo, tmp_path, backend)
    try:
        sweep(topo, server, "-r")
        assert held(topo, backend, attacker)
        assert daemon.wait_log("held off as a port scanner", timeout=5), daemon.log()
        assert daemon.status()["counters"]["held_off"] >= 1  # type: ignore[index]
        assert connect(topo, "attacker", server, 22) == "refused"
        assert connect(topo, "attacker", server, 2222) == "refused"
        # The knocker is not affected by the scanner next to it.
        topo.run("client", ["knock", "-d", "20", server, *map(str, LONG12)], timeout=30)
        assert wait_state(topo, "client", server, 22, "open") == "open"
    finally:
        daemon.stop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_randomised_sweep_over_a_doors_ports_opens_nothing(
    topo: Topology, tmp_path: Path, backend: str
) -> None:
    """nmap's default (random) port order over the same range: held off all the same."""
    server = topo.host("server").ipv4
    attacker = topo.host("attacker").ipv4
    daemon = start(topo, tmp_path, backend)
    try:
        sweep(topo, server)
        assert held(topo, backend, attacker)
        assert connect(topo, "attacker", server, 22) == "refused"
        assert connect(topo, "attacker", server, 2222) == "refused"
        assert not any(g["address"] == attacker for g in daemon.status()["grants"])  # type: ignore[attr-defined]
    finally:
        daemon.stop()
