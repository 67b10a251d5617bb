"""The daemon follows the host's links from netlink: real namespaces, real veth and
ifb interfaces, real knocks.

Regressions pinned here: "an interface created after start (a VPN's wg0, a new
Docker bridge, a veth) is never captured" and "the administratively down ifb0/ifb1
of a stock host log 'went away'/'capturing again' four times a second forever".

Every interface is made inside the test's own namespaces (``kg`` names, addresses in
198.18.0.0/15) and goes with them, also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import require_root_tools
from tests.integration.daemon import Knockgate, connect, serve
from tests.integration.netns import Topology, cleanup_stale

pytestmark = pytest.mark.integration

CONFIG = """\
{interfaces}status_socket: @SOCKET@
firewall: {{backend: nftables}}
doors:
  ssh:
    knock: {{sequence: [7113, 2231/udp, 9157], seq_timeout: 5, tcpflags: "syn,!ack"}}
    open: {{ports: [22/tcp], duration: 30}}
"""
CAPTURED_WITHIN = 1.0  # seconds from `ip link set up` to a knock that must count


@pytest.fixture
def topo() -> Iterator[Topology]:
    require_root_tools("nft", "knock")
    cleanup_stale()
    with Topology(("server", "client"), vlan=False) as topology:
        serve(topology, "server", 22)
        yield topology


def start(topo: Topology, tmp_path: Path, interfaces: str = "") -> Knockgate:
    config = CONFIG.format(interfaces=f"interfaces: [{interfaces}]\n" if interfaces else "")
    return Knockgate(topo, tmp_path, config).start()


def ip(*args: str, input_lines: list[str] | None = None) -> None:
    stdin = None if input_lines is None else "".join(f"{line}\n" for line in input_lines)
    subprocess.run(
        ["ip", *args], input=stdin, check=True, capture_output=True, text=True, timeout=30
    )


@contextlib.contextmanager
def namespace(topo: Topology, letter: str) -> Iterator[str]:
    """A namespace of the test's own, named like the topology's (so that
    cleanup_stale collects it after a crash), deleted afterwards."""
    name = f"{topo.id}{letter}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def veth(topo: Topology, peer_ns: str, ifname: str, net: int, up: bool = True) -> str:
    """A veth pair: ``ifname`` in the server's namespace (198.18.<net>.1/24), its peer
    ``eth0`` in ``peer_ns`` (198.18.<net>.2/24). Returns the server's new address."""
    server = topo.host("server").netns
    ip(
        "-n",
        server,
        "link",
        "add",
        ifname,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        peer_ns,
    )
    ip("-n", server, "addr", "add", f"198.18.{net}.1/24", "dev", ifname)
    ip("-n", peer_ns, "addr", "add", f"198.18.{net}.2/24", "dev", "eth0")
    ip("-n", peer_ns, "link", "set", "eth0", "up")
    if up:
        ip("-n", server, "link", "set", ifname, "up")
    return f"198.18.{net}.1"


def fresh_net(topo: Topology) -> int:
    """A 198.18.<net>.0/24 that is not the topology's own."""
    return topo.net % 250 + 1


def knock_from(netns: str, address: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", netns, "knock", address, "7113", "2231:udp", "9157"],
        check=True,
        capture_output=True,
        timeout=30,
    )


