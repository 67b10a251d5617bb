"""Is a service answering yet? Checks that prove an application-level answer.

A paused container still completes TCP handshakes on a listening socket, so for
warm (paused) containers only ``banner``, ``http`` or ``healthcheck`` prove that
the service is back; ``tcp`` is for services that say nothing first.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from appliance.config.schema import Readiness

FAST_POLL = 0.002  # seconds between attempts during the first FAST_PERIOD: a refused
FAST_PERIOD = 0.5  # connect costs under 1 ms, and a service usually answers by then
POLL = 0.02  # after that


def _connect(address: str, port: int, timeout: float) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def probe(ready: Readiness, address: str, port: int, per_try: float = 1.0) -> bool:
    """One attempt of the check (``healthcheck`` is decided by the caller)."""
    try:
        with _connect(address, port, per_try) as sock:
            if ready.kind == "tcp":
                return True
            if ready.kind == "banner":
                data = b""
                while len(data) < len(ready.expect.encode()):
                    chunk = sock.recv(256)
                    if not chunk:
                        break
                    data += chunk
                return data.startswith(ready.expect.encode())
            if ready.kind == "http":
                request = f"GET {ready.path} HTTP/1.0\r\nHost: {address}\r\n\r\n"
                sock.sendall(request.encode())
                head = sock.recv(64).decode("latin-1")
                parts = head.split()
                return len(parts) >= 2 and parts[1] == str(ready.status)
    except OSError:
        return False
    return False


def wait_ready(
    ready: Readiness,
    address: str,
    port: int,
    healthy: Callable[[], bool] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Poll until the check passes or ``ready.timeout`` runs out."""
    started = clock()
    deadline = started + ready.timeout
    while True:
        left = deadline - clock()
        if left <= 0:
            return False
        if ready.kind == "healthcheck":
            if healthy is not None and healthy():
                return True
        elif probe(ready, address, port, per_try=min(1.0, left)):
            return True
        time.sleep(FAST_POLL if clock() - started < FAST_PERIOD else POLL)
