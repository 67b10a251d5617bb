"""Would the host's own stack take this frame? Checksums and the other cheap receive checks.

An AF_PACKET socket sees frames before the kernel's IP, TCP and UDP code has looked at
them, so it also sees what that code drops: a wrong IPv4 header checksum, a wrong TCP
or UDP checksum, a frame addressed to another MAC, a truncated packet. Conntrack and
the nftables scan detector never see those (``ct state new`` does not match them), so
a sweep sent with bad checksums (``nmap --badsum``) would complete a door without ever
being held off as a scanner. :func:`drop_reason` says whether, and why, the host drops
a captured frame; the sniffer asks it only for frames that passed the kernel BPF filter
and decoded to a TCP or UDP :class:`~appliance.core.events.Packet`.

The checks mirror Linux 6.x (``ip_rcv_core``, ``ip_route_input_slow``, ``ip6_rcv_core``,
``ip6_input_finish``, ``tcp_v4_rcv``/``tcp_v6_rcv``, ``__udp4_lib_rcv``/``udpv6_rcv``):

* IPv4 header checksum: always verified here (the kernel always does it in software).
* TCP and UDP checksums (with the pseudo-header): trusted when the kernel says so in the
  packet socket's auxiliary data (``tpacket_auxdata.tp_status``):
  ``TP_STATUS_CSUMNOTREADY`` (``CHECKSUM_PARTIAL``: a locally generated packet, e.g.
  over a veth, whose checksum field holds only the pseudo-header sum, so a software
  check would wrongly fail) or ``TP_STATUS_CSUM_VALID`` (``skb_csum_unnecessary``: the
  NIC or GRO verified it; an unverified ``CHECKSUM_COMPLETE`` no longer counts since
  commit b85f628aa158, Linux 6.1 and 5.15.82). Otherwise verified here. A UDP checksum
  of 0 means "none" over IPv4 and is invalid over IPv6 (RFC 8200 8.1).
* Lengths: an IPv4 total length (IPv6 payload length) beyond what arrived, or shorter
  than its own header; a TCP data offset below 5 or beyond the segment; a UDP length
  below 8 or beyond the IP payload. A zero IPv4 total length / IPv6 payload length is
  accepted only for a GSO TCP packet (BIG TCP, ``TP_STATUS_GSO_TCP``), as the kernel does.
* ``PACKET_OTHERHOST`` frames (another MAC, seen on a promiscuous interface such as a
  bridge port), and TCP in a link-layer broadcast or multicast frame (``tcp_v4_rcv``
  drops any TCP segment that is not ``PACKET_HOST``).
* Fragments: a first fragment with more-fragments set (the kernel reassembles it before
  any checksum check; knocks are never fragmented); non-first fragments never decode.
* Martian addresses: IPv4 sources in 0/8, 127/8, 224/4 or 255.255.255.255, destinations
  in 0/8 or 127/8; IPv6 multicast or v4-mapped sources, ``::1`` either way. On a
  loopback interface only the IPv6 source checks apply (traffic there skips the input
  route lookup, and ``::1`` is checked only on other devices).
* IPv6 headers: hop-by-hop options anywhere but first, a routing header with segments
  left (the packet is for another node), and AH (the kernel drops it unless an IPsec
  SA verifies it, which the capture cannot do).

Left out (documented, not mirrored): reverse-path filtering and a source that is one of
the host's own addresses (both need the routing table), IPv4 option parsing and source
routing, hop-by-hop/destination option contents, per-socket choices (UDP-Lite coverage,
``UDP_NO_CHECK6_RX``), IPsec policy, and netfilter rules other than knockgate's own.

Standard library only, no state, never raises: a frame it cannot read is malformed.
"""

from __future__ import annotations

import struct
from typing import Final

from appliance.capture.decode import MAX_IPV6_EXT_HEADERS, MAX_VLAN_TAGS

__all__ = [
    "BAD_CHECKSUM",
    "FRAGMENT",
    "MALFORMED",
    "MARTIAN",
    "NOT_FOR_HOST",
    "REASONS",
    "TP_STATUS_CSUMNOTREADY",
    "TP_STATUS_CSUM_VALID",
    "TP_STATUS_GSO_TCP",
    "drop_reason",
    "internet_checksum",
    "ones_complement_sum",
]

# tpacket_auxdata.tp_status bits (linux/if_packet.h).
TP_STATUS_CSUMNOTREADY: Final = 0x08
TP_STATUS_CSUM_VALID: Final = 0x80
TP_STATUS_GSO_TCP: Final = 0x100
_L4_TRUSTED: Final = TP_STATUS_CSUMNOTREADY | TP_STATUS_CSUM_VALID

# sockaddr_ll.sll_pkttype.
PACKET_HOST: Final = 0
PACKET_OTHERHOST: Final = 3

