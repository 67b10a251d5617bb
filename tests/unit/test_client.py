"""The knock client against real loopback listeners (no root needed).

Every packet these tests send goes to 127.0.0.0/8 or ::1; the failure cases use
the loopback broadcast address 127.255.255.255, which the kernel refuses
locally (TCP: ENETUNREACH, UDP without SO_BROADCAST: EACCES) before any packet
exists.
"""

from __future__ import annotations

import contextlib
import itertools
import select
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.client import parse_target, resolve_host, send_knocks, sequence_for_door
from appliance.config.schema import Config, Settings
from appliance.core.model import Door, Knock, OneTimeFile, OneTimeSequence, Proto, Step
from appliance.errors import KnockError

WAIT = 5.0  # seconds: the longest any test waits for a knock to arrive
LOOPBACK_BROADCAST = "127.255.255.255"


# --- loopback listeners ------------------------------------------------------


@dataclass
class Listener:
    """A socket on a free loopback port that records the knocks it receives."""

    sock: socket.socket
    proto: Proto
    datagrams: list[bytes] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    @property
    def step(self) -> Step:
        return Step(self.port, self.proto)

    def pending(self, timeout: float) -> bool:
        """Whether a knock is waiting to be taken, after at most ``timeout`` s."""
        readable, _, _ = select.select([self.sock], [], [], timeout)
        return bool(readable)

    def take(self, timeout: float = WAIT) -> None:
        """Take one knock: an accepted connection or a datagram; fail on timeout."""
        assert self.pending(timeout), f"no {self.proto} knock on port {self.port}"
        if self.proto == "tcp":
            conn, _ = self.sock.accept()
            conn.close()
        else:
            data, _ = self.sock.recvfrom(65535)
            self.datagrams.append(data)


def _listener(family: int, host: str, proto: Proto) -> Listener:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    sock.bind((host, 0))
    if proto == "tcp":
        sock.listen(8)
    return Listener(sock, proto)


@contextlib.contextmanager
def listeners(
    protos: Sequence[Proto], family: int = socket.AF_INET, host: str = "127.0.0.1"
) -> Iterator[list[Listener]]:
    opened: list[Listener] = []
    try:
        for proto in protos:
            opened.append(_listener(family, host, proto))
        yield opened
    finally:
        for listener in opened:
            listener.sock.close()


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1)")


# --- send_knocks -------------------------------------------------------------


def test_mixed_sequence_arrives_in_order_one_knock_each() -> None:
    with listeners(["tcp", "udp", "tcp"]) as (first, second, third):
        order = [first, second, third]
        lines: list[str] = []

        def before_each_knock(line: str) -> None:
            # Called just before knock number len(lines): the previous knock must have
            # arrived, and the next listener must not have seen anything yet.
            index = len(lines)
            lines.append(line)
            if index:
                order[index - 1].take()
            assert not order[index].pending(0), f"knock {index} arrived before its turn"

        send_knocks(socket.AF_INET, "127.0.0.1", [ls.step for ls in order], 0, before_each_knock)
        third.take()

        for listener in order:
            assert not listener.pending(0.2), "more than one knock on a port"
        assert second.datagrams == [b"\x00"]  # knockd's knock sends one NUL byte
        assert lines == [
            f"hitting tcp 127.0.0.1:{first.port}",
            f"hitting udp 127.0.0.1:{second.port}",
            f"hitting tcp 127.0.0.1:{third.port}",
        ]


def test_tcp_knock_on_closed_port_is_not_an_error() -> None:
    with listeners(["tcp"]) as (listener,):
        closed = listener.port
    send_knocks(socket.AF_INET, "127.0.0.1", [Step(closed, "tcp")], 0, None)


def test_same_port_twice_knocks_twice() -> None:
    with listeners(["udp"]) as (listener,):
        send_knocks(socket.AF_INET, "127.0.0.1", [listener.step, listener.step], 0, None)
        listener.take()
        listener.take()
        assert listener.datagrams == [b"\x00", b"\x00"]


@needs_ipv6
def test_knocks_over_ipv6_loopback() -> None:
    with listeners(["tcp", "udp"], socket.AF_INET6, "::1") as (tcp, udp):
        lines: list[str] = []
        send_knocks(socket.AF_INET6, "::1", [tcp.step, udp.step], 0, lines.append)
        tcp.take()
        udp.take()
        assert udp.datagrams == [b"\x00"]
        assert lines == [f"hitting tcp ::1:{tcp.port}", f"hitting udp ::1:{udp.port}"]


def test_delay_spaces_the_knocks() -> None:
    delay_ms = 200
    with listeners(["udp", "tcp", "udp"]) as order:
        arrivals: list[float] = []

        def watch() -> None:
            for listener in order:
                listener.take()
                arrivals.append(time.monotonic())

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        send_knocks(socket.AF_INET, "127.0.0.1", [ls.step for ls in order], delay_ms, None)
        watcher.join(WAIT)

    assert len(arrivals) == len(order), "not every knock arrived"
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert all(gap >= 0.9 * delay_ms / 1000 for gap in gaps), gaps


