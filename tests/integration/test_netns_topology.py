"""The namespace topology of ``tests/integration/netns.py`` does what tests rely on.

Pings over IPv4, IPv6 and VLAN 100 (tagged on the wire, as a capture on the
bridge's port shows), interface flaps, teardown that leaves no namespace and no
process behind (also after an exception or a failed build), and the removal of
what crashed runs left. Needs root, iproute2, ``ping`` (iputils-ping) and tcpdump.
"""

from __future__ import annotations

import ipaddress
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any

import pytest

from tests.integration import netns
from tests.integration.conftest import require
from tests.integration.netns import NetnsCommandError, Topology, cleanup_stale, list_namespaces

pytestmark = pytest.mark.integration

WAIT = 5.0  # seconds: the longest we wait for tcpdump or a helper


def need(*tools: str) -> None:
    missing = netns.ensure_root_tools()
    require(not missing, "; ".join(missing))
    packages = {"ping": "iputils-ping", "tcpdump": "tcpdump"}
    for tool in tools:
        require(shutil.which(tool) is not None, f"needs `{tool}` ({packages.get(tool, tool)})")


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    """One four-host topology with VLAN, shared by the tests that only look at it."""
    need("ping")
    cleanup_stale()  # what crashed runs left
    with Topology() as topology:
        yield topology


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def read_until(stream: IO[str] | None, text: str, timeout: float = WAIT) -> str:
    """What ``stream`` says up to ``text`` (fails after ``timeout``).

    Reads the pipe itself, not through its buffered wrapper, so that select() sees
    everything that is left.
    """
    assert stream is not None
    fd, wanted, seen = stream.fileno(), text.encode(), b""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0 and wanted not in seen:
        if not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        seen += chunk
    if wanted not in seen:
        pytest.fail(f"no {text!r} within {timeout} s; got {seen!r}")
    return seen.decode(errors="replace")


def ours(names: Sequence[str]) -> list[str]:
    present = set(list_namespaces())
    return [name for name in names if name in present]


# -- what a topology looks like -----------------------------------------------------


def test_names_and_addresses(topo: Topology) -> None:
    assert len(set(topo.namespaces)) == 5
    assert set(topo.namespaces) <= set(list_namespaces())
    for name in topo.namespaces:
        assert name.startswith(topo.id) and name[len(topo.id) :] in "bscoa"
    benchmarking_v4 = ipaddress.ip_network("198.18.0.0/15")
    benchmarking_v6 = ipaddress.ip_network("2001:2::/48")
    addresses = []
    for host in topo.hosts:
        for ifname in (host.ifname, host.vlan_ifname, host.bridge_port):
            assert 0 < len(ifname) <= 15
        for v4 in (host.ipv4, host.vlan_ipv4):
            assert ipaddress.ip_address(v4) in benchmarking_v4
        for v6 in (host.ipv6, host.vlan_ipv6):
            assert ipaddress.ip_address(v6) in benchmarking_v6
            assert str(ipaddress.ip_address(v6)) == v6  # canonical: matches tool output
        addresses += [host.ipv4, host.ipv6, host.vlan_ipv4, host.vlan_ipv6]
        shown = topo.run(host.name, ["ip", "-br", "addr", "show"]).stdout
        for address in (host.ipv4, host.ipv6, host.vlan_ipv4, host.vlan_ipv6):
            assert address in shown
        assert host.mac in topo.run(host.name, ["ip", "link", "show", host.ifname]).stdout
    assert len(set(addresses)) == len(addresses)
    assert topo.vlan_mode in ("kernel", "tap")


def test_ipv4_ping(topo: Topology) -> None:
    server, client = topo.host("server"), topo.host("client")
    assert topo.ping("client", server.ipv4)
    assert topo.ping("server", client.ipv4)
    for name in ("other", "attacker"):
        assert topo.ping(name, server.ipv4)


def test_ipv6_ping_works_at_once(topo: Topology) -> None:
    for host in topo.hosts:  # nodad: nothing waits for duplicate address detection
        assert topo.run(host.name, ["ip", "-6", "addr", "show", "tentative"]).stdout == ""
    server, client = topo.host("server"), topo.host("client")
    assert topo.ping("client", server.ipv6)
    assert topo.ping("server", client.ipv6)


