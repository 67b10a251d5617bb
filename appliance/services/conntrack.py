"""Open connections to a port, from the kernel's connection tracking table."""

from __future__ import annotations

import logging
import subprocess

log = logging.getLogger("knockgate.services")


def connections(port: int, proto: str = "tcp") -> int | None:
    """Established connections whose original destination port is ``port``.

    ``None`` when conntrack cannot be read (the caller then keeps the service up:
    an unknown state is not an idle one).
    """
    argv = ["conntrack", "-L", "-p", proto, "--orig-port-dst", str(port)]
    if proto == "tcp":
        argv += ["--state", "ESTABLISHED"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.warning("conntrack unavailable: %s", error)
        return None
    if done.returncode != 0:
        log.warning("conntrack failed: %s", done.stderr.strip())
        return None
    return sum(1 for line in done.stdout.splitlines() if line.strip())
