"""The daemon's side of a fleet (issue 14): what its loop does with the link.

Kept out of :mod:`appliance.runtime.daemon` so a host without ``fleet:`` runs none of
it (the daemon holds ``fleet = None`` and calls in only when it is set). Everything
here runs on the loop's thread; the link (:mod:`appliance.fleet.link`) does the I/O.

* :meth:`FleetHooks.granted` / :meth:`FleetHooks.revoked`: a grant or close made here
  (by a knock on this host) is published; grants applied from the fleet never are.
* :meth:`FleetHooks.claim`: a vet with records (SPA digest, TOTP step, one-time line)
  is finished only when the shared claims answer (a deferred vet): ``taken`` refuses,
  ``unreachable`` follows ``on_outage``; an answer that does not come within
  ``claim_timeout`` (plus a second) counts as unreachable.
* :meth:`FleetHooks.item`: the link's items: apply a grant (same deadline: remaining =
  deadline - now, never more than this host's door allows plus :data:`CAP_SLACK`) or a
  revocation, reconcile after the stream was trimmed, note the store's health.
* :meth:`FleetHooks.reloaded`: a vet still waiting for its claims when its door
  changed in a reload is refused (it would act on the old door).

What a fleet message may do here is checked on the loop: the address (no address of
this host's own), the door (this host's, shared), the deadline (capped; past: counted
as expired). (A grant that waited in the backlog and was made before a close made
elsewhere meanwhile is dropped by the link before it is published.) A close made here
is read back from the stream: it closes what was applied from the fleet since it was
made (those grants come before it in the stream), never a grant made here after it.
"""

from __future__ import annotations

import collections
import heapq
import logging
from typing import TYPE_CHECKING, Any, assert_never

from appliance.config.schema import FleetSettings
from appliance.core.events import Grant, Revoke, Vet
from appliance.core.model import Door
from appliance.errors import FirewallError
from appliance.fleet import messages
from appliance.fleet.link import BACKLOG_MAX, IN_FLIGHT, FleetLink
from appliance.fleet.messages import (
    FleetApply,
    FleetClaimed,
    FleetHealth,
    FleetItem,
    FleetMessage,
    FleetReconcile,
    Keys,
)
from appliance.fleet.store import FleetStore
from appliance.runtime.metrics import FleetNumbers

if TYPE_CHECKING:
    from appliance.runtime.daemon import Daemon

log = logging.getLogger("knockgate.fleet")

MIN_REMAINING = 0.5  # seconds: a fleet grant with less left is not applied
CLAIM_GRACE = 1.0  # seconds beyond claim_timeout before a claim counts as unreachable
CAP_SLACK = 2.0  # seconds a fleet grant may last beyond this host's door's longest grant
PEERS_MAX = 64  # peers remembered (the least recently seen go first)
CLOSING_MAX = BACKLOG_MAX + IN_FLIGHT  # closes made here remembered until read back
CLAIM_OUTCOMES = ("claimed", "taken", "unreachable", "local")


def redis_store(settings: FleetSettings) -> FleetStore:
    """The Redis store (redis-py is imported only here, when a fleet is configured)."""
    from appliance.fleet.link import BLOCK
    from appliance.fleet.redis_store import RedisStore

    return RedisStore(settings, BLOCK)


