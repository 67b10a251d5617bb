"""The packet process's loop (:class:`appliance.capture.worker.Worker`) in a thread of
the test, on real sockets (no privileges dropped, no seccomp: :func:`worker.main` does
that): a socket that fails is closed and reported to the monitor as a FAILED record."""

from __future__ import annotations

import errno
import logging
import pickle
import socket
import threading
from collections.abc import Iterator

import pytest

from appliance.capture import records
from appliance.capture.worker import Worker


@pytest.fixture
def worker() -> Iterator[tuple[socket.socket, threading.Thread]]:
    logger = logging.getLogger("knockgate")
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    monitor, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    thread = threading.Thread(target=Worker(child).run, daemon=True)
    thread.start()
    try:
        yield monitor, thread
    finally:
        monitor.close()  # EOF: the worker returns
        thread.join(5)
        child.close()
        logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


def refused_udp() -> socket.socket:
    """A UDP socket whose next read fails with ECONNREFUSED (loopback's ICMP answer)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    sock.send(b"kg")
    return sock


def test_a_socket_that_fails_is_closed_and_reported_by_its_key(
    worker: tuple[socket.socket, threading.Thread],
) -> None:
    monitor, thread = worker
    broken = refused_udp()
    with broken:
        socket.send_fds(monitor, [pickle.dumps(("add", 7, "kg0", None))], [broken.fileno()])
    monitor.settimeout(5)
    reader = records.RecordReader()
    failed: list[tuple[int, int]] = []
    while not failed:
        failed = reader.read(monitor.recv(records.MAX_MESSAGE), 0.0).failed
    assert failed == [(7, errno.ECONNREFUSED)]
    assert reader.malformed == 0
    assert thread.is_alive()  # the packet process goes on
