"""One notifier's delivery: a bounded queue and a thread that sends, retries, backs off.

The hub puts items (event records, rendered digests) and never waits: when the queue is
full the oldest item is dropped and counted. The thread sends the oldest item; an
error it can retry (the receiver is down, times out, answers 5xx) keeps the item at the
head and waits :func:`backoff` (doubling from :data:`BACKOFF_FIRST` to
:data:`BACKOFF_CAP`); an answer that refuses it for good (4xx) drops it, counted as
``rejected``, and the next item is tried at once (the receiver is up: no backoff; the
first refusal is logged, later ones until a delivery succeeds only counted); any other
exception (a bug, an answer nobody foresaw) drops it too: logged once per exception
type, never the end of the thread. A failure streak is logged twice: a
warning at its first failure and, when a delivery succeeds again, one line saying how
long it lasted, how many attempts failed and how many items were dropped meanwhile.
Nothing is logged in a steady state.

:meth:`Delivery.step` is the whole policy with the time as an argument (the unit tests
drive it with a fake sender and clock); the thread only waits between steps.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger("knockgate.notify")

T = TypeVar("T")
BACKOFF_FIRST = 1.0
BACKOFF_CAP = 300.0
OUTCOMES = ("sent", "failed", "rejected", "dropped")


class DeliveryError(Exception):
    """The receiver could not take it now: tried again later."""


class Rejected(DeliveryError):
    """The receiver refused it for good (e.g. HTTP 400): not tried again."""


def backoff(failures: int, first: float = BACKOFF_FIRST, cap: float = BACKOFF_CAP) -> float:
    """Seconds to wait after ``failures`` consecutive failures (1, 2, 4, ... cap)."""
    return float(min(cap, first * 2 ** min(max(failures - 1, 0), 30)))


class Delivery(Generic[T]):
    def __init__(
        self,
        name: str,
        send: Callable[[T], None],
        limit: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.send = send
        self.limit = limit
        self.clock = clock
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self._queue: collections.deque[T] = collections.deque()
        self._cond = threading.Condition()
        self._retry_at = 0.0
        self._failures = 0  # in the current streak
        self._streak_start = 0.0
        self._streak_dropped = 0
        self._unexpected_seen: set[str] = set()
        self._rejecting = False  # refusals logged once until a delivery succeeds
        self._stopping = False
        self._deadline = 0.0
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- the hub's side

    def put(self, item: T) -> None:
        with self._cond:
            if len(self._queue) >= self.limit:
                self._queue.popleft()
                self.counts["dropped"] += 1
                self._streak_dropped += 1
            self._queue.append(item)
            self._cond.notify()

    def retarget(self, send: Callable[[T], None], limit: int) -> None:
        """New settings (a reload): what is queued goes to the new target, tried at once."""
        with self._cond:
            self.send = send
            self.limit = limit
            while len(self._queue) > limit:
                self._queue.popleft()
                self.counts["dropped"] += 1
            self._retry_at = 0.0
            self._cond.notify()

    def queued(self) -> int:
        return len(self._queue)

    def failing(self) -> bool:
        return self._failures > 0

    # ---------------------------------------------------------------- the policy

    def step(self, now: float) -> float | None:
        """Try the oldest item if it is due; when to come back (``None``: nothing queued)."""
        with self._cond:
            if not self._queue:
                return None
            if now < self._retry_at:
                return self._retry_at
            item = self._queue[0]
        try:
            self.send(item)
        except Rejected as error:  # the receiver answered: no outage, no backoff
            with self._cond:
                self._remove(item)
                self.counts["rejected"] += 1
                if not self._rejecting:
                    self._rejecting = True
                    log.warning(
                        "notify %s: %s (later refusals are only counted as rejected until "
                        "a delivery succeeds)",
                        self.name,
                        error,
                    )
            return now
        except DeliveryError as error:
            with self._cond:
                self.counts["failed"] += 1
                self._failed(error, now)
                self._retry_at = now + backoff(self._failures)
                return self._retry_at
        except Exception as error:  # a bug or an answer nobody foresaw: never kill the thread
            with self._cond:
                self._remove(item)
                self.counts["rejected"] += 1
                self._unexpected(error)
            return now
        with self._cond:
            self._remove(item)
            self.counts["sent"] += 1
            self._rejecting = False
            if self._failures:
                self._recovered(now)
            return now

    def _remove(self, item: T) -> None:
        if self._queue and self._queue[0] is item:  # not dropped meanwhile by a put
            self._queue.popleft()

    def _failed(self, error: Exception, now: float) -> None:
        if not self._failures:
            self._streak_start = now
            self._streak_dropped = 0
            log.warning(
                "notify %s: cannot deliver (%s); retrying with backoff, keeping up to %d "
                "queued (the oldest dropped beyond)",
                self.name,
                error,
                self.limit,
            )
        self._failures += 1

    def _unexpected(self, error: Exception) -> None:
        """An item whose send raised something unforeseen: dropped; logged once per
        exception type (with its traceback), so a repeating one cannot flood the log."""
        kind = type(error).__name__
        if kind in self._unexpected_seen:
            return
        self._unexpected_seen.add(kind)
        log.error(
            "notify %s: dropped an item: unexpected %s: %s (later ones of this kind are "
            "only counted as rejected)",
            self.name,
            kind,
            error,
            exc_info=error,
        )

    def _recovered(self, now: float) -> None:
        log.info(
            "notify %s: delivering again after %.0f s: %d attempts failed, %d queued "
            "meanwhile to deliver now, %d dropped",
            self.name,
            now - self._streak_start,
            self._failures,
            len(self._queue) + 1,
            self._streak_dropped,
        )
        self._failures = 0
        self._retry_at = 0.0

    # ---------------------------------------------------------------- the thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"notify-{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            wake = self.step(self.clock())
            with self._cond:
                now = self.clock()
                if self._stopping and (not self._queue or now >= self._deadline):
                    return
                if wake is not None and wake <= now:
                    continue
                timeout = None if wake is None else wake - now
                if self._stopping:
                    timeout = min(timeout or self._deadline - now, self._deadline - now)
                self._cond.wait(timeout)

    def stop(self, deadline: float) -> None:
        """Deliver what is queued until ``deadline`` (monotonic), then give up on it."""
        with self._cond:
            self._stopping = True
            self._deadline = deadline
            self._cond.notify()

    def join(self, deadline: float) -> int:
        """Wait for the thread until ``deadline``; the items left undelivered (counted
        as dropped, logged once)."""
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - self.clock()))
        with self._cond:
            left = len(self._queue)
            self._queue.clear()
            self.counts["dropped"] += left
        if left:
            log.warning("notify %s: %d not delivered at shutdown", self.name, left)
        return left
