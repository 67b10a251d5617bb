"""The link between the daemon's loop and the fleet's store: two threads.

The loop calls :meth:`FleetLink.publish` and :meth:`FleetLink.claim`, which only put
the request on the link's outbox; it never waits on the store. The writer thread
carries the outbox out in order; the reader thread (re)connects, catches up on the
live grants and follows the stream. Both hand what they learn back to the loop as
items (:class:`FleetApply`, :class:`FleetClaimed`, :class:`FleetHealth`) through the
``enqueue`` given; the link shares no state with the loop.

While the store is unreachable, publishes wait in a bounded backlog (published when
it comes back, grants only while their deadline has not passed: the fleet converges)
and claims are answered ``unreachable`` at once (the loop applies ``on_outage``). The
reader tries again with a doubling backoff; one :class:`FleetHealth` per change.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Literal

from appliance.fleet.messages import (
    FleetApply,
    FleetClaimed,
    FleetHealth,
    FleetItem,
    FleetMessage,
)
from appliance.fleet.store import FleetStore, FleetUnreachable

log = logging.getLogger("knockgate.fleet")

BLOCK = 2.0  # seconds the reader waits in one XREAD
MIN_BACKOFF = 0.2  # seconds before the first reconnect
MAX_BACKOFF = 5.0
BACKLOG_MAX = 10_000  # messages kept while the store is unreachable (the oldest go first)

_Op = (
    tuple[Literal["publish"], FleetMessage]
    | tuple[Literal["claim"], int, tuple[tuple[str, float], ...]]
    | tuple[Literal["flush"]]
    | None
)


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
        self._backlog: collections.deque[FleetMessage] = collections.deque(maxlen=BACKLOG_MAX)
        self._reachable = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._reported: bool | None = None  # the reachability last told to the loop
        self._threads: list[threading.Thread] = []
        # Read by the loop for status (plain ints and a string: no lock needed).
        self.published = 0
        self.malformed = 0
        self.last_error = ""

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    # ----------------------------------------------------------------- the loop's calls

    def start(self) -> None:
        for name, target in (("writer", self._write), ("reader", self._read)):
            thread = threading.Thread(target=target, name=f"knockgate-fleet-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def publish(self, message: FleetMessage) -> None:
        self._outbox.put(("publish", message))

    def claim(self, ticket: int, claims: tuple[tuple[str, float], ...]) -> None:
        self._outbox.put(("claim", ticket, claims))

    def stop(self, timeout: float = 1.0) -> None:
        """Stop both threads (what is still in the outbox is dropped: the grants it
        held close at their own deadline here, and the rest of the fleet never had them)."""
        self._stopping.set()
        self._outbox.put(None)
        for thread in self._threads:
            thread.join(timeout)
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
                if not self._reachable.is_set():
                    self._backlog.append(message)
                    return
                try:
                    self.store.publish(message, self.wall())
                    self.published += 1
                except FleetUnreachable as error:
                    self._backlog.append(message)
                    self._down(str(error))
            case ("claim", ticket, claims):
                if not self._reachable.is_set():
                    self.enqueue(FleetClaimed(ticket, "unreachable", self.last_error))
                    return
                try:
                    taken = all(self.store.claim(key, self.host, ttl) for key, ttl in claims)
                except FleetUnreachable as error:
                    self._down(str(error))
                    self.enqueue(FleetClaimed(ticket, "unreachable", str(error)))
                    return
                self.enqueue(FleetClaimed(ticket, "claimed" if taken else "taken"))
            case ("flush",):
                self._flush()
            case _:
                raise TypeError(f"unknown fleet op {op!r}")

    def _flush(self) -> None:
        """What waited during an outage, in order; grants whose deadline passed are dropped."""
        while self._backlog and self._reachable.is_set():
            message = self._backlog[0]
            if message.kind == "grant" and message.deadline <= self.wall():
                self._backlog.popleft()
                continue
            try:
                self.store.publish(message, self.wall())
            except FleetUnreachable as error:
                self._down(str(error))
                return
            self._backlog.popleft()
            self.published += 1

    # ----------------------------------------------------------------- reader thread

    def _read(self) -> None:
        backoff = MIN_BACKOFF
        after = "0-0"
        while not self._stopping.is_set():
            try:
                if not self._reachable.is_set():
                    after = self._connect()
                    backoff = MIN_BACKOFF
                    continue
                for ident, message in self.store.read(after, self.block):
                    after = ident
                    if message is None:
                        self.malformed += 1
                    elif message.origin != self.host:
                        self.enqueue(FleetApply(message))
            except FleetUnreachable as error:
                self._down(str(error))
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            except Exception:  # a bug: logged, tried again after a pause
                log.exception("fleet: internal error in the reader (a bug; going on)")
                self._stopping.wait(MAX_BACKOFF)

    def _connect(self) -> str:
        """Ping, note the stream's end, read the live grants (catch-up), then tell the
        loop and let the writer publish its backlog. Returns where to follow from."""
        self.store.ping()
        after = self.store.last_id()
        for message in self.store.live(self.wall()):
            self.enqueue(FleetApply(message, catchup=True))
        self._up()
        self._outbox.put(("flush",))
        return after

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
