"""fwknop Single Packet Authorization: Rijndael (AES-256-CBC) + HMAC-SHA256, as in fwknop 2.6.10.

Everything here was checked against fwknop's source (github.com/mrash/fwknop, ``lib/`` and
``server/``) and against the Debian ``fwknop-client`` 2.6.10 binary, whose packets are the
fixtures of ``tests/unit/test_spa_wire.py``.

Plaintext (``lib/fko_encode.c`` ``fko_encode_spa_data``; ``lib/fko_decode.c`` parses it back)::

    RANDOM:B64(user):TIMESTAMP:VERSION:TYPE:B64(message)[:B64(nat)][:B64(server_auth)][:TIMEOUT]
        followed by ":" + B64(digest of everything before that colon)

* ``RANDOM`` is 16 decimal digits (``FKO_RAND_VAL_SIZE``; ``_rijndael_decrypt`` in
  ``lib/fko_encryption.c`` checks 16 digits then ``:`` to tell a good decryption).
* Every base64 here is standard base64 with the ``=`` padding stripped (``strip_b64_eq``).
* ``VERSION`` is ``3.0.0`` (``FKO_PROTOCOL_VERSION``; 2.6.10 prints "FKO protocol version 3.0.0").
* ``TYPE``: 0 command, 1 access, 2 NAT access, 3 client-timeout access, 4 client-timeout NAT,
  5 local NAT, 6 client-timeout local NAT. ``nat`` is present for 2, 4, 5, 6; ``TIMEOUT``
  (decimal, 0..65536) is present and required for 3, 4, 6; ``server_auth`` is optional for
  all. ``fko_decode.c`` ``parse_msg_type`` caps the number of fields per type, and when a
  timeout type has one field left it is the timeout, two are server_auth then timeout.
* The digest type is told by the length of the last field (``is_valid_digest_len``):
  22 md5, 27 sha1, 43 sha256, 64 sha384, 86 sha512. The client default is sha256; there
  is no SHA-3 SPA digest in 2.6.10 (``fwknop -m`` offers md5..sha512 only).
* Field limits (``lib/fko_limits.h``): base64 username <= 64 chars, message/NAT/server_auth
  <= 256, timestamp <= 12 digits, version <= 8, type <= 2 digits; the whole plaintext is
  printable ASCII (``isprint``) of 36..1499 characters.
* The username (``fko_user.c`` ``validate_username``) is printable ASCII without
  ``" / \\ [ ] : ; | = , + * ? < >``.
* An access message is ``IP,proto/port[,proto/port...]`` (``fko_message.c``
  ``validate_access_msg``). fwknop also knows ``icmp`` and ``none``; this module accepts
  tcp and udp only (``bad-message`` otherwise), and IPv4 or IPv6 addresses.

Encryption (``lib/cipher_funcs.c`` ``rij_salt_and_iv``/``rij_encrypt``): an 8-byte random
salt; ``D1 = MD5(key || salt)``, ``Di = MD5(D(i-1) || key || salt)``; 48 bytes give the
AES-256 key (32) and the IV (16); the key is the raw (base64-decoded) key, 1..32 bytes.
The output is ``b"Salted__" + salt + AES-256-CBC(PKCS#7 padded plaintext)`` (OpenSSL's
``enc`` format), base64-encoded without ``=``. ``fko_get_spa_data`` (``lib/fko_funcs.c``)
drops the first 10 characters, ``U2FsdGVkX1`` (the base64 of ``Salted__`` up to the last
full sextet), so every real packet starts with one of ``8 9 + /`` (the 11th sextet carries
the last four ``1`` bits of ``_``).

HMAC (``lib/fko_hmac.c``): HMAC-SHA256 with the raw HMAC key over the base64 text WITH the
``U2FsdGVkX1`` prefix (``fko_spa_data_final`` computes it before the prefix is dropped;
``fko_verify_hmac`` calls ``add_salted_str`` before recomputing), base64 without ``=``
(43 characters), appended directly with no separator. Verified against the real client.

Server limits (``server/fwknopd_common.h``, ``server/incoming_spa.c``
``preprocess_spa_data``): the UDP payload is 140 (``MIN_SPA_DATA_SIZE``) to 1500
(``MAX_SPA_PACKET_LEN``) bytes, all base64 characters, and must NOT start with
``U2FsdGVkX1`` (a replay-evasion trick); libfko's ``is_valid_encoded_msg_len`` further
requires fewer than 1500 characters, so 1499 is the largest accepted here.

Differences from fwknopd, all stricter and none affecting packets fwknop's client makes:
the random field must be exactly 16 digits; PKCS#7 padding must be valid (libfko leaves bad
padding in place); the decoded ciphertext must start with ``Salted__``; the HMAC is compared
as text, so a non-canonical last base64 character does not verify; only the sha256 HMAC.

``authenticate``/``open_packet`` strip trailing ``\\r``, ``\\n``, NUL and space from the UDP
payload first (some senders add a newline); the replay digest is taken after that strip.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import hmac
import ipaddress
import secrets
from typing import NamedTuple

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "FKO_PROTOCOL_VERSION",
    "MAX_SPA_PACKET_LEN",
    "MIN_SPA_DATA_SIZE",
    "SpaError",
    "SpaKeys",
    "SpaMessage",
    "authenticate",
    "candidate",
    "new_message",
    "open_packet",
    "open_verified",
    "parse_access",
    "replay_digest",
    "seal",
    "verify",
]

FKO_PROTOCOL_VERSION = "3.0.0"
MIN_SPA_DATA_SIZE = 140  # server/fwknopd_common.h
MAX_SPA_PACKET_LEN = 1500  # server/fwknopd_common.h
_MAX_ENCODED = 1500  # lib/fko_limits.h MAX_SPA_ENCODED_MSG_SIZE; valid lengths are < this
_MIN_ENCODED = 36  # lib/fko_limits.h MIN_SPA_ENCODED_MSG_SIZE
_MAX_USERNAME_B64 = 64
_MAX_MESSAGE_B64 = 256
_MAX_TIMESTAMP = 12
_MAX_VERSION = 8
_MAX_CLIENT_TIMEOUT = 2 << 15  # fko_decode.c parse_client_timeout
_MAX_ENC_KEY = 32  # RIJNDAEL_MAX_KEYSIZE
_MAX_HMAC_KEY = 128  # MAX_DIGEST_BLOCK_LEN

_SALTED_B64 = b"U2FsdGVkX1"  # base64("Salted__") without its partial last sextet
_HMAC_B64_LEN = 43
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_STR = _B64_ALPHABET.decode()
# The 11th base64 character of "Salted__"+salt is 0b1111xx: the first byte of every packet.
_FIRST_CHARS = frozenset(b"89+/")
_STRIP = b"\r\n\0 "

# Base64 lengths (no '=') of the HMAC-covered text for "Salted__"+salt+16k bytes, k >= 1,
# minus the 10-character prefix that is not sent.
_BODY_LENGTHS = frozenset(
    (4 * (16 + 16 * k) + 2) // 3 - len(_SALTED_B64)
    for k in range(1, _MAX_ENCODED // 12)
    if (4 * (16 + 16 * k) + 2) // 3 - len(_SALTED_B64) + _HMAC_B64_LEN < _MAX_ENCODED
)

_DIGESTS = {22: "md5", 27: "sha1", 43: "sha256", 64: "sha384", 86: "sha512"}
_FORBIDDEN_USER_CHARS = frozenset('"/\\[]:;|=,+*?<>')
_TIMEOUT_TYPES = frozenset((3, 4, 6))
_NAT_TYPES = frozenset((2, 4, 5, 6))
# Fields allowed after the message (nat, server_auth, timeout), by type (parse_msg_type).
_MAX_EXTRA = {0: 1, 1: 1, 2: 2, 3: 2, 4: 3, 5: 2, 6: 3}

_AES = algorithms.AES
_CBC = modes.CBC
_hmac_new = hmac.new
_compare = hmac.compare_digest
_HMAC = hmac.HMAC


class SpaError(Exception):
    """A packet that is not a valid SPA packet for the given keys.

    ``reason`` is a short stable code: ``too-short``, ``too-long``, ``not-base64``,
    ``bad-prefix``, ``bad-length``, ``bad-hmac``, ``bad-ciphertext``, ``bad-padding``,
    ``bad-fields``, ``bad-digest``, ``bad-message``.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class SpaKeys:
    """One user's Rijndael and HMAC keys (raw bytes); immutable, build once and reuse."""

    __slots__ = ("_hmac_template", "encryption", "hmac")

    encryption: bytes
    hmac: bytes
    _hmac_template: _HMAC

    def __init__(self, encryption: bytes, hmac: bytes) -> None:
        encryption = bytes(encryption)
        hmac_key = bytes(hmac)
        if not 1 <= len(encryption) <= _MAX_ENC_KEY:
            raise ValueError(
                f"the Rijndael key must be 1 to {_MAX_ENC_KEY} bytes, not {len(encryption)}"
            )
        if not 1 <= len(hmac_key) <= _MAX_HMAC_KEY:
            raise ValueError(
                f"the HMAC key must be 1 to {_MAX_HMAC_KEY} bytes, not {len(hmac_key)}"
            )
        object.__setattr__(self, "encryption", encryption)
        object.__setattr__(self, "hmac", hmac_key)
        object.__setattr__(self, "_hmac_template", _hmac_new(hmac_key, digestmod=hashlib.sha256))

    @classmethod
    def from_base64(cls, key_b64: str, hmac_b64: str) -> SpaKeys:
        """Keys as ``fwknop --key-gen`` prints them (``=`` padding optional)."""
        return cls(_b64_key(key_b64, "KEY_BASE64"), _b64_key(hmac_b64, "HMAC_KEY_BASE64"))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("SpaKeys is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("SpaKeys is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SpaKeys):
            return NotImplemented
        return _compare(self.encryption, other.encryption) and _compare(self.hmac, other.hmac)

    def __hash__(self) -> int:
        return hash((self.encryption, self.hmac))

    def __repr__(self) -> str:
        return "SpaKeys(<redacted>)"

    def mac(self, text: bytes) -> bytes:
        """The HMAC-SHA256 of ``text`` (raw digest)."""
        mac = self._hmac_template.copy()
        mac.update(text)
        return mac.digest()


