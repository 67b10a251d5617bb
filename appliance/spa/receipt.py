"""SPA receipts: the one datagram a door with ``spa: {receipt: true}`` sends back.

After an SPA packet verified, decrypted, passed the engine's policy and was granted,
the monitor answers the packet's source address and port with one UDP datagram. Only
the holder of the user's keys can read it, and it is bound to the request it answers.

Construction (AES-256-GCM, RFC 5116, from the user's own SPA key material)::

    key     = HKDF-SHA256(ikm = rijndael_key || hmac_key, salt = "",
                          info = "knockgate receipt v1", length = 32)
    aad     = "knockgate receipt v1" || request digest (SHA-256 of the stripped SPA
              packet text: wire.replay_digest, the replay cache's key)
    receipt = nonce (12 random bytes) || AES-256-GCM(key, nonce, plaintext, aad)

Plaintext, fixed size (``PLAIN.size`` = 32 bytes), so that a receipt's size does not
depend on the address family, the state or the deadline::

    version (u8, 1) | state (u8: 1 starting, 2 ready) | family (u8: 4 or 6) | pad (u8)
    | deadline (u64: unix time in milliseconds) | granted address (16 bytes, IPv4 in
    the first 4) | seconds granted (u32)

A receipt is ``RECEIPT_SIZE`` = 12 + 32 + 16 = 60 bytes. Its key is derived (HKDF) from
both SPA keys with a label of its own, so it is never the key of an SPA packet, and a
receipt (binary) can never pass as an SPA packet (base64 text of 140 bytes or more).
Binding: the digest is authenticated data, so a receipt opens only for the request it
answers; an attacker who captured one cannot make it answer another packet.
"""

from __future__ import annotations

import ipaddress
import secrets
import struct
from typing import Literal, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.spa.wire import SpaKeys

__all__ = [
    "RECEIPT_SIZE",
    "Receipt",
    "ReceiptError",
    "open_receipt",
    "receipt_key",
    "seal_receipt",
]

LABEL = b"knockgate receipt v1"
VERSION = 1
NONCE_SIZE = 12
TAG_SIZE = 16
PLAIN = struct.Struct("!BBBxQ16sI")
RECEIPT_SIZE = NONCE_SIZE + PLAIN.size + TAG_SIZE
DIGEST_SIZE = 32
State = Literal["starting", "ready"]
_STATES: dict[str, int] = {"starting": 1, "ready": 2}
_STATE_NAMES: dict[int, State] = {1: "starting", 2: "ready"}
_MAX_SECONDS = 2**32 - 1


class ReceiptError(Exception):
    """A datagram that is not a receipt for this request under these keys."""


class Receipt(NamedTuple):
    """What a receipt says: ``address`` is let in until ``deadline`` (unix time),
    ``seconds`` from when it was granted; the service is ``state``."""

    state: State
    address: str
    deadline: float
    seconds: int


def receipt_key(keys: SpaKeys) -> bytes:
    """The AES-256-GCM key of a user's receipts (HKDF over both SPA keys)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=LABEL)
    return hkdf.derive(keys.encryption + keys.hmac)


def _aad(digest: bytes) -> bytes:
    if len(digest) != DIGEST_SIZE:
        raise ValueError(f"a request digest is {DIGEST_SIZE} bytes, not {len(digest)}")
    return LABEL + digest


def seal_receipt(
    receipt: Receipt, key: bytes, digest: bytes, *, nonce: bytes | None = None
) -> bytes:
    """The datagram for ``receipt``, answering the request whose digest is ``digest``."""
    address = ipaddress.ip_address(receipt.address)
    packed = address.packed.ljust(16, b"\0")
    deadline_ms = round(receipt.deadline * 1000)
    if not 0 <= deadline_ms < 2**64:
        raise ValueError("deadline out of range")
    seconds = min(max(0, receipt.seconds), _MAX_SECONDS)
    plain = PLAIN.pack(
        VERSION, _STATES[receipt.state], address.version, deadline_ms, packed, seconds
    )
    if nonce is None:
        nonce = secrets.token_bytes(NONCE_SIZE)
    elif len(nonce) != NONCE_SIZE:
        raise ValueError(f"a nonce is {NONCE_SIZE} bytes")
    return nonce + AESGCM(key).encrypt(nonce, plain, _aad(digest))


def open_receipt(data: bytes, key: bytes, digest: bytes) -> Receipt:
    """Authenticate and decode a receipt for the request ``digest``; raise ReceiptError."""
    if len(data) != RECEIPT_SIZE:
        raise ReceiptError(f"a receipt is {RECEIPT_SIZE} bytes, not {len(data)}")
    try:
        plain = AESGCM(key).decrypt(data[:NONCE_SIZE], data[NONCE_SIZE:], _aad(digest))
    except InvalidTag:
        raise ReceiptError("does not authenticate (other keys, other request or altered)") from None
    version, state, family, deadline_ms, packed, seconds = PLAIN.unpack(plain)
    if version != VERSION or state not in _STATE_NAMES or family not in (4, 6):
        raise ReceiptError("unknown version, state or family")
    address = ipaddress.ip_address(packed[:4] if family == 4 else packed)
    return Receipt(_STATE_NAMES[state], str(address), deadline_ms / 1000, seconds)
