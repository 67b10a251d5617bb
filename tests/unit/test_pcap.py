"""appliance.capture.pcap: reading classic pcap and pcapng files.

Files are written by scapy (an independent writer) where it can, and built byte by
byte with struct for what scapy cannot write (pcapng in big-endian, if_tsresol,
if_tsoffset, several interfaces and sections, Simple Packet Blocks, corrupt files).
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import PcapNgWriter, RawPcapNgReader, RawPcapWriter, wrpcap

from appliance.capture.decode import decode_frame
from appliance.capture.pcap import MAX_RECORD, read_capture
from appliance.core.events import Packet
from appliance.errors import CaptureError

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
FRAME_A = bytes(ETH / IP(src="198.18.1.7", dst="10.0.0.1") / TCP(dport=7000, flags="S"))
FRAME_B = bytes(ETH / IP(src="198.18.1.7", dst="10.0.0.1") / UDP(dport=8000))
FRAME_C = bytes(IP(src="198.18.1.8", dst="10.0.0.1") / UDP(dport=9000))  # raw IP, odd length

SEC = 1_700_000_000


def records(path: Path) -> list[tuple[float, int, bytes]]:
    return list(read_capture(str(path)))


# --------------------------------------------------------------------------- classic pcap


@pytest.mark.parametrize("endianness", ["<", ">"])
@pytest.mark.parametrize("nano", [False, True])
def test_pcap_written_by_scapy(tmp_path: Path, endianness: str, nano: bool) -> None:
    path = tmp_path / "knocks.pcap"
    writer = RawPcapWriter(str(path), linktype=1, endianness=endianness, nano=nano)
    writer.write_header(None)
    frac_a, frac_b = (123_456_789, 999_999_999) if nano else (123_456, 999_999)
    writer.write_packet(FRAME_A, sec=SEC, usec=frac_a)
    writer.write_packet(FRAME_B, sec=SEC + 1, usec=frac_b)
    writer.close()
    divisor = 1_000_000_000 if nano else 1_000_000
    assert records(path) == [
        (SEC + frac_a / divisor, 1, FRAME_A),
        (SEC + 1 + frac_b / divisor, 1, FRAME_B),
    ]


def test_pcap_timestamps_keep_microseconds(tmp_path: Path) -> None:
    path = tmp_path / "knocks.pcap"
    writer = RawPcapWriter(str(path), linktype=1)
    writer.write_header(None)
    writer.write_packet(FRAME_A, sec=SEC, usec=1)
    writer.close()
    ((ts, _lt, _data),) = records(path)
    # A float near 1.7e9 has a 2^-22 s (0.24 µs) resolution: the microsecond is kept.
    assert ts - SEC == pytest.approx(1e-6, abs=2.5e-7)


def test_wrpcap_of_scapy_packets_decodes_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "knocks.pcap"
    pkts = [
        ETH / IP(src="198.18.1.7", dst="10.0.0.1") / TCP(dport=port, flags="S")
        for port in (7000, 8000, 9000)
    ]
    for i, pkt in enumerate(pkts):
        pkt.time = SEC + i
    wrpcap(str(path), pkts)
    events = [decode_frame(lt, data, ts) for ts, lt, data in read_capture(str(path))]
    assert events == [
        Packet(float(SEC + i), "198.18.1.7", "10.0.0.1", "tcp", port, 0x02)
        for i, port in enumerate((7000, 8000, 9000))
    ]


MAGIC = {
    ("<", False): 0xA1B2C3D4,
    (">", False): 0xA1B2C3D4,
    ("<", True): 0xA1B23C4D,
    (">", True): 0xA1B23C4D,
}


def pcap_bytes(
    order: str,
    nano: bool,
    linktype: int,
    packets: list[tuple[int, int, bytes]],
    *,
    major: int = 2,
    wirelen_extra: int = 0,
) -> bytes:
    """A classic pcap file built by hand: the magic written in the file's byte order."""
    out = struct.pack(order + "IHHiIII", MAGIC[order, nano], major, 4, 0, 0, 65535, linktype)
    for sec, frac, data in packets:
        out += struct.pack(order + "IIII", sec, frac, len(data), len(data) + wirelen_extra)
        out += data
    return out