def _b64_key(text: str, name: str) -> bytes:
    text = text.strip().rstrip("=")
    if not text:
        raise ValueError(f"{name} is empty")
    try:
        raw = binascii.a2b_base64(text + "=" * (-len(text) % 4), strict_mode=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name} is not valid base64") from None
    if not raw:
        raise ValueError(f"{name} is empty")
    return raw


class SpaMessage(NamedTuple):
    """The fields of one SPA packet, decoded (base64 fields as text)."""

    random: str
    username: str
    timestamp: int
    version: str
    msg_type: int
    message: str
    nat_access: str | None = None
    server_auth: str | None = None
    client_timeout: int | None = None


def _b64(data: bytes) -> bytes:
    """Standard base64 without ``=`` padding or newline."""
    return binascii.b2a_base64(data, newline=False).rstrip(b"=")


def _strip(data: bytes) -> bytes:
    return bytes(data).rstrip(_STRIP)


def _precheck(data: bytes) -> str | None:
    """Why stripped ``data`` cannot be an SPA packet at all (no hashing), or ``None``."""
    size = len(data)
    if size < MIN_SPA_DATA_SIZE:
        return "too-short"
    if size >= _MAX_ENCODED:
        return "too-long"
    if data[0] not in _FIRST_CHARS:
        # Covers a leading "U2FsdGVkX1" too (fwknopd rejects those), but name it.
        return "bad-prefix" if data.startswith(_SALTED_B64) else "bad-ciphertext"
    if data.translate(None, _B64_ALPHABET):
        return "not-base64"
    if size - _HMAC_B64_LEN not in _BODY_LENGTHS:
        return "bad-length"
    return None


