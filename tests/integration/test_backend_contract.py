"""What every firewall backend promises (the ``FirewallBackend`` protocol), on real firewalls.

The same tests run against :class:`NftablesBackend` and :class:`IptablesBackend`, each
driving the firewall of a network namespace of its own, with real TCP connections:

* a grant lets exactly the granted address in (IPv4 and IPv6), others get a reset;
* a revoke closes at once; a grant closes in the kernel at its deadline;
* a grant of 0 s (or less) opens nothing;
* a flushed firewall makes ``check()`` False and ``setup()`` restores it, live grants kept;
* ``teardown()`` leaves nothing of knockgate's and changes nothing of anyone else's;
* the scan detector holds a source that sweeps ports (``is_held``), not a quiet one.

Topology (tests/integration/netns.py): ``server`` (the backend, a TCP listener on port
22), ``client`` (the one granted) and ``other`` (never granted), on one bridge.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from appliance.config.schema import ScanPolicy
from appliance.core.model import Step
from appliance.firewall import FirewallBackend, FirewallPlan, PortRange
from appliance.firewall.iptables import IptablesBackend
from appliance.firewall.nftables import NftablesBackend
from tests.integration.conftest import require_root_tools
from tests.integration.daemon import PYTHON, connect, serve
from tests.integration.netns import Topology, cleanup_stale

pytestmark = pytest.mark.integration

SSH = Step(22, "tcp")
PLAN = FirewallPlan(
    protected=(SSH, Step(53, "udp")),
    scan=ScanPolicy(ports=10, window=2.0, hold=60.0),
    knock=(PortRange("tcp", 7113, 7113), PortRange("udp", 2231, 2231)),
)
BACKENDS = ["nftables", "iptables"]


class Lab:
    """One topology and one backend driving its server's firewall."""

    def __init__(self, topo: Topology, kind: str) -> None:
        self.topo = topo
        self.kind = kind
        self.server = topo.host("server")
        self.client = topo.host("client")
        self.other = topo.host("other")
        netns = self.server.netns
        self.backend: FirewallBackend = (
            NftablesBackend(netns=netns) if kind == "nftables" else IptablesBackend(netns=netns)
        )

    def sh(self, *commands: str) -> str:
        return "".join(self.topo.run("server", ["sh", "-c", c]).stdout for c in commands)

    def connect(self, host: str, ipv6: bool = False) -> str:
        address = self.server.ipv6 if ipv6 else self.server.ipv4
        return connect(self.topo, host, address, 22)

    def flush(self) -> None:
        """Someone flushes knockgate's rules (not its sets)."""
        if self.kind == "nftables":
            self.sh("nft flush chain inet knockgate gate", "nft flush chain inet knockgate input")
        else:
            self.sh("iptables -F KNOCKGATE", "iptables -F KNOCKGATE-GATE")

    def firewall(self) -> tuple[str, ...]:
        """Everything the server's firewall holds, as its tools print it. iptables-nft
        makes the built-in chains it touches as nft base chains and leaves them (empty)
        after the rules in them are deleted, so for iptables its own view counts (which
        shows the built-in chains whether or not they exist) and only the foreign table
        is compared as nft lists it."""
        nft = "nft -s list ruleset" if self.kind == "nftables" else "nft list table inet kgforeign"
        return (
            self.sh(nft),
            *(
                self.sh(f"{command} -t {table} -S")
                for command in ("iptables", "ip6tables")
                for table in ("filter", "mangle", "nat")
            ),
            self.sh("ipset list -n"),
        )

    def grants(self) -> dict[tuple[str, Step], float]:
        return {(g.address, g.step): g.expires_in for g in self.backend.grants()}


@pytest.fixture(params=BACKENDS)
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    require_root_tools("nft", "iptables", "ip6tables", "ipset")
    cleanup_stale()
    with Topology(("server", "client", "other"), vlan=False) as topo:
        serve(topo, "server", 22)
        lab = Lab(topo, request.param)
        try:
            yield lab
        finally:
            lab.backend.teardown()


@pytest.fixture
def gate(lab: Lab) -> Lab:
    lab.backend.setup(PLAN)
    assert lab.backend.check()
    return lab


