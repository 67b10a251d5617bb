"""``knockgate packet``: the packet process, the only code that reads untrusted bytes.

Spawned by the monitor (``knockgate run``, :mod:`appliance.runtime.privsep`) with one end
of a ``SOCK_SEQPACKET`` socketpair. Before it reads a single byte from the network or the
monitor it gives up everything (:func:`drop_privileges`): a user of its own, no
supplementary groups, no capabilities (bounding set included), no new privileges; then it
installs its seccomp filter (:mod:`appliance.runtime.seccomp`): no new socket, no connect,
no setsockopt, no send or write on any descriptor but the control socket, no execve.
Its stdout and stderr are /dev/null: what it has to say goes to the monitor as LOG
records, a failure to start included.

From the monitor (trusted: pickle) it gets the SPA doors with their keys and the host's
addresses (``config``), and capture sockets (``add``, the descriptor by SCM_RIGHTS,
their BPF filter locked, so it cannot widen what it sees) and which to close
(``remove``). A socket that replaces another (a new capture filter) is read only once the
old one is read dry and closed, so a frame queued on the old one is not lost and the
order of frames holds. A socket that fails (not a link going down) is closed and reported
(a FAILED record): the monitor opens a new one.

It reads frames, decodes them, drops what the host's stack would drop, verifies and
decrypts SPA packets, and sends back records (:mod:`appliance.capture.records`): one
message per batch of frames read, the counters when they moved (at most every
:data:`COUNTER_SECONDS`, or every second for the kernel's drop counts), its log lines.
When the monitor goes (EOF), it exits.

A child that cannot start (privileges, the filter) says why in a LOG record, exit status 2.

Data flow::

    AF_PACKET fds --> InterfaceReader.read --> SpaReader.route --> records --> monitor
    monitor --(config, add fd, remove)--> this process
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import pickle
import selectors
import signal
import socket
import time
from typing import Any

from appliance.capture import records
from appliance.capture.checksum import REASONS
from appliance.capture.sniffer import InterfaceReader
from appliance.capture.spa import SpaReader
from appliance.core.events import Packet
from appliance.runtime import caps, seccomp

log = logging.getLogger("knockgate.capture")

CONTROL_MAX = 1 << 20  # a config message (doors and keys) is far smaller
COUNTER_SECONDS = 0.05  # counters that moved reach the monitor this soon (status)
DROPS_SECONDS = 1.0  # the kernel's drop counts are asked for this often
MAX_PENDING_LOGS = 16
DRAIN_BATCHES = 64  # an old socket is read dry, up to this many batches, before its successor
PROBE = "KNOCKGATE_TEST_SECCOMP_PROBE"  # integration tests: try what the filter denies, log it
FLUSH_AT = records.MAX_MESSAGE - 4096  # a message is sent before it grows past this


class _Forward(logging.Handler):
    """Log lines of this process become LOG records for the monitor."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.pending: list[bytes] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.pending) >= MAX_PENDING_LOGS:  # a burst: the rest is lost, not queued
            return
        with contextlib.suppress(Exception):
            self.pending.append(
                records.encode_log(record.name, record.levelno, record.getMessage())
            )


