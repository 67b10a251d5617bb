"""The iptables backend against real iptables-nft, ipset, nmap and TCP/UDP peers.

Each test builds its own pair of network namespaces (``kgipt<pid><n>s`` holds the
backend and a TCP/UDP echo server, ``kgipt<pid><n>c`` is the client) joined by one
veth pair, and removes both in the fixture's ``finally``. Addresses:

    server  198.18.77.1/24   2001:2::1/64
    client  198.18.77.2/24   2001:2::2/64   (primary: nmap's source)
            198.18.77.9/24                  (a second client address)

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
from appliance.firewall import FirewallPlan, ScanPolicy
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
PLAN = FirewallPlan(protected=(WEB, ECHO), scan=ScanPolicy(ports=10, window=2.0, hold=60.0))
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

    def snapshot(self) -> tuple[str, str, str]:
        return (
            self.server("iptables", "-S"),
            self.server("ip6tables", "-S"),
            self.server("ipset", "list", "-n"),
        )

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
        server = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                lab.server_ns,
                sys.executable,
                "-c",
                SERVER_SCRIPT,
                SERVER,
                SERVER6,
                str(TCP_PORT),
                str(UDP_PORT),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
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
        assert lab.server(command, "-S", "INPUT").splitlines().count("-A INPUT -j KNOCKGATE") == 1
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