def _mac(data: bytes, keys: SpaKeys) -> bytes | None:
    """The HMAC-covered text (prefix included) of prechecked ``data``, if its HMAC verifies."""
    covered = _SALTED_B64 + data[:-_HMAC_B64_LEN]
    computed = binascii.b2a_base64(keys.mac(covered), newline=False)[:_HMAC_B64_LEN]
    return covered if hmac.compare_digest(computed, data[-_HMAC_B64_LEN:]) else None


def _check_mac(data: bytes, keys: SpaKeys) -> bytes | str:
    """The HMAC-covered text (prefix included) of an authentic packet, else a reason code."""
    reason = _precheck(data)
    if reason is not None:
        return reason
    covered = _mac(data, keys)
    return "bad-hmac" if covered is None else covered


def candidate(data: bytes) -> bytes | None:
    """A UDP payload, stripped, if it can be an SPA packet at all; ``None`` otherwise.

    The cheap checks of :func:`authenticate` (length, first character, charset, length
    class), done once per packet however many users' keys are then tried.
    """
    text = _strip(data)
    return None if _precheck(text) is not None else text


def verify(text: bytes, keys: SpaKeys) -> bytes | None:
    """For a :func:`candidate`: its HMAC-covered text if ``keys`` verify it, else ``None``."""
    return _mac(text, keys)


