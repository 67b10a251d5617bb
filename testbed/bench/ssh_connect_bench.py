#!/usr/bin/env python3
"""`ssh myhost` wall time through ``ProxyCommand knockgate connect``, cold and warm service.

Not a test: it prints a Markdown table. Run from the repository root, as root, under the
testbed lock (it builds the testbed images, as the testbed tests do):

    flock /tmp/kg-testbed.lock .venv/bin/python testbed/bench/ssh_connect_bench.py [--trials 10]

Set-up: the testbed of tests/testbed/test_testbed.py (the appliance image on the host
network, the bundled ssh service) with the ``ssh-spa`` door and the client provisioned from
``knockgate user add``'s bundle, exactly as tests/testbed/test_ssh_connect.py does. One
trial, timed inside the client container from just before ``ssh 198.18.64.1-ssh-spa 'echo
kg-ok'`` starts until it exits (the ProxyCommand's Python start, the SPA knock, the wait,
the container start, the ssh handshake and login are all in it):

- cold: the ssh service stopped by knockgate after going idle (the first trial: no
  container at all), so the knock starts it;
- warm: right after a cold trial, once its grant is over: the container runs, the port is
  closed to the client, so the knock only has to open it;
- direct (the baseline): right after the warm trial, while its grant is still open, the same
  ssh with ``-o ProxyCommand=none``: what ssh itself takes, without knockgate.

The first cold trial starts from no container at all (create, first start, host keys
generated into the empty hostkeys volume): it is in the cold row and also printed alone.

Everything is removed at the end, also on failure (the testbed's teardown).
"""

from __future__ import annotations

import argparse
import fcntl
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.testbed.test_ssh_connect import HOST_ALIAS, Login, provision, restore
from tests.testbed.test_testbed import (
    DOCKER,
    IMAGES,
    LOCK,
    REPO,
    Testbed,
    prerequisites,
    remove_leftovers,
    run,
    start,
    teardown,
)


def percentile(values: list[float], q: float) -> float:
    """Nearest rank (as service_bench.py)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def build_images() -> None:
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    for tag, context, dockerfile in IMAGES:
        args = ["build", "-q", "-t", tag]
        if dockerfile is not None:
            args += ["-f", str(REPO / dockerfile)]
        run([DOCKER, *args, str(REPO / context)], timeout=1800, env=env)


def checked(login: Login, what: str) -> float:
    if not login.ok:
        raise SystemExit(f"{what}: ssh failed: {login}")
    return login.seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()
    prerequisites()
    cold: list[float] = []
    warm: list[float] = []
    direct: list[float] = []
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one testbed at a time (fixed names)
        remove_leftovers()
        build_images()
        bed = Testbed(f"kgtb{os.getpid()}")
        try:
            start(bed)
            with tempfile.TemporaryDirectory(prefix="kg-sshbench-") as workdir:
                ssh_bed = provision(bed, Path(workdir))
                try:
                    for trial in range(args.trials):
                        if trial:
                            ssh_bed.wait_stopped()
                        cold.append(checked(ssh_bed.ssh(), f"cold trial {trial + 1}"))
                        ssh_bed.wait_grant_over()
                        if ssh_bed.container() is None:
                            raise SystemExit("the service stopped before the warm trial")
                        warm.append(checked(ssh_bed.ssh(), f"warm trial {trial + 1}"))
                        straight = ssh_bed.ssh("-o", "ProxyCommand=none")
                        direct.append(checked(straight, f"direct trial {trial + 1}"))
                        print(
                            f"trial {trial + 1}: cold {cold[-1] * 1000:.0f} ms, "
                            f"warm {warm[-1] * 1000:.0f} ms, direct {direct[-1] * 1000:.0f} ms",
                            file=sys.stderr,
                        )
                finally:
                    restore(bed)
        finally:
            teardown(bed)
    when = time.strftime("%Y-%m-%d", time.gmtime())
    print(f"`ssh {HOST_ALIAS} 'echo kg-ok'` through knockgate connect ({when}, {args.trials} each)")
    print()
    print("| service | median (ms) | p90 (ms) | min (ms) | max (ms) |")
    print("|---|---|---|---|---|")
    rows = (
        ("cold (stopped, knock starts it)", cold),
        ("warm (running, grant over)", warm),
        ("direct (no ProxyCommand, port open)", direct),
    )
    for name, values in rows:
        ms = [v * 1000 for v in values]
        print(
            f"| {name} | {statistics.median(ms):.0f} | {percentile(ms, 0.9):.0f} "
            f"| {min(ms):.0f} | {max(ms):.0f} |"
        )
    print()
    print(f"first cold trial (no container yet: create, host keys made): {cold[0] * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
