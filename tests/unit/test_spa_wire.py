"""fwknop SPA wire format: real fwknop 2.6.10 packets, round trips, tampering, key files."""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import hashlib
import hmac
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from appliance.errors import ConfigError
from appliance.spa.keyfile import ClientProfile, format_keys, generate_keys, read_key_file
from appliance.spa.wire import (
    SpaError,
    SpaKeys,
    SpaMessage,
    authenticate,
    new_message,
    open_packet,
    parse_access,
    replay_digest,
    seal,
)

# Made by the Debian fwknop-client 2.6.10 binary:
#   HOME=/nonexistent fwknop --no-rc-file --no-save-args --test -v -D 198.18.0.1 --use-hmac \
#     --key-base64-rijndael $KEY_B64 --key-base64-hmac $HMAC_B64 -A tcp/22 -a 198.18.0.5 [...]
# ("Final SPA Data" line; the extra options are in each fixture's comment).
KEY_B64 = "eLVWZep3VamssKANYLUMWGWauhKZO4Z3oRb5IVRWt5I="
HMAC_B64 = (
    "AKnKhyfdgJ9g5VYQYzdryAqCGBI3znV6cY/8cX9qC5i9aBvvwl32mfoqNLWyhZLkSPYa9gOMDXj+iFXVqCfClw=="
)
KEYS = SpaKeys.from_base64(KEY_B64, HMAC_B64)
STAMP = 1795608621

