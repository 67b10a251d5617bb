"""Doors as frozen data: what the engines need to decide, and nothing more.

Both configuration formats (native YAML and knockd.conf) become these objects.
The deployment schema around them (services, settings, the whole ``Config``)
lives in :mod:`appliance.config.schema`. Pure: standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

Proto = Literal["tcp", "udp"]
DuplicatePolicy = Literal["ignore", "reset"]

MAX_STEPS = 32
DEFAULT_SEQ_TIMEOUT = 25.0
DEFAULT_CMD_TIMEOUT = 10.0
DEFAULT_MAX_ATTEMPTS = 100_000
DEFAULT_OPEN_DURATION = 30.0

# TCP flag bits as they appear in byte 13 of the TCP header.
TCP_FLAG_BITS: dict[str, int] = {
    "fin": 0x01,
    "syn": 0x02,
    "rst": 0x04,
    "psh": 0x08,
    "ack": 0x10,
    "urg": 0x20,
}


class Step(NamedTuple):
    """One knock: a destination port and protocol. Compares equal to ``(port, proto)``."""

    port: int
    proto: Proto

    def __str__(self) -> str:
        return f"{self.port}/{self.proto}"


@dataclass(frozen=True, slots=True)
class TcpFlags:
    """A TCP flag filter: bits that must be set and bits that must be clear.

    The empty filter matches every TCP packet (knockd's behaviour without TCPFlags).
    """

    must_set: int = 0
    must_clear: int = 0

    def matches(self, flags: int) -> bool:
        return (flags & self.must_set) == self.must_set and not (flags & self.must_clear)

    @property
    def empty(self) -> bool:
        return not (self.must_set or self.must_clear)

    def __str__(self) -> str:
        parts = []
        for name, bit in TCP_FLAG_BITS.items():
            if self.must_set & bit:
                parts.append(name)
            if self.must_clear & bit:
                parts.append("!" + name)
        return ",".join(parts)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a piece of configuration was written: for messages."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class OneTimeSequence:
    """One usable line of a knockd one-time-sequences file.

    ``offset`` is the byte offset of the line's first byte: marking the line used
    overwrites that byte with ``#`` (knockd's own convention).
    """

    steps: tuple[Step, ...]
    line: int
    offset: int


@dataclass(frozen=True, slots=True)
class OneTimeFile:
    path: str
    sequences: tuple[OneTimeSequence, ...]


@dataclass(frozen=True, slots=True)
class Totp:
    """A time-based sequence: ``steps`` ports derived from the secret and the time step.

    The time step is ``floor(unix time / period)``; the sequence for step ``c`` is
    :func:`appliance.core.totp.totp_sequence`. The server accepts the sequences of
    ``c - skew`` to ``c + skew``, each at most once.
    """

    secret: bytes
    steps: int = 4
    period: int = 30
    # Below Linux's ephemeral ports (32768-60999: replies to the host's own connections)
    # and above most registered services; 10 000 ports, 4 steps: 10^16 sequences.
    low: int = 20000
    high: int = 29999
    proto: Proto = "tcp"
    skew: int = 1


@dataclass(frozen=True, slots=True)
class Knock:
    """How a door is knocked: a fixed sequence, one-time sequences, a TOTP sequence, or
    (for an SPA door, ``sequence`` empty) one authenticated packet."""

    sequence: tuple[Step, ...]
    seq_timeout: float = DEFAULT_SEQ_TIMEOUT
    tcpflags: TcpFlags = field(default_factory=TcpFlags)
    target: str | None = None
    duplicates: DuplicatePolicy = "ignore"
    one_time: OneTimeFile | None = None
    totp: Totp | None = None


DEFAULT_SPA_PORT = 62201  # fwknop's
DEFAULT_SPA_MAX_AGE = 120.0
# The largest values the configuration accepts. Replay protection is kept for these, not
# for the current settings: raising max_age or skew in a reload must not make a packet
# or a time step that was used acceptable again.
MAX_SPA_MAX_AGE = 3600.0
MAX_TOTP_SKEW = 5


@dataclass(frozen=True, slots=True)
class SpaUser:
    """One key pair allowed to open an SPA door (a stanza of fwknop's access.conf).

    ``sources``: networks the packet may come from (empty: any). ``ports``: what the
    user may open (``None``: every port of the door). ``max_time``: a cap on the
    access time this user may ask for (``None``: the door's cap).
    """

    name: str
    key: bytes = field(repr=False)
    hmac_key: bytes = field(repr=False)
    sources: tuple[str, ...] = ()
    ports: tuple[Step, ...] | None = None
    max_time: float | None = None


@dataclass(frozen=True, slots=True)
class Spa:
    """Single packet authorization, fwknop's wire format, sniffed on UDP ``port``.

    A packet whose timestamp is more than ``max_age`` seconds from the server's
    clock (either way) is refused; so is one seen before. Access lasts what the
    client asks for (fwknop's ``--fw-timeout``), else the door's open duration,
    capped by ``max_time`` and the user's own cap. ``require_source_address``
    (the default) refuses fwknop's ``-s`` (0.0.0.0: "the address the packet comes
    from"): whoever relays a sniffed ``-s`` packet first would be let in.
    ``receipt``: answer each granted packet with one encrypted receipt
    (:mod:`appliance.spa.receipt`) to its source address and port.
    """

    users: tuple[SpaUser, ...]
    port: int = DEFAULT_SPA_PORT
    max_age: float = DEFAULT_SPA_MAX_AGE
    max_time: float = 3600.0
    require_source_address: bool = True
    receipt: bool = False


@dataclass(frozen=True, slots=True)
class OpenPorts:
    """Action: open these ports for the knocker's address, for ``duration`` seconds."""

    ports: tuple[Step, ...]
    duration: float = DEFAULT_OPEN_DURATION


@dataclass(frozen=True, slots=True)
class Commands:
    """Action: knockd-style shell commands, ``%IP%`` replaced by the knocker's address.

    ``None`` means not given; for the ``_6`` variants ``None`` falls back to the IPv4
    command and the empty string means "nothing for IPv6" (knockd's rules).
    """

    start: str | None = None
    start6: str | None = None
    stop: str | None = None
    stop6: str | None = None
    cmd_timeout: float = DEFAULT_CMD_TIMEOUT

    def start_for(self, ipv6: bool) -> str | None:
        return _pick(self.start, self.start6, ipv6)

    def stop_for(self, ipv6: bool) -> str | None:
        return _pick(self.stop, self.stop6, ipv6)


def _pick(v4: str | None, v6: str | None, ipv6: bool) -> str | None:
    command = (v4 if v6 is None else v6) if ipv6 else v4
    return command or None


@dataclass(frozen=True, slots=True)
class Door:
    name: str
    knock: Knock
    open: OpenPorts | None = None
    close: tuple[str, ...] = ()
    commands: Commands = field(default_factory=Commands)
    origin: Origin | None = None
    service: str | None = None  # a service door also has ``open`` = the service's host port
    spa: Spa | None = None  # an SPA door (its knock has no sequence)
