"""knockd.conf ``Seq_Timeout = 0``, knocked by knockd's own ``knock`` client.

knockd drops an attempt when ``now - start >= seq_timeout``: with 0, a one-port door opens
on its one packet and a longer door never completes. The real knockd 0.8 and knockgate run
side by side in the server namespace on the same knockd.conf and the same packets; both
must open the one-port door every time and the two-port door never.
"""

from __future__ import annotations

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
