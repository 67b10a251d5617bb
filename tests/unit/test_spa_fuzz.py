"""Property tests: open_packet never raises anything but SpaError, on any input."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.spa.wire import SpaError, SpaKeys, authenticate, new_message, open_packet, seal

KEYS = SpaKeys(os.urandom(32), os.urandom(64))
VALID = [
    seal(new_message("alice", 1700000000, "198.18.0.5,tcp/22"), KEYS),
    seal(new_message("bob", 1700000000, "198.18.0.5,tcp/22,udp/53", 60), KEYS),
]
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
FUZZ = settings(max_examples=400, deadline=500, suppress_health_check=[HealthCheck.too_slow])


def check(data: bytes, keys: SpaKeys = KEYS) -> None:
    ok = authenticate(data, keys)
    try:
        open_packet(data, keys)
    except SpaError as problem:
        assert problem.reason
    else:
        assert ok


@FUZZ
@given(st.binary(max_size=2000))
def test_arbitrary_bytes(data: bytes) -> None:
    check(data)


@FUZZ
@given(st.text(alphabet=B64 + "=\r\n", min_size=120, max_size=1600))
def test_base64_text_of_plausible_length(text: str) -> None:
    check(text.encode())


@FUZZ
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_mutated_valid_packets(packet: bytes, edits: list[tuple[int, int]]) -> None:
    data = bytearray(packet)
    for where, value in edits:
        data[where % len(data)] = value
    check(bytes(data))


@FUZZ
@given(st.sampled_from(VALID), st.integers(0, 400), st.integers(0, 400), st.binary(max_size=64))
def test_spliced_valid_packets(packet: bytes, start: int, end: int, insert: bytes) -> None:
    check(packet[:start] + insert + packet[end:])


@FUZZ
@given(st.binary(min_size=1, max_size=32), st.binary(min_size=1, max_size=128), st.binary())
def test_any_keys(key: bytes, mac: bytes, data: bytes) -> None:
    check(data, SpaKeys(key, mac))
    check(VALID[0], SpaKeys(key, mac))


@FUZZ
@given(
    st.text(min_size=1, max_size=40),
    st.integers(0, 10**12 - 1),
    st.sampled_from(["1.2.3.4,tcp/22", "0.0.0.0,udp/53,tcp/1", "::1,tcp/65535"]),
    st.one_of(st.none(), st.integers(1, 65536)),
)
def test_round_trip_or_value_error(
    username: str, stamp: int, access: str, timeout: int | None
) -> None:
    message = new_message(username, stamp, access, timeout)
    try:
        packet = seal(message, KEYS)
    except ValueError:
        return  # e.g. a username fwknop would refuse
    assert open_packet(packet, KEYS) == message
