"""Regression: "a sweep with bad checksums completes a knock", on real packets.

The kernel drops a packet with a wrong IPv4 header checksum or a wrong TCP/UDP
checksum before conntrack and the nftables scan detector see it, but an AF_PACKET
socket sees it first. knockgate must not count what the host's own stack drops:
here the real daemon runs in the server namespace of a topology (tests/integration/
netns.py) and the attacker sends ``nmap --badsum`` sweeps and hand-made frames
(built with scapy in this process, sent from the attacker's namespace on a raw
AF_PACKET socket). None of them may reach the engine (the status counter ``packets``
stays 0 while ``frames`` shows that the capture saw them) and the protected port
stays closed. Control cases prove that the same path opens the door when the
packets are good: a real knock (whose checksums the veth leaves offloaded, so it
only passes because the kernel's CSUMNOTREADY status is honoured), and the same
hand-made frames with correct checksums.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import require_root_tools
from tests.integration.daemon import PYTHON, REPO, Knockgate, connect, serve
from tests.integration.netns import Host, Topology, cleanup_stale

pytestmark = pytest.mark.integration

PROTECTED = 22
TCP_DOOR = (7000, 8000, 9000)
UDP_DOOR = (7001, 8001, 9001)
CONFIG = f"""\
interfaces: [eth0]
status_socket: @SOCKET@
firewall: {{backend: nftables}}
doors:
  tcp-door:
    knock: {{sequence: [7000, 8000, 9000], seq_timeout: 10, tcpflags: "syn,!ack"}}
    open: {{ports: [{PROTECTED}/tcp], duration: 60}}
  udp-door:
    knock: {{sequence: [7001/udp, 8001/udp, 9001/udp], seq_timeout: 10}}
    open: {{ports: [{PROTECTED}/tcp], duration: 60}}
"""
UNKNOWN_MAC = "02:6b:67:ff:ff:fe"  # on no port of the bridge: it floods such frames

# Sends each hex-encoded frame read from stdin on eth0, 2 ms apart (bounded by the input).
SENDER = """\
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
for line in sys.stdin.read().split():
    s.send(bytes.fromhex(line))
    time.sleep(0.002)
