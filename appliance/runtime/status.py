"""``knockgate status`` over a local Unix socket.

The server thread does not read the daemon's state itself: it puts a request on
the daemon's queue and waits for the loop to answer, so the loop stays the only
owner of the engine and the firewall handle.

A client that connects and never reads must not hold up anyone: each client is
served by a short-lived thread of its own, with a send timeout; at most
:data:`MAX_CLIENTS` are served at once (the next ones get a one-line "busy"
answer), and clients waiting at the same time share one snapshot, so a crowd of
them costs the loop one answer, not one each.

A client may first send one JSON line saying what it wants: ``{"request": "status"}``
(the default: a client that sends nothing, or closes its side, gets the status after
:data:`REQUEST_TIMEOUT` at most, at once when it closes) or ``{"request": "events",
"follow": true, "history": 100}``: the event log's recent records as JSON lines, then,
when following, every new one as it comes. The event log is read under its own lock,
not through the loop; at most :data:`MAX_FOLLOWERS` follow at once, and one that reads
too slowly is cut off (a last ``{"kind": "dropped"}`` line), never waited for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

from appliance.errors import KnockgateError
from appliance.runtime.events_log import HISTORY, EventLog
from appliance.runtime.items import StatusRequest

log = logging.getLogger("knockgate.status")

REPLY_TIMEOUT = 5.0  # for the loop to answer
SEND_TIMEOUT = 5.0  # for a client to take the answer
MAX_CLIENTS = 16
MAX_FOLLOWERS = 8  # `knockgate events --follow` clients at once
REQUEST_TIMEOUT = 0.5  # for a client to say what it wants (else: the status)
MAX_REQUEST = 4096
FOLLOW_POLL = 1.0  # how often an idle follower's connection is checked
BACKLOG = 64

Answer = Callable[[dict[str, Any]], None]


class StatusServer:
    def __init__(
        self, path: str, enqueue: Callable[[Any], None], events: EventLog | None = None
    ) -> None:
        self.path = path
        self.enqueue = enqueue
        self.events = events
        self._followers = threading.BoundedSemaphore(MAX_FOLLOWERS)
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
        held = True  # the client slot (a follower gives it back and takes a follower's)
        try:
            with conn:
                request = _read_request(conn)
                what = request.get("request", "status")
                if what == "status":
                    _send(conn, self._snapshot(), timeout=SEND_TIMEOUT)
                elif what == "events" and self.events is not None:
                    if request.get("follow") is True:
                        self._clients.release()
                        held = False
                        self._follow(conn, self.events, _history(request))
                    else:
                        _send_lines(conn, self.events.recent(_history(request)))
                else:
                    _send(conn, {"error": f"unknown request: {str(what)[:40]}"}, SEND_TIMEOUT)
        finally:
            if held:
                self._clients.release()

    def _follow(self, conn: socket.socket, events: EventLog, history: int) -> None:
        """The recent records, then each new one until the client goes, is too slow or
        the server stops."""
        if not self._followers.acquire(blocking=False):
            _send(conn, {"error": f"busy: {MAX_FOLLOWERS} event followers already"}, 0.1)
            return
        try:
            recent, follower = events.subscribe(history)
            try:
                if not _send_lines(conn, recent):
                    return
                while not self.stopping.is_set():
                    record = follower.next(FOLLOW_POLL)
                    if record is not None:
                        if not _send_lines(conn, [record]):
                            return
                    elif follower.dropped:
                        gone = {"kind": "dropped", "detail": "too slow: events were lost"}
                        _send(conn, gone, timeout=0.1)
                        return
                    elif _peer_gone(conn):
                        return
            finally:
                events.unsubscribe(follower)
        finally:
            self._followers.release()

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


def _read_request(conn: socket.socket) -> dict[str, Any]:
    """The client's one-line request; ``{}`` (the status) when it sends none in time."""
    conn.settimeout(REQUEST_TIMEOUT)
    data = b""
    try:
        while b"\n" not in data and len(data) < MAX_REQUEST:
            chunk = conn.recv(MAX_REQUEST)
            if not chunk:
                break
            data += chunk
    except OSError:  # nothing said in time: the status, as before requests existed
        pass
    line = data.split(b"\n", 1)[0].strip()
    if not line:
        return {}
    try:
        request = json.loads(line)
    except ValueError:
        return {"request": "(not JSON)"}
    return request if isinstance(request, dict) else {"request": "(not an object)"}


