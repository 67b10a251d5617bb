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
  deadline - now) or a revocation, note the store's health.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, assert_never

from appliance.config.schema import FleetSettings
from appliance.core.events import Grant, Revoke, Vet
from appliance.errors import FirewallError
from appliance.fleet import messages
from appliance.fleet.link import FleetLink
from appliance.fleet.messages import (
    FleetApply,
    FleetClaimed,
    FleetHealth,
    FleetItem,
    FleetMessage,
    Keys,
)
from appliance.fleet.store import FleetStore
from appliance.runtime.metrics import FleetNumbers

if TYPE_CHECKING:
    from appliance.runtime.daemon import Daemon

log = logging.getLogger("knockgate.fleet")

MIN_REMAINING = 0.5  # seconds: a fleet grant with less left is not applied
CLAIM_GRACE = 1.0  # seconds beyond claim_timeout before a claim counts as unreachable
APPLIED_PRUNE = 4096  # applied deadlines remembered before the past ones are dropped
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
        self.pending: dict[int, tuple[Vet, float]] = {}  # ticket -> (vet, asked at)
        self.peers: dict[str, float] = {}  # origin host -> last message (unix time)
        self.applied = 0
        self.revocations_applied = 0
        self.skipped = 0  # fleet messages for doors this host does not share
        self.claims = dict.fromkeys(CLAIM_OUTCOMES, 0)
        self._applied: dict[tuple[str, str], float] = {}  # (door, address) -> deadline

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
            deadline = self.daemon.wall() + seconds
            self.link.publish(
                messages.grant(grant.door, grant.address, deadline, self.settings.host, grant.ports)
            )

    def revoked(self, revoke: Revoke) -> None:
        if self.fleet.shares(revoke.door):
            self.link.publish(messages.revoke(revoke.door, revoke.address, self.settings.host))

    # ----------------------------------------------------------------- deferred vets

    def claim(self, vet: Vet) -> bool:
        """Claim the vet's records fleet-wide; ``True``: the vet waits for the answer."""
        if not self.fleet.shares(vet.door):
            return False
        claims = self.keys.claims(vet.records, self.daemon.wall())
        if not claims:
            return False
        self.pending[vet.ticket] = (vet, self.daemon.clock())
        self.link.claim(vet.ticket, claims)
        return True

    def _claimed(self, answer: FleetClaimed) -> None:
        waiting = self.pending.pop(answer.ticket, None)
        if waiting is None:
            return  # already timed out (and answered)
        self._finish(waiting[0], answer.outcome, answer.error)

    def _finish(self, vet: Vet, outcome: str, error: str = "") -> None:
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
        for ticket, (vet, asked) in list(self.pending.items()):
            if asked <= late:
                del self.pending[ticket]
                self._finish(vet, "unreachable", "no answer in time")

    # ----------------------------------------------------------------- the link's items

    def item(self, item: FleetItem) -> None:
        match item:
            case FleetApply(message=message, catchup=catchup):
                self.peers[message.origin] = self.daemon.wall()
                if message.kind == "grant":
                    self._apply_grant(message, catchup)
                else:
                    self._apply_revoke(message)
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

    def _apply_grant(self, message: FleetMessage, catchup: bool) -> None:
        daemon = self.daemon
        door = daemon.config.door(message.door)
        if door is None or door.open is None or not self.fleet.shares(door.name):
            self.skipped += 1
            return
        remaining = message.deadline - daemon.wall()
        key = (message.door, message.address)
        if remaining < MIN_REMAINING or self._applied.get(key) == message.deadline:
            return  # past, or this very grant is in place already (catch-up and stream)
        if len(self._applied) >= APPLIED_PRUNE:
            self._forget_past()
        self._applied[key] = message.deadline
        now = daemon.clock()
        ports = tuple(port for port in door.open.ports if port in message.ports)
        if not ports:  # none of what was granted is this host's door's
            self.skipped += 1
            return
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
        self._applied.pop((message.door, message.address), None)
        self.revocations_applied += 1
        revoke = Revoke(
            daemon.clock(), message.door, message.address, f"fleet from {message.origin}"
        )
        daemon.revoke(revoke, origin=message.origin)

    def _forget_past(self) -> None:
        """Forget applied deadlines that are past (bounded by the grants in force)."""
        now = self.daemon.wall()
        self._applied = {k: d for k, d in self._applied.items() if d > now}

    # ----------------------------------------------------------------- status, metrics

    def numbers(self) -> FleetNumbers:
        return FleetNumbers(
            reachable=self.reachable,
            published=self.link.published,
            applied=self.applied,
            revocations_applied=self.revocations_applied,
            backlog=self.link.backlog,
            claims=dict(self.claims),
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
            "backlog": self.link.backlog,
            "claims": dict(self.claims),
            "claims_waiting": len(self.pending),
        }
