"""The iptables backend against real iptables-nft, ipset, nmap and TCP/UDP peers.

Each test builds its own pair of network namespaces (``kgipt<pid><n>s`` holds the
backend and a TCP/UDP echo server, ``kgipt<pid><n>c`` is the client) joined by one
veth pair, and removes both in the fixture's ``finally``. Addresses:

    server  198.18.77.1/24   2001:2::1/64
    client  198.18.77.2/24   2001:2::2/64   (primary: nmap's source)
            198.18.77.9/24                  (a second client address)

The forward-path tests add a third namespace, ``kgipt<pid><n>k``, a "service
container" behind the server (the server forwards, the only namespace that
does; the client routes 198.18.78.0/24 and 2001:2:0:78::/64 through it), and
mimic a Docker-published port with a DNAT in the server's ``nat`` table:

    server    198.18.78.1/24   2001:2:0:78::1/64
    container 198.18.78.2/24   2001:2:0:78::2/64   TCP 22 (banner), UDP 53 (echo)
    server:2222/tcp -> container:22     server:5300/udp -> container:53

Needs root, iptables/ip6tables (+ -restore), ipset and nmap.
"""

from __future__ import annotations

import itertools
import os
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest

from appliance.core.model import Step
from appliance.errors import FirewallError
from appliance.firewall import FirewallPlan, PortRange, ScanPolicy
from appliance.firewall.iptables import IptablesBackend
from tests.integration.conftest import require

pytestmark = pytest.mark.integration

SERVER = "198.18.77.1"
CLIENT = "198.18.77.2"
SECOND = "198.18.77.9"
SERVER6 = "2001:2::1"
CLIENT6 = "2001:2::2"
TCP_PORT = 8080  # protected, a listener behind it
UDP_PORT = 5353  # protected, an echo server behind it
OPEN_UDP_PORT = 5354  # not protected, nothing listening: ICMP port unreachable
WEB = Step(TCP_PORT, "tcp")
ECHO = Step(UDP_PORT, "udp")
# The doors' knock ports (not counted by the scan detector): 16 TCP, a TCP range, one UDP.
KNOCK = (
    *(PortRange("tcp", port, port) for port in range(7001, 7032, 2)),
    PortRange("tcp", 20000, 20999),
    PortRange("udp", 7004, 7004),
)
PLAN = FirewallPlan(
    protected=(WEB, ECHO), scan=ScanPolicy(ports=10, window=2.0, hold=60.0), knock=KNOCK
)
CONTAINER = "198.18.78.2"
CONTAINER6 = "2001:2:0:78::2"
PUBLISHED = Step(2222, "tcp")  # DNATed to the container's SSH
PUBLISHED_UDP = Step(5300, "udp")  # DNATed to the container's DNS
SSH = Step(22, "tcp")  # the container's own port (not protected on the host)
DNS = Step(53, "udp")
FORWARD_PLAN = FirewallPlan(
    protected=(WEB, ECHO, PUBLISHED, PUBLISHED_UDP),
    scan=ScanPolicy(ports=10, window=2.0, hold=60.0),
)
COMMAND_WAIT = 30.0  # seconds: the longest any one command of a test may take
TOOLS = ("ip", "iptables", "ip6tables", "iptables-restore", "ip6tables-restore", "ipset", "nmap")

# Serves TCP (a one-line banner, then close) and UDP (echo) on both families.
SERVER_SCRIPT = r"""
import selectors, socket, sys
host4, host6, tcp_port, udp_port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sel = selectors.DefaultSelector()
for family, host in ((socket.AF_INET, host4), (socket.AF_INET6, host6)):
    tcp = socket.socket(family, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((host, tcp_port))
    tcp.listen(64)
    sel.register(tcp, selectors.EVENT_READ, "tcp")
    udp = socket.socket(family, socket.SOCK_DGRAM)
    udp.bind((host, udp_port))
    sel.register(udp, selectors.EVENT_READ, "udp")
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        if key.data == "tcp":
            conn, _ = key.fileobj.accept()
            conn.sendall(b"knockgate\n")
            conn.close()
        else:
            data, peer = key.fileobj.recvfrom(2048)
            key.fileobj.sendto(data, peer)
"""