@pytest.mark.parametrize(("order", "magic"), [("<", "d4c3b2a1"), (">", "a1b2c3d4")])
def test_pcap_by_hand_microseconds(tmp_path: Path, order: str, magic: str) -> None:
    data = pcap_bytes(order, False, 101, [(SEC, 500_000, FRAME_C), (SEC + 2, 7, FRAME_C)])
    assert data[:4].hex() == magic
    path = tmp_path / "raw.pcap"
    path.write_bytes(data)
    assert records(path) == [(SEC + 0.5, 101, FRAME_C), (SEC + 2 + 7 / 1_000_000, 101, FRAME_C)]


@pytest.mark.parametrize(("order", "magic"), [("<", "4d3cb2a1"), (">", "a1b23c4d")])
def test_pcap_by_hand_nanoseconds(tmp_path: Path, order: str, magic: str) -> None:
    data = pcap_bytes(order, True, 113, [(SEC, 250_000_001, FRAME_A)])
    assert data[:4].hex() == magic
    path = tmp_path / "ns.pcap"
    path.write_bytes(data)
    assert records(path) == [(SEC + 250_000_001 / 1_000_000_000, 113, FRAME_A)]


def test_pcap_snaplen_truncated_frames_are_given_as_captured(tmp_path: Path) -> None:
    path = tmp_path / "snap.pcap"
    path.write_bytes(pcap_bytes("<", False, 1, [(SEC, 0, FRAME_A[:40])], wirelen_extra=14))
    assert records(path) == [(float(SEC), 1, FRAME_A[:40])]


def test_pcap_fcs_bits_of_the_link_type_are_masked(tmp_path: Path) -> None:
    path = tmp_path / "fcs.pcap"
    # FCS-length-present flag (bit 26) with a 4-byte FCS (bits 28-31).
    path.write_bytes(pcap_bytes(">", False, 1 | 0x04000000 | 0x40000000, [(SEC, 0, FRAME_A)]))
    assert records(path) == [(float(SEC), 1, FRAME_A)]


def test_pcap_without_packets(tmp_path: Path) -> None:
    path = tmp_path / "empty.pcap"
    path.write_bytes(pcap_bytes("<", False, 1, []))
    assert records(path) == []


def test_pcap_truncated_last_record_ends_quietly(tmp_path: Path) -> None:
    full = pcap_bytes("<", False, 1, [(SEC, 1, FRAME_A), (SEC + 1, 2, FRAME_B)])
    first = (SEC + 1 / 1_000_000, 1, FRAME_A)
    second = (SEC + 1 + 2 / 1_000_000, 1, FRAME_B)
    second_starts = 24 + 16 + len(FRAME_A)
    path = tmp_path / "cut.pcap"
    for cut in range(24, len(full) + 1):
        path.write_bytes(full[:cut])
        got = records(path)
        if cut < second_starts:
            assert got == [], cut
        elif cut < len(full):
            assert got == [first], cut
        else:
            assert got == [first, second]


