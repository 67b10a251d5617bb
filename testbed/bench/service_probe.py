#!/usr/bin/env python3
"""The knocker's side of service_bench.py, run inside the client container (python3,
standard library only), so the whole measured interval is timed by one process.

    service_probe.py knock --gateway ADDR --steps 41873/tcp,39211/udp,45007/tcp \\
        --port 2222 [--expect SSH-] [--timeout 10] [--gap 0.002]
        Sends the knock sequence (a TCP knock is a non-blocking connect, whose SYN
        leaves at the connect() call, closed at once; a UDP knock one datagram of one
        NUL byte), then tries to connect to ADDR:PORT and read the first line, until
        a line starting with EXPECT arrives or TIMEOUT seconds have passed since the
        last knock was sent. A new attempt every 0.5 ms for the first 20 ms, then every
        1.5 % of the time waited so far (at most every 20 ms); attempts overlap (each is
        watched until it is refused, answers or times out after 2 s), at most 64 open at
        once; no new one while an accepted connection waits for its first line (up to
        1 s: each would be one more sshd starting up). Prints one JSON object: latency
        (seconds, null when nothing answered), accepted (seconds to the first accepted
        connect), the wall-clock times of the last knock and of the banner (time.time(),
        the host's clock, to line up with the appliance's log), attempts, refused, and
        the line received.

    service_probe.py send --gateway ADDR --steps ... [--gap 0.002]
        Only the knock sequence (e.g. a close knock). Prints {"sent": WALL_TIME}.

Every loop is bounded in time and in packets.
"""

from __future__ import annotations

import argparse
import errno
import json
import selectors
import socket
import sys
import time

perf = time.perf_counter
MAX_OPEN = 64
ATTEMPT_TIMEOUT = 2.0
ANSWER_WAIT = 1.0


def parse_steps(text: str) -> list[tuple[int, str]]:
    steps = []
    for item in text.split(","):
        port, _, proto = item.strip().partition("/")
        steps.append((int(port), proto or "tcp"))
    return steps


def send_sequence(gateway: str, steps: list[tuple[int, str]], gap: float) -> tuple[float, float]:
    """Send every step; return (perf_counter, time.time) right after the last one."""
    last = (0.0, 0.0)
    for index, (port, proto) in enumerate(steps):
        if index and gap > 0:
            time.sleep(gap)
        if proto == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"\0", (gateway, port))
                last = (perf(), time.time())
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.setblocking(False)
                try:
                    sock.connect((gateway, port))
                except BlockingIOError:
                    pass  # EINPROGRESS: the SYN is on its way
                except OSError:
                    pass  # an immediate refusal still sent the SYN
                last = (perf(), time.time())
    return last


class Attempt:
    __slots__ = ("accepted", "data", "reading", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.reading = False
        self.accepted = 0.0
        self.data = b""


def knock(args: argparse.Namespace) -> dict[str, object]:
    steps = parse_steps(args.steps)
    expect = args.expect.encode()
    t0, wall0 = send_sequence(args.gateway, steps, args.gap)
    deadline = t0 + args.timeout
    selector = selectors.DefaultSelector()
    pending: dict[socket.socket, Attempt] = {}
    attempts = refused = other_errors = eof = 0
    next_attempt = t0
    result: dict[str, object] = {
        "latency": None,
        "knock_wall": wall0,
        "banner_wall": None,
        "accepted": None,  # seconds to the first accepted connect (of any attempt)
    }
    line = b""

    def drop(sock: socket.socket) -> None:
        selector.unregister(sock)
        pending.pop(sock, None)
        sock.close()

    try:
        while line == b"":
            now = perf()
            if now >= deadline:
                break
            # An accepted connection waiting for its banner holds back new attempts (for
            # ANSWER_WAIT): each would be one more server process starting up, slowing
            # down the one that answers (sshd forks and re-executes per connection).
            answering = any(a.reading and now - a.accepted < ANSWER_WAIT for a in pending.values())
            if now >= next_attempt and len(pending) < MAX_OPEN and not answering:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                code = sock.connect_ex((args.gateway, args.port))
                attempts += 1
                if code in (0, errno.EINPROGRESS):
                    pending[sock] = Attempt(now)
                    selector.register(sock, selectors.EVENT_WRITE)
                else:
                    refused += code == errno.ECONNREFUSED
                    other_errors += code != errno.ECONNREFUSED
                    sock.close()
                waited = now - t0
                step = 0.0005 if waited < 0.02 else min(0.02, 0.015 * waited)
                next_attempt = now + step
            for sock in [s for s, a in pending.items() if now - a.started > ATTEMPT_TIMEOUT]:
                other_errors += 1
                drop(sock)
            wait = min(deadline, next_attempt) - perf()
            for key, _ in selector.select(max(0.0, wait)):
                sock = key.fileobj  # type: ignore[assignment]
                attempt = pending.get(sock)
                if attempt is None:
                    continue
                if not attempt.reading:
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        refused += code == errno.ECONNREFUSED
                        other_errors += code != errno.ECONNREFUSED
                        drop(sock)
                        continue
                    attempt.reading = True
                    attempt.accepted = perf()
                    if result["accepted"] is None:
                        result["accepted"] = perf() - t0
                    selector.modify(sock, selectors.EVENT_READ)
                    continue
                try:
                    chunk = sock.recv(512)
                except OSError:
                    chunk = b""
                    other_errors += 1
                if not chunk:
                    eof += 1
                    drop(sock)
                    continue
                attempt.data += chunk
                if b"\n" in attempt.data or len(attempt.data) >= 256:
                    first = attempt.data.split(b"\n", 1)[0]
                    if first.startswith(expect):
                        done = perf()
                        result["latency"] = done - t0
                        result["banner_wall"] = wall0 + (done - t0)
                        line = first
                        break
                    drop(sock)
    finally:
        for sock in list(pending):
            selector.unregister(sock)
            sock.close()
        selector.close()
    result.update(
        attempts=attempts,
        refused=refused,
        errors=other_errors,
        eof=eof,
        line=line.decode("latin-1").strip(),
    )
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("knock")
    k.add_argument("--gateway", required=True)
    k.add_argument("--steps", required=True)
    k.add_argument("--port", type=int, required=True)
    k.add_argument("--expect", default="SSH-")
    k.add_argument("--timeout", type=float, default=10.0)
    k.add_argument("--gap", type=float, default=0.002)
    s = sub.add_parser("send")
    s.add_argument("--gateway", required=True)
    s.add_argument("--steps", required=True)
    s.add_argument("--gap", type=float, default=0.002)
    args = parser.parse_args(argv)
    args.timeout = min(max(args.timeout, 0.1), 10.0) if args.command == "knock" else 0
    if args.command == "knock":
        print(json.dumps(knock(args)))
    else:
        _, wall = send_sequence(args.gateway, parse_steps(args.steps), args.gap)
        print(json.dumps({"sent": wall}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
