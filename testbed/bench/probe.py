#!/usr/bin/env python3
"""Client and server helpers for the daemon benchmark, run inside a namespace.

    probe.py serve PORT [--seconds S]
        A TCP listener (backlog 4096) that accepts and closes, for at most S seconds.

    probe.py latency --server ADDR --port 22 --steps 7113/tcp,2231/udp,9157/tcp \\
        --sources A,B,... [--timeout 2] [--interval 0.0002] [--backoff 0.02] [--gap 0.02]
        One trial per source address, one after the other: the knocks (a TCP knock is
        a non-blocking connect from a socket bound to the source, closed at once; a
        UDP knock one datagram of one NUL byte), then a non-blocking connect to PORT
        from the same source every INTERVAL seconds, or every BACKOFF times the time
        waited so far when that is longer (0.2 ms for the first 10 ms, then within 2 %),
        attempts overlapping (each is watched until answered), until one is accepted or
        TIMEOUT seconds have passed since the last knock was sent. Prints one JSON
        object: the latency of every trial in seconds (null: not opened within
        TIMEOUT) and the CPU seconds the trials took.

    probe.py concurrent --server ADDR --port 22 --steps ... --sources A,B,... \\
        [--window 10] [--retry 0.005]
        Every source sends step 1, then every source step 2, ... as fast as possible;
        then every source connects to PORT, retrying a refused connect every RETRY
        seconds, until all are accepted or WINDOW seconds have passed. Prints one JSON
        object: how many opened and when (seconds after the last knock was sent).

Every loop is bounded in time and in packets.
"""

from __future__ import annotations

import argparse
import errno
import json
import resource
import select
import selectors
import socket
import sys
import time
from typing import cast

perf = time.perf_counter


def parse_steps(text: str) -> list[tuple[int, str]]:
    steps = []
    for item in text.split(","):
        port, _, proto = item.partition("/")
        steps.append((int(port), proto or "tcp"))
    return steps


def send_knock(src: str, server: str, port: int, proto: str) -> None:
    if proto == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((src, 0))
            s.sendto(b"\0", (server, port))
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setblocking(False)
            s.bind((src, 0))
            s.connect_ex((server, port))  # the SYN leaves inside this call


def start_connect(src: str, server: str, port: int) -> tuple[socket.socket, int]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # close: RST
    s.bind((src, 0))
    return s, s.connect_ex((server, port))


def wait_open(
    src: str,
    server: str,
    port: int,
    t_last: float,
    timeout: float,
    interval: float,
    backoff: float,
) -> float | None:
    """Seconds from ``t_last`` to the first accepted connect, or None."""
    deadline = t_last + timeout
    pending: dict[socket.socket, float] = {}
    next_attempt = perf()
    attempts = 0
    try:
        while True:
            now = perf()
            if now >= deadline:
                return None
            if now >= next_attempt and attempts < 100_000:
                s, rc = start_connect(src, server, port)
                attempts += 1
                if rc == 0:
                    at = perf()
                    s.close()
                    return at - t_last
                if rc in (errno.EINPROGRESS, errno.EALREADY):
                    pending[s] = now
                else:
                    s.close()
                # 0.2 ms apart for the first 10 ms, then 2 % of the time waited so far: the
                # resolution stays within 2 % while a slow opening is not buried in SYNs.
                next_attempt = now + max(interval, backoff * (now - t_last))
                for old, started in list(pending.items()):  # unanswered (dropped) SYNs
                    if now - started > 0.05:
                        old.close()
                        del pending[old]
            wait = max(0.0, min(next_attempt, deadline) - perf())
            if not pending:
                time.sleep(wait)
                continue
            _, writable, _ = select.select([], list(pending), [], wait)
            at = perf()
            for s in writable:
                error = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                del pending[s]
                s.close()
                if error == 0:
                    return at - t_last
    finally:
        for s in pending:
            s.close()


def cmd_latency(args: argparse.Namespace) -> int:
    steps = parse_steps(args.steps)
    results: list[float | None] = []
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_start = usage.ru_utime + usage.ru_stime
    for src in args.sources.split(","):
        for port, proto in steps:
            send_knock(src, args.server, port, proto)
        t_last = perf()
        results.append(
            wait_open(
                src, args.server, args.port, t_last, args.timeout, args.interval, args.backoff
            )
        )
        time.sleep(args.gap)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {"latencies": results, "cpu_seconds": usage.ru_utime + usage.ru_stime - cpu_start}
        ),
        flush=True,
    )
    return 0


def cmd_concurrent(args: argparse.Namespace) -> int:
    steps = parse_steps(args.steps)
    sources = args.sources.split(",")
    t_first = perf()
    for port, proto in steps:
        for src in sources:
            send_knock(src, args.server, port, proto)
    t_last = perf()
    deadline = t_last + args.window
    opened: dict[str, float] = {}
    retry_at = {src: t_last for src in sources}
    sel = selectors.DefaultSelector()
    attempts = 0
    try:
        while len(opened) < len(sources) and perf() < deadline and attempts < 2_000_000:
            now = perf()
            for src, at in list(retry_at.items()):
                if at <= now:
                    del retry_at[src]
                    s, rc = start_connect(src, args.server, args.port)
                    attempts += 1
                    if rc == 0:
                        opened[src] = perf() - t_last
                        s.close()
                    elif rc in (errno.EINPROGRESS, errno.EALREADY):
                        sel.register(s, selectors.EVENT_WRITE, (src, now))
                    else:
                        s.close()
                        retry_at[src] = now + args.retry
            for key, _ in sel.select(timeout=args.retry):
                s = cast(socket.socket, key.fileobj)
                src, _started = key.data
                error = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                sel.unregister(s)
                s.close()
                if error == 0:
                    opened[src] = perf() - t_last
                else:
                    retry_at[src] = perf() + args.retry
            now = perf()
            for key in list(sel.get_map().values()):  # unanswered: try again
                src, started = key.data
                if now - started > 1.0:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()  # type: ignore[union-attr]
                    retry_at[src] = now
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()
    times = sorted(opened.values())
    print(
        json.dumps(
            {
                "clients": len(sources),
                "opened": len(opened),
                "knock_seconds": round(t_last - t_first, 4),
                "first": times[0] if times else None,
                "last": times[-1] if times else None,
                "median": times[len(times) // 2] if times else None,
            }
        ),
        flush=True,
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", args.port))
    s.listen(4096)
    s.settimeout(1.0)
    print("listening", flush=True)
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        try:
            conn, _ = s.accept()
        except TimeoutError:
            continue
        conn.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve")
    serve.add_argument("port", type=int)
    serve.add_argument("--seconds", type=float, default=1800)
    for name in ("latency", "concurrent"):
        sub = commands.add_parser(name)
        sub.add_argument("--server", required=True)
        sub.add_argument("--port", type=int, default=22)
        sub.add_argument("--steps", required=True)
        sub.add_argument("--sources", required=True)
        if name == "latency":
            sub.add_argument("--timeout", type=float, default=2.0)
            sub.add_argument("--interval", type=float, default=0.0002)
            sub.add_argument("--backoff", type=float, default=0.02)
            sub.add_argument("--gap", type=float, default=0.02)
        else:
            sub.add_argument("--window", type=float, default=10.0)
            sub.add_argument("--retry", type=float, default=0.005)
    args = parser.parse_args()
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "latency":
        return cmd_latency(args)
    return cmd_concurrent(args)


if __name__ == "__main__":
    sys.exit(main())