def open_verified(covered: bytes, keys: SpaKeys) -> SpaMessage:
    """Decrypt and parse what :func:`verify` returned (no second HMAC); raise SpaError."""
    return _parse(_decrypt(covered, keys))


def authenticate(data: bytes, keys: SpaKeys) -> bool:
    """Whether ``data`` (a UDP payload) carries a valid HMAC for ``keys``.

    Trailing ``\\r``, ``\\n``, NUL and space are stripped first. Garbage is rejected by
    length, first-character, charset and length-class checks before any hashing.
    """
    return not isinstance(_check_mac(_strip(data), keys), str)


def replay_digest(data: bytes) -> bytes:
    """SHA-256 of the stripped packet text (ciphertext and HMAC): the replay-cache key.

    Every packet that :func:`open_packet` accepts has exactly one such text (the HMAC is
    compared as canonical text), so a replay cannot dodge the cache by re-encoding.
    This is the raw form of fwknopd's own replay digest (sha256 of the payload).
    """
    return hashlib.sha256(_strip(data)).digest()


def _derive(key: bytes, salt: bytes) -> tuple[bytes, bytes]:
    """OpenSSL EVP_BytesToKey(MD5, 1 round): 32-byte key and 16-byte IV."""
    d1 = hashlib.md5(key + salt).digest()
    d2 = hashlib.md5(d1 + key + salt).digest()
    d3 = hashlib.md5(d2 + key + salt).digest()
    return d1 + d2, d3


def _decrypt(covered: bytes, keys: SpaKeys) -> bytes:
    text = covered + b"=" * (-len(covered) % 4)
    try:
        raw = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        raise SpaError("bad-ciphertext", "undecodable base64") from None
    if len(raw) < 32 or len(raw) % 16 or raw[:8] != b"Salted__":
        raise SpaError("bad-ciphertext", "no Salted__ header or partial block")
    key, iv = _derive(keys.encryption, raw[8:16])
    decryptor = Cipher(_AES(key), _CBC(iv)).decryptor()
    plain = decryptor.update(raw[16:]) + decryptor.finalize()
    pad = plain[-1]
    if not 1 <= pad <= 16 or plain[-pad:] != bytes((pad,)) * pad:
        raise SpaError("bad-padding")
    return plain[:-pad]


def _is_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _field_b64(text: str, limit: int, what: str) -> str:
    if not 1 <= len(text) <= limit or len(text) % 4 == 1 or text.strip(_B64_STR):
        raise SpaError("bad-fields", f"{what} is not base64 of 1..{limit} characters")
    raw = binascii.a2b_base64(text + "=" * (-len(text) % 4))
    if not raw.isascii():
        raise SpaError("bad-fields", f"{what} is not ASCII")
    value = raw.decode("ascii")
    if not value or not value.isprintable():
        raise SpaError("bad-fields", f"{what} is empty or not printable")
    return value


