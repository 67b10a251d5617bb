#!/usr/bin/env python3
"""A knockgate fleet on real namespaces: how fast a knock reaches the other hosts.

Not a test: it prints a Markdown table. Needs root, iproute2, nftables and
``redis-server``. The lab is tests/integration/fleet_lab.py's: three hosts (each its
own ``knockgate run`` and nft table) and a real Redis (ACL user) on one bridge, a
client and a second client, all in 198.18.0.0/15.

1. Knock on server1 -> port open on server2 and server3: one process in the client
   namespace sends the sequence (7113/tcp, 2231/udp, 9157/tcp) to server1, then tries
   22/tcp on server2 and server3 every 0.5 ms until each accepts; the time from the
   last knock sent to the accepted connect, per host (median, p90 over the trials). A
   close knock (on server2) between trials, waited for on every host.
2. Fleet grants per second: COUNT grants (distinct addresses in 198.19.0.0/16, door
   ssh) published from the client namespace with the store knockgate uses
   (appliance.fleet.redis_store, one at a time); the rate they are written, and the
   rate server2 applies them (its ``knockgate status`` fleet.applied count).
3. SPA packet -> open on server1 (the shared claim, a Redis round trip off the loop, is
   on this path), and one claim's round trip measured alone (1000 SET NX PX).
4. Redis memory per 10 000 grants: INFO memory ``used_memory`` before and after those
   grants (the stream entry, the hash field and the sorted-set member of each).

Run as root from the repository root::

    python testbed/bench/fleet_bench.py [--trials 20] [--count 10000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.integration.daemon import PYTHON  # noqa: E402
from tests.integration.fleet_lab import (  # noqa: E402
    FLEET,
    REDIS_PORT,
    SPA_OPENS,
    SPA_PORT,
    SSH,
    FleetLab,
)
from tests.integration.netns import cleanup_stale  # noqa: E402

PROBE = """
import json, socket, sys, time
server, others, port = sys.argv[1], sys.argv[2].split(','), int(sys.argv[3])
def knock(proto, p):
    if proto == 'udp':
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'', (server, p)); s.close()
    else:
        s = socket.socket(); s.setblocking(False)
        try: s.connect((server, p))
        except BlockingIOError: pass
        s.close()
for proto, p in (('tcp', 7113), ('udp', 2231), ('tcp', 9157)):
    knock(proto, p)
sent = time.monotonic()
found = {}
while len(found) < len(others) and time.monotonic() - sent < 5:
    for host in others:
        if host in found: continue
        s = socket.socket(); s.settimeout(0.2)
        try:
            s.connect((host, port)); found[host] = time.monotonic() - sent
        except OSError:
            pass
        finally:
            s.close()
    time.sleep(0.0005)
print(json.dumps(found))
"""

PUBLISH = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from appliance.config.schema import FleetSettings
from appliance.core.model import Step
from appliance.fleet.messages import grant
from appliance.fleet.redis_store import RedisStore
settings = FleetSettings(
    name=sys.argv[2], host='bench', redis=sys.argv[3], password_file=sys.argv[4]
)
store = RedisStore(settings, 1.0)
count = int(sys.argv[5])
deadline = time.time() + 600
start = time.monotonic()
for i in range(count):
    address = f'198.19.{i // 250}.{i % 250 + 1}'
    store.publish(grant('ssh', address, deadline, 'bench', (Step(22, 'tcp'),)), time.time())
seconds = time.monotonic() - start
claims = []
for i in range(1000):
    began = time.monotonic()
    store.claim(store.keys.prefix + f'bench:{i}', 'bench', 60.0)
    claims.append(time.monotonic() - began)
print(json.dumps({'seconds': seconds, 'claims': sorted(claims)}))
"""