def test_vlan_ping_and_untagged_still_works(topo: Topology) -> None:
    server, client = topo.host("server"), topo.host("client")
    route = topo.run("client", ["ip", "route", "get", server.vlan_ipv4]).stdout
    assert f"dev {client.vlan_ifname}" in route
    assert topo.ping("client", server.vlan_ipv4)
    assert topo.ping("client", server.vlan_ipv6)
    assert topo.ping("server", client.vlan_ipv4)
    assert topo.ping("client", server.ipv4)
    assert topo.ping("client", server.ipv6)


def test_tcp_over_vlan(topo: Topology) -> None:
    """Full-size segments both ways (checksums and MTU through the VLAN path)."""
    server = topo.host("server")
    echo = topo.popen(
        "server",
        [sys.executable, "-c", ECHO_SERVER, server.vlan_ipv4],
        stdout=subprocess.PIPE,
    )
    read_until(echo.stdout, "listening")
    sent = os.urandom(50_000)
    proc = topo.run(
        "client",
        [sys.executable, "-c", ECHO_CLIENT, server.vlan_ipv4],
        input=sent.hex(),
        timeout=10,
    )
    assert bytes.fromhex(proc.stdout.strip()) == sent[::-1]
    assert echo.wait(timeout=WAIT) == 0


ECHO_SERVER = """
import socket, sys
with socket.create_server((sys.argv[1], 7000)) as s:
    s.settimeout(5)
    print("listening", flush=True)
    c, _ = s.accept()
    c.settimeout(5)
    data = b""
    while chunk := c.recv(65536):
        data += chunk
    c.sendall(data[::-1])
    c.close()
"""

ECHO_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], 7000), timeout=5) as c:
    c.sendall(bytes.fromhex(sys.stdin.read()))
    c.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := c.recv(65536):
        data += chunk
