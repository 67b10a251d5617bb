"""The host's own addresses, re-read while running (DHCP, added addresses)."""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess
import threading
from collections.abc import Callable

log = logging.getLogger("knockgate.capture")

POLL_SECONDS = 2.0


def host_addresses() -> frozenset[str]:
    """Every address on every interface, in canonical text form (``ip -j addr``)."""
    try:
        done = subprocess.run(
            ["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=5, check=True
        )
        interfaces = json.loads(done.stdout or "[]")
    except (OSError, subprocess.SubprocessError, ValueError) as error:
        log.warning("cannot read the host's addresses: %s", error)
        return frozenset()
    found: set[str] = set()
    for interface in interfaces:
        for info in interface.get("addr_info", []):
            local = info.get("local")
            if local:
                try:
                    found.add(str(ipaddress.ip_address(local)))
                except ValueError:
                    continue
    return frozenset(found)


class AddressWatcher:
    """Polls the host's addresses and reports each change through ``changed``."""

    def __init__(
        self,
        changed: Callable[[frozenset[str]], None],
        read: Callable[[], frozenset[str]] = host_addresses,
        interval: float = POLL_SECONDS,
    ) -> None:
        self.changed = changed
        self.read = read
        self.interval = interval
        self.current = read()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="addresses", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        while not self.stopping.wait(self.interval):
            now = self.read()
            if now and now != self.current:
                self.current = now
                self.changed(now)
