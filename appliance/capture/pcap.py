"""Read capture files: classic pcap and pcapng, standard library only.

:func:`read_capture` streams ``(timestamp, linktype, frame)`` records from a file
that tcpdump, Wireshark or scapy wrote; :mod:`appliance.capture.decode` turns each
frame into a :class:`~appliance.core.events.Packet`.

Supported:

* classic pcap in either byte order, microsecond (magic ``a1b2c3d4``) and nanosecond
  (``a1b23c4d``) timestamps;
* pcapng in either byte order, several sections (each with its own byte order and
  interfaces), Interface Description Blocks with ``if_tsresol`` (a power of 10, or of 2
  when the high bit is set; 10^-6 by default) and ``if_tsoffset``, Enhanced Packet
  Blocks, Simple Packet Blocks (no timestamp of their own: they get the previous
  packet's, or 0) and the obsolete Packet Block. Other blocks are skipped.

Frames are yielded as captured: a frame cut by the snap length is not padded.

Errors: a file that cannot be opened, is not a capture, has a truncated file header
or an unsupported version, or is corrupt in the middle raises :class:`CaptureError`
with the file name and what is wrong. A truncated *final* record ends the iteration
quietly: that is what a tcpdump killed mid-write leaves behind. Being a generator,
:func:`read_capture` reports these errors on the first ``next()``, not on the call.
"""

from __future__ import annotations

import struct
from collections.abc import Generator, Iterator
from typing import BinaryIO, Final

from appliance.errors import CaptureError

__all__ = ["MAX_RECORD", "read_capture"]

MAX_RECORD: Final = 16 * 1024 * 1024
"""Largest record (pcap packet or pcapng block) accepted; larger means a corrupt file."""

_PCAP_MAGIC: Final[dict[bytes, tuple[str, int]]] = {
    # magic as stored in the file -> (struct byte order, timestamp fraction divisor)
    b"\xa1\xb2\xc3\xd4": (">", 1_000_000),
    b"\xd4\xc3\xb2\xa1": ("<", 1_000_000),
    b"\xa1\xb2\x3c\x4d": (">", 1_000_000_000),
    b"\x4d\x3c\xb2\xa1": ("<", 1_000_000_000),
}
_PCAP_MODIFIED_MAGIC: Final = frozenset({b"\xa1\xb2\xcd\x34", b"\x34\xcd\xb2\xa1"})
_PCAPNG_SHB: Final = b"\x0a\x0d\x0d\x0a"

# pcapng block types.
_IDB: Final = 1
_OPB: Final = 2  # obsolete Packet Block
_SPB: Final = 3
_EPB: Final = 6

# pcapng IDB options.
_OPT_END: Final = 0
_OPT_TSRESOL: Final = 9
_OPT_TSOFFSET: Final = 14

# Masks off the FCS-length bits of the classic pcap link-type field (libpcap's LT_LINKTYPE).
_LINKTYPE_MASK: Final = 0x03FFFFFF


