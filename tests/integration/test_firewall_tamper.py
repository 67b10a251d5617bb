"""Tampering with knockgate's firewall is noticed by ``check()`` and undone by ``setup()``.

For each backend and each way of tampering: ``check()`` turns False, ``setup()``
restores the rules, then a client without a grant gets a reset on the protected
port (a real connection from its own namespace), a granted client still connects
and no grant lasts longer than it had left. The daemon tests do the same with the
real daemon, whose periodic check repairs on its own within ``CHECK_SECONDS``.

Topology: ``server`` (the backend, a TCP listener on port 22), ``client`` (granted
on IPv4 and IPv6) and ``other`` (never granted), in namespaces of their own.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.config.schema import ScanPolicy
from appliance.core.model import Step
from appliance.firewall import FirewallBackend, FirewallPlan, PortRange
from appliance.firewall.iptables import IptablesBackend
from appliance.firewall.nftables import NftablesBackend
from appliance.runtime.daemon import CHECK_SECONDS
from tests.integration.conftest import require_root_tools
from tests.integration.daemon import Knockgate, connect, serve
from tests.integration.netns import Topology, cleanup_stale

pytestmark = pytest.mark.integration

SSH = Step(22, "tcp")
PLAN = FirewallPlan(
    protected=(SSH, Step(53, "udp")),
    scan=ScanPolicy(ports=10, window=2.0, hold=60.0),
    knock=(PortRange("tcp", 7113, 7113), PortRange("udp", 2231, 2231)),
)
GRANT_SECONDS = 60.0
HOSTS = ("server", "client", "other")

Tamper = Callable[[Topology], None]


@pytest.fixture
def topo() -> Iterator[Topology]:
    require_root_tools("nft", "iptables", "ip6tables", "ipset", "knock")
    cleanup_stale()
    with Topology(HOSTS, vlan=False) as topology:
        serve(topology, "server", 22)
        yield topology


def nft(topo: Topology, script: str) -> None:
    topo.run("server", ["nft", "-f", "-"], input=script)


def sh(topo: Topology, *commands: str) -> None:
    for command in commands:
        topo.run("server", ["sh", "-c", command])


def rule_handle(topo: Topology, chain: str, text: str) -> str:
    listing = topo.run("server", ["nft", "-a", "list", "chain", "inet", "knockgate", chain]).stdout
    for line in listing.splitlines():
        if text in line:
            return line.rsplit("# handle ", 1)[1].strip()
    raise AssertionError(f"no rule with {text!r} in chain {chain}:\n{listing}")


# -- ways of tampering ---------------------------------------------------------------------


def nft_flush_table(topo: Topology) -> None:
    nft(topo, "flush table inet knockgate\n")


def nft_flush_chain_gate(topo: Topology) -> None:
    nft(topo, "flush chain inet knockgate gate\n")


def nft_dormant(topo: Topology) -> None:
    nft(topo, "add table inet knockgate { flags dormant; }\n")


def nft_reject_rule_deleted(topo: Topology) -> None:
    handle = rule_handle(topo, "gate", "reject with tcp reset")
    nft(topo, f"delete rule inet knockgate gate handle {handle}\n")


def nft_accept_inserted_in_input(topo: Topology) -> None:
    nft(topo, "insert rule inet knockgate input tcp dport 22 accept\n")


def nft_accept_inserted_in_gate(topo: Topology) -> None:
    nft(topo, "insert rule inet knockgate gate tcp dport 22 accept\n")


def nft_grant_set_without_timeout(topo: Topology) -> None:
    """grants4 deleted and made again without `flags timeout`, holding a permanent
    grant for ``other``, and the rules that use it put back as they were."""
    other = topo.host("other").ipv4
    nft(
        topo,
        "flush chain inet knockgate gate\n"
        "flush chain inet knockgate mark_grants\n"
        "delete set inet knockgate grants4\n"
        "add set inet knockgate grants4 { type ipv4_addr . inet_proto . inet_service; }\n"
        f"add element inet knockgate grants4 {{ {other} . tcp . 22 }}\n"
        "add rule inet knockgate gate ct state established,related accept\n"
        "add rule inet knockgate gate ip saddr . meta l4proto . th dport @grants4 accept\n"
        "add rule inet knockgate gate ip6 saddr . meta l4proto . th dport @grants6 accept\n"
        "add rule inet knockgate gate meta l4proto tcp reject with tcp reset\n"
        "add rule inet knockgate gate drop\n",
    )
    assert connect(topo, "other", topo.host("server").ipv4, 22) == "open"  # it worked


def nft_input_priority_and_policy(topo: Topology) -> None:
    """The input chain made again at priority 100 with policy drop, its rules put back."""
    rules = topo.run("server", ["nft", "list", "chain", "inet", "knockgate", "input"]).stdout
    body = [line.strip() for line in rules.splitlines()[3:] if line.strip() not in ("", "}")]
    nft(
        topo,
        "flush chain inet knockgate input\n"
        "delete chain inet knockgate input\n"
        "add chain inet knockgate input { type filter hook input priority 100; policy drop; }\n"
        + "".join(f"add rule inet knockgate input {rule}\n" for rule in body),
    )


def ipt_chains_flushed(topo: Topology) -> None:
    sh(topo, "iptables -F KNOCKGATE", "iptables -F KNOCKGATE-GATE")


def ipt_jump_deleted(topo: Topology) -> None:
    sh(topo, "iptables -D INPUT -j KNOCKGATE")


def ipt_set_destroyed(topo: Topology) -> None:
    sh(topo, "iptables -F KNOCKGATE-SCAN", "ipset destroy knockgate-held4")


def ipt_grants_swapped_without_timeout(topo: Topology) -> None:
    """A set without timeouts holding a permanent grant for ``other`` swapped in
    (the rules keep using the name)."""
    other = topo.host("other").ipv4
    sh(
        topo,
        "ipset create kg-tamper hash:ip,port family inet",
        f"ipset add kg-tamper {other},tcp:22",
        "ipset swap kg-tamper knockgate-grants4",
        "ipset destroy kg-tamper",
    )
    assert connect(topo, "other", topo.host("server").ipv4, 22) == "open"  # it worked


def ipt_grants_of_another_type(topo: Topology) -> None:
    other = topo.host("other").ipv4
    sh(
        topo,
        "iptables -F KNOCKGATE-GATE",
        "iptables -t mangle -F KNOCKGATE-MARK",
        "ipset destroy knockgate-grants4",
        "ipset create knockgate-grants4 hash:ip family inet",
        f"ipset add knockgate-grants4 {other}",
    )


# (backend, tamper, whether the client's IPv4 grant survives: not when its set was
# replaced, since a set made by someone else carries nothing that would expire)
CASES: list[tuple[str, Tamper, bool]] = [
    ("nftables", nft_flush_table, True),
    ("nftables", nft_flush_chain_gate, True),
    ("nftables", nft_dormant, True),
    ("nftables", nft_reject_rule_deleted, True),
    ("nftables", nft_accept_inserted_in_input, True),
    ("nftables", nft_accept_inserted_in_gate, True),
    ("nftables", nft_grant_set_without_timeout, False),
    ("nftables", nft_input_priority_and_policy, True),
    ("iptables", ipt_chains_flushed, True),
    ("iptables", ipt_jump_deleted, True),
    ("iptables", ipt_set_destroyed, True),
    ("iptables", ipt_grants_swapped_without_timeout, False),
    ("iptables", ipt_grants_of_another_type, False),
]


def make_backend(backend: str, topo: Topology) -> FirewallBackend:
    netns = topo.host("server").netns
    return NftablesBackend(netns=netns) if backend == "nftables" else IptablesBackend(netns=netns)


def remaining(backend: FirewallBackend) -> dict[tuple[str, Step], float]:
    return {(g.address, g.step): g.expires_in for g in backend.grants()}


@pytest.mark.parametrize(
    ("backend_name", "tamper", "v4_grant_kept"),
    CASES,
    ids=[f"{backend}-{tamper.__name__}" for backend, tamper, _ in CASES],
)
def test_tampering_is_noticed_and_repaired_keeping_live_grants(
    topo: Topology, backend_name: str, tamper: Tamper, v4_grant_kept: bool
) -> None:
    server, client = topo.host("server"), topo.host("client")
    backend = make_backend(backend_name, topo)
    try:
        backend.setup(PLAN)
        assert backend.check()
        backend.grant(client.ipv4, (SSH,), GRANT_SECONDS)
        backend.grant(client.ipv6, (SSH,), GRANT_SECONDS)
        before = remaining(backend)
        tamper(topo)
        assert not backend.check()
        backend.setup(PLAN)
        assert backend.check()
        assert connect(topo, "other", server.ipv4, 22) == "refused"  # a reset: closed
        assert connect(topo, "other", server.ipv6, 22) == "refused"
        assert connect(topo, "client", server.ipv6, 22) == "open"
        expected_v4 = "open" if v4_grant_kept else "refused"
        assert connect(topo, "client", server.ipv4, 22) == expected_v4
        after = remaining(backend)
        assert (client.ipv6, SSH) in after
        assert ((client.ipv4, SSH) in after) is v4_grant_kept
        assert set(after) <= set(before)  # nothing the tamperer added survives
        for key, left in after.items():
            assert left <= before[key], (key, left, before[key])
    finally:
        backend.teardown()


def test_nft_repair_keeps_the_grants_timeouts_exactly_in_place_and_short_when_carried(
    topo: Topology,
) -> None:
    """In place (a flushed chain) the grant sets are not touched; re-created (dormant),
    each grant goes back with less than it had left when it was read."""
    client = topo.host("client").ipv4
    backend = NftablesBackend(netns=topo.host("server").netns)
    try:
        backend.setup(PLAN)
        backend.grant(client, (SSH,), GRANT_SECONDS)
        nft_flush_chain_gate(topo)
        before = remaining(backend)[(client, SSH)]
        backend.setup(PLAN)
        after = remaining(backend)[(client, SSH)]
        assert before - 1.0 <= after <= before  # whole seconds (nft JSON): one may tick
        nft_dormant(topo)
        before = remaining(backend)[(client, SSH)]
        backend.setup(PLAN)
        after = remaining(backend)[(client, SSH)]
        assert after <= before - 0.2  # the carry margin, at least
    finally:
        backend.teardown()


# Connects to ADDRESS:PORT over and over until told to stop on stdin (or LIMIT s
# pass); prints how many connections were opened, refused and timed out.
HAMMER = r"""
import select, socket, sys, time
address, port, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
seen = {"open": 0, "refused": 0, "timeout": 0}
deadline = time.monotonic() + limit
while time.monotonic() < deadline:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        try:
            sock.connect((address, port))
            seen["open"] += 1
        except ConnectionRefusedError:
            seen["refused"] += 1
        except OSError:
            seen["timeout"] += 1
    if sum(seen.values()) == 1:
        print("ready", flush=True)
    if select.select([sys.stdin], [], [], 0)[0]:
        break
