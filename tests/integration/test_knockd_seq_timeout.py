"""Two knockd.conf edge cases, knocked by knockd's own ``knock`` client.

``Seq_Timeout = 0``: knockd drops an attempt when ``now - start >= seq_timeout``, so with 0
a one-port door opens on its one packet and a longer door never completes. The real
knockd 0.8 and knockgate run side by side in the server namespace on the same knockd.conf
and the same packets; both must open the one-port door every time and the two-port door
never.

A one-time sequences file with every line used (``#``) at start: knockd 0.8 refuses to
start (exit 1); knockgate starts with the door disabled (one warning), its other doors
work, the used lines open nothing, and a line appended before a SIGHUP enables the door
for that one knock.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import require_root_tools
from tests.integration.daemon import Knockgate
from tests.integration.netns import Topology, cleanup_stale

pytestmark = pytest.mark.integration

CONF = """\
[options]
    Interface = eth0
[one]
    Sequence = 7113
    Seq_Timeout = 0
    TCPFlags = syn
    Start_Command = echo one %IP% >> {marks}
[two]
    Sequence = 2231:udp,9157
    Seq_Timeout = 0
    TCPFlags = syn
    Start_Command = echo two %IP% >> {marks}
"""
TRIES = 3


@pytest.fixture
def topo() -> Iterator[Topology]:
    require_root_tools("knock", "knockd")
    cleanup_stale()
    with Topology() as topology:
        yield topology


def start_knockd(topo: Topology, conf: Path, log: Path) -> subprocess.Popen[str]:
    """knockd 0.8 in the foreground (``-v``: its decisions on stdout)."""
    with log.open("w") as out:
        knockd = topo.popen(
            "server",
            ["knockd", "-v", "-i", "eth0", "-c", str(conf)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 10
    while "listening on eth0" not in log.read_text():
        assert knockd.poll() is None, f"knockd exited {knockd.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"knockd did not start:\n{log.read_text()}"
        time.sleep(0.05)
    time.sleep(0.3)  # its pcap filter is compiled after the message
    return knockd


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_seq_timeout_zero_opens_one_port_doors_only_as_knockd_does(
    topo: Topology, tmp_path: Path
) -> None:
    server = topo.host("server").ipv4
    client = topo.host("client").ipv4
    ours, theirs = tmp_path / "knockgate.marks", tmp_path / "knockd.marks"
    (tmp_path / "knockgate").mkdir()
    our_conf = tmp_path / "knockgate" / "knockd.conf"
    our_conf.write_text(CONF.format(marks=ours))
    their_conf = tmp_path / "knockd.conf"
    their_conf.write_text(CONF.format(marks=theirs))
    knockd_log = tmp_path / "knockd.log"

    daemon = Knockgate(topo, tmp_path / "knockgate", "", config_path=our_conf)
    check = daemon.cli("check", str(our_conf))
    assert "two.seq_timeout: warning: 0 with a 2-step sequence: the knock can never" in (
        check.stderr
    )
    assert "one.seq_timeout" not in check.stderr

    daemon.start()
    knockd = start_knockd(topo, their_conf, knockd_log)
    try:
        for _ in range(TRIES):
            topo.run("client", ["knock", server, "2231:udp", "9157"])
            time.sleep(0.2)
            topo.run("client", ["knock", server, "7113"])
            time.sleep(0.2)
        deadline = time.monotonic() + 5
        while len(lines(ours)) < TRIES or len(lines(theirs)) < TRIES:
            assert time.monotonic() < deadline, f"{daemon.log()}\nknockd:\n{knockd_log.read_text()}"
            time.sleep(0.1)
        time.sleep(0.5)  # anything late would show now
        counters = daemon.status()["counters"]
    finally:
        daemon.stop()
        knockd.terminate()
        knockd.wait(10)
    # The same verdict from both: every one-port knock opened, no two-port knock did.
    assert lines(ours) == [f"one {client}"] * TRIES, daemon.log()
    assert lines(theirs) == [f"one {client}"] * TRIES, knockd_log.read_text()
    assert f"{client}: one: OPEN SESAME" in daemon.log()
    assert f"{client}: two: OPEN SESAME" not in daemon.log()
    assert f"{client}: two: OPEN SESAME" not in knockd_log.read_text()
    assert isinstance(counters, dict)
    assert counters["timeouts"] >= TRIES  # each two-port attempt ended at its next packet


def test_exhausted_one_time_file_at_start_disables_only_that_door(
    topo: Topology, tmp_path: Path
) -> None:
    server = topo.host("server").ipv4
    client = topo.host("client").ipv4
    seqs, marks = tmp_path / "ssh.seq", tmp_path / "marks"
    seqs.write_text("#7113,2231:udp,9157\n#4001,4002,4003\n")
    conf = tmp_path / "knockd.conf"
    conf.write_text(
        "[options]\n    Interface = eth0\n"
        f"[ssh]\n    One_Time_Sequences = {seqs}\n    Start_Command = echo ssh %IP% >> {marks}\n"
        f"[other]\n    Sequence = 5003,5001,5002\n    Start_Command = echo other %IP% >> {marks}\n"
    )
    refused = topo.run("server", ["knockd", "-i", "eth0", "-c", str(conf)], check=False)
    assert refused.returncode == 1  # knockd 0.8 does not start
    assert "no more sequences left" in refused.stdout + refused.stderr

    daemon = Knockgate(topo, tmp_path, "", config_path=conf)
    warning = f"ssh.one_time_sequences: warning: {seqs} has no unused sequence: the door stays"
    assert warning in daemon.cli("check", str(conf)).stderr
    daemon.start()
    try:
        assert daemon.log().count(warning) == 1
        doors = daemon.status()["doors"]
        assert isinstance(doors, list)
        assert [(door["name"], door["steps"]) for door in doors] == [("ssh", 0), ("other", 3)]
        topo.run("client", ["knock", server, "7113", "2231:udp", "9157"])  # used lines
        topo.run("client", ["knock", server, "4001", "4002", "4003"])
        topo.run("client", ["knock", server, "5003", "5001", "5002"])
        assert daemon.wait_log(f"{client}: other: OPEN SESAME")
        time.sleep(0.5)
        assert lines(marks) == [f"other {client}"]
        counters = daemon.status()["counters"]
        assert isinstance(counters, dict)
        assert counters["packets"] == 3  # the used lines' ports are not even captured
        with seqs.open("a") as handle:  # a new line, then a reload: the door works once
            handle.write("6003,6001,6002\n")
        daemon.signal(signal.SIGHUP)
        assert daemon.wait_log("configuration reloaded")
        topo.run("client", ["knock", server, "6003", "6001", "6002"])
        assert daemon.wait_log(f"ssh: no more sequences left in {seqs}: door disabled")
    finally:
        daemon.stop()
    assert lines(marks) == [f"other {client}", f"ssh {client}"]
    assert seqs.read_text() == "#7113,2231:udp,9157\n#4001,4002,4003\n#003,6001,6002\n"
