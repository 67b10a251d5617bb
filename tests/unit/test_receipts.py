"""SPA receipts and dual-stack grants: the codec, and the engine's playbooks."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.core.engine import RECEIPT_BURST, RECEIPT_WINDOW, KnockEngine
from appliance.core.events import (
    Grant,
    SendReceipt,
    SpaAccepted,
    SpaDigestSeen,
    SpaKnock,
    SpaRefused,
    Vet,
    Vetted,
)
from appliance.core.model import Door, Knock, OpenPorts, Spa, SpaUser
from appliance.spa.receipt import (
    RECEIPT_SIZE,
    Receipt,
    ReceiptError,
    open_receipt,
    receipt_key,
    seal_receipt,
)
from appliance.spa.wire import SpaKeys
from tests.unit.helpers import play, steps

KEYS = SpaKeys(b"k" * 32, b"h" * 64)
KEY = receipt_key(KEYS)
DIGEST = hashlib.sha256(b"the request").digest()
READY = Receipt("ready", "198.18.5.2", 1_800_000_030.25, 30)

# ----------------------------------------------------------------- codec


def test_a_receipt_round_trips_and_has_one_size() -> None:
    for receipt in (
        READY,
        Receipt("starting", "2001:2::5", 1_800_000_000.0, 0),
        Receipt("ready", "0.0.0.0", 0.0, 2**32 - 1),
    ):
        data = seal_receipt(receipt, KEY, DIGEST)
        assert len(data) == RECEIPT_SIZE
        assert open_receipt(data, KEY, DIGEST) == receipt


def test_a_receipt_opens_only_for_the_request_it_answers() -> None:
    data = seal_receipt(READY, KEY, DIGEST)
    other = hashlib.sha256(b"another request").digest()
    with pytest.raises(ReceiptError, match="does not authenticate"):
        open_receipt(data, KEY, other)


def test_a_receipt_opens_only_with_the_users_keys() -> None:
    data = seal_receipt(READY, KEY, DIGEST)
    for keys in (SpaKeys(b"k" * 32, b"H" * 64), SpaKeys(b"K" * 32, b"h" * 64)):
        with pytest.raises(ReceiptError):
            open_receipt(data, receipt_key(keys), DIGEST)


def test_the_receipt_key_is_neither_spa_key() -> None:
    assert KEY not in (KEYS.encryption, KEYS.hmac)
    assert len(KEY) == 32


def test_a_fresh_nonce_each_time() -> None:
    assert seal_receipt(READY, KEY, DIGEST) != seal_receipt(READY, KEY, DIGEST)


@given(position=st.integers(0, RECEIPT_SIZE - 1), bit=st.integers(0, 7))
@settings(max_examples=200, deadline=None)
def test_any_flipped_bit_is_refused(position: int, bit: int) -> None:
    data = bytearray(seal_receipt(READY, KEY, DIGEST))
    data[position] ^= 1 << bit
    with pytest.raises(ReceiptError):
        open_receipt(bytes(data), KEY, DIGEST)


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_garbage_never_raises_anything_else(data: bytes) -> None:
    with pytest.raises(ReceiptError):
        open_receipt(data, KEY, DIGEST)


def test_truncated_or_extended_receipts_are_refused() -> None:
    data = seal_receipt(READY, KEY, DIGEST)
    for bad in (data[:-1], data + b"\0", b""):
        with pytest.raises(ReceiptError, match="bytes"):
            open_receipt(bad, KEY, DIGEST)


# ----------------------------------------------------------------- engine

CLIENT4, CLIENT6, SERVER = "198.18.5.1", "2001:2::1", "198.18.5.254"
ALICE = SpaUser("alice", b"k" * 32, b"h" * 32)
CAROL = SpaUser("carol", b"c" * 32, b"C" * 32, sources=("198.18.5.0/24", "2001:2::/64"))


def door(receipt: bool = True) -> Door:
    return Door(
        name="spa",
        knock=Knock(sequence=()),
        open=OpenPorts(steps(22), 30.0),
        spa=Spa(users=(ALICE, CAROL), receipt=receipt),
    )


def knock(
    ts: float, address: str, *, user: str = "alice", digest: bytes = b"d1", sport: int = 40000
) -> SpaKnock:
    return SpaKnock(
        ts,
        CLIENT4,
        "spa",
        user,
        "someone",
        int(ts),
        1,
        address,
        steps(22),
        None,
        digest.ljust(32, b"."),
        SERVER,
        sport,
    )


def test_a_granted_packet_gets_its_receipt_after_the_grant() -> None:
    engine = KnockEngine([door()])
    out = play(engine, knock(1000.0, CLIENT4))
    digest = b"d1".ljust(32, b".")
    assert out == [
        SpaDigestSeen(1000.0, "spa", CLIENT4, digest, 1000 + 3600 + 1.0),
        SpaAccepted(1000.0, "spa", CLIENT4, CLIENT4, "alice", steps(22), 1030.0),
        Grant(1000.0, "spa", CLIENT4, steps(22), 1030.0),
        SendReceipt(1000.0, "spa", "alice", CLIENT4, 40000, SERVER, digest, CLIENT4, 1030.0),
    ]
    assert engine.counters.receipts == 1


def test_no_receipt_without_the_door_option_or_a_source_port() -> None:
    for engine, event in (
        (KnockEngine([door(receipt=False)]), knock(1000.0, CLIENT4)),
        (KnockEngine([door()]), knock(1000.0, CLIENT4, sport=0)),
    ):
        out = play(engine, event)
        assert any(isinstance(c, Grant) for c in out)
        assert not any(isinstance(c, SendReceipt) for c in out)


def test_a_refused_or_replayed_packet_gets_no_receipt() -> None:
    engine = KnockEngine([door()])
    play(engine, knock(1000.0, CLIENT4))
    replay = play(engine, knock(1001.0, CLIENT4))
    assert replay == [SpaRefused(1001.0, "spa", CLIENT4, "alice", "replay")]
    stale = play(engine, knock(1002.0, CLIENT4, digest=b"d2")._replace(timestamp=1))
    assert stale == [SpaRefused(1002.0, "spa", CLIENT4, "alice", "stale")]


def test_a_vetting_refusal_gets_no_receipt() -> None:
    engine = KnockEngine([door()])
    (vet,) = [c for c in engine.handle(knock(1000.0, CLIENT4)) if isinstance(c, Vet)]
    out = engine.handle(Vetted(1000.0, vet.ticket, "held off as a port scanner"))
    assert not any(isinstance(c, (SendReceipt, Grant)) for c in out)


def test_receipts_are_rate_limited_per_source() -> None:
    engine = KnockEngine([door()])
    sent = []
    for i in range(RECEIPT_BURST + 3):
        out = play(engine, knock(1000.0 + i * 0.1, CLIENT4, digest=b"n%d" % i))
        assert any(isinstance(c, Grant) for c in out)  # the grant is never limited
        sent += [c for c in out if isinstance(c, SendReceipt)]
    assert len(sent) == RECEIPT_BURST
    assert engine.counters.receipts_limited == 3
    # Another source is not held back by this one; the first one again after the window.
    other = knock(1001.0, CLIENT4, digest=b"o")._replace(src="198.18.5.9")
    assert any(isinstance(c, SendReceipt) for c in play(engine, other))
    later = knock(1000.0 + RECEIPT_WINDOW + 1, CLIENT4, digest=b"late")
    assert any(isinstance(c, SendReceipt) for c in play(engine, later))


def test_a_dual_stack_knock_grants_each_address_with_its_own_receipt() -> None:
    """A dual-stack client sends one packet per address (both from its IPv4 address)."""
    engine = KnockEngine([door()])
    out = play(engine, knock(1000.0, CLIENT4, digest=b"v4"))
    out += play(engine, knock(1000.1, CLIENT6, digest=b"v6"))
    grants = [c for c in out if isinstance(c, Grant)]
    assert [g.address for g in grants] == [CLIENT4, CLIENT6]
    receipts = [c for c in out if isinstance(c, SendReceipt)]
    assert [(r.address, r.to, r.digest[:2]) for r in receipts] == [
        (CLIENT4, CLIENT4, b"v4"),
        (CLIENT6, CLIENT4, b"v6"),
    ]


def test_sources_bound_every_address_a_user_asks_for() -> None:
    engine = KnockEngine([door()])
    ok4 = play(engine, knock(1000.0, CLIENT4, user="carol", digest=b"a"))
    ok6 = play(engine, knock(1000.0, "2001:2::77", user="carol", digest=b"b"))
    assert Grant(1000.0, "spa", CLIENT4, steps(22), 1030.0) in ok4
    assert Grant(1000.0, "spa", "2001:2::77", steps(22), 1030.0) in ok6
    for address in ("198.18.6.1", "2001:2:0:1::1"):
        out = play(engine, knock(1000.0, address, user="carol", digest=address.encode()))
        assert out == [SpaRefused(1000.0, "spa", CLIENT4, "carol", "address")]
    # A user without sources may ask for any address (fwknop's -a), as before.
    anywhere = play(engine, knock(1000.0, "198.18.6.1", digest=b"any"))
    assert any(isinstance(c, Grant) for c in anywhere)


# ----------------------------------------------------------------- configuration


def _config(tmp_path: Path, receipt: str) -> str:
    from base64 import b64encode

    text = f"""\