@pytest.mark.parametrize("cut", range(4, 24))
def test_pcap_truncated_file_header(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "short.pcap"
    path.write_bytes(pcap_bytes("<", False, 1, [])[:cut])
    with pytest.raises(CaptureError, match=r"short\.pcap: truncated pcap file header$"):
        records(path)


def test_pcap_unsupported_version(tmp_path: Path) -> None:
    path = tmp_path / "v1.pcap"
    path.write_bytes(pcap_bytes("<", False, 1, [], major=1))
    with pytest.raises(CaptureError, match=r"v1\.pcap: unsupported pcap version 1\.4$"):
        records(path)


def test_pcap_implausible_record_length_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.pcap"
    header = pcap_bytes("<", False, 1, [(SEC, 0, FRAME_A)])
    path.write_bytes(header + struct.pack("<IIII", SEC, 0, MAX_RECORD + 1, 60) + b"\x00" * 64)
    reader = read_capture(str(path))
    assert next(reader) == (float(SEC), 1, FRAME_A)
    with pytest.raises(CaptureError, match=r"corrupt\.pcap: record at byte 94: captured length"):
        next(reader)


# --------------------------------------------------------------------------- not a capture


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"GET / HTTP/1.1\r\n", r"not a pcap or pcapng file \(magic 0x47455420\)"),
        (b"\x1f\x8b\x08\x00" + bytes(40), r"not a pcap or pcapng file \(magic 0x1f8b0800\)"),
        (b"\xd4\xc3", r"not a pcap or pcapng file \(magic 0xd4c3\)"),
        (b"", r"empty file, not a pcap or pcapng file"),
        (b"\x34\xcd\xb2\xa1" + bytes(40), r"unsupported modified \(Kuznetzov\) pcap format"),
    ],
    ids=["text", "gzip", "short", "empty", "kuznetzov"],
)
def test_not_a_capture(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bogus.bin"
    path.write_bytes(content)
    with pytest.raises(CaptureError, match=rf"^{re.escape(str(path))}: {message}$"):
        records(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pcap"
    with pytest.raises(CaptureError) as excinfo:
        records(path)
    assert str(excinfo.value) == f"{path}: No such file or directory"


def test_directory_is_not_a_capture(tmp_path: Path) -> None:
    with pytest.raises(CaptureError) as excinfo:
        records(tmp_path)
    assert str(excinfo.value) == f"{tmp_path}: Is a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.pcap"
    path.write_bytes(pcap_bytes("<", False, 1, []))
    path.chmod(0)
    with pytest.raises(CaptureError) as excinfo:
        records(path)
    assert str(excinfo.value) == f"{path}: Permission denied"


def test_read_capture_is_lazy_and_closes_its_file(tmp_path: Path) -> None:
    path = tmp_path / "knocks.pcap"
    path.write_bytes(pcap_bytes("<", False, 1, [(SEC, 0, FRAME_A), (SEC, 0, FRAME_B)]))
    reader = read_capture(str(tmp_path / "missing"))  # nothing happens before next()
    with pytest.raises(CaptureError):
        next(reader)
    reader = read_capture(str(path))
    assert next(reader)[2] == FRAME_A
    reader.close()  # the with block inside closes the file


# --------------------------------------------------------------------------- pcapng

SHB_TYPE = 0x0A0D0D0A


def block(order: str, block_type: int, body: bytes) -> bytes:
    body += b"\x00" * (-len(body) % 4)
    length = 12 + len(body)
    return struct.pack(order + "II", block_type, length) + body + struct.pack(order + "I", length)


def option(order: str, code: int, value: bytes) -> bytes:
    return struct.pack(order + "HH", code, len(value)) + value + b"\x00" * (-len(value) % 4)


def shb(order: str, *, options: bytes = b"") -> bytes:
    return block(order, SHB_TYPE, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1) + options)


def idb(order: str, linktype: int, *, snaplen: int = 0, options: bytes = b"") -> bytes:
    if options:
        options += option(order, 0, b"")
    return block(order, 1, struct.pack(order + "HHI", linktype, 0, snaplen) + options)


def epb(order: str, ifid: int, ticks: int, data: bytes, *, options: bytes = b"") -> bytes:
    head = struct.pack(order + "IIIII", ifid, ticks >> 32, ticks & 0xFFFFFFFF, len(data), 1514)
    padded = data + b"\x00" * (-len(data) % 4)
    return block(order, 6, head + padded + options)


def spb(order: str, data: bytes, wirelen: int | None = None) -> bytes:
    return block(
        order, 3, struct.pack(order + "I", len(data) if wirelen is None else wirelen) + data
    )


def opb(order: str, ifid: int, ticks: int, data: bytes) -> bytes:
    head = struct.pack(order + "HHIIII", ifid, 0, ticks >> 32, ticks & 0xFFFFFFFF, len(data), 99)
    return block(order, 2, head + data)


def tsresol(order: str, value: int) -> bytes:
    return option(order, 9, bytes([value]))


def write(tmp_path: Path, data: bytes, name: str = "capture.pcapng") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_pcapng_written_by_scapy(tmp_path: Path) -> None:
    path = tmp_path / "knocks.pcapng"
    pkt_a, pkt_b = Ether(FRAME_A), Ether(FRAME_B)
    pkt_a.time, pkt_b.time = SEC + 0.25, SEC + 1.5
    writer = PcapNgWriter(str(path))
    writer.write(pkt_a)
    writer.write(pkt_b)
    writer.close()
    assert records(path) == [(SEC + 0.25, 1, FRAME_A), (SEC + 1.5, 1, FRAME_B)]


@pytest.mark.parametrize("order", ["<", ">"])
def test_pcapng_default_resolution_is_microseconds(tmp_path: Path, order: str) -> None:
    ticks = SEC * 1_000_000 + 123_456
    path = write(tmp_path, shb(order) + idb(order, 1) + epb(order, 0, ticks, FRAME_A))
    assert records(path) == [(ticks / 1_000_000, 1, FRAME_A)]


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize(
    ("resol", "ticks", "expected"),
    [
        (9, SEC * 10**9 + 500_000_000, SEC + 0.5),  # nanoseconds
        (3, SEC * 1000 + 250, SEC + 0.25),  # milliseconds
        (0, SEC, float(SEC)),  # seconds
        (0x80 | 20, (SEC << 20) | (1 << 19), SEC + 0.5),  # 2^-20 s
        (0x80 | 0, SEC, float(SEC)),  # 2^0 s
    ],
    ids=["1e-9", "1e-3", "1e0", "2^-20", "2^0"],
)
def test_pcapng_if_tsresol(
    tmp_path: Path, order: str, resol: int, ticks: int, expected: float
) -> None:
    data = shb(order) + idb(order, 1, options=tsresol(order, resol)) + epb(order, 0, ticks, FRAME_A)
    path = write(tmp_path, data)
    assert records(path) == [(expected, 1, FRAME_A)]


def test_pcapng_nanosecond_resolution_is_exact_to_the_float(tmp_path: Path) -> None:
    ticks = SEC * 10**9 + 123_456_789
    data = shb("<") + idb("<", 1, options=tsresol("<", 9)) + epb("<", 0, ticks, FRAME_A)
    ((ts, _lt, _data),) = records(write(tmp_path, data))
    assert ts == ticks / 10**9
    assert ts - SEC == pytest.approx(0.123456789, abs=1e-6)


def test_pcapng_hand_built_files_agree_with_scapys_reader(tmp_path: Path) -> None:
    ticks = SEC * 10**9 + 750_000_000
    data = shb(">") + idb(">", 1, options=tsresol(">", 9)) + epb(">", 0, ticks, FRAME_B)
    path = write(tmp_path, data)
    reader: Any = RawPcapNgReader(str(path))
    raw, meta = reader._read_packet()
    reader.close()
    assert raw == FRAME_B
    assert meta.linktype == 1
    ((ts, linktype, frame),) = records(path)
    assert (frame, linktype) == (raw, meta.linktype)
    assert ts == pytest.approx(((meta.tshigh << 32) | meta.tslow) / meta.tsresol)


def test_pcapng_if_tsoffset_is_added(tmp_path: Path) -> None:
    options = option("<", 14, struct.pack("<q", SEC)) + tsresol("<", 3)
    data = shb("<") + idb("<", 1, options=options) + epb("<", 0, 1500, FRAME_A)
    assert records(write(tmp_path, data)) == [(SEC + 1.5, 1, FRAME_A)]


def test_pcapng_several_interfaces_keep_their_link_type_and_resolution(tmp_path: Path) -> None:
    o = "<"
    data = (
        shb(o)
        + idb(o, 1, options=option(o, 2, b"eth0") + tsresol(o, 6))
        + idb(o, 113, options=tsresol(o, 9))
        + idb(o, 101)
        + epb(o, 1, SEC * 10**9, FRAME_A[14:])
        + epb(o, 0, SEC * 10**6 + 1, FRAME_A)
        + epb(o, 2, SEC * 10**6 + 2, FRAME_C)
    )
    assert records(write(tmp_path, data)) == [
        (float(SEC), 113, FRAME_A[14:]),
        (SEC + 1 / 10**6, 1, FRAME_A),
        (SEC + 2 / 10**6, 101, FRAME_C),
    ]


def test_pcapng_simple_packet_blocks(tmp_path: Path) -> None:
    o = ">"
    data = (
        shb(o)
        + idb(o, 1, snaplen=40)
        + spb(o, FRAME_A[:40], wirelen=len(FRAME_A))  # before any timestamp: 0
        + epb(o, 0, SEC * 10**6 + 5, FRAME_B[:40])
        + spb(o, FRAME_B[:40], wirelen=len(FRAME_B))  # takes the previous timestamp
        + spb(o, FRAME_C[:21])  # 21 bytes: the block's padding is not data
    )
    assert records(write(tmp_path, data)) == [
        (0.0, 1, FRAME_A[:40]),
        (SEC + 5 / 10**6, 1, FRAME_B[:40]),
        (SEC + 5 / 10**6, 1, FRAME_B[:40]),
        (SEC + 5 / 10**6, 1, FRAME_C[:21]),
    ]


def test_pcapng_simple_packet_block_honours_snaplen(tmp_path: Path) -> None:
    # A writer that kept more than the snap length: the SPB length is min(wire, snaplen).
    data = shb("<") + idb("<", 1, snaplen=30) + spb("<", FRAME_A, wirelen=len(FRAME_A))
    assert records(write(tmp_path, data)) == [(0.0, 1, FRAME_A[:30])]


def test_pcapng_obsolete_packet_block(tmp_path: Path) -> None:
    data = shb("<") + idb("<", 1) + opb("<", 0, SEC * 10**6 + 9, FRAME_A)
    assert records(write(tmp_path, data)) == [(SEC + 9 / 10**6, 1, FRAME_A)]


def test_pcapng_other_blocks_and_options_are_skipped(tmp_path: Path) -> None:
    o = "<"
    name_resolution = block(
        o, 4, struct.pack(o + "HH", 1, 8) + bytes([10, 0, 0, 1]) + b"gw\x00\x00"
    )
    statistics = block(o, 5, struct.pack(o + "III", 0, 0, 0))
    custom = block(o, 0x00000BAD, struct.pack(o + "I", 32473) + b"vendor data")
    comment = option(o, 1, b"a knock") + option(o, 0, b"")
    data = (
        shb(o, options=option(o, 4, b"test writer") + option(o, 0, b""))
        + name_resolution
        + idb(o, 1)
        + custom
        + epb(o, 0, SEC * 10**6, FRAME_A, options=comment)
        + statistics
    )
    assert records(write(tmp_path, data)) == [(float(SEC), 1, FRAME_A)]


def test_pcapng_several_sections_with_different_byte_orders(tmp_path: Path) -> None:
    data = (
        shb("<")
        + idb("<", 1, options=tsresol("<", 3))
        + epb("<", 0, SEC * 1000, FRAME_A)
        + shb(">")  # a new section: interfaces start again
        + idb(">", 101)
        + epb(">", 0, SEC * 10**6, FRAME_C)
        + shb("<")
        + idb("<", 113)
        + epb("<", 0, (SEC + 1) * 10**6, FRAME_A)
    )
    assert records(write(tmp_path, data)) == [
        (float(SEC), 1, FRAME_A),
        (float(SEC), 101, FRAME_C),
        (float(SEC + 1), 113, FRAME_A),
    ]


def test_pcapng_interfaces_do_not_carry_over_sections(tmp_path: Path) -> None:
    data = shb("<") + idb("<", 1) + shb("<") + epb("<", 0, 0, FRAME_A)
    with pytest.raises(CaptureError, match=r"block at byte 76: interface 0 not described"):
        records(write(tmp_path, data))


def test_pcapng_truncated_last_block_ends_quietly(tmp_path: Path) -> None:
    o = "<"
    head = shb(o) + idb(o, 1)
    first = epb(o, 0, SEC * 10**6, FRAME_A)
    second = epb(o, 0, (SEC + 1) * 10**6, FRAME_B)
    full = head + first + second
    path = tmp_path / "cut.pcapng"
    for cut in range(len(head), len(full) + 1):
        path.write_bytes(full[:cut])
        got = records(path)
        if cut < len(head) + len(first):
            assert got == [], cut
        elif cut < len(full):
            assert got == [(float(SEC), 1, FRAME_A)], cut
        else:
            assert got == [(float(SEC), 1, FRAME_A), (float(SEC + 1), 1, FRAME_B)]


def test_pcapng_truncated_later_section_header_ends_quietly(tmp_path: Path) -> None:
    full = shb(">") + idb(">", 1) + epb(">", 0, 0, FRAME_A) + shb("<") + idb("<", 1)
    second_section = len(full) - len(shb("<")) - len(idb("<", 1))
    path = tmp_path / "cut.pcapng"
    for cut in range(second_section, second_section + len(shb("<"))):
        path.write_bytes(full[:cut])
        assert records(path) == [(0.0, 1, FRAME_A)], cut


@pytest.mark.parametrize("cut", range(4, 28))
def test_pcapng_truncated_first_section_header(tmp_path: Path, cut: int) -> None:
    path = write(tmp_path, shb("<")[:cut], "short.pcapng")
    with pytest.raises(CaptureError, match=r"short\.pcapng: truncated pcapng section header$"):
        records(path)


def test_pcapng_bad_byte_order_magic(tmp_path: Path) -> None:
    data = bytearray(shb("<"))
    data[8:12] = b"\xde\xad\xbe\xef"
    with pytest.raises(CaptureError, match=r"bad byte-order magic 0xdeadbeef$"):
        records(write(tmp_path, bytes(data)))


def test_pcapng_unsupported_major_version(tmp_path: Path) -> None:
    data = block("<", SHB_TYPE, struct.pack("<IHHq", 0x1A2B3C4D, 2, 0, -1))
    with pytest.raises(CaptureError, match=r"unsupported pcapng version 2\.0$"):
        records(write(tmp_path, data))


@pytest.mark.parametrize("length", [8, 30, MAX_RECORD + 4])
def test_pcapng_invalid_block_length(tmp_path: Path, length: int) -> None:
    bad = struct.pack("<II", 6, length) + bytes(64)
    with pytest.raises(CaptureError, match=rf"block at byte 48: invalid length {length}$"):
        records(write(tmp_path, shb("<") + idb("<", 1) + bad))


def test_pcapng_trailing_length_mismatch(tmp_path: Path) -> None:
    bad = bytearray(epb("<", 0, 0, FRAME_A))
    bad[-4:] = struct.pack("<I", 12)
    with pytest.raises(CaptureError, match=r"block at byte 48: trailing length mismatch$"):
        records(write(tmp_path, shb("<") + idb("<", 1) + bytes(bad)))


def test_pcapng_packet_before_any_interface(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match=r"interface 0 not described \(0 interface\(s\)"):
        records(write(tmp_path, shb("<") + epb("<", 0, 0, FRAME_A)))


def test_pcapng_captured_length_beyond_the_block(tmp_path: Path) -> None:
    body = struct.pack("<IIIII", 0, 0, 0, 500, 500) + FRAME_A
    bad = block("<", 6, body)
    with pytest.raises(CaptureError, match=r"captured length 500 exceeds the block$"):
        records(write(tmp_path, shb("<") + idb("<", 1) + bad))


def test_pcapng_block_too_short_for_its_type(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match=r"block at byte 48: type 6 too short \(16 bytes\)$"):
        records(write(tmp_path, shb("<") + idb("<", 1) + block("<", 6, b"\x00\x00\x00\x00")))


def test_pcapng_interface_option_overrun(tmp_path: Path) -> None:
    body = struct.pack("<HHI", 1, 0, 0) + struct.pack("<HH", 9, 40) + b"\x06\x00\x00\x00"
    with pytest.raises(CaptureError, match=r"interface block at byte 28: option overruns$"):
        records(write(tmp_path, shb("<") + block("<", 1, body)))
