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
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.capture import records
from appliance.capture.worker import PROBE as SECCOMP_PROBE
from appliance.runtime.caps import CAP_KILL, CAP_NET_ADMIN, CAP_NET_RAW
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
NETWORK = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW) | (1 << CAP_KILL)  # caps.MONITOR


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
    # The monitor: uid 0 with exactly NET_ADMIN, NET_RAW and KILL, in every thread.
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


# ------------------------------------------------------------- run --user (not root)

MONITOR_USER = "kgmonitor"  # made and removed by the fixture
TOTP_SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
PROBE = """\
import os, socket, sys
out = []
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
out.append("uid " + " ".join(status["Uid"].split()))
for name in ("CapEff", "CapPrm", "CapAmb", "CapBnd", "NoNewPrivs"):
    out.append(f"{name} {status[name].strip()}")
try:
    open(sys.argv[1], "a").write("kg-probe\\n")
    out.append("write ok")
except PermissionError:
    out.append("write denied")
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[2])
    out.append("connect ok")
except PermissionError:
    out.append("connect denied")
print("\\n".join(out))
"""


@pytest.fixture
def monitor_user() -> Iterator[int]:
    import pwd
    import subprocess

    made = False
    try:
        pwd.getpwnam(MONITOR_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                MONITOR_USER,
            ],
            check=True,
        )
        made = True
    try:
        yield pwd.getpwnam(MONITOR_USER).pw_uid
    finally:
        if made:
            subprocess.run(["userdel", MONITOR_USER], check=False)


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory others may traverse (pytest's tmp_path is root's 0700)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="kg-privsep-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_run_user_becomes_that_user_with_three_caps_and_writes_only_its_own(
    topo: Topology, base: Path, monitor_user: int
) -> None:
    from appliance.core.totp import time_step, totp_sequence

    workdir = base / "knockgate"  # its own: the status socket's directory, handed over
    state = base / "knockgate-state"
    root_file = base / "kg-root-file"
    root_file.write_text("root's\n")
    root_file.chmod(0o644)
    root_socket = socket_path = base / "kg-root.sock"
    import socket as sockets

    listener = sockets.socket(sockets.AF_UNIX)
    listener.bind(str(socket_path))
    socket_path.chmod(0o700)
    listener.listen(4)
    probe = base / "kg-probe.py"
    probe.write_text(PROBE)
    one_time = base / "kg-one-time"
    one_time.write_text("5001,5002,5003\n")
    one_time.chmod(0o644)  # root's: the monitor may read, not mark
    workdir.mkdir()
    out = workdir / "probe.out"
    config = base / "kg.yaml"
    config.write_text(
        CONFIG.replace("@SOCKET@", str(workdir / "status.sock"))
        + f"""\
  probe:
    knock: {{sequence: [4001, 4002, 4003], seq_timeout: 10}}
    start_command: python3 {probe} {root_file} {root_socket} > {out} 2>&1
    cmd_timeout: 5
  otp:
    knock:
      totp: {{secret: {TOTP_SECRET}, steps: 3, period: 30, ports: 20000-20999, protocol: tcp}}
      seq_timeout: 10
    open: {{ports: [23/tcp], duration: 60}}
  onetime:
    knock: {{one_time_sequences: {one_time}, seq_timeout: 10}}
    open: {{ports: [24/tcp], duration: 60}}
"""
    )
    config.chmod(0o644)  # root's: readable by everyone, writable by root only
    # The appliance's interpreter: the test's own may live where the user cannot read
    # (pyenv under /root), and the monitor imports some modules after it became the user.
    site = next(p for p in sys.path if p.endswith("site-packages") and "venv" in p)
    daemon = Knockgate(
        topo,
        workdir,
        "",
        config_path=config,
        state_dir=state,
        args=["--user", MONITOR_USER],
        python="/usr/bin/python3",
        env={"PYTHONPATH": f"{REPO}:{site}"},
    )
    daemon.socket = workdir / "status.sock"
    daemon.start()
    server = topo.host("server").ipv4
    try:
        assert daemon.process is not None
        monitor = daemon.process.pid
        tasks = [int(task) for task in os.listdir(f"/proc/{monitor}/task")]
        assert len(tasks) > 1
        for task in tasks:
            held = proc_status(monitor, task)
            assert set(held["Uid"].split()) == {str(monitor_user)}, held["Uid"]
            assert "0" not in held["Gid"].split() and held["Groups"].split() != ["0"]
            for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                assert int(held[name], 16) == NETWORK, (task, name, held[name])
            assert held["NoNewPrivs"] == "1"
        assert f"monitor runs as {MONITOR_USER}" in daemon.log()
        # A knock opens.
        assert connect(topo, "client", server, PROTECTED) == "refused"
        topo.run("client", ["knock", server, "7000", "8000", "9000"])
        deadline = time.monotonic() + 3
        while connect(topo, "client", server, PROTECTED) != "open":
            assert time.monotonic() < deadline, daemon.log()
        # What it runs (knockd-style commands) is the monitor: its uid, its three caps
        # (ambient), and it can neither write a root 0644 file nor reach a root socket.
        topo.run("client", ["knock", server, "4001", "4002", "4003"])
        deadline = time.monotonic() + 5
        while "connect" not in (out.read_text() if out.exists() else ""):
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        seen = dict(line.split(" ", 1) for line in out.read_text().splitlines())
        assert seen["uid"] == " ".join([str(monitor_user)] * 4), seen
        for name in ("CapEff", "CapPrm", "CapAmb", "CapBnd"):
            assert int(seen[name], 16) == NETWORK, (name, seen)
        assert seen["write"] == "denied" and seen["connect"] == "denied", seen
        assert root_file.read_text() == "root's\n"
        # The state file is written (a TOTP step used), in the directory handed over.
        totp = load_totp(config)
        steps = totp_sequence(totp, time_step(totp, time.time()))
        topo.run("client", ["knock", server, *(f"{s.port}:{s.proto}" for s in steps)])
        assert daemon.wait_log("time step"), daemon.log()
        replay = state / "replay"
        deadline = time.monotonic() + 3
        while "otp" not in (replay.read_text() if replay.exists() else ""):
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        assert replay.stat().st_uid == monitor_user
        # A one-time file it cannot write: the door fails closed, one clear line.
        topo.run("client", ["knock", server, "5001", "5002", "5003"])
        assert daemon.wait_log("cannot mark line 1 of"), daemon.log()
        assert "Permission denied" in daemon.log()
        assert connect(topo, "client", server, 24) != "open"
        assert one_time.read_text() == "5001,5002,5003\n"
        # Reload works (it reads the root-owned config).
        config.write_text(config.read_text().replace("duration: 60", "duration: 61"))
        daemon.signal(signal.SIGHUP)
        assert daemon.wait_log("configuration reloaded"), daemon.log()
        child = packet_pid(daemon)
    finally:
        daemon.stop()
        listener.close()
    assert daemon.process is not None and daemon.process.returncode == 0, daemon.log()
    assert not Path(f"/proc/{child}").exists() or proc_status(child)["State"][0] == "Z"


def load_totp(config: Path) -> Any:
    from appliance.config import load_config

    door = load_config(str(config)).config.door("otp")
    assert door is not None and door.knock.totp is not None
    return door.knock.totp


def test_seccomp_refuses_what_a_compromised_packet_process_would_try(
    topo: Topology, tmp_path: Path
) -> None:
    """The real child, once confined, tries (test-only PROBE) a raw send on its capture
    socket, promiscuous mode, a TCP socket, a connect, a file write and an execve: all
    EPERM; knocks still open."""
    daemon = Knockgate(topo, tmp_path, CONFIG, env={SECCOMP_PROBE: "1"}).start()
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
