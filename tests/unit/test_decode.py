"""appliance.capture.decode: raw frames to Packet events.

scapy is only the independent encoder here: it builds the frames, the decoder under
test reads them with struct, and the tests compare every field exactly.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP, IPOption_RR, fragment
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    PadN,
)
from scapy.layers.ipsec import AH, ESP
from scapy.layers.l2 import (
    ARP,
    CookedLinux,
    CookedLinuxV2,
    Dot1AD,
    Dot1Q,
    Ether,
    Loopback,
    LoopbackOpenBSD,
)
from scapy.packet import Raw

from appliance.capture.decode import (
    LINKTYPES,
    MAX_IPV6_EXT_HEADERS,
    MAX_VLAN_TAGS,
    decode_ethernet,
    decode_frame,
    decode_ip,
    decoder_for,
)
from appliance.core.events import TCP as TCP_PROTO
from appliance.core.events import UDP as UDP_PROTO
from appliance.core.events import Packet

TS = 1_700_000_000.25
SRC4, DST4 = "198.18.1.7", "10.0.0.1"
SRC6, DST6 = "2001:db8::7", "2001:db8:0:1::1"
ROUTERS = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")

SYN4 = Packet(TS, SRC4, DST4, TCP_PROTO, 7000, 0x02)
UDP4 = Packet(TS, SRC4, DST4, UDP_PROTO, 8000, 0, sport=40000)  # udp() sends from 40000
SYN6 = Packet(TS, SRC6, DST6, TCP_PROTO, 7000, 0x02)
UDP6 = Packet(TS, SRC6, DST6, UDP_PROTO, 8000, 0, sport=40000)


def b(pkt: Any) -> bytes:
    return bytes(pkt)


def ip4(**kw: Any) -> Any:
    return IP(src=SRC4, dst=DST4, **kw)


def ip6(**kw: Any) -> Any:
    return IPv6(src=SRC6, dst=DST6, **kw)


def syn() -> Any:
    return TCP(sport=40000, dport=7000, flags="S")


def udp() -> Any:
    return UDP(sport=40000, dport=8000)


# --------------------------------------------------------------------------- Ethernet, IPv4


def test_ethernet_ipv4_tcp_syn() -> None:
    assert decode_ethernet(b(ETH / ip4() / syn()), TS) == SYN4


def test_ethernet_ipv4_udp_has_no_flags_and_keeps_its_payload() -> None:
    assert decode_ethernet(b(ETH / ip4() / udp() / Raw(b"knock")), TS) == UDP4._replace(
        payload=b"knock"
    )


def test_udp_payload_ends_where_the_udp_length_says() -> None:
    frame = b(ETH / ip4() / udp() / Raw(b"spa"))
    decoded = decode_ethernet(frame + b"\x00" * 20, TS)
    assert decoded is not None and decoded.payload == b"spa"


@pytest.mark.parametrize(
    ("flags", "byte"),
    [("S", 0x02), ("SA", 0x12), ("F", 0x01), ("R", 0x04), ("PA", 0x18), ("U", 0x20), ("", 0)],
)
def test_tcp_flags_are_byte_13(flags: str, byte: int) -> None:
    frame = b(ETH / ip4() / TCP(dport=1, flags=flags))
    assert frame[14 + 20 + 13] == byte
    pkt = decode_ethernet(frame, TS)
    assert pkt is not None
    assert pkt.flags == byte


def test_tcp_flags_keep_ecn_bits() -> None:
    # An ECN-setup SYN: SYN|ECE|CWR. The whole byte is kept (documented choice).
    pkt = decode_ethernet(b(ETH / ip4() / TCP(dport=7000, flags="SEC")), TS)
    assert pkt == Packet(TS, SRC4, DST4, TCP_PROTO, 7000, 0xC2)


def test_tcp_options_do_not_matter() -> None:
    tcp = TCP(dport=7000, flags="S", options=[("MSS", 1460), ("WScale", 7), ("SAckOK", b"")])
    assert decode_ethernet(b(ETH / ip4() / tcp), TS) == SYN4


@pytest.mark.parametrize(
    "options",
    [
        [IPOption_NOP(), IPOption_NOP(), IPOption_NOP(), IPOption_NOP()],
        [IPOption_RR(routers=ROUTERS)],
    ],
)
def test_ipv4_options_are_skipped_by_ihl(options: list[Any]) -> None:
    frame = b(ETH / ip4(options=options) / syn())
    assert frame[14] & 0x0F > 5  # the IHL really is larger than 5
    assert decode_ethernet(frame, TS) == SYN4


def test_ipv4_ihl_below_5_is_malformed() -> None:
    frame = bytearray(b(ETH / ip4() / syn()))
    frame[14] = 0x44
    assert decode_ethernet(bytes(frame), TS) is None


def test_ipv4_ethertype_with_ipv6_inside_is_rejected() -> None:
    frame = b(Ether(type=0x0800) / ip6() / syn())
    assert decode_ethernet(frame, TS) is None


def test_ipv4_fragments_only_the_first_decodes() -> None:
    big = ip4(id=42) / UDP(sport=1, dport=8000) / Raw(b"x" * 2992)
    frags = fragment(big, fragsize=1000)  # type: ignore[no-untyped-call]
    assert len(frags) == 3
    decoded = [decode_ethernet(b(ETH / f), TS) for f in frags]
    assert decoded[1:] == [None, None]
    first = decoded[0]
    assert first is not None and first._replace(payload=b"", sport=40000) == UDP4
    assert first.sport == 1
    assert first.payload == b"x" * len(first.payload)  # what the first fragment carries


def test_ipv4_first_fragment_with_more_fragments_flag_decodes() -> None:
    assert decode_ethernet(b(ETH / ip4(flags="MF", frag=0) / syn()), TS) == SYN4


@pytest.mark.parametrize("frag", [1, 185, 0x1FFF])
def test_ipv4_non_first_fragment_is_ignored(frag: int) -> None:
    # Its bytes would look like a TCP header, but they are the middle of a payload.
    assert decode_ethernet(b(ETH / ip4(frag=frag) / syn()), TS) is None


def test_ipv4_dont_fragment_flag_is_not_a_fragment() -> None:
    assert decode_ethernet(b(ETH / ip4(flags="DF") / syn()), TS) == SYN4


@pytest.mark.parametrize(
    "payload",
    [ICMP(), ICMP(type=3, code=3) / ip4() / syn(), Raw(b"\x00" * 40)],
    ids=["icmp", "icmp-quoting-tcp", "raw"],
)
def test_ipv4_other_protocols_are_ignored(payload: Any) -> None:
    assert decode_ethernet(b(ETH / ip4() / payload), TS) is None


def test_ipv4_gre_is_ignored() -> None:
    assert decode_ethernet(b(ETH / ip4(proto=47) / Raw(b"\x00" * 40)), TS) is None


def test_non_ip_ethertypes_are_ignored() -> None:
    assert decode_ethernet(b(ETH / ARP()), TS) is None
    # An 802.3 frame: the type field is a length.
    assert decode_ethernet(b(Ether(type=46) / Raw(b"\x45" * 46)), TS) is None


def test_trailing_padding_is_harmless() -> None:
    frame = b(ETH / ip4() / udp())
    assert len(frame) == 42
    assert decode_ethernet(frame + b"\x00" * 18, TS) == UDP4


# --------------------------------------------------------------------------- VLAN


def test_single_vlan_tag() -> None:
    assert decode_ethernet(b(ETH / Dot1Q(vlan=10) / ip4() / syn()), TS) == SYN4
    assert decode_ethernet(b(ETH / Dot1Q(vlan=10) / ip6() / udp()), TS) == UDP6


def test_double_tag_802_1ad() -> None:
    frame = b(ETH / Dot1AD(vlan=100) / Dot1Q(vlan=200) / ip4() / syn())
    assert frame[12:14] == b"\x88\xa8" and frame[16:18] == b"\x81\x00"
    assert decode_ethernet(frame, TS) == SYN4


def test_double_tag_legacy_qinq_0x9100() -> None:
    frame = b(Ether(type=0x9100) / Dot1Q(vlan=100) / Dot1Q(vlan=200) / ip6() / syn())
    assert decode_ethernet(frame, TS) == SYN6


def test_vlan_tag_count_is_bounded() -> None:
    def stacked(n: int) -> bytes:
        pkt: Any = ETH
        for i in range(n):
            pkt = pkt / Dot1Q(vlan=i + 1)
        return b(pkt / ip4() / syn())

    assert decode_ethernet(stacked(MAX_VLAN_TAGS), TS) == SYN4
    assert decode_ethernet(stacked(MAX_VLAN_TAGS + 1), TS) is None


def test_vlan_with_non_ip_inside_is_ignored() -> None:
    assert decode_ethernet(b(ETH / Dot1Q(vlan=10) / ARP()), TS) is None


# --------------------------------------------------------------------------- IPv6


def test_ethernet_ipv6_tcp_and_udp() -> None:
    assert decode_ethernet(b(ETH / ip6() / syn()), TS) == SYN6
    assert decode_ethernet(b(ETH / ip6() / udp()), TS) == UDP6


@pytest.mark.parametrize(
    "address",
    [
        "2001:DB8:0:0:1:0:0:1",
        "2001:db8::",
        "fe80::1",
        "::1",
        "::",
        "::ffff:198.18.1.7",  # IPv4-mapped
        "::ffff:0:0",
        "::1.2.3.4",  # IPv4-compatible (deprecated), libc prints it dotted
        "::0.0.0.2",
        "::2:3:4",
        "64:ff9b::c612:107",
        "1:0:0:1:0:0:0:1",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    ],
)
def test_ipv6_addresses_are_what_ipaddress_prints(address: str) -> None:
    canonical = str(ipaddress.IPv6Address(address))
    pkt = decode_ethernet(b(ETH / IPv6(src=address, dst=address) / udp()), TS)
    assert pkt == Packet(TS, canonical, canonical, UDP_PROTO, 8000, 0, sport=40000)


@given(st.binary(min_size=16, max_size=16), st.binary(min_size=4, max_size=4))
def test_addresses_match_ipaddress_for_any_value(packed6: bytes, packed4: bytes) -> None:
    v6 = b(IPv6(src=str(ipaddress.IPv6Address(packed6)), dst=DST6) / udp())
    pkt = decode_ip(v6, TS)
    assert pkt is not None
    assert pkt.src == str(ipaddress.IPv6Address(packed6))
    v4 = b(IP(src=str(ipaddress.IPv4Address(packed4)), dst=DST4) / udp())
    pkt = decode_ip(v4, TS)
    assert pkt is not None
    assert pkt.src == str(ipaddress.IPv4Address(packed4))


@pytest.mark.parametrize(
    "chain",
    [
        [IPv6ExtHdrHopByHop()],
        [IPv6ExtHdrDestOpt()],
        [IPv6ExtHdrRouting(addresses=["2001:db8::a", "2001:db8::b"])],
        [IPv6ExtHdrFragment(offset=0, m=1, id=7)],
        [IPv6ExtHdrFragment(offset=0, m=0, id=7)],  # an atomic fragment
        [
            IPv6ExtHdrHopByHop(),
            IPv6ExtHdrDestOpt(),
            IPv6ExtHdrRouting(addresses=["2001:db8::a"]),
            IPv6ExtHdrFragment(offset=0, m=1),
            IPv6ExtHdrDestOpt(),
        ],
    ],
    ids=["hop-by-hop", "dest-opt", "routing", "first-fragment", "atomic-fragment", "chain"],
)
@pytest.mark.parametrize("l4", ["tcp", "udp"])
def test_ipv6_extension_headers_are_walked(chain: list[Any], l4: str) -> None:
    pkt: Any = ip6()
    for header in chain:
        pkt = pkt / header
    pkt = pkt / (syn() if l4 == "tcp" else udp())
    assert decode_ethernet(b(ETH / pkt), TS) == (SYN6 if l4 == "tcp" else UDP6)


def test_ipv6_padded_options_extension_length() -> None:
    # A 24-byte Hop-by-Hop header (hdr ext len 2): the length field is used.
    hbh = IPv6ExtHdrHopByHop(options=[PadN(optdata=b"\x00" * 20)])
    frame = b(ETH / ip6() / hbh / syn())
    assert frame[14 + 40 + 1] == 2  # hdr ext len: 24 bytes
    assert decode_ethernet(frame, TS) == SYN6


@pytest.mark.parametrize("offset", [1, 100, 0x1FFF])
def test_ipv6_non_first_fragment_is_ignored(offset: int) -> None:
    frame = b(ETH / ip6() / IPv6ExtHdrFragment(offset=offset, m=1) / syn())
    assert decode_ethernet(frame, TS) is None


def test_ipv6_authentication_header_uses_its_own_length_unit() -> None:
    # AH length is in 4-byte units minus 2: 12 + 12 bytes of ICV -> payloadlen 4.
    ah = AH(nh=6, payloadlen=4, spi=0x100, seq=1, icv=b"\x00" * 12)
    frame = b(ETH / ip6(nh=51) / ah / syn())
    assert decode_ethernet(frame, TS) == SYN6


@pytest.mark.parametrize(
    "payload",
    [
        ESP(spi=1, seq=1, data=b"\x00" * 32),
        ICMPv6EchoRequest(),
        IPv6ExtHdrDestOpt(nh=59),
    ],
    ids=["esp", "icmpv6", "no-next-header"],
)
def test_ipv6_stops_where_no_port_can_be_read(payload: Any) -> None:
    assert decode_ethernet(b(ETH / ip6() / payload / Raw(b"\x00" * 40)), TS) is None


def test_ipv6_no_next_header_is_ignored() -> None:
    assert decode_ethernet(b(ETH / ip6(nh=59) / Raw(b"\x00" * 40)), TS) is None


def test_ipv6_extension_chain_is_bounded() -> None:
    def chained(n: int) -> bytes:
        pkt: Any = ip6()
        for _ in range(n):
            pkt = pkt / IPv6ExtHdrDestOpt()
        return b(ETH / pkt / syn())

    assert decode_ethernet(chained(MAX_IPV6_EXT_HEADERS), TS) == SYN6
    assert decode_ethernet(chained(MAX_IPV6_EXT_HEADERS + 1), TS) is None


def test_ipv6_ethertype_with_ipv4_inside_is_rejected() -> None:
    assert decode_ethernet(b(Ether(type=0x86DD) / ip4() / syn()), TS) is None


# --------------------------------------------------------------------------- decode_ip


def test_decode_ip_at_offset() -> None:
    prefix = b"\xee" * 7
    assert decode_ip(prefix + b(ip4() / syn()), TS, offset=7) == SYN4
    assert decode_ip(prefix + b(ip6() / udp()), TS, offset=7) == UDP6


def test_decode_ip_version_nibble_decides() -> None:
    assert decode_ip(b(ip4() / syn()), TS) == SYN4
    assert decode_ip(b(ip6() / syn()), TS) == SYN6
    frame = bytearray(b(ip4() / syn()))
    frame[0] = 0x55
    assert decode_ip(bytes(frame), TS) is None


@pytest.mark.parametrize("offset", [-1, -40, 10_000])
def test_decode_ip_bad_offset(offset: int) -> None:
    assert decode_ip(b(ip4() / syn()), TS, offset=offset) is None


# --------------------------------------------------------------------------- link types

RAW4 = b(ip4() / syn())
RAW6 = b(ip6() / syn())

# (linktype, frame, expected): every supported link type, IPv4 and IPv6.
VALID: list[tuple[int, bytes, Packet]] = [
    (1, b(ETH / ip4() / syn()), SYN4),
    (1, b(ETH / ip6() / udp()), UDP6),
    (1, b(ETH / Dot1Q(vlan=3) / ip4() / udp()), UDP4),
    (1, b(ETH / Dot1AD(vlan=3) / Dot1Q(vlan=4) / ip6() / syn()), SYN6),
    (1, b(ETH / ip6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment() / syn()), SYN6),
    (1, b(ETH / ip4(options=[IPOption_RR(routers=["192.0.2.1"])]) / syn()), SYN4),
    (113, b(CookedLinux(pkttype=0, lladdrlen=6, src=b"\x02" * 6) / ip4() / syn()), SYN4),
    (113, b(CookedLinux() / ip6() / udp()), UDP6),
    (113, b(CookedLinux() / Dot1Q(vlan=7) / ip4() / udp()), UDP4),
    (276, b(CookedLinuxV2(ifindex=3, lladdrlen=6, src=b"\x02" * 6) / ip4() / syn()), SYN4),
    (276, b(CookedLinuxV2() / ip6() / udp()), UDP6),
    (276, b(CookedLinuxV2() / Dot1Q(vlan=7) / ip6() / syn()), SYN6),
    (101, RAW4, SYN4),
    (101, RAW6, SYN6),
    (12, RAW4, SYN4),
    (12, RAW6, SYN6),
    (14, RAW4, SYN4),
    (14, RAW6, SYN6),
    (228, RAW4, SYN4),
    (229, RAW6, SYN6),
    (0, b(Loopback(type=2) / ip4() / syn()), SYN4),
    (0, b(Loopback(type=10) / ip6() / syn()), SYN6),
    (0, b(Loopback(type=24) / ip6() / udp()), UDP6),
    (0, b(Loopback(type=28) / ip6() / syn()), SYN6),
    (0, b(Loopback(type=30) / ip6() / udp()), UDP6),
    # Written by a host of the other byte order (big-endian family).
    (0, b(LoopbackOpenBSD(type=2) / ip4() / udp()), UDP4),
    (0, b(LoopbackOpenBSD(type=30) / ip6() / syn()), SYN6),
    (108, b(LoopbackOpenBSD(type=2) / ip4() / syn()), SYN4),
    (108, b(LoopbackOpenBSD(type=24) / ip6() / udp()), UDP6),
]
VALID_IDS = [f"{lt}-{i}" for i, (lt, _f, _p) in enumerate(VALID)]


def test_every_link_type_is_covered() -> None:
    assert {lt for lt, _f, _p in VALID} == LINKTYPES


@pytest.mark.parametrize(("linktype", "frame", "expected"), VALID, ids=VALID_IDS)
def test_decode_frame(linktype: int, frame: bytes, expected: Packet) -> None:
    assert decode_frame(linktype, frame, TS) == expected
    decoder = decoder_for(linktype)
    assert decoder is not None
    assert decoder(frame, TS) == expected


def test_loopback_header_layouts() -> None:
    # Pin scapy's encodings the table above relies on.
    assert b(Loopback(type=30))[:4] == b"\x1e\x00\x00\x00"
    assert b(LoopbackOpenBSD(type=30))[:4] == b"\x00\x00\x00\x1e"
    assert b(CookedLinux() / ip4())[14:16] == b"\x08\x00"
    assert b(CookedLinuxV2() / ip4())[0:2] == b"\x08\x00"


@pytest.mark.parametrize(
    ("linktype", "frame"),
    [
        (228, RAW6),  # IPv6 on the IPv4-only link type
        (229, RAW4),
        (0, b(Loopback(type=7) / ip4() / syn())),  # an unknown family
        (108, b(Loopback(type=2) / ip4() / syn())),  # little-endian family on LOOP
        (113, b(CookedLinux(proto=0x0806) / ARP())),
        (276, b(CookedLinuxV2(proto=0x0004) / Raw(b"\x45" * 40))),
        (1, RAW4),  # raw IP read as Ethernet
    ],
)
def test_decode_frame_mismatches_give_none(linktype: int, frame: bytes) -> None:
    assert decode_frame(linktype, frame, TS) is None


@pytest.mark.parametrize("linktype", [-1, 2, 105, 127, 147, 65535])
def test_unknown_link_type(linktype: int) -> None:
    assert decoder_for(linktype) is None
    assert decode_frame(linktype, b(ETH / ip4() / syn()), TS) is None


# --------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(("linktype", "frame", "expected"), VALID, ids=VALID_IDS)
def test_every_truncation_gives_none(linktype: int, frame: bytes, expected: Packet) -> None:
    # The frames end with their L4 header, so every strict prefix lacks part of it.
    for n in range(len(frame)):
        assert decode_frame(linktype, frame[:n], TS) is None, n
    assert decode_frame(linktype, frame, TS) == expected
    assert decode_frame(linktype, frame + b"\xff" * 9, TS) == expected


def test_truncated_fragment_and_ah_chains() -> None:
    ah = AH(nh=17, payloadlen=4, spi=1, icv=b"\x00" * 12)
    for frame in [
        b(ETH / ip6(nh=51) / ah / udp()),
        b(ETH / ip6() / IPv6ExtHdrFragment(offset=0) / IPv6ExtHdrRouting() / udp()),
    ]:
        for n in range(len(frame)):
            assert decode_ethernet(frame[:n], TS) is None
        assert decode_ethernet(frame, TS) == UDP6


def _check(result: Packet | None) -> None:
    if result is not None:
        assert isinstance(result, Packet)
        assert result.proto in (TCP_PROTO, UDP_PROTO)
        assert 0 <= result.dport <= 0xFFFF
        assert 0 <= result.flags <= 0xFF
        ipaddress.ip_address(result.src)
        ipaddress.ip_address(result.dst)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(LINKTYPES)), st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(linktype: int, data: bytes) -> None:
    _check(decode_frame(linktype, data, TS))


@settings(max_examples=500)
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(min_value=0, max_value=200), st.integers(0, 255)), max_size=6),
    st.integers(min_value=0, max_value=200),
)
def test_mutated_valid_frames_never_raise(
    case: tuple[int, bytes, Packet], edits: list[tuple[int, int]], cut: int
) -> None:
    linktype, frame, _expected = case
    data = bytearray(frame)
    for pos, value in edits:
        if pos < len(data):
            data[pos] = value
    _check(decode_frame(linktype, bytes(data[: len(data) - cut % (len(data) + 1)]), TS))


@settings(max_examples=300)
@given(
    st.sampled_from([b"\x00", b"\x2b", b"\x3c", b"\x2c", b"\x33"]),
    st.binary(max_size=120),
)
def test_hostile_ipv6_extension_chains_never_raise(first: bytes, rest: bytes) -> None:
    header = bytearray(b(ip6()))
    header[6] = first[0]
    _check(decode_ip(bytes(header) + rest, TS))


# --------------------------------------------------------------------------- against scapy

ports = st.integers(min_value=0, max_value=0xFFFF)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    v6=st.booleans(),
    tcp=st.booleans(),
    dport=ports,
    flags=st.integers(min_value=0, max_value=0xFF),
    vlans=st.integers(min_value=0, max_value=2),
    src4=st.ip_addresses(v=4),
    src6=st.ip_addresses(v=6),
)
def test_agrees_with_scapy(
    v6: bool,
    tcp: bool,
    dport: int,
    flags: int,
    vlans: int,
    src4: ipaddress.IPv4Address,
    src6: ipaddress.IPv6Address,
) -> None:
    src = str(src6 if v6 else src4)
    l3 = IPv6(src=src, dst=DST6) if v6 else IP(src=src, dst=DST4)
    l4 = TCP(sport=1, dport=dport, flags=flags) if tcp else UDP(sport=1, dport=dport)
    pkt: Any = ETH
    for i in range(vlans):
        pkt = pkt / Dot1Q(vlan=i + 1)
    frame = b(pkt / l3 / l4)
    parsed = Ether(frame)
    layer = parsed[TCP] if tcp else parsed[UDP]
    expected_src = parsed[IPv6].src if v6 else parsed[IP].src
    decoded = decode_ethernet(frame, TS)
    assert decoded == Packet(
        TS,
        str(ipaddress.ip_address(expected_src)),
        DST6 if v6 else DST4,
        TCP_PROTO if tcp else UDP_PROTO,
        layer.dport,
        int(layer.flags) if tcp else 0,
        sport=0 if tcp else layer.sport,
    )
    assert decoded is not None and decoded.src == src


def test_struct_layout_sanity() -> None:
    # The decoder reads the destination port at bytes 2-3 of the L4 header.
    frame = b(ip4() / syn())
    assert struct.unpack_from("!H", frame, 22) == (7000,)
