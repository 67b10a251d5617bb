"""The monitor's side of the packet process (privilege separation, OpenSSH-style).

``knockgate run`` (the monitor) keeps the firewall, the engine and the host watcher; the
packet process (``knockgate packet``, :mod:`appliance.capture.worker`) reads the untrusted
bytes. :func:`spawn` starts it with one end of a ``SOCK_SEQPACKET`` socketpair; it drops to
``--packet-user`` before it reads anything. Then the monitor keeps only CAP_NET_ADMIN and
CAP_NET_RAW (:func:`appliance.runtime.caps.keep_only`)::

    monitor (uid 0, NET_ADMIN + NET_RAW)            packet process (user, no caps)
      HostWatcher -> Sniffer opens AF_PACKET  --fd (SCM_RIGHTS), remove-->  reads frames
      doors + keys, host addresses ----------pickle (trusted way)------->  SpaReader
      engine <- RecordReader (validated) <-----struct records------------  decode, SPA

:class:`PacketChannel` is what the daemon needs of it; unit tests give the daemon a fake.

The monitor never waits for the packet process: its messages go non-blocking
(``MSG_DONTWAIT``); a full socket means the packet process stopped reading (stuck, or
compromised and stalling the monitor), which is handled as its death
(:class:`PacketProcessGone`: one log line, exit status 1). Its log lines are capped per
wake-up (:data:`MAX_LOGS_PER_RECEIVE`; the rest counted, ``logs_dropped`` in the status).
"""

from __future__ import annotations

import array
import logging
import os
import pickle
import pwd
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Protocol

from appliance.capture.records import COUNTER_NAMES, MAX_MESSAGE, Batch, RecordReader, spa_users
from appliance.core.model import Door
from appliance.errors import KnockgateError

log = logging.getLogger("knockgate")

DEFAULT_PACKET_USER = "knockgate-packet"
FALLBACK_PACKET_USER = "nobody"
MESSAGES_PER_WAKE = 64  # messages read per wake-up at most, so other work is not starved
MAX_LOGS_PER_RECEIVE = 16  # the packet process's log lines logged per wake-up at most


class PacketProcessGone(KnockgateError):
    """The packet process closed its end (it exited or crashed)."""


class PacketChannel(Protocol):
    """The packet process as the daemon sees it."""

    counters: dict[str, int]  # its latest totals (records.COUNTER_NAMES)

    def fileno(self) -> int: ...
    def configure(self, doors: Sequence[Door], local: frozenset[str] | None) -> None: ...
    def add(
        self, key: int, interface: str, sock: socket.socket, replaces: int | None = None
    ) -> None: ...
    def remove(self, key: int) -> None: ...
    def receive(self, now: float) -> Batch: ...  # PacketProcessGone at EOF
    @property
    def malformed(self) -> int: ...
    def describe(self) -> dict[str, object]: ...
    def exit_status(self) -> int | None: ...
    def close(self) -> None: ...


def packet_user(name: str | None) -> pwd.struct_passwd:
    """The packet process's user: ``name``, else ``knockgate-packet`` when it exists, else
    ``nobody`` (KnockgateError when the named one does not exist or is root)."""
    candidates = [name] if name else [DEFAULT_PACKET_USER, FALLBACK_PACKET_USER]
    for candidate in candidates:
        try:
            entry = pwd.getpwnam(candidate)
        except KeyError:
            continue
        if entry.pw_uid == 0 or entry.pw_gid == 0:
            raise KnockgateError(f"--packet-user {candidate}: must not be root (uid or gid 0)")
        return entry
    raise KnockgateError(f"--packet-user: no such user: {' or '.join(candidates)}")


