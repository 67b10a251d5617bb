"""What goes into the knock engine (events) and what comes out (commands).

Events carry their own timestamp: the engine never reads a clock. Commands are
plain data that an adapter (firewall, command runner, logger, one-time file
writer, state file) carries out; the engine never performs a side effect itself.

Two clocks. Every ``ts``, ``at`` and ``until`` here is on the engine's clock, which
only goes forward (the daemon's is ``time.monotonic()``; a capture replay's is the
capture's own timestamps): sequence timeouts, grant lengths and command delays
follow it, so a wall clock stepped back (NTP at boot, an operator) neither
stretches nor shrinks them. The wall clock is what TOTP time steps, SPA packet
timestamps and the state file's expiry times are about: :class:`WallClock` tells
the engine how the two relate (``wall = ts + offset``), and log lines convert.

Both are immutable named tuples rather than frozen dataclasses: one is built per
packet on the hot path, and a frozen dataclass costs about 1.7 us to construct
against 0.5 us for a named tuple (measured here, Python 3.11). Compare them by
type as well as by value where it matters (``Tick(3.0) == (3.0,)``).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from appliance.core.model import Door, Step

# --------------------------------------------------------------------------- events

# Protocol names as the engine sees them (interned literals, cheap to compare).
TCP: Literal["tcp"] = "tcp"
UDP: Literal["udp"] = "udp"


class Packet(NamedTuple):
    """A packet seen on the wire, already decoded at the edge.

    ``flags`` is the TCP flags byte (0 for UDP). ``src`` and ``dst`` are textual
    addresses in their canonical form (what :mod:`ipaddress` prints). ``payload`` is
    the UDP payload (empty for TCP): an SPA packet is read from it at the edge.
    ``sport`` is the UDP source port (0 for TCP): where an SPA receipt goes.
    """

    ts: float
    src: str
    dst: str
    proto: str
    dport: int
    flags: int = 0
    payload: bytes = b""
    sport: int = 0


class SpaKnock(NamedTuple):
    """An SPA packet whose HMAC verified and which decrypted, decoded at the edge.

    ``user`` is the configured user whose keys opened it, ``username`` the name the
    client wrote inside. ``address`` is the address to let in as the packet says
    (``0.0.0.0`` or ``::`` for "the sender"), ``timestamp`` the client's clock,
    ``digest`` what the replay cache keeps. ``dst`` and ``sport``: the address the
    packet was sent to and its UDP source port, where a receipt is sent from and to.
    """

    ts: float
    src: str
    door: str
    user: str
    username: str
    timestamp: int
    msg_type: int
    address: str
    ports: tuple[Step, ...]
    client_timeout: int | None
    digest: bytes
    dst: str = ""
    sport: int = 0


class Tick(NamedTuple):
    """A deadline came: time has advanced to ``ts`` without a packet."""

    ts: float


class WallClock(NamedTuple):
    """At engine time ``ts`` the wall clock (unix time) reads ``wall``. Sent at start
    and whenever the two drift apart (a clock step); without one the engine takes the
    wall clock to equal its own (a capture replay)."""

    ts: float
    wall: float


class LocalAddresses(NamedTuple):
    """The host's own addresses: a door without ``target`` counts only packets sent to
    one of them. ``None``: every destination counts (a replay without ``--host``)."""

    ts: float
    addresses: frozenset[str] | None


class Vetted(NamedTuple):
    """The runtime's answer to a :class:`Vet`: ``refusal`` is ``None`` when the knocker
    may go ahead (not held off as a scanner, its records written), else why not."""

    ts: float
    ticket: int
    refusal: str | None


class NewDoors(NamedTuple):
    """A reload: these doors replace the running ones. A door that did not change keeps
    its in-progress attempts (and a one-time door its place in the file); pending stop
    commands run at their own time whatever happened to their door."""

    ts: float
    doors: tuple[Door, ...]
    max_attempts: int


Event = Packet | Tick | SpaKnock | WallClock | LocalAddresses | Vetted | NewDoors

# --------------------------------------------------------------------------- commands


class Grant(NamedTuple):
    """Open ``ports`` for ``address`` until ``until`` (absolute, same clock as events)."""

    at: float
    door: str
    address: str
    ports: tuple[Step, ...]
    until: float

    def seconds_left(self, now: float) -> float:
        """What is left of the grant at wall-clock ``now``, never more than it was given:
        after the host's clock is stepped back, ``until`` (on the engine's clock, which
        never goes back) would otherwise keep the port open that much longer."""
        return min(self.until - now, self.until - self.at)


class Revoke(NamedTuple):
    """Close what ``door`` granted to ``address`` (a close knock)."""

    at: float
    door: str
    address: str
    by: str


class RunCommand(NamedTuple):
    """Run a knockd-style shell command; ``%IP%`` is already substituted."""

    at: float
    door: str
    address: str
    phase: Literal["start", "stop"]
    command: str


class SendReceipt(NamedTuple):
    """Answer an accepted SPA packet (a door with ``receipt``): one datagram to
    ``to``:``port`` from ``via`` (the address the packet was sent to), sealed with
    ``user``'s keys and bound to ``digest``, saying ``address`` is let in until
    ``until`` (the engine's clock)."""

    at: float
    door: str
    user: str
    to: str
    port: int
    via: str
    digest: bytes
    address: str
    until: float


# Records: what must be on disk before the decision it belongs to is carried out. The
# engine emits a record before the grant and commands of the same (door, address); when
# the record cannot be written, the runtime refuses that decision (fail closed: a one-time
# sequence, an SPA packet or a TOTP step is never usable again after a restart because
# writing it down failed).


class MarkSequenceUsed(NamedTuple):
    """Overwrite the first byte of a one-time-sequence line with ``#``."""

    at: float
    door: str
    address: str
    path: str
    line: int
    offset: int


class SpaDigestSeen(NamedTuple):
    """Remember an accepted SPA packet until ``until`` (wall clock; the replay cache)."""

    at: float
    door: str
    address: str
    digest: bytes
    until: float


class TotpStepUsed(NamedTuple):
    """A TOTP door's time step ``step`` was used: its sequence is refused from now on
    (``until``: wall clock)."""

    at: float
    door: str
    address: str
    step: int
    until: float


Record = MarkSequenceUsed | SpaDigestSeen | TotpStepUsed


class Vet(NamedTuple):
    """Before a completed knock is acted on, ask the runtime: write ``records`` down
    and tell whether ``address`` is held off as a scanner. The engine acts when the
    :class:`Vetted` answer with the same ``ticket`` comes back without a refusal, and
    does nothing (no grant, no close, no command) when it comes back with one."""

    at: float
    ticket: int
    door: str
    address: str
    records: tuple[Record, ...]


# Log records: what happened to whom. The runtime formats them (knockd-style text or JSON).


class StageReached(NamedTuple):
    at: float
    door: str
    address: str
    stage: int
    total: int


class Opened(NamedTuple):
    """knockd's ``OPEN SESAME``: the whole sequence arrived in time."""

    at: float
    door: str
    address: str


class SequenceReset(NamedTuple):
    """A wrong step ended an attempt that had reached ``stage``."""

    at: float
    door: str
    address: str
    stage: int
    dport: int
    proto: str


class SequenceTimeout(NamedTuple):
    """An attempt that had reached ``stage`` (>= 2) ran out of time."""

    at: float
    door: str
    address: str
    stage: int


class SpaAccepted(NamedTuple):
    """An SPA packet from ``src`` let ``address`` in (``user`` is the key's owner)."""

    at: float
    door: str
    address: str
    src: str
    user: str
    ports: tuple[Step, ...]
    until: float


class SpaRefused(NamedTuple):
    """An authenticated SPA packet was refused: ``reason`` is a short code
    (``replay``, ``stale``, ``future``, ``ports``, ``address``, ``message-type``)."""

    at: float
    door: str
    src: str
    user: str
    reason: str


class OneTimeAdvanced(NamedTuple):
    """A one-time sequence was used; ``remaining`` usable lines are left."""

    at: float
    door: str
    remaining: int


class DoorExhausted(NamedTuple):
    """A one-time-sequence door has no usable line left and is disabled."""

    at: float
    door: str
    path: str


class Refused(NamedTuple):
    """A completed knock that was not acted on: ``reason`` says why (held off as a
    scanner, its use could not be recorded)."""

    at: float
    door: str
    address: str
    reason: str


class DoorsReloaded(NamedTuple):
    """A reload's effect on the doors, by name: ``kept`` keep their attempts."""

    at: float
    kept: tuple[str, ...]
    changed: tuple[str, ...]
    added: tuple[str, ...]
    removed: tuple[str, ...]


class ClockStepped(NamedTuple):
    """The wall clock jumped by ``by`` seconds against the engine's clock (negative:
    back). Timeouts are unaffected; TOTP steps and SPA ages follow the new wall time."""

    at: float
    by: float


# What the runtime carries out (side effects) and what it only logs (notices).
Effect = Grant | Revoke | RunCommand | Vet | SendReceipt
Notice = (
    StageReached
    | Opened
    | SequenceReset
    | SequenceTimeout
    | OneTimeAdvanced
    | DoorExhausted
    | SpaAccepted
    | SpaRefused
    | Refused
    | DoorsReloaded
    | ClockStepped
)
Command = Effect | Notice