print(data.hex())
"""


def test_vlan_frames_are_tagged_on_the_bridge_port(topo: Topology) -> None:
    need("tcpdump")
    server, client = topo.host("server"), topo.host("client")
    port = client.bridge_port
    capture = ["tcpdump", "-e", "-n", "-l", "-c", "1", "-i", port]
    tagged = topo.popen(
        "bridge",
        [*capture, f"vlan {netns.VLAN_ID} and icmp"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    read_until(tagged.stderr, "listening on")
    assert topo.ping("client", server.vlan_ipv4)
    out, _ = tagged.communicate(timeout=WAIT)
    assert "ethertype 802.1Q (0x8100)" in out
    assert f"vlan {netns.VLAN_ID}," in out
    assert f"{client.vlan_ipv4} > {server.vlan_ipv4}: ICMP echo request" in out

    untagged = topo.popen(
        "bridge", [*capture, "icmp"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    read_until(untagged.stderr, "listening on")
    assert topo.ping("client", server.ipv4)
    out, _ = untagged.communicate(timeout=WAIT)
    assert "ethertype IPv4 (0x0800)" in out and "802.1Q" not in out
    assert f"{client.ipv4} > {server.ipv4}: ICMP echo request" in out


def test_run_failure_shows_the_command_and_its_output(topo: Topology) -> None:
    with pytest.raises(subprocess.CalledProcessError) as failed:
        topo.run("server", ["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"])
    assert isinstance(failed.value, NetnsCommandError)
    message = str(failed.value)
    for part in ("exit status 3", "sh -c", topo.host("server").netns, "to-stdout", "to-stderr"):
        assert part in message
    assert topo.run("server", ["false"], check=False).returncode == 1


# -- changing and removing topologies ------------------------------------------------


def test_set_link_down_and_up() -> None:
    need("ping")
    with Topology(("server", "client")) as topo:
        server = topo.host("server")
        addresses = (server.ipv4, server.ipv6, server.vlan_ipv4, server.vlan_ipv6)
        assert all(topo.ping("client", address) for address in addresses)
        topo.set_link("server", False)
        assert "state DOWN" in topo.run("server", ["ip", "link", "show", "eth0"]).stdout
        assert not topo.ping("client", server.ipv4, wait=0.5)
        assert not topo.ping("client", server.vlan_ipv4, wait=0.5)
        topo.set_link("server", True)
        # A neighbour entry the client began to resolve while the server was down is
        # retried on its own 1 s timer, so allow for that.
        assert all(topo.ping("client", address, wait=2) for address in addresses)


def test_exit_removes_namespaces_and_processes() -> None:
    need()
    with Topology(("server", "client")) as topo:
        names = topo.namespaces
        assert ours(names) == list(names)
        sleeper = topo.popen("server", ["sleep", "60"])
        stray = int(topo.run("client", ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"]).stdout)
        assert alive(stray)
    assert ours(names) == []
    assert sleeper.poll() is not None
    assert not alive(stray)


def test_exit_kills_what_ignores_sigterm() -> None:
    need()
    with Topology(("server",), vlan=False) as topo:
        names = topo.namespaces
        stubborn = topo.popen(
            "server",
            ["sh", "-c", "trap '' TERM; echo ready; sleep 60"],
            stdout=subprocess.PIPE,
        )
        read_until(stubborn.stdout, "ready")
        started = time.monotonic()
    took = time.monotonic() - started
    assert netns.TERM_GRACE <= took < netns.TERM_GRACE + 2
    assert stubborn.poll() is not None
    assert ours(names) == []


def test_exception_in_the_block_still_removes_everything() -> None:
    need()
    with pytest.raises(RuntimeError, match="boom"), Topology(("server", "client")) as topo:
        names = topo.namespaces
        sleeper = topo.popen("client", ["sleep", "60"])
        raise RuntimeError("boom")
    assert ours(names) == []
    assert sleeper.poll() is not None


def test_failed_build_removes_what_it_built(monkeypatch: pytest.MonkeyPatch) -> None:
    need()
    real_ip = netns._ip
    calls: list[Sequence[str]] = []

    def failing_ip(args: Sequence[str], batch: Sequence[str] | None = None) -> None:
        calls.append(args)
        if len(calls) == 3:  # after the namespaces and the bridge: in a host's setup
            raise NetnsCommandError(1, ["ip", *args], "", "injected failure")
        real_ip(args, batch)

    monkeypatch.setattr(netns, "_ip", failing_ip)
    topology = Topology(("server", "client"))
    with pytest.raises(NetnsCommandError, match="injected failure"), topology:
        pytest.fail("the with-block must not run")
    assert len(calls) == 3
    assert ours(topology.namespaces) == []


def test_two_topologies_at_once_do_not_clash() -> None:
    need("ping")
    with (
        Topology(("server", "client"), vlan=False) as one,
        Topology(("server", "client"), vlan=False) as two,
    ):
        assert one.id != two.id and one.net != two.net
        assert not set(one.namespaces) & set(two.namespaces)
        assert one.ping("client", one.host("server").ipv4)
        assert two.ping("client", two.host("server").ipv4)
        # Separate networks: no route from one topology into the other.
        assert not one.ping("client", two.host("server").ipv4, wait=0.2)


# -- what crashed runs leave behind --------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    assert not alive(child.pid)
    return child.pid


def test_cleanup_stale_removes_only_dead_runs() -> None:
    need()
    dead = dead_pid()
    stale = [f"kg{dead}t1b", f"kg{dead}t1s", f"kg{dead}t7c2"]
    live = [f"kg{os.getpid()}t99999b"]
    unrelated = [f"kg{dead}x1s", f"kg{dead}t1z", f"kg{dead}t1"]
    created: list[str] = []
    leftover: subprocess.Popen[Any] | None = None
    try:
        for name in stale + live + unrelated:
            subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
            created.append(name)
        # A daemon the crashed run left running inside one of them.
        leftover = subprocess.Popen(["ip", "netns", "exec", stale[1], "sleep", "60"])
        time.sleep(0.1)
        removed = cleanup_stale()
        assert set(stale) <= set(removed)
        assert ours(stale) == []
        assert ours(live + unrelated) == live + unrelated
        assert leftover.wait(timeout=WAIT) is not None
    finally:
        if leftover is not None and leftover.poll() is None:
            leftover.kill()
            leftover.wait()
        for name in ours(created):
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def test_numbered_hosts_and_bad_names() -> None:
    need("ping")
    with Topology(("server", "client", "client2", "attacker12"), vlan=False) as topo:
        assert topo.host("client2").netns == f"{topo.id}c2"
        assert topo.host("attacker12").bridge_port == "vattacker12"
        assert topo.host("attacker12").ipv4.endswith(".4")
        assert topo.host("client2").vlan_ifname == ""
        assert topo.ping("client2", topo.host("server").ipv4)
    for bad in (["router"], ["client", "client"], [], "server"):
        with pytest.raises(ValueError):
            Topology(bad)