"""


def prerequisites(vlan: bool = False) -> None:
    require_root_tools("nft", "nmap", "knock", vlan=vlan)


@pytest.fixture
def topo() -> Iterator[Topology]:
    prerequisites()
    cleanup_stale()
    with Topology(vlan=False) as topology:
        serve(topology, "server", PROTECTED)
        yield topology


@pytest.fixture
def vlan_topo() -> Iterator[Topology]:
    prerequisites(vlan=True)
    cleanup_stale()
    with Topology(vlan=True) as topology:
        serve(topology, "server", PROTECTED)
        yield topology


@contextlib.contextmanager
def running(topo: Topology, tmp_path: Path) -> Iterator[Knockgate]:
    """The daemon with CONFIG in the server namespace, stopped even when the test fails."""
    daemon = Knockgate(topo, tmp_path, CONFIG).start()
    try:
        yield daemon
    finally:
        daemon.stop()


def counters(daemon: Knockgate) -> dict[str, int]:
    value: Any = daemon.status()["counters"]
    return dict(value)


def wait_frames(daemon: Knockgate, at_least: int, timeout: float = 5.0) -> dict[str, int]:
    """The status counters once the capture has seen ``at_least`` frames (or the timeout)."""
    deadline = time.monotonic() + timeout
    seen = counters(daemon)
    while seen["frames"] < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
        seen = counters(daemon)
    return seen


def assert_nothing_counted(daemon: Knockgate, frames: int, reason: str) -> None:
    """The capture saw ``frames`` frames and handed none to the engine."""
    seen = wait_frames(daemon, frames)
    assert seen["frames"] >= frames, (seen, daemon.log())
    assert seen["packets"] == 0, (seen, daemon.log())
    assert seen["stages"] == 0 and seen["opened"] == 0, seen
    if reason in seen:  # once the daemon reports the capture's own counters
        assert seen[reason] >= frames, seen
    assert daemon.status()["grants"] == []


def wait_open(topo: Topology, host: str, address: str, timeout: float = 3.0) -> str:
    deadline = time.monotonic() + timeout
    state = connect(topo, host, address, PROTECTED)
    while state != "open" and time.monotonic() < deadline:
        time.sleep(0.1)
        state = connect(topo, host, address, PROTECTED)
    return state


def send_frames(topo: Topology, host: str, frames: Iterable[bytes]) -> None:
    lines = "\n".join(frame.hex() for frame in frames)
    topo.run(host, [PYTHON, "-c", SENDER], input=lines, timeout=30)


def knock_frames(
    sender: Host,
    target: Host,
    ports: Iterable[int],
    proto: str = "tcp",
    ipv6: bool = False,
    vlan: bool = False,
    dst_mac: str | None = None,
    **bad: Any,
) -> list[bytes]:
    """One knock per port from ``sender`` to ``target``, as Ethernet frames; ``bad`` holds
    what to spoil: ``ip_chksum`` (IPv4 header) or ``chksum`` (TCP/UDP)."""
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Dot1Q, Ether
    from scapy.packet import Raw

    frames = []
    for port in ports:
        eth = Ether(src=sender.mac, dst=dst_mac or target.mac)
        if vlan:
            eth = eth / Dot1Q(vlan=100)
        if ipv6:
            l3 = IPv6(src=sender.ipv6, dst=target.ipv6)
        else:
            src, dst = (sender.vlan_ipv4, target.vlan_ipv4) if vlan else (sender.ipv4, target.ipv4)
            l3 = IP(
                src=src, dst=dst, **({"chksum": bad["ip_chksum"]} if "ip_chksum" in bad else {})
            )
        l4_bad = {"chksum": bad["chksum"]} if "chksum" in bad else {}
        if proto == "tcp":
            l4 = TCP(sport=40000 + port % 1000, dport=port, flags="S", **l4_bad)
        else:
            l4 = UDP(sport=40000 + port % 1000, dport=port, **l4_bad) / Raw(b"knock")
        frames.append(bytes(eth / l3 / l4))
    return frames


def badsum_sweep(topo: Topology, ports: str, target: Host, ipv6: bool = False) -> None:
    """``nmap --badsum -sS -r`` from the attacker. Over IPv6, nmap's own neighbour
    discovery goes out with a bad checksum as well (and is dropped): the attacker gets
    the server's MAC as a static neighbour entry and nmap is told to use it."""
    argv = ["nmap", "-n", "-Pn", "-sS", "--badsum", "-r", "-p", ports]
    argv += ["--max-retries", "0", "--min-rate", "2000", "--host-timeout", "60s"]
    if ipv6:
        neighbour = ["ip", "-6", "neigh", "replace", target.ipv6, "lladdr", target.mac]
        topo.run("attacker", [*neighbour, "dev", "eth0", "nud", "permanent"])
        argv += ["--disable-arp-ping", "-6", target.ipv6]
    else:
        argv.append(target.ipv4)
    topo.run("attacker", argv, timeout=120)


@pytest.mark.parametrize("ports", ["7000,8000,9000", "6990-9010"])
def test_badsum_sweep_does_not_complete_a_knock(topo: Topology, tmp_path: Path, ports: str) -> None:
    """`nmap --badsum -sS -r` hits 7000, 8000 and 9000 in order: before the fix, the door
    opened for the attacker, and the scan detector never saw the sweep."""
    server = topo.host("server").ipv4
    with running(topo, tmp_path) as daemon:
        badsum_sweep(topo, ports, topo.host("server"))
        assert_nothing_counted(daemon, len(TCP_DOOR), "bad_checksums")
        assert connect(topo, "attacker", server, PROTECTED) == "refused"
        assert "bad checksum" in daemon.log()
        # A real knock still opens: the veth leaves its checksums offloaded (CSUMNOTREADY).
        topo.run("client", ["knock", server, *map(str, TCP_DOOR)])
        assert wait_open(topo, "client", server) == "open"
        assert counters(daemon)["packets"] == len(TCP_DOOR)
        assert connect(topo, "attacker", server, PROTECTED) == "refused"


