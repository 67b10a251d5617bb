"""appliance.capture.records: what the packet process may tell the monitor.

Round trips of every record kind, and the contract of the monitor's side: hostile bytes
never raise, they are counted as malformed and dropped.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.capture import records
from appliance.capture.records import RecordReader
from appliance.core.events import Packet, SpaKnock
from appliance.core.model import Step

USERS = {"spa": frozenset({"alice"})}
KNOCK = SpaKnock(
    ts=0.0,
    src="198.18.0.7",
    door="spa",
    user="alice",
    username="root",
    timestamp=1_800_000_000,
    msg_type=1,
    address="198.18.0.7",
    ports=(Step(22, "tcp"), Step(53, "udp")),
    client_timeout=None,
    digest=bytes(range(32)),
)


def message(*parts: bytes) -> bytes:
    return records.MAGIC + b"".join(parts)


def test_packets_spa_knocks_counters_and_logs_come_back_as_sent() -> None:
    p4 = Packet(5.0, "198.18.0.7", "198.18.0.1", "tcp", 7000, 0x02)
    p6 = Packet(5.0, "2001:2::7", "::ffff:c612:1", "udp", 9001, 0)
    counters = dict.fromkeys(records.COUNTER_NAMES, 3)
    data = message(
        records.encode_packet(p4._replace(payload=b"dropped")),
        records.encode_packet(p6),
        records.encode_spa(KNOCK._replace(client_timeout=30)),
        records.encode_counters(counters),
        records.encode_log("knockgate.capture", 20, "eth0: ignored\nforged line"),
    )
    reader = RecordReader(USERS)
    batch = reader.read(data, 5.0)
    assert batch.events == [p4, p6, KNOCK._replace(ts=5.0, client_timeout=30)]
    assert batch.counters == counters
    assert [(line.logger, line.level, line.text) for line in batch.logs] == [
        ("knockgate.capture", 20, "eth0: ignored?forged line")
    ]
    assert reader.malformed == 0


def test_the_monitor_stamps_the_time_not_the_packet_process() -> None:
    packet = Packet(123.0, "198.18.0.7", "198.18.0.1", "tcp", 7000, 2)
    (event,) = RecordReader().read(message(records.encode_packet(packet)), 9.5).events
    assert event.ts == 9.5


def test_an_spa_knock_for_a_door_or_user_not_configured_is_malformed() -> None:
    reader = RecordReader(USERS)
    for knock in (KNOCK._replace(door="other"), KNOCK._replace(user="mallory")):
        assert reader.read(message(records.encode_spa(knock)), 1.0).events == []
    assert reader.malformed == 2


def test_an_spa_knock_with_a_bad_address_port_or_digest_is_malformed() -> None:
    reader = RecordReader(USERS)
    bad = (
        KNOCK._replace(address="not-an-address"),
        KNOCK._replace(ports=(Step(0, "tcp"),)),
        KNOCK._replace(digest=b"short"),
    )
    for knock in bad:
        assert reader.read(message(records.encode_spa(knock)), 1.0).events == []
    assert reader.malformed == len(bad)


def test_what_came_before_a_malformed_record_stands() -> None:
    packet = Packet(1.0, "198.18.0.7", "198.18.0.1", "tcp", 7000, 2)
    good = records.encode_packet(packet)
    reader = RecordReader()
    batch = reader.read(message(good, b"\x63", good), 1.0)
    assert batch.events == [packet]
    assert reader.malformed == 1


def test_an_unknown_protocol_no_magic_or_an_oversized_message_is_malformed() -> None:
    reader = RecordReader()
    bad_proto = struct.pack("!BBBH4s4s", records.PACKET4, 1, 0, 1, bytes(4), bytes(4))
    assert reader.read(message(bad_proto), 1.0).events == []
    assert reader.read(b"XX" + bad_proto, 1.0).events == []
    assert reader.read(records.MAGIC + bytes(records.MAX_MESSAGE), 1.0).events == []
    assert reader.malformed == 3


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_hostile_bytes_never_raise_they_are_counted(data: bytes) -> None:
    reader = RecordReader(USERS)
    for attempt in (data, records.MAGIC + data):
        batch = reader.read(attempt, 1.0)
        for event in batch.events:
            assert isinstance(event, Packet | SpaKnock)
    assert reader.malformed <= 2


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=300), st.integers(0, 299))
def test_a_valid_spa_record_with_bytes_flipped_never_raises(noise: bytes, at: int) -> None:
    data = bytearray(message(records.encode_spa(KNOCK)))
    for offset, byte in enumerate(noise[:8]):
        data[(at + offset) % len(data)] ^= byte
    reader = RecordReader(USERS)
    batch = reader.read(bytes(data), 1.0)
    for event in batch.events:
        assert isinstance(event, SpaKnock) and event.door == "spa" and event.user == "alice"
        assert len(event.digest) == records.DIGEST_SIZE


def test_regression_scope_ids_and_second_spellings_of_an_address_are_malformed() -> None:
    """A forged SPA record with ``fe80::1%x\\n...`` (ipaddress accepts any scope id) would
    carry a line break into log lines and firewall calls: only canonical addresses pass."""
    reader = RecordReader(USERS)
    bad = (
        KNOCK._replace(src="fe80::1%eth0"),
        KNOCK._replace(address="fe80::1%x\nforged: open ssh for 198.18.0.9"),
        KNOCK._replace(address="2001:DB8::1"),
        KNOCK._replace(src="2001:db8:0:0::1"),
    )
    for knock in bad:
        assert reader.read(message(records.encode_spa(knock)), 1.0).events == []
    assert reader.malformed == len(bad)
    good = KNOCK._replace(src="2001:db8::1", address="2001:db8::1")
    assert reader.read(message(records.encode_spa(good)), 1.0).events == [good._replace(ts=1.0)]


def test_a_failed_socket_record_names_the_key_and_errno() -> None:
    reader = RecordReader()
    batch = reader.read(message(records.encode_failed(7, 104)), 1.0)
    assert batch.failed == [(7, 104)]
    impossible = struct.pack("!BIH", records.FAILED, 7, 0)
    assert reader.read(message(impossible), 1.0).failed == []
    assert reader.malformed == 1


def test_an_spa_knock_carries_where_its_receipt_goes() -> None:
    knock = KNOCK._replace(dst="198.18.0.1", sport=40123)
    (event,) = RecordReader(USERS).read(message(records.encode_spa(knock)), 5.0).events
    assert isinstance(event, SpaKnock)
    assert (event.dst, event.sport) == ("198.18.0.1", 40123)


def test_the_old_spa_record_still_reads_without_a_reply_path() -> None:
    data = records.encode_spa(KNOCK)
    kind, length = struct.unpack_from("!BH", data)
    assert kind == records.SPA_FROM
    # The same knock as an SPA record: its body without the dst text and source port.
    body = data[3 : 3 + length - 3]
    old = struct.pack("!BH", records.SPA, len(body)) + body
    (event,) = RecordReader(USERS).read(message(old), 5.0).events
    assert event == KNOCK._replace(ts=5.0)


@pytest.mark.parametrize(
    "dst", ["2001:2::1", "not an address", "198.18.0.1\n"], ids=["family", "text", "junk"]
)
def test_an_spa_reply_path_that_is_not_an_address_of_its_family_is_malformed(dst: str) -> None:
    reader = RecordReader(USERS)
    knock = KNOCK._replace(dst=dst, sport=1)
    assert reader.read(message(records.encode_spa(knock)), 1.0).events == []
    assert reader.malformed == 1
