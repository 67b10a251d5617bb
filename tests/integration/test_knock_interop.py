"""Our knock client puts the same packets on the wire as knockd's ``knock``.

Each client knocks a fresh set of loopback listeners (an open TCP port, a UDP
socket, a closed TCP port) while tcpdump records ``lo``; the two recordings must
hold the same client-to-listener packets: protocol, which listener, TCP flags
and UDP payload length. Needs root (tcpdump), ``knock`` and scapy.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, NamedTuple

import pytest

from appliance.client import resolve_host, send_knocks
from appliance.core.model import Step
from tests.integration.conftest import require

KNOCK = shutil.which("knock")
TCPDUMP = shutil.which("tcpdump")
WAIT = 5.0  # seconds: the longest we wait for tcpdump or a knock


class Wire(NamedTuple):
    """One client-to-listener packet, the listener's port replaced by its role."""

    proto: str
    role: str
    flags: str  # TCP flags as scapy spells them ("S", "A", "FA"); "" for UDP
    payload: int


class Listeners:
    """An open TCP port, a UDP socket and a closed TCP port on a loopback address."""

    def __init__(self, family: int, host: str) -> None:
        self.tcp = socket.socket(family, socket.SOCK_STREAM)
        self.udp = socket.socket(family, socket.SOCK_DGRAM)
        self.tcp.bind((host, 0))
        self.tcp.listen(8)
        self.udp.bind((host, 0))
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            closed = int(probe.getsockname()[1])
        self.roles = {
            int(self.tcp.getsockname()[1]): "open-tcp",
            int(self.udp.getsockname()[1]): "udp",
            closed: "closed-tcp",
        }
        self.ports = {role: port for port, role in self.roles.items()}

    @property
    def steps(self) -> list[Step]:
        return [
            Step(self.ports["open-tcp"], "tcp"),
            Step(self.ports["udp"], "udp"),
            Step(self.ports["closed-tcp"], "tcp"),
        ]

    def knock_arguments(self) -> list[str]:
        """The same sequence as knockd's ``knock`` takes it."""
        return [
            f"{step.port}:udp" if step.proto == "udp" else str(step.port) for step in self.steps
        ]

    def wait_for_knocks(self) -> None:
        """Wait until both listeners have a knock waiting, without answering it."""
        deadline = time.monotonic() + WAIT
        for sock in (self.tcp, self.udp):
            readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
            assert readable, f"no knock reached {sock.getsockname()}"

    def close(self) -> None:
        self.tcp.close()
        self.udp.close()


@contextlib.contextmanager
def listeners(family: int, host: str) -> Iterator[Listeners]:
    opened = Listeners(family, host)
    try:
        yield opened
    finally:
        opened.close()


@contextlib.contextmanager
def capture(path: Path, ports: list[int]) -> Iterator[None]:
    """Record lo to ``path`` (only the given ports) while the block runs."""
    assert TCPDUMP is not None
    expression = " or ".join(f"port {port}" for port in ports)
    argv = [TCPDUMP, "-i", "lo", "-n", "-U", "--immediate-mode", "-w", str(path), expression]
    tcpdump = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_until_listening(tcpdump)
        yield
        time.sleep(0.3)  # let the last packets (FIN, RST) reach the file
    finally:
        _stop(tcpdump)


def _wait_until_listening(tcpdump: subprocess.Popen[bytes]) -> None:
    assert tcpdump.stderr is not None
    said = b""
    deadline = time.monotonic() + WAIT
    while b"listening on" not in said:
        left = deadline - time.monotonic()
        readable, _, _ = select.select([tcpdump.stderr], [], [], max(0.0, left))
        chunk = os.read(tcpdump.stderr.fileno(), 4096) if readable else b""
        if not chunk:
            pytest.fail(f"tcpdump did not start: {said.decode(errors='replace').strip()}")
        said += chunk