def drop_privileges(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` with no supplementary group, no capability, no new
    privileges; verified (CapabilityError or OSError when anything is left)."""
    if os.geteuid() == 0:
        caps.drop_bounding(frozenset())  # first: needs CAP_SETPCAP, still held
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # clears the permitted and effective sets
    caps.no_new_privs()
    held = caps.capabilities()
    if os.geteuid() == 0 or held["CapEff"] or held["CapPrm"] or os.getgroups() not in ([], [gid]):
        raise caps.CapabilityError(0, f"packet process still privileged: {held}")


def _warm_up() -> None:
    """Import and run once what SPA needs, while every file can still be read."""
    from appliance.spa import wire

    keys = wire.SpaKeys(b"k" * 32, b"h" * 32)
    packet = wire.seal(wire.new_message("warm", int(time.time()), "198.18.0.1,tcp/1"), keys)
    text = wire.candidate(packet)
    assert text is not None
    covered = wire.verify(text, keys)
    assert covered is not None
    wire.parse_access(wire.open_verified(covered, keys).message)
    wire.replay_digest(text)


class Worker:
    """The packet process's loop (one thread: the capture sockets and the control socket)."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.readers: dict[int, InterfaceReader] = {}
        self.retired = InterfaceReader("", "")  # counters of the sockets closed
        self.spa = SpaReader(())
        self.selector = selectors.DefaultSelector()
        self.forward = _Forward()
        self.sent: tuple[int, ...] = ()  # the counters last sent
        self.counters_at = 0.0
        self.drops_at = 0.0
        self.bugs = 0  # batches lost to an unexpected exception

    def run(self) -> int:
        logger = logging.getLogger("knockgate")
        logger.handlers[:] = [self.forward]
        logger.setLevel(logging.INFO)
        logger.propagate = False
        self.control.setblocking(True)
        self.selector.register(self.control, selectors.EVENT_READ, None)
        try:
            while True:
                timeout = COUNTER_SECONDS if self._moved() else DROPS_SECONDS
                for key, _ in self.selector.select(timeout):
                    if key.data is None:
                        if not self._control():
                            return 0
                    elif key.data.sock is key.fileobj:  # not closed by a message just read
                        self._read(key.data)
                now = time.monotonic()
                if now >= self.drops_at:
                    self._send([])  # asks for drops; sends the counters if they moved
                elif now >= self.counters_at and self._moved():
                    self._send([])
        finally:
            for reader in self.readers.values():
                reader.close()

    # ------------------------------------------------------------ from the monitor

    def _control(self) -> bool:
        """One message from the monitor; False at EOF (the monitor is gone)."""
        fds = array.array("i")
        data, ancillary, _flags, _ = self.control.recvmsg(
            CONTROL_MAX, socket.CMSG_SPACE(16 * fds.itemsize)
        )
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        message: tuple[Any, ...] = pickle.loads(data)  # the monitor is trusted
        match message:
            case ("config", doors, local):
                self.spa = SpaReader(doors, local)
            case ("add", int(key), str(interface), replaces) if len(fds) == 1:
                sock = socket.socket(fileno=fds[0])
                if isinstance(replaces, int):
                    self._drain(replaces)
                self._add(key, interface, sock)
                return True
            case ("remove", int(key)):
                self._remove(key)
            case _:
                raise RuntimeError(f"unknown message from the monitor: {message!r}")
        for fd in fds:
            os.close(fd)
        return True

    def _add(self, key: int, interface: str, sock: socket.socket) -> None:
        self._remove(key)
        sock.setblocking(False)
        reader = InterfaceReader(interface, "", opener=lambda _i, _e: sock)
        reader.open()
        self.readers[key] = reader
        self.selector.register(sock, selectors.EVENT_READ, reader)

    def _drain(self, key: int) -> None:
        """Read the socket ``key`` dry (it is being replaced), then close it."""
        reader = self.readers.get(key)
        if reader is not None:
            for _ in range(DRAIN_BATCHES):
                frames = reader.frames
                self._read(reader)
                if reader.frames == frames or key not in self.readers:
                    break
        self._remove(key)

    def _remove(self, key: int) -> None:
        reader = self.readers.pop(key, None)
        if reader is None:
            return
        assert reader.sock is not None
        self.selector.unregister(reader.sock)
        reader.close()
        retired = self.retired
        retired.frames += reader.frames
        retired.undecoded += reader.undecoded
        retired._dropped += reader.dropped
        for reason, count in reader.rejected.items():
            retired.rejected[reason] += count

    # ------------------------------------------------------------ to the monitor

    def _read(self, reader: InterfaceReader) -> None:
        """One batch of frames from one socket to the monitor. A bug on some input loses
        this batch, not the process (its traceback is logged once)."""
        try:
            self._batch(reader)
        except Exception as error:
            self.bugs += 1
            if self.bugs == 1:  # the monitor logs lines, not tracebacks: the type and text
                log.error(
                    "internal error in the packet process (a bug; it goes on): %s: %s",
                    type(error).__name__,
                    error,
                )

    def _batch(self, reader: InterfaceReader) -> None:
        try:
            packets = reader.read()
        except OSError as error:  # ENETDOWN: a link down resumes by itself (netlink says)
            if error.errno != errno.ENETDOWN:  # the monitor logs it and opens a new socket
                key = next(k for k, r in self.readers.items() if r is reader)
                self._remove(key)
                self._send([records.encode_failed(key, error.errno or errno.EIO)])
            return
        parts: list[bytes] = []
        size = 0
        route, packet_record, spa_record = (
            self.spa.route,
            records.encode_packet,
            records.encode_spa,
        )
        for packet in packets:
            event = route(packet)
            if event is None:
                continue
            part = packet_record(event) if isinstance(event, Packet) else spa_record(event)
            parts.append(part)
            size += len(part)
            if size >= FLUSH_AT:
                self._send(parts)
                parts, size = [], 0
        if parts or self._moved():
            self._send(parts)

    def _totals(self) -> tuple[int, ...]:
        readers = [*self.readers.values(), self.retired]
        rejected = [sum(reader.rejected[reason] for reader in readers) for reason in REASONS]
        return (
            sum(reader.frames for reader in readers),
            sum(reader._dropped for reader in readers),
            sum(reader.undecoded for reader in readers),
            *rejected,
            *self.spa.counters.as_dict().values(),
        )

    def _moved(self) -> bool:
        return self._totals() != self.sent or bool(self.forward.pending)

    def _send(self, parts: list[bytes]) -> None:
        now = time.monotonic()
        if now >= self.drops_at:  # ask the kernel for drops (a syscall per socket)
            self.drops_at = now + DROPS_SECONDS
            for reader in self.readers.values():
                reader.dropped  # noqa: B018 (collects the socket's drop count)
        totals = self._totals()
        if self.forward.pending:
            parts = [*self.forward.pending, *parts]
            self.forward.pending.clear()
        if totals != self.sent and now >= self.counters_at:
            self.sent = totals
            self.counters_at = now + COUNTER_SECONDS
            parts.append(
                records.encode_counters(dict(zip(records.COUNTER_NAMES, totals, strict=True)))
            )
        if parts:
            self.control.sendmsg([records.MAGIC, *parts])


def probe(sock: socket.socket) -> str:
    """What the seccomp filter answers to what a compromised packet process would try
    first (integration tests only: the child runs it on its first capture socket when
    :data:`PROBE` is in its environment). The text names each attempt and its errno."""
    attempts: list[tuple[str, Any]] = [
        ("raw send", lambda: sock.send(bytes(60))),
        ("promiscuous", lambda: sock.setsockopt(263, 1, bytes(16))),  # PACKET_ADD_MEMBERSHIP
        ("tcp socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)),
        ("connect", lambda: sock.connect(("lo", 0))),
        ("write file", lambda: os.open("/tmp/kg-seccomp-probe", os.O_WRONLY | os.O_CREAT)),
        ("execve", lambda: os.execv("/bin/true", ["true"])),
    ]
    said = []
    for name, attempt in attempts:
        try:
            attempt()
        except OSError as error:
            said.append(f"{name}: {errno.errorcode.get(error.errno or 0, error.errno)}")
        else:
            said.append(f"{name}: allowed")
    return "seccomp probe: " + "; ".join(said)


class _Probing(Worker):
    probed = False

    def _add(self, key: int, interface: str, sock: socket.socket) -> None:
        if not self.probed:
            self.probed = True
            log.info("%s", probe(sock))
        super()._add(key, interface, sock)


def confine(control: socket.socket, uid: int | None, gid: int | None) -> None:
    """Drop privileges (as root: to ``uid``/``gid``; root without them is refused), then
    install the seccomp filter with ``control`` the one descriptor it may write."""
    if uid is not None and gid is not None:
        drop_privileges(uid, gid)
    elif os.geteuid() == 0:
        raise caps.CapabilityError(0, "refusing to run as root without --user")
    else:
        caps.no_new_privs()
    seccomp.install(control.fileno())


def main(fd: int, uid: int | None, gid: int | None) -> int:
    """The packet process: drop privileges and confine itself, then serve the monitor
    until it goes. A failure to start goes to the monitor as a LOG record (exit 2)."""
    # It ends when the monitor closes the socket (or kills it): a SIGTERM or SIGINT for the
    # whole group (supervisord's stopasgroup, Ctrl-C) must not end it before the monitor.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a digest now: the monitor's, not ours
    control = socket.socket(fileno=fd)
    try:
        _warm_up()
        confine(control, uid, gid)
    except Exception as error:
        with contextlib.suppress(OSError):
            why = f"packet process cannot start: {type(error).__name__}: {error}"
            control.sendmsg([records.MAGIC, records.encode_log(log.name, logging.ERROR, why)])
        return 2
    worker = _Probing(control) if os.environ.get(PROBE) else Worker(control)
    return worker.run()