FIXTURES: dict[str, tuple[bytes, SpaMessage]] = {
    # -A tcp/22 -a 198.18.0.5
    "access": (
        b"+MF1tPNCoNmhUVW3kIa+3NilPSpB2Q8DAjANkjuiZPUXn1T7sd2akA9hu3f4EpoKzWH35rtBTougmgbR4WaOFHFJ/seDJYbJ1Gx+lJsWy40Ic4MVQl0VyHyyu7E+EuXztf6bVZ4Gn0aj1G3s7sxbB/99SQNwNVeSgMpizQW/eFkSHN6sbZf5o4y/P8jo3aSPOzBbdP3A3Ddg",
        SpaMessage("8895467652066840", "root", STAMP, "3.0.0", 1, "198.18.0.5,tcp/22"),
    ),
    # -A tcp/22 -a 198.18.0.5 --fw-timeout 60
    "timeout": (
        b"97B6gSbvVOXrdQqn+cRHGcHCqEZNGA8Y75T36vN7Z+25qSEh/wIW2UZjCtWMr45pzyY3aSWqVEOi4I7QDEMpMppQKcSrLuq+aIA3OnNSy/rIiaF9wrVmDsxbcvtZg7ilPFJGcEEim/k+6NqWS8+9/HGfpKhoNJ2sUivVqBLVwlxXsS+qN4WHHAC+QVPk6DAYCyaG3rMdOrkkc6nTyOFLapGvRMFmV6jyE",
        SpaMessage(
            "9785286811764067", "root", STAMP, "3.0.0", 3, "198.18.0.5,tcp/22", client_timeout=60
        ),
    ),
    # -A tcp/22,udp/53 -s   (no -a)
    "source": (
        b"+OzxsgNAmxH+v+bnaXpYimcWx/MRgfcmXJnhUL0BPtTqDQsqdqhV2HHRKPGA7QyA2zQeNP2+QBwNypNFKK1s/yz98KR0NJRrVe83IRBgp6jLU+OVaGC3U1UtYXQ04XyW6Uv0nr7ZMtV6bW5N3l237Eu/ADMmxW6nHlUEd5ynQ3isKJ3VfqsAjntz0a2m2vnuJImdp2Adfgwz2JXKZi2m4J0hsMPWAQLaU",
        SpaMessage("1094663478552303", "root", STAMP, "3.0.0", 1, "0.0.0.0,tcp/22,udp/53"),
    ),
    # -A tcp/22 -a 198.18.0.5 -U someuser
    "user": (
        b"+JJthIx/z9kuUf9TWm/WGKmqrkkjYRqoGXjdn3qrvA8t/pYbrgGdIwM2kDvhglUTDb63VPhEUzv7OtQw2egS6lm0NNoPXOn9IgK81BJFGoXWUN6YCgfFjZfaeOsDwkEJteAl7ZUaibTzN4pr9kvHcEILCTFJ3n2+R4z//GirS7qbs/E7H7VZm0rdfa3Plkdy39hc4tBrhrVMK3Vw1KmdvRpl39V+xJFa0",
        SpaMessage("1484350186419481", "someuser", STAMP, "3.0.0", 1, "198.18.0.5,tcp/22"),
    ),
    # -A tcp/22 -a 198.18.0.5 -m sha512   (sha512 inner digest)
    "sha512": (
        b"/1WUa3RfMAODyQqVxCn+Ps4lgyRuoY9GibfrpGLnzYfXVEdYqeTOBqtXN171cwbI8I6n6fCJwDVs1O60A6QDze1+ZGQouMRusKH2ZvtI9sBqWwaq4RJVBgm8a5GkX4nbBh52pOdUAUYezRDdOOPEZwOzxbn7mLG5I97OCokHubUg7gkmR8x4qYq5kK1iWg1g4OrkXFiOWJaFnoH99iQdod0kOZaNs3diEyUoMGMUFSmMKBeXju7RiXkxxGPwrCkbPcxKtohS4fY8",
        SpaMessage("1843132276954948", "root", STAMP, "3.0.0", 1, "198.18.0.5,tcp/22"),
    ),
    # -A udp/53 -a 198.18.0.5 -m md5   (md5 inner digest)
    "md5": (
        b"8ImrA/HGBsK39Y2eWW5b7N6nfcauY15uvG9b2qpo+m5W9WNBFgeT+a9Cgac9VK2mQ/nlMGuFc4x9k3bTouT1T+NqqbOyWnK/zI+K/jDURYACeX0TJpUBJfqHXGeZsOX5DKviwKZpbpywhAfD1DnNbMkqrLfOGRblE1OLmv9oKFB7e/pJgEHOwVs",
        SpaMessage("7196449612894319", "root", STAMP, "3.0.0", 1, "198.18.0.5,udp/53"),
    ),
    # -A tcp/8022 -a 198.18.0.5 -N 10.0.0.7,22 --fw-timeout 30   (type 4)
    "nat": (
        b"/kfkrJliYjVxegvVxSkmWYxsOXvnhpync0Tbj5KUlOioh29osf49y9m/NIstdCrIFOlVeIhnuPlkPUulSdTTO+r4ct7SjB2FQc1OjrQczk/dIbwRr6EwuCeNzpvGbiTbHK+Sk4MmN2GGsLdnO3oSGQnZhUc0Mz03yfKLTZxCCTZLLgcQ5wB+5suE0pUVF+WatIBkwF2qVckgHrYifHD0cZqhRXRlkt3Efm3n6aONmu1pX28Dwzh4NBY",
        SpaMessage(
            "1278336293476217",
            "root",
            STAMP,
            "3.0.0",
            4,
            "198.18.0.5,tcp/8022",
            "10.0.0.7,22",
            None,
            30,
        ),
    ),
}
# --key-rijndael secretpw (a passphrase, not base64) with the same HMAC key.
PASSPHRASE_PACKET = b"937EvX3ua9qSEWOdG6/NtOBinzrjM61KM6zoGkqQsl+4XSyshqm3u7zmNicwkg2pKLbgIyGN/UhRIotBU3iRfj5yOHUryHm9Rr3biDKBxckxUO9OA3nrztJlm5/+CquLLh41dNfjOULWZWSIFNN17WF9/91UqK4J0XSEJgX3o4bhC+NX6E8O7KUPcSFU8wHYWRLZD1aPXYR8"
ACCESS = FIXTURES["access"][0]
B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def raw_seal(plain: bytes, keys: SpaKeys, salt: bytes = b"12345678") -> bytes:
    """An independent encrypt+HMAC of arbitrary plaintext (to build malformed packets)."""
    d1 = hashlib.md5(keys.encryption + salt).digest()
    d2 = hashlib.md5(d1 + keys.encryption + salt).digest()
    d3 = hashlib.md5(d2 + keys.encryption + salt).digest()
    pad = 16 - len(plain) % 16
    enc = Cipher(algorithms.AES(d1 + d2), modes.CBC(d3)).encryptor()
    cipher = enc.update(plain + bytes([pad]) * pad) + enc.finalize()
    covered = b64(b"Salted__" + salt + cipher)
    return covered[10:] + b64(hmac.digest(keys.hmac, covered, "sha256"))


