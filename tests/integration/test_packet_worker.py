"""The packet process's loop on real AF_PACKET sockets (loopback of the test's own
namespace; root): a socket passed as the successor of another (a new capture filter) is
read only once the old one has been read dry, so frames queued on the old one are not
lost (they were, when the old one was simply closed first)."""

from __future__ import annotations

import logging
import pickle
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from appliance.capture import records
from appliance.capture.sniffer import open_socket
from appliance.capture.worker import Worker
from appliance.core.events import Packet
from tests.integration.conftest import require_root_tools

pytestmark = pytest.mark.integration

PORT = 7391
FILTER = f"udp and dst port {PORT}"


@pytest.fixture
def monitor() -> Iterator[tuple[socket.socket, socket.socket]]:
    require_root_tools()
    logger = logging.getLogger("knockgate")
    saved = logger.handlers[:], logger.level, logger.propagate
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()
        logger.handlers[:], logger.level, logger.propagate = saved


def send(count: int, first: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for number in range(first, first + count):
            sender.sendto(number.to_bytes(2, "big"), ("127.0.0.1", PORT))


def packets(ours: socket.socket, expected: int, timeout: float = 3.0) -> list[Packet]:
    reader = records.RecordReader()
    seen: list[Packet] = []
    deadline = time.monotonic() + timeout
    ours.settimeout(0.2)
    while len(seen) < expected and time.monotonic() < deadline:
        try:
            data = ours.recv(records.MAX_MESSAGE)
        except TimeoutError:
            continue
        seen += [e for e in reader.read(data, 0.0).events if isinstance(e, Packet)]
    assert reader.malformed == 0
    return seen


def test_frames_queued_on_a_replaced_socket_are_read_before_it_is_closed(
    monitor: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = monitor
    old = open_socket("lo", FILTER)
    send(3, 0)  # queued on the old socket only
    time.sleep(0.1)
    new = open_socket("lo", FILTER)
    try:
        # Both messages wait before the loop starts: the successor arrives while the old
        # socket still holds its three frames.
        socket.send_fds(ours, [pickle.dumps(("add", 1, "lo", None))], [old.fileno()])
        socket.send_fds(ours, [pickle.dumps(("add", 2, "lo", 1))], [new.fileno()])
    finally:
        old.close()
        new.close()
    worker = Worker(theirs)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        first = packets(ours, 3)
        assert [p.dport for p in first] == [PORT] * 3, first
        deadline = time.monotonic() + 3
        while set(worker.readers) != {2}:  # the switch is done (the old socket closed)
            assert time.monotonic() < deadline, worker.readers
            time.sleep(0.01)
        send(2, 3)  # only the new socket is open in the packet process now
        then = packets(ours, 2)
        assert len(then) == 2, then
        assert packets(ours, 1, timeout=0.5) == []  # and each frame came once
    finally:
        ours.shutdown(socket.SHUT_RDWR)
        thread.join(5)