def read_capture(path: str) -> Generator[tuple[float, int, bytes], None, None]:
    """Yield ``(timestamp in seconds, pcap link type, frame bytes)`` for each packet."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
            if magic == _PCAPNG_SHB:
                yield from _read_pcapng(path, f)
            elif magic in _PCAP_MAGIC:
                yield from _read_pcap(path, f, magic)
            elif magic in _PCAP_MODIFIED_MAGIC:
                raise CaptureError(f"{path}: unsupported modified (Kuznetzov) pcap format")
            elif not magic:
                raise CaptureError(f"{path}: empty file, not a pcap or pcapng file")
            else:
                raise CaptureError(f"{path}: not a pcap or pcapng file (magic 0x{magic.hex()})")
    except OSError as e:  # opening or reading the file
        raise CaptureError(f"{path}: {e.strerror or e}") from e


# --------------------------------------------------------------------------- classic pcap


def _read_pcap(path: str, f: BinaryIO, magic: bytes) -> Iterator[tuple[float, int, bytes]]:
    order, divisor = _PCAP_MAGIC[magic]
    header = f.read(20)
    if len(header) < 20:
        raise CaptureError(f"{path}: truncated pcap file header")
    major, minor, _zone, _sigfigs, _snaplen, network = struct.unpack(order + "HHiIII", header)
    if major != 2:
        raise CaptureError(f"{path}: unsupported pcap version {major}.{minor}")
    linktype = network & _LINKTYPE_MASK
    record = struct.Struct(order + "IIII").unpack
    offset = 24
    while True:
        head = f.read(16)
        if len(head) < 16:
            return  # end of file, or a record header cut short
        sec, frac, caplen, _wirelen = record(head)
        if caplen > MAX_RECORD:
            raise CaptureError(
                f"{path}: record at byte {offset}: captured length {caplen} is implausible"
            )
        data = f.read(caplen)
        if len(data) < caplen:
            return  # the last record was cut short
        yield sec + frac / divisor, linktype, data
        offset += 16 + caplen


# --------------------------------------------------------------------------- pcapng


class _Interface:
    __slots__ = ("divisor", "linktype", "offset", "snaplen")

    def __init__(self, linktype: int, snaplen: int, divisor: int, offset: int) -> None:
        self.linktype = linktype
        self.snaplen = snaplen
        self.divisor = divisor  # timestamp units per second
        self.offset = offset  # if_tsoffset, seconds


def _read_pcapng(path: str, f: BinaryIO) -> Iterator[tuple[float, int, bytes]]:
    # read_capture consumed the first block's type; every block starts with 8 bytes
    # (type, total length) in the byte order of its section.
    head = _PCAPNG_SHB + f.read(4)
    offset = 0  # file offset of the current block, for messages
    order = "<"
    interfaces: list[_Interface] = []
    last_ts = 0.0
    while True:
        if head[:4] == _PCAPNG_SHB:
            section = _read_shb(path, f, offset, head[4:])
            if section is None:
                if offset == 0:
                    raise CaptureError(f"{path}: truncated pcapng section header")
                return  # a last section header cut short
            order, length = section
            interfaces = []
        else:
            block_type, length = struct.unpack(order + "II", head)
            if length < 12 or length % 4 or length > MAX_RECORD:
                raise CaptureError(f"{path}: block at byte {offset}: invalid length {length}")
            rest = f.read(length - 8)
            if len(rest) < length - 8:
                return  # the last block was cut short
            if struct.unpack(order + "I", rest[-4:])[0] != length:
                raise CaptureError(f"{path}: block at byte {offset}: trailing length mismatch")
            body = rest[:-4]
            try:
                if block_type == _EPB:
                    ifid, high, low, caplen = struct.unpack_from(order + "IIII", body)
                    iface = _interface(path, interfaces, ifid, offset)
                    data = _packet_data(path, body, 20, caplen, offset)
                    last_ts = ((high << 32) | low) / iface.divisor + iface.offset
                    yield last_ts, iface.linktype, data
                elif block_type == _SPB:
                    iface = _interface(path, interfaces, 0, offset)
                    (wirelen,) = struct.unpack_from(order + "I", body)
                    caplen = min(wirelen, len(body) - 4)
                    if iface.snaplen:
                        caplen = min(caplen, iface.snaplen)
                    yield last_ts, iface.linktype, body[4 : 4 + caplen]
                elif block_type == _IDB:
                    interfaces.append(_parse_idb(path, body, order, offset))
                elif block_type == _OPB:
                    ifid, _drops, high, low, caplen = struct.unpack_from(order + "HHIII", body)
                    iface = _interface(path, interfaces, ifid, offset)
                    data = _packet_data(path, body, 20, caplen, offset)
                    last_ts = ((high << 32) | low) / iface.divisor + iface.offset
                    yield last_ts, iface.linktype, data
            except struct.error:
                raise CaptureError(
                    f"{path}: block at byte {offset}: type {block_type} too short ({length} bytes)"
                ) from None
        offset += length
        head = f.read(8)
        if len(head) < 8:
            return  # end of file, or a block header cut short


def _read_shb(path: str, f: BinaryIO, offset: int, raw_length: bytes) -> tuple[str, int] | None:
    """Read the rest of a Section Header Block: its byte order and total length.

    ``None`` if the file ends inside it.
    """
    bom = f.read(4)
    if len(raw_length) < 4 or len(bom) < 4:
        return None
    if bom == b"\x1a\x2b\x3c\x4d":
        order = ">"
    elif bom == b"\x4d\x3c\x2b\x1a":
        order = "<"
    else:
        raise CaptureError(
            f"{path}: section header at byte {offset}: bad byte-order magic 0x{bom.hex()}"
        )
    (length,) = struct.unpack(order + "I", raw_length)
    if length < 28 or length % 4 or length > MAX_RECORD:
        raise CaptureError(f"{path}: section header at byte {offset}: invalid length {length}")
    rest = f.read(length - 12)
    if len(rest) < length - 12:
        return None
    major, minor = struct.unpack_from(order + "HH", rest)
    if major != 1:
        raise CaptureError(f"{path}: unsupported pcapng version {major}.{minor}")
    if struct.unpack(order + "I", rest[-4:])[0] != length:
        raise CaptureError(f"{path}: section header at byte {offset}: trailing length mismatch")
    return order, length


def _parse_idb(path: str, body: bytes, order: str, offset: int) -> _Interface:
    linktype, _reserved, snaplen = struct.unpack_from(order + "HHI", body)
    divisor = 1_000_000
    tsoffset = 0
    pos = 8
    while pos + 4 <= len(body):
        code, size = struct.unpack_from(order + "HH", body, pos)
        pos += 4
        if code == _OPT_END:
            break
        value = body[pos : pos + size]
        if len(value) < size:
            raise CaptureError(f"{path}: interface block at byte {offset}: option overruns")
        if code == _OPT_TSRESOL and size >= 1:
            exponent = value[0] & 0x7F
            divisor = 2**exponent if value[0] & 0x80 else 10**exponent
        elif code == _OPT_TSOFFSET and size >= 8:
            (tsoffset,) = struct.unpack_from(order + "q", value)
        pos += (size + 3) & ~3
    return _Interface(linktype, snaplen, divisor, tsoffset)


def _interface(path: str, interfaces: list[_Interface], ifid: int, offset: int) -> _Interface:
    if ifid >= len(interfaces):
        raise CaptureError(
            f"{path}: block at byte {offset}: interface {ifid} not described"
            f" ({len(interfaces)} interface(s) in this section)"
        )
    return interfaces[ifid]


def _packet_data(path: str, body: bytes, start: int, caplen: int, offset: int) -> bytes:
    if start + caplen > len(body):
        raise CaptureError(
            f"{path}: block at byte {offset}: captured length {caplen} exceeds the block"
        )
    return body[start : start + caplen]