def with_digest(head: str, name: str = "sha256") -> bytes:
    return f"{head}:{b64(hashlib.new(name, head.encode()).digest()).decode()}".encode()


def salt_of(packet: bytes) -> bytes:
    text = b"U2FsdGVkX1" + packet[:-43]
    return base64.b64decode(text + b"=" * (-len(text) % 4))[8:16]


# --- real fwknop packets -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fwknop_packets_open(name: str) -> None:
    packet, expected = FIXTURES[name]
    assert authenticate(packet, KEYS)
    assert open_packet(packet, KEYS) == expected


def test_passphrase_key_packet_opens() -> None:
    keys = SpaKeys(b"secretpw", KEYS.hmac)
    assert open_packet(PASSPHRASE_PACKET, keys).message == "198.18.0.5,tcp/22"


@pytest.mark.parametrize("name", ["access", "timeout", "source", "user", "nat"])
def test_seal_reproduces_fwknop_byte_for_byte(name: str) -> None:
    packet, message = FIXTURES[name]
    assert seal(message, KEYS, salt=salt_of(packet)) == packet


def test_every_fwknop_packet_starts_with_a_salted_sextet() -> None:
    for packet, _ in FIXTURES.values():
        assert packet[:1] in (b"8", b"9", b"+", b"/")


@pytest.mark.parametrize("tail", [b"\n", b"\r\n", b"\0", b" ", b"\n\0"])
def test_trailing_whitespace_is_stripped(tail: bytes) -> None:
    assert authenticate(ACCESS + tail, KEYS)
    assert open_packet(ACCESS + tail, KEYS) == FIXTURES["access"][1]
    assert replay_digest(ACCESS + tail) == replay_digest(ACCESS)


def test_replay_digest() -> None:
    assert replay_digest(ACCESS) == hashlib.sha256(ACCESS).digest()
    assert replay_digest(ACCESS) != replay_digest(FIXTURES["user"][0])


def test_bytearray_and_memoryview_inputs() -> None:
    assert authenticate(bytearray(ACCESS), KEYS)  # type: ignore[arg-type]
    assert open_packet(memoryview(ACCESS), KEYS).username == "root"  # type: ignore[arg-type]


@pytest.mark.skipif(shutil.which("fwknop") is None, reason="fwknop client not installed")
def test_live_fwknop_client_packet(tmp_path: Path) -> None:
    key_b64, hmac_b64 = generate_keys()
    argv = [
        "fwknop", "--no-rc-file", "--no-save-args", "--test", "-v",
        "-D", "198.18.0.1", "-A", "tcp/22,udp/53", "-a", "198.18.0.9", "-U", "alice",
        "--fw-timeout", "45", "--use-hmac",
        "--key-base64-rijndael", key_b64, "--key-base64-hmac", hmac_b64,
    ]  # fmt: skip
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=True)
    match = re.search(r"Final SPA Data: (\S+)", out.stdout)
    assert match, out.stdout
    got = open_packet(match.group(1).encode(), SpaKeys.from_base64(key_b64, hmac_b64))
    assert (got.username, got.msg_type, got.message, got.client_timeout) == (
        "alice", 3, "198.18.0.9,tcp/22,udp/53", 45,
    )  # fmt: skip


_LIBFKO = ctypes.util.find_library("fko")