# One connection attempt: prints open (the server answered), refused or timeout.
PROBE_SCRIPT = r"""
import socket, sys
src, dst, port, proto, wait = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
family = socket.AF_INET6 if ":" in dst else socket.AF_INET
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
with socket.socket(family, kind) as sock:
    sock.settimeout(wait)
    sock.bind((src, 0))
    try:
        sock.connect((dst, port))
        if proto == "udp":
            sock.send(b"knock")
        print("open" if sock.recv(64) else "empty")
    except ConnectionRefusedError:
        print("refused")
    except TimeoutError:
        print("timeout")
"""

# TCP knocks from one address, as fast as the resets come back (well within 2 s).
KNOCKS_SCRIPT = r"""
import socket, sys
src, dst, ports = sys.argv[1], sys.argv[2], [int(port) for port in sys.argv[3:]]
for port in ports:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        sock.bind((src, 0))
        try:
            sock.connect((dst, port))
        except OSError:
            pass
"""

_TESTS = itertools.count()


@dataclass
class Lab:
    server_ns: str
    client_ns: str

    def run(self, ns: str, argv: Sequence[str], check: bool = True) -> str:
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            capture_output=True,
            text=True,
            timeout=COMMAND_WAIT,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def server(self, *argv: str, check: bool = True) -> str:
        return self.run(self.server_ns, argv, check)

    def probe(self, step: Step, src: str = CLIENT, dst: str = SERVER, wait: float = 1.0) -> str:
        """Connect from ``src`` in the client namespace: open, refused or timeout."""
        argv = [sys.executable, "-c", PROBE_SCRIPT, src, dst, str(step.port), step.proto]
        return self.run(self.client_ns, [*argv, str(wait)]).strip()

    def nmap(self, *args: str) -> dict[str, str]:
        """Port states as nmap reports them from the client, ``{"8080/tcp": "closed"}``."""
        argv = ["nmap", "-n", "-Pn", "--max-retries", "1", "--host-timeout", "20s", "-oG", "-"]
        out = self.run(self.client_ns, [*argv, *args])
        return {
            f"{port}/{proto}": state
            for port, state, proto in re.findall(r"(\d+)/([a-z|]+)/(tcp|udp)/", out)
        }

    def snapshot(self) -> tuple[str, ...]:
        return (
            *(
                self.server(command, "-t", table, "-S")
                for command in ("iptables", "ip6tables")
                for table in ("filter", "mangle", "nat")
            ),
            self.server("ipset", "list", "-n"),
        )

    def rules(self, chain: str, command: str = "iptables", table: str = "filter") -> list[str]:
        """The ``-A`` rules of one chain in the server namespace."""
        listing = self.server(command, "-t", table, "-S", chain).splitlines()
        return [line for line in listing if line.startswith("-A ")]

    def backend(self) -> IptablesBackend:
        return IptablesBackend(netns=self.server_ns)


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=COMMAND_WAIT)


def _wait_ready(server: subprocess.Popen[str], limit: float = 5.0) -> None:
    assert server.stdout is not None
    ready, _, _ = select.select([server.stdout], [], [], limit)
    line = server.stdout.readline() if ready else ""
    if line.strip() != "ready":
        raise AssertionError(f"echo server did not start within {limit} s: {line!r}")


def _serve(ns: str, host4: str, host6: str, tcp: int, udp: int) -> subprocess.Popen[str]:
    """The TCP banner / UDP echo server in ``ns``; the caller kills it."""
    argv = [sys.executable, "-c", SERVER_SCRIPT, host4, host6, str(tcp), str(udp)]
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE, text=True)


@pytest.fixture
def lab() -> Iterator[Lab]:
    require(os.geteuid() == 0, "needs root")
    for tool in TOOLS:
        require(shutil.which(tool) is not None, f"{tool} not installed")
    tag = f"kgipt{os.getpid() % 100000:05d}{next(_TESTS) % 10}"  # 11 chars + 1
    lab = Lab(server_ns=f"{tag}s", client_ns=f"{tag}c")
    server: subprocess.Popen[str] | None = None
    try:
        _ip("netns", "add", lab.server_ns)
        _ip("netns", "add", lab.client_ns)
        _ip(
            "link",
            "add",
            f"{tag}a",
            "netns",
            lab.server_ns,
            "type",
            "veth",
            "peer",
            "name",
            f"{tag}b",
            "netns",
            lab.client_ns,
        )
        for ns, link, addresses in (
            (lab.server_ns, f"{tag}a", (f"{SERVER}/24", f"{SERVER6}/64")),
            (lab.client_ns, f"{tag}b", (f"{CLIENT}/24", f"{CLIENT6}/64", f"{SECOND}/24")),
        ):
            for address in addresses:
                extra = ("nodad",) if ":" in address else ()
                _ip("-n", ns, "addr", "add", address, "dev", link, *extra)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", link, "up")
        server = _serve(lab.server_ns, SERVER, SERVER6, TCP_PORT, UDP_PORT)
        _wait_ready(server)
        yield lab
    finally:
        if server is not None:
            server.kill()
            server.wait(timeout=5)
        for ns in (lab.server_ns, lab.client_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=COMMAND_WAIT)
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert tag not in names, f"namespaces left behind: {names}"