def test_delay_sleeps_between_knocks_not_after_the_last(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)  # the client's clock, for this test
    with listeners(["udp"]) as (listener,):
        send_knocks(socket.AF_INET, "127.0.0.1", [listener.step] * 3, 250, None)
        send_knocks(socket.AF_INET, "127.0.0.1", [listener.step] * 2, 0, None)
    assert sleeps == [0.25, 0.25]


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_unreachable_address_raises_knock_error_naming_the_step(proto: Proto) -> None:
    # 127.255.255.255 is lo's broadcast address: the kernel refuses a TCP connect
    # (ENETUNREACH) and a UDP send without SO_BROADCAST (EACCES) locally.
    with pytest.raises(KnockError, match=rf"cannot knock 7000/{proto} on {LOOPBACK_BROADCAST}: "):
        send_knocks(socket.AF_INET, LOOPBACK_BROADCAST, [Step(7000, proto)], 0, None)


def test_failure_stops_the_sequence() -> None:
    lines: list[str] = []
    steps = [Step(7000, "udp"), Step(7001, "tcp")]
    with pytest.raises(KnockError, match="7000/udp"):
        send_knocks(socket.AF_INET, LOOPBACK_BROADCAST, steps, 0, lines.append)
    assert lines == [f"hitting udp {LOOPBACK_BROADCAST}:7000"]


def test_address_of_the_wrong_family_raises_knock_error() -> None:
    with pytest.raises(KnockError, match="cannot knock 7000/udp on ::1"):
        send_knocks(socket.AF_INET, "::1", [Step(7000, "udp")], 0, None)


@pytest.mark.parametrize(
    ("steps", "delay_ms", "message"),
    [
        ([Step(0, "udp")], 0, "port must be 1..65535"),
        ([Step(65536, "tcp")], 0, "port must be 1..65535"),
        ([Step(7000, "icmp")], 0, "protocol must be tcp or udp"),  # type: ignore[arg-type]
        ([Step(7000, "udp")], -1, "delay cannot be negative"),
    ],
)
def test_bad_arguments_raise_before_anything_is_sent(
    steps: list[Step], delay_ms: int, message: str
) -> None:
    with listeners(["tcp"]) as (listener,):
        with pytest.raises(KnockError, match=message):
            send_knocks(socket.AF_INET, "127.0.0.1", [listener.step, *steps], delay_ms, None)
        assert not listener.pending(0.2), "a knock was sent before the bad argument"


# --- parse_target ------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "default", "expected"),
    [
        ("1", "tcp", Step(1, "tcp")),
        ("7000", "tcp", Step(7000, "tcp")),
        ("7000", "udp", Step(7000, "udp")),
        ("65535", "tcp", Step(65535, "tcp")),
        ("07000", "tcp", Step(7000, "tcp")),
        ("7000:udp", "tcp", Step(7000, "udp")),
        ("7000:tcp", "udp", Step(7000, "tcp")),
        ("7000:UDP", "tcp", Step(7000, "udp")),
        ("7000:Tcp", "udp", Step(7000, "tcp")),
    ],
)
def test_parse_target_numbers(spec: str, default: Proto, expected: Step) -> None:
    assert parse_target(spec, default) == expected


def _has_services_database() -> bool:
    try:
        socket.getservbyname("ssh", "tcp")
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_services_database(), reason="no /etc/services (netbase)")
@pytest.mark.parametrize(
    ("spec", "default", "expected"),
    [
        ("ssh", "tcp", Step(22, "tcp")),
        ("ssh:tcp", "udp", Step(22, "tcp")),
        ("domain:udp", "tcp", Step(53, "udp")),
        ("domain", "udp", Step(53, "udp")),
    ],
)
def test_parse_target_service_names(spec: str, default: Proto, expected: Step) -> None:
    assert parse_target(spec, default) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0", "port must be 1..65535"),
        ("65536", "port must be 1..65535"),
        ("70000", "port must be 1..65535"),
        ("9" * 5000, "port must be 1..65535"),
        ("2x", "port must be a number 1..65535 or a service name"),
        ("-1", "port must be a number 1..65535 or a service name"),
        ("+7000", "port must be a number 1..65535 or a service name"),
        (" 7000", "port must be a number 1..65535 or a service name"),
        ("7_000", "port must be a number 1..65535 or a service name"),
        ("0x1b58", "port must be a number 1..65535 or a service name"),
        ("\u0667", "port must be a number 1..65535 or a service name"),  # Arabic-Indic 7
        ("", "missing port"),
        (":udp", "missing port"),
        ("abc:icmp", "protocol must be tcp or udp"),
        ("7000:", "protocol must be tcp or udp"),
        ("7000:tcp:udp", "protocol must be tcp or udp"),
        ("7000: udp", "protocol must be tcp or udp"),
        ("no-such-service-here", "unknown tcp service 'no-such-service-here'"),
    ],
)
def test_parse_target_rejects(spec: str, message: str) -> None:
    with pytest.raises(KnockError, match=rf"knock target .*: {message}"):
        parse_target(spec, "tcp")