@pytest.mark.skipif(_LIBFKO is None, reason="libfko (fwknop's library) not installed")
@pytest.mark.parametrize(
    "message",
    [
        new_message("alice", STAMP, "198.18.0.5,tcp/22"),
        new_message("bob", STAMP, "198.18.0.5,tcp/22,udp/53", 60),
        SpaMessage("1234567890123456", "u", 1, "3.0.0", 2, "1.2.3.4,tcp/22", "10.0.0.1,22", "auth"),
        SpaMessage(
            "1234567890123456", "u", 1, "3.0.0", 4, "1.2.3.4,tcp/22", "10.0.0.1,22", "a", 30
        ),
        SpaMessage("1234567890123456", "u", 1, "3.0.0", 3, "1.2.3.4,tcp/22", None, "auth", 30),
    ],
)
def test_libfko_opens_our_packets(message: SpaMessage) -> None:
    lib = ctypes.CDLL(_LIBFKO)
    ctx = ctypes.c_void_p()
    packet = seal(message, KEYS)
    # FKO_ENC_MODE_CBC = 2, FKO_HMAC_SHA256 = 3: what fwknopd passes for such a stanza.
    rc = lib.fko_new_with_data(
        ctypes.byref(ctx), packet, KEYS.encryption, 32, 2, KEYS.hmac, len(KEYS.hmac), 3
    )
    assert rc == 0
    text = ctypes.c_char_p()
    timeout = ctypes.c_int()
    lib.fko_get_spa_message(ctx, ctypes.byref(text))
    assert text.value == message.message.encode()
    lib.fko_get_spa_client_timeout(ctx, ctypes.byref(timeout))
    assert timeout.value == (message.client_timeout or 0)
    lib.fko_get_spa_nat_access(ctx, ctypes.byref(text))
    assert text.value == (message.nat_access.encode() if message.nat_access else None)
    lib.fko_get_spa_server_auth(ctx, ctypes.byref(text))
    assert text.value == (message.server_auth.encode() if message.server_auth else None)
    lib.fko_destroy(ctx)


# --- round trips ----------------------------------------------------------------------


def test_round_trip_and_new_message() -> None:
    plain = new_message("alice", 1700000000, "198.18.0.5,tcp/22")
    assert (plain.msg_type, plain.version, plain.client_timeout) == (1, "3.0.0", None)
    assert len(plain.random) == 16 and plain.random.isdigit()
    timed = new_message("alice", 1700000000, "198.18.0.5,tcp/22", client_timeout=90)
    assert (timed.msg_type, timed.client_timeout) == (3, 90)
    assert new_message("a", 1, "1.2.3.4,tcp/22", client_timeout=0).msg_type == 1
    for message in (plain, timed):
        packet = seal(message, KEYS)
        assert authenticate(packet, KEYS)
        assert open_packet(packet, KEYS) == message
    assert seal(plain, KEYS) != seal(plain, KEYS)  # random salt
    assert seal(plain, KEYS, salt=b"x" * 8) == seal(plain, KEYS, salt=b"x" * 8)


def test_new_message_rejects_bad_access() -> None:
    with pytest.raises(SpaError):
        new_message("alice", 1, "198.18.0.5")


@pytest.mark.parametrize(
    "message",
    [
        SpaMessage("123", "u", 1, "3.0.0", 1, "1.2.3.4,tcp/22"),
        SpaMessage("1234567890123456", "u:x", 1, "3.0.0", 1, "1.2.3.4,tcp/22"),
        SpaMessage("1234567890123456", "u", 1, "3.0.0", 1, "1.2.3.4,tcp/0"),
        SpaMessage("1234567890123456", "u", 1, "3.0.0", 3, "1.2.3.4,tcp/22"),
        SpaMessage("1234567890123456", "u", 1, "3.0.0", 2, "1.2.3.4,tcp/22"),
        SpaMessage("1234567890123456", "u", 1, "3.0.0", 7, "1.2.3.4,tcp/22"),
    ],
)
def test_seal_rejects_messages_that_would_not_open(message: SpaMessage) -> None:
    with pytest.raises(ValueError):
        seal(message, KEYS)


