"""The link between the daemon's loop and the fleet's store: three threads.

The loop calls :meth:`FleetLink.publish` and :meth:`FleetLink.claim`, which only put
the request on a queue; it never waits on the store. The writer thread publishes in
order; the claimer thread answers claims (a queue of its own: a claim never waits
behind a backlog of publishes); the reader thread (re)connects and follows the
stream. They hand what they learn back to the loop as items (:class:`FleetApply`,
:class:`FleetReconcile`, :class:`FleetClaimed`, :class:`FleetHealth`) through the
``enqueue`` given; the link shares no state with the loop.

Every publish goes through one ordered backlog (at most :data:`BACKLOG_MAX`): while the
store is unreachable it waits there (grants only while their deadline has not passed),
and a new message never overtakes it. The reader keeps its position in the stream
across reconnects: on a reconnect it reads on from where it was (a close made
elsewhere meanwhile reaches this host), then publishes the backlog (a close made here
meanwhile reaches every host, and this one reads it back too: the loop carries out a
close of its own only on what it applied from the fleet before it, never on a grant
made here after it; a host never applies its own grants), dropping its grants for a
door and address closed elsewhere meanwhile (that close closed them here too: a late
grant does not reopen; no clocks compared). When that position was trimmed away
(before or while reading on; ``0-0``, an empty stream at the first connect, counts as
trimmed once the stream holds anything) a close made meanwhile may be gone: it
publishes only the backlog's closes, drops its grants (fail closed: knock again) and
reads the live grants in full (:class:`FleetReconcile`: grants no longer live, those
dropped included, are closed here). The first connect after a start drops backlog
grants for a door and address closed in the readable stream and not live (the close
may have come after them), publishes the rest, then reads the live grants (catch-up,
this host's own included; the dropped ones are closed here). A store that lost its data
meanwhile (a new epoch: Redis restarted without persistence, or flushed) is met the same
way, then with a reconcile: the grants made during the outage come back whichever host
reconnects first, and fleet grants from before the loss close (fail closed).

The store counts as reachable after a connect that wrote (the backlog) and read (the
stream); reconnects back off from :data:`MIN_BACKOFF` to :data:`MAX_BACKOFF` with
jitter, and the backoff starts again only after such a connect: a store that answers
PING but refuses XREAD or XADD (an ACL, a full server) is one warning, not a storm.
"""

from __future__ import annotations

import collections
import logging
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Literal

from appliance.fleet.messages import (
    FleetApply,
    FleetClaimed,
    FleetHealth,
    FleetItem,
    FleetMessage,
    FleetReconcile,
)
from appliance.fleet.store import READ_COUNT, FleetStore, FleetUnreachable

log = logging.getLogger("knockgate.fleet")

BLOCK = 2.0  # seconds the reader waits in one XREAD
MIN_BACKOFF = 0.2  # seconds before the first reconnect
MAX_BACKOFF = 5.0
BACKLOG_MAX = 10_000  # messages kept while the store is unreachable (the oldest go first)
IN_FLIGHT = 1_000  # applies handed to the loop and not yet carried out (the reader waits)

_Op = tuple[Literal["publish"], FleetMessage] | tuple[Literal["flush"]] | None
_Claim = tuple[int, tuple[tuple[str, float], ...]] | None


