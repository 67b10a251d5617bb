"""The notifications hub the daemon starts: one thread between the event log and the
notifiers' deliveries (see the package docstring for the flow).

The hub follows the event log with a large buffer and does little per record (a kind
check, an aggregator or digest update, a ``put`` on a bounded queue), so it keeps up with
anything the log publishes; should it ever fall behind and be cut off, it follows again
at once (with a warning). ``digest_now`` (SIGUSR1) asks every mail notifier for a
digest at the hub's next pass (within a second). ``stop`` flushes what is held and
queued for at most :data:`FLUSH_SECONDS`, then gives up: a shutdown never hangs on a
receiver.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance.config.schema import Chat, Mail, Notifier, Webhook
from appliance.notify.delivery import Delivery
from appliance.notify.digest import Digest, next_digest
from appliance.notify.flood import Aggregator
from appliance.notify.senders import (
    Message,
    Outgoing,
    chat_sender,
    mail_sender,
    webhook_sender,
)
from appliance.runtime.events_log import EventLog, EventRecord, Follower

log = logging.getLogger("knockgate.notify")

FLUSH_SECONDS = 2.0  # at shutdown, for what is queued
FOLLOW_BUFFER = 20_000  # records the hub may be behind the log
PASS_SECONDS = 1.0  # how often summaries and schedules are looked at


@dataclass
class _Route:
    notifier: Notifier
    kinds: frozenset[str]
    aggregator: Aggregator | None  # webhook, chat
    delivery: Delivery[Outgoing] | None
    digest: Digest | None = None  # mail
    mailer: Delivery[Message] | None = None
    due: float = 0.0  # unix time of the next digest


class Notifications:
    def __init__(
        self,
        notifiers: tuple[Notifier, ...],
        events: EventLog,
        *,
        host: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.notifiers = notifiers
        self.events = events
        self.host = host or socket.gethostname()
        self.clock = clock
        self.wall = wall
        self.routes = [self._route(notifier) for notifier in notifiers]
        self.follower: Follower | None = None
        self._digest_asked = False  # set from a signal handler: a plain flag, no lock
        self._lock = threading.Lock()  # routes: the hub's thread vs a reload
        self._errors_seen: set[str] = set()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def _route(self, notifier: Notifier) -> _Route:
        kinds = frozenset(notifier.events)
        target = notifier.target
        if isinstance(target, Mail):
            mailer = Delivery(notifier.name, mail_sender(target), notifier.queue, clock=self.clock)
            now = self.wall()
            return _Route(
                notifier,
                kinds,
                None,
                None,
                Digest(now),
                mailer,
                next_digest(now, target.every, target.at),
            )
        delivery = Delivery(notifier.name, self._sender(notifier), notifier.queue, clock=self.clock)
        return _Route(
            notifier,
            kinds,
            Aggregator(shown=notifier.per_minute, threshold=notifier.flood_threshold),
            delivery,
        )

    def _sender(self, notifier: Notifier) -> Callable[[Outgoing], None]:
        target = notifier.target
        if isinstance(target, Webhook):
            return webhook_sender(target, self.host, self.wall)
        if isinstance(target, Chat):
            return chat_sender(target, self.host)
        raise TypeError(f"not a webhook or chat: {target!r}")  # pragma: no cover

    # ---------------------------------------------------------------- life cycle

    def start(self) -> None:
        _, self.follower = self.events.subscribe(history=0, buffer=FOLLOW_BUFFER)
        for route in self.routes:
            for delivery in (route.delivery, route.mailer):
                if delivery is not None:
                    delivery.start()
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self._thread.start()
        log.info(
            "notify: %s",
            ", ".join(f"{r.notifier.name} ({r.notifier.kind})" for r in self.routes),
        )

    def stop(self, seconds: float = FLUSH_SECONDS) -> None:
        deadline = self.clock() + seconds
        self._stopping.set()
        if self.follower is not None:  # wakes the thread at once
            self.follower.offer(EventRecord(0.0, "stop"))
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - self.clock()))
        if self.follower is not None:
            self.events.unsubscribe(self.follower)
            if self._thread is None or not self._thread.is_alive():
                # What the log published up to now (the shutdown's own records too).
                while (record := self.follower.next(0.0)) is not None:
                    if record.kind != "stop":
                        self.route(record, self.clock())
        self._retire(self.routes, deadline)

    def reconfigure(self, notifiers: tuple[Notifier, ...]) -> None:
        """A reload, in place (one hub, one subscription: no record lost or sent twice).
        A notifier kept by name and kind keeps its queue, its held flood window and its
        digest so far; changed settings (a URL, a rotated secret, a schedule) apply to
        what is queued too. A new one starts; one no longer configured flushes what it
        holds for at most :data:`FLUSH_SECONDS` on a thread of its own."""
        started: list[_Route] = []
        with self._lock:
            old = {route.notifier.name: route for route in self.routes}
            routes: list[_Route] = []
            changed: list[str] = []
            for notifier in notifiers:
                route = old.get(notifier.name)
                if route is not None and route.notifier.kind == notifier.kind:
                    del old[notifier.name]
                    if route.notifier != notifier:
                        self._retarget(route, notifier)
                        changed.append(notifier.name)
                    routes.append(route)
                else:
                    route = self._route(notifier)
                    started.append(route)
                    routes.append(route)
            self.routes = routes
            self.notifiers = notifiers
        if self._thread is not None:
            for route in started:
                for delivery in (route.delivery, route.mailer):
                    if delivery is not None:
                        delivery.start()
        gone = list(old.values())
        if gone:
            deadline = self.clock() + FLUSH_SECONDS
            threading.Thread(
                target=self._retire, args=(gone, deadline), name="notify-retire", daemon=True
            ).start()
        log.info(
            "notify: %s (reload: %d kept, %d changed, %d new, %d removed)",
            ", ".join(f"{r.notifier.name} ({r.notifier.kind})" for r in self.routes),
            len(notifiers) - len(started) - len(changed),
            len(changed),
            len(started),
            len(gone),
        )

    def _retarget(self, route: _Route, notifier: Notifier) -> None:
        target = notifier.target
        if isinstance(target, Mail):
            assert route.mailer is not None
            route.mailer.retarget(mail_sender(target), notifier.queue)
            before = route.notifier.target
            assert isinstance(before, Mail)
            if (before.every, before.at) != (target.every, target.at):
                route.due = next_digest(self.wall(), target.every, target.at)
        else:
            assert route.delivery is not None and route.aggregator is not None
            route.delivery.retarget(self._sender(notifier), notifier.queue)
            route.aggregator.threshold = notifier.flood_threshold
            route.aggregator.shown = notifier.per_minute
        route.notifier = notifier
        route.kinds = frozenset(notifier.events)

    def _retire(self, routes: list[_Route], deadline: float) -> None:
        """What the routes hold (a flood window) queued, what is queued delivered until
        ``deadline``, their threads ended (at shutdown, or for notifiers a reload removed)."""
        now, wall = self.clock(), self.wall()
        for route in routes:
            if route.aggregator is not None and route.delivery is not None:
                for summary in route.aggregator.flush(now, wall):
                    route.delivery.put(Outgoing(summary))
        deliveries = [d for r in routes for d in (r.delivery, r.mailer) if d is not None]
        for delivery in deliveries:
            delivery.stop(deadline)
        for delivery in deliveries:
            delivery.join(deadline)

    def digest_now(self) -> None:
        """From a signal handler: every mail notifier sends its digest at the next pass."""
        self._digest_asked = True

    # ---------------------------------------------------------------- the thread

    def _run(self) -> None:
        next_pass = self.clock() + PASS_SECONDS
        while not self._stopping.is_set():
            follower = self.follower
            assert follower is not None
            record = follower.next(max(0.0, min(PASS_SECONDS, next_pass - self.clock())))
            if record is not None and record.kind != "stop":
                self._guarded("route", self.route, record, self.clock())
            if self._stopping.is_set():
                return  # stop() routes what is left
            if record is None and follower.dropped:
                log.warning("notify: fell behind the event log; records were lost")
                _, self.follower = self.events.subscribe(history=0, buffer=FOLLOW_BUFFER)
            now = self.clock()
            if now >= next_pass or self._digest_asked:
                next_pass = now + PASS_SECONDS
                self._guarded("tick", self.tick, now, self.wall())

    def _guarded(self, what: str, step: Callable[..., None], *args: object) -> None:
        """A bug in routing or a schedule loses that record or pass, never the thread
        (logged once per exception type)."""
        try:
            with self._lock:
                step(*args)
        except Exception as error:
            kind = type(error).__name__
            if kind not in self._errors_seen:
                self._errors_seen.add(kind)
                log.error(
                    "notify: %s failed: unexpected %s: %s (the hub goes on; later ones "
                    "of this kind are not logged)",
                    what,
                    kind,
                    error,
                    exc_info=error,
                )

    def route(self, record: EventRecord, now: float) -> None:
        for route in self.routes:
            if record.kind not in route.kinds:
                continue
            if route.digest is not None:
                route.digest.add(record)
            elif route.aggregator is not None and route.delivery is not None:
                for out in route.aggregator.offer(record, now):
                    route.delivery.put(Outgoing(out))

    def tick(self, now: float, wall: float) -> None:
        """Summaries whose window ended; digests due (or asked for)."""
        asked, self._digest_asked = self._digest_asked, False
        if asked and not any(route.mailer is not None for route in self.routes):
            log.info("SIGUSR1: no mail notifier configured: no digest to send")
        for route in self.routes:
            if route.aggregator is not None and route.delivery is not None:
                for summary in route.aggregator.due(now, wall):
                    route.delivery.put(Outgoing(summary))
            due = asked or wall >= route.due
            if route.digest is not None and route.mailer is not None and due:
                self._send_digest(route, wall)

    def _send_digest(self, route: _Route, wall: float) -> None:
        assert route.digest is not None and route.mailer is not None
        target = route.notifier.target
        assert isinstance(target, Mail)
        digest, route.digest = route.digest, Digest(wall)
        route.due = next_digest(wall, target.every, target.at)
        if digest.quiet() and target.quiet == "skip":
            return
        tail, body = digest.render(self.host, wall)
        route.mailer.put(Message(f"{target.subject} {self.host}: {tail}", body))

    # ---------------------------------------------------------------- metrics

    def snapshot(self) -> list[dict[str, Any]]:
        """``knockgate status``'s rows: each notifier's deliveries by outcome, what waits,
        and whether its receiver is failing now."""
        rows: list[dict[str, Any]] = []
        for route in self.routes:
            delivery = route.delivery or route.mailer
            row: dict[str, Any] = {"name": route.notifier.name, "kind": route.notifier.kind}
            if delivery is not None:
                row.update(delivery.counts)
                row["queued"] = delivery.queued()
                row["failing"] = delivery.failing()
            rows.append(row)
        return rows

    def counts(self) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
        """(deliveries by (notifier, outcome), items queued by notifier)."""
        totals: dict[tuple[str, str], int] = {}
        queued: dict[str, int] = {}
        for route in self.routes:
            delivery = route.delivery or route.mailer
            if delivery is None:
                continue
            name = route.notifier.name
            for outcome, n in delivery.counts.items():
                totals[(name, outcome)] = n
            queued[name] = delivery.queued()
        return totals, queued