# --- tampering ------------------------------------------------------------------------


def test_every_bit_flip_is_rejected() -> None:
    for index in range(len(ACCESS)):
        for bit in range(8):
            mutated = bytearray(ACCESS)
            mutated[index] ^= 1 << bit
            data = bytes(mutated)
            assert not authenticate(data, KEYS), (index, bit)
            with pytest.raises(SpaError):
                open_packet(data, KEYS)


def test_every_truncation_is_rejected() -> None:
    for end in range(len(ACCESS)):
        assert not authenticate(ACCESS[:end], KEYS)
        with pytest.raises(SpaError):
            open_packet(ACCESS[:end], KEYS)
    with pytest.raises(SpaError):
        open_packet(ACCESS[1:], KEYS)


def test_wrong_keys_are_rejected() -> None:
    other_hmac = SpaKeys(KEYS.encryption, b"x" * 64)
    assert not authenticate(ACCESS, other_hmac)
    with pytest.raises(SpaError) as info:
        open_packet(ACCESS, other_hmac)
    assert info.value.reason == "bad-hmac"
    other_key = SpaKeys(b"y" * 32, KEYS.hmac)
    assert authenticate(ACCESS, other_key)  # the HMAC key is right...
    with pytest.raises(SpaError) as info:
        open_packet(ACCESS, other_key)  # ...the Rijndael key is not
    assert info.value.reason in ("bad-padding", "bad-fields")


def test_non_canonical_hmac_tail_is_rejected() -> None:
    last = ACCESS[-1:]
    value = B64.index(last)
    # 32 bytes = 256 bits in 43 sextets: the low 2 bits of the last one are padding.
    for spare in range(1, 4):
        twin = ACCESS[:-1] + B64[value ^ spare : (value ^ spare) + 1]
        assert base64.b64decode(twin[-43:] + b"=") == base64.b64decode(ACCESS[-43:] + b"=")
        assert not authenticate(twin, KEYS)
        with pytest.raises(SpaError) as info:
            open_packet(twin, KEYS)
        assert info.value.reason == "bad-hmac"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "too-short"),
        (ACCESS[:139], "too-short"),
        (b"+" * 1499 + b"\n", "bad-length"),  # 1499 after the strip
        (b"+" * 9000, "too-long"),
        (b"+" * 1500, "too-long"),
        (b"U2FsdGVkX1" + ACCESS, "bad-prefix"),
        (b"A" + ACCESS[1:], "bad-ciphertext"),
        (ACCESS[:50] + b"!" + ACCESS[51:], "not-base64"),
        (ACCESS[:50] + b"=" + ACCESS[51:], "not-base64"),
        (ACCESS[:60] + b"AAAA" + ACCESS[60:], "bad-length"),
        (ACCESS[:-44] + ACCESS[-43:], "bad-length"),
    ],
)
def test_rejection_reasons(data: bytes, reason: str) -> None:
    with pytest.raises(SpaError) as info:
        open_packet(data, KEYS)
    assert info.value.reason == reason
    assert not authenticate(data, KEYS)


GOOD_HEAD = "1234567890123456:YWxpY2U:1700000000:3.0.0:1:MTk4LjE4LjAuNSx0Y3AvMjI"


def test_hand_built_packet_opens() -> None:
    got = open_packet(raw_seal(with_digest(GOOD_HEAD), KEYS), KEYS)
    assert (got.username, got.message, got.timestamp) == ("alice", "198.18.0.5,tcp/22", 1700000000)
    for name in ("md5", "sha1", "sha384", "sha512"):
        assert open_packet(raw_seal(with_digest(GOOD_HEAD, name), KEYS), KEYS).username == "alice"


def test_digest_mismatch_inside_authentic_packet() -> None:
    wrong = GOOD_HEAD.replace("1700000000", "1700000001")
    plain = f"{wrong}:{b64(hashlib.sha256(GOOD_HEAD.encode()).digest()).decode()}".encode()
    packet = raw_seal(plain, KEYS)
    assert authenticate(packet, KEYS)
    with pytest.raises(SpaError) as info:
        open_packet(packet, KEYS)
    assert info.value.reason == "bad-digest"
    with pytest.raises(SpaError) as info:
        open_packet(raw_seal(with_digest(GOOD_HEAD) + b"A", KEYS), KEYS)  # 44 chars: no such hash
    assert info.value.reason == "bad-digest"