# Why a frame is dropped; each is also the name of its counter in ``knockgate status``.
BAD_CHECKSUM: Final = "bad_checksums"
NOT_FOR_HOST: Final = "not_for_host"
FRAGMENT: Final = "fragments"
MALFORMED: Final = "malformed_frames"  # not "malformed": the engine has a counter of that name
MARTIAN: Final = "martians"
REASONS: Final = (BAD_CHECKSUM, NOT_FOR_HOST, FRAGMENT, MALFORMED, MARTIAN)

_ETH_IPV4: Final = 0x0800
_ETH_IPV6: Final = 0x86DD
_ETH_VLAN: Final = frozenset({0x8100, 0x88A8, 0x9100})
_TCP: Final = 6
_UDP: Final = 17
_HOP_BY_HOP: Final = 0
_ROUTING: Final = 43
_FRAGMENT: Final = 44
_DEST_OPTS: Final = 60

_U16: Final = struct.Struct("!H").unpack_from
# IPv4 version/IHL (0), total length (2), flags + fragment offset (6), protocol (9),
# source (12) and destination (16) as numbers.
_IPV4_HEADER: Final = struct.Struct("!BxH2xHxB2xII").unpack_from
_MARTIAN4_SRC: Final = frozenset({0, 127, *range(224, 240)})  # first octets; and 255.255.255.255
_MARTIAN4_DST: Final = frozenset({0, 127})
# IPv6 payload length (4), next header (6).
_IPV6_FIELDS: Final = struct.Struct("!4xHB").unpack_from
_LOOPBACK6: Final = bytes(15) + b"\x01"
_V4_MAPPED: Final = bytes(10) + b"\xff\xff"

_from_bytes = int.from_bytes


def ones_complement_sum(data: bytes) -> int:
    """The 16-bit ones' complement sum of ``data`` (big-endian words, an odd length
    padded with a zero byte), folded: 0 only for all-zero data, else 1..0xFFFF.

    Since 2**16 == 1 (mod 0xFFFF), the sum of the words is the whole buffer read as one
    big integer, modulo 0xFFFF: one C-level conversion instead of a loop over words.
    """
    value = _from_bytes(data, "big") << (8 * (len(data) & 1))
    if value == 0:
        return 0
    return value % 0xFFFF or 0xFFFF


def internet_checksum(data: bytes) -> int:
    """The RFC 1071 checksum of ``data`` (what goes into the field, computed over the
    data with the field zeroed)."""
    return ~ones_complement_sum(data) & 0xFFFF


def _sums_to_zero(data: bytes, pseudo: int) -> bool:
    """Whether ``data`` (checksum field included) plus the pseudo-header sum ``pseudo``
    verifies: its ones' complement sum is 0xFFFF, i.e. 0 modulo 0xFFFF. ``pseudo`` is
    never 0 (it holds the protocol number), so an all-zero sum cannot pass."""
    return ((_from_bytes(data, "big") << (8 * (len(data) & 1))) + pseudo) % 0xFFFF == 0


def _l4(
    frame: bytes, l4: int, end: int, proto: int, pseudo: int, status: int, pkttype: int, v6: bool
) -> str | None:
    """The TCP or UDP checks of the segment ``frame[l4:end]``; ``pseudo`` is the sum of
    the pseudo-header's addresses."""
    length = end - l4
    if proto == _TCP:
        if pkttype != PACKET_HOST:
            return NOT_FOR_HOST
        if length < 20:
            return MALFORMED
        offset = frame[l4 + 12] >> 4
        if offset < 5 or offset * 4 > length:
            return MALFORMED
        if status & _L4_TRUSTED:
            return None
        if end > len(frame):
            return MALFORMED  # not all captured: cannot be shown valid
        return None if _sums_to_zero(frame[l4:end], pseudo + _TCP + length) else BAD_CHECKSUM
    if proto == _UDP:
        if length < 8:
            return MALFORMED
        udp_length = _U16(frame, l4 + 4)[0]
        if udp_length == 0 and v6:
            udp_length = length  # a jumbogram's UDP length (RFC 2675)
        if udp_length < 8 or udp_length > length:
            return MALFORMED
        if _U16(frame, l4 + 6)[0] == 0:  # "no checksum": fine over IPv4 only (RFC 8200 8.1),
            return BAD_CHECKSUM if v6 else None  # whatever the status says (udpv6_rcv)
        if status & _L4_TRUSTED:
            return None
        end = l4 + udp_length  # bytes past the UDP length are not part of the datagram
        if end > len(frame):
            return MALFORMED
        valid = _sums_to_zero(frame[l4:end], pseudo + _UDP + udp_length)
        return None if valid else BAD_CHECKSUM
    return MALFORMED  # the decoder passes only TCP and UDP


