"""The daemon's event stream: its decisions as typed records, a bounded recent history,
and live followers (``knockgate events``; later the notifiers and ``knockgate top``).

Only the loop publishes; followers read on their own threads::

    loop: notices, vet answers, grants, revokes, service events, reloads, repairs
        --> EventLog.publish(EventRecord) --> history (the last HISTORY records)
                                          --> each Follower's bounded buffer
    status-client thread / notifier --> Follower.next(timeout) --> its consumer

Flood-safe: what a packet can cause by itself (a first knock, a later step, a reset, a
timeout) is never an event of its own. It is counted per door (:class:`KnockTally`, the
counters the metrics read too) and summarised in one ``knocks`` record per
:data:`SUMMARY_SECONDS` in which anything happened. Refusals (held off, SPA refused) are
records of their own up to :data:`REFUSAL_BUDGET` a window, then only counted in the
summary. A follower whose buffer is full is dropped (told so, then closed), never waited
for: publishing costs the loop a lock and a ``put`` per follower, per decision.
"""

from __future__ import annotations

import collections
import heapq
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from appliance.core.events import (
    Command,
    Opened,
    SequenceReset,
    SequenceTimeout,
    SpaRefused,
    StageReached,
)

HISTORY = 1000  # records kept for a new client
FOLLOW_BUFFER = 1000  # records a follower may be behind before it is dropped
SUMMARY_SECONDS = 10.0  # the knock noise summary's window
REFUSAL_BUDGET = 100  # refusal records per window; the rest are counted in the summary

# The kinds of record, in the order the README lists them.
KINDS = (
    "opened",
    "closed",
    "expired",
    "held-off",
    "refused",
    "grant-failed",
    "service-started",
    "service-ready",
    "service-stopped",
    "service-failed",
    "reload",
    "reload-refused",
    "repair",
    "knocks",
    "dropped",  # to a follower only: it was too slow and is cut off
)

# Knock outcomes by door (the label of knockgate_knocks_total): the notices'...
FIRST_KNOCK, STAGE, COMPLETED, RESET, TIMED_OUT = (
    "first_knock",
    "stage",
    "completed",
    "reset",
    "timed_out",
)
# ...and the vet's answer to a completed knock.
OPENED, HELD_OFF, UNRECORDED = "opened", "held_off", "unrecorded"
OUTCOMES = (FIRST_KNOCK, STAGE, COMPLETED, RESET, TIMED_OUT, OPENED, HELD_OFF, UNRECORDED)
NOISE = (FIRST_KNOCK, STAGE, RESET, TIMED_OUT)  # summarised, never one record each


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One decision. ``time`` is unix time; the other fields are empty when they do not
    apply. ``counts``: a ``knocks`` summary's counts by door, then by outcome."""

    time: float
    kind: str
    door: str = ""
    address: str = ""
    service: str = ""
    detail: str = ""
    counts: dict[str, dict[str, int]] | None = None
    held_back: int = 0  # a ``knocks`` summary: refusals only counted (in ``detail`` as words)

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"time": round(self.time, 3), "kind": self.kind}
        for name in ("door", "address", "service", "detail"):
            value = getattr(self, name)
            if value:
                data[name] = value
        if self.counts is not None:
            data["counts"] = self.counts
        return data

    def text(self) -> str:
        """One line: ``2026-12-04 23:40:01 opened door ssh for 198.18.1.7: 22/tcp for 30 s``."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.time))
        words = [stamp, self.kind]
        if self.service:
            words.append(f"service {self.service}")
        if self.door:
            words.append(f"door {self.door}")
        if self.address:
            words.append(f"for {self.address}")
        line = " ".join(words)
        if self.counts:
            line += ": " + "; ".join(
                f"{door}: " + ", ".join(f"{n} {what}" for what, n in sorted(by.items()))
                for door, by in sorted(self.counts.items())
            )
        if self.detail:
            line += f": {self.detail}" if not self.counts else f" ({self.detail})"
        return line

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EventRecord:
        return cls(
            float(data.get("time", 0.0)),
            str(data.get("kind", "")),
            str(data.get("door", "")),
            str(data.get("address", "")),
            str(data.get("service", "")),
            str(data.get("detail", "")),
            data.get("counts"),
        )


class KnockTally:
    """Plain counters by door the loop keeps for every notice: knocks by outcome, refused
    SPA packets by reason. Label values are door names (from the configuration), the fixed
    outcomes and the engine's fixed SPA reasons: never an address."""

    def __init__(self) -> None:
        self.knocks: dict[tuple[str, str], int] = {}
        self.spa_refused: dict[tuple[str, str], int] = {}

    def notice(self, command: Command) -> None:
        """The hot path: one dict update for a notice about a knock; others are ignored."""
        if type(command) is StageReached:
            key = (command.door, FIRST_KNOCK if command.stage == 1 else STAGE)
        elif type(command) is SequenceReset:
            key = (command.door, RESET)
        elif type(command) is SequenceTimeout:
            key = (command.door, TIMED_OUT)
        elif type(command) is Opened:
            key = (command.door, COMPLETED)
        elif type(command) is SpaRefused:
            spa = (command.door, command.reason)
            self.spa_refused[spa] = self.spa_refused.get(spa, 0) + 1
            return
        else:
            return
        knocks = self.knocks
        knocks[key] = knocks.get(key, 0) + 1

    def count(self, door: str, outcome: str) -> None:
        key = (door, outcome)
        self.knocks[key] = self.knocks.get(key, 0) + 1

    def keep_doors(self, doors: set[str]) -> None:
        """A reload: the series of doors that are gone go."""
        self.knocks = {k: n for k, n in self.knocks.items() if k[0] in doors}
        self.spa_refused = {k: n for k, n in self.spa_refused.items() if k[0] in doors}