def connect_from(netns: str, address: str) -> str:
    from tests.integration.daemon import PYTHON

    code = (
        "import socket\n"
        "s=socket.socket(); s.settimeout(1.5)\n"
        f"try: s.connect(({address!r},22)); print('open')\n"
        "except ConnectionRefusedError: print('refused')\n"
        "except OSError: print('timeout')\n"
    )
    done = subprocess.run(
        ["ip", "netns", "exec", netns, PYTHON, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.stdout.strip()


def wait_open_from(netns: str, address: str, timeout: float = 3.0) -> str:
    deadline = time.monotonic() + timeout
    state = connect_from(netns, address)
    while state != "open" and time.monotonic() < deadline:
        time.sleep(0.1)
        state = connect_from(netns, address)
    return state


def wait_for(daemon: Knockgate, text: str, timeout: float = 5.0, poll: float = 0.005) -> float:
    """Seconds until ``text`` is in the daemon's log (AssertionError after ``timeout``)."""
    began = time.monotonic()
    while text not in daemon.log():
        assert time.monotonic() - began < timeout, f"no {text!r} in the log:\n{daemon.log()}"
        time.sleep(poll)
    return time.monotonic() - began


def capturing(daemon: Knockgate) -> list[str]:
    interfaces = daemon.status()["interfaces"]
    assert isinstance(interfaces, list)
    return interfaces


def test_a_link_created_after_start_is_captured_within_a_second(
    topo: Topology, tmp_path: Path
) -> None:
    daemon = start(topo, tmp_path)  # no `interfaces:`: every link but lo
    try:
        assert capturing(daemon) == ["eth0"]
        with namespace(topo, "c9") as client:
            address = veth(topo, client, "kgnew0", fresh_net(topo), up=False)
            ip("-n", topo.host("server").netns, "link", "set", "kgnew0", "up")
            up_at = time.monotonic()
            seen = wait_for(daemon, "kgnew0: capturing")
            print(f"kgnew0 captured {seen * 1000:.0f} ms after `ip link set up` returned")
            assert seen < CAPTURED_WITHIN
            time.sleep(max(0.0, up_at + CAPTURED_WITHIN - time.monotonic()))
            knock_from(client, address)  # 1 s after the link came up, through it only
            assert wait_open_from(client, address) == "open"
            server = topo.host("server").ipv4
            assert connect(topo, "client", server, 22) == "refused"  # for the knocker only
            assert capturing(daemon) == ["eth0", "kgnew0"]
    finally:
        assert daemon.stop() == 0
    assert f"host addresses changed: added {address}" in daemon.log()


def test_a_link_deleted_while_running_is_closed_and_nothing_breaks(
    topo: Topology, tmp_path: Path
) -> None:
    daemon = start(topo, tmp_path)
    try:
        with namespace(topo, "c9") as client:
            veth(topo, client, "kgdel0", fresh_net(topo))
            wait_for(daemon, "kgdel0: capturing")
            assert capturing(daemon) == ["eth0", "kgdel0"]
            ip("-n", topo.host("server").netns, "link", "del", "kgdel0")
            wait_for(daemon, "kgdel0: gone")
            assert capturing(daemon) == ["eth0"]
        server = topo.host("server").ipv4
        knock_from(topo.host("client").netns, server)
        assert wait_open_from(topo.host("client").netns, server) == "open"
        assert daemon.process is not None and daemon.process.poll() is None
        assert "internal error" not in daemon.log()
        assert daemon.status()["counters"]["internal_errors"] == 0  # type: ignore[index]
    finally:
        assert daemon.stop() == 0


def test_a_down_link_is_waited_for_in_silence_and_its_coming_up_is_one_line(
    topo: Topology, tmp_path: Path
) -> None:
    """An ifb device, administratively down as ifb0/ifb1 are on a stock host."""
    server = topo.host("server").netns
    daemon = start(topo, tmp_path)
    try:
        time.sleep(0.5)  # whatever start-up writes, written
        before = daemon.log().splitlines()
        ip("-n", server, "link", "add", "kgifb0", "type", "ifb")
        time.sleep(5)
        assert daemon.log().splitlines() == before
        ip("-n", server, "link", "set", "kgifb0", "up")
        wait_for(daemon, "kgifb0: capturing")
        time.sleep(1)  # anything else it would write (its link-local address is not news)
        new = daemon.log().splitlines()[len(before) :]
        assert len(new) == 1 and new[0].endswith("kgifb0: capturing"), new
        assert capturing(daemon) == ["eth0", "kgifb0"]
    finally:
        assert daemon.stop() == 0


def test_a_named_interface_missing_at_start_is_captured_when_it_appears(
    topo: Topology, tmp_path: Path
) -> None:
    daemon = start(topo, tmp_path, interfaces="kgwg0")
    try:
        assert "kgwg0: not present; capturing it when it appears" in daemon.log()
        assert capturing(daemon) == []
        with namespace(topo, "c9") as client:
            address = veth(topo, client, "kgwg0", fresh_net(topo))
            wait_for(daemon, "kgwg0: capturing")
            assert capturing(daemon) == ["kgwg0"]
            knock_from(client, address)
            assert wait_open_from(client, address) == "open"
        # eth0 is not named: a knock on it counts for nothing.
        server = topo.host("server").ipv4
        knock_from(topo.host("client").netns, server)
        time.sleep(0.5)
        assert connect(topo, "client", server, 22) == "refused"
    finally:
        assert daemon.stop() == 0


def test_a_link_flapped_faster_than_netlink_is_read_is_still_captured(
    topo: Topology, tmp_path: Path
) -> None:
    """Down and up in one batch: the socket's one ENETDOWN is not a reason to close it
    (it resumes with the link), and netlink has nothing to report, or down then up."""
    server = topo.host("server")
    daemon = start(topo, tmp_path)
    try:
        for _ in range(3):
            ip(
                "-n",
                server.netns,
                "-batch",
                "-",
                input_lines=["link set eth0 down", "link set eth0 up"],
            )
        time.sleep(0.5)
        assert capturing(daemon) == ["eth0"]
        knock_from(topo.host("client").netns, server.ipv4)
        assert wait_open_from(topo.host("client").netns, server.ipv4) == "open"
        assert "error" not in daemon.log()
    finally:
        assert daemon.stop() == 0


WATCH = """
import logging, subprocess, threading, time
import appliance.capture.host as host
logging.getLogger("knockgate").addHandler(logging.StreamHandler())
logging.getLogger("knockgate").setLevel(logging.DEBUG)
host.EVENT_BUFFER = 4096  # the smallest the kernel takes: 200 address events overflow it
def ip(*argv, batch=None):
    subprocess.run(["ip", *argv], input=batch, text=True, check=True, capture_output=True)
ip("link", "add", "kgw0", "type", "veth", "peer", "name", "kgw1")
events = host.NetlinkEvents()
ip("-batch", "-", batch="".join(f"addr add 198.18.251.{k}/32 dev kgw0\\n" for k in range(1, 201)))
events.drain()  # ENOBUFS on the way: drained, not raised
events.close()
states, changed = [], threading.Event()
watcher = host.HostWatcher(lambda state: (states.append(state), changed.set()))
watcher.start()
ip("link", "set", "kgw0", "up")
began = time.monotonic()
assert changed.wait(2)
print("latency_ms", round((time.monotonic() - began) * 1000, 1))
time.sleep(0.3)
began = time.monotonic()
watcher.stop()
print("stop_ms", round((time.monotonic() - began) * 1000, 1))
up = [link.up for link in states[-1].links if link.name == "kgw0"]
print("kgw0_up", up, "addresses", sum(a.startswith("198.18.251.") for a in states[-1].addresses))
"""


def test_the_watcher_on_real_netlink_overflow_latency_and_stop(topo: Topology) -> None:
    """In the server's namespace: an overflowing event socket is drained (ENOBUFS is one
    more reason to dump), a link coming up is reported within milliseconds, stop is
    immediate."""
    from tests.integration.daemon import PYTHON, REPO

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = topo.run("server", [PYTHON, "-c", WATCH], cwd=str(REPO), env=env)
    assert "netlink: events lost (ENOBUFS)" in done.stderr  # the overflow did happen
    said = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    print(f"watcher: link up -> changed() in {said['latency_ms']} ms; stop in {said['stop_ms']} ms")
    assert float(said["latency_ms"]) < 200
    assert float(said["stop_ms"]) < 100
    assert said["kgw0_up"] == "[True] addresses 200"