SPA_PROBE = """
import json, socket, sys, time
server, port, spa_port, packet = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(bytes.fromhex(packet), (server, spa_port))
sent = time.monotonic()
while time.monotonic() - sent < 5:
    s = socket.socket(); s.settimeout(0.2)
    try:
        s.connect((server, port)); print(json.dumps(time.monotonic() - sent)); break
    except OSError:
        pass
    finally:
        s.close()
    time.sleep(0.0005)
else:
    print('null')
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latency(lab: FleetLab, trials: int) -> dict[str, list[float]]:
    others = {lab.address("server2"): "server2", lab.address("server3"): "server3"}
    times: dict[str, list[float]] = {"server2": [], "server3": []}
    for _ in range(trials):
        argv = [PYTHON, "-c", PROBE, lab.address("server1"), ",".join(others), str(SSH)]
        found = json.loads(lab.topo.run("client", argv, timeout=30).stdout)
        for address, seconds in found.items():
            times[others[address]].append(seconds)
        lab.knock("client", "server2", "9157", "2231:udp", "7113")
        for server in ("server1", "server2", "server3"):
            lab.wait_state("client", server, SSH, "refused")
    return times


def spa_latency(lab: FleetLab, trials: int) -> list[float]:
    """SPA packet to server1 -> its port open on server1: the shared claim (SET NX on
    Redis, off the loop) is on this path; a sequence knock's is not."""
    times = []
    for _ in range(trials):
        packet = lab.spa_packet().hex()
        argv = [PYTHON, "-c", SPA_PROBE, lab.address("server1"), str(SPA_OPENS), str(SPA_PORT)]
        found = json.loads(lab.topo.run("client", [*argv, packet], timeout=30).stdout)
        if found is not None:
            times.append(found)
        for server in ("server1", "server2", "server3"):
            lab.wait_state("client", server, SPA_OPENS, "refused")
    return times


def used_memory(lab: FleetLab) -> int:
    for line in lab.redis_cli("INFO", "memory").splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":")[1])
    raise RuntimeError("INFO memory said no used_memory")


def throughput(lab: FleetLab, count: int) -> dict[str, float]:
    before = used_memory(lab)
    applied_before = int(lab.fleet("server2")["applied"])  # type: ignore[call-overload]
    url = f"redis://knockgate@{lab.redis_address}:{REDIS_PORT}/0"
    started = time.monotonic()
    argv = [PYTHON, "-c", PUBLISH, str(REPO), FLEET, url, str(lab.password_file), str(count)]
    answer = json.loads(lab.topo.run("client", argv, timeout=600).stdout)
    published, claims = answer["seconds"], answer["claims"]
    applied = applied_before
    while applied < applied_before + count and time.monotonic() - started < 600:
        time.sleep(0.2)
        try:
            applied = int(lab.fleet("server2")["applied"])  # type: ignore[call-overload]
        except RuntimeError:  # the loop busy applying: the status times out
            continue
    applied_seconds = time.monotonic() - started
    after = used_memory(lab)
    return {
        "published_per_s": count / published,
        "applied": applied - applied_before,
        "applied_per_s": (applied - applied_before) / applied_seconds,
        "bytes_per_10000": (after - before) * 10_000 / count,
        "claim_median": statistics.median(claims),
        "claim_p90": percentile(claims, 0.9),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--spa-trials", type=int, default=10)
    args = parser.parse_args()
    cleanup_stale()
    with tempfile.TemporaryDirectory(prefix="kg-fleet-bench-") as tmp, FleetLab(Path(tmp)) as lab:
        times = latency(lab, args.trials)
        spa = spa_latency(lab, args.spa_trials)
        rates = throughput(lab, args.count)
    print("| measure | server2 | server3 |")
    print("|---|---|---|")
    for name, q in (("knock on server1 -> open, median", 0.5), ("p90", 0.9)):
        cells = [
            f"{percentile(times[s], q) * 1000:.1f} ms" if times[s] else "none"
            for s in ("server2", "server3")
        ]
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    opened = [f"{len(times[s])}/{args.trials}" for s in ("server2", "server3")]
    print(f"| trials opened | {opened[0]} | {opened[1]} |")
    print()
    print(f"- grants published: {rates['published_per_s']:.0f}/s (one client, one at a time)")
    print(
        f"- grants applied on server2: {rates['applied_per_s']:.0f}/s "
        f"({rates['applied']:.0f} of {args.count})"
    )
    print(f"- Redis memory per 10 000 grants: {rates['bytes_per_10000'] / 1_048_576:.2f} MiB")
    print(
        f"- SPA packet -> open on server1 (claim included): median "
        f"{statistics.median(spa) * 1000:.1f} ms, p90 {percentile(spa, 0.9) * 1000:.1f} ms "
        f"({len(spa)}/{args.spa_trials})"
    )
    print(
        f"- one claim (SET NX PX, client namespace): median {rates['claim_median'] * 1000:.2f} ms,"
        f" p90 {rates['claim_p90'] * 1000:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
