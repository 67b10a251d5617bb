#!/usr/bin/env python3
"""Benchmark of the pure knock engine (not a test: it prints numbers).

1. Valid knocks: many sources each sending a 3-step sequence, interleaved.
2. Flood: first-step knocks from 1 000 000 distinct spoofed sources (in memory only:
   no packet is sent anywhere), with max_attempts at its default (100 000), printing
   the resident memory as the flood goes on so that a flat line is visible.

Events are built in chunks before timing, so the rates are the engine's alone
(``handle`` per event); the decoder has its own numbers. Single thread, one core.

    python testbed/bench/engine_bench.py [--flood 1000000] [--valid 200000]
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from appliance.core.engine import KnockEngine
from appliance.core.events import Packet
from appliance.core.model import Door, Knock, OpenPorts, Step, TcpFlags

HOST = "198.18.0.1"
SEQUENCE = (Step(7113, "tcp"), Step(2231, "udp"), Step(9157, "tcp"))
CHUNK = 100_000


def doors() -> list[Door]:
    return [
        Door(
            "ssh",
            Knock(SEQUENCE, seq_timeout=5.0, tcpflags=TcpFlags(0x02, 0x10)),
            open=OpenPorts((Step(22, "tcp"),), 30.0),
        ),
        Door(
            "web",
            Knock((Step(4001, "tcp"), Step(4002, "tcp"), Step(4003, "tcp")), seq_timeout=5.0),
            open=OpenPorts((Step(443, "tcp"),), 30.0),
        ),
    ]


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def source(i: int) -> str:
    return f"2001:db8:{(i >> 32) & 0xFFFF:x}:{(i >> 16) & 0xFFFF:x}::{i & 0xFFFF:x}"


def valid_knocks(total_events: int) -> None:
    engine = KnockEngine(doors())
    sources = total_events // 3
    batch = 1000  # sources knocking at once, steps interleaved
    opened = 0
    elapsed = 0.0
    ts = 1000.0
    for first in range(0, sources, batch):
        events = []
        group = [source(i) for i in range(first, min(first + batch, sources))]
        for step in SEQUENCE:
            for src in group:
                ts += 0.00001
                flags = 0x02 if step.proto == "tcp" else 0
                events.append(Packet(ts, src, HOST, step.proto, step.port, flags))
        handle = engine.handle
        start = time.perf_counter()
        for event in events:
            handle(event)
        elapsed += time.perf_counter() - start
        opened = engine.counters.opened
    events_done = sources * 3
    print(
        f"valid knocks: {events_done} events, {opened} doors opened, "
        f"{events_done / elapsed:,.0f} events/s ({elapsed * 1e6 / events_done:.2f} us/event)"
    )


def flood(total: int) -> None:
    engine = KnockEngine(doors())
    gc.collect()
    base = rss_mib()
    print(
        f"flood: {total:,} first-step knocks from distinct spoofed sources, "
        f"max_attempts={engine.max_attempts:,}; RSS before: {base:.1f} MiB"
    )
    elapsed = 0.0
    ts = 2000.0
    done = 0
    print(f"{'events':>12} {'attempts':>10} {'evictions':>10} {'RSS MiB':>8} {'events/s':>12}")
    while done < total:
        n = min(CHUNK, total - done)
        events = []
        for i in range(done, done + n):
            ts += 0.000001  # 1 M events/s of capture time: nothing times out, eviction works
            events.append(Packet(ts, source(i), HOST, "tcp", 7113, 0x02))
        handle = engine.handle
        start = time.perf_counter()
        for event in events:
            handle(event)
        chunk_time = time.perf_counter() - start
        elapsed += chunk_time
        done += n
        del events
        print(
            f"{done:>12,} {engine.attempt_count:>10,} {engine.counters.evictions:>10,} "
            f"{rss_mib():>8.1f} {n / chunk_time:>12,.0f}"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"flood: {total / elapsed:,.0f} events/s overall; peak RSS {peak:.1f} MiB "
        "(includes one chunk of pre-built events)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--valid", type=int, default=300_000, help="events of valid knocks")
    parser.add_argument("--flood", type=int, default=1_000_000, help="spoofed first knocks")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, pid {os.getpid()}")
    valid_knocks(args.valid)
    flood(args.flood)


if __name__ == "__main__":
    main()