def _ipv4(
    frame: bytes, off: int, available: int, status: int, pkttype: int, loopback: bool
) -> str | None:
    first, total, fragment, proto, src, dst = _IPV4_HEADER(frame, off)
    header = (first & 0x0F) << 2
    if first >> 4 != 4 or header < 20 or off + header > len(frame):
        return MALFORMED
    if _from_bytes(frame[off : off + header], "big") % 0xFFFF:
        return BAD_CHECKSUM  # the header's words, checksum included, must sum to 0xFFFF
    if fragment & 0x3FFF:  # more fragments, or an offset
        return FRAGMENT
    if total == 0 and status & TP_STATUS_GSO_TCP:
        total = available  # BIG TCP: the length is the skb's
    if total > available or total < header:
        return MALFORMED
    if not loopback and (
        src >> 24 in _MARTIAN4_SRC or src == 0xFFFFFFFF or dst >> 24 in _MARTIAN4_DST
    ):
        return MARTIAN  # ip_route_input_slow's martian source/destination
    # src and dst as 32-bit numbers are each congruent to the sum of their two words.
    return _l4(frame, off + header, off + total, proto, src + dst, status, pkttype, False)


def _ipv6(
    frame: bytes, off: int, available: int, status: int, pkttype: int, loopback: bool
) -> str | None:
    if frame[off] >> 4 != 6 or off + 40 > len(frame):
        return MALFORMED
    payload, nh = _IPV6_FIELDS(frame, off)
    src = frame[off + 8 : off + 24]
    if src[0] == 0xFF or src[:12] == _V4_MAPPED:
        return MARTIAN  # ip6_rcv_core (multicast), tcp_v6_conn_request (v4-mapped)
    if not loopback and (src == _LOOPBACK6 or frame[off + 24 : off + 40] == _LOOPBACK6):
        return MARTIAN
    if payload == 0 and status & TP_STATUS_GSO_TCP:
        payload = available - 40
    if payload == 0 or 40 + payload > available:
        return MALFORMED  # 0: no upper layer, or a jumbogram (not a knock)
    end = off + 40 + payload
    cur = off + 40
    for _ in range(MAX_IPV6_EXT_HEADERS + 1):
        if nh in (_TCP, _UDP):
            if cur > end:
                return MALFORMED
            pseudo = _from_bytes(frame[off + 8 : off + 40], "big")
            return _l4(frame, cur, end, nh, pseudo, status, pkttype, True)
        if nh == _HOP_BY_HOP and cur != off + 40:
            return MALFORMED  # RFC 8200: only right after the IPv6 header
        if nh in (_HOP_BY_HOP, _DEST_OPTS, _ROUTING):
            if nh == _ROUTING and frame[cur + 3]:
                return NOT_FOR_HOST  # segments left: this node is not the destination
            nh, size = frame[cur], frame[cur + 1]
            cur += (size + 1) * 8
        elif nh == _FRAGMENT:
            if _U16(frame, cur + 2)[0] & 0xFFF9:  # an offset, or more fragments
                return FRAGMENT
            nh = frame[cur]
            cur += 8  # an atomic fragment (RFC 6946) is taken as it is
        else:
            return MALFORMED  # AH (no SA to verify it with), ESP, anything else
    return MALFORMED


def drop_reason(
    frame: bytes,
    wire_length: int,
    status: int,
    pkttype: int = PACKET_HOST,
    loopback: bool = False,
) -> str | None:
    """Why the host's stack would drop this captured Ethernet frame (one of
    :data:`REASONS`), or ``None`` when it would take it.

    ``frame`` is what the capture holds (it may be cut short), ``wire_length`` the
    frame's real length (``tp_len``), ``status`` the kernel's ``tp_status`` and
    ``pkttype`` the ``sll_pkttype`` of the frame; ``loopback`` says it came in on a
    loopback device. A frame that is neither IPv4 nor IPv6, or that cannot be read, is
    :data:`MALFORMED` (fail closed).
    """
    if pkttype == PACKET_OTHERHOST:
        return NOT_FOR_HOST
    try:
        ethertype, off = _U16(frame, 12)[0], 14
        if ethertype in _ETH_VLAN:
            for _ in range(MAX_VLAN_TAGS):
                ethertype = _U16(frame, off + 2)[0]
                off += 4
                if ethertype not in _ETH_VLAN:
                    break
            else:
                return MALFORMED
        if ethertype == _ETH_IPV4:
            return _ipv4(frame, off, wire_length - off, status, pkttype, loopback)
        if ethertype == _ETH_IPV6:
            return _ipv6(frame, off, wire_length - off, status, pkttype, loopback)
    except (struct.error, IndexError):
        pass
    return MALFORMED
