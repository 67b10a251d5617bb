"""The capture filter: generated from the doors, and accepted by libpcap."""

from __future__ import annotations

from appliance.capture.bpf import capture_filter
from appliance.capture.sniffer import check_filter
from appliance.core.model import TcpFlags
from tests.unit.helpers import door

SYN, ACK = 0x02, 0x10


def test_filter_names_hosts_ports_protocols_and_flags() -> None:
    doors = [
        door("a", 7113, "2231/udp", 9157, flags=TcpFlags(SYN, ACK)),
        door("b", 9157, 4001, target="198.18.0.9"),
    ]
    expression = capture_filter(doors, ["198.18.0.1", "2001:2::1"])
    assert expression == (
        "(dst host 198.18.0.1 or dst host 198.18.0.9 or dst host 2001:2::1) and ("
        "tcp dst port 4001 or "
        "(tcp dst port 7113 and (ip6 or tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn)) or "
        "tcp dst port 9157 or "  # door b takes any flags on 9157
        "udp dst port 2231 or "
        "(ip6 and (ip6[6] == 0 or ip6[6] == 43 or ip6[6] == 44 or ip6[6] == 51 or ip6[6] == 60)))"
    )
    check_filter(expression)


def test_negated_only_flags_compile() -> None:
    expression = capture_filter([door("a", 1000, 2000, flags=TcpFlags(0, ACK))], ["198.18.0.1"])
    assert "tcp[tcpflags] & (tcp-ack) == 0" in expression
    check_filter(expression)


def test_no_door_matches_nothing() -> None:
    assert capture_filter([], ["198.18.0.1"]) == "less 0"
    check_filter("less 0")


def test_totp_doors_capture_their_port_range_and_spa_doors_their_port() -> None:
    from appliance.core.model import Door, Knock, OpenPorts, Spa, SpaUser, Step, Totp

    totp = Door(
        "otp",
        Knock(
            sequence=(),
            tcpflags=TcpFlags(must_set=0x02, must_clear=0x10),
            totp=Totp(b"s" * 10, low=20000, high=20999),
        ),
        OpenPorts((Step(22, "tcp"),)),
    )
    spa = Door(
        "spa",
        Knock(sequence=()),
        OpenPorts((Step(22, "tcp"),)),
        spa=Spa(users=(SpaUser("a", b"k" * 32, b"h" * 32),), port=62201),
    )
    expression = capture_filter([totp, spa], ["198.18.0.1"])
    assert "(tcp dst portrange 20000-20999 and (ip6 or tcp[tcpflags] & " in expression
    assert "udp dst port 62201" in expression
    check_filter(expression)
