"""What a fleet says: grant and revoke messages, claims, the loop's items, the keys.

Pure data and functions (standard library only). Everything read back from Redis is
decoded here and checked: a Redis writer can grant access fleet-wide (that is the
point of a fleet), but a malformed entry never reaches the firewall.
"""

from __future__ import annotations

import ipaddress
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

from appliance.config.schema import FleetSettings
from appliance.config.values import NAME
from appliance.core.events import MarkSequenceUsed, Record, SpaDigestSeen, TotpStepUsed
from appliance.core.model import Step

_PORT = re.compile(r"([0-9]{1,5})/(tcp|udp)")
_ID = re.compile(r"[0-9A-Za-z_-]{0,64}")
ONE_TIME_CLAIM = 366 * 86_400.0  # a one-time line stays used (a claim needs a lifetime)
MIN_CLAIM = 1.0  # seconds: a claim never lives shorter than this
CLOCK_SKEW = 30.0  # seconds the hosts' clocks may differ: added to every claim's lifetime


@dataclass(frozen=True, slots=True)
class FleetMessage:
    """A grant (``deadline``: unix time) or a revocation, made on host ``origin``.

    ``ports``: what the grant opened (an SPA user may open only some of a door's ports);
    a host applying it opens those of its own door's ports, never more."""

    kind: Literal["grant", "revoke"]
    door: str
    address: str
    deadline: float
    origin: str
    id: str
    ports: tuple[Step, ...] = ()
    # unix time at its origin (0: not known): in the stream for diagnosis; never compared
    # across hosts (their clocks differ), so it decides nothing
    made_at: float = 0.0

    @property
    def field(self) -> str:
        """Its key in the live-grants hash: one live grant per door and address."""
        return f"{self.door}|{self.address}"

    def fields(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "door": self.door,
            "address": self.address,
            "deadline": f"{self.deadline:.3f}",
            "origin": self.origin,
            "id": self.id,
            "ports": _ports_text(self.ports),
            "made_at": f"{self.made_at:.3f}",
        }


def _ports_text(ports: tuple[Step, ...]) -> str:
    return ",".join(str(port) for port in ports) or "-"


def _parse_ports(text: str) -> tuple[Step, ...] | None:
    """``22/tcp,80/tcp`` (``-``: none); ``None`` when any part is not a port."""
    if text == "-":
        return ()
    ports: list[Step] = []
    for part in text.split(",")[:64]:
        match = _PORT.fullmatch(part)
        if match is None or not 0 < int(match[1]) < 65536:
            return None
        ports.append(Step(int(match[1]), "udp" if match[2] == "udp" else "tcp"))
    return tuple(ports)


def new_id() -> str:
    return secrets.token_hex(8)


def grant(
    door: str,
    address: str,
    deadline: float,
    origin: str,
    ports: tuple[Step, ...],
    made_at: float = 0.0,
) -> FleetMessage:
    return FleetMessage("grant", door, address, deadline, origin, new_id(), ports, made_at)


def revoke(door: str, address: str, origin: str, made_at: float = 0.0) -> FleetMessage:
    return FleetMessage("revoke", door, address, 0.0, origin, new_id(), (), made_at)


def grantable(text: str) -> str | None:
    """``text`` when it is an address a fleet grant may open for: canonical text (as
    the capture writes it: no scope id, no second spelling), and not unspecified,
    loopback, multicast, reserved or IPv4-mapped. ``None`` otherwise."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if "%" in text or str(address) != text:
        return None
    if address.is_unspecified or address.is_loopback or address.is_multicast:
        return None
    if address.is_reserved or (address.version == 6 and address.ipv4_mapped is not None):
        return None
    return text


def _number(text: str | None, default: float) -> float | None:
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def decode(fields: Mapping[str, str]) -> FleetMessage | None:
    """A message from its fields as stored; ``None`` when anything is off."""
    kind = fields.get("kind")
    door, origin = fields.get("door", ""), fields.get("origin", "")
    if kind not in ("grant", "revoke") or not NAME.fullmatch(door):
        return None
    if not NAME.fullmatch(origin):
        return None
    address = grantable(fields.get("address", ""))
    deadline = _number(fields.get("deadline"), 0.0)
    made_at = _number(fields.get("made_at"), 0.0)
    if address is None or deadline is None or made_at is None or made_at < 0:
        return None
    if kind == "grant" and deadline <= 0:
        return None
    ports = _parse_ports(fields.get("ports", "-"))
    if ports is None or (kind == "grant" and not ports):
        return None
    ident = fields.get("id", "")
    if not _ID.fullmatch(ident):
        return None
    return FleetMessage(
        "grant" if kind == "grant" else "revoke",
        door,
        address,
        deadline,
        origin,
        ident,
        ports,
        made_at,
    )


def decode_bytes(fields: Mapping[bytes, bytes]) -> FleetMessage | None:
    """:func:`decode` on the raw fields read from Redis (``None``: not UTF-8)."""
    try:
        text = {k.decode("utf-8"): v.decode("utf-8") for k, v in fields.items()}
    except (UnicodeDecodeError, AttributeError):
        return None
    return decode(text)


def encode_live(message: FleetMessage) -> str:
    """A live grant's value in the hash (its field holds door and address)."""
    return (
        f"{message.deadline:.3f} {message.origin} {message.id} {_ports_text(message.ports)} "
        f"{message.made_at:.3f}"
    )


