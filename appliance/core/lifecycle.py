"""Service lifecycles: events in, commands out (the policy of on-demand containers).

Pure, like the knock engine: no clock, no threads, no Docker. Every event carries
``ts`` (the loop's monotonic clock); the runtime feeds the events (knocks from the
engine, Docker outcomes from its worker threads and events listener, conntrack
counts, a tick a second) and carries out the commands (Docker work on a worker,
grants and revokes on the firewall, notices in the log).

One :class:`Lifecycle` per service, its transitions in :data:`TRANSITIONS`
(state, event type) -> handler; a pair not in the table is a stale report (a
worker's answer to something already overtaken) and changes nothing.
:class:`Lifecycles` holds the catalogue: it routes events by service name and
handles what concerns them all (adoption at start, a changed catalogue).

States::

    cold --knock--> starting --ready--> serving (holders) / ready (none yet)
    ready <--connections--> idle --idle_timeout--> stopping --stopped--> cold | paused
    serving --last grant expired--> ready;  --close knock of the last holder--> stopping
    any running state --max_lifetime--> stopping (every grant revoked first)
    paused --knock--> starting (unpause);  stopping --knock--> stopping, started again after
    stopping --stop failed--> stopping (still gated; asked again on a later tick, backing off)

Label-gated containers (:mod:`appliance.services.labels`) are run by the same machine,
one per unit (a container alone, or a group started in order): their policy is not
``managed`` when ``knockgate.start_on_knock`` is false (knockgate never starts nor stops
them: a knock on a stopped one is refused, and only grants expire), and Docker's own
view of them comes as :class:`Observed` (a container started or stopped by hand).
Knockgate never creates nor removes them; a unit whose labels go away is forgotten
(:meth:`Lifecycles.forget`: its grants revoked, its container left as it is).

Policy (fail closed): a knocker is granted only once the service answers; a grant
whose deadline passed before that is not made; a service with no holder and no
connection for ``idle_timeout`` stops (pauses with ``keep_warm``); ``unknown``
connections keep it up; ``max_lifetime`` counts from the container's start (an
adopted container's original start) and revokes every grant before the stop; a
stop that fails leaves the container gated and is asked again until it works (a
container that may run is never taken for cold). At most one Docker operation per
service is in flight: each ``Start`` ends in ``ContainerReady`` or
``ContainerFailed``, each ``Stop``/``Pause`` in ``ContainerStopped`` or
``ContainerFailed``, and nothing new is asked before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from appliance.core.model import Step

State = Literal["cold", "starting", "ready", "serving", "idle", "stopping", "paused"]
RUNNING: tuple[State, ...] = ("ready", "serving", "idle")
STOP_RETRY = 1.0  # seconds before a failed stop is asked again, doubled up to STOP_RETRY_MAX
STOP_RETRY_MAX = 60.0


@dataclass(frozen=True, slots=True)
class Policy:
    """What the lifecycle needs of a catalogue entry (the runtime builds it from
    ``config.schema.Service``). ``version`` names the container definition: a new
    one means the container is recreated at its next start."""

    name: str
    step: Step  # the host port a grant opens
    idle_timeout: float
    max_lifetime: float
    keep_warm: bool = False
    version: str = ""
    steps: tuple[Step, ...] = ()  # every host port a grant opens (a labelled unit); () -> step
    managed: bool = True  # False: never started nor stopped (start_on_knock=false)

    @property
    def ports(self) -> tuple[Step, ...]:
        return self.steps or (self.step,)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class ServiceEvent:
    """Base of everything fed to :class:`Lifecycles` (also what worker threads and the
    Docker events listener put on the daemon's queue)."""

    ts: float


@dataclass(frozen=True, slots=True)
class KnockCompleted(ServiceEvent):
    """A knock on a service door: ``address`` may have ``ports`` until ``until``."""

    service: str
    address: str
    ports: tuple[Step, ...]
    until: float
    door: str = ""


@dataclass(frozen=True, slots=True)
class CloseKnock(ServiceEvent):
    """A close knock: ``address``'s grant was revoked."""

    service: str
    address: str


@dataclass(frozen=True, slots=True)
class ContainerStarted(ServiceEvent):
    """The container runs (not necessarily answering yet); ``inner`` is its own port.
    ``since``: when this run of the container began (Docker's ``State.StartedAt`` on the
    loop's clock; long ago for a container that already ran, ``None``: unknown);
    ``resumed``: it was paused and is now unpaused (its run goes on from ``since``)."""

    service: str
    container: str
    address: str | None = None
    inner: Step | None = None
    version: str = ""  # the definition it was created from
    since: float | None = None
    resumed: bool = False


@dataclass(frozen=True, slots=True)
class ContainerReady(ServiceEvent):
    service: str


@dataclass(frozen=True, slots=True)
class ContainerFailed(ServiceEvent):
    """A Start, Stop or Pause did not work out; ``reason`` says why."""

    service: str
    reason: str


@dataclass(frozen=True, slots=True)
class ContainerStopped(ServiceEvent):
    """A Stop (``paused`` False) or Pause (True) is done."""

    service: str
    paused: bool = False


@dataclass(frozen=True, slots=True)
class ContainerDied(ServiceEvent):
    """Docker says ``container`` stopped or is gone (``die``/``stop``/``destroy``), whoever
    did it (a repeat for the same end is ignored: the machine is cold by then). ``died``:
    Docker's time of the event on the loop's clock (``None``: unknown); a death older
    than the container's current run is an earlier run's end, reported late."""

    service: str
    container: str
    died: float | None = None


@dataclass(frozen=True, slots=True)
class ConnectionsSeen(ServiceEvent):
    """Open connections to the service's host port (``None``: cannot be read)."""

    service: str
    count: int | None


@dataclass(frozen=True, slots=True)
class Observed(ServiceEvent):
    """Docker's view of a labelled unit now (from discovery): ``running`` when every
    container of it runs. One that runs while cold is taken over (started by hand, or
    running when knockgate started); one that no longer runs while running is cold."""

    service: str
    running: bool
    container: str | None = None
    since: float | None = None  # when it started (on ``ts``'s clock), if Docker said


@dataclass(frozen=True, slots=True)
class Tick(ServiceEvent):
    """Time has moved on to ``ts`` (expiry, idle_timeout and max_lifetime are decided)."""


@dataclass(frozen=True, slots=True)
class Found:
    """A container of ours found at start. ``started``: its original start, on the
    loop's clock (may lie far in the past)."""

    service: str
    container: str
    state: Literal["running", "paused"]
    started: float
    address: str | None = None
    inner: Step | None = None
    version: str = ""


@dataclass(frozen=True, slots=True)
class LiveGrant:
    """A grant the kernel still holds (left by the previous run), ``until`` on our clock."""

    address: str
    step: Step
    until: float


@dataclass(frozen=True, slots=True)
class Adopted(ServiceEvent):
    """What a previous run left: its containers and the kernel's live grants. Sent once,
    when Docker answered (the runtime asks again, backing off, until it does); until
    then the gate on the containers' own addresses is left as the previous run set it."""

    containers: tuple[Found, ...] = ()
    grants: tuple[LiveGrant, ...] = ()


@dataclass(frozen=True, slots=True)
class CatalogueChanged(ServiceEvent):
    """The services catalogue now reads ``policies`` (a reload)."""

    policies: tuple[Policy, ...]


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class Start:
    """Make the service's container run and answer (create, start or unpause)."""

    service: str


@dataclass(frozen=True, slots=True)
class Stop:
    service: str
    why: str


@dataclass(frozen=True, slots=True)
class Pause:
    service: str
    why: str


@dataclass(frozen=True, slots=True)
class GrantAccess:
    """Open ``ports`` for ``address`` until ``until`` (a knock decided at ``at``)."""

    service: str
    address: str
    ports: tuple[Step, ...]
    until: float
    door: str
    at: float


@dataclass(frozen=True, slots=True)
class RevokeAccess:
    service: str
    address: str
    ports: tuple[Step, ...]
    why: str


@dataclass(frozen=True, slots=True)
class Notice:
    """A line for the log. ``refused``: a knocker got no access because of it."""

    service: str
    level: Literal["info", "warning", "error"]
    text: str
    refused: bool = False


Command = Start | Stop | Pause | GrantAccess | RevokeAccess | Notice


# --------------------------------------------------------------------------- one service


@dataclass(slots=True)
class Holder:
    ports: tuple[Step, ...]
    until: float


@dataclass(slots=True)
class Lifecycle:
    """One service's state. Change it only through :meth:`handle`."""

    policy: Policy
    state: State = "cold"
    holders: dict[str, Holder] = field(default_factory=dict)
    live: dict[str, Holder] = field(default_factory=dict)  # adopted while starting
    waiting: dict[str, KnockCompleted] = field(default_factory=dict)
    started: float | None = None  # when the container began to run (max_lifetime)
    since: float | None = None  # Docker's start of the container's current run (deaths)
    idle_since: float | None = None
    container: str | None = None
    address: str | None = None
    inner: Step | None = None
    version: str = ""  # the running container's definition
    pending: Policy | None = None  # a changed definition, in force once it stops
    restart: bool = False  # a knock came while stopping
    warming: bool = False  # keep_warm: started to be paused, not for a knocker
    removed: bool = False  # gone from the catalogue: stopping, then dropped
    why: str = ""  # why it is stopping (asked again after a failed stop)
    retry_at: float | None = None  # a failed stop is asked again from then
    stop_failures: int = 0  # failed stops in a row
    launches: int = 0
    failures: int = 0

    @property
    def name(self) -> str:
        return self.policy.name

    def handle(self, event: ServiceEvent) -> list[Command]:
        handler = TRANSITIONS.get((self.state, type(event)))
        return [] if handler is None else handler(self, event)

    # ------------------------------------------------------------- helpers

    def _begin(self, warming: bool = False) -> list[Command]:
        self.state = "starting"
        self.warming = warming
        self.restart = False
        return [Start(self.name)]

    def _halt(self, why: str) -> list[Command]:
        """Stop, or pause when keep_warm (a removed service is stopped)."""
        self.state = "stopping"
        self.idle_since = None
        self.why = why
        self.retry_at = None
        return [self._stop_command()]

    def _stop_command(self) -> Command:
        if self.policy.keep_warm and not self.removed:
            return Pause(self.name, self.why)
        return Stop(self.name, self.why)

    def _revoke_all(self, why: str) -> list[Command]:
        out: list[Command] = [
            RevokeAccess(self.name, address, holder.ports, why)
            for address, holder in self.holders.items()
        ]
        self.holders.clear()
        return out

    def _refuse_waiting(self, why: str) -> list[Command]:
        out: list[Command] = [
            Notice(self.name, "error", f"{k.address}: {k.door}: {why}", refused=True)
            for k in self.waiting.values()
        ]
        self.waiting.clear()
        return out

    def _gone(self) -> list[Command]:
        """The container no longer runs: back to cold (or paused), the new definition in
        force, and started again when a knock is waiting."""
        self.started = None
        self.idle_since = None
        self.retry_at = None
        self.stop_failures = 0
        if self.pending is not None:
            self.policy, self.pending = self.pending, None
        if self.state != "paused":
            self.state = "cold"
            self.container = self.address = self.inner = None
            self.since = None
        if self.restart and not self.removed and self.waiting:
            return self._begin()
        self.restart = False
        return []

    def change(self, policy: Policy) -> list[Command]:
        """A reload changed this service's entry."""
        if policy == self.policy and self.pending is None:
            return []
        same_container = policy.version == self.version
        if self.state in ("cold", "paused") or same_container:
            self.policy, self.pending = policy, None
            if self.state == "paused" and not policy.keep_warm:
                return [
                    Notice(self.name, "info", f"{self.name}: settings changed"),
                    *self._halt("keep_warm turned off"),
                ]
            if not same_container and self.state == "paused":
                text = f"{self.name}: definition changed; recreated at its next start"
            else:
                text = f"{self.name}: settings changed"
            return [Notice(self.name, "info", text)]
        self.pending = policy
        text = (
            f"{self.name}: definition changed; the running container keeps serving until "
            "it stops, then it is recreated"
        )
        return [Notice(self.name, "info", text)]

    def remove(self) -> list[Command]:
        """Gone from the catalogue: every grant revoked, the container stopped."""
        self.removed = True
        out: list[Command] = [
            Notice(self.name, "info", f"{self.name}: removed from the catalogue; stopping it")
        ]
        why = f"service {self.name} was removed from the catalogue, no access"
        if self.state in RUNNING:
            out += self._revoke_all("removed from the catalogue")
            out += self._halt("removed from the catalogue")
        elif self.state == "paused":
            out += self._halt("removed from the catalogue")
        elif self.state == "stopping":
            self.restart = False
            out += self._refuse_waiting(why)
        return out  # starting: stopped when the start ends

    def adopt(self, found: Found, grants: tuple[LiveGrant, ...], now: float) -> list[Command]:
        """A container of ours from before this start. A knock that came before may
        have started it already (the launcher found it running): its live grants
        still count as holders."""
        if self.state in ("starting", *RUNNING) and self.container in (None, found.container):
            if self.state == "starting":  # holders once it answers
                self._hold(grants, now, self.live)
            elif self._hold(grants, now, self.holders):
                self.state = "serving"
                self.idle_since = None
            return []
        if self.state != "cold":
            return []
        self.container, self.address, self.inner = found.container, found.address, found.inner
        self.version = found.version
        self.since = found.started
        if found.state == "paused":
            self.state = "paused"
            return []
        self.started = found.started
        self._hold(grants, now, self.holders)
        self.state = "serving" if self.holders else "ready"
        return []

    def _hold(self, grants: tuple[LiveGrant, ...], now: float, into: dict[str, Holder]) -> bool:
        """The kernel's live grants on this service's port count as holders; True when
        there was one."""
        found = False
        for grant in grants:
            if grant.step in self.policy.ports and grant.until > now:
                held = into.get(grant.address)
                until = grant.until if held is None else max(held.until, grant.until)
                into[grant.address] = Holder((grant.step,), until)
                found = True
        return found

    # ------------------------------------------------------------- handlers

    def _on_knock_cold(self, event: KnockCompleted) -> list[Command]:
        if not self.policy.managed:
            text = (
                f"{event.address}: {event.door}: {self.name} is not running "
                "(knockgate.start_on_knock is false), no access"
            )
            return [Notice(self.name, "warning", text, refused=True)]
        self.waiting[event.address] = event
        return self._begin()

    def _on_knock_starting(self, event: KnockCompleted) -> list[Command]:
        self.waiting[event.address] = event
        return []

    def _on_knock_stopping(self, event: KnockCompleted) -> list[Command]:
        self.waiting[event.address] = event
        if self.removed:
            why = f"service {self.name} was removed from the catalogue, no access"
            return self._refuse_waiting(why)
        if self.restart:
            return []
        self.restart = True
        text = f"{self.name}: a knock came while it was stopping: started again once stopped"
        return [Notice(self.name, "info", text)]

    def _on_knock_running(self, event: KnockCompleted) -> list[Command]:
        return self._admit(event, event.ts)

    def _admit(self, knock: KnockCompleted, now: float) -> list[Command]:
        if knock.until <= now:
            text = (
                f"{knock.address}: {knock.door}: service {self.name} was ready too late "
                "for the grant"
            )
            return [Notice(self.name, "warning", text, refused=True)]
        held = self.holders.get(knock.address)
        until = knock.until if held is None else max(held.until, knock.until)
        ports = knock.ports if held is None else tuple(dict.fromkeys(held.ports + knock.ports))
        self.holders[knock.address] = Holder(ports, until)
        self.state = "serving"
        self.idle_since = None
        return [
            GrantAccess(self.name, knock.address, knock.ports, knock.until, knock.door, knock.ts)
        ]

    def _on_started(self, event: ContainerStarted) -> list[Command]:
        self.container, self.address, self.inner = event.container, event.address, event.inner
        self.since = event.since
        # max_lifetime counts from the container's real start (one that already ran
        # keeps its age), from now for one unpaused or whose start is unknown.
        resumed = event.resumed or event.since is None
        self.started = event.ts if resumed else event.since
        self.version = event.version
        return []

    def _on_ready(self, event: ContainerReady) -> list[Command]:
        self.launches += 1
        if self.started is None:
            self.started = event.ts
        out: list[Command] = []
        for address, holder in self.live.items():  # grants adopted while it started
            if holder.until > event.ts:
                self.holders[address] = holder
        self.live.clear()
        if self.removed:
            out += self._refuse_waiting(
                f"service {self.name} was removed from the catalogue, no access"
            )
            out += self._revoke_all("removed from the catalogue")
            return out + self._halt("removed from the catalogue")
        self.state = "serving" if self.holders else "ready"
        for knock in self.waiting.values():
            out += self._admit(knock, event.ts)
        self.waiting.clear()
        if self.state == "ready" and self.warming and self.policy.keep_warm:
            out += self._halt("kept warm")
        self.warming = False
        return out

    def _on_start_failed(self, event: ContainerFailed) -> list[Command]:
        self.failures += 1
        why = f"service {self.name} unavailable, no access: {event.reason}"
        out = self._refuse_waiting(why)
        if not out:
            out = [Notice(self.name, "error", f"{self.name}: cannot start: {event.reason}")]
        self.restart = False
        out += [  # live grants adopted while it started
            RevokeAccess(self.name, address, holder.ports, "the container did not start")
            for address, holder in self.live.items()
        ]
        self.live.clear()
        self.state = "cold"
        return out + self._gone()

    def _on_stop_failed(self, event: ContainerFailed) -> list[Command]:
        """The container may still run: it stays stopping (gated), asked again later."""
        self.stop_failures += 1
        delay = min(STOP_RETRY_MAX, STOP_RETRY * 2 ** (self.stop_failures - 1))
        self.retry_at = event.ts + delay
        if self.stop_failures > 1:
            return []  # logged once per streak
        text = f"{self.name}: stopping failed: {event.reason}; asked again until it stops"
        return [Notice(self.name, "error", text)]

    def _on_tick_stopping(self, event: Tick) -> list[Command]:
        if self.retry_at is None or event.ts < self.retry_at:
            return []
        self.retry_at = None
        return [self._stop_command()]

    def _on_stopped(self, event: ContainerStopped) -> list[Command]:
        out: list[Command] = []
        if self.stop_failures:
            done = "paused" if event.paused else "stopped"
            text = f"{self.name}: {done} after {self.stop_failures} failed attempts"
            out.append(Notice(self.name, "info", text))
        self.state = "paused" if event.paused and not self.removed else "cold"
        return out + self._gone()

    def _on_died(self, event: ContainerDied) -> list[Command]:
        if event.container != self.container:
            return []  # an older container's end
        if event.died is not None and self.since is not None and event.died < self.since:
            return []  # the end of an earlier run of the same container, reported late
        out = self._revoke_all("the container stopped")
        out.append(
            Notice(self.name, "warning", f"{self.name}: its container stopped outside knockgate")
        )
        self.state = "cold"
        return out + self._gone()

    def _on_observed(self, event: Observed) -> list[Command]:
        if event.running and self.state == "cold":
            self.state = "ready"
            self.container = event.container
            # Its real start, so max_lifetime is not renewed by a restart of knockgate.
            self.started = event.ts if event.since is None else min(event.since, event.ts)
            return [Notice(self.name, "info", f"{self.name}: running, gated")]
        if not event.running and self.state in (*RUNNING, "paused"):
            out = self._revoke_all("the container stopped")
            text = f"{self.name}: stopped outside knockgate"
            out.append(Notice(self.name, "info" if not self.policy.managed else "warning", text))
            self.state = "cold"
            return out + self._gone()
        return []

    def _on_close(self, event: CloseKnock) -> list[Command]:
        if self.holders.pop(event.address, None) is None or self.holders:
            return []
        if not self.policy.managed:
            self.state = "ready"
            return []
        return self._halt(f"close knock from {event.address}")

    def _on_close_waiting(self, event: CloseKnock) -> list[Command]:
        self.waiting.pop(event.address, None)
        if not self.waiting:
            self.restart = False
        return []

    def _on_connections(self, event: ConnectionsSeen) -> list[Command]:
        if event.count == 0:
            if self.state == "ready":
                self.state = "idle"
                self.idle_since = event.ts
        elif self.state == "idle":
            self.state = "ready"
            self.idle_since = None
        return []

    def _on_tick(self, event: Tick) -> list[Command]:
        now = event.ts
        for address in [a for a, h in self.holders.items() if h.until <= now]:
            del self.holders[address]
        if self.state == "serving" and not self.holders:
            self.state = "ready"
        if not self.policy.managed:
            return []  # the user's container: only its grants expire
        if self.started is not None and now - self.started >= self.policy.max_lifetime:
            return self._revoke_all("max_lifetime reached") + self._halt("max_lifetime reached")
        since = self.idle_since
        if self.state == "idle" and since is not None and now - since >= self.policy.idle_timeout:
            return self._halt(f"idle for {self.policy.idle_timeout:g} s")
        return []


Handler = Callable[[Lifecycle, ServiceEvent], list[Command]]


def _table() -> dict[tuple[State, type[ServiceEvent]], Handler]:
    L = Lifecycle
    rows: list[tuple[tuple[State, ...], type[ServiceEvent], Callable[..., list[Command]]]] = [
        (("cold", "paused"), KnockCompleted, L._on_knock_cold),
        (("starting",), KnockCompleted, L._on_knock_starting),
        (RUNNING, KnockCompleted, L._on_knock_running),
        (("stopping",), KnockCompleted, L._on_knock_stopping),
        (("starting",), ContainerStarted, L._on_started),
        (("starting",), ContainerReady, L._on_ready),
        (("starting",), ContainerFailed, L._on_start_failed),
        (("stopping",), ContainerFailed, L._on_stop_failed),
        (("stopping",), ContainerStopped, L._on_stopped),
        (("stopping",), Tick, L._on_tick_stopping),
        ((*RUNNING, "paused"), ContainerDied, L._on_died),
        (RUNNING, CloseKnock, L._on_close),
        (("starting", "stopping"), CloseKnock, L._on_close_waiting),
        (("ready", "idle"), ConnectionsSeen, L._on_connections),
        (RUNNING, Tick, L._on_tick),
        (("cold", "paused", *RUNNING), Observed, L._on_observed),
    ]
    return {(state, event): handler for states, event, handler in rows for state in states}


TRANSITIONS: dict[tuple[State, type[ServiceEvent]], Handler] = _table()
"""(state, event type) -> handler; every other pair is a stale report and ignored."""


# --------------------------------------------------------------------------- the catalogue


class Lifecycles:
    """Every service's lifecycle, by name."""

    def __init__(self, policies: tuple[Policy, ...] = ()) -> None:
        self.machines: dict[str, Lifecycle] = {p.name: Lifecycle(p) for p in policies}
        self.adopted = False
        self.retired_launches = 0  # counters of services dropped from the catalogue
        self.retired_failures = 0

    @property
    def launches(self) -> int:
        return self.retired_launches + sum(m.launches for m in self.machines.values())

    @property
    def failures(self) -> int:
        return self.retired_failures + sum(m.failures for m in self.machines.values())

    def handle(self, event: ServiceEvent) -> list[Command]:
        if isinstance(event, Tick):
            out: list[Command] = []
            for machine in self.machines.values():
                out += machine.handle(event)
            return out
        if isinstance(event, Adopted):
            return self._adopted(event)
        if isinstance(event, CatalogueChanged):
            return self._changed(event)
        name: str = getattr(event, "service", "")
        target = self.machines.get(name)
        if target is None or (target.removed and isinstance(event, KnockCompleted)):
            if isinstance(event, KnockCompleted):
                text = f"{event.address}: {event.door}: no service {name}, no access"
                return [Notice(name, "error", text, refused=True)]
            return []
        out = target.handle(event)
        self._drop(target)
        return out

    def _drop(self, machine: Lifecycle) -> None:
        if machine.removed and machine.state == "cold":
            self.retired_launches += machine.launches
            self.retired_failures += machine.failures
            del self.machines[machine.name]

    def _adopted(self, event: Adopted) -> list[Command]:
        if self.adopted:
            return []
        self.adopted = True
        out: list[Command] = []
        for found in event.containers:
            machine = self.machines.get(found.service)
            if machine is not None:
                out += machine.adopt(found, event.grants, event.ts)
        for machine in self.machines.values():
            out += self._warm(machine)
        return out

    def _warm(self, machine: Lifecycle) -> list[Command]:
        if machine.policy.keep_warm and machine.state == "cold" and self.adopted:
            return machine._begin(warming=True)
        return []

    def _changed(self, event: CatalogueChanged) -> list[Command]:
        out: list[Command] = []
        wanted = {policy.name: policy for policy in event.policies}
        for name, machine in list(self.machines.items()):
            if name not in wanted and not machine.removed:
                out += machine.remove()
                self._drop(machine)
        for name, policy in wanted.items():
            known = self.machines.get(name)
            if known is None:
                known = self.machines[name] = Lifecycle(policy)
                out.append(Notice(name, "info", f"{name}: added to the catalogue"))
            else:
                known.removed = False  # back before its old container stopped: kept
                out += known.change(policy)
            out += self._warm(known)
        return out

    def forget(self, name: str, why: str) -> list[Command]:
        """A labelled unit gone (its container removed, its labels changed): every grant
        revoked, every waiting knocker refused, the machine dropped. Its containers are
        left as they are (they are the user's)."""
        machine = self.machines.pop(name, None)
        if machine is None:
            return []
        self.retired_launches += machine.launches
        self.retired_failures += machine.failures
        out = machine._refuse_waiting(f"{name}: {why}, no access")
        return out + machine._revoke_all(why)

    def put(self, policy: Policy) -> list[Command]:
        """A labelled unit found, or its labels changed (grants on ports it no longer
        gates are revoked)."""
        known = self.machines.get(policy.name)
        if known is None:
            self.machines[policy.name] = Lifecycle(policy)
            return []
        if known.policy == policy:
            return []
        out: list[Command] = []
        if known.policy.ports != policy.ports:
            out += known._revoke_all("its gated ports changed")
            if known.state == "serving":
                known.state = "ready"
        known.policy = policy
        return out

    def counting(self) -> dict[str, tuple[Step, ...]]:
        """The services whose connections decide whether they are idle: name -> host ports."""
        return {
            name: m.policy.ports
            for name, m in self.machines.items()
            if m.state in ("ready", "idle") and m.policy.managed
        }

    def direct(self) -> tuple[tuple[str, Step], ...]:
        """The containers' own (address, port), gated like their host port."""
        return tuple(
            sorted(
                (m.address, m.inner)
                for m in self.machines.values()
                if m.state != "cold" and m.address is not None and m.inner is not None
            )
        )
