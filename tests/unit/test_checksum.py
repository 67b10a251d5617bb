"""appliance.capture.checksum: what the host's stack would drop, on scapy-built frames.

Regression for "a sweep with bad checksums completes a knock": the kernel drops a
packet with a wrong IPv4 header checksum or a wrong TCP/UDP checksum before conntrack
and the scan detector see it, so it must not count as a knock either. scapy computes
the checksums here (an independent implementation); a frame is made bad by giving
scapy a wrong ``chksum``.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, IPOption_NOP, IPOption_RR
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw
from scapy.utils import checksum as scapy_checksum

from appliance.capture.checksum import (
    BAD_CHECKSUM,
    FRAGMENT,
    MALFORMED,
    MARTIAN,
    NOT_FOR_HOST,
    TP_STATUS_CSUM_VALID,
    TP_STATUS_CSUMNOTREADY,
    TP_STATUS_GSO_TCP,
    drop_reason,
    internet_checksum,
    ones_complement_sum,
)
from appliance.capture.decode import decode_ethernet

SRC4, DST4 = "198.18.1.7", "198.18.1.1"
SRC6, DST6 = "2001:2::7", "2001:2::1"
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
USER = 0x01  # TP_STATUS_USER: set on every frame read; no checksum information
NOT_READY = USER | TP_STATUS_CSUMNOTREADY
VALID = USER | TP_STATUS_CSUM_VALID
PACKET_HOST, PACKET_BROADCAST, PACKET_MULTICAST, PACKET_OTHERHOST = 0, 1, 2, 3
BAD = 0x1234  # a checksum none of these frames has


def ip4(**kw: Any) -> Any:
    return IP(src=kw.pop("src", SRC4), dst=kw.pop("dst", DST4), **kw)


def ip6(**kw: Any) -> Any:
    return IPv6(src=kw.pop("src", SRC6), dst=kw.pop("dst", DST6), **kw)


def syn(**kw: Any) -> Any:
    return TCP(sport=40000, dport=7000, flags="S", **kw)


def udp(**kw: Any) -> Any:
    return UDP(sport=40000, dport=8000, **kw)


SPA = Raw(b"8" + bytes(range(140, 255)) + b"/+" * 20)  # 156 bytes: a 200-byte SPA frame


def verdict(pkt: Any, status: int = USER, pkttype: int = PACKET_HOST) -> str | None:
    frame = bytes(pkt)
    assert decode_ethernet(frame, 0.0) is not None  # the sniffer only asks for these
    return drop_reason(frame, len(frame), status, pkttype)


# --------------------------------------------------------------------------- the sums


@given(st.binary(max_size=300))
def test_internet_checksum_matches_scapy(data: bytes) -> None:
    assert internet_checksum(data) == scapy_checksum(data)


@pytest.mark.parametrize(
    ("data", "total"),
    [
        (b"", 0),
        (b"\x00\x00", 0),
        (b"\x00\x01\xf2\x03\xf4\xf5\xf6\xf7", 0xDDF2),  # RFC 1071 section 3's example
        (b"\xff\xff", 0xFFFF),
        (b"\x01", 0x0100),  # an odd length is padded with a zero byte
        (b"\xff\xff\x00\x01", 0x0001),  # end-around carry
    ],
)
def test_ones_complement_sum(data: bytes, total: int) -> None:
    assert ones_complement_sum(data) == total


# --------------------------------------------------------------------------- valid frames


@pytest.mark.parametrize(
    "pkt",
    [
        ETH / ip4() / syn(),
        ETH / ip4() / udp() / Raw(b"knock"),
        ETH / ip4() / udp() / SPA,
        ETH / ip6() / syn(),
        ETH / ip6() / udp() / SPA,
        ETH / ip4() / udp() / Raw(b"odd"),  # an odd length, padded for the sum
        ETH / ip4(options=[IPOption_NOP()] * 4) / syn(),
        ETH / ip4(options=[IPOption_RR(routers=["198.18.0.1", "198.18.0.2"])]) / syn(),
        ETH / ip4() / syn(options=[("MSS", 1460), ("WScale", 7), ("SAckOK", b"")]),
        ETH / Dot1Q(vlan=100) / ip4() / syn(),
        ETH / Dot1AD(vlan=10) / Dot1Q(vlan=100) / ip6() / udp() / Raw(b"x"),
        ETH / ip6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / syn(),
        ETH / ip6() / IPv6ExtHdrRouting(addresses=[], segleft=0) / syn(),
        ETH / ip6() / IPv6ExtHdrFragment(offset=0, m=0) / udp() / Raw(b"x"),  # atomic
        ETH / ip4(flags="DF") / syn(),
    ],
    ids=lambda p: p.summary(),
)
def test_valid_frames_are_taken(pkt: Any) -> None:
    assert verdict(pkt) is None


def test_ethernet_padding_is_not_part_of_the_packet() -> None:
    frame = bytes(ETH / ip4() / syn())
    padded = frame + b"\xaa" * (60 - len(frame))
    assert drop_reason(padded, len(padded), USER) is None


def test_udp_datagram_shorter_than_the_ip_payload_is_summed_to_its_own_length() -> None:
    pkt = ETH / ip4() / udp() / Raw(b"knock")
    frame = bytes(pkt)
    ip_total = len(frame) - 14 + 4  # four bytes past the UDP datagram, inside the IP packet
    longer = bytearray(frame + b"\x01\x02\x03\x04")
    longer[16:18] = ip_total.to_bytes(2, "big")
    longer[24:26] = b"\x00\x00"
    longer[24:26] = internet_checksum(bytes(longer[14:34])).to_bytes(2, "big")
    assert drop_reason(bytes(longer), len(longer), USER) is None


# --------------------------------------------------------------------------- bad checksums


@pytest.mark.parametrize(
    "pkt",
    [
        ETH / ip4(chksum=BAD) / syn(),
        ETH / ip4(chksum=BAD) / udp(),
        ETH / ip4(chksum=BAD, options=[IPOption_NOP()] * 4) / syn(),
        ETH / Dot1Q(vlan=100) / ip4(chksum=BAD) / syn(),
    ],
    ids=lambda p: p.summary(),
)
@pytest.mark.parametrize("status", [USER, NOT_READY, VALID])
def test_bad_ipv4_header_checksum_is_dropped_whatever_the_status(pkt: Any, status: int) -> None:
    # The kernel always verifies the IPv4 header in software.
    assert verdict(pkt, status) == BAD_CHECKSUM


def test_an_ipv4_option_byte_is_covered_by_the_header_checksum() -> None:
    frame = bytearray(bytes(ETH / ip4(options=[IPOption_NOP()] * 4) / syn()))
    frame[14 + 20] = 0x00  # NOP -> end of options: the header checksum no longer holds
    assert drop_reason(bytes(frame), len(frame), USER) == BAD_CHECKSUM


@pytest.mark.parametrize(
    "pkt",
    [
        ETH / ip4() / syn(chksum=BAD),
        ETH / ip4() / udp(chksum=BAD) / Raw(b"knock"),
        ETH / ip4() / udp(chksum=BAD) / SPA,
        ETH / ip6() / syn(chksum=BAD),
        ETH / ip6() / udp(chksum=BAD) / Raw(b"knock"),
        ETH / ip6() / IPv6ExtHdrDestOpt() / syn(chksum=BAD),
        ETH / Dot1Q(vlan=100) / ip4() / syn(chksum=BAD),
        ETH / Dot1AD(vlan=10) / Dot1Q(vlan=100) / ip6() / syn(chksum=BAD),
        ETH / ip4(options=[IPOption_NOP()] * 4) / syn(chksum=BAD),
    ],
    ids=lambda p: p.summary(),
)
def test_bad_l4_checksum_is_dropped_unless_the_kernel_vouches_for_it(pkt: Any) -> None:
    assert verdict(pkt, USER) == BAD_CHECKSUM
    # CHECKSUM_PARTIAL (a local sender over a veth: the field holds the pseudo-header
    # sum only) and CHECKSUM_UNNECESSARY (the NIC verified it): the kernel takes them.
    assert verdict(pkt, NOT_READY) is None
    assert verdict(pkt, VALID) is None


def test_the_pseudo_header_is_covered() -> None:
    # The same segment sent to another address: its checksum no longer holds.
    good = bytes(ETH / ip4() / syn())
    moved = bytes(ETH / ip4(dst="198.18.1.2", proto=6) / Raw(good[34:]))
    assert drop_reason(moved, len(moved), USER) == BAD_CHECKSUM


def test_udp_checksum_zero_means_none_over_ipv4() -> None:
    assert verdict(ETH / ip4() / udp(chksum=0) / Raw(b"knock")) is None


@pytest.mark.parametrize("status", [USER, NOT_READY, VALID])
def test_udp_checksum_zero_is_invalid_over_ipv6(status: int) -> None:
    assert verdict(ETH / ip6() / udp(chksum=0) / Raw(b"knock"), status) == BAD_CHECKSUM


@given(st.binary(min_size=1, max_size=200), st.data())
def test_any_changed_payload_byte_is_caught(payload: bytes, data: st.DataObject) -> None:
    proto = data.draw(st.sampled_from(["tcp4", "udp4", "tcp6", "udp6"]))
    l3 = ip4() if proto.endswith("4") else ip6()
    l4 = syn() if proto.startswith("tcp") else udp()
    frame = bytearray(bytes(ETH / l3 / l4 / Raw(payload)))
    assert drop_reason(bytes(frame), len(frame), USER) is None
    at = data.draw(st.integers(len(frame) - len(payload), len(frame) - 1))
    frame[at] ^= data.draw(st.integers(1, 255))
    assert drop_reason(bytes(frame), len(frame), USER) == BAD_CHECKSUM


# --------------------------------------------------------------------------- lengths


def test_truncated_capture_cannot_be_verified_in_software() -> None:
    frame = bytes(ETH / ip4() / udp() / SPA)
    cut = frame[:60]  # the capture holds less than the frame had on the wire
    assert drop_reason(cut, len(frame), USER) == MALFORMED
    assert drop_reason(cut, len(frame), NOT_READY) is None
    assert drop_reason(cut, len(frame), VALID) is None


@pytest.mark.parametrize("status", [USER, NOT_READY, VALID])
def test_ipv4_total_length_beyond_what_arrived_is_dropped(status: int) -> None:
    frame = bytes(ETH / ip4() / udp() / SPA)
    short = frame[:-10]  # the IPv4 total length still says the full size
    assert drop_reason(short, len(short), status) == MALFORMED


@pytest.mark.parametrize("status", [USER, NOT_READY, VALID])
def test_ipv6_payload_length_beyond_what_arrived_is_dropped(status: int) -> None:
    frame = bytes(ETH / ip6() / syn())
    assert drop_reason(frame[:-4], len(frame) - 4, status) == MALFORMED


def test_ipv4_total_length_shorter_than_its_header_is_dropped() -> None:
    assert verdict(ETH / ip4(len=16) / syn()) == MALFORMED


@pytest.mark.parametrize("offset", [0, 4])
def test_tcp_data_offset_out_of_range_is_dropped(offset: int) -> None:
    assert verdict(ETH / ip4() / syn(dataofs=offset)) == MALFORMED
    assert verdict(ETH / ip4() / syn(dataofs=15)) == MALFORMED  # 60 bytes in a 20-byte segment


@pytest.mark.parametrize("length", [0, 7, 200])
def test_udp_length_out_of_range_is_dropped(length: int) -> None:
    assert verdict(ETH / ip4() / udp(len=length) / Raw(b"knock")) == MALFORMED


def test_ipv6_jumbo_udp_length_zero_takes_the_ip_payload_length() -> None:
    # RFC 2675: over IPv6 a UDP length of 0 means "as long as the IP payload".
    pkt = ETH / ip6() / udp(len=0) / Raw(b"knock")
    frame = bytearray(bytes(pkt))
    frame[54 + 6 : 54 + 8] = b"\x00\x00"
    ip6_payload = bytes(frame[54:])
    pseudo = bytes(frame[22:54]) + len(ip6_payload).to_bytes(4, "big") + b"\x00\x00\x00\x11"
    frame[54 + 6 : 54 + 8] = internet_checksum(pseudo + ip6_payload).to_bytes(2, "big")
    assert drop_reason(bytes(frame), len(frame), USER) is None


def test_zero_ipv4_total_length_is_taken_only_for_gso_tcp() -> None:
    # BIG TCP: GRO leaves tot_len at 0 and the kernel takes the skb's length.
    frame = bytearray(bytes(ETH / ip4() / syn()))
    frame[16:18] = b"\x00\x00"
    frame[24:26] = b"\x00\x00"
    frame[24:26] = internet_checksum(bytes(frame[14:34])).to_bytes(2, "big")
    assert drop_reason(bytes(frame), len(frame), VALID) == MALFORMED
    assert drop_reason(bytes(frame), len(frame), VALID | TP_STATUS_GSO_TCP) is None


def test_zero_ipv6_payload_length_is_taken_only_for_gso_tcp() -> None:
    frame = bytearray(bytes(ETH / ip6() / syn()))
    frame[18:20] = b"\x00\x00"
    assert drop_reason(bytes(frame), len(frame), VALID) == MALFORMED
    assert drop_reason(bytes(frame), len(frame), VALID | TP_STATUS_GSO_TCP) is None


# --------------------------------------------------------------------------- not for this host


@pytest.mark.parametrize("pkt", [ETH / ip4() / syn(), ETH / ip6() / udp() / Raw(b"x")])
def test_a_frame_for_another_mac_is_not_for_this_host(pkt: Any) -> None:
    # PACKET_OTHERHOST: seen only because the interface is promiscuous (a bridge port).
    assert verdict(pkt, NOT_READY, PACKET_OTHERHOST) == NOT_FOR_HOST


@pytest.mark.parametrize("pkttype", [PACKET_BROADCAST, PACKET_MULTICAST])
def test_tcp_in_a_link_layer_broadcast_is_dropped_udp_is_not(pkttype: int) -> None:
    assert verdict(ETH / ip4() / syn(), USER, pkttype) == NOT_FOR_HOST
    assert verdict(ETH / ip6() / syn(), USER, pkttype) == NOT_FOR_HOST
    assert verdict(ETH / ip4() / udp() / Raw(b"x"), USER, pkttype) is None


def test_ipv6_routing_header_with_segments_left_is_for_another_node() -> None:
    routed = ETH / ip6() / IPv6ExtHdrRouting(addresses=["2001:2::9"], segleft=1) / syn()
    assert verdict(routed) == NOT_FOR_HOST


# --------------------------------------------------------------------------- fragments


def test_first_ipv4_fragment_with_more_fragments_is_dropped() -> None:
    assert verdict(ETH / ip4(flags="MF") / udp() / Raw(b"knock")) == FRAGMENT


def test_first_ipv6_fragment_with_more_fragments_is_dropped() -> None:
    pkt = ETH / ip6() / IPv6ExtHdrFragment(offset=0, m=1) / udp() / Raw(b"knock")
    assert verdict(pkt) == FRAGMENT


# --------------------------------------------------------------------------- martians


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("0.0.0.0", DST4),
        ("127.0.0.1", DST4),
        ("224.0.0.1", DST4),
        ("239.255.255.250", DST4),
        ("255.255.255.255", DST4),
        (SRC4, "127.0.0.1"),
        (SRC4, "0.1.2.3"),
    ],
)
def test_ipv4_martian_addresses(src: str, dst: str) -> None:
    assert verdict(ETH / ip4(src=src, dst=dst) / syn()) == MARTIAN


def test_class_e_source_is_not_a_martian_in_linux() -> None:
    assert verdict(ETH / ip4(src="240.0.0.1") / syn()) is None


@pytest.mark.parametrize(
    ("src", "dst"),
    [("ff02::1", DST6), ("::1", DST6), ("::ffff:198.18.1.7", DST6), (SRC6, "::1")],
)
def test_ipv6_martian_addresses(src: str, dst: str) -> None:
    assert verdict(ETH / ip6(src=src, dst=dst) / syn()) == MARTIAN


@pytest.mark.parametrize(
    "pkt",
    [
        ETH / ip4(src="127.0.0.1", dst="127.0.0.1") / syn(),
        ETH / ip4(src="127.0.0.1", dst="127.0.0.53") / udp() / Raw(b"x"),
        ETH / ip6(src="::1", dst="::1") / syn(),
    ],
    ids=lambda p: p.summary(),
)
def test_loopback_addresses_are_fine_on_a_loopback_device(pkt: Any) -> None:
    assert verdict(pkt) == MARTIAN
    frame = bytes(pkt)
    assert drop_reason(frame, len(frame), NOT_READY, PACKET_HOST, loopback=True) is None


def test_ipv6_multicast_source_is_a_martian_even_on_loopback() -> None:
    frame = bytes(ETH / ip6(src="ff02::1", dst="::1") / syn())
    assert drop_reason(frame, len(frame), NOT_READY, PACKET_HOST, loopback=True) == MARTIAN


def test_bad_checksum_on_loopback_is_still_bad() -> None:
    frame = bytes(ETH / ip4(src="127.0.0.1", dst="127.0.0.1") / syn(chksum=BAD))
    assert drop_reason(frame, len(frame), USER, PACKET_HOST, loopback=True) == BAD_CHECKSUM


# --------------------------------------------------------------------------- other headers


def test_ipv6_hop_by_hop_not_first_is_dropped() -> None:
    pkt = ETH / ip6() / IPv6ExtHdrDestOpt() / IPv6ExtHdrHopByHop() / syn()
    assert verdict(pkt) == MALFORMED


def test_ipv6_authentication_header_cannot_be_verified() -> None:
    # The kernel drops it unless an IPsec SA verifies the ICV; the capture has no SA.
    ah = AH(nh=6, payloadlen=4, spi=0x100, seq=1, icv=b"\x00" * 12)
    assert verdict(ETH / ip6(nh=51) / ah / syn()) == MALFORMED


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        bytes(ETH / ARP()),
        bytes(ETH)[:12] + b"\x08\x00",  # IPv4 with nothing after it
        bytes(ETH / ip4() / syn())[:30],
        bytes(ETH / ip6() / syn())[:40],
        bytes(
            ETH
            / Dot1Q()
            / Dot1Q()
            / Dot1Q()
            / Dot1Q()
            / Dot1Q()
            / Dot1Q()
            / Dot1Q()
            / Dot1Q()
            / Dot1Q()
            / ip4()
            / syn()
        ),
    ],
)
def test_what_cannot_be_read_is_malformed(frame: bytes) -> None:
    assert drop_reason(frame, len(frame), USER) == MALFORMED


@given(st.binary(max_size=120), st.integers(0, 0xFFFF), st.integers(0, 4), st.integers(0, 3000))
def test_hostile_input_never_raises(frame: bytes, status: int, pkttype: int, length: int) -> None:
    assert drop_reason(frame, length, status, pkttype) in (
        None,
        BAD_CHECKSUM,
        NOT_FOR_HOST,
        FRAGMENT,
        MALFORMED,
        MARTIAN,
    )