def decode_live(field: str, value: str) -> FleetMessage | None:
    door, _, address = field.partition("|")
    parts = value.split(" ")
    if len(parts) != 5:
        return None
    deadline, origin, ident, ports, made_at = parts
    return decode(
        {
            "kind": "grant",
            "door": door,
            "address": address,
            "deadline": deadline,
            "origin": origin,
            "id": ident,
            "ports": ports,
            "made_at": made_at,
        }
    )


def decode_live_bytes(field: bytes, value: bytes) -> FleetMessage | None:
    """:func:`decode_live` on the raw field and value (``None``: not UTF-8)."""
    try:
        return decode_live(field.decode("utf-8"), value.decode("utf-8"))
    except (UnicodeDecodeError, AttributeError):
        return None


@dataclass(frozen=True, slots=True)
class Keys:
    """The key layout of fleet ``name``: every key starts ``kg:{name}:`` (one Redis
    Cluster hash slot, and one ACL pattern ``~kg:{name}:*``)."""

    name: str

    @property
    def prefix(self) -> str:
        return f"kg:{{{self.name}}}:"

    @property
    def stream(self) -> str:
        return self.prefix + "events"

    @property
    def grants(self) -> str:
        return self.prefix + "grants"

    @property
    def deadlines(self) -> str:
        return self.prefix + "deadlines"

    @property
    def epoch(self) -> str:
        return self.prefix + "epoch"

    def claims(self, records: tuple[Record, ...], now: float) -> tuple[tuple[str, float], ...]:
        """The shared claims a vet's records make: (key, seconds to keep it), at unix
        time ``now``. The same identity as the local caches: an SPA packet by its
        digest, a TOTP step by door and step, a one-time line by door and line. Each
        lives :data:`CLOCK_SKEW` longer than the local record: a host whose clock is
        behind still accepts the packet or step that long after this one stops."""
        claims: list[tuple[str, float]] = []
        for record in records:
            if isinstance(record, SpaDigestSeen):
                key, ttl = f"spa:{record.digest.hex()}", record.until - now
            elif isinstance(record, TotpStepUsed):
                key, ttl = f"totp:{record.door}:{record.step}", record.until - now
            else:
                key, ttl = f"onetime:{record.door}:{record.line}", ONE_TIME_CLAIM
            if not isinstance(record, MarkSequenceUsed):
                ttl += CLOCK_SKEW
            claims.append((self.prefix + key, max(MIN_CLAIM, ttl)))
        return tuple(claims)


# ----------------------------------------------------------------- the loop's items


@dataclass(frozen=True, slots=True)
class FleetApply:
    """A message from the fleet to carry out here (``catchup``: read from the live
    grants on a (re)connect, not from the stream)."""

    message: FleetMessage
    catchup: bool = False


@dataclass(frozen=True, slots=True)
class FleetReconcile:
    """The reader's position in the stream was trimmed away during an outage: the
    live grants of other hosts (``grants``) and the fields of every live grant
    (``live``); a fleet grant or a grant made here that is not live any more was
    closed meanwhile."""

    grants: tuple[FleetMessage, ...]
    live: tuple[str, ...]


ClaimOutcome = Literal["claimed", "taken", "unreachable"]


@dataclass(frozen=True, slots=True)
class FleetClaimed:
    """The answer to the claims of vet ``ticket``."""

    ticket: int
    outcome: ClaimOutcome


@dataclass(frozen=True, slots=True)
class FleetHealth:
    """The link's view of the store changed: reachable or not (with why)."""

    reachable: bool
    error: str = ""


FleetItem = FleetApply | FleetReconcile | FleetClaimed | FleetHealth


def same_fleet(old: FleetSettings | None, new: FleetSettings | None) -> bool:
    """Whether a reload keeps the group's settings (the doors' own fleet keys aside)."""
    if old is None or new is None:
        return old is new
    return replace(old, local_doors=frozenset(), start_services=frozenset()) == replace(
        new, local_doors=frozenset(), start_services=frozenset()
    )