def _stop(tcpdump: subprocess.Popen[bytes]) -> None:
    if tcpdump.poll() is None:
        tcpdump.send_signal(signal.SIGINT)
        try:
            tcpdump.wait(WAIT)
        except subprocess.TimeoutExpired:
            tcpdump.kill()
            tcpdump.wait()
    if tcpdump.stderr is not None:
        tcpdump.stderr.close()


def _wire(path: Path, roles: dict[int, str]) -> list[Wire]:
    """The client-to-listener packets in ``path``, in capture order."""
    from scapy.layers.inet import TCP, UDP
    from scapy.utils import rdpcap

    seen: list[Wire] = []
    for packet in rdpcap(str(path)):
        if TCP in packet and packet[TCP].dport in roles:
            tcp = packet[TCP]
            seen.append(Wire("tcp", roles[tcp.dport], str(tcp.flags), len(bytes(tcp.payload))))
        elif UDP in packet and packet[UDP].dport in roles:
            udp = packet[UDP]
            seen.append(Wire("udp", roles[udp.dport], "", int(udp.len) - 8))
    return seen


def _with_roles(lines: list[str], roles: dict[int, str]) -> list[str]:
    """Verbose lines with each port number replaced by its role."""
    renamed = []
    for line in lines:
        head, _, port = line.rpartition(":")
        renamed.append(f"{head}:{roles.get(int(port), port)}")
    return renamed


Family = Literal[4, 6]


def _knock_with_knockd(family: Family, host: str, tmp_path: Path) -> tuple[list[Wire], list[str]]:
    assert KNOCK is not None
    inet = socket.AF_INET if family == 4 else socket.AF_INET6
    with listeners(inet, host) as target:
        path = tmp_path / "knockd-knock.pcap"
        with capture(path, list(target.roles)):
            argv = [KNOCK, "-v", f"-{family}", host, *target.knock_arguments()]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=WAIT, check=False)
            assert done.returncode == 0, f"{argv}: {done.stderr}"
            target.wait_for_knocks()
        return _wire(path, target.roles), _with_roles(done.stdout.splitlines(), target.roles)


def _knock_with_knockgate(
    family: Family, host: str, tmp_path: Path
) -> tuple[list[Wire], list[str]]:
    inet = socket.AF_INET if family == 4 else socket.AF_INET6
    with listeners(inet, host) as target:
        path = tmp_path / "knockgate-knock.pcap"
        lines: list[str] = []
        with capture(path, list(target.roles)):
            address_family, address = resolve_host(host, family)
            send_knocks(address_family, address, target.steps, 0, lines.append)
            target.wait_for_knocks()
        return _wire(path, target.roles), _with_roles(lines, target.roles)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def _require_peers() -> None:
    require(os.geteuid() == 0, "needs root: tcpdump captures on lo")
    require(KNOCK is not None, "knockd's knock client is not installed (apt install knockd)")
    require(TCPDUMP is not None, "tcpdump is not installed")
    require(importlib.util.find_spec("scapy") is not None, "scapy is not installed")


@pytest.mark.integration
@pytest.mark.parametrize(("family", "host"), [(4, "127.0.0.1"), (6, "::1")])
def test_same_packets_as_knockd_knock(family: Family, host: str, tmp_path: Path) -> None:
    _require_peers()
    if family == 6:
        require(_has_ipv6_loopback(), "no IPv6 loopback (::1)")

    theirs, their_lines = _knock_with_knockd(family, host, tmp_path)
    ours, our_lines = _knock_with_knockgate(family, host, tmp_path)

    # knock's own recording: one SYN per TCP knock, one datagram of one NUL byte.
    firsts = [wire for wire in theirs if wire.flags in ("S", "")]
    assert firsts == [
        Wire("tcp", "open-tcp", "S", 0),
        Wire("udp", "udp", "", 1),
        Wire("tcp", "closed-tcp", "S", 0),
    ], theirs
    assert ours == theirs
    assert their_lines == [
        f"hitting tcp {host}:open-tcp",
        f"hitting udp {host}:udp",
        f"hitting tcp {host}:closed-tcp",
    ]
    assert our_lines == their_lines