class FleetLink:
    def __init__(
        self,
        host: str,
        store: FleetStore,
        enqueue: Callable[[FleetItem], None],
        *,
        wall: Callable[[], float] = time.time,
        block: float | None = None,
    ) -> None:
        self.host = host
        self.store = store
        self.enqueue = enqueue
        self.wall = wall
        self.block = BLOCK if block is None else block
        self._outbox: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._claims: queue.SimpleQueue[_Claim] = queue.SimpleQueue()
        self._backlog: collections.deque[FleetMessage] = collections.deque(maxlen=BACKLOG_MAX)
        self._publishing = threading.Lock()  # one publisher at a time: the backlog's order
        self._in_flight = threading.Semaphore(IN_FLIGHT)
        self._reachable = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._reported: bool | None = None  # the reachability last told to the loop
        self._after: str | None = None  # the stream position (None: not connected yet)
        self._epoch: str | None = None  # the store's epoch at the last connect
        self._threads: list[threading.Thread] = []
        # Read by the loop for status (plain ints and a string: no lock needed).
        self.published = 0
        self.malformed = 0
        self.reconciled = 0
        self.stale = 0  # backlog grants dropped: closed elsewhere during the outage
        self.last_error = ""

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    # ----------------------------------------------------------------- the loop's calls

    def start(self) -> None:
        for name, target in (
            ("writer", self._write),
            ("claimer", self._claim_loop),
            ("reader", self._read),
        ):
            thread = threading.Thread(target=target, name=f"knockgate-fleet-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def publish(self, message: FleetMessage) -> None:
        self._outbox.put(("publish", message))

    def claim(self, ticket: int, claims: tuple[tuple[str, float], ...]) -> None:
        self._claims.put((ticket, claims))

    def applied(self) -> None:
        """The loop carried out one :class:`FleetApply` (the reader may hand another)."""
        self._in_flight.release()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the threads, waiting ``timeout`` seconds in all (what is still queued is
        dropped: the grants it held close at their own deadline here, and the rest of
        the fleet never had them). A thread stuck on an unreachable store is left to
        die with the process (daemon threads)."""
        self._stopping.set()
        self._outbox.put(None)
        self._claims.put(None)
        self._in_flight.release()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.store.close()

    # ----------------------------------------------------------------- writer thread

    def _write(self) -> None:
        while True:
            op = self._outbox.get()
            if op is None or self._stopping.is_set():
                return
            try:
                self._carry_out(op)
            except Exception:  # a bug: logged, the thread goes on
                log.exception("fleet: internal error in the writer (a bug; going on)")

    def _carry_out(self, op: _Op) -> None:
        match op:
            case ("publish", message):
                with self._publishing:
                    self._backlog.append(message)  # behind what waits: the order holds
            case ("flush",):
                pass
            case _:
                raise TypeError(f"unknown fleet op {op!r}")
        if not self._reachable.is_set():
            return
        try:
            self._flush()
        except FleetUnreachable as error:
            self._down(str(error))

    def _flush(self) -> None:
        """What waits, in order; grants whose deadline passed are dropped."""
        with self._publishing:
            while self._backlog:
                message = self._backlog[0]
                if message.kind == "grant" and message.deadline <= self.wall():
                    self._backlog.popleft()
                    continue
                self.store.publish(message, self.wall())
                self._backlog.popleft()
                self.published += 1

    # ----------------------------------------------------------------- claimer thread

    def _claim_loop(self) -> None:
        while True:
            request = self._claims.get()
            if request is None or self._stopping.is_set():
                return
            ticket, claims = request
            try:
                self.enqueue(self._answer(ticket, claims))
            except Exception:  # a bug: logged, the claim counts as unreachable
                log.exception("fleet: internal error in the claimer (a bug; going on)")
                self.enqueue(FleetClaimed(ticket, "unreachable"))

    def _answer(self, ticket: int, claims: tuple[tuple[str, float], ...]) -> FleetClaimed:
        """A failed claim is that claim's outcome; the reader alone decides whether the
        store is reachable (one slow claim does not flip the fleet's health)."""
        if not self._reachable.is_set():
            return FleetClaimed(ticket, "unreachable")
        try:
            taken = all(self.store.claim(key, self.host, ttl) for key, ttl in claims)
        except FleetUnreachable:
            return FleetClaimed(ticket, "unreachable")
        return FleetClaimed(ticket, "claimed" if taken else "taken")

    # ----------------------------------------------------------------- reader thread

    def _read(self) -> None:
        backoff = MIN_BACKOFF
        while not self._stopping.is_set():
            try:
                if not self._reachable.is_set():
                    self._connect()
                    backoff = MIN_BACKOFF  # it wrote and read: the store works
                    continue
                assert self._after is not None
                self._follow(self.store.read(self._after, self.block))
            except Exception as error:
                if isinstance(error, FleetUnreachable):
                    why = str(error)
                else:  # a bug, or a reply of another shape: the store counts as down
                    if self._reported is not False:
                        log.exception("fleet: internal error in the reader (going on)")
                    why = f"internal error: {type(error).__name__}: {error}"
                self._down(why)
                self._stopping.wait(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, MAX_BACKOFF)

    def _connect(self) -> None:
        """Ping. On the first connect: drop the backlog's grants closed in the readable
        stream and not live, publish the rest, read the live grants (catch-up) and
        follow the stream from its end. Later: read on from the last position (what was
        closed meanwhile), then publish the backlog; when that position was trimmed
        away (before or while reading on), publish only the backlog's closes and
        reconcile on the live grants. Then tell the loop."""
        self.store.ping()
        epoch = self.store.epoch(uuid.uuid4().hex)
        if self._after is None:
            after = self.store.last_id()
            dropped = self._drop_closed_in_stream()
            self._flush()
            self._catch_up(dropped)
            self._after = after
        elif epoch is not None and self._epoch is not None and epoch != self._epoch:
            self._lost()
        elif self.store.trimmed(self._after):
            self._resync()
        else:
            start = self._after
            closed: set[str] = set()
            while True:
                entries = self._follow(self.store.read(self._after, None))
                closed.update(
                    m.field
                    for _, m in entries
                    if m is not None and m.kind == "revoke" and m.origin != self.host
                )
                if len(entries) < READ_COUNT:
                    break
            if self.store.trimmed(start):  # trimmed while reading on: entries may be missed
                self._resync()
            else:
                self._drop_grants(closed)
                self._flush()
        self._epoch = epoch
        self._follow(self.store.read(self._after, None))
        self._up()
        self._outbox.put(("flush",))  # what was queued while connecting

    def _resync(self) -> None:
        """This host's position was trimmed away: a close made elsewhere meanwhile may
        be gone from the stream, so the backlog's grants are not published (fail
        closed: not live, the reconcile closes them here too; knock again), only its
        closes; then the live grants in full."""
        with self._publishing:
            closes = [m for m in self._backlog if m.kind != "grant"]
            self.stale += sum(m.kind == "grant" and m.deadline > self.wall() for m in self._backlog)
            self._backlog.clear()
            self._backlog.extend(closes)
        self._flush()
        self._reconcile()

    def _lost(self) -> None:
        """The store lost its data while this host was away (Redis restarted without
        persistence, or flushed): the stream read on from here is gone, the live
        grants too. As after a start, the backlog's grants not closed in the new
        stream are published (every host lost contact when Redis went: the grants
        made meanwhile come back whichever host reconnects first), then the live
        grants in full (fleet grants applied here before the loss close: fail
        closed)."""
        published = self.published
        self._drop_closed_in_stream()
        self._flush()
        self._reconcile()
        log.warning(
            "fleet: the shared state lost its data (Redis restarted empty or flushed): "
            "%d grant(s) and close(s) made here meanwhile published; fleet grants from "
            "before it are closed here",
            self.published - published,
        )

    def _drop_closed_in_stream(self) -> bool:
        """Before the first publish after a start: backlog grants for a door and address
        closed anywhere in the readable stream and not live now are dropped (that close
        may have been made during the startup outage, after them: fail closed, knock
        again). ``True`` when any was dropped (the loop then closes them here)."""
        with self._publishing:
            fields = {m.field for m in self._backlog if m.kind == "grant"}
        if not fields:
            return False
        live = {m.field for m in self.store.live(self.wall()) if m is not None}
        closed: set[str] = set()
        position = "0-0"
        while True:
            entries = self.store.read(position, None)
            for ident, message in entries:
                position = ident
                if message is not None and message.kind == "revoke":
                    closed.add(message.field)
            if len(entries) < READ_COUNT:
                break
        return self._drop_grants((fields & closed) - live) > 0

    def _catch_up(self, close_missing: bool = False) -> None:
        """The live grants, applied here; ``close_missing``: grants in place here that
        are not live (backlog grants dropped at the first connect) are closed too."""
        found = self.store.live(self.wall())
        for message in found:
            if message is None:
                self.malformed += 1
            else:
                self._hand(FleetApply(message, catchup=True))
        if close_missing:
            fields = tuple(m.field for m in found if m is not None)
            self.enqueue(FleetReconcile((), fields))

    def _reconcile(self) -> None:
        """The stream moved on past this host's position: the live grants in full."""
        after = self.store.last_id()  # before the hash: nothing falls in between
        found = self.store.live(self.wall())
        self.malformed += sum(message is None for message in found)
        live = tuple(m for m in found if m is not None and m.origin != self.host)
        self.enqueue(FleetReconcile(live, tuple(m.field for m in found if m is not None)))
        self.reconciled += 1
        self._after = after

    def _follow(
        self, entries: list[tuple[str, FleetMessage | None]]
    ) -> list[tuple[str, FleetMessage | None]]:
        for ident, message in entries:
            self._after = ident
            if message is None:
                self.malformed += 1
                continue
            if message.origin != self.host or message.kind == "revoke":
                self._hand(FleetApply(message))  # never this host's own grants
        return entries

    def _drop_grants(self, closed: set[str]) -> int:
        """Backlog grants for a door and address closed elsewhere during the outage
        are not published: that close reached this host too (it closed the grant
        here), so the fleet agrees on closed, whatever the hosts' clocks say. How many
        were dropped."""
        if not closed:
            return 0
        with self._publishing:
            kept = [m for m in self._backlog if m.kind != "grant" or m.field not in closed]
            dropped = len(self._backlog) - len(kept)
            self.stale += dropped
            self._backlog.clear()
            self._backlog.extend(kept)
        return dropped

    def _hand(self, item: FleetApply) -> None:
        """To the loop, at most :data:`IN_FLIGHT` not yet carried out."""
        while not self._in_flight.acquire(timeout=0.5):
            if self._stopping.is_set():
                return
        self.enqueue(item)

    def _up(self) -> None:
        with self._lock:
            self._reachable.set()
            if self._reported is not True:
                self._reported = True
                self.enqueue(FleetHealth(True))

    def _down(self, error: str) -> None:
        with self._lock:
            self.last_error = error
            self._reachable.clear()
            if self._reported is not False:
                self._reported = False
                self.enqueue(FleetHealth(False, error))