doors:
  spa:
    spa:
      {receipt}
      users:
        alice: {{key_base64: {b64encode(b"k" * 32).decode()}, hmac_key_base64: {b64encode(b"h" * 64).decode()}}}
    open: {{ports: [22/tcp], duration: 30}}
"""
    path = tmp_path / "knockgate.yaml"
    path.write_text(text)
    return str(path)


def test_receipts_are_off_by_default_and_turned_on_per_door(tmp_path: Path) -> None:
    from appliance.config import load_config

    off = load_config(_config(tmp_path, "port: 62201")).config.door("spa")
    on = load_config(_config(tmp_path, "receipt: true")).config.door("spa")
    assert off is not None and off.spa is not None and not off.spa.receipt
    assert on is not None and on.spa is not None and on.spa.receipt


def test_a_receipt_option_that_is_not_a_boolean_names_its_key(tmp_path: Path) -> None:
    from appliance.config import load_config
    from appliance.errors import ConfigError

    with pytest.raises(ConfigError, match=r"doors\.spa\.spa\.receipt"):
        load_config(_config(tmp_path, "receipt: sometimes"))


def test_a_replay_of_a_receipt_door_prints_its_grants_and_no_receipt_line() -> None:
    from appliance.logformat import describe, record

    command = SendReceipt(1.0, "spa", "alice", CLIENT4, 40000, SERVER, bytes(32), CLIENT4, 31.0)
    assert describe(command) is None
    assert record(command)["event"] == "SendReceipt"


# ----------------------------------------------------------------- the monitor sends it

DAEMON_CONFIG = """\
status_socket: {socket}
state_dir: {state}
doors:
  spa:
    spa:
      port: {port}
      receipt: true
      users:
        alice: {{key_base64: {key}, hmac_key_base64: {hmac}}}
    open: {{ports: [22/tcp], duration: 30}}
