"""``knockgate status`` over a local Unix socket.

The server thread does not read the daemon's state itself: it puts a request on
the daemon's queue and waits for the loop to answer, so the loop stays the only
owner of the engine and the firewall handle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from appliance.errors import KnockgateError

log = logging.getLogger("knockgate.status")

REPLY_TIMEOUT = 5.0


class StatusServer:
    def __init__(self, path: str, enqueue: Callable[[Any], None]) -> None:
        self.path = path
        self.enqueue = enqueue
        self.sock: socket.socket | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="status", daemon=True)

    def start(self) -> None:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        os.chmod(self.path, 0o600)
        sock.listen(8)
        sock.settimeout(0.5)
        self.sock = sock
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        if self.sock is not None:
            self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _run(self) -> None:
        assert self.sock is not None
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        done = threading.Event()
        reply: dict[str, Any] = {}

        def answer(snapshot: dict[str, Any]) -> None:
            reply.update(snapshot)
            done.set()

        self.enqueue(("status", answer))
        if not done.wait(REPLY_TIMEOUT):
            reply = {"error": "the daemon did not answer in time"}
        try:
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError as error:
            log.debug("status client went away: %s", error)


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