def b64s(text: str) -> str:
    return b64(text.encode()).decode()


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        ("123456789012345x:YWxpY2U:1:3.0.0:1:" + b64s("1.2.3.4,tcp/22"), "bad-fields"),
        ("12345678901234567:YWxpY2U:1:3.0.0:1:" + b64s("1.2.3.4,tcp/22"), "bad-fields"),
        ("1234567890123456::1:3.0.0:1:" + b64s("1.2.3.4,tcp/22"), "bad-fields"),
        ("1234567890123456:" + b64s("a/b") + ":1:3.0.0:1:" + b64s("1.2.3.4,tcp/22"), "bad-fields"),
        ("1234567890123456:" + b64s("a\tb") + ":1:3.0.0:1:" + b64s("1.2.3.4,tcp/22"), "bad-fields"),
        ("1234567890123456:YWxpY2U:x1:3.0.0:1:" + b64s("1.2.3.4,tcp/22"), "bad-fields"),
        ("1234567890123456:YWxpY2U:1234567890123:3.0.0:1:" + b64s("1.2.3.4,tcp/22"), "bad-fields"),
        ("1234567890123456:YWxpY2U:1:123456789:1:" + b64s("1.2.3.4,tcp/22"), "bad-fields"),
        ("1234567890123456:YWxpY2U:1:3.0.0:7:" + b64s("1.2.3.4,tcp/22"), "bad-fields"),
        ("1234567890123456:YWxpY2U:1:3.0.0:1:" + b64s("1.2.3.4,tcp/22") + ":YQ:YQ", "bad-fields"),
        ("1234567890123456:YWxpY2U:1:3.0.0:3:" + b64s("1.2.3.4,tcp/22"), "bad-fields"),
        ("1234567890123456:YWxpY2U:1:3.0.0:3:" + b64s("1.2.3.4,tcp/22") + ":6x", "bad-fields"),
        ("1234567890123456:YWxpY2U:1:3.0.0:3:" + b64s("1.2.3.4,tcp/22") + ":65537", "bad-fields"),
        ("1234567890123456:YWxpY2U:1:3.0.0:2:" + b64s("1.2.3.4,tcp/22"), "bad-fields"),
        ("1234567890123456:YWxpY2U:1:3.0.0:1:" + b64s("1.2.3.4,tcp/22") + "$", "bad-fields"),
        ("1234567890123456:YWxpY2U:1:3.0.0:1:" + b64s("1.2.3.4,icmp/0"), "bad-message"),
        ("1234567890123456:YWxpY2U:1:3.0.0:1:" + b64s("1.2.3.999,tcp/22"), "bad-message"),
        ("1234567890123456:YWxpY2U:1:3.0.0:0:" + b64s("1.2.3.4,"), "bad-message"),
        (
            "1234567890123456:YWxpY2U:1:3.0.0:2:" + b64s("1.2.3.4,tcp/22") + ":" + b64s("x"),
            "bad-message",
        ),
    ],
)
def test_bad_plaintexts_inside_authentic_packets(head: str, reason: str) -> None:
    packet = raw_seal(with_digest(head), KEYS)
    assert authenticate(packet, KEYS)
    with pytest.raises(SpaError) as info:
        open_packet(packet, KEYS)
    assert info.value.reason == reason


def test_optional_fields_in_authentic_packets() -> None:
    msg = b64s("1.2.3.4,tcp/22")
    head = f"1234567890123456:YWxpY2U:1:3.0.0:3:{msg}:{b64s('sa')}:120"
    got = open_packet(raw_seal(with_digest(head), KEYS), KEYS)
    assert (got.server_auth, got.client_timeout) == ("sa", 120)
    head = f"1234567890123456:YWxpY2U:1:3.0.0:0:{b64s('1.2.3.4,touch /tmp/x')}"
    assert open_packet(raw_seal(with_digest(head), KEYS), KEYS).msg_type == 0