"""


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("grant_fails", [False, True], ids=["granted", "grant-failed"])
def test_the_monitor_answers_from_the_spa_port_only_once_the_grant_is_made(
    tmp_path: Path, grant_fails: bool
) -> None:
    from appliance.config import load_config
    from appliance.core.events import Packet
    from appliance.firewall.memory import MemoryBackend
    from appliance.runtime.daemon import Daemon
    from appliance.spa.keyfile import generate_keys
    from appliance.spa.wire import new_message, replay_digest, seal

    key, hmac = generate_keys()
    spa_port = _free_udp_port()
    path = tmp_path / "k.yaml"
    path.write_text(
        DAEMON_CONFIG.format(
            socket=tmp_path / "s.sock", state=tmp_path / "state", port=spa_port, key=key,
            hmac=hmac,
        )
    )  # fmt: skip
    now = 1_800_000_000.0
    backend = MemoryBackend(lambda: now)
    if grant_fails:
        backend.fail = "grant"
    daemon = Daemon(
        load_config(str(path)), backend, clock=lambda: now, wall=lambda: now, capture=False
    )
    daemon.start()
    keys = SpaKeys.from_base64(key, hmac)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.bind(("127.0.0.1", 0))
            client.settimeout(0.5)
            data = seal(new_message("alice", int(now), "127.0.0.1,tcp/22"), keys)
            sport = client.getsockname()[1]
            daemon._item(Packet(now, "127.0.0.1", "127.0.0.1", "udp", spa_port, 0, data, sport))
            if grant_fails:
                with pytest.raises(TimeoutError):
                    client.recvfrom(2048)
                assert daemon.snapshot()["counters"]["receipts_sent"] == 0
                return
            answer, peer = client.recvfrom(2048)
        assert peer == ("127.0.0.1", spa_port)
        receipt = open_receipt(answer, receipt_key(keys), replay_digest(data))
        assert receipt == Receipt("ready", "127.0.0.1", now + 30, 30)
        assert daemon.snapshot()["counters"]["receipts_sent"] == 1
    finally:
        daemon.shutdown()
