"""The knock engine: events in, commands out.

Pure and single-threaded: no sockets, clocks, threads or subprocesses. Time comes
only from the events, so a capture file replays exactly as it happened. Event
times are on the engine's own clock, which never goes back (monotonic in the
daemon); the wall clock, needed only for TOTP time steps, SPA packet ages and
the saved state's expiry, is ``ts + wall_offset`` (see :class:`WallClock`).

The engine owns every deadline it has (attempts, pending stop commands):
:meth:`KnockEngine.next_deadline` says when it next needs a :class:`Tick`, and
the loop asks it after every pass, so no deadline can be lost between the two.

State is kept per (source address, door) as an attempt. Each door keeps
its attempts in an insertion-ordered dict, oldest first; since a door's
``seq_timeout`` is fixed, that order is also the order of their deadlines, so
expiry pops from the front (amortised O(1)) and eviction of the oldest attempt
looks only at the front of each door. A packet costs a dict lookup for its
(port, protocol) plus a dict lookup per door that uses that pair.

Rules (knockd's, with its defects fixed):

* A packet counts for a door only if its (port, protocol) is one of the door's
  steps, its destination is the door's ``target`` (when set) or else one of the
  host's own addresses (:class:`LocalAddresses`), and, for TCP,
  its flags pass the door's ``tcpflags`` filter (a non-matching packet is
  ignored, not a reset).
* The expected next step advances the attempt; the whole sequence must arrive
  within ``seq_timeout`` of the first knock (sub-second precision; a knock at
  exactly first + seq_timeout is too late).
* Any other counted packet resets the attempt, and starts a fresh one when it is
  the door's first step (knockd drops it). With ``duplicates: ignore`` a repeat of
  the step just taken, within one second, is a retransmission, not a reset.
* Attempts of different sources, and of different doors, never disturb each
  other; several doors may complete on one packet and each fires once.
* At most ``max_attempts`` attempts are kept; the oldest is evicted first.

A TOTP door (``knock: {totp: ...}``) is run as one door state per accepted time
step (the current one and ``skew`` either side), each with its own derived
sequence; they are replaced as time moves on, and a step that opened the door is
never accepted again (``TotpStepUsed`` lets the runtime keep that across restarts).

An SPA door takes :class:`SpaKnock` events, which the edge produces only for
packets whose HMAC verified and which decrypted. The engine applies the policy:
the packet's clock within ``max_age`` of ours, never seen before (the replay cache,
kept here and written to disk by the runtime through ``SpaDigestSeen``), the
requested ports within the user's allowance, the time capped, and, when the user
has ``sources``, the address to let in within them (each address a dual-stack
client asks for comes in a packet of its own, and each is checked on its own).
A door with ``receipt`` answers each granted packet with :class:`SendReceipt`
(after its grant; never for a refusal, which is not remembered and so could be
replayed to make the host answer), at most ``RECEIPT_BURST`` per source address
within ``RECEIPT_WINDOW`` seconds.

Vetting: a completed knock is not acted on at once. The engine asks the runtime
(:class:`Vet`) to write its records (:class:`MarkSequenceUsed` /
:class:`TotpStepUsed` / :class:`SpaDigestSeen`) and to say whether the knocker is
held off by the kernel's scan detector; the answer comes back as an event
(:class:`Vetted`), and only then does the engine grant, close and run commands, or
refuse the whole decision (:class:`Refused`: nothing opens, nothing closes, no
command and so no stop command). The daemon answers at once, in the same pass.

Reload (:class:`NewDoors`): a door that did not change keeps its attempts and its
place; a changed or removed door loses them; pending stop commands all run at their
own time.
"""

from __future__ import annotations

import dataclasses
import heapq
import ipaddress
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

