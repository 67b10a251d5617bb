#!/usr/bin/env python3
"""Knock-to-ready for a label-gated, stopped container (start_on_knock) on a real engine.

Not a test: it prints a Markdown table. Run from the repository root, as root, with the
testbed images present (knockgate/web:local, knockgate/testbed-client:local), under the
testbed lock, with the daemon of this checkout (no appliance image is built):

    flock /tmp/kg-testbed.lock .venv/bin/python testbed/bench/label_bench.py [--trials 12]

Set-up: a Compose project of its own, ``kg-lbl-bench-<random>``: ``app`` (the testbed's
plain web image, labelled ``knockgate.door=web``, ``start_on_knock=true``,
``ready=http``, published on 18480) and a knocker, ``client`` (198.18.90.10 on the bridge
``kglbl0``, 198.18.90.0/24); ``knockgate run`` on the host network captures on that
bridge. One trial: with ``app`` stopped (``docker stop``, seen by the daemon), the client
runs one Python process that sends the three-port knock (non-blocking connects) and then
asks ``GET /`` of 198.18.90.1:18480 every 5 ms until a 200 (at most 20 s): the time from
the last knock packet to the 200, timed inside the client. The daemon's own ``ready in N
ms`` (docker start until the HTTP check passed) is printed next to it.

Everything is removed at the end, also on failure: the project (``down -v -t 0``) and the
daemon's table (``knockgate teardown``).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.testbed.test_labels_gate import (
    APP_PORT,
    BRIDGE,
    CLIENT,
    CLIENT_IMAGE,
    DOCKER,
    GATEWAY,
    KNOCK,
    KNOCKGATE,
    WEB_IMAGE,
    Bed,
    docker,
    start_daemon,
    stop_daemon,
)
from tests.testbed.test_testbed import run, wait_for

COMPOSE = f"""\
services:
  app:
    image: {WEB_IMAGE}
    ports: ["{APP_PORT}:80"]
    labels:
      knockgate.door: web
      knockgate.start_on_knock: "true"
      knockgate.idle_timeout: "600"
      knockgate.ready: http
    networks: [net]
  client:
    image: {CLIENT_IMAGE}
    init: true
    command: [sleep, infinity]
    networks: {{net: {{ipv4_address: {CLIENT}}}}}
networks:
  net:
    driver: bridge
    driver_opts: {{com.docker.network.bridge.name: {BRIDGE}}}
    ipam: {{config: [{{subnet: 198.18.90.0/24, gateway: {GATEWAY}}}]}}
"""

PROBE = """\
import json, socket, sys, time
gateway, port, steps = sys.argv[1], int(sys.argv[2]), [int(p) for p in sys.argv[3:]]
for step in steps:
    sock = socket.socket(); sock.setblocking(False)
    try:
        sock.connect((gateway, step))
    except BlockingIOError:
        pass
    sock.close(); time.sleep(0.002)
began = time.perf_counter(); attempts = 0
while time.perf_counter() - began < 20:
    attempts += 1
    try:
        with socket.create_connection((gateway, port), timeout=1) as conn:
            conn.sendall(b"GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
            if conn.recv(64).split(b" ")[1:2] == [b"200"]:
                print(json.dumps({"latency": time.perf_counter() - began, "attempts": attempts}))
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.005)
print(json.dumps({"latency": None, "attempts": attempts}))
"""


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kg-lbl-bench-") as folder:
        tag = uuid.uuid4().hex[:8]
        bed = Bed(f"kg-lbl-bench-{tag}", "", Path(folder))
        (bed.files / "compose.yaml").write_text(COMPOSE)
        latencies: list[float] = []
        ready: list[float] = []
        try:
            docker(*bed.compose, "up", "-d", "--no-build", "--pull", "never", timeout=300)
            docker(*bed.compose, "stop", "-t", "0", "app")
            start_daemon(bed)
            app = bed.container("app")
            wait_for("the daemon gates the app", lambda: app in bed.gated(), 20)
            for trial in range(args.trials):
                wait_for("the app is cold", lambda: bed.gated()[app]["state"] == "cold", 20)
                proc = run(
                    [DOCKER, "exec", bed.container("client"), "python3", "-c", PROBE,
                     GATEWAY, str(APP_PORT), *KNOCK],
                    timeout=60,
                )  # fmt: skip
                result = json.loads(proc.stdout)
                if result["latency"] is None:
                    raise SystemExit(f"trial {trial}: no answer\n{bed.tail()}")
                latencies.append(result["latency"])
                docker("stop", "-t", "0", app)
                time.sleep(0.5)
            ready = [
                float(m) for m in re.findall(rf"container {re.escape(app)}: ready in (\d+) ms",
                                             bed.log)
            ]  # fmt: skip
        finally:
            stop_daemon(bed)
            docker(*bed.compose, "down", "-v", "-t", "0", "--remove-orphans", check=False)
            run([KNOCKGATE, "teardown", "--config", str(bed.files / "knockgate.yaml")], check=False)
    ms = [v * 1000 for v in latencies]
    print(f"label-gated stopped container ({WEB_IMAGE}, ready=http), {len(ms)} trials\n")
    print("| measure | median | p90 | min | max |")
    print("|---|---|---|---|---|")
    print(
        f"| knock -> HTTP 200 at the client | {statistics.median(ms):.0f} ms | "
        f"{percentile(ms, 0.9):.0f} ms | {min(ms):.0f} ms | {max(ms):.0f} ms |"
    )
    if ready:
        print(
            f"| daemon: docker start -> ready | {statistics.median(ready):.0f} ms | "
            f"{percentile(ready, 0.9):.0f} ms | {min(ready):.0f} ms | {max(ready):.0f} ms |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