@pytest.fixture
def routed(lab: Lab) -> Iterator[Lab]:
    """``lab`` plus a service container behind the server and a DNAT that publishes it."""
    tag = lab.server_ns[:-1]
    container_ns = f"{tag}k"
    listener: subprocess.Popen[str] | None = None
    try:
        _ip("netns", "add", container_ns)
        _ip(
            "link",
            "add",
            f"{tag}d",
            "netns",
            lab.server_ns,
            "type",
            "veth",
            "peer",
            "name",
            f"{tag}e",
            "netns",
            container_ns,
        )
        for ns, link, addresses in (
            (lab.server_ns, f"{tag}d", ("198.18.78.1/24", "2001:2:0:78::1/64")),
            (container_ns, f"{tag}e", (f"{CONTAINER}/24", f"{CONTAINER6}/64")),
        ):
            # A router sends neighbour solicitations for forwarded packets from its
            # link-local address only, none while that is tentative: without this the
            # first forwarded IPv6 packet waits ~1 s for DAD (the SYN is retransmitted).
            _ip("netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{link}.accept_dad=0")
            for address in addresses:
                extra = ("nodad",) if ":" in address else ()
                _ip("-n", ns, "addr", "add", address, "dev", link, *extra)
            _ip("-n", ns, "link", "set", link, "up")
        _ip("-n", container_ns, "link", "set", "lo", "up")
        _ip("-n", container_ns, "route", "add", "default", "via", "198.18.78.1")
        _ip("-n", container_ns, "-6", "route", "add", "default", "via", "2001:2:0:78::1")
        _ip("-n", lab.client_ns, "route", "add", "198.18.78.0/24", "via", SERVER)
        _ip("-n", lab.client_ns, "-6", "route", "add", "2001:2:0:78::/64", "via", SERVER6)
        lab.server("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        for command, destination in (("iptables", CONTAINER), ("ip6tables", f"[{CONTAINER6}]")):
            for published, target in ((PUBLISHED, SSH), (PUBLISHED_UDP, DNS)):
                lab.server(
                    command,
                    "-t",
                    "nat",
                    "-A",
                    "PREROUTING",
                    "-p",
                    published.proto,
                    "--dport",
                    str(published.port),
                    "-j",
                    "DNAT",
                    "--to-destination",
                    f"{destination}:{target.port}",
                )
        listener = _serve(container_ns, CONTAINER, CONTAINER6, SSH.port, DNS.port)
        _wait_ready(listener)
        yield lab
    finally:
        if listener is not None:
            listener.kill()
            listener.wait(timeout=5)
        subprocess.run(["ip", "netns", "del", container_ns], capture_output=True, timeout=30)
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert container_ns not in names, f"namespace left behind: {names}"


def _docker_starts(lab: Lab, command: str = "iptables") -> None:
    """What dockerd does to ``filter`` at start: its chain, jumped to from FORWARD's top."""
    lab.server(command, "-N", "DOCKER-USER")
    lab.server(command, "-A", "DOCKER-USER", "-j", "RETURN")
    lab.server(command, "-I", "FORWARD", "-j", "DOCKER-USER")


def _docker_accepts_the_container(lab: Lab) -> None:
    """Docker's own accept for a published port, inserted above what FORWARD had."""
    argv = ["-d", f"{CONTAINER}/32", "-p", "tcp", "--dport", str(SSH.port), "-j", "ACCEPT"]
    lab.server("iptables", "-I", "FORWARD", "2", *argv)


def _docker_user_gone(lab: Lab, command: str = "iptables") -> None:
    lab.server(command, "-D", "FORWARD", "-j", "DOCKER-USER")
    lab.server(command, "-F", "DOCKER-USER")
    lab.server(command, "-X", "DOCKER-USER")


@pytest.fixture
def gate(lab: Lab) -> IptablesBackend:
    backend = lab.backend()
    backend.setup(PLAN)
    return backend


def test_reachable_without_the_backend(lab: Lab) -> None:
    """The lab itself works: without rules the server answers on both protocols."""
    assert lab.probe(WEB) == "open"
    assert lab.probe(ECHO) == "open"
    assert lab.probe(WEB, src=CLIENT6, dst=SERVER6) == "open"


def test_protected_ports_look_closed_and_silent(lab: Lab, gate: IptablesBackend) -> None:
    states = lab.nmap("-sS", "-sU", "-p", f"T:{TCP_PORT},U:{UDP_PORT},U:{OPEN_UDP_PORT}", SERVER)
    assert states == {
        f"{TCP_PORT}/tcp": "closed",  # reset, not "filtered"
        f"{UDP_PORT}/udp": "open|filtered",  # no answer at all
        f"{OPEN_UDP_PORT}/udp": "closed",  # an unprotected port still answers
    }
    assert lab.probe(WEB) == "refused"
    assert lab.probe(ECHO) == "timeout"
    assert lab.probe(WEB, src=CLIENT6, dst=SERVER6) == "refused"
    assert lab.probe(ECHO, src=CLIENT6, dst=SERVER6) == "timeout"


def test_grant_opens_for_that_address_only(lab: Lab, gate: IptablesBackend) -> None:
    gate.grant(CLIENT, (WEB, ECHO), 30)
    assert lab.probe(WEB) == "open"
    assert lab.probe(ECHO) == "open"
    assert lab.nmap("-sS", "-p", str(TCP_PORT), SERVER) == {f"{TCP_PORT}/tcp": "open"}
    assert lab.probe(WEB, src=SECOND) == "refused"
    assert lab.probe(ECHO, src=SECOND) == "timeout"
    assert lab.probe(WEB, src=CLIENT6, dst=SERVER6) == "refused"


def test_grant_ipv6(lab: Lab, gate: IptablesBackend) -> None:
    gate.grant(CLIENT6, (WEB,), 30)
    assert lab.probe(WEB, src=CLIENT6, dst=SERVER6) == "open"
    assert lab.probe(WEB) == "refused"
    assert [(g.address, g.step) for g in gate.grants()] == [(CLIENT6, WEB)]


def test_grant_closes_in_the_kernel_at_its_deadline(lab: Lab, gate: IptablesBackend) -> None:
    gate.grant(CLIENT, (WEB,), 2)
    granted = time.monotonic()
    assert lab.probe(WEB) == "open"
    while time.monotonic() - granted < 4.0:
        if lab.probe(WEB) == "refused":
            break
        time.sleep(0.2)
    closed_after = time.monotonic() - granted
    assert 1.5 <= closed_after <= 3.0, closed_after
    assert gate.grants() == []


def test_revoke_closes_at_once(lab: Lab, gate: IptablesBackend) -> None:
    gate.grant(CLIENT, (WEB, ECHO), 30)
    assert lab.probe(WEB) == "open"
    gate.revoke(CLIENT, (WEB, ECHO))
    assert lab.probe(WEB) == "refused"
    assert lab.probe(ECHO) == "timeout"
    gate.revoke(CLIENT, (WEB, ECHO))  # absent: no error
    gate.revoke(CLIENT6, (WEB,))
    assert gate.grants() == []


def test_grants_lists_what_the_kernel_holds(lab: Lab, gate: IptablesBackend) -> None:
    gate.grant(CLIENT, (WEB, ECHO), 30.9)
    gate.grant(CLIENT6, (ECHO,), 10)
    gate.grant(CLIENT, (WEB,), 20)  # re-granting resets the timeout
    held = {(g.address, g.step): g.expires_in for g in gate.grants()}
    assert set(held) == {(CLIENT, WEB), (CLIENT, ECHO), (CLIENT6, ECHO)}
    assert 18 <= held[(CLIENT, WEB)] <= 20
    assert 28 <= held[(CLIENT, ECHO)] <= 30
    assert 8 <= held[(CLIENT6, ECHO)] <= 10


def test_setup_twice_is_idempotent_and_keeps_grants(lab: Lab, gate: IptablesBackend) -> None:
    gate.grant(CLIENT, (WEB,), 30)
    before = lab.snapshot()
    gate.setup(PLAN)
    assert lab.snapshot() == before
    for command in ("iptables", "ip6tables"):
        assert lab.rules("INPUT", command) == ["-A INPUT -j KNOCKGATE"]
        assert lab.rules("FORWARD", command) == ["-A FORWARD -j KNOCKGATE-FWD"]
        assert lab.rules("PREROUTING", command, "mangle") == ["-A PREROUTING -j KNOCKGATE-MARK"]
    assert lab.probe(WEB) == "open"
    assert gate.check()


def test_setup_with_a_new_scan_policy_keeps_grants(lab: Lab, gate: IptablesBackend) -> None:
    gate.grant(CLIENT, (WEB,), 30)
    plan = FirewallPlan(protected=(WEB, ECHO), scan=ScanPolicy(ports=5, window=3.0, hold=20.0))
    gate.setup(plan)
    assert "timeout 20 " in lab.server("ipset", "list", "-t", "knockgate-held4")
    assert "timeout 3 " in lab.server("ipset", "list", "-t", "knockgate-seen6")
    assert "--hashlimit-burst 5 " in lab.server("iptables", "-S", "KNOCKGATE-SCAN")
    assert "knockgate-held4-tmp" not in lab.server("ipset", "list", "-n")
    assert lab.probe(WEB) == "open"
    assert gate.check()
    gate.setup(FirewallPlan(protected=(ECHO,), scan=None))  # TCP no longer protected
    assert lab.probe(WEB, src=SECOND) == "open"
    assert "KNOCKGATE-SCAN" not in lab.server("iptables", "-S", "KNOCKGATE")
    assert gate.check()


def test_always_allow_lets_its_network_in(lab: Lab) -> None:
    backend = lab.backend()
    backend.setup(FirewallPlan(protected=(WEB,), always_allow=("198.18.77.8/29", "2001:2::/64")))
    assert lab.probe(WEB, src=SECOND) == "open"
    assert lab.probe(WEB, src=CLIENT6, dst=SERVER6) == "open"
    assert lab.probe(WEB) == "refused"
    backend.setup(FirewallPlan(protected=(WEB,)))  # the allow sets are refilled, not appended
    assert lab.probe(WEB, src=SECOND) == "refused"


def test_scan_holds_the_scanner_not_the_knocker(lab: Lab, gate: IptablesBackend) -> None:
    for port in (7001, 7002, 7003):  # three knocks, as a knock client sends them
        assert lab.probe(Step(port, "tcp"), src=SECOND) == "refused"
    assert not gate.is_held(SECOND)
    assert not gate.is_held(CLIENT)
    lab.nmap("-sS", "-r", "-p", "1000-1100", SERVER)  # 101 new ports in well under 2 s
    assert gate.is_held(CLIENT)
    assert not gate.is_held(SECOND)
    assert not gate.is_held(CLIENT6)


def test_long_knock_is_not_counted_as_a_scan(lab: Lab, gate: IptablesBackend) -> None:
    """19 knock ports (two multiport rules and a range) in well under a second: no hold;
    the same count of other ports is a scan."""
    assert lab.rules("KNOCKGATE-SCAN")[:2] == [
        "-A KNOCKGATE-SCAN -p tcp -m multiport --dports 7001,7003,7005,7007,7009,7011,7013,"
        "7015,7017,7019,7021,7023,7025,7027,7029 -j RETURN",
        "-A KNOCKGATE-SCAN -p tcp -m multiport --dports 7031,20000:20999 -j RETURN",
    ]
    knocks = [*range(7001, 7032, 2), 20000, 20500, 20999]
    lab.run(lab.client_ns, [sys.executable, "-c", KNOCKS_SCRIPT, SECOND, SERVER, *map(str, knocks)])
    assert not gate.is_held(SECOND)
    others = [*range(1001, 1032, 2), 21000, 21500, 21999]
    lab.run(lab.client_ns, [sys.executable, "-c", KNOCKS_SCRIPT, CLIENT, SERVER, *map(str, others)])
    assert gate.is_held(CLIENT)


def test_no_scan_policy_holds_nobody(lab: Lab) -> None:
    backend = lab.backend()
    backend.setup(FirewallPlan(protected=(WEB,), scan=None))
    lab.nmap("-sS", "-r", "-p", "1000-1100", SERVER)
    assert not backend.is_held(CLIENT)
    assert lab.probe(WEB) == "refused"


def test_grant_does_not_bypass_the_hosts_own_input_rules(lab: Lab, gate: IptablesBackend) -> None:
    """Let-through is RETURN: like the nft backend's own table, the host's rules still run."""
    lab.server(
        "iptables",
        "-A",
        "INPUT",
        "-s",
        SECOND,
        "-p",
        "tcp",
        "-j",
        "REJECT",
        "--reject-with",
        "tcp-reset",
    )
    gate.grant(CLIENT, (WEB,), 30)
    gate.grant(SECOND, (WEB,), 30)
    assert lab.probe(WEB) == "open"
    assert lab.probe(WEB, src=SECOND) == "refused"
    gate.setup(PLAN)  # the jump stays first, the host's rule stays
    rules = lab.server("iptables", "-S", "INPUT").splitlines()
    assert rules[1:] == [
        "-A INPUT -j KNOCKGATE",
        f"-A INPUT -s {SECOND}/32 -p tcp -j REJECT --reject-with tcp-reset",
    ]


def test_check_notices_a_flushed_chain_and_a_missing_jump(lab: Lab) -> None:
    backend = lab.backend()
    assert not backend.check()
    backend.setup(PLAN)
    assert backend.check()
    assert IptablesBackend(netns=lab.server_ns).check()  # a new process: structure only
    lab.server("iptables", "-F", "KNOCKGATE-GATE")
    assert not backend.check()
    backend.setup(PLAN)
    assert backend.check()
    lab.server("ip6tables", "-D", "INPUT", "-j", "KNOCKGATE")
    assert not backend.check()
    backend.setup(PLAN)
    assert backend.check()
    lab.server("ip6tables", "-t", "mangle", "-D", "PREROUTING", "-j", "KNOCKGATE-MARK")
    assert not backend.check()
    backend.setup(PLAN)
    assert backend.check()
    lab.server("iptables", "-D", "FORWARD", "-j", "KNOCKGATE-FWD")
    assert not backend.check()
    backend.setup(PLAN)
    assert backend.check()
    lab.server("iptables", "-F", "KNOCKGATE-SVC")
    assert not backend.check()
    assert IptablesBackend(netns=lab.server_ns).check()  # structure only: chain still there
    backend.setup(PLAN)
    assert backend.check()


def test_teardown_restores_the_firewall_exactly(lab: Lab) -> None:
    lab.server("iptables", "-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "DROP")
    lab.server("ipset", "create", "someone-else", "hash:ip")
    before = lab.snapshot()
    backend = lab.backend()
    backend.setup(PLAN)
    backend.grant(CLIENT, (WEB,), 30)
    backend.setup(PLAN)
    assert lab.probe(WEB) == "open"
    backend.teardown()
    assert lab.snapshot() == before
    assert not backend.check()
    backend.teardown()  # idempotent
    assert lab.snapshot() == before
    assert lab.probe(WEB, src=SECOND) == "open"


def test_failures_keep_argv_and_stderr(lab: Lab) -> None:
    backend = lab.backend()  # no setup: the sets do not exist
    with pytest.raises(FirewallError) as caught:
        backend.grant(CLIENT, (WEB,), 5)
    message = str(caught.value)
    assert message.startswith(
        f"ip netns exec {lab.server_ns} ipset -exist restore: exit status 1: "
    )
    assert "The set with the given name does not exist" in message
    assert message.endswith(
        "(input line 1: 'add knockgate-grants4 198.18.77.2,tcp:8080 timeout 5')"
    )
    with pytest.raises(
        FirewallError, match=r"ipset test knockgate-held4 198\.18\.77\.2: .*does not exist"
    ):
        backend.is_held(CLIENT)
    with pytest.raises(FirewallError, match="Cannot open network namespace"):
        IptablesBackend(netns=f"{lab.server_ns}x").check()


# -- the forward path: Docker-published ports and the containers' own addresses ----------


def test_routed_lab_reaches_the_container_without_the_backend(routed: Lab) -> None:
    """The DNAT and the route work: the container answers both ways, on both families."""
    assert routed.probe(PUBLISHED) == "open"
    assert routed.probe(PUBLISHED_UDP) == "open"
    assert routed.probe(SSH, dst=CONTAINER) == "open"
    assert routed.probe(PUBLISHED, src=CLIENT6, dst=SERVER6) == "open"


def test_published_port_is_closed_on_the_forward_path(routed: Lab) -> None:
    """The DNATed connection never reaches INPUT; the forward gate resets it."""
    backend = routed.backend()
    backend.setup(FORWARD_PLAN)
    assert routed.probe(PUBLISHED) == "refused"  # a reset, de-NATed: from server:2222
    assert routed.nmap("-sS", "-p", str(PUBLISHED.port), SERVER) == {"2222/tcp": "closed"}
    assert routed.probe(PUBLISHED_UDP) == "timeout"
    assert routed.probe(PUBLISHED, src=CLIENT6, dst=SERVER6) == "refused"
    assert routed.probe(SSH, dst=CONTAINER) == "open"  # not protected, not (yet) direct


def test_set_direct_gates_the_containers_own_address(routed: Lab) -> None:
    backend = routed.backend()
    backend.setup(FORWARD_PLAN)
    backend.set_direct(((CONTAINER, SSH), (CONTAINER6, SSH), (CONTAINER, DNS)))
    assert routed.probe(SSH, dst=CONTAINER) == "refused"
    assert routed.probe(DNS, dst=CONTAINER) == "timeout"
    assert routed.probe(SSH, src=CLIENT6, dst=CONTAINER6) == "refused"
    assert "knockgate-direct4-tmp" not in routed.server("ipset", "list", "-n")
    backend.set_direct(((CONTAINER6, SSH),))  # replaced, not added to
    assert routed.probe(SSH, dst=CONTAINER) == "open"
    assert routed.probe(SSH, src=CLIENT6, dst=CONTAINER6) == "refused"
    backend.set_direct(())
    assert routed.probe(SSH, src=CLIENT6, dst=CONTAINER6) == "open"
    assert backend.check()


def test_grant_opens_the_published_port_for_that_address_only(routed: Lab) -> None:
    backend = routed.backend()
    backend.setup(FORWARD_PLAN)
    backend.set_direct(((CONTAINER, SSH),))
    backend.grant(CLIENT, (PUBLISHED, PUBLISHED_UDP), 30)
    assert routed.probe(PUBLISHED) == "open"  # marked before the DNAT, let through after it
    assert routed.probe(PUBLISHED_UDP) == "open"
    assert routed.probe(PUBLISHED, src=SECOND) == "refused"
    assert routed.probe(PUBLISHED_UDP, src=SECOND) == "timeout"
    assert routed.probe(PUBLISHED, src=CLIENT6, dst=SERVER6) == "refused"
    # The grant names the published port; the container's own address stays closed.
    assert routed.probe(SSH, dst=CONTAINER) == "refused"
    backend.revoke(CLIENT, (PUBLISHED, PUBLISHED_UDP))
    assert routed.probe(PUBLISHED) == "refused"


def test_grant_ipv6_on_the_forward_path(routed: Lab) -> None:
    backend = routed.backend()
    backend.setup(FORWARD_PLAN)
    backend.set_direct(((CONTAINER6, SSH),))
    backend.grant(CLIENT6, (PUBLISHED,), 30)
    assert routed.probe(PUBLISHED, src=CLIENT6, dst=SERVER6) == "open"
    assert routed.probe(SSH, src=CLIENT6, dst=CONTAINER6) == "refused"
    assert routed.probe(PUBLISHED) == "refused"


def test_always_allow_covers_the_forward_path(routed: Lab) -> None:
    backend = routed.backend()
    backend.setup(FirewallPlan(protected=(PUBLISHED,), always_allow=("198.18.77.8/29",)))
    backend.set_direct(((CONTAINER, SSH),))
    assert routed.probe(PUBLISHED, src=SECOND) == "open"
    assert routed.probe(SSH, src=SECOND, dst=CONTAINER) == "open"
    assert routed.probe(PUBLISHED) == "refused"


def test_docker_user_gets_the_jump_and_docker_rules_still_run(routed: Lab) -> None:
    """With DOCKER-USER the jump goes there (rule 1), FORWARD gets none; let-through is
    RETURN, so the rules after it in DOCKER-USER still apply to granted clients."""
    for command in ("iptables", "ip6tables"):
        _docker_starts(routed, command)
    routed.server(
        "iptables", "-I", "DOCKER-USER", "-s", SECOND, "-p", "tcp", "-j", "REJECT",
        "--reject-with", "tcp-reset",
    )  # fmt: skip
    backend = routed.backend()
    backend.setup(FORWARD_PLAN)
    for command in ("iptables", "ip6tables"):
        assert routed.rules("FORWARD", command) == ["-A FORWARD -j DOCKER-USER"]
        assert routed.rules("DOCKER-USER", command)[0] == "-A DOCKER-USER -j KNOCKGATE-FWD"
    assert backend.check()
    assert routed.probe(PUBLISHED) == "refused"
    backend.grant(CLIENT, (PUBLISHED,), 30)
    backend.grant(SECOND, (PUBLISHED,), 30)
    assert routed.probe(PUBLISHED) == "open"
    assert routed.probe(PUBLISHED, src=SECOND) == "refused"  # the host's own rule


def test_a_docker_user_chain_nothing_jumps_to_is_not_used(routed: Lab) -> None:
    routed.server("iptables", "-N", "DOCKER-USER")  # left behind, FORWARD does not reach it
    backend = routed.backend()
    backend.setup(FORWARD_PLAN)
    assert routed.rules("FORWARD") == ["-A FORWARD -j KNOCKGATE-FWD"]
    assert routed.rules("DOCKER-USER") == []
    assert routed.probe(PUBLISHED) == "refused"


def test_check_moves_the_jump_when_docker_starts_restarts_and_stops(routed: Lab) -> None:
    """Docker inserts its accepts above a FORWARD jump; check() notices, setup() moves it."""
    backend = routed.backend()
    backend.setup(FORWARD_PLAN)
    assert routed.rules("FORWARD") == ["-A FORWARD -j KNOCKGATE-FWD"]
    _docker_starts(routed)
    _docker_accepts_the_container(routed)
    assert routed.probe(PUBLISHED) == "open"  # Docker's accept now runs first: the hole
    assert not backend.check()
    backend.setup(FORWARD_PLAN)  # what the daemon's periodic check does
    assert backend.check()
    assert routed.rules("DOCKER-USER")[0] == "-A DOCKER-USER -j KNOCKGATE-FWD"
    assert "-A FORWARD -j KNOCKGATE-FWD" not in routed.rules("FORWARD")
    assert routed.probe(PUBLISHED) == "refused"

    _docker_user_gone(routed)  # Docker restarts and re-creates its chain, empty
    _docker_starts(routed)
    assert routed.probe(PUBLISHED) == "open"
    assert not backend.check()
    backend.setup(FORWARD_PLAN)
    assert backend.check()
    assert routed.probe(PUBLISHED) == "refused"

    _docker_user_gone(routed)  # Docker's chains removed for good
    assert not backend.check()
    backend.setup(FORWARD_PLAN)
    assert backend.check()
    assert routed.rules("FORWARD")[0] == "-A FORWARD -j KNOCKGATE-FWD"
    assert routed.probe(PUBLISHED) == "refused"


def test_setup_keeps_and_restores_the_direct_sets(routed: Lab) -> None:
    backend = routed.backend()
    backend.setup(FORWARD_PLAN)
    backend.set_direct(((CONTAINER, SSH),))
    backend.setup(FORWARD_PLAN)  # kept
    assert "add knockgate-direct4 198.18.78.2,tcp:22" in routed.server(
        "ipset", "save", "knockgate-direct4"
    )
    IptablesBackend(netns=routed.server_ns).setup(FORWARD_PLAN)  # a restarted daemon: kept
    assert routed.probe(SSH, dst=CONTAINER) == "refused"
    backend.teardown()  # everything gone (a firewall reset) ...
    assert routed.probe(SSH, dst=CONTAINER) == "open"
    backend.setup(FORWARD_PLAN)  # ... and the repair brings the last direct entries back
    assert routed.probe(SSH, dst=CONTAINER) == "refused"


def test_set_direct_before_setup_fails_and_leaves_nothing(routed: Lab) -> None:
    backend = routed.backend()
    before = routed.snapshot()
    with pytest.raises(FirewallError, match=r"ipset -exist restore: exit status 1: .*"):
        backend.set_direct(((CONTAINER, SSH),))
    assert routed.snapshot() == before
    with pytest.raises(FirewallError, match="not an IP address"):
        backend.set_direct((("container", SSH),))


def test_teardown_with_docker_restores_the_firewall_exactly(routed: Lab) -> None:
    for command in ("iptables", "ip6tables"):
        _docker_starts(routed, command)
    routed.server("iptables", "-t", "mangle", "-A", "PREROUTING", "-p", "udp", "-j", "RETURN")
    before = routed.snapshot()
    backend = routed.backend()
    backend.setup(FORWARD_PLAN)
    backend.set_direct(((CONTAINER, SSH), (CONTAINER6, SSH)))
    backend.grant(CLIENT, (PUBLISHED,), 30)
    assert routed.probe(PUBLISHED) == "open"
    backend.teardown()
    assert routed.snapshot() == before
    backend.teardown()
    assert routed.snapshot() == before
    assert routed.probe(PUBLISHED, src=SECOND) == "open"
    assert routed.probe(SSH, dst=CONTAINER) == "open"