class PacketChild:
    """The packet process, spawned by :func:`spawn`."""

    def __init__(
        self, control: socket.socket, process: subprocess.Popen[bytes] | None, user: str
    ) -> None:
        self.control = control
        self.process = process
        self.user = user
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self.records = RecordReader()
        self.logs_dropped = 0  # log lines past MAX_LOGS_PER_RECEIVE

    def fileno(self) -> int:
        return self.control.fileno()

    @property
    def malformed(self) -> int:
        return self.records.malformed

    def _send(self, message: tuple[object, ...], fds: Sequence[int] = ()) -> None:
        """One message, never waiting: PacketProcessGone when the packet process does not
        read (its socket is full) or is gone."""
        data = pickle.dumps(message)
        try:
            if fds:  # not socket.send_fds: it ignores its flags (CPython <= 3.12)
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sent = self.control.sendmsg([data], rights, socket.MSG_DONTWAIT)
            else:
                sent = self.control.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            raise PacketProcessGone("the packet process does not read its socket (stuck)") from None
        except OSError as error:
            raise PacketProcessGone(f"packet process: {error.strerror or error}") from None
        if sent != len(data):  # SOCK_SEQPACKET: all or nothing; a bug if ever seen
            raise PacketProcessGone(f"packet process: message cut ({sent}/{len(data)} bytes)")

    def configure(self, doors: Sequence[Door], local: frozenset[str] | None) -> None:
        """The SPA doors (with their keys) and the host's addresses, again on every change."""
        spa = tuple(door for door in doors if door.spa is not None)
        self.records.spa_users = spa_users(spa)
        self._send(("config", spa, local))

    def add(
        self, key: int, interface: str, sock: socket.socket, replaces: int | None = None
    ) -> None:
        """Pass ``sock`` as ``key``; ``replaces``: the key of the socket it succeeds (a new
        filter), which the packet process reads dry and closes before reading this one."""
        self._send(("add", key, interface, replaces), [sock.fileno()])

    def remove(self, key: int) -> None:
        self._send(("remove", key))

    def receive(self, now: float) -> Batch:
        """What the packet process sent since the last call (up to MESSAGES_PER_WAKE
        messages), validated; PacketProcessGone when it is gone."""
        merged = Batch()
        for _ in range(MESSAGES_PER_WAKE):
            try:
                data = self.control.recv(MAX_MESSAGE + 1, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except ConnectionError as error:
                raise PacketProcessGone(f"packet process: {error}") from None
            if not data:
                raise PacketProcessGone("the packet process closed its socket")
            batch = self.records.read(data, now)
            merged.events += batch.events
            merged.logs += batch.logs
            merged.failed += batch.failed
            if batch.counters is not None:
                merged.counters = batch.counters
        if merged.counters is not None:
            self.counters = merged.counters
        if len(merged.logs) > MAX_LOGS_PER_RECEIVE:
            self.logs_dropped += len(merged.logs) - MAX_LOGS_PER_RECEIVE
            del merged.logs[MAX_LOGS_PER_RECEIVE:]
        return merged

    def describe(self) -> dict[str, object]:
        pid = self.process.pid if self.process is not None else None
        return {"pid": pid, "user": self.user, "logs_dropped": self.logs_dropped}

    def exit_status(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def close(self) -> None:
        """Close the socket (the packet process sees EOF and exits); wait for it briefly."""
        self.control.close()
        if self.process is not None:
            try:
                self.process.wait(2.0)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def spawn(user: str | None) -> PacketChild:
    """Start ``knockgate packet``. As root it drops to the packet user (before it reads
    anything); otherwise it runs as this user, with no new privileges."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    argv = [sys.executable, "-m", "appliance.cli", "packet", "--fd", str(child.fileno())]
    name = pwd.getpwuid(os.geteuid()).pw_name
    if os.geteuid() == 0:
        name = packet_user(user).pw_name
        argv += ["--user", name]
    try:
        process = subprocess.Popen(
            argv,
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # its log lines come as LOG records, nothing else
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
    except OSError as error:
        parent.close()
        raise KnockgateError(f"cannot start the packet process: {error}") from None
    finally:
        child.close()
    log.info("packet process %d runs as %s", process.pid, name)
    return PacketChild(parent, process, name)