def test_badsum_sweep_over_ipv6_does_not_complete_a_knock(topo: Topology, tmp_path: Path) -> None:
    server = topo.host("server").ipv6
    with running(topo, tmp_path) as daemon:
        badsum_sweep(topo, "7000,8000,9000", topo.host("server"), ipv6=True)
        assert_nothing_counted(daemon, len(TCP_DOOR), "bad_checksums")
        assert connect(topo, "attacker", server, PROTECTED) == "refused"
        knock = [PYTHON, "-m", "appliance.cli", "knock", server, *map(str, TCP_DOOR)]
        topo.run("client", knock, cwd=str(REPO))
        assert wait_open(topo, "client", server) == "open"


def test_crafted_bad_checksums_do_not_count(vlan_topo: Topology, tmp_path: Path) -> None:
    topo = vlan_topo
    attacker, server, other = topo.host("attacker"), topo.host("server"), topo.host("other")
    bad = [
        *knock_frames(attacker, server, TCP_DOOR, ip_chksum=0xDEAD),  # IPv4 header
        *knock_frames(attacker, server, UDP_DOOR, proto="udp", ip_chksum=0xDEAD),
        *knock_frames(attacker, server, UDP_DOOR, proto="udp", chksum=0xDEAD),  # UDP
        *knock_frames(attacker, server, TCP_DOOR, chksum=0xDEAD),  # TCP
        *knock_frames(attacker, server, TCP_DOOR, ipv6=True, chksum=0xDEAD),  # TCP over IPv6
        *knock_frames(attacker, server, UDP_DOOR, proto="udp", ipv6=True, chksum=0),  # IPv6: none
        *knock_frames(attacker, server, TCP_DOOR, vlan=True, chksum=0xDEAD),  # 802.1Q-tagged
    ]
    with running(topo, tmp_path) as daemon:
        send_frames(topo, "attacker", bad)
        assert_nothing_counted(daemon, len(bad), "bad_checksums")
        for address in (server.ipv4, server.ipv6, server.vlan_ipv4):
            assert connect(topo, "attacker", address, PROTECTED) == "refused"
        # Control: the same frames with correct checksums, from another host, do open.
        send_frames(topo, "other", knock_frames(other, server, UDP_DOOR, proto="udp"))
        assert wait_open(topo, "other", server.ipv4) == "open"
        send_frames(topo, "other", knock_frames(other, server, TCP_DOOR, vlan=True))
        assert wait_open(topo, "other", server.vlan_ipv4) == "open"
        send_frames(topo, "other", knock_frames(other, server, TCP_DOOR, ipv6=True))
        assert wait_open(topo, "other", server.ipv6) == "open"
        assert connect(topo, "attacker", server.ipv4, PROTECTED) == "refused"


def test_frames_for_another_mac_do_not_count(topo: Topology, tmp_path: Path) -> None:
    """PACKET_OTHERHOST: the bridge floods a frame for an unknown MAC to every port, so
    the server's interface receives it (as a promiscuous one would) and its stack drops it."""
    attacker, server = topo.host("attacker"), topo.host("server")
    topo.run("server", ["ip", "link", "set", server.ifname, "promisc", "on"])
    frames = knock_frames(attacker, server, TCP_DOOR, dst_mac=UNKNOWN_MAC)
    with running(topo, tmp_path) as daemon:
        send_frames(topo, "attacker", frames)
        assert_nothing_counted(daemon, len(frames), "not_for_host")
        assert connect(topo, "attacker", server.ipv4, PROTECTED) == "refused"
        # Control: the very same knock to the server's own MAC opens.
        send_frames(topo, "attacker", knock_frames(attacker, server, TCP_DOOR))
        assert wait_open(topo, "attacker", server.ipv4) == "open"