from appliance.core.events import (
    TCP,
    ClockStepped,
    Command,
    DoorExhausted,
    DoorsReloaded,
    Event,
    Grant,
    LocalAddresses,
    MarkSequenceUsed,
    NewDoors,
    OneTimeAdvanced,
    Opened,
    Packet,
    Record,
    Refused,
    Revoke,
    RunCommand,
    SendReceipt,
    SequenceReset,
    SequenceTimeout,
    SpaAccepted,
    SpaDigestSeen,
    SpaKnock,
    SpaRefused,
    StageReached,
    TotpStepUsed,
    Vet,
    Vetted,
    WallClock,
)
from appliance.core.model import (
    DEFAULT_MAX_ATTEMPTS,
    MAX_SPA_MAX_AGE,
    MAX_TOTP_SKEW,
    Door,
    SpaUser,
    Step,
    Totp,
)
from appliance.core.totp import time_step, totp_sequence, window

RETRANSMIT_WINDOW = 1.0  # seconds within which a repeated step counts as a retransmission
CLOCK_STEP = 1.0  # a change of the wall clock's offset this large is logged as a step
RECEIPT_BURST = 4  # receipts a source address may get within RECEIPT_WINDOW seconds
RECEIPT_WINDOW = 10.0
MAX_RECEIPT_SOURCES = 4096  # sources whose recent receipts are remembered (oldest dropped)


@dataclass(slots=True)
class Counters:
    """What the engine has seen since it started (for ``knockgate status``)."""

    packets: int = 0
    ignored: int = 0
    stages: int = 0
    opened: int = 0
    resets: int = 0
    retransmissions: int = 0
    timeouts: int = 0
    evictions: int = 0
    malformed: int = 0
    spa_accepted: int = 0
    spa_refused: int = 0
    receipts: int = 0  # SPA receipts asked for
    receipts_limited: int = 0  # not sent: the source had its RECEIPT_BURST
    refused: int = 0  # completed knocks not acted on (held off, unrecorded)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# An attempt is one source's progress through one door's sequence, kept as a
# three-item list rather than an object: one is created per first knock, and a
# list is built five times faster than a slotted object (0.06 us against 0.3 us
# here), which is what a flood of spoofed first knocks costs.
#   [STAGE]     steps taken so far (>= 1)
#   [LAST]      time of the step just taken
#   [DEADLINE]  first knock + seq_timeout
Attempt = list[Any]
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
STAGE, LAST, DEADLINE = 0, 1, 2


class Decision(NamedTuple):
    """A completed knock's actions, waiting for their :class:`Vetted` answer."""

    door: Door
    address: str
    ports: tuple[Step, ...]
    until: float
    accepted: SpaAccepted | None = None  # an SPA knock's log record, once vetted
    receipt: SendReceipt | None = None  # its receipt, after the grant


class DoorState:
    """A door's runtime state: its active sequence and its attempts."""

    __slots__ = (
        "attempts",
        "door",
        "enabled",
        "flags_clear",
        "flags_set",
        "ignore_duplicates",
        "length",
        "name",
        "next_one_time",
        "sequence",
        "step",
        "target",
        "timeout",
    )

    def __init__(
        self, door: Door, sequence: tuple[Step, ...] | None = None, step: int | None = None
    ) -> None:
        knock = door.knock
        self.door = door
        self.name = door.name
        self.timeout = knock.seq_timeout
        self.target = knock.target
        self.flags_set = knock.tcpflags.must_set
        self.flags_clear = knock.tcpflags.must_clear
        self.ignore_duplicates = knock.duplicates == "ignore"
        # OrderedDict, not dict: popping the oldest entry and peeking at the front
        # stay O(1) after many deletions (a plain dict's iteration has to skip the
        # deleted slots at its front, which made eviction O(n) under a flood).
        self.attempts: OrderedDict[str, Attempt] = OrderedDict()
        self.next_one_time = 0
        self.enabled = True
        self.sequence: tuple[Step, ...] = knock.sequence if sequence is None else sequence
        self.length = len(self.sequence)
        self.step = step  # a TOTP door's time step (None for every other door)
        if knock.one_time is not None:
            self._load_one_time(0)

    def _load_one_time(self, index: int) -> None:
        one_time = self.door.knock.one_time
        assert one_time is not None
        if index < len(one_time.sequences):
            self.sequence = one_time.sequences[index].steps
            self.next_one_time = index + 1
        else:
            self.sequence = ()
        self.length = len(self.sequence)
        if not self.length:
            self.next_one_time = index
            self.enabled = False

    def advance_one_time(self) -> int:
        """Move to the next one-time sequence; return how many remain after it."""
        assert self.door.knock.one_time is not None
        self._load_one_time(self.next_one_time)
        self.attempts.clear()
        return len(self.door.knock.one_time.sequences) - self.next_one_time + self.enabled


