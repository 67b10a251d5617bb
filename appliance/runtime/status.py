"""``knockgate status`` over a local Unix socket.

The server thread does not read the daemon's state itself: it puts a request on
the daemon's queue and waits for the loop to answer, so the loop stays the only
owner of the engine and the firewall handle.

A client that connects and never reads must not hold up anyone: each client is
served by a short-lived thread of its own, with a send timeout; at most
:data:`MAX_CLIENTS` are served at once (the next ones get a one-line "busy"
answer), and clients waiting at the same time share one snapshot, so a crowd of
them costs the loop one answer, not one each.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

from appliance.errors import KnockgateError
from appliance.runtime.items import StatusRequest

log = logging.getLogger("knockgate.status")

REPLY_TIMEOUT = 5.0  # for the loop to answer
SEND_TIMEOUT = 5.0  # for a client to take the answer
MAX_CLIENTS = 16
BACKLOG = 64

Answer = Callable[[dict[str, Any]], None]


class StatusServer:
    def __init__(self, path: str, enqueue: Callable[[Any], None]) -> None:
        self.path = path
        self.enqueue = enqueue
        self.sock: socket.socket | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="status", daemon=True)
        self._lock = threading.Lock()
        self._waiting: list[Answer] = []  # clients waiting for the snapshot asked for
        self._clients = threading.BoundedSemaphore(MAX_CLIENTS)
        self._wake_r, self._wake_w = os.pipe()

    def start(self) -> None:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        os.chmod(self.path, 0o600)
        sock.listen(BACKLOG)
        sock.setblocking(False)
        self.sock = sock
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")  # the server thread wakes at once
        if self.thread.is_alive():
            self.thread.join(timeout=5)
        for descriptor in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(descriptor)
        if self.sock is not None:
            self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _run(self) -> None:
        assert self.sock is not None
        while not self.stopping.is_set():
            ready, _, _ = select.select([self.sock.fileno(), self._wake_r], [], [])
            if self._wake_r in ready:
                return
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                continue
            except OSError:
                return
            conn.setblocking(True)
            if not self._clients.acquire(blocking=False):
                _send(conn, {"error": "busy: too many status clients at once"}, timeout=0.1)
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="status-client").start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                _send(conn, self._snapshot(), timeout=SEND_TIMEOUT)
        finally:
            self._clients.release()

    def _snapshot(self) -> dict[str, Any]:
        """The loop's answer; clients that ask while one is on its way share it."""
        done = threading.Event()
        reply: dict[str, Any] = {}

        def answer(snapshot: dict[str, Any]) -> None:
            reply.update(snapshot)
            done.set()

        with self._lock:
            first = not self._waiting
            self._waiting.append(answer)
        if first:
            self.enqueue(StatusRequest(self._answer_all))
        if not done.wait(REPLY_TIMEOUT):
            with self._lock:
                if answer in self._waiting:
                    self._waiting.remove(answer)
            return {"error": "the daemon did not answer in time"}
        return reply

    def _answer_all(self, snapshot: dict[str, Any]) -> None:
        """Called by the loop with one snapshot for every client waiting."""
        with self._lock:
            waiting, self._waiting = self._waiting, []
        for answer in waiting:
            answer(snapshot)


def _send(conn: socket.socket, reply: dict[str, Any], timeout: float) -> None:
    conn.settimeout(timeout)
    try:
        conn.sendall(json.dumps(reply).encode() + b"\n")
    except OSError as error:  # gone, or not reading within the timeout
        log.debug("status client dropped: %s", error)


def query(path: str, timeout: float = REPLY_TIMEOUT + 1) -> dict[str, Any]:
    """Ask a running daemon for its status (raises KnockgateError when it is not there)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except OSError as error:
        reason = error.strerror or error
        raise KnockgateError(f"no knockgate daemon answers on {path}: {reason}") from None
    finally:
        sock.close()
    try:
        data: dict[str, Any] = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        raise KnockgateError(f"{path}: not a knockgate status answer") from None
    return data
