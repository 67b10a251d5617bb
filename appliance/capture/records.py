"""What the packet process tells the monitor: compact records, one message per batch.

The packet process reads untrusted bytes; the monitor must assume it may be compromised.
So its messages are plain ``struct`` records (never pickle), each of a known kind and
bounded size, and :class:`RecordReader` checks every field: protocols and ports in range,
addresses of the right length, SPA doors and users that the configuration has, a digest
of the right size. A record that fails is counted (``malformed``) and dropped with the
rest of its message; nothing raises. Timestamps are not sent: the monitor stamps a batch
with its own clock when it reads it.

A message: ``MAGIC`` then records, each a kind byte and its body:

* ``PACKET4`` / ``PACKET6``: protocol, TCP flags, destination port, source, destination
  (4 or 16 bytes each): a :class:`~appliance.core.events.Packet` without payload;
* ``SPA``: a length (2 bytes) and an authenticated knock
  (:class:`~appliance.core.events.SpaKnock`), strings as length + UTF-8;
* ``SPA_FROM``: an ``SPA`` record followed by where the packet went and came from:
  its destination (length + text, an address of the source's family, or empty) and UDP source
  port (2 bytes; 0: none), what a receipt is sent from and to. The packet process
  sends this kind; the monitor still reads ``SPA`` (no receipt possible);
* ``COUNTERS``: the packet process's running totals (frames, kernel drops, undecoded,
  rejected by reason, SPA counters), latest wins;
* ``LOG``: a log line of the packet process (logger, level, text), logged by the monitor
  with control characters replaced (the text may carry packet addresses, never a line break);
* ``FAILED``: the capture socket the monitor passed as ``key`` failed (errno): the packet
  process closed it, the monitor opens a new one.

Addresses in SPA records must be in canonical form (``str(ip_address(text)) == text``), so
no scope id (``fe80::1%eth0``: any characters) and no second spelling reach the engine.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from socket import AF_INET6, inet_aton, inet_ntoa, inet_ntop, inet_pton
from typing import NamedTuple

from appliance.capture.checksum import REASONS
from appliance.capture.spa import SpaCounters
from appliance.core.events import Packet, SpaKnock
from appliance.core.model import Door, Step

MAGIC = b"K1"
MAX_MESSAGE = 64 * 1024  # a batch of 256 packets is 10 KiB; an SPA knock under 1 KiB
PACKET4, PACKET6, SPA, COUNTERS, LOG, SPA_FROM, FAILED = 1, 2, 3, 4, 5, 6, 7
_PROTOS = {6: "tcp", 17: "udp"}
_NUMBERS = {"tcp": 6, "udp": 17}
_P4 = struct.Struct("!BBBH4s4s")  # kind, proto, flags, port, src, dst
_P6 = struct.Struct("!BBBH16s16s")
_SPA_HEAD = struct.Struct("!BH")  # kind, body length
_SPA_FIXED = struct.Struct("!qiqB")  # timestamp, msg_type, client_timeout, has_timeout
_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_PORT = struct.Struct("!HB")
COUNTER_NAMES: tuple[str, ...] = (
    "frames",
    "frames_dropped",
    "undecoded",
    *REASONS,
    *SpaCounters().as_dict(),
)
_COUNTERS = struct.Struct("!B" + "Q" * len(COUNTER_NAMES))
_LOG_HEAD = struct.Struct("!BBBH")  # kind, logger, level, length
_FAILED = struct.Struct("!BIH")  # kind, the socket's key, errno
LOGGERS = ("knockgate.capture", "knockgate.spa")
LEVELS = (logging.INFO, logging.WARNING, logging.ERROR)
MAX_LOG = 1024
MAX_NAMES = 1024  # IPv4 destinations' text kept (the host's addresses, doors' targets)
MAX_TEXT = 255  # a door's, user's or client's name
MAX_PORTS = 64
DIGEST_SIZE = 32  # SHA-256


# ----------------------------------------------------------------- encoding (the child)


def encode_packet(packet: Packet) -> bytes:
    """``packet`` without its payload (OSError on an address that is not one: a bug)."""
    proto = _NUMBERS[packet.proto]
    if ":" in packet.src:
        src, dst = inet_pton(AF_INET6, packet.src), inet_pton(AF_INET6, packet.dst)
        return _P6.pack(PACKET6, proto, packet.flags, packet.dport, src, dst)
    src, dst = inet_aton(packet.src), inet_aton(packet.dst)
    return _P4.pack(PACKET4, proto, packet.flags, packet.dport, src, dst)


def _text(value: str) -> bytes:
    data = value.encode("utf-8", "surrogatepass")[:MAX_TEXT]
    return _U8.pack(len(data)) + data


def encode_spa(knock: SpaKnock) -> bytes:
    timeout = knock.client_timeout
    body = b"".join(
        (
            _text(knock.src),
            _text(knock.door),
            _text(knock.user),
            _text(knock.username),
            _text(knock.address),
            _SPA_FIXED.pack(
                knock.timestamp, knock.msg_type, timeout or 0, 0 if timeout is None else 1
            ),
            _U8.pack(len(knock.ports)),
            *(_PORT.pack(step.port, _NUMBERS[step.proto]) for step in knock.ports),
            _U8.pack(len(knock.digest)),
            knock.digest,
            _text(knock.dst),
            _U16.pack(knock.sport),
        )
    )
    return _SPA_HEAD.pack(SPA_FROM, len(body)) + body


def encode_counters(values: Mapping[str, int]) -> bytes:
    return _COUNTERS.pack(COUNTERS, *(values.get(name, 0) for name in COUNTER_NAMES))


def encode_log(logger: str, level: int, text: str) -> bytes:
    name = LOGGERS.index(logger) if logger in LOGGERS else 0
    rank = sum(1 for known in LEVELS[1:] if level >= known)
    data = text.encode("utf-8", "replace")[:MAX_LOG]
    return _LOG_HEAD.pack(LOG, name, rank, len(data)) + data


def encode_failed(key: int, number: int) -> bytes:
    return _FAILED.pack(FAILED, key, min(max(number, 1), 4095))


# ----------------------------------------------------------------- decoding (the monitor)

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class LogLine(NamedTuple):
    """A log line of the packet process, made safe to log (no control characters)."""

    logger: str
    level: int
    text: str


class Malformed(Exception):
    """A record that is not what the packet process may send (counted, never raised out)."""


def _canonical(text: str) -> str:
    """``text`` if it is an IP address written as the monitor would write it."""
    if "%" in text or str(ipaddress.ip_address(text)) != text:
        raise Malformed(f"address not in canonical form: {text!r}")
    return text


def _address6(data: bytes) -> str:
    # decode.py's canonical form: ipaddress's (libc prints ::/80 in dotted form).
    if data[:10] == bytes(10):
        return str(ipaddress.IPv6Address(data))
    return inet_ntop(AF_INET6, data)


@dataclass
class Batch:
    """One message, decoded: the events for the engine, and the counters if it had any."""

    events: list[Packet | SpaKnock] = field(default_factory=list)
    counters: dict[str, int] | None = None
    logs: list[LogLine] = field(default_factory=list)
    failed: list[tuple[int, int]] = field(default_factory=list)  # (socket key, errno)


class RecordReader:
    """Decodes and validates the packet process's messages.

    ``spa_users``: door name -> the names of its SPA users, from the configuration in
    force (:meth:`doors`); a knock for another door or user is malformed.
    """

    def __init__(self, spa_users: Mapping[str, frozenset[str]] | None = None) -> None:
        self.spa_users: Mapping[str, frozenset[str]] = spa_users or {}
        self.malformed = 0  # messages (or their rest) dropped as malformed
        self._names: dict[bytes, str] = {}

    def read(self, data: bytes, now: float) -> Batch:
        """The records of one message, stamped ``now``; whatever is malformed is counted
        and dropped with the rest of the message (what came before it stands)."""
        batch = Batch()
        if len(data) > MAX_MESSAGE or data[:2] != MAGIC:
            self.malformed += 1
            return batch
        events = batch.events
        append = events.append
        offset, size = 2, len(data)
        p4, p6, size4 = _P4.unpack_from, _P6.unpack_from, _P4.size
        protos, new = _PROTOS, tuple.__new__
        names = self._names  # destinations: the host's few addresses (bounded below)
        if len(names) > MAX_NAMES:
            names.clear()
        try:
            while offset < size:
                kind = data[offset]
                if kind == PACKET4:
                    _, proto, flags, port, src, dst = p4(data, offset)
                    offset += size4
                    text = names.get(dst)
                    if text is None:
                        text = names[dst] = inet_ntoa(dst)
                    append(
                        new(Packet, (now, inet_ntoa(src), text, protos[proto], port, flags, b"", 0))
                    )
                elif kind == PACKET6:
                    _, proto, flags, port, src, dst = p6(data, offset)
                    offset += _P6.size
                    append(Packet(now, _address6(src), _address6(dst), protos[proto], port, flags))
                elif kind in (SPA, SPA_FROM):
                    _, length = _SPA_HEAD.unpack_from(data, offset)
                    offset += _SPA_HEAD.size
                    if offset + length > size:
                        raise Malformed("SPA record cut short")
                    append(self._spa(data[offset : offset + length], now, kind == SPA_FROM))
                    offset += length
                elif kind == COUNTERS:
                    values = _COUNTERS.unpack_from(data, offset)[1:]
                    offset += _COUNTERS.size
                    batch.counters = dict(zip(COUNTER_NAMES, values, strict=True))
                elif kind == LOG:
                    _, name, rank, length = _LOG_HEAD.unpack_from(data, offset)
                    offset += _LOG_HEAD.size
                    raw = data[offset : offset + length]
                    offset += length
                    if len(raw) != length or length > MAX_LOG:
                        raise Malformed("log record cut short")
                    line = _CONTROL.sub("?", raw.decode("utf-8", "replace"))
                    batch.logs.append(LogLine(LOGGERS[name], LEVELS[rank], line))
                elif kind == FAILED:
                    _, key, number = _FAILED.unpack_from(data, offset)
                    offset += _FAILED.size
                    if not 0 < number < 4096:
                        raise Malformed("failed record with an impossible errno")
                    batch.failed.append((key, number))
                else:
                    raise Malformed(f"unknown record kind {kind}")
        except (Malformed, struct.error, KeyError, ValueError, IndexError, UnicodeDecodeError):
            self.malformed += 1
        return batch

    def _spa(self, body: bytes, now: float, addressed: bool) -> SpaKnock:
        offset = 0

        def text() -> str:
            nonlocal offset
            length = body[offset]
            value = body[offset + 1 : offset + 1 + length]
            if len(value) != length:
                raise Malformed("text cut short")
            offset += 1 + length
            return value.decode("utf-8")

        src, door, user, username, address = text(), text(), text(), text(), text()
        users = self.spa_users.get(door)
        if users is None or user not in users:
            raise Malformed(f"SPA knock for unknown door or user {door!r}/{user!r}")
        src, address = _canonical(src), _canonical(address)
        timestamp, msg_type, timeout, has_timeout = _SPA_FIXED.unpack_from(body, offset)
        offset += _SPA_FIXED.size
        if has_timeout not in (0, 1) or timeout < 0 or not 0 <= msg_type < 256:
            raise Malformed("SPA knock with impossible fields")
        count = body[offset]
        offset += 1
        if count > MAX_PORTS:
            raise Malformed("SPA knock with too many ports")
        ports = []
        for _ in range(count):
            port, proto = _PORT.unpack_from(body, offset)
            offset += _PORT.size
            if not 0 < port < 65536:
                raise Malformed("SPA knock with port 0")
            ports.append(Step(port, _PROTOS[proto]))  # type: ignore[arg-type]
        length = body[offset]
        digest = body[offset + 1 : offset + 1 + length]
        offset += 1 + length
        if length != DIGEST_SIZE or len(digest) != length:
            raise Malformed("SPA knock with a bad digest")
        dst, sport = "", 0
        if addressed:
            dst = text()
            if dst:  # "": not known (a knock made up in a test, say): no receipt
                dst = _canonical(dst)
            (sport,) = _U16.unpack_from(body, offset)
            offset += _U16.size
            if dst and (":" in dst) != (":" in src):
                raise Malformed("SPA knock sent to an address of another family")
        if offset != len(body):
            raise Malformed("SPA knock with trailing bytes")
        if not math.isfinite(float(timestamp)):
            raise Malformed("SPA timestamp")
        return SpaKnock(
            ts=now,
            src=src,
            door=door,
            user=user,
            username=username,
            timestamp=timestamp,
            msg_type=msg_type,
            address=address,
            ports=tuple(ports),
            client_timeout=timeout if has_timeout else None,
            digest=digest,
            dst=dst,
            sport=sport,
        )


def spa_users(doors: Sequence[Door]) -> dict[str, frozenset[str]]:
    """Door name -> its SPA users' names, for :class:`RecordReader`."""
    users: dict[str, frozenset[str]] = {}
    for door in doors:
        if door.spa is not None:
            users[door.name] = frozenset(user.name for user in door.spa.users)
    return users
