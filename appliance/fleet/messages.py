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
from appliance.core.events import Record, SpaDigestSeen, TotpStepUsed

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
ONE_TIME_CLAIM = 366 * 86_400.0  # a one-time line stays used (a claim needs a lifetime)
MIN_CLAIM = 1.0  # seconds: a claim never lives shorter than this


@dataclass(frozen=True, slots=True)
class FleetMessage:
    """A grant (``deadline``: unix time) or a revocation, made on host ``origin``."""

    kind: Literal["grant", "revoke"]
    door: str
    address: str
    deadline: float
    origin: str
    id: str

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
        }


def new_id() -> str:
    return secrets.token_hex(8)


def grant(door: str, address: str, deadline: float, origin: str) -> FleetMessage:
    return FleetMessage("grant", door, address, deadline, origin, new_id())


def revoke(door: str, address: str, origin: str) -> FleetMessage:
    return FleetMessage("revoke", door, address, 0.0, origin, new_id())


def decode(fields: Mapping[str, str]) -> FleetMessage | None:
    """A message from its fields as stored; ``None`` when anything is off."""
    kind = fields.get("kind")
    door, origin = fields.get("door", ""), fields.get("origin", "")
    if kind not in ("grant", "revoke") or not _NAME.fullmatch(door):
        return None
    if not _NAME.fullmatch(origin):
        return None
    try:
        address = str(ipaddress.ip_address(fields.get("address", "")))
        deadline = float(fields.get("deadline", "0"))
    except ValueError:
        return None
    if not math.isfinite(deadline) or (kind == "grant" and deadline <= 0):
        return None
    ident = fields.get("id", "")[:64]
    return FleetMessage(
        "grant" if kind == "grant" else "revoke", door, address, deadline, origin, ident
    )


def encode_live(message: FleetMessage) -> str:
    """A live grant's value in the hash (its field holds door and address)."""
    return f"{message.deadline:.3f} {message.origin} {message.id}"


def decode_live(field: str, value: str) -> FleetMessage | None:
    door, _, address = field.partition("|")
    parts = value.split(" ")
    if len(parts) != 3:
        return None
    deadline, origin, ident = parts
    return decode(
        {
            "kind": "grant",
            "door": door,
            "address": address,
            "deadline": deadline,
            "origin": origin,
            "id": ident,
        }
    )


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

    def claims(self, records: tuple[Record, ...], now: float) -> tuple[tuple[str, float], ...]:
        """The shared claims a vet's records make: (key, seconds to keep it), at unix
        time ``now``. The same identity as the local caches: an SPA packet by its
        digest, a TOTP step by door and step, a one-time line by door and line."""
        claims: list[tuple[str, float]] = []
        for record in records:
            if isinstance(record, SpaDigestSeen):
                key, ttl = f"spa:{record.digest.hex()}", record.until - now
            elif isinstance(record, TotpStepUsed):
                key, ttl = f"totp:{record.door}:{record.step}", record.until - now
            else:
                key, ttl = f"onetime:{record.door}:{record.line}", ONE_TIME_CLAIM
            claims.append((self.prefix + key, max(MIN_CLAIM, ttl)))
        return tuple(claims)


# ----------------------------------------------------------------- the loop's items


@dataclass(frozen=True, slots=True)
class FleetApply:
    """A message from the fleet to carry out here (``catchup``: read from the live
    grants on a (re)connect, not from the stream)."""

    message: FleetMessage
    catchup: bool = False


ClaimOutcome = Literal["claimed", "taken", "unreachable"]


@dataclass(frozen=True, slots=True)
class FleetClaimed:
    """The answer to the claims of vet ``ticket``."""

    ticket: int
    outcome: ClaimOutcome
    error: str = ""


@dataclass(frozen=True, slots=True)
class FleetHealth:
    """The link's view of the store changed: reachable or not (with why)."""

    reachable: bool
    error: str = ""


FleetItem = FleetApply | FleetClaimed | FleetHealth


def same_fleet(old: FleetSettings | None, new: FleetSettings | None) -> bool:
    """Whether a reload keeps the group's settings (the doors' own fleet keys aside)."""
    if old is None or new is None:
        return old is new
    return replace(old, local_doors=frozenset(), start_services=frozenset()) == replace(
        new, local_doors=frozenset(), start_services=frozenset()
    )
