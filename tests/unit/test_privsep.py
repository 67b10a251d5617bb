"""The daemon's side of the packet process, with an in-memory channel (FakeChannel):
records reach the engine, counters reach the status, a dead packet process stops the
daemon, reloads and address changes reach the packet process."""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.capture import records
from appliance.capture.host import HostState, Link
from appliance.capture.sniffer import Sniffer
from appliance.config import load_config
from appliance.core.events import Packet
from appliance.errors import KnockgateError
from appliance.firewall.memory import MemoryBackend
from appliance.runtime.daemon import Daemon
from appliance.runtime.privsep import (
    MAX_LOGS_PER_RECEIVE,
    PacketChild,
    PacketProcessGone,
    packet_user,
)
from tests.unit.helpers import FakeChannel
from tests.unit.test_daemon import CONFIG, Clock

A = "198.18.5.1"


@pytest.fixture
def wired(tmp_path: Path) -> Iterator[tuple[Daemon, FakeChannel, MemoryBackend, Clock]]:
    path = tmp_path / "k.yaml"
    path.write_text(CONFIG.format(socket=tmp_path / "status.sock", marks=tmp_path / "marks"))
    clock = Clock()
    backend = MemoryBackend(clock)
    channel = FakeChannel()
    daemon = Daemon(load_config(str(path)), backend, clock=clock, wall=clock, capture=False)
    daemon.start()
    daemon.channel = channel
    try:
        yield daemon, channel, backend, clock
    finally:
        daemon.shutdown()


def packet(port: int, proto: str = "tcp") -> bytes:
    return records.encode_packet(Packet(0.0, A, "198.18.0.1", proto, port, 0x02))


def test_a_knock_sent_as_records_opens_the_door(
    wired: tuple[Daemon, FakeChannel, MemoryBackend, Clock],
) -> None:
    daemon, channel, backend, clock = wired
    for port, proto in ((7113, "tcp"), (2231, "udp"), (9157, "tcp")):
        clock.now += 0.1
        channel.messages.append(records.MAGIC + packet(port, proto))
        daemon._receive(channel)
    assert [(g.address, str(g.step)) for g in backend.grants()] == [(A, "22/tcp")]


def test_counters_come_from_the_packet_process_and_malformed_records_are_counted(
    wired: tuple[Daemon, FakeChannel, MemoryBackend, Clock],
) -> None:
    daemon, channel, _, _ = wired
    sent = dict.fromkeys(records.COUNTER_NAMES, 0) | {"frames": 40, "bad_checksums": 7}
    channel.messages += [records.MAGIC + records.encode_counters(sent), b"garbage"]
    daemon._receive(channel)
    counters = daemon.snapshot()["counters"]
    assert counters["frames"] == 40 and counters["bad_checksums"] == 7
    assert counters["capture_malformed"] == 1
    assert daemon.snapshot()["packet_process"] == {"pid": None, "user": "fake"}


