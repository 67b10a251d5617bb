"""Relaying stdin/stdout to a TCP connection, both ways, in one selector loop.

Each direction (:class:`Pipe`) reads its source into a bounded buffer and writes it
out when its destination is writable; a source is not read while its buffer is full,
so a slow side slows the other instead of growing memory. End of input is passed on
as a half-close: stdin's EOF becomes ``shutdown(SHUT_WR)`` on the socket (the server
sees EOF and may still answer), the socket's EOF closes stdout (ssh sees the
connection end). The relay returns when both directions are done, or at once when
either side fails (a reset, stdout gone).

A :class:`Timer` (the grant renewal) is fired from the same loop; no threads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

CHUNK = 65536
BUFFER_LIMIT = 4 * CHUNK  # a direction stops reading while this much waits to be written

_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ETIMEDOUT})


class Timer(Protocol):
    """Something the relay loop fires at its due time (monotonic seconds)."""

    def due(self) -> float | None: ...

    def fire(self, now: float) -> None: ...


@dataclass(slots=True)
class RelayResult:
    sent: int = 0  # bytes stdin -> socket
    received: int = 0  # bytes socket -> stdout
    error: str | None = None  # why it ended early; None: both sides closed cleanly


class Pipe:
    """One direction: read ``source`` (an fd), buffer, write to ``sink`` (an fd)."""

    def __init__(self, name: str, source: int, sink: int, close_sink: Callable[[], None]) -> None:
        self.name = name
        self.source = source
        self.sink = sink
        self.close_sink = close_sink  # the half-close passed on at end of input
        self.buffer = bytearray()
        self.eof = False
        self.done = False
        self.moved = 0

    @property
    def wants_read(self) -> bool:
        return not self.eof and len(self.buffer) < BUFFER_LIMIT

    @property
    def wants_write(self) -> bool:
        return bool(self.buffer)

    def read(self) -> None:
        try:
            data = os.read(self.source, CHUNK)
        except BlockingIOError:
            return
        if data:
            self.buffer += data
        else:
            self.eof = True
        self.settle()

    def write(self) -> None:
        try:
            written = os.write(self.sink, self.buffer)
        except BlockingIOError:
            return
        del self.buffer[:written]
        self.moved += written
        self.settle()

    def settle(self) -> None:
        """At end of input with nothing left to write: pass the half-close on."""
        if self.eof and not self.buffer and not self.done:
            self.done = True
            self.close_sink()


def relay(
    sock: socket.socket,
    stdin: int,
    stdout: int,
    *,
    timer: Timer | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> RelayResult:
    """Relay ``stdin`` -> ``sock`` and ``sock`` -> ``stdout`` until both are done.

    The file descriptors are made non-blocking for the relay and given back their
    flags afterwards (a terminal's stdin is shared with the shell). ``stdout`` is
    closed when the socket's input ends; ``sock`` is left to the caller to close.
    """
    result = RelayResult()
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        # What is read is passed on at once: Nagle's algorithm would hold back each small
        # write until the previous one is acknowledged (40 ms a round trip with delayed
        # ACKs; ssh sets TCP_NODELAY on its own sockets for the same reason).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    fds = {stdin, stdout, sock.fileno()}
    flags = {fd: fcntl.fcntl(fd, fcntl.F_GETFL) for fd in fds}

    def shut_socket() -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    def close_stdout() -> None:
        with contextlib.suppress(OSError):
            os.close(stdout)
        flags.pop(stdout, None)  # closed: nothing to give back

    up = Pipe("stdin", stdin, sock.fileno(), shut_socket)
    down = Pipe("socket", sock.fileno(), stdout, close_stdout)
    selector = selectors.PollSelector()  # poll, not epoll: stdin may be a regular file
    registered: dict[int, int] = {}
    try:
        for fd in fds:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags[fd] | os.O_NONBLOCK)
        while not (up.done and down.done):
            _register(selector, registered, _interest(up, down))
            due = timer.due() if timer is not None else None
            wait = None if due is None else max(0.0, due - clock())
            if not registered and wait is None:
                break  # nothing can happen any more
            ready = selector.select(wait)
            for key, events in ready:
                fd = key.fd
                for pipe in (up, down):
                    if events & selectors.EVENT_READ and fd == pipe.source and pipe.wants_read:
                        pipe.read()
                    if events & selectors.EVENT_WRITE and fd == pipe.sink and pipe.wants_write:
                        pipe.write()
            if timer is not None:
                due = timer.due()
                if due is not None and clock() >= due:
                    timer.fire(clock())
    except OSError as error:
        if error.errno not in _GONE:
            raise
        result.error = error.strerror or str(error)
    finally:
        selector.close()
        for fd, flag in flags.items():
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETFL, flag)
    result.sent, result.received = up.moved, down.moved
    return result


def _interest(up: Pipe, down: Pipe) -> dict[int, int]:
    wanted: dict[int, int] = {}
    for pipe in (up, down):
        if pipe.done:
            continue
        if pipe.wants_read:
            wanted[pipe.source] = wanted.get(pipe.source, 0) | selectors.EVENT_READ
        if pipe.wants_write:
            wanted[pipe.sink] = wanted.get(pipe.sink, 0) | selectors.EVENT_WRITE
    return wanted


def _register(
    selector: selectors.BaseSelector, registered: dict[int, int], wanted: dict[int, int]
) -> None:
    for fd in [fd for fd in registered if fd not in wanted]:
        selector.unregister(fd)
        del registered[fd]
    for fd, events in wanted.items():
        if fd not in registered:
            selector.register(fd, events)
        elif registered[fd] != events:
            selector.modify(fd, events)
        registered[fd] = events
