"""Privilege separation of the real daemon: who holds what, read from /proc.

``knockgate run`` (the monitor) starts the packet process and then keeps only
CAP_NET_ADMIN and CAP_NET_RAW, in every thread; the packet process runs as an
unprivileged user, without supplementary groups or capabilities, with no_new_privs.
A knock still opens (the records cross the boundary), the packet process dying stops
the monitor with an error, and the monitor dying ends the packet process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.capture import records
from appliance.capture.worker import PROBE
from appliance.runtime.caps import CAP_NET_ADMIN, CAP_NET_RAW
from tests.integration.conftest import require_root_tools
from tests.integration.daemon import PYTHON, REPO, Knockgate, connect, serve
from tests.integration.netns import Topology, cleanup_stale

pytestmark = pytest.mark.integration

PROTECTED = 22
CONFIG = f"""\
interfaces: [eth0]
status_socket: @SOCKET@
firewall: {{backend: nftables}}
doors:
  ssh:
    knock: {{sequence: [7000, 8000, 9000], seq_timeout: 10}}
    open: {{ports: [{PROTECTED}/tcp], duration: 60}}
"""
NETWORK = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW)


def proc_status(pid: int, task: int | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/status" if task is None else f"/proc/{pid}/task/{task}/status"
    fields = {}
    for line in Path(path).read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


@pytest.fixture
def topo() -> Iterator[Topology]:
    require_root_tools("nft", "knock")
    cleanup_stale()
    with Topology(vlan=False) as topology:
        serve(topology, "server", PROTECTED)
        yield topology


@pytest.fixture
def running(topo: Topology, tmp_path: Path) -> Iterator[Knockgate]:
    daemon = Knockgate(topo, tmp_path, CONFIG).start()
    try:
        yield daemon
    finally:
        daemon.stop()


def packet_pid(daemon: Knockgate) -> int:
    described: Any = daemon.status()["packet_process"]
    return int(described["pid"])


def test_the_packet_process_runs_unprivileged_and_the_monitor_keeps_only_network_caps(
    running: Knockgate, topo: Topology
) -> None:
    assert running.process is not None
    monitor = running.process.pid
    child = packet_pid(running)
    seen = proc_status(child)
    assert seen["PPid"] == str(monitor)
    uids, gids = seen["Uid"].split(), seen["Gid"].split()
    assert "0" not in uids and "0" not in gids, seen
    assert len(set(uids)) == 1 and len(set(gids)) == 1, seen
    assert seen["Groups"] == "", seen
    for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(seen[name], 16) == 0, (name, seen[name])
    assert seen["NoNewPrivs"] == "1"
    assert seen["Seccomp"] == "2" and seen["Seccomp_filters"] == "1", seen
    for fd in (1, 2):  # its log lines go as records, nothing to the monitor's output
        assert os.readlink(f"/proc/{child}/fd/{fd}") == "/dev/null"
    # The monitor: uid 0 with exactly NET_ADMIN and NET_RAW, in every thread.
    tasks = [int(task) for task in os.listdir(f"/proc/{monitor}/task")]
    assert len(tasks) > 1  # the status socket's thread, the host watcher...
    for task in tasks:
        held = proc_status(monitor, task)
        assert held["Uid"].split()[0] == "0"
        for name in ("CapPrm", "CapEff", "CapBnd"):
            assert int(held[name], 16) == NETWORK, (task, name, held[name])
        assert int(held["CapInh"], 16) & ~NETWORK == 0
        assert int(held["CapAmb"], 16) == 0
    # And the boundary carries knocks: a real knock opens.
    server = topo.host("server").ipv4
    assert connect(topo, "client", server, PROTECTED) == "refused"
    topo.run("client", ["knock", server, "7000", "8000", "9000"])
    deadline = time.monotonic() + 3
    while connect(topo, "client", server, PROTECTED) != "open":
        assert time.monotonic() < deadline, running.log()
    counters: Any = running.status()["counters"]
    assert counters["frames"] >= 3 and counters["capture_malformed"] == 0, counters


def test_the_monitor_stops_with_an_error_when_the_packet_process_dies(
    running: Knockgate,
) -> None:
    assert running.process is not None
    os.kill(packet_pid(running), signal.SIGKILL)
    assert running.process.wait(10) == 1
    assert running.log().count("packet process gone") == 1, running.log()
    assert "stopped;" in running.log()


def test_the_packet_process_exits_when_the_monitor_is_gone(running: Knockgate) -> None:
    child = packet_pid(running)
    running.kill9()
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and proc_status(child)["State"][0] != "Z":
        assert time.monotonic() < deadline, "the packet process outlived its monitor"
        time.sleep(0.05)


def test_seccomp_refuses_what_a_compromised_packet_process_would_try(
    topo: Topology, tmp_path: Path
) -> None:
    """The real child, once confined, tries (test-only PROBE) a raw send on its capture
    socket, promiscuous mode, a TCP socket, a connect, a file write and an execve: all
    EPERM; knocks still open."""
    daemon = Knockgate(topo, tmp_path, CONFIG, env={PROBE: "1"}).start()
    try:
        assert daemon.wait_log("seccomp probe:"), daemon.log()
        line = next(line for line in daemon.log().splitlines() if "seccomp probe:" in line)
        for attempt in ("raw send", "promiscuous", "tcp socket", "connect", "write file"):
            assert f"{attempt}: EPERM" in line, line
        assert "execve: EPERM" in line, line
        assert "allowed" not in line
        assert proc_status(packet_pid(daemon))["Seccomp"] == "2"
        assert not Path("/tmp/kg-seccomp-probe").exists()
        server = topo.host("server").ipv4
        topo.run("client", ["knock", server, "7000", "8000", "9000"])
        deadline = time.monotonic() + 3
        while connect(topo, "client", server, PROTECTED) != "open":
            assert time.monotonic() < deadline, daemon.log()
    finally:
        daemon.stop()


def test_a_packet_process_that_cannot_start_says_why_on_its_socket() -> None:
    """Its stderr is /dev/null in the appliance: a refusal comes as a LOG record (exit 2)."""
    assert os.geteuid() == 0, "as root, `packet` without --user must refuse"
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with parent, child:
        argv = [PYTHON, "-m", "appliance.cli", "packet", "--fd", str(child.fileno())]
        process = subprocess.run(
            argv,
            pass_fds=(child.fileno(),),
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            timeout=30,
        )
        assert process.returncode == 2
        batch = records.RecordReader().read(parent.recv(records.MAX_MESSAGE), 0.0)
    assert [line.text for line in batch.logs] == [
        "packet process cannot start: CapabilityError: [Errno 0] refusing to run as root "
        "without --user"
    ]
