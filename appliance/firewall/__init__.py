"""Firewall backends: one small protocol, one module per backend.

The daemon protects the ports that doors open (TCP answered with a reset, UDP
dropped, so a scanner sees "closed"), grants (address, port) pairs with a
kernel-side timeout so that a grant closes at its deadline even if knockgate is
killed, and keeps a scan detector in the kernel whose verdict the daemon reads
before granting.

* :mod:`appliance.firewall.nftables` — default: one table ``inet knockgate``.
* :mod:`appliance.firewall.iptables` — iptables-nft chains and ipsets.
* :mod:`appliance.firewall.memory` — in memory, for unit tests.

Every backend's ``setup`` is idempotent and keeps the grants that are still
within their deadline (reconcile after a restart); ``teardown`` removes all
that knockgate created and nothing else. Stopping the daemon does not tear
down: the ports stay closed and the grants expire on their own (fail closed).
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from typing import Protocol

from appliance.config.schema import ScanPolicy
from appliance.core.model import Proto, Step

__all__ = [
    "GRANT_SLACK",
    "FirewallBackend",
    "FirewallPlan",
    "GrantEntry",
    "PortRange",
    "ScanPolicy",
    "grant_seconds",
]

# Kernel grant timeouts are whole seconds (nft 1.0.6's JSON reads no fraction, ipset
# has none). A grant reaches the kernel a millisecond or so after its deadline was set
# from the packet's timestamp, so a 30 s grant has 29.999 s left: rounded down it would
# lose a second, and a 1 s grant (fwknop's -f 1) would open nothing.
GRANT_SLACK = 0.05  # the most a kernel timeout may run past the deadline it was asked for


def grant_seconds(seconds: float) -> int:
    """A fresh grant's kernel timeout: the time left in whole seconds, rounded down
    unless within GRANT_SLACK of the next second; 0 (open nothing) under that."""
    if not seconds > 0:
        return 0
    if math.isinf(seconds):
        return 2**31 - 1
    return math.floor(seconds + GRANT_SLACK)


@dataclass(frozen=True, slots=True, order=True)
class PortRange:
    """Ports ``low`` to ``high`` (inclusive) of one protocol."""

    proto: Proto
    low: int
    high: int

    def __str__(self) -> str:
        span = str(self.low) if self.low == self.high else f"{self.low}-{self.high}"
        return f"{span}/{self.proto}"


@dataclass(frozen=True, slots=True)
class FirewallPlan:
    """Everything a backend needs to build its rules: pure data."""

    protected: tuple[Step, ...]
    always_allow: tuple[str, ...] = ()  # networks in CIDR form
    scan: ScanPolicy | None = field(default_factory=ScanPolicy)
    # What the doors' knocks are sent to (sequence and one-time steps, TOTP ranges, SPA
    # ports): the scan detector does not count them, so a door's own knock never makes
    # its knocker a scanner, however long the sequence.
    knock: tuple[PortRange, ...] = ()

    def knock_ranges(self, proto: str) -> tuple[tuple[int, int], ...]:
        """The knock ports of ``proto`` as sorted, merged (low, high) ranges."""
        spans = sorted((r.low, r.high) for r in self.knock if r.proto == proto)
        merged: list[tuple[int, int]] = []
        for low, high in spans:
            if merged and low <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], high))
            else:
                merged.append((low, high))
        return tuple(merged)

    def ports(self, proto: str) -> tuple[int, ...]:
        return tuple(sorted({step.port for step in self.protected if step.proto == proto}))

    def networks(self, version: int) -> tuple[str, ...]:
        return tuple(
            net for net in self.always_allow if ipaddress.ip_network(net).version == version
        )


@dataclass(frozen=True, slots=True)
class GrantEntry:
    """A grant as the kernel holds it."""

    address: str
    step: Step
    expires_in: float  # seconds


class FirewallBackend(Protocol):
    """What the daemon needs from a firewall."""

    name: str

    def setup(self, plan: FirewallPlan) -> None:
        """Create or update knockgate's rules atomically; keep live grants."""

    def grant(self, address: str, ports: tuple[Step, ...], seconds: float) -> None:
        """Let ``address`` reach ``ports`` for ``seconds`` (never longer)."""

    def revoke(self, address: str, ports: tuple[Step, ...]) -> None:
        """Close what was granted to ``address`` on ``ports`` (absent: no error)."""

    def is_held(self, address: str) -> bool:
        """True while the scan detector holds ``address`` off."""

    def grants(self) -> list[GrantEntry]:
        """The grants the kernel holds now."""

    def set_direct(self, entries: tuple[tuple[str, Step], ...]) -> None:
        """The service containers' own (address, port): gated like their published port."""

    def check(self) -> bool:
        """True when knockgate's rules are in place (False: flushed by someone)."""

    def teardown(self) -> None:
        """Remove everything knockgate created; idempotent."""