def _history(request: dict[str, Any]) -> int:
    wanted = request.get("history", HISTORY)
    if not isinstance(wanted, int) or isinstance(wanted, bool):
        return HISTORY
    return max(0, min(wanted, HISTORY))


def _send_lines(conn: socket.socket, records: Any) -> bool:
    """Records as JSON lines; ``False`` when the client is gone or does not read."""
    if not records:
        return True
    conn.settimeout(SEND_TIMEOUT)
    data = b"".join(json.dumps(r.as_dict()).encode() + b"\n" for r in records)
    try:
        conn.sendall(data)
    except OSError as error:
        log.debug("events client dropped: %s", error)
        return False
    return True


def _peer_gone(conn: socket.socket) -> bool:
    """Whether the client closed its side (checked while no record comes)."""
    ready, _, _ = select.select([conn], [], [], 0)
    if not ready:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _connect(path: str, request: dict[str, Any] | None, timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as error:
        sock.close()
        reason = error.strerror or error
        raise KnockgateError(f"no knockgate daemon answers on {path}: {reason}") from None
    # The status is asked by sending nothing (the end of our side says so at once): a
    # server that answers without reading (busy, or one older than requests) would
    # otherwise close with our bytes unread, and the kernel would reset its answer away.
    with contextlib.suppress(OSError):
        if request is None:
            sock.shutdown(socket.SHUT_WR)
        else:
            sock.sendall(json.dumps(request).encode() + b"\n")
    return sock


def events(path: str, follow: bool = False, history: int = HISTORY) -> Iterator[dict[str, Any]]:
    """The daemon's recent events (then, with ``follow``, the live ones) as dicts."""
    request = {"request": "events", "follow": follow, "history": history}
    sock = _connect(path, request, None if follow else REPLY_TIMEOUT + 1)
    try:
        with sock.makefile("rb") as lines:
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    raise KnockgateError(f"{path}: not a knockgate events answer") from None
                if not isinstance(record, dict):
                    raise KnockgateError(f"{path}: not a knockgate events answer")
                if "error" in record and "kind" not in record:
                    raise KnockgateError(f"{path}: {record['error']}")
                yield record
    except OSError as error:
        raise KnockgateError(f"{path}: {error.strerror or error}") from None
    finally:
        sock.close()


def query(path: str, timeout: float = REPLY_TIMEOUT + 1) -> dict[str, Any]:
    """Ask a running daemon for its status (raises KnockgateError when it is not there)."""
    sock = _connect(path, None, timeout)
    try:
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


def notification_lines(rows: list[dict[str, Any]] | None) -> list[str]:
    """``knockgate status``'s text for the notifiers (none without any)."""
    lines = []
    for row in rows or []:
        state = ", receiver FAILING (retrying)" if row.get("failing") else ""
        lines.append(
            f"notify {row.get('name')} ({row.get('kind')}): sent {row.get('sent', 0)}, "
            f"failed {row.get('failed', 0)}, rejected {row.get('rejected', 0)}, "
            f"dropped {row.get('dropped', 0)}, queued {row.get('queued', 0)}{state}"
        )
    return lines


def fleet_lines(block: dict[str, Any] | None) -> list[str]:
    """``knockgate status``'s text for the fleet block of a snapshot (none without one)."""
    if not block:
        return []
    state = "reachable" if block.get("reachable") else "UNREACHABLE"
    lines = [
        f"fleet {block.get('name')}: this host {block.get('host')}, {block.get('redis')} "
        f"{state} for {block.get('since')} s (on_outage: {block.get('on_outage')})"
    ]
    if block.get("last_error"):
        error = "".join(c if c.isprintable() else "?" for c in str(block["last_error"]))
        lines.append(f"  last error: {error}")  # Redis's words: no control characters
    peers = block.get("peers") or {}
    seen = ", ".join(f"{host} ({ago} s ago)" for host, ago in peers.items()) or "none yet"
    lines.append(f"  peers seen: {seen}")
    claims = ", ".join(f"{k} {v}" for k, v in (block.get("claims") or {}).items())
    lines.append(
        f"  published {block.get('published')}, applied {block.get('applied')} grant(s) and "
        f"{block.get('revocations_applied')} revocation(s), backlog {block.get('backlog')}; "
        f"claims: {claims}"
    )
    refused = {k: v for k, v in (block.get("refused") or {}).items() if v}
    if refused:
        lines.append(
            "  refused from the fleet: " + ", ".join(f"{k} {v}" for k, v in refused.items())
        )
    return lines
