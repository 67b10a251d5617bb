"""InterfaceReader's decision per frame, from the kernel's tpacket_auxdata (a fake socket).

Regression for "a sweep with bad checksums completes a knock": the reader hands the
engine only what the host's stack would take, using the checksum status the kernel
reports with each frame (PACKET_AUXDATA) and verifying the rest in software.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterable
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from appliance.capture.checksum import REASONS
from appliance.capture.decode import decode_ethernet
from appliance.capture.host import Link
from appliance.capture.sniffer import (
    ANCILLARY_SPACE,
    PACKET_AUXDATA,
    SNAPLEN,
    SOL_PACKET,
    InterfaceReader,
    Sniffer,
)
from appliance.core.events import Packet

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
SRC, DST = "198.18.1.7", "198.18.1.1"
HOST, BROADCAST, OTHERHOST, OUTGOING = 0, 1, 3, 4
USER, CSUMNOTREADY, CSUM_VALID = 0x01, 0x08, 0x80
ETHERNET, LOOPBACK = 1, 772  # sll_hatype
AUX = struct.Struct("=IIIHHHH")  # struct tpacket_auxdata

GOOD_SYN = bytes(ETH / IP(src=SRC, dst=DST) / TCP(dport=7000, flags="S"))
BAD_SYN = bytes(ETH / IP(src=SRC, dst=DST) / TCP(dport=7000, flags="S", chksum=0x1234))
BAD_IP = bytes(ETH / IP(src=SRC, dst=DST, chksum=0x1234) / TCP(dport=7000, flags="S"))
BAD_UDP6 = bytes(
    ETH / IPv6(src="2001:2::7", dst="2001:2::1") / UDP(dport=8000, chksum=1) / Raw(b"x")
)
KNOCK_UDP = bytes(ETH / IP(src=SRC, dst=DST) / UDP(dport=8000) / Raw(b"knock"))
FRAGMENT = bytes(ETH / IP(src=SRC, dst=DST, flags="MF") / UDP(dport=8000) / Raw(b"x"))
MARTIAN = bytes(ETH / IP(src="127.0.0.1", dst=DST) / TCP(dport=7000, flags="S"))
# A jumbo frame: more than the capture buffer holds.
JUMBO = bytes(ETH / IP(src=SRC, dst=DST) / UDP(dport=62201) / Raw(b"8" * 2100))


class Frame:
    """One frame as recvmsg_into hands it over: bytes, auxdata, sll_pkttype."""

    def __init__(
        self,
        data: bytes,
        status: int | None = USER,
        pkttype: int = HOST,
        wire: int | None = None,
        hatype: int = ETHERNET,
    ) -> None:
        self.data, self.status, self.pkttype, self.hatype = data, status, pkttype, hatype
        self.wire = len(data) if wire is None else wire


class FakeSocket:
    """What InterfaceReader.read uses of an AF_PACKET socket with PACKET_AUXDATA on."""

    def __init__(self, frames: Iterable[Frame]) -> None:
        self.frames = list(frames)
        self.calls: list[int] = []

    def recvmsg_into(
        self, buffers: list[bytearray], ancbufsize: int
    ) -> tuple[int, list[tuple[int, int, bytes]], int, tuple[Any, ...]]:
        self.calls.append(ancbufsize)
        if not self.frames:
            raise BlockingIOError
        frame = self.frames.pop(0)
        buffer = buffers[0]
        size = min(len(frame.data), len(buffer))  # the kernel cuts to the buffer
        buffer[:size] = frame.data[:size]
        ancillary = []
        if frame.status is not None:
            aux = AUX.pack(frame.status, frame.wire, len(frame.data), 0, 14, 0, 0)
            ancillary.append((SOL_PACKET, PACKET_AUXDATA, aux))
        flags = socket.MSG_TRUNC if size < len(frame.data) else 0
        return size, ancillary, flags, ("eth0", 0x0800, frame.pkttype, frame.hatype, b"\x02" * 6)


def read(*frames: Frame) -> tuple[InterfaceReader, list[Packet]]:
    reader = InterfaceReader("eth0", "tcp", clock=lambda: 5.0)
    fake = FakeSocket(frames)
    reader.sock = fake  # type: ignore[assignment]
    packets = reader.read()
    assert all(size == ANCILLARY_SPACE for size in fake.calls)
    return reader, packets


# The decision table: frame, tp_status, sll_pkttype -> taken, or the counter it lands in.
TABLE = [
    pytest.param(Frame(GOOD_SYN), None, id="valid-software-checked"),
    pytest.param(Frame(GOOD_SYN, CSUMNOTREADY | USER), None, id="valid-offloaded"),
    pytest.param(Frame(BAD_SYN), "bad_checksums", id="bad-tcp-no-status"),
    pytest.param(Frame(BAD_SYN, USER | CSUMNOTREADY), None, id="bad-tcp-but-partial-local"),
    pytest.param(Frame(BAD_SYN, USER | CSUM_VALID), None, id="bad-tcp-but-nic-verified"),
    pytest.param(Frame(BAD_SYN, None), "bad_checksums", id="bad-tcp-no-auxdata"),
    pytest.param(Frame(BAD_IP, USER | CSUM_VALID), "bad_checksums", id="bad-ip-header"),
    pytest.param(Frame(BAD_UDP6), "bad_checksums", id="bad-udp6"),
    pytest.param(Frame(GOOD_SYN, pkttype=OTHERHOST), "not_for_host", id="otherhost"),
    pytest.param(Frame(GOOD_SYN, pkttype=BROADCAST), "not_for_host", id="tcp-broadcast"),
    pytest.param(Frame(FRAGMENT), "fragments", id="first-fragment"),
    pytest.param(Frame(MARTIAN), "martians", id="loopback-source"),
    pytest.param(Frame(MARTIAN, hatype=LOOPBACK), None, id="loopback-source-on-lo"),
    pytest.param(Frame(BAD_SYN, hatype=LOOPBACK), "bad_checksums", id="bad-tcp-on-lo"),
    pytest.param(Frame(KNOCK_UDP[:-2]), "malformed_frames", id="ip-longer-than-frame"),
    pytest.param(Frame(JUMBO), "malformed_frames", id="cut-by-snaplen-unverifiable"),
    pytest.param(Frame(JUMBO, USER | CSUMNOTREADY), None, id="cut-by-snaplen-offloaded"),
]


@pytest.mark.parametrize(("frame", "counter"), TABLE)
def test_decision_table(frame: Frame, counter: str | None) -> None:
    reader, packets = read(frame)
    assert reader.frames == 1
    expected = dict.fromkeys(REASONS, 0)
    if counter is None:
        assert packets == [decode_ethernet(frame.data[:SNAPLEN], 5.0)]
    else:
        assert packets == []
        expected[counter] = 1
    assert reader.rejected == expected


def test_the_jumbo_frame_is_cut_by_the_capture_buffer() -> None:
    assert len(JUMBO) > SNAPLEN  # the frame above really is cut by the capture buffer


def test_outgoing_frames_are_not_frames() -> None:
    reader, packets = read(Frame(BAD_SYN, pkttype=OUTGOING))
    assert (reader.frames, packets, sum(reader.rejected.values())) == (0, [], 0)


def test_undecodable_frames_are_counted_as_before() -> None:
    reader, packets = read(Frame(bytes(ETH / ARP())))
    assert (reader.frames, reader.undecoded, packets) == (1, 1, [])
    assert sum(reader.rejected.values()) == 0


def test_a_badsum_sweep_leaves_only_the_real_knock() -> None:
    sweep = [
        Frame(bytes(ETH / IP(src=SRC, dst=DST) / TCP(dport=port, flags="S", chksum=0xDEAD)))
        for port in (7000, 8000, 9000)
    ]
    real = Frame(bytes(ETH / IP(src="198.18.1.8", dst=DST) / TCP(dport=7000, flags="S")))
    reader, packets = read(*sweep, real)
    assert [(p.src, p.dport) for p in packets] == [("198.18.1.8", 7000)]
    assert reader.rejected["bad_checksums"] == 3


def test_first_rejection_per_reason_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="knockgate.capture")
    read(Frame(BAD_SYN), Frame(BAD_SYN), Frame(BAD_IP), Frame(GOOD_SYN, pkttype=OTHERHOST))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "eth0: ignored 198.18.1.7 -> 198.18.1.1 7000/tcp: bad checksum" in lines[0]
    assert "not addressed to this host" in lines[1]


def test_sniffer_sums_the_counters_of_its_interfaces() -> None:
    opened = lambda interface, expression: FakeSocket([])  # noqa: E731
    sniffer = Sniffer([], "tcp", opener=opened)  # type: ignore[arg-type]
    sniffer.follow((Link("eth0", 2, True), Link("eth1", 3, True)))
    assert sniffer.rejected == dict.fromkeys(REASONS, 0)
    sniffer.readers[0].rejected["bad_checksums"] = 2
    sniffer.readers[1].rejected["bad_checksums"] = 3
    sniffer.readers[1].rejected["not_for_host"] = 1
    assert sniffer.rejected == {**dict.fromkeys(REASONS, 0), "bad_checksums": 5, "not_for_host": 1}
    assert list(sniffer.rejected) == list(REASONS)  # stable keys for `knockgate status`