def test_bad_padding() -> None:
    plain = with_digest(GOOD_HEAD)
    salt = b"abcdefgh"
    d1 = hashlib.md5(KEYS.encryption + salt).digest()
    d2 = hashlib.md5(d1 + KEYS.encryption + salt).digest()
    d3 = hashlib.md5(d2 + KEYS.encryption + salt).digest()
    body = plain + b"\x00" * (-len(plain) % 16 or 16)
    enc = Cipher(algorithms.AES(d1 + d2), modes.CBC(d3)).encryptor()
    covered = b64(b"Salted__" + salt + enc.update(body) + enc.finalize())
    packet = covered[10:] + b64(hmac.digest(KEYS.hmac, covered, "sha256"))
    with pytest.raises(SpaError) as info:
        open_packet(packet, KEYS)
    assert info.value.reason == "bad-padding"


# --- parse_access and keys ------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("198.18.0.5,tcp/22", ("198.18.0.5", ((22, "tcp"),))),
        ("198.18.0.5,tcp/22,udp/53", ("198.18.0.5", ((22, "tcp"), (53, "udp")))),
        ("0.0.0.0,udp/65535", ("0.0.0.0", ((65535, "udp"),))),
        ("2001:db8::0001,tcp/1", ("2001:db8::1", ((1, "tcp"),))),
    ],
)
def test_parse_access(message: str, expected: tuple[str, tuple[tuple[int, str], ...]]) -> None:
    assert parse_access(message) == expected


@pytest.mark.parametrize(
    "message",
    [
        "", "198.18.0.5", "198.18.0.5,", "198.18.0.5,tcp", "198.18.0.5,tcp/", "198.18.0.5,tcp/0",
        "198.18.0.5,tcp/65536", "198.18.0.5,icmp/8", "198.18.0.5,TCP/22", "198.18.0.5,tcp/+22",
        "198.18.0.5,tcp/ 22", "198.18.0.5,tcp/2_2", "198.18.0.256,tcp/22", "01.2.3.4,tcp/22",
        "1.2.3,tcp/22", "host.example,tcp/22", "fe80::1%eth0,tcp/22", "198.18.0.5,tcp/22,",
        "198.18.0.5,tcp/٢٢",
    ],
)  # fmt: skip
def test_parse_access_rejects(message: str) -> None:
    with pytest.raises(SpaError) as info:
        parse_access(message)
    assert info.value.reason == "bad-message"


def test_keys() -> None:
    assert len(KEYS.encryption) == 32 and len(KEYS.hmac) == 64
    assert repr(KEYS) == "SpaKeys(<redacted>)"
    assert SpaKeys.from_base64(KEY_B64.rstrip("="), HMAC_B64.rstrip("=")) == KEYS
    with pytest.raises(AttributeError):
        KEYS.hmac = b"x"
    for key, mac in [("", HMAC_B64), (KEY_B64, "!!!"), ("QQ", ""), ("A" * 64, HMAC_B64)]:
        with pytest.raises(ValueError):
            SpaKeys.from_base64(key, mac)


def test_generate_and_format_keys(tmp_path: Path) -> None:
    key_b64, hmac_b64 = generate_keys()
    assert len(base64.b64decode(key_b64)) == 32 and len(base64.b64decode(hmac_b64)) == 64
    path = tmp_path / "keys"
    path.write_text(format_keys(key_b64, hmac_b64))
    assert format_keys(key_b64, hmac_b64).startswith("KEY_BASE64: ")
    profile = read_key_file(str(path), None)
    assert profile == ClientProfile(keys=SpaKeys.from_base64(key_b64, hmac_b64))
    assert read_key_file(str(path), "anything").keys == profile.keys  # no stanzas at all