def _parse(plain: bytes) -> SpaMessage:
    if not _MIN_ENCODED <= len(plain) < _MAX_ENCODED or not plain.isascii():
        raise SpaError("bad-fields", "plaintext length or charset")
    text = plain.decode("ascii")
    if not text.isprintable() or not _is_digits(text[:16]) or text[16:17] != ":":
        raise SpaError("bad-fields", "not 16 random digits and a colon")
    head, _, digest = text.rpartition(":")
    name = _DIGESTS.get(len(digest))
    if name is None:
        raise SpaError("bad-digest", f"no digest has a {len(digest)}-character base64")
    expected = _b64(hashlib.new(name, head.encode("ascii")).digest())
    if not hmac.compare_digest(expected, digest.encode("ascii")):
        raise SpaError("bad-digest", f"{name} digest mismatch")

    fields = head.split(":")
    if len(fields) < 6:
        raise SpaError("bad-fields", "fewer than 7 fields")
    random_val, user_b64, stamp, version, type_text, msg_b64, *extra = fields
    if len(random_val) != 16:
        raise SpaError("bad-fields", "random value is not 16 digits")
    username = _field_b64(user_b64, _MAX_USERNAME_B64, "username")
    if _FORBIDDEN_USER_CHARS.intersection(username):
        raise SpaError("bad-fields", "username has a forbidden character")
    if not 1 <= len(stamp) <= _MAX_TIMESTAMP or not _is_digits(stamp):
        raise SpaError("bad-fields", "timestamp")
    if not 1 <= len(version) <= _MAX_VERSION:
        raise SpaError("bad-fields", "version")
    if not 1 <= len(type_text) <= 2 or not _is_digits(type_text) or int(type_text) > 6:
        raise SpaError("bad-fields", "message type")
    msg_type = int(type_text)
    if len(extra) > _MAX_EXTRA[msg_type]:
        raise SpaError("bad-fields", f"too many fields for message type {msg_type}")
    message = _field_b64(msg_b64, _MAX_MESSAGE_B64, "message")

    nat_access = server_auth = None
    client_timeout = None
    if msg_type in _NAT_TYPES:
        if not extra:
            raise SpaError("bad-fields", "NAT access field missing")
        nat_access = _field_b64(extra.pop(0), _MAX_MESSAGE_B64, "NAT access")
    if msg_type in _TIMEOUT_TYPES:
        if not extra:
            raise SpaError("bad-fields", "client timeout missing")
        timeout = extra.pop()
        if not 1 <= len(timeout) <= 5 or not _is_digits(timeout):
            raise SpaError("bad-fields", "client timeout")
        client_timeout = int(timeout)
        if client_timeout > _MAX_CLIENT_TIMEOUT:
            raise SpaError("bad-fields", "client timeout too large")
    if extra:
        server_auth = _field_b64(extra[0], _MAX_MESSAGE_B64, "server auth")

    if msg_type == 0:
        address, _, command = message.partition(",")
        if not command:
            raise SpaError("bad-message", "command message without a command")
        _parse_address(address)
    else:
        parse_access(message)
    if nat_access is not None:
        host, _, port = nat_access.partition(",")
        if not host or not _valid_port(port):
            raise SpaError("bad-message", "NAT access is not host,port")
    return SpaMessage(
        random_val,
        username,
        int(stamp),
        version,
        msg_type,
        message,
        nat_access,
        server_auth,
        client_timeout,
    )


def open_packet(data: bytes, keys: SpaKeys) -> SpaMessage:
    """Authenticate, decrypt and parse one UDP payload; raise :class:`SpaError` on any fault."""
    checked = _check_mac(_strip(data), keys)
    if isinstance(checked, str):
        raise SpaError(checked)
    return _parse(_decrypt(checked, keys))


def _valid_port(text: str) -> bool:
    return 1 <= len(text) <= 5 and _is_digits(text) and 1 <= int(text) <= 65535


def _parse_address(text: str) -> str:
    octets = text.split(".")
    if len(octets) == 4 and all(
        0 < len(o) <= 3 and o.isascii() and o.isdigit() and (o == "0" or o[0] != "0")
        for o in octets
    ):
        if max(map(int, octets)) <= 255:
            return text  # the common case, already in ipaddress's normal form
        raise SpaError("bad-message", f"bad allow address {text!r}")
    if not text or not text.isascii() or "%" in text:
        raise SpaError("bad-message", "no allow address")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise SpaError("bad-message", f"bad allow address {text!r}") from None


