#!/usr/bin/env python3
"""How fast appliance.spa opens valid SPA packets and rejects garbage, on one core.

    python testbed/bench/spa_bench.py [--seconds 3]

Prints packets per second for: valid packets (HMAC + decrypt + parse), HMAC checks of
valid packets, random base64 text of SPA length (the worst cheap case: the right charset),
random base64 text that passes the cheap checks (so the HMAC is computed), random bytes.
Targets: valid >= 20000/s, garbage >= 5x that.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from appliance.spa.wire import (
    SpaError,
    SpaKeys,
    authenticate,
    new_message,
    open_packet,
    seal,
)

B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def rate(seconds: float, packets: list[bytes], work: Callable[[bytes], object]) -> float:
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for packet in packets:
            work(packet)
        done += len(packets)
    return done / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    args = parser.parse_args()
    keys = SpaKeys(os.urandom(32), os.urandom(64))
    rng = random.Random(1)
    now = int(time.time())
    valid = [
        seal(new_message("alice", now, "198.18.0.5,tcp/22", rng.choice([None, 60])), keys)
        for _ in range(200)
    ]
    sizes = [len(p) for p in valid]
    text = [bytes(rng.choice(B64) for _ in range(rng.choice(sizes))) for _ in range(200)]
    # Same length class and a first character fwknop can produce: the HMAC is computed.
    plausible = [rng.choice(b"89+/").to_bytes(1, "big") + t[1:] for t in text]
    plausible = [p[: len(v)] for p, v in zip(plausible, valid, strict=False)]
    noise = [rng.randbytes(rng.choice(sizes)) for _ in range(200)]

    def opened(packet: bytes) -> None:
        open_packet(packet, keys)

    def rejected(packet: bytes) -> None:
        try:
            open_packet(packet, keys)
        except SpaError:
            return
        raise AssertionError("garbage opened")

    assert all(authenticate(p, keys) for p in valid)
    results = {
        "valid: open_packet (hmac+decrypt+parse)": rate(args.seconds, valid, opened),
        "valid: authenticate only": rate(args.seconds, valid, lambda p: authenticate(p, keys)),
        "garbage: base64 text, SPA lengths": rate(args.seconds, text, rejected),
        "garbage: base64 text passing cheap checks": rate(args.seconds, plausible, rejected),
        "garbage: random bytes, SPA lengths": rate(args.seconds, noise, rejected),
    }
    width = max(map(len, results))
    base = results["valid: open_packet (hmac+decrypt+parse)"]
    for name, value in results.items():
        print(f"{name:<{width}}  {value:>12,.0f}/s  ({value / base:5.1f}x valid)")
    garbage = min(
        v
        for k, v in results.items()
        if k.startswith("garbage: base64 text, ") or k.startswith("garbage: random")
    )
    ok = base >= 20000 and garbage >= 5 * base
    print(f"targets (valid >= 20000/s, typical garbage >= 5x): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