class Follower:
    """One live consumer's bounded buffer. The loop never waits for it: when the buffer
    is full the follower is dropped (``dropped`` set) and gets nothing more."""

    def __init__(self, buffer: int = FOLLOW_BUFFER) -> None:
        self._queue: queue.Queue[EventRecord] = queue.Queue(maxsize=buffer)
        self.dropped = False

    def offer(self, record: EventRecord) -> bool:
        """From the loop (under the log's lock): ``False`` when it must be dropped."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped = True
            return False
        return True

    def next(self, timeout: float) -> EventRecord | None:
        """The next record, or ``None`` when none came within ``timeout``."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None


class GrantBook:
    """The grants this run made and when each ends, so that their expiry becomes an
    ``expired`` record (the kernel closes them on its own, without telling anyone) and
    ``knockgate_grants_open`` counts them by door. A renewal moves the end; a close knock
    removes it. One entry per (door, address): bounded by the grants in force."""

    def __init__(self) -> None:
        self._until: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, str, str]] = []

    def add(self, door: str, address: str, until: float) -> None:
        self._until[(door, address)] = until
        heapq.heappush(self._heap, (until, door, address))

    def remove(self, door: str, address: str) -> None:
        self._until.pop((door, address), None)  # its heap entry is skipped when it comes

    def expired(self, now: float) -> list[tuple[str, str]]:
        """The (door, address) whose grant ended by ``now``, each once."""
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            until, door, address = heapq.heappop(heap)
            if self._until.get((door, address)) == until:
                del self._until[(door, address)]
                out.append((door, address))
        return out

    def holds(self, door: str, address: str) -> bool:
        """Whether this run's grant at ``door`` for ``address`` is still in force."""
        return (door, address) in self._until

    def by_door(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for door, _ in self._until:
            counts[door] = counts.get(door, 0) + 1
        return counts

    def keep_doors(self, doors: set[str]) -> None:
        self._until = {k: u for k, u in self._until.items() if k[0] in doors}


@dataclass
class _Window:
    start: float
    knocks: dict[tuple[str, str], int] = field(default_factory=dict)
    refusals: int = 0
    held_back: int = 0


class EventLog:
    """The bounded history and the followers; :meth:`publish` is called by the loop only."""

    def __init__(
        self,
        history: int = HISTORY,
        wall: Any = time.time,
        clock: Any = time.monotonic,
    ) -> None:
        self._history: collections.deque[EventRecord] = collections.deque(maxlen=history)
        self._followers: list[Follower] = []
        self._lock = threading.Lock()
        self.wall = wall
        self.clock = clock
        self.tally = KnockTally()
        self.published = 0
        self.followers_dropped = 0
        self._window = _Window(clock())

    # ---------------------------------------------------------------- the loop's side

    def publish(self, record: EventRecord) -> None:
        with self._lock:
            self._history.append(record)
            self.published += 1
            if self._followers:
                kept = [f for f in self._followers if f.offer(record)]
                self.followers_dropped += len(self._followers) - len(kept)
                self._followers = kept

    def event(self, kind: str, **fields: Any) -> None:
        """Publish a record of ``kind`` stamped now."""
        self.publish(EventRecord(self.wall(), kind, **fields))

    def refusal(self, kind: str, **fields: Any) -> None:
        """A refusal (held off, refused): a record while the window's budget lasts."""
        window = self._window
        if window.refusals < REFUSAL_BUDGET:
            window.refusals += 1
            self.event(kind, **fields)
        else:
            window.held_back += 1

    def summarise(self) -> None:
        """Once a second from the loop: at the end of a window, one ``knocks`` record of
        the noise counted in it (none when nothing happened: quiet in a steady state)."""
        now = self.clock()
        window = self._window
        if now - window.start < SUMMARY_SECONDS:
            return
        counts: dict[str, dict[str, int]] = {}
        for key, total in self.tally.knocks.items():
            door, outcome = key
            if outcome not in NOISE:
                continue
            delta = total - window.knocks.get(key, 0)
            if delta > 0:
                counts.setdefault(door, {})[outcome] = delta
        if counts or window.held_back:
            detail = f"last {now - window.start:.0f} s"
            if window.held_back:
                detail += f"; {window.held_back} more refusals not shown one by one"
            self.event("knocks", detail=detail, counts=counts, held_back=window.held_back)
        self._window = _Window(now, dict(self.tally.knocks))

    def keep_doors(self, doors: set[str]) -> None:
        self.tally.keep_doors(doors)
        self._window.knocks = {k: n for k, n in self._window.knocks.items() if k[0] in doors}

    # ---------------------------------------------------------------- readers' side

    def subscribe(
        self, history: int = HISTORY, buffer: int = FOLLOW_BUFFER
    ) -> tuple[list[EventRecord], Follower]:
        """The last ``history`` records and a follower that gets every later one (no gap,
        no repeat: both under the same lock)."""
        follower = Follower(buffer)
        with self._lock:
            recent = list(self._history)[-history:] if history > 0 else []
            self._followers.append(follower)
        return recent, follower

    def unsubscribe(self, follower: Follower) -> None:
        with self._lock:
            if follower in self._followers:
                self._followers.remove(follower)

    def recent(self, history: int = HISTORY) -> list[EventRecord]:
        with self._lock:
            return list(self._history)[-history:] if history > 0 else []

    def __iter__(self) -> Iterator[EventRecord]:
        return iter(self.recent())