def test_a_log_line_of_the_packet_process_is_logged_once_without_control_characters(
    wired: tuple[Daemon, FakeChannel, MemoryBackend, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    daemon, channel, _, _ = wired
    line = records.encode_log("knockgate.capture", logging.INFO, "eth0: ignored\n[fake] OPEN")
    channel.messages.append(records.MAGIC + line)
    with caplog.at_level(logging.INFO, logger="knockgate"):
        daemon._receive(channel)
    assert [r.getMessage() for r in caplog.records] == ["eth0: ignored?[fake] OPEN"]


def test_a_dead_packet_process_stops_the_daemon_with_status_1(
    wired: tuple[Daemon, FakeChannel, MemoryBackend, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    daemon, channel, _, _ = wired
    daemon.running = True
    channel.gone = True
    with caplog.at_level(logging.INFO, logger="knockgate"):
        daemon._receive(channel)
    assert not daemon.running and daemon.exit_status == 1
    assert channel.closed and daemon.channel is None
    gone = [r.getMessage() for r in caplog.records if "packet process gone" in r.getMessage()]
    assert len(gone) == 1 and "exit status 1" in gone[0]


def test_address_changes_and_reloads_reach_the_packet_process(
    wired: tuple[Daemon, FakeChannel, MemoryBackend, Clock],
) -> None:
    daemon, channel, _, _ = wired
    addresses = frozenset({"198.18.0.1"})
    daemon.enqueue(HostState(addresses, ()))
    daemon._drain_queue()
    daemon.reload()
    assert channel.calls == [
        ("config", ("ssh", "close", "cmd"), addresses),
        ("config", ("ssh", "close", "cmd"), addresses),
    ]


def test_the_packet_user_must_exist_and_not_be_root() -> None:
    with pytest.raises(KnockgateError, match="no such user: kg-no-such-user"):
        packet_user("kg-no-such-user")
    with pytest.raises(KnockgateError, match="must not be root"):
        packet_user("root")
    assert packet_user(None).pw_name in ("knockgate-packet", "nobody")


def test_a_packet_process_that_stops_reading_stops_the_daemon_not_freezes_it() -> None:
    """Review finding 7: the monitor's messages go MSG_DONTWAIT; a full socket is the
    packet process gone (not a monitor blocked forever in sendall)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel = PacketChild(parent, None, "kg-test")
    with child:
        started = time.monotonic()
        with pytest.raises(PacketProcessGone, match="does not read its socket"):
            for _ in range(100_000):
                channel.remove(1)
        assert time.monotonic() - started < 5
        with pytest.raises(PacketProcessGone, match="does not read its socket"):
            channel.add(1, "eth0", child)  # with a descriptor too
    parent.close()


def test_a_stuck_packet_process_during_a_reload_stops_the_daemon_with_status_1(
    wired: tuple[Daemon, FakeChannel, MemoryBackend, Clock],
) -> None:
    daemon, channel, _, _ = wired
    daemon.running = True
    channel.stuck = True
    daemon.reload()
    assert not daemon.running and daemon.exit_status == 1
    assert channel.closed and daemon.channel is None
    assert daemon.stats.internal_errors == 0  # handled as its death, not as a bug


def test_log_lines_of_the_packet_process_are_capped_per_wake_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel = PacketChild(parent, None, "kg-test")
    with parent, child:
        for number in range(40):
            line = records.encode_log("knockgate.capture", logging.WARNING, f"line {number}")
            child.send(records.MAGIC + line)
        batch = channel.receive(1.0)
        assert [line.text for line in batch.logs] == [
            f"line {n}" for n in range(MAX_LOGS_PER_RECEIVE)
        ]
        assert channel.logs_dropped == 40 - MAX_LOGS_PER_RECEIVE
        assert channel.describe()["logs_dropped"] == 40 - MAX_LOGS_PER_RECEIVE


def test_a_failed_socket_is_reported_reopened_and_not_listed_meanwhile(
    wired: tuple[Daemon, FakeChannel, MemoryBackend, Clock],
) -> None:
    """Review finding 11: the packet process closes a socket that failed and says so;
    the sniffer stops listing it and opens a new one, passed as a new key."""
    daemon, channel, _, clock = wired
    pairs: list[tuple[socket.socket, socket.socket]] = []

    def opener(interface: str, expression: str) -> socket.socket:
        pairs.append(socket.socketpair())
        return pairs[-1][0]

    daemon.sniffer = capture = Sniffer((), "tcp", clock, opener=opener)
    try:
        capture.follow((Link("eth0", 2, True), Link("eth1", 3, True)))
        daemon._pass_sockets()
        assert channel.calls == [("add", 1, "eth0"), ("add", 2, "eth1")]
        channel.messages.append(records.MAGIC + records.encode_failed(2, errno.EIO))
        channel.messages.append(records.MAGIC + records.encode_failed(99, errno.EIO))  # unknown
        daemon._receive(channel)
        assert capture.capturing == ["eth0"]
        assert daemon.snapshot()["interfaces"] == ["eth0"]
        daemon._pass_sockets()
        assert channel.calls[2:] == [("remove", 2)]
        assert capture.reopen_at is not None
        clock.now = capture.reopen_at
        capture.reopen()
        daemon._pass_sockets()
        assert capture.capturing == ["eth0", "eth1"]
        assert channel.calls[3:] == [("add", 3, "eth1")]
    finally:
        capture.close()
        for pair in pairs:
            for sock in pair:
                sock.close()