class KnockEngine:
    """Decides, per source address, when a knock is complete."""

    def __init__(
        self,
        doors: Sequence[Door],
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        local: frozenset[str] | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._totp: dict[str, dict[int, DoorState]] = {}
        self._totp_used: dict[str, dict[int, float]] = {}
        self._range_keys: dict[Totp, list[tuple[int, str]]] = {}
        self._spa_seen: dict[bytes, float] = {}  # digest -> until (wall clock)
        self._spa_expiry: list[tuple[float, bytes]] = []
        # Completed knocks waiting for their Vetted answer, by ticket.
        self._pending: dict[int, Decision] = {}
        self._ticket = 0
        # Receipts sent lately, by source address: their times (oldest first).
        self._receipts: OrderedDict[str, list[float]] = OrderedDict()
        self._count = 0  # attempts held, all doors
        self._configure(doors, {})
        # Wall time before which SPA packets and TOTP steps cannot be checked against
        # what an earlier run used (its state file was lost or damaged): refused.
        self.untrusted_before = -math.inf
        self.max_attempts = max_attempts
        self.counters = Counters()
        self.now = -math.inf
        self.wall_offset = 0.0  # wall clock = engine clock + wall_offset
        self._wall_known = False
        self.local = local  # the host's addresses (None: any destination counts)
        self._next_expiry = math.inf  # earliest attempt deadline (may be early, never late)
        self._stops: list[tuple[float, int, RunCommand]] = []  # heap of pending stop commands
        self._stop_seq = 0
        self._index: dict[tuple[int, str], tuple[DoorState, ...]] = {}
        self._reindex()

    def _configure(self, doors: Sequence[Door], keep: dict[str, DoorState]) -> None:
        """Set the doors up; ``keep``: running states of unchanged doors, by name."""
        self._fixed = [keep.get(door.name) or DoorState(door) for door in doors]
        for state, door in zip(self._fixed, doors, strict=True):
            state.door = door  # an unchanged door's origin (file line) may have moved
        self.doors = list(self._fixed)
        self.by_name = {state.door.name: state for state in self.doors}
        # TOTP doors: one state per accepted time step, and the steps already used
        # (step -> the time it leaves every window).
        self._totp_doors = {door.name: door for door in doors if door.knock.totp is not None}
        self._totp = {
            name: self._totp.get(name, {}) if name in keep else {} for name in self._totp_doors
        }
        # Used steps are kept for every door seen (a door removed, then added back).
        self._totp_used |= {name: {} for name in self._totp_doors if name not in self._totp_used}
        self._totp_next = -math.inf if self._totp_doors else math.inf
        # SPA: the users of each door by name (the replay cache is shared by all doors).
        self._spa_users: dict[str, dict[str, SpaUser]] = {
            door.name: {user.name: user for user in door.spa.users}
            for door in doors
            if door.spa is not None
        }
        # Users' ``sources`` as networks: the addresses they may ask to let in.
        self._spa_sources: dict[tuple[str, str], tuple[_Network, ...]] = {
            (door.name, user.name): tuple(
                ipaddress.ip_network(source, strict=False) for source in user.sources
            )
            for door in doors
            if door.spa is not None
            for user in door.spa.users
            if user.sources
        }

    # ----------------------------------------------------------------- queries

    @property
    def attempt_count(self) -> int:
        return self._count

    def next_deadline(self) -> float | None:
        """When the engine next needs a :class:`Tick` (``None``: nothing pending).

        Asked by the loop after every pass: the engine is the only owner of its
        deadlines. It may be early (a Tick then finds nothing due), never late.
        """
        due = min(self._next_expiry, self._stops[0][0] if self._stops else math.inf)
        return None if due == math.inf else due

    def active_sequence(self, door: str) -> tuple[Step, ...]:
        """The sequence a door accepts now (a TOTP door: its current time step's)."""
        totp = self.by_name[door].door.knock.totp
        if totp is not None:
            if self.now == -math.inf:
                return ()
            return totp_sequence(totp, time_step(totp, self.now + self.wall_offset))
        return self.by_name[door].sequence

    def restore(
        self,
        spa_seen: Sequence[tuple[bytes, float]] = (),
        totp_used: Sequence[tuple[str, int, float]] = (),
        untrusted_before: float = -math.inf,
    ) -> None:
        """Load the replay cache and used TOTP steps saved by an earlier run (wall-clock
        times). ``untrusted_before``: what was saved is incomplete; SPA packets made and
        TOTP steps begun before this wall time are refused."""
        self.untrusted_before = max(self.untrusted_before, untrusted_before)
        for digest, until in spa_seen:
            self._remember_spa(digest, until)
        for door, step, until in totp_used:
            if door in self._totp_used:
                self._totp_used[door][step] = until
        self._totp_next = -math.inf if self._totp_doors else math.inf

    def saved_state(self) -> tuple[list[tuple[bytes, float]], list[tuple[str, int, float]]]:
        """The replay cache and used TOTP steps, for the engine that replaces this one."""
        spa = list(self._spa_seen.items())
        totp = [
            (door, step, until)
            for door, used in self._totp_used.items()
            for step, until in used.items()
        ]
        return spa, totp

    # ----------------------------------------------------------------- events

    def handle(self, event: Event) -> list[Command]:
        """Feed one event; return the commands it causes, in order."""
        ts = event.ts
        if not -math.inf < ts < math.inf:  # NaN or infinite: malformed
            self.counters.malformed += 1
            return []
        if ts < self.now:  # the clock never goes back; late events count as "now"
            ts = self.now
        else:
            self.now = ts
        out: list[Command] = []
        kind = type(event)
        if kind is not Packet:  # the settings events; a packet (the hot path) skips them
            if kind is WallClock:
                self._wall_clock(event, ts, out)  # type: ignore[arg-type]
            elif kind is LocalAddresses:
                self.local = event.addresses  # type: ignore[union-attr]
            elif kind is NewDoors:
                self._new_doors(event, ts, out)  # type: ignore[arg-type]
        if ts + self.wall_offset >= self._totp_next:
            self._roll_totp(ts + self.wall_offset)
        if ts >= self._next_expiry:
            self._expire(ts, out)
        stops = self._stops
        if stops and ts >= stops[0][0]:
            self._run_due_stops(ts, out)
        if kind is Packet:
            self._packet(event, ts, out)  # type: ignore[arg-type]
        elif kind is SpaKnock:
            self._spa(event, ts, out)  # type: ignore[arg-type]
        elif kind is Vetted:
            self._vetted(event, ts, out)  # type: ignore[arg-type]
        return out

    def _wall_clock(self, event: WallClock, ts: float, out: list[Command]) -> None:
        offset = event.wall - event.ts
        if not -math.inf < offset < math.inf:
            self.counters.malformed += 1
            return
        step = offset - self.wall_offset
        if self._wall_known and abs(step) >= CLOCK_STEP:
            out.append(ClockStepped(ts, step))
        self.wall_offset, self._wall_known = offset, True
        self._totp_next = -math.inf if self._totp_doors else math.inf  # steps may change

    def drain(self) -> list[Command]:
        """Shutdown: every pending stop command, now, so no hole stays open."""
        out: list[Command] = [entry[2] for entry in sorted(self._stops)]
        self._stops.clear()
        return out

    # ----------------------------------------------------------------- packets

    def _packet(self, pkt: Packet, ts: float, out: list[Command]) -> None:
        """One packet against every door that uses its (port, protocol).

        The per-door step is written inline: this is the hot path.
        """
        counters = self.counters
        counters.packets += 1
        key = (pkt.dport, pkt.proto)
        states = self._index.get(key)
        if states is None:
            counters.ignored += 1
            return
        src = pkt.src
        dst = pkt.dst
        flags = pkt.flags if pkt.proto == TCP else None
        local = self.local
        to_host = local is None or dst in local
        counted = False
        for state in states:
            target = state.target
            if target is None:
                if not to_host:
                    continue  # sent to another address (another door's target, say)
            elif dst != target:
                continue
            if flags is not None and (
                (flags & state.flags_set) != state.flags_set or flags & state.flags_clear
            ):
                continue  # TCP flags do not pass the door's filter: ignored, not a reset
            counted = True
            sequence = state.sequence
            attempts = state.attempts
            attempt = attempts.get(src)
            if attempt is not None and ts >= attempt[DEADLINE]:
                self._drop(state, src, attempt, ts, out)
                attempt = None
            if attempt is not None:
                stage = attempt[STAGE]
                if sequence[stage] == key:  # the expected next step
                    counters.stages += 1
                    if stage + 1 == state.length:
                        del attempts[src]
                        self._count -= 1
                        self._complete(state, src, ts, out)
                    else:
                        attempt[STAGE] = stage + 1
                        attempt[LAST] = ts
                        out.append(StageReached(ts, state.name, src, stage + 1, state.length))
                    continue
                if (
                    state.ignore_duplicates
                    and sequence[stage - 1] == key
                    and ts - attempt[LAST] <= RETRANSMIT_WINDOW
                ):
                    counters.retransmissions += 1
                    continue
                del attempts[src]
                self._count -= 1
                counters.resets += 1
                out.append(SequenceReset(ts, state.name, src, stage, pkt.dport, pkt.proto))
            if sequence[0] != key:
                continue
            counters.stages += 1  # a first step: a new attempt (or a one-step door opens)
            if state.length == 1:
                self._complete(state, src, ts, out)
                continue
            if self._count >= self.max_attempts:
                self._evict_oldest()
            deadline = ts + state.timeout
            attempts[src] = [1, ts, deadline]
            self._count += 1
            if deadline < self._next_expiry:
                self._next_expiry = deadline
            out.append(StageReached(ts, state.name, src, 1, state.length))
        if not counted:
            counters.ignored += 1

    def _complete(self, state: DoorState, src: str, ts: float, out: list[Command]) -> None:
        door = state.door
        self.counters.opened += 1
        out.append(Opened(ts, door.name, src))
        records: list[Record] = []
        if state.step is not None:
            records.append(self._use_totp_step(state, src, ts))
        one_time = door.knock.one_time
        if one_time is not None:
            used = one_time.sequences[state.next_one_time - 1]
            records.append(
                MarkSequenceUsed(ts, door.name, src, one_time.path, used.line, used.offset)
            )
        if door.open is not None:
            decision = Decision(door, src, door.open.ports, ts + door.open.duration)
        else:
            decision = Decision(door, src, (), ts)
        self._vet(decision, ts, records, out)
        if one_time is not None:
            self._count -= len(state.attempts)
            remaining = state.advance_one_time()
            out.append(OneTimeAdvanced(ts, door.name, remaining))
            if not state.enabled:
                out.append(DoorExhausted(ts, door.name, one_time.path))
            self._reindex()

    def _vet(
        self, decision: Decision, ts: float, records: list[Record], out: list[Command]
    ) -> None:
        """Hold a completed knock until the runtime has vetted it (:class:`Vet`)."""
        self._ticket += 1
        self._pending[self._ticket] = decision
        out.append(Vet(ts, self._ticket, decision.door.name, decision.address, tuple(records)))

    def _vetted(self, answer: Vetted, ts: float, out: list[Command]) -> None:
        decision = self._pending.pop(answer.ticket, None)
        if decision is None:
            self.counters.malformed += 1  # no such ticket (answered twice, or made up)
            return
        if answer.refusal is not None:
            self.counters.refused += 1
            out.append(Refused(ts, decision.door.name, decision.address, answer.refusal))
            return
        if decision.accepted is not None:
            out.append(decision.accepted)
        self._act(decision, ts, out)
        if decision.receipt is not None and self._receipt_allowed(decision.receipt.to, ts):
            self.counters.receipts += 1
            out.append(decision.receipt._replace(at=ts))

    def _receipt_allowed(self, source: str, ts: float) -> bool:
        """Whether ``source`` may have one more receipt now (and count it if so)."""
        recent = self._receipts.get(source)
        if recent is None:
            if len(self._receipts) >= MAX_RECEIPT_SOURCES:
                self._receipts.popitem(last=False)
            recent = self._receipts[source] = []
        else:
            self._receipts.move_to_end(source)
        while recent and recent[0] <= ts - RECEIPT_WINDOW:
            del recent[0]
        if len(recent) >= RECEIPT_BURST:
            self.counters.receipts_limited += 1
            return False
        recent.append(ts)
        return True

    def _act(self, decision: Decision, ts: float, out: list[Command]) -> None:
        """A door's actions for ``address``: grant, close other doors, run commands."""
        door, address, ports, until = (
            decision.door,
            decision.address,
            decision.ports,
            decision.until,
        )
        if door.open is not None:
            out.append(Grant(ts, door.name, address, ports, until))
        out.extend(Revoke(ts, closed, address, door.name) for closed in door.close)
        ipv6 = ":" in address
        start = door.commands.start_for(ipv6)
        if start is not None:
            out.append(RunCommand(ts, door.name, address, "start", start.replace("%IP%", address)))
            stop = door.commands.stop_for(ipv6)
            if stop is not None:
                due = ts + door.commands.cmd_timeout
                command = RunCommand(due, door.name, address, "stop", stop.replace("%IP%", address))
                self._stop_seq += 1
                heapq.heappush(self._stops, (due, self._stop_seq, command))

    # ----------------------------------------------------------------- reload

    def _new_doors(self, event: NewDoors, ts: float, out: list[Command]) -> None:
        old = {state.door.name: state for state in self._fixed}
        keep: dict[str, DoorState] = {}
        kept: list[str] = []
        changed: list[str] = []
        added: list[str] = []
        for door in event.doors:
            state = old.pop(door.name, None)
            if state is None:
                added.append(door.name)
            elif _same(state.door, door):
                keep[door.name] = state
                kept.append(door.name)
            else:
                changed.append(door.name)
        dropped = [state for state in self.doors if state.door.name not in keep]
        self._count -= sum(len(state.attempts) for state in dropped)
        self.max_attempts = max(1, event.max_attempts)
        self._configure(event.doors, keep)
        self._next_expiry = -math.inf  # recomputed by the next expiry pass
        self._rebuild()  # the kept TOTP doors' time steps too
        out.append(DoorsReloaded(ts, tuple(kept), tuple(changed), tuple(added), tuple(old)))

    # ----------------------------------------------------------------- SPA

    def _spa(self, knock: SpaKnock, ts: float, out: list[Command]) -> None:
        counters = self.counters
        state = self.by_name.get(knock.door)
        user = self._spa_users.get(knock.door, {}).get(knock.user)
        if state is None or user is None or state.door.spa is None:
            counters.malformed += 1  # the edge only sends doors and users it knows
            return
        door, spa = state.door, state.door.spa
        wall = knock.ts + self.wall_offset  # when the packet was captured, by the wall clock
        expiry = self._spa_expiry
        while expiry and expiry[0][0] <= wall:
            until, digest = heapq.heappop(expiry)
            if self._spa_seen.get(digest) == until:
                del self._spa_seen[digest]
        unspecified = knock.address in ("0.0.0.0", "::")  # fwknop -s: "the sender"
        address = knock.src if unspecified else knock.address
        reason = None
        if knock.msg_type not in (1, 3):  # access, access with a client timeout
            reason = "message-type"
        elif knock.timestamp < wall - spa.max_age:
            reason = "stale"
        elif knock.timestamp > wall + spa.max_age:
            reason = "future"
        elif knock.digest in self._spa_seen:
            reason = "replay"
        elif knock.timestamp <= self.untrusted_before:
            # Made before this run started, and the state file that would say whether
            # it was used then is lost or damaged: it cannot be told from a replay.
            reason = "before-start"
        elif unspecified and (spa.require_source_address or knock.src in ("0.0.0.0", "::")):
            reason = "address"
        elif not knock.ports or not self._spa_allowed(door, user, knock.ports):
            reason = "ports"
        elif not self._address_allowed(door.name, user.name, address):
            reason = "address"
        if reason is not None:
            counters.spa_refused += 1
            out.append(SpaRefused(ts, door.name, knock.src, user.name, reason))
            return
        counters.spa_accepted += 1
        # A packet is acceptable while its timestamp is within max_age of our clock: it
        # is remembered for the largest max_age any door may have (a reload may raise
        # it, and another door may share the key), and a second more against rounding.
        seen_until = knock.timestamp + MAX_SPA_MAX_AGE + 1.0
        self._remember_spa(knock.digest, seen_until)
        record = SpaDigestSeen(ts, door.name, address, knock.digest, seen_until)
        default = door.open.duration if door.open is not None else spa.max_time
        duration = float(knock.client_timeout) if knock.client_timeout else default
        duration = min(duration, spa.max_time)
        if user.max_time is not None:
            duration = min(duration, user.max_time)
        ports = knock.ports if door.open is not None else ()
        accepted = SpaAccepted(ts, door.name, address, knock.src, user.name, ports, ts + duration)
        receipt = None
        if spa.receipt and knock.sport and knock.dst:
            receipt = SendReceipt(
                ts,
                door.name,
                user.name,
                knock.src,
                knock.sport,
                knock.dst,
                knock.digest,
                address,
                ts + duration,
            )
        decision = Decision(door, address, ports, ts + duration, accepted, receipt)
        self._vet(decision, ts, [record], out)

    def _address_allowed(self, door: str, user: str, address: str) -> bool:
        """Whether ``address`` is within the user's ``sources`` (none: any address)."""
        networks = self._spa_sources.get((door, user))
        if not networks:
            return True
        try:
            wanted = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(wanted in network for network in networks)

    @staticmethod
    def _spa_allowed(door: Door, user: SpaUser, ports: tuple[Step, ...]) -> bool:
        """Whether every requested port is within the user's allowance (fwknop refuses
        the whole request when one port is not)."""
        if user.ports is not None:
            allowed: tuple[Step, ...] = user.ports
        elif door.open is not None:
            allowed = door.open.ports
        else:
            return True  # a door that only runs commands opens no port
        return all(port in allowed for port in ports)

    def _remember_spa(self, digest: bytes, until: float) -> None:
        self._spa_seen[digest] = until
        heapq.heappush(self._spa_expiry, (until, digest))

    # ----------------------------------------------------------------- TOTP

    def _roll_totp(self, wall: float) -> None:
        """Keep one door state per accepted, unused time step of every TOTP door."""
        changed = False
        next_roll = math.inf
        untrusted = self.untrusted_before
        for name, door in self._totp_doors.items():
            totp = door.knock.totp
            assert totp is not None
            steps = window(totp, wall)
            used = self._totp_used[name]
            for step in [step for step, until in used.items() if until <= wall]:
                del used[step]
            variants = self._totp[name]
            for step in [step for step in variants if step not in steps or step in used]:
                self._count -= len(variants.pop(step).attempts)
                changed = True
            for step in steps:
                # A step begun before an untrusted start may have been used then.
                if step not in variants and step not in used and step * totp.period >= untrusted:
                    variants[step] = DoorState(door, totp_sequence(totp, step), step)
                    changed = True
            next_roll = min(next_roll, (steps.start + totp.skew + 1) * totp.period)
        self._totp_next = next_roll
        if changed:
            self._rebuild()

    def _use_totp_step(self, state: DoorState, src: str, ts: float) -> TotpStepUsed:
        door = state.door
        totp = door.knock.totp
        assert totp is not None and state.step is not None
        # Out of every window then, whatever skew a reload may set.
        until = float((state.step + MAX_TOTP_SKEW + 1) * totp.period)
        self._totp_used[door.name][state.step] = until
        variant = self._totp[door.name].pop(state.step, None)
        if variant is not None:
            self._count -= len(variant.attempts)
        self._rebuild()
        return TotpStepUsed(ts, door.name, src, state.step, until)

    def _totp_range(self, totp: Totp) -> list[tuple[int, str]]:
        keys = self._range_keys.get(totp)
        if keys is None:
            keys = [(port, totp.proto) for port in range(totp.low, totp.high + 1)]
            self._range_keys[totp] = keys
        return keys

    def _rebuild(self) -> None:
        self.doors = self._fixed + [
            state for variants in self._totp.values() for state in variants.values()
        ]
        self._reindex()

    # ----------------------------------------------------------------- expiry

    def _drop(
        self, state: DoorState, src: str, attempt: Attempt, ts: float, out: list[Command]
    ) -> None:
        """Remove an attempt whose time ran out."""
        del state.attempts[src]
        self._count -= 1
        self.counters.timeouts += 1
        if attempt[STAGE] >= 2:  # a lone first knock is noise (scans, floods): counted only
            out.append(SequenceTimeout(ts, state.door.name, src, attempt[STAGE]))

    def _expire(self, now: float, out: list[Command]) -> None:
        earliest = math.inf
        for state in self.doors:
            attempts = state.attempts
            while attempts:
                src = next(iter(attempts))
                attempt = attempts[src]
                if attempt[DEADLINE] > now:
                    earliest = min(earliest, attempt[DEADLINE])
                    break
                self._drop(state, src, attempt, now, out)
        self._next_expiry = earliest

    def _evict_oldest(self) -> None:
        oldest: DoorState | None = None
        oldest_start = math.inf
        for state in self.doors:
            if state.attempts:
                first = next(iter(state.attempts.values()))
                start = first[DEADLINE] - state.timeout
                if start < oldest_start:
                    oldest, oldest_start = state, start
        if oldest is not None:
            oldest.attempts.popitem(last=False)
            self._count -= 1
            self.counters.evictions += 1

    def _run_due_stops(self, now: float, out: list[Command]) -> None:
        while self._stops and self._stops[0][0] <= now:
            out.append(heapq.heappop(self._stops)[2])

    # ----------------------------------------------------------------- index

    def _reindex(self) -> None:
        index: dict[tuple[int, str], tuple[DoorState, ...]] = {}
        for state in self.doors:
            if state.enabled and state.step is None:
                for step in dict.fromkeys(state.sequence):
                    key = (step.port, step.proto)
                    index[key] = (*index.get(key, ()), state)
        # Every port of a TOTP door's range counts for each of its time steps, so a
        # packet off the sequence resets an attempt: a sweep of the range in port order
        # cannot complete a sequence whose ports happen to ascend. One shared tuple per
        # door for its whole range keeps this rebuild (once a period) at about 1 ms.
        for name, variants in self._totp.items():
            if variants:
                totp = self._totp_doors[name].knock.totp
                assert totp is not None
                keys = self._totp_range(totp)
                states = tuple(variants.values())
                overlap = {key: index[key] + states for key in keys if key in index}
                index.update(dict.fromkeys(keys, states))
                index.update(overlap)
        self._index = index


def _same(old: Door, new: Door) -> bool:
    """Whether a reloaded door is the running one (where it is written may move)."""
    return dataclasses.replace(old, origin=None) == dataclasses.replace(new, origin=None)
