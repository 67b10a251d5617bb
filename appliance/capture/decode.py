"""Raw link-layer bytes to :class:`~appliance.core.events.Packet`: the hot path.

Decode at the edge: every captured frame passes through here (tens of thousands per
second), so this module reads fixed offsets with precompiled :mod:`struct` formats and
never builds a dissection tree. Standard library only, no state, no I/O.

Contract: every public function returns a :class:`Packet` for a TCP or UDP packet
whose L4 header is fully present, and ``None`` for anything else (another protocol,
a non-first fragment, a truncated or malformed frame). They never raise on any input:
the private helpers let :class:`struct.error` / :class:`IndexError` escape on short
data and the public entry points turn that into ``None``.

Choices:

* ``flags`` is the whole TCP flags byte (byte 13 of the TCP header, low 8 bits, so ECE
  and CWR are kept). Door filters only test the six classic bits (FIN..URG), so an
  ECN-setup SYN (0xC2) still matches ``syn,!ack``.
* The L4 header must be complete in the captured bytes (20 bytes for TCP, 8 for UDP).
  A UDP packet carries its payload (an SPA packet is read from it); TCP's is not kept.
  Length fields (IPv4 total length, IPv6 payload length) and checksums are not
  checked: trailing Ethernet padding and the zeroed lengths of TSO/GRO captures are
  harmless, and the decoder only needs the header it reads.
* Addresses are in the form :mod:`ipaddress` prints (the contract of ``Packet``).
  ``socket.inet_ntoa`` / ``inet_ntop`` give exactly that, except for IPv6 addresses in
  ``::/80`` (IPv4-compatible and IPv4-mapped, which libc prints in dotted form): those
  go through :class:`ipaddress.IPv6Address`.
* VLAN tags (802.1Q 0x8100, 802.1ad 0x88A8, legacy QinQ 0x9100) are skipped, up to
  :data:`MAX_VLAN_TAGS`; IPv6 extension headers are walked up to
  :data:`MAX_IPV6_EXT_HEADERS`, so hostile input cannot make a loop run long.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from ipaddress import IPv6Address
from socket import AF_INET6, inet_ntoa, inet_ntop
from typing import Final

from appliance.core.events import TCP, UDP, Packet

__all__ = [
    "LINKTYPES",
    "MAX_IPV6_EXT_HEADERS",
    "MAX_VLAN_TAGS",
    "Decoder",
    "decode_ethernet",
    "decode_frame",
    "decode_ip",
    "decoder_for",
]

Decoder = Callable[[bytes, float], Packet | None]
"""``decoder(frame, ts)``: what :func:`decoder_for` returns."""

MAX_VLAN_TAGS: Final = 8
MAX_IPV6_EXT_HEADERS: Final = 10

# EtherTypes.
_ETH_IPV4: Final = 0x0800
_ETH_IPV6: Final = 0x86DD
_ETH_VLAN: Final = frozenset({0x8100, 0x88A8, 0x9100})

# IP protocol numbers.
_IPPROTO_TCP: Final = 6
_IPPROTO_UDP: Final = 17
_IPV6_EXT_GENERIC: Final = frozenset({0, 43, 60})  # hop-by-hop, routing, dest. options
_IPV6_EXT_FRAGMENT: Final = 44
_IPV6_EXT_AH: Final = 51

# BSD loopback (NULL / LOOP) address families that mean IPv6 (Linux, NetBSD/OpenBSD,
# FreeBSD, macOS); 2 is AF_INET everywhere.
_AF_INET: Final = 2
_AF_INET6_ALL: Final = frozenset({10, 24, 28, 30})

_U16: Final = struct.Struct("!H").unpack_from
_U32_BE: Final = struct.Struct(">I").unpack_from
_U32_LE: Final = struct.Struct("<I").unpack_from
# IPv4: version/IHL, (tos, total length, id), flags/fragment offset, (ttl), protocol,
# (checksum), source, destination: 20 bytes.
_IPV4_HEADER: Final = struct.Struct("!B5xHxB2x4s4s").unpack_from
# IPv6: version/traffic class, (flow label, payload length), next header, (hop limit),
# source, destination: 40 bytes.
_IPV6_HEADER: Final = struct.Struct("!B5xBx16s16s").unpack_from
# TCP: destination port and flags byte (13), sized as the minimal 20-byte header.
_TCP_HEADER: Final = struct.Struct("!2xH9xB6x").unpack_from
# UDP: destination port and length, sized as the 8-byte header.
_UDP_HEADER: Final = struct.Struct("!HHH2x").unpack_from  # sport, dport, length

_V4_IN_V6_PREFIX: Final = bytes(10)

_MALFORMED: Final = (struct.error, IndexError)


def _ntop6(packed: bytes) -> str:
    if packed[:10] == _V4_IN_V6_PREFIX:
        return str(IPv6Address(packed))
    return inet_ntop(AF_INET6, packed)


def _payload(data: bytes, off: int, length: int) -> bytes:
    """A UDP payload: as long as the UDP header says (Ethernet padding is not part of
    it), or everything captured when the length is unusable (0 under UDP GSO)."""
    if length >= 8:
        return data[off + 8 : off + length]
    return data[off + 8 :]


# --------------------------------------------------------------------------- layer 3/4
# The helpers below raise struct.error or IndexError on short input; callers catch.


def _ipv4(data: bytes, ts: float, off: int) -> Packet | None:
    vihl, frag, proto, src, dst = _IPV4_HEADER(data, off)
    ihl = vihl & 0x0F
    if vihl >> 4 != 4 or ihl < 5 or frag & 0x1FFF:
        # Not IPv4, a header shorter than 20 bytes, or a non-first fragment.
        return None
    off += ihl * 4
    if proto == _IPPROTO_TCP:
        dport, flags = _TCP_HEADER(data, off)
        return Packet(ts, inet_ntoa(src), inet_ntoa(dst), TCP, dport, flags)
    if proto == _IPPROTO_UDP:
        sport, dport, length = _UDP_HEADER(data, off)
        payload = _payload(data, off, length)
        return Packet(ts, inet_ntoa(src), inet_ntoa(dst), UDP, dport, 0, payload, sport)
    return None


def _ipv6(data: bytes, ts: float, off: int) -> Packet | None:
    version, nh, src, dst = _IPV6_HEADER(data, off)
    if version >> 4 != 6:
        return None
    off += 40
    for _ in range(MAX_IPV6_EXT_HEADERS + 1):
        if nh == _IPPROTO_TCP:
            dport, flags = _TCP_HEADER(data, off)
            return Packet(ts, _ntop6(src), _ntop6(dst), TCP, dport, flags)
        if nh == _IPPROTO_UDP:
            sport, dport, length = _UDP_HEADER(data, off)
            payload = _payload(data, off, length)
            return Packet(ts, _ntop6(src), _ntop6(dst), UDP, dport, 0, payload, sport)
        if nh in _IPV6_EXT_GENERIC:
            nh, size = data[off], data[off + 1]
            off += (size + 1) * 8
        elif nh == _IPV6_EXT_FRAGMENT:
            nh = data[off]
            if _U16(data, off + 2)[0] & 0xFFF8:
                return None  # a non-first fragment: no L4 header
            off += 8
        elif nh == _IPV6_EXT_AH:
            nh, size = data[off], data[off + 1]
            off += (size + 2) * 4
        else:
            return None  # ESP (50), no next header (59), ICMPv6, anything else
    return None


def _ip(data: bytes, ts: float, off: int) -> Packet | None:
    version = data[off] >> 4
    if version == 4:
        return _ipv4(data, ts, off)
    if version == 6:
        return _ipv6(data, ts, off)
    return None


def _ethertype(data: bytes, ts: float, ethertype: int, off: int) -> Packet | None:
    """Decode the payload at ``off`` of an EtherType, skipping VLAN tags."""
    if ethertype in _ETH_VLAN:
        for _ in range(MAX_VLAN_TAGS):
            # A tag is TCI (2 bytes) then the next EtherType (2 bytes).
            ethertype = _U16(data, off + 2)[0]
            off += 4
            if ethertype not in _ETH_VLAN:
                break
        else:
            return None
    if ethertype == _ETH_IPV4:
        return _ipv4(data, ts, off)
    if ethertype == _ETH_IPV6:
        return _ipv6(data, ts, off)
    return None


# --------------------------------------------------------------------------- public API


def decode_ethernet(data: bytes, ts: float) -> Packet | None:
    """Decode an Ethernet II frame (with any VLAN tags) carrying IPv4 or IPv6."""
    try:
        return _ethertype(data, ts, _U16(data, 12)[0], 14)
    except _MALFORMED:
        return None


def decode_ip(data: bytes, ts: float, offset: int = 0) -> Packet | None:
    """Decode a raw IPv4 or IPv6 packet starting at ``offset`` (the version nibble decides)."""
    if offset < 0:
        return None
    try:
        return _ip(data, ts, offset)
    except _MALFORMED:
        return None


def _decode_raw_ip(data: bytes, ts: float) -> Packet | None:
    try:
        return _ip(data, ts, 0)
    except _MALFORMED:
        return None


def _decode_ipv4(data: bytes, ts: float) -> Packet | None:
    try:
        return _ipv4(data, ts, 0)
    except _MALFORMED:
        return None


def _decode_ipv6(data: bytes, ts: float) -> Packet | None:
    try:
        return _ipv6(data, ts, 0)
    except _MALFORMED:
        return None


def _decode_sll(data: bytes, ts: float) -> Packet | None:
    # Linux cooked v1: 16-byte header, protocol (an EtherType) at bytes 14-15.
    try:
        return _ethertype(data, ts, _U16(data, 14)[0], 16)
    except _MALFORMED:
        return None


def _decode_sll2(data: bytes, ts: float) -> Packet | None:
    # Linux cooked v2: 20-byte header, protocol (an EtherType) at bytes 0-1.
    try:
        return _ethertype(data, ts, _U16(data, 0)[0], 20)
    except _MALFORMED:
        return None


def _loopback_family(family: int, data: bytes, ts: float) -> Packet | None:
    if family == _AF_INET:
        return _ipv4(data, ts, 4)
    if family in _AF_INET6_ALL:
        return _ipv6(data, ts, 4)
    return None


def _decode_null(data: bytes, ts: float) -> Packet | None:
    # BSD loopback: a 4-byte address family in the byte order of the host that wrote
    # the capture. Families are small numbers, so a value with high bits set was
    # written by a host of the other byte order (libpcap does the same).
    try:
        family = _U32_LE(data, 0)[0]
        if family > 0xFFFF:
            family = _U32_BE(data, 0)[0]
        return _loopback_family(family, data, ts)
    except _MALFORMED:
        return None


def _decode_loop(data: bytes, ts: float) -> Packet | None:
    # OpenBSD loopback: the same 4-byte family, always in network byte order.
    try:
        return _loopback_family(_U32_BE(data, 0)[0], data, ts)
    except _MALFORMED:
        return None


_DECODERS: Final[dict[int, Decoder]] = {
    1: decode_ethernet,  # LINKTYPE_ETHERNET
    113: _decode_sll,  # LINKTYPE_LINUX_SLL
    276: _decode_sll2,  # LINKTYPE_LINUX_SLL2
    101: _decode_raw_ip,  # LINKTYPE_RAW
    12: _decode_raw_ip,  # DLT_RAW as some systems write it
    14: _decode_raw_ip,  # DLT_RAW on OpenBSD
    228: _decode_ipv4,  # LINKTYPE_IPV4
    229: _decode_ipv6,  # LINKTYPE_IPV6
    0: _decode_null,  # LINKTYPE_NULL (BSD loopback, host byte order)
    108: _decode_loop,  # LINKTYPE_LOOP (OpenBSD loopback, network byte order)
}

LINKTYPES: Final = frozenset(_DECODERS)
"""The pcap link types :func:`decode_frame` understands."""


def decoder_for(linktype: int) -> Decoder | None:
    """The decoder for one pcap link type, or ``None`` if it is not supported.

    A capture loop looks this up once per interface and then calls it per frame,
    which saves the dispatch of :func:`decode_frame` on every packet.
    """
    return _DECODERS.get(linktype)


def decode_frame(linktype: int, data: bytes, ts: float) -> Packet | None:
    """Decode a frame of pcap link type ``linktype``; ``None`` for an unknown link type."""
    decoder = _DECODERS.get(linktype)
    if decoder is None:
        return None
    return decoder(data, ts)