class FleetHooks:
    def __init__(self, daemon: Daemon, settings: FleetSettings, store: FleetStore) -> None:
        self.daemon = daemon
        self.settings = settings  # the connection settings in force (a reload keeps them)
        self.keys = Keys(settings.name)
        self.link = FleetLink(settings.host, store, daemon.enqueue, wall=daemon.wall)
        self.reachable = False
        self.last_error = ""
        self.changed_at = daemon.wall()  # when reachability last changed (unix time)
        # ticket -> (vet, asked at, its door then)
        self.pending: dict[int, tuple[Vet, float, Door | None]] = {}
        # origin host -> last message (unix time), the most recent last
        self.peers: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.applied = 0
        self.revocations_applied = 0
        self.skipped = 0  # fleet messages for doors this host does not share
        self.capped = 0  # grants that asked for longer than this host's door allows
        self.expired = 0  # grants past their deadline on arrival (or a clock ahead)
        self.refused = 0  # grants for an address of this host's own
        self.reconciled_closes = 0  # grants closed because they were not live any more
        self.claims = dict.fromkeys(CLAIM_OUTCOMES, 0)
        # (door, address) -> deadline of a grant in place here (applied or made here),
        # with a heap by deadline to forget the past ones
        self._applied: dict[tuple[str, str], tuple[float, float]] = {}  # (as sent, here)
        self._deadlines: list[tuple[float, tuple[str, str]]] = []
        # id -> (door, address) of a close made here, published and not read back yet,
        # that still closes what is in place when it comes back (a newer grant made
        # here for the door and address removes it: that grant follows it in the stream)
        self._closing: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()

    @property
    def fleet(self) -> FleetSettings:
        """The doors' fleet keys as of the running configuration."""
        return self.daemon.config.settings.fleet or self.settings

    def start(self) -> None:
        self.link.start()
        log.info(
            "fleet %s: this host is %s; shared state at %s",
            self.settings.name,
            self.settings.host,
            self.settings.redis,
        )

    def stop(self) -> None:
        self.link.stop()

    # ----------------------------------------------------------------- publishing

    def granted(self, grant: Grant, seconds: float) -> None:
        """A grant made here by a knock: published with its deadline as unix time."""
        if self.fleet.shares(grant.door):
            now = self.daemon.wall()
            deadline = now + seconds
            self._remember(grant.door, grant.address, deadline, deadline)
            key = (grant.door, grant.address)
            for ident in [i for i, closing in self._closing.items() if closing == key]:
                del self._closing[ident]  # closes before this grant, in the stream too
            self.link.publish(
                messages.grant(
                    grant.door, grant.address, deadline, self.settings.host, grant.ports, now
                )
            )

    def revoked(self, revoke: Revoke) -> None:
        if self.fleet.shares(revoke.door):
            now = self.daemon.wall()
            self._forget(revoke.door, revoke.address)
            message = messages.revoke(revoke.door, revoke.address, self.settings.host, now)
            self._closing[message.id] = (revoke.door, revoke.address)
            while len(self._closing) > CLOSING_MAX:
                self._closing.popitem(last=False)
            self.link.publish(message)

    # ----------------------------------------------------------------- deferred vets

    def claim(self, vet: Vet) -> bool:
        """Claim the vet's records fleet-wide; ``True``: the vet waits for the answer."""
        if not self.fleet.shares(vet.door):
            return False
        claims = self.keys.claims(vet.records, self.daemon.wall())
        if not claims:
            return False
        self.pending[vet.ticket] = (vet, self.daemon.clock(), self.daemon.config.door(vet.door))
        self.link.claim(vet.ticket, claims)
        return True

    def reloaded(self) -> None:
        """A vet waiting for its claims whose door changed (or went) in a reload is
        refused: the answer would grant what the old door said."""
        for ticket, (vet, _, door) in list(self.pending.items()):
            if self.daemon.config.door(vet.door) != door:
                del self.pending[ticket]
                self.daemon.events.refusal(
                    "refused",
                    door=vet.door,
                    address=vet.address,
                    detail="its door changed in a reload while its fleet claim was pending",
                )
                self.daemon.finish_vet(vet, "its door changed in a reload")

    def _claimed(self, answer: FleetClaimed) -> None:
        waiting = self.pending.pop(answer.ticket, None)
        if waiting is None:
            return  # already timed out (and answered)
        self._finish(waiting[0], answer.outcome)

    def _finish(self, vet: Vet, outcome: str) -> None:
        refusal = None
        if outcome == "taken":
            refusal = "already used on another host of the fleet"
        elif outcome == "unreachable":
            if self.settings.on_outage == "local":
                outcome = "local"
                log.warning(
                    "%s: %s: the fleet's shared state is unreachable; accepted on the local "
                    "cache only (on_outage: local)",
                    vet.address,
                    vet.door,
                )
            else:
                refusal = "the fleet's shared state is unreachable (on_outage: refuse)"
        self.claims[outcome] += 1
        if refusal is not None:
            self.daemon.events.refusal(
                "refused", door=vet.door, address=vet.address, detail=refusal
            )
        self.daemon.finish_vet(vet, refusal)

    def tick(self) -> None:
        """Once a second: claims that got no answer in time count as unreachable."""
        if not self.pending:
            return
        late = self.daemon.clock() - self.settings.claim_timeout - CLAIM_GRACE
        for ticket, (vet, asked, _) in list(self.pending.items()):
            if asked <= late:
                del self.pending[ticket]
                self._finish(vet, "unreachable")

    # ----------------------------------------------------------------- the link's items

    def item(self, item: FleetItem) -> None:
        match item:
            case FleetApply(message=message, catchup=catchup):
                self.link.applied()
                self._seen(message.origin)
                if message.kind == "grant":
                    self._apply_grant(message, catchup)
                else:
                    self._apply_revoke(message)
            case FleetReconcile(grants=grants, live=live):
                self._reconcile(grants, frozenset(live))
            case FleetClaimed():
                self._claimed(item)
            case FleetHealth(reachable=reachable, error=error):
                self._health(reachable, error)
            case _:
                assert_never(item)

    def _health(self, reachable: bool, error: str) -> None:
        self.reachable, self.changed_at = reachable, self.daemon.wall()
        if reachable:
            self.last_error = ""
            log.info("fleet %s: shared state reachable", self.settings.name)
            self.daemon.events.event("fleet", detail="shared state reachable")
            return
        self.last_error = error
        log.warning(
            "fleet %s: shared state unreachable (%s): local knocks still open here; SPA, "
            "TOTP and one-time doors %s until it is back",
            self.settings.name,
            error,
            "use the local caches only" if self.settings.on_outage == "local" else "refuse",
        )
        self.daemon.events.event("fleet", detail=f"shared state unreachable: {error}")

    def _seen(self, origin: str) -> None:
        if origin == self.settings.host:
            return
        self.peers[origin] = self.daemon.wall()
        self.peers.move_to_end(origin)
        while len(self.peers) > PEERS_MAX:
            self.peers.popitem(last=False)

    def _apply_grant(self, message: FleetMessage, catchup: bool) -> None:
        daemon = self.daemon
        door = daemon.config.door(message.door)
        if door is None or door.open is None or not self.fleet.shares(door.name):
            self.skipped += 1
            return
        key = (message.door, message.address)
        if message.address in (daemon.addresses or ()):
            self.refused += 1
            return
        remaining = message.deadline - daemon.wall()
        if self._applied.get(key, (0.0,))[0] == message.deadline:
            return  # this very grant is in place already (catch-up and stream)
        if remaining < MIN_REMAINING:
            self.expired += 1
            return
        longest = door.spa.max_time if door.spa is not None else door.open.duration
        if remaining > longest + CAP_SLACK:
            self.capped += 1
            remaining = longest + CAP_SLACK
        ports = tuple(port for port in door.open.ports if port in message.ports)
        if not ports:  # none of what was granted is this host's door's
            self.skipped += 1
            return
        now = daemon.clock()
        detail = f"fleet from {message.origin}"
        if door.service is not None:
            service = daemon.config.service(door.service)
            if door.name not in self.fleet.start_services or daemon.services is None or not service:
                self.skipped += 1  # a fleet grant starts a service only where the door says so
                return
            daemon.services.request(
                Grant(now, door.name, message.address, ports, now + remaining), service.name
            )
        else:
            try:
                daemon.backend.grant(message.address, ports, remaining)
            except FirewallError as error:
                daemon.stats.grant_failures += 1
                log.error("%s: %s: fleet grant failed: %s", message.address, door.name, error)
                return
        self._remember(message.door, message.address, message.deadline, daemon.wall() + remaining)
        self.applied += 1
        daemon.grant_book.add(door.name, message.address, now + remaining)
        daemon.events.event(
            "opened",
            door=door.name,
            address=message.address,
            detail=f"{', '.join(map(str, ports))} for {remaining:.0f} s, {detail}",
        )
        if not catchup:
            log.info(
                "%s: %s: open %s for %.0f s (%s)",
                message.address,
                door.name,
                ", ".join(map(str, ports)),
                remaining,
                detail,
            )

    def _apply_revoke(self, message: FleetMessage) -> None:
        daemon = self.daemon
        if not self.fleet.shares(message.door) or daemon.config.door(message.door) is None:
            self.skipped += 1
            return
        key = (message.door, message.address)
        # A close made here closed what was in place then; read back, it closes only
        # what was applied from the fleet since (before it in the stream), never a
        # grant made here after it (after it in the stream).
        own = message.origin == self.settings.host
        if own and (self._closing.pop(message.id, None) is None or key not in self._applied):
            return
        self._forget(message.door, message.address)
        self.revocations_applied += 1
        revoke = Revoke(
            daemon.clock(), message.door, message.address, f"fleet from {message.origin}"
        )
        daemon.revoke(revoke, origin=message.origin)

    def _reconcile(self, grants: tuple[FleetMessage, ...], live: frozenset[str]) -> None:
        """After the stream moved past this host's position: the live grants are
        applied, and grants in place here that are not live any more are closed."""
        for message in grants:
            self._seen(message.origin)
            self._apply_grant(message, catchup=True)
        now = self.daemon.wall()
        for (door, address), (_, expires) in list(self._applied.items()):
            if expires > now and f"{door}|{address}" not in live:
                self._forget(door, address)
                self.reconciled_closes += 1
                revoke = Revoke(self.daemon.clock(), door, address, "no longer live")
                self.daemon.revoke(revoke, origin="redis (no longer live)")

    def _remember(self, door: str, address: str, deadline: float, expires: float) -> None:
        """A grant (``deadline`` as sent) in place here until ``expires``; the past
        ones are forgotten (a heap by expiry: O(log n) a grant)."""
        now = self.daemon.wall()
        while self._deadlines and self._deadlines[0][0] <= now:
            past, key = heapq.heappop(self._deadlines)
            if self._applied.get(key, (0.0, 0.0))[1] == past:
                del self._applied[key]
        self._applied[(door, address)] = (deadline, expires)
        heapq.heappush(self._deadlines, (expires, (door, address)))

    def _forget(self, door: str, address: str) -> None:
        """Closed: not in place here any more."""
        self._applied.pop((door, address), None)

    # ----------------------------------------------------------------- status, metrics

    def refusals(self) -> dict[str, int]:
        """Fleet entries not applied as they came, by reason (``capped`` ones were applied,
        shortened)."""
        return {
            "malformed": self.link.malformed,
            "capped": self.capped,
            "expired": self.expired,
            "stale": self.link.stale,
            "own_address": self.refused,
        }

    def numbers(self) -> FleetNumbers:
        return FleetNumbers(
            reachable=self.reachable,
            published=self.link.published,
            applied=self.applied,
            revocations_applied=self.revocations_applied,
            backlog=self.link.backlog,
            claims=dict(self.claims),
            refused=self.refusals(),
        )

    def snapshot(self) -> dict[str, Any]:
        now = self.daemon.wall()
        return {
            "name": self.settings.name,
            "host": self.settings.host,
            "redis": self.settings.redis,
            "reachable": self.reachable,
            "since": round(now - self.changed_at, 1),
            "last_error": self.last_error,
            "on_outage": self.settings.on_outage,
            "peers": {host: round(now - seen, 1) for host, seen in sorted(self.peers.items())},
            "published": self.link.published,
            "applied": self.applied,
            "revocations_applied": self.revocations_applied,
            "skipped": self.skipped,
            "refused": self.refusals(),
            "reconciled": self.link.reconciled,
            "reconciled_closes": self.reconciled_closes,
            "backlog": self.link.backlog,
            "claims": dict(self.claims),
            "claims_waiting": len(self.pending),
        }