def test_parse_target_message_names_the_target() -> None:
    with pytest.raises(KnockError) as info:
        parse_target("abc:icmp", "tcp")
    assert str(info.value) == "knock target 'abc:icmp': protocol must be tcp or udp"


@given(st.text(max_size=40), st.sampled_from(["tcp", "udp"]))
def test_parse_target_never_raises_anything_but_knock_error(spec: str, default: Proto) -> None:
    try:
        step = parse_target(spec, default)
    except KnockError:
        return
    assert 1 <= step.port <= 65535
    assert step.proto in ("tcp", "udp")


# --- resolve_host ------------------------------------------------------------
# Only names the resolver answers without the network: literals and "localhost"
# from /etc/hosts ("localhost" over IPv6 only when /etc/hosts lists it, since
# otherwise the lookup would go out to DNS).


def test_resolve_ipv4_literal() -> None:
    assert resolve_host("127.0.0.1", None) == (socket.AF_INET, "127.0.0.1")
    assert resolve_host("127.0.0.1", 4) == (socket.AF_INET, "127.0.0.1")


def test_resolve_localhost() -> None:
    assert resolve_host("localhost", 4) == (socket.AF_INET, "127.0.0.1")
    assert resolve_host("localhost", None) in {
        (socket.AF_INET, "127.0.0.1"),
        (socket.AF_INET6, "::1"),
    }


@needs_ipv6
def test_resolve_ipv6_literal() -> None:
    assert resolve_host("::1", None) == (socket.AF_INET6, "::1")
    assert resolve_host("::1", 6) == (socket.AF_INET6, "::1")


def _hosts_file_lists_ipv6_localhost() -> bool:
    try:
        with open("/etc/hosts", encoding="utf-8") as hosts:
            lines = [line.split("#", 1)[0].split() for line in hosts]
    except OSError:
        return False
    return any(fields[:1] == ["::1"] and "localhost" in fields[1:] for fields in lines)


@needs_ipv6
@pytest.mark.skipif(
    not _hosts_file_lists_ipv6_localhost(), reason="/etc/hosts has no '::1 localhost'"
)
def test_resolve_localhost_forced_ipv6() -> None:
    assert resolve_host("localhost", 6) == (socket.AF_INET6, "::1")


def test_resolve_failure_is_a_knock_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # A resolver failure is simulated: a real failing lookup would ask DNS, off the machine.
    def fail(*args: object, **kwargs: object) -> object:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(KnockError, match=r"^cannot resolve knock\.invalid: "):
        resolve_host("knock.invalid", None)


# --- sequence_for_door -------------------------------------------------------

SSH_SEQUENCE = (Step(7000, "tcp"), Step(8000, "udp"), Step(9000, "tcp"))


def _config(*doors: Door) -> Config:
    return Config(path="/etc/knockgate.yaml", format="yaml", settings=Settings(), doors=doors)


def _one_time_door() -> Door:
    sequences = (OneTimeSequence(steps=(Step(1111, "tcp"), Step(2222, "udp")), line=1, offset=0),)
    one_time = OneTimeFile(path="/etc/knockgate/vault.otp", sequences=sequences)
    return Door(name="vault", knock=Knock(sequence=(), one_time=one_time))


def test_sequence_for_door() -> None:
    config = _config(Door(name="ssh", knock=Knock(sequence=SSH_SEQUENCE)), _one_time_door())
    assert sequence_for_door(config, "ssh", 0.0) == SSH_SEQUENCE


def test_sequence_for_one_time_door_points_to_its_file() -> None:
    config = _config(Door(name="ssh", knock=Knock(sequence=SSH_SEQUENCE)), _one_time_door())
    with pytest.raises(KnockError, match=r"door 'vault' .*one-time file /etc/knockgate/vault\.otp"):
        sequence_for_door(config, "vault", 0.0)


def test_sequence_for_unknown_door_lists_known_doors() -> None:
    config = _config(Door(name="ssh", knock=Knock(sequence=SSH_SEQUENCE)), _one_time_door())
    with pytest.raises(KnockError, match=r"unknown door 'web'.*known doors: ssh, vault"):
        sequence_for_door(config, "web", 0.0)


def test_sequence_for_door_without_doors() -> None:
    with pytest.raises(KnockError, match=r"unknown door 'ssh'.*defines no doors"):
        sequence_for_door(_config(), "ssh", 0.0)