def wait(what: Callable[[], bool], limit: float, step: float = 0.1) -> float | None:
    """Seconds until ``what()`` holds, None when it did not within ``limit``."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if what():
            return time.monotonic() - started
        time.sleep(step)
    return None


def test_protected_port_is_closed_with_a_reset(gate: Lab) -> None:
    assert gate.connect("client") == "refused"
    assert gate.connect("client", ipv6=True) == "refused"
    assert gate.backend.grants() == []


def test_grant_lets_only_the_granted_address_in(gate: Lab) -> None:
    gate.backend.grant(gate.client.ipv4, (SSH,), 60)
    gate.backend.grant(gate.client.ipv6, (SSH,), 60)
    assert gate.connect("client") == "open"
    assert gate.connect("client", ipv6=True) == "open"
    assert gate.connect("other") == "refused"
    assert gate.connect("other", ipv6=True) == "refused"
    granted = gate.grants()
    assert set(granted) == {(gate.client.ipv4, SSH), (gate.client.ipv6, SSH)}
    assert all(58 <= left <= 60 for left in granted.values()), granted


def test_revoke_closes_at_once_and_a_missing_grant_is_no_error(gate: Lab) -> None:
    gate.backend.grant(gate.client.ipv4, (SSH,), 60)
    assert gate.connect("client") == "open"
    gate.backend.revoke(gate.client.ipv4, (SSH,))
    assert gate.connect("client") == "refused"
    gate.backend.revoke(gate.client.ipv4, (SSH,))
    gate.backend.revoke(gate.other.ipv6, (SSH,))
    assert gate.backend.grants() == []


def test_grant_closes_in_the_kernel_at_its_deadline(gate: Lab) -> None:
    gate.backend.grant(gate.client.ipv4, (SSH,), 2)
    granted = time.monotonic()
    assert gate.connect("client") == "open"
    closed = wait(lambda: gate.connect("client") == "refused", 5.0)
    assert closed is not None
    assert 1.5 <= time.monotonic() - granted <= 3.0
    assert gate.backend.grants() == []


@pytest.mark.parametrize("seconds", [0, -1.0])
def test_grant_of_no_time_opens_nothing(gate: Lab, seconds: float) -> None:
    gate.backend.grant(gate.client.ipv4, (SSH,), seconds)
    assert gate.connect("client") == "refused"
    assert gate.backend.grants() == []


def test_flush_is_noticed_and_setup_restores_keeping_live_grants(gate: Lab) -> None:
    gate.backend.grant(gate.client.ipv4, (SSH,), 60)
    gate.backend.grant(gate.client.ipv6, (SSH,), 60)
    before = gate.grants()
    gate.flush()
    assert gate.connect("other") == "open"  # the hole the flush made
    assert not gate.backend.check()
    gate.backend.setup(PLAN)
    assert gate.backend.check()
    assert gate.connect("other") == "refused"
    assert gate.connect("client") == "open"
    assert gate.connect("client", ipv6=True) == "open"
    after = gate.grants()
    assert set(after) == set(before)
    assert all(after[key] <= before[key] for key in after), (before, after)


def test_teardown_leaves_nothing_of_ours_and_touches_nothing_else(lab: Lab) -> None:
    lab.sh(
        "nft add table inet kgforeign",
        "nft add chain inet kgforeign c '{ type filter hook input priority 0; policy accept; }'",
        "nft add rule inet kgforeign c tcp dport 9 drop",
        "iptables -A INPUT -p tcp --dport 9 -j DROP",
        "ip6tables -A INPUT -p tcp --dport 9 -j DROP",
        "ipset create kg-someone-else hash:ip",
    )
    try:
        before = lab.firewall()
        lab.backend.setup(PLAN)
        lab.backend.grant(lab.client.ipv4, (SSH,), 60)
        assert lab.connect("other") == "refused"
        lab.backend.teardown()
        assert lab.firewall() == before
        assert not lab.backend.check()
        assert lab.connect("other") == "open"
        lab.backend.teardown()  # idempotent
        assert lab.firewall() == before
    finally:
        lab.sh("nft delete table inet kgforeign")


# Opens TCP connections from SOURCE to PORTS of ADDRESS, one after another (closed
# ports answer with a reset at once): a port sweep, bounded in count and time.
SWEEP = r"""
import socket, sys
address, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
for port in ports:
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        s.settimeout(0.3)
        try:
            s.connect((address, port))
        except OSError:
            pass
"""


def test_scan_detector_holds_the_scanner_only(gate: Lab) -> None:
    server = gate.server.ipv4
    gate.topo.run("client", [PYTHON, "-c", SWEEP, server, "7113", "1000", "1001"], timeout=30)
    assert not gate.backend.is_held(gate.client.ipv4)  # three new ports: not a scan
    ports = [str(port) for port in range(1000, 1030)]
    gate.topo.run("other", [PYTHON, "-c", SWEEP, server, *ports], timeout=30)
    assert gate.backend.is_held(gate.other.ipv4)
    assert not gate.backend.is_held(gate.client.ipv4)
    assert not gate.backend.is_held(gate.other.ipv6)
