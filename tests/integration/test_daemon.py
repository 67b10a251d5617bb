"""The daemon on real packets, real interfaces and real firewalls, in network namespaces.

Each test builds its own topology (a bridge namespace with server, client, other
and attacker hosts) and removes it, daemon and rules included, even on failure.
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import require
from tests.integration.daemon import Knockgate, connect, nmap_state, serve
from tests.integration.netns import Topology, cleanup_stale, ensure_root_tools

pytestmark = pytest.mark.integration

SEQUENCE = "[7113, 2231/udp, 9157]"
CONFIG = """\
interfaces: [eth0]
status_socket: @SOCKET@
firewall: {{backend: {backend}}}
doors:
  ssh:
    knock: {{sequence: {sequence}, seq_timeout: 5, tcpflags: "syn,!ack"}}
    open: {{ports: [22/tcp, 53/udp], duration: {duration}}}
  ssh-close:
    knock: {{sequence: [9157, 2231/udp, 7113], seq_timeout: 5}}
    close: [ssh]
"""


def prerequisites() -> None:
    missing = ensure_root_tools()
    require(not missing, ", ".join(missing))
    for tool in ("nft", "iptables", "ipset", "nmap", "knock"):
        require(shutil.which(tool) is not None, f"{tool} is not installed")


@pytest.fixture
def topo() -> Iterator[Topology]:
    prerequisites()
    cleanup_stale()
    with Topology() as topology:
        serve(topology, "server", 22)
        yield topology


def start(
    topo: Topology,
    tmp_path: Path,
    backend: str = "nftables",
    duration: float = 30,
    sequence: str = SEQUENCE,
) -> Knockgate:
    config = CONFIG.format(backend=backend, duration=duration, sequence=sequence)
    return Knockgate(topo, tmp_path, config).start()


def our_knock(topo: Topology, client: str, address: str, *ports: str) -> None:
    from tests.integration.daemon import PYTHON, REPO

    topo.run(client, [PYTHON, "-m", "appliance.cli", "knock", address, *ports], cwd=str(REPO))


def wait_open(topo: Topology, client: str, address: str, port: int, timeout: float = 3) -> str:
    deadline = time.monotonic() + timeout
    state = connect(topo, client, address, port)
    while state != "open" and time.monotonic() < deadline:
        time.sleep(0.1)
        state = connect(topo, client, address, port)
    return state


BACKENDS = ["nftables", "iptables"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_knock_opens_for_the_knocker_only_until_the_deadline(
    topo: Topology, tmp_path: Path, backend: str
) -> None:
    server = topo.host("server").ipv4
    daemon = start(topo, tmp_path, backend, duration=3)
    try:
        assert nmap_state(topo, "client", server, 22) == "closed"  # not "filtered"
        assert nmap_state(topo, "client", server, 53, udp=True) in ("filtered", "open|filtered")
        our_knock(topo, "client", server, "7113", "2231:udp", "9157")
        assert wait_open(topo, "client", server, 22) == "open"
        opened_at = time.monotonic()
        assert connect(topo, "other", server, 22) == "refused"
        status = daemon.status()
        assert [g["address"] for g in status["grants"]] == [topo.host("client").ipv4] * 2  # type: ignore[index]
        while time.monotonic() - opened_at < 3.3:
            time.sleep(0.1)
        assert connect(topo, "client", server, 22) == "refused"
    finally:
        assert daemon.stop() == 0
    assert "OPEN SESAME" in daemon.log()


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_sequence_closes(topo: Topology, tmp_path: Path, backend: str) -> None:
    server = topo.host("server").ipv4
    daemon = start(topo, tmp_path, backend)
    try:
        our_knock(topo, "client", server, "7113", "2231:udp", "9157")
        assert wait_open(topo, "client", server, 22) == "open"
        our_knock(topo, "client", server, "9157", "2231:udp", "7113")
        time.sleep(0.3)
        assert connect(topo, "client", server, 22) == "refused"
    finally:
        daemon.stop()


def test_knockd_knock_client_opens(topo: Topology, tmp_path: Path) -> None:
    server = topo.host("server").ipv4
    daemon = start(topo, tmp_path)
    try:
        topo.run("client", ["knock", server, "7113", "2231:udp", "9157"])
        assert wait_open(topo, "client", server, 22) == "open"
    finally:
        daemon.stop()


def test_ipv6_knock_opens_ipv6(topo: Topology, tmp_path: Path) -> None:
    server = topo.host("server").ipv6
    daemon = start(topo, tmp_path)
    try:
        assert connect(topo, "client", server, 22) == "refused"
        topo.run("client", ["knock", "-6", server, "7113", "2231:udp", "9157"])
        assert wait_open(topo, "client", server, 22) == "open"
        assert connect(topo, "other", server, 22) == "refused"
    finally:
        daemon.stop()


def test_vlan_tagged_knock_opens(topo: Topology, tmp_path: Path) -> None:
    """knockd drops 802.1Q-tagged frames; knockgate's capture on eth0 sees them."""
    server = topo.host("server").vlan_ipv4
    daemon = start(topo, tmp_path)
    try:
        assert connect(topo, "client", server, 22) == "refused"
        our_knock(topo, "client", server, "7113", "2231:udp", "9157")
        assert wait_open(topo, "client", server, 22) == "open"
    finally:
        daemon.stop()