print(seen["open"], seen["refused"], seen["timeout"], flush=True)
"""


def test_nft_setup_never_lets_a_connection_through_while_it_runs(topo: Topology) -> None:
    """Rebuilding in place and re-creating the table are single transactions: a client
    without a grant connecting all the while never gets through."""
    backend = NftablesBackend(netns=topo.host("server").netns)
    server = topo.host("server").ipv4
    try:
        backend.setup(PLAN)
        hammer = topo.popen(
            "other",
            [sys.executable, "-c", HAMMER, server, "22", "60"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert hammer.stdout is not None
        assert hammer.stdout.readline().strip() == "ready"
        for _ in range(15):
            backend.setup(PLAN)  # in place
            nft(topo, "add counter inet knockgate foreign\n")  # opens nothing ...
            backend.setup(PLAN)  # ... but makes setup re-create the table
        out, _ = hammer.communicate("stop\n", timeout=30)
        opened, refused, timed_out = map(int, out.split())
        assert (opened, timed_out) == (0, 0)
        assert refused > 100
    finally:
        backend.teardown()


# -- the daemon repairs on its own ---------------------------------------------------------

CONFIG = """\
interfaces: [eth0]
status_socket: @SOCKET@
firewall: {backend: nftables}
doors:
  ssh:
    knock: {sequence: [7113, 2231/udp, 9157], seq_timeout: 5, tcpflags: "syn,!ack"}
    open: {ports: [22/tcp], duration: 120}
"""


def wait_for(what: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.parametrize("tamper", [nft_flush_table, nft_flush_chain_gate, nft_dormant])
def test_daemon_repairs_a_tampered_table_within_its_check_interval(
    topo: Topology, tmp_path: Path, tamper: Tamper
) -> None:
    server = topo.host("server").ipv4
    daemon = Knockgate(topo, tmp_path, CONFIG).start()
    try:
        topo.run("client", ["knock", server, "7113", "2231:udp", "9157"])
        assert wait_for(lambda: connect(topo, "client", server, 22) == "open", 5)
        assert connect(topo, "other", server, 22) == "refused"
        tamper(topo)
        assert connect(topo, "other", server, 22) == "open"  # the hole the tamper made
        tampered = time.monotonic()
        assert wait_for(
            lambda: connect(topo, "other", server, 22) == "refused", CHECK_SECONDS + 5
        ), daemon.log()
        assert time.monotonic() - tampered < CHECK_SECONDS + 5
        assert connect(topo, "client", server, 22) == "open"
        assert daemon.status()["counters"]["firewall_repairs"] >= 1  # type: ignore[index]
        assert "restoring them" in daemon.log()
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.log()
