"""The SPA client on loopback: addresses asked for, one packet each, receipts awaited.

A UDP socket on 127.0.0.1 stands in for the server: it opens what the client sends
with the user's keys and answers with receipts, as the daemon's monitor does.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from appliance.errors import KnockError
from appliance.knocker.spa import (
    SpaRequest,
    allow_addresses,
    describe,
    own_addresses,
    send_spa,
    wait_receipts,
)
from appliance.spa.keyfile import ClientProfile
from appliance.spa.receipt import Receipt, receipt_key, seal_receipt
from appliance.spa.wire import SpaKeys, open_packet, parse_access, replay_digest

KEYS = SpaKeys(b"k" * 32, b"h" * 64)
LOOP = "127.0.0.1"


@pytest.fixture
def server() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOP, 0))
        sock.settimeout(2)
        yield sock


def request(port: int, **fields: object) -> SpaRequest:
    return SpaRequest(ClientProfile(KEYS), port, "tcp/22", username="alice", **fields)  # type: ignore[arg-type]


def test_the_address_the_packet_leaves_from_by_default() -> None:
    assert allow_addresses(socket.AF_INET, LOOP, request(62201)) == [LOOP]


def test_addresses_given_are_asked_for_each_once() -> None:
    asked = request(62201, allow_ips=("198.18.0.1", "2001:2::1", "198.18.0.1"))
    assert allow_addresses(socket.AF_INET, LOOP, asked) == ["198.18.0.1", "2001:2::1"]


def test_source_means_the_sender_and_only_it() -> None:
    assert allow_addresses(socket.AF_INET, LOOP, request(1, source=True)) == ["0.0.0.0"]
    with pytest.raises(KnockError, match="one address"):
        allow_addresses(socket.AF_INET, LOOP, request(1, allow_ips=("source", "198.18.0.1")))


def test_dual_stack_and_given_addresses_do_not_mix() -> None:
    with pytest.raises(KnockError, match="--dual-stack"):
        allow_addresses(socket.AF_INET, LOOP, request(1, dual_stack=True, allow_ips=("::1",)))


def test_dual_stack_without_the_other_family_warns_and_asks_for_one() -> None:
    warnings: list[str] = []
    found = own_addresses(socket.AF_INET, LOOP, LOOP, 62201, warnings.append)
    assert found == [LOOP]
    assert len(warnings) == 1 and "no IPv6 address" in warnings[0]


def test_one_packet_per_address_each_with_its_own_receipt(server: socket.socket) -> None:
    port = server.getsockname()[1]
    asked = request(port, allow_ips=("198.18.0.1", "2001:2::1"))
    sent = send_spa(socket.AF_INET, LOOP, asked, 1_800_000_000.0, keep=True)
    assert [one.allow for one in sent] == ["198.18.0.1", "2001:2::1"]
    key = receipt_key(KEYS)
    for _ in sent:
        data, peer = server.recvfrom(2048)
        message = open_packet(data, KEYS)
        allow, _ports = parse_access(message.message)
        digest = replay_digest(data)
        # Noise first: a receipt for another request, and garbage; both are ignored.
        server.sendto(seal_receipt(Receipt("ready", allow, 1.0, 1), key, bytes(32)), peer)
        server.sendto(b"garbage", peer)
        server.sendto(seal_receipt(Receipt("starting", allow, 1e9, 30), key, digest), peer)
    found = wait_receipts(sent, KEYS, 2.0)
    assert found == [
        Receipt("starting", "198.18.0.1", 1e9, 30),
        Receipt("starting", "2001:2::1", 1e9, 30),
    ]
    assert all(one.sock is None for one in sent)  # closed
    first = found[0]
    assert first is not None and "198.18.0.1 let in until" in describe(first)
    assert describe(first).endswith("(30 s), service starting")


def test_no_receipt_in_time_is_none(server: socket.socket) -> None:
    port = server.getsockname()[1]
    sent = send_spa(socket.AF_INET, LOOP, request(port), 1_800_000_000.0, keep=True)
    assert wait_receipts(sent, KEYS, 0.2) == [None]


def test_without_keep_the_sockets_are_closed_at_once(server: socket.socket) -> None:
    port = server.getsockname()[1]
    sent = send_spa(socket.AF_INET, LOOP, request(port), 1_800_000_000.0)
    assert [one.sock for one in sent] == [None]
    assert len(server.recv(2048)) == sent[0].size


def test_resolve_is_the_address_we_leave_from_in_any_case() -> None:
    asked = request(62201, allow_ip="RESOLVE")
    assert allow_addresses(socket.AF_INET, LOOP, asked) == [LOOP]


def test_dual_stack_wins_over_the_key_files_allow_ip() -> None:
    asked = request(62201, allow_ip="source", dual_stack=True, host=LOOP)
    assert allow_addresses(socket.AF_INET, LOOP, asked, lambda line: None) == [LOOP]