def test_interface_flap_does_not_stop_the_daemon(topo: Topology, tmp_path: Path) -> None:
    server = topo.host("server").ipv4
    daemon = start(topo, tmp_path)
    try:
        topo.set_link("server", up=False)
        time.sleep(1.0)
        topo.set_link("server", up=True)
        time.sleep(1.5)  # the link comes back; the capture re-opens
        assert daemon.process is not None and daemon.process.poll() is None
        our_knock(topo, "client", server, "7113", "2231:udp", "9157")
        assert wait_open(topo, "client", server, 22, timeout=5) == "open"
    finally:
        daemon.stop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_9_still_closes_at_the_deadline_and_restart_reconciles(
    topo: Topology, tmp_path: Path, backend: str
) -> None:
    server = topo.host("server").ipv4
    daemon = start(topo, tmp_path, backend, duration=4)
    our_knock(topo, "client", server, "7113", "2231:udp", "9157")
    assert wait_open(topo, "client", server, 22) == "open"
    opened_at = time.monotonic()
    daemon.kill9()
    # Dead daemon: the port stays protected and the grant stays live...
    assert connect(topo, "other", server, 22) == "refused"
    assert connect(topo, "client", server, 22) == "open"
    # A stale rule left in knockgate's own table (nftables) must not survive a restart.
    if backend == "nftables":
        topo.run("server", ["nft", "add rule inet knockgate gate tcp dport 22 accept"])
    # ...a restart keeps the live grant (reconcile), and the kernel closes it on time.
    again = Knockgate(topo, tmp_path, daemon.config_path.read_text()).start()
    if backend == "nftables":
        gate = topo.run("server", ["nft", "list chain inet knockgate gate"]).stdout
        assert "tcp dport 22 accept" not in gate
    try:
        assert [g["address"] for g in again.status()["grants"]][:1] == [  # type: ignore[index]
            topo.host("client").ipv4
        ]
        assert connect(topo, "client", server, 22) == "open"
        while time.monotonic() - opened_at < 4.3:
            time.sleep(0.1)
        assert connect(topo, "client", server, 22) == "refused"
    finally:
        again.stop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequential_port_scan_never_opens(topo: Topology, tmp_path: Path, backend: str) -> None:
    """knockd opens 7000,8000,9000 for `nmap -sS -r -p1-10000` every time."""
    server = topo.host("server").ipv4
    daemon = start(topo, tmp_path, backend, sequence="[7000, 8000, 9000]")
    try:
        sweep = ["nmap", "-n", "-Pn", "-sS", "-r", "-p1-10000", "-T4", "--max-retries", "1"]
        topo.run("attacker", [*sweep, server], timeout=240)
        assert daemon.wait_log("held off as a port scanner")
        assert connect(topo, "attacker", server, 22) == "refused"
        counters = daemon.status()["counters"]
        assert counters["held_off"] >= 1  # type: ignore[index]
        # A real knocker from another address is not affected.
        our_knock(topo, "client", server, "7000", "8000", "9000")
        assert wait_open(topo, "client", server, 22) == "open"
    finally:
        daemon.stop()


def test_sighup_with_a_bad_config_keeps_running(topo: Topology, tmp_path: Path) -> None:
    server = topo.host("server").ipv4
    daemon = start(topo, tmp_path)
    try:
        good = daemon.config_path.read_text()
        daemon.config_path.write_text(good.replace("9157]", "abc]", 1))
        daemon.signal(signal.SIGHUP)
        assert daemon.wait_log("reload refused")
        our_knock(topo, "client", server, "7113", "2231:udp", "9157")
        assert wait_open(topo, "client", server, 22) == "open"
        daemon.config_path.write_text(good.replace("7113, 2231/udp, 9157", "4001, 4002, 4003"))
        daemon.signal(signal.SIGHUP)
        assert daemon.wait_log("configuration reloaded")
        our_knock(topo, "other", server, "4001", "4002", "4003")
        assert wait_open(topo, "other", server, 22) == "open"
    finally:
        daemon.stop()


def test_knockd_conf_commands_run_and_stop_runs_at_shutdown(topo: Topology, tmp_path: Path) -> None:
    server = topo.host("server").ipv4
    marks = tmp_path / "marks"
    conf = tmp_path / "knockd.conf"
    conf.write_text(
        "[options]\n  Interface = eth0\n"
        "[openWeb]\n  Sequence = 7113,2231:udp,9157\n  Seq_Timeout = 5\n  TCPFlags = syn\n"
        f"  Start_Command = echo open %IP% >> {marks}\n"
        f"  Stop_Command = echo close %IP% >> {marks}\n  Cmd_Timeout = 60\n"
    )
    daemon = Knockgate(topo, tmp_path, "", config_path=conf).start()
    try:
        topo.run("client", ["knock", server, "7113", "2231:udp", "9157"])
        client = topo.host("client").ipv4
        deadline = time.monotonic() + 5
        while not (marks.exists() and f"open {client}" in marks.read_text()):
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.1)
    finally:
        daemon.stop()
    assert marks.read_text().splitlines() == [f"open {client}", f"close {client}"]
    assert "running start command" in daemon.log()


def test_new_host_address_is_picked_up_while_running(topo: Topology, tmp_path: Path) -> None:
    """DHCP or an operator adds an address: knocks to it count within a few seconds."""
    host = topo.host("server")
    new_address = host.ipv4.rsplit(".", 1)[0] + ".77"
    daemon = start(topo, tmp_path)
    try:
        topo.run("server", ["ip", "addr", "add", f"{new_address}/24", "dev", host.ifname])
        assert daemon.wait_log("host addresses changed", timeout=6)
        our_knock(topo, "client", new_address, "7113", "2231:udp", "9157")
        assert wait_open(topo, "client", new_address, 22) == "open"
    finally:
        daemon.stop()