RC = f"""# fwknoprc
[default]
SPA_SERVER_PORT     62201
KEY_BASE64          {KEY_B64}
HMAC_KEY_BASE64     {HMAC_B64}
USE_HMAC            Y
DIGEST_TYPE         sha256

[gate]
SPA_SERVER          198.18.0.1
SPA_SERVER_PORT:    40000
ACCESS              tcp/22,udp/53   # comment
ALLOW_IP            198.18.0.5
FW_TIMEOUT          60
SPOOF_USER          alice
spa_server_proto    udp

[other]
ACCESS              tcp/443
ALLOW_IP            source
"""


def test_read_rc_stanzas(tmp_path: Path) -> None:
    path = tmp_path / "fwknoprc"
    path.write_text(RC)
    gate = read_key_file(str(path), "gate")
    assert gate == ClientProfile(KEYS, 40000, "tcp/22,udp/53", "198.18.0.5", 60, "alice")
    other = read_key_file(str(path), "other")
    assert (other.port, other.access, other.allow_ip, other.fw_timeout) == (
        62201, "tcp/443", "source", None,
    )  # fmt: skip
    assert read_key_file(str(path), None) == ClientProfile(KEYS)
    with pytest.raises(ConfigError) as info:
        read_key_file(str(path), "missing")
    assert "no stanza [missing]" in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"KEY_BASE64 {KEY_B64}\n", ":0: HMAC_KEY_BASE64: missing"),
        (f"KEY_BASE64 {KEY_B64}\nHMAC_KEY_BASE64 ***\n", ":2: HMAC_KEY_BASE64: not valid base64"),
        (
            f"# c\nKEY_BASE64 {KEY_B64}\nHMAC_KEY_BASE64 {HMAC_B64}\nSPA_SERVER_PORT 0\n",
            ":4: SPA_SERVER_PORT:",
        ),
        (f"KEY_BASE64 {KEY_B64}\nHMAC_KEY_BASE64 {HMAC_B64}\nFW_TIMEOUT soon\n", ":3: FW_TIMEOUT:"),
        (f"KEY_BASE64 {KEY_B64}\nHMAC_KEY_BASE64 {HMAC_B64}\nACCESS tcp/99999\n", ":3: ACCESS:"),
        (f"KEY_BASE64 {KEY_B64}\nHMAC_KEY_BASE64 {HMAC_B64}\nALLOW_IP nowhere\n", ":3: ALLOW_IP:"),
        (f"KEY_BASE64 {KEY_B64}\nHMAC_KEY_BASE64 {HMAC_B64}\nUSE_HMAC N\n", ":3: USE_HMAC:"),
        (
            f"KEY_BASE64 {KEY_B64}\nHMAC_KEY_BASE64 {HMAC_B64}\nHMAC_DIGEST_TYPE sha512\n",
            ":3: HMAC_DIGEST_TYPE:",
        ),
        (f"KEY_BASE64 {KEY_B64}\nHMAC_KEY_BASE64 {HMAC_B64}\nUSE_GPG Y\n", ":3: USE_GPG:"),
        (f"KEY_BASE64 {KEY_B64}\nHMAC_KEY_BASE64 {HMAC_B64}\nACCESS\n", ":3: ACCESS: no value"),
        (f"KEY_BASE64 {KEY_B64}\nHMAC_KEY_BASE64 {HMAC_B64}\n[]\n", ":3: stanza:"),
        (
            f"KEY_BASE64 {'A' * 60}\nHMAC_KEY_BASE64 {HMAC_B64}\n",
            ":1: KEY_BASE64: the Rijndael key must be",
        ),
    ],
)
def test_key_file_errors_name_file_and_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        read_key_file(str(path), None)
    assert f"{path}{expected}" in str(info.value), info.value.problems


def test_key_file_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        read_key_file(str(tmp_path / "absent"), None)
    assert "cannot read" in str(info.value)


def test_parse_access_keeps_a_repeated_port_once() -> None:
    assert parse_access("198.18.0.5,tcp/22,tcp/022,udp/22") == (
        "198.18.0.5",
        ((22, "tcp"), (22, "udp")),
    )