@functools.lru_cache(maxsize=1024)
def parse_access(message: str) -> tuple[str, tuple[tuple[int, str], ...]]:
    """``"198.18.0.5,tcp/22,udp/53"`` -> ``("198.18.0.5", ((22, "tcp"), (53, "udp")))``.

    The address is IPv4 or IPv6 (normalised); protocols are ``tcp``/``udp`` and ports
    1-65535; a port named twice is kept once (a firewall batch must not name it twice).
    Raises :class:`SpaError` with reason ``bad-message``. Results are cached (an LRU of
    1024): the same user sends the same access string again and again.
    """
    address, *specs = message.split(",")
    allow = _parse_address(address)
    if not specs:
        raise SpaError("bad-message", "no proto/port")
    ports: list[tuple[int, str]] = []
    for spec in specs:
        proto, slash, port = spec.partition("/")
        if not slash or proto not in ("tcp", "udp") or not _valid_port(port):
            raise SpaError("bad-message", f"bad proto/port {spec!r}")
        ports.append((int(port), proto))
    return allow, tuple(dict.fromkeys(ports))  # "tcp/22,tcp/022": one port, once


def new_message(
    username: str, timestamp: int, access: str, client_timeout: int | None = None
) -> SpaMessage:
    """An access request like ``fwknop -A``: type 1, or 3 with a (non-zero) client timeout."""
    parse_access(access)
    random_val = str(10**15 + secrets.randbelow(9 * 10**15))  # 16 digits, like fwknop's
    if client_timeout:
        return SpaMessage(
            random_val,
            username,
            timestamp,
            FKO_PROTOCOL_VERSION,
            3,
            access,
            client_timeout=client_timeout,
        )
    return SpaMessage(random_val, username, timestamp, FKO_PROTOCOL_VERSION, 1, access)


def _encode(message: SpaMessage) -> str:
    """The plaintext before its digest, exactly as fko_encode_spa_data builds it."""
    if len(message.random) != 16 or not _is_digits(message.random):
        raise ValueError("random must be 16 digits")
    if not 0 <= message.timestamp < 10**_MAX_TIMESTAMP:
        raise ValueError("timestamp out of range")
    if not 0 <= message.msg_type <= 6:
        raise ValueError("msg_type must be 0..6")
    if not message.version or len(message.version) > _MAX_VERSION or ":" in message.version:
        raise ValueError("bad version")
    if (message.nat_access is not None) != (message.msg_type in _NAT_TYPES):
        raise ValueError("nat_access is required for, and only for, NAT message types")
    if (message.client_timeout is not None) != (message.msg_type in _TIMEOUT_TYPES):
        raise ValueError("client_timeout is required for, and only for, types 3, 4, 6")
    parts = [
        message.random,
        _b64(message.username.encode()).decode(),
        str(message.timestamp),
        message.version,
        str(message.msg_type),
        _b64(message.message.encode()).decode(),
    ]
    if message.nat_access is not None:
        parts.append(_b64(message.nat_access.encode()).decode())
    if message.server_auth is not None:
        parts.append(_b64(message.server_auth.encode()).decode())
    if message.client_timeout is not None:
        parts.append(str(message.client_timeout))
    return ":".join(parts)


def seal(message: SpaMessage, keys: SpaKeys, *, salt: bytes | None = None) -> bytes:
    """Build the UDP payload fwknop's client would send (sha256 digest, HMAC-SHA256).

    Raises :class:`ValueError` if ``message`` would not open (checked by parsing it back).
    """
    if salt is None:
        salt = secrets.token_bytes(8)
    elif len(salt) != 8:
        raise ValueError("salt must be 8 bytes")
    head = _encode(message)
    plain = f"{head}:{_b64(hashlib.sha256(head.encode()).digest()).decode()}".encode()
    try:
        if _parse(plain) != message:
            raise ValueError("message does not survive encoding")
    except SpaError as problem:
        raise ValueError(f"message would not open: {problem}") from None
    pad = 16 - len(plain) % 16
    key, iv = _derive(keys.encryption, salt)
    encryptor = Cipher(_AES(key), _CBC(iv)).encryptor()
    cipher = encryptor.update(plain + bytes((pad,)) * pad) + encryptor.finalize()
    covered = _b64(b"Salted__" + salt + cipher)
    packet = covered[len(_SALTED_B64) :] + _b64(keys.mac(covered))
    if not MIN_SPA_DATA_SIZE <= len(packet) < _MAX_ENCODED:
        raise ValueError(f"packet would be {len(packet)} bytes, outside fwknop's limits")
    return packet
