"""The loop's side of service doors: feeds the lifecycle machine, carries out its commands.

The policy (who is granted when, when a service stops) is decided in
:mod:`appliance.core.lifecycle`; this module only interprets::

    engine Grant / close knock / tick / reload --> ServiceManager (loop thread)
        --> Lifecycles.handle(event) --> commands:
            GrantAccess / RevokeAccess --> firewall backend (in the loop)
            Start / Stop / Pause       --> ServiceLauncher on a worker thread
            Notice                     --> the log
    worker threads, Docker events listener --> ServiceEvent --> enqueue --> handle()

Worker threads get immutable arguments (a ``Service``, a name) and report only
through ``enqueue``: they share no mutable state with the loop. Conntrack is read
once per tick on a thread of its own, one netlink dump for every service whose
idleness is in question, and the counts come back as ``ConnectionsSeen`` events.

Label-gated containers (any container with ``knockgate.door``/``knockgate.group``)
are followed by :class:`~appliance.services.discovery.Discovery` on a thread of its
own; its events come through the loop (:meth:`ServiceManager.discovered`), which parses
every labelled container against the doors it holds now
(:func:`appliance.services.labels.plan`): one lifecycle machine per unit (a container,
or a group), the ports the firewall closes, and one log line per label problem (once).

At start the previous run's containers are looked for (asked again, backing off,
while Docker fails); until they are, the gate on the containers' own addresses is
left as the previous run set it. Shutdown waits a few seconds at most for Docker
work under way (a launch cut short leaves a container the next start adopts).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any, assert_never

from appliance.config.schema import Service
from appliance.core import lifecycle as lc
from appliance.core.events import Grant
from appliance.core.model import Step
from appliance.errors import ContainerError, FirewallError
from appliance.firewall import FirewallBackend
from appliance.runtime.logs import log_command
from appliance.services.conntrack import ConnectionCounter
from appliance.services.discovery import Changed, Discovery, DiscoveryEvent, LabelSource, Listed
from appliance.services.labels import (
    ContainerFacts,
    GatedContainer,
    LabelPlan,
    Published,
    Unit,
    host_steps,
    plan,
)
from appliance.services.launcher import ServiceLauncher, config_hash
from appliance.services.readiness import wait_ready
from appliance.services.runtime import LABEL_CONFIG, Container, Deaths

log = logging.getLogger("knockgate.services")

EVENTS_RETRY = 5.0  # seconds between attempts to follow Docker's events again
ADOPT_RETRY = 1.0  # seconds before looking for our containers again, doubled up to:
ADOPT_RETRY_MAX = 30.0
SHUTDOWN_WAIT = 3.0  # seconds shutdown waits for Docker work under way
LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

Counter = Callable[[Collection[Step]], dict[Step, int] | None]


def unit_policy(unit: Unit) -> lc.Policy:
    """What the lifecycle machine needs of a labelled unit."""
    ports = unit.ports()
    return lc.Policy(
        name=unit.name,
        step=ports[0] if ports else Step(0, "tcp"),
        idle_timeout=unit.idle_timeout,
        max_lifetime=unit.max_lifetime,
        steps=ports,
        managed=unit.managed,
    )


def policy(service: Service) -> lc.Policy:
    """What the lifecycle machine needs of a catalogue entry."""
    return lc.Policy(
        name=service.name,
        step=service.step,
        idle_timeout=service.idle_timeout,
        max_lifetime=service.max_lifetime,
        keep_warm=service.keep_warm,
        version=config_hash(service),
    )


class Workers:
    """Docker work, each job on a daemon thread of its own (the lifecycle asks for at
    most one operation per service at a time, so they are few). Unlike a
    ThreadPoolExecutor's, whose threads the interpreter joins at exit, a job still
    blocked in Docker (an image build, a readiness wait) never holds the process up."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._running: set[threading.Thread] = set()
        self._closed = False

    def submit(self, job: Callable[..., None], *args: Any) -> None:
        with self._lock:
            if self._closed:
                log.debug("%s: not started, shutting down", getattr(job, "__name__", job))
                return
            thread = threading.Thread(
                target=self._run, args=(job, args), name=self.prefix, daemon=True
            )
            self._running.add(thread)
        thread.start()

    def _run(self, job: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            job(*args)
        finally:
            with self._lock:
                self._running.discard(threading.current_thread())

    def close(self, timeout: float) -> int:
        """No new job; wait up to ``timeout`` s for those under way. Returns how many
        are still running (left behind: daemon threads)."""
        with self._lock:
            self._closed = True
            threads = list(self._running)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return sum(thread.is_alive() for thread in threads)


class ServiceManager:
    def __init__(
        self,
        launcher: ServiceLauncher,
        backend: FirewallBackend,
        enqueue: Callable[[Any], None],
        clock: Callable[[], float],
        wall: Callable[[], float],
        *,
        connections: Counter | None = None,
        labels: LabelSource | None = None,
    ) -> None:
        self.launcher = launcher
        self.backend = backend
        self.enqueue = enqueue
        self.clock = clock  # the loop's (monotonic)
        self.wall = wall  # unix time: Docker's start times, log stamps
        self.connections: Counter = connections or ConnectionCounter()
        self.catalogue = {service.name: service for service in launcher.services}
        self.machines = lc.Lifecycles(tuple(policy(s) for s in launcher.services))
        self.workers = Workers("service")
        self.counter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conntrack")
        self._counting = threading.Event()  # a conntrack read is under way
        self.grant_failures = 0
        self.starts_asked: dict[str, float] = {}  # service -> when its Start was carried out
        self._direct: tuple[tuple[str, Step], ...] | None = None
        self._closing = threading.Event()
        self._adopt_now = threading.Event()  # look for our containers again at once
        self._deaths: list[Deaths] = []  # the listener's current stream, to close it
        self._listener: threading.Thread | None = None
        # Label-gated containers: Docker's facts as discovery last said, parsed against
        # the doors (door name -> whether a knock on it grants).
        self.label_source = labels
        self.discovery: Discovery | None = None
        self.labelled = lc.Lifecycles()
        self.labelled.adopted = True  # found live by discovery, not adopted at start
        self.facts: dict[str, ContainerFacts] = {}
        self.doors: dict[str, bool] = {}
        self.plan = LabelPlan()
        self.units: dict[str, Unit] = {}
        self.listed = False  # discovery has listed them at least once
        self._reported: dict[str, tuple[str, ...]] = {}  # container id -> problems logged
        self._announced: dict[str, str] = {}  # unit name -> what was logged of it

    @property
    def launches(self) -> int:
        return self.machines.launches

    @property
    def failures(self) -> int:
        return self.machines.failures + self.grant_failures

    # ----------------------------------------------------------------- start-up

    def start(self) -> None:
        """Adopt what a previous run left (off the loop); follow Docker's events."""
        self.workers.submit(self._adopt, tuple(self.catalogue))
        self._listener = threading.Thread(
            target=self._follow_deaths, name="service-events", daemon=True
        )
        self._listener.start()
        if self.label_source is not None and self.discovery is None:
            self.discovery = Discovery(self.enqueue, self.label_source, clock=self.clock)
            self.discovery.start()

    def _adopt(self, names: tuple[str, ...]) -> None:
        """Worker: our running and paused containers, with their original start time.
        While Docker fails, asked again (backing off; logged once per streak, and
        at once when a launch worked meanwhile); ``Adopted`` only once it answered."""
        delay, failures = ADOPT_RETRY, 0
        while not self._closing.is_set():
            try:
                found = self._look(names)
            except Exception as error:
                failures += 1
                if failures == 1 and isinstance(error, ContainerError):
                    log.error(
                        "cannot look for knockgate's containers (asked again, every %g s at "
                        "most; their addresses stay gated as before): %s",
                        ADOPT_RETRY_MAX,
                        error,
                    )
                elif failures == 1:
                    log.exception("looking for knockgate's containers failed")
                self._adopt_now.wait(delay)
                self._adopt_now.clear()
                delay = min(ADOPT_RETRY_MAX, delay * 2)
                continue
            if failures:
                log.warning("knockgate's containers looked for after %d failed attempts", failures)
            self.enqueue(lc.Adopted(self.clock(), found))
            return

    def _look(self, names: tuple[str, ...]) -> tuple[lc.Found, ...]:
        found: list[lc.Found] = []
        containers = self.launcher.adopt(names)
        offset = self.wall() - self.clock()  # unix time -> the loop's clock
        now = self.clock()
        for c in containers:
            state: Any = c.state
            started = now if c.started_at is None else c.started_at - offset
            version = c.labels.get(LABEL_CONFIG, "")
            found.append(lc.Found(c.service, c.id, state, started, c.address, c.inner, version))
        return tuple(found)

    def _follow_deaths(self) -> None:
        """Listener thread: Docker's die/stop/destroy events of our containers, as events."""
        failing = False
        while not self._closing.is_set():
            try:
                stream = self.launcher.runtime.deaths(self.launcher.owner)
                self._deaths[:] = [stream]
                if self._closing.is_set():
                    stream.close()
                    return
                if failing:
                    log.warning("docker events: followed again")
                    failing = False
                for death in stream:
                    now = self.clock()
                    died = None if death.at is None else death.at - (self.wall() - now)
                    self.enqueue(lc.ContainerDied(now, death.service, death.container, died))
            except ContainerError as error:
                if not failing and not self._closing.is_set():
                    log.warning(
                        "docker events cannot be followed (tried again every %g s): %s",
                        EVENTS_RETRY,
                        error,
                    )
                failing = True
            except Exception:
                log.exception("following docker events failed")
                failing = True
            self._closing.wait(EVENTS_RETRY)

    # ----------------------------------------------------------------- the loop's side

    def handle(self, event: lc.ServiceEvent) -> None:
        """In the loop: one event through the machine, its commands carried out."""
        if isinstance(event, lc.Adopted):  # the kernel's live grants count as holders
            event = dataclasses.replace(event, grants=self._live_grants(event.ts))
        elif isinstance(event, lc.ContainerStarted) and not self.machines.adopted:
            self._adopt_now.set()  # Docker answers again: adopt before the next backoff
        if isinstance(event, lc.Tick):
            self._carry_out(self.machines.handle(event) + self.labelled.handle(event))
        elif getattr(event, "service", None) in self.labelled.machines:
            self._carry_out(self.labelled.handle(event))
        else:
            self._carry_out(self.machines.handle(event))
        self._update_direct()

    # ----------------------------------------------------------------- labelled containers

    def discovered(self, event: DiscoveryEvent) -> None:
        """In the loop: what discovery found (a listing, a change, a removal)."""
        if isinstance(event, Listed):
            self.facts = {f.id: f for f in event.containers}
            self.listed = True
        elif isinstance(event, Changed):
            self.facts[event.container.id] = event.container
        else:
            self.facts.pop(event.id, None)
        self._relabel(event.at)

    def set_doors(self, doors: dict[str, bool]) -> None:
        """The doors now (at start and at each reload): every label parsed again."""
        self.doors = dict(doors)
        if self.listed:
            self._relabel(self.clock())

    def _relabel(self, now: float) -> None:
        self.plan = plan(tuple(self.facts.values()), self.doors)
        offset = self.wall() - now  # unix time -> the loop's clock
        out: list[lc.Command] = []
        reported: dict[str, tuple[str, ...]] = {}
        for problem in self.plan.problems:
            reported[problem.id] = problem.lines
            if self._reported.get(problem.id) != problem.lines:
                for line in problem.lines:
                    log.error("%s; its ports stay closed", line)
        self._reported = reported
        units = {unit.name: unit for unit in self.plan.units}
        for name in [n for n in self.labelled.machines if n not in units]:
            out += self.labelled.forget(name, "no longer label-gated")
            self._announced.pop(name, None)
            log.info("%s: no longer label-gated", name)
        for name, unit in units.items():
            out += self.labelled.put(unit_policy(unit))
            text = _describe(unit)
            if self._announced.get(name) != text:
                self._announced[name] = text
                log.info("%s: %s", name, text)
            running = all(self.facts[m.id].state == "running" for m in unit.members)
            first = unit.members[0].id if unit.members else None
            starts = [s for m in unit.members if (s := self.facts[m.id].started_at) is not None]
            since = min(starts) - offset if starts else None
            out += self.labelled.handle(lc.Observed(now, name, running, first, since))
        self.units = units
        self._carry_out(out)
        self._update_direct()

    def knocked(self, grant: Grant) -> None:
        """A granted knock on ``grant.door``: every unit gated by it, once it answers."""
        now = self.clock()
        for unit in self.units.values():
            if grant.door in unit.doors:
                ports = unit.ports(grant.door)
                self.handle(
                    lc.KnockCompleted(now, unit.name, grant.address, ports, grant.until, grant.door)
                )

    def closed(self, door: str, address: str) -> None:
        """A close knock revoked ``door`` for ``address``: its units' grants too."""
        now = self.clock()
        for unit in list(self.units.values()):
            if door not in unit.doors:
                continue
            machine = self.labelled.machines.get(unit.name)
            holder = None if machine is None else machine.holders.get(address)
            if holder is not None:  # the daemon revoked the door's own ports only
                self._carry_out([lc.RevokeAccess(unit.name, address, holder.ports, "close knock")])
            self.handle(lc.CloseKnock(now, unit.name, address))

    @property
    def label_protected(self) -> tuple[Step, ...]:
        """The host ports the firewall closes for labelled containers."""
        return self.plan.protected

    def request(self, grant: Grant, service: str) -> None:
        """A completed knock on a service door: granted once the service answers."""
        now = self.clock()
        self.handle(
            lc.KnockCompleted(now, service, grant.address, grant.ports, grant.until, grant.door)
        )

    def revoked(self, service: str, address: str) -> None:
        """A close knock: ``address``'s grant was revoked (the last one out stops it)."""
        self.handle(lc.CloseKnock(self.clock(), service, address))

    def tick(self) -> None:
        """Once a second: one conntrack read, then expiry, idle_timeout, max_lifetime."""
        now = self.clock()
        counting = {**self.machines.counting(), **self.labelled.counting()}
        if counting and not self._counting.is_set():
            # The dump takes 10-50 ms: on a thread of its own, never in the packet loop;
            # a read still under way when the next tick comes is not doubled.
            self._counting.set()
            self.counter.submit(self._count, dict(counting))
        self.handle(lc.Tick(now))

    def _count(self, counting: dict[str, tuple[Step, ...]]) -> None:
        """Worker: one conntrack read; each service's count goes back as an event."""
        try:
            counts = self.connections({step for steps in counting.values() for step in steps})
            now = self.clock()
            for name, steps in counting.items():
                seen = None if counts is None else sum(counts.get(step, 0) for step in steps)
                self.enqueue(lc.ConnectionsSeen(now, name, seen))
        finally:
            self._counting.clear()

    def reload(self, services: tuple[Service, ...]) -> None:
        """A new catalogue: added services become available, removed ones stop, changed
        ones are recreated at their next start."""
        self.catalogue = {service.name: service for service in services}
        policies = tuple(policy(service) for service in services)
        self.handle(lc.CatalogueChanged(self.clock(), policies))

    def _live_grants(self, now: float) -> tuple[lc.LiveGrant, ...]:
        try:
            live = self.backend.grants()
        except FirewallError as error:
            log.error("cannot read the live grants: %s", error)
            return ()
        return tuple(lc.LiveGrant(g.address, g.step, now + g.expires_in) for g in live)

    def _carry_out(self, commands: list[lc.Command]) -> None:
        for command in commands:
            if isinstance(command, lc.Start):  # the cold-start time counts from here
                self.starts_asked[command.service] = self.clock()
            match command:
                case lc.Start(service=name) if name in self.units:
                    self.workers.submit(self._start_unit, self.units[name])
                case lc.Stop(service=name, why=why) | lc.Pause(service=name, why=why) if (
                    name in self.units
                ):
                    self.workers.submit(self._stop_unit, self.units[name], why)
                case lc.Start(service=name):
                    service = self.catalogue.get(name)
                    if service is None:  # the machine starts only catalogue entries
                        raise AssertionError(f"start of {name}, not in the catalogue")
                    self.workers.submit(self._start, service)
                case lc.Stop(service=name, why=why):
                    self.workers.submit(self._stop, name, why, False)
                case lc.Pause(service=name, why=why):
                    self.workers.submit(self._stop, name, why, True)
                case lc.GrantAccess():
                    self._grant(command)
                case lc.RevokeAccess(service=name, address=address, ports=ports, why=why):
                    try:
                        self.backend.revoke(address, ports)
                    except FirewallError as error:
                        log.error("%s: %s: revoke failed: %s", address, name, error)
                        continue
                    log.info("%s: %s: access revoked (%s)", address, name, why)
                case lc.Notice(level=level, text=text):
                    log.log(LEVELS[level], "%s", text)
                case _:
                    assert_never(command)

    def _grant(self, command: lc.GrantAccess) -> None:
        now = self.clock()
        grant = Grant(command.at, command.door, command.address, command.ports, command.until)
        seconds = grant.seconds_left(now)
        if seconds <= 0:
            log.warning(
                "%s: %s: service %s was ready too late for the grant",
                command.address,
                command.door,
                command.service,
            )
            return
        try:
            self.backend.grant(command.address, command.ports, seconds)
        except FirewallError as error:
            self.grant_failures += 1
            log.error(
                "%s: %s: grant failed, door stays closed: %s", command.address, command.door, error
            )
            return
        log_command(grant, self.wall() - now)

    def _update_direct(self) -> None:
        if not self.machines.adopted:
            # The kernel keeps what the previous run set for containers that may still
            # run; replaced once we know which of them do.
            return
        entries = tuple(sorted({*self.machines.direct(), *self.plan.direct}))
        if entries == self._direct:
            return
        try:
            self.backend.set_direct(entries)
        except FirewallError as error:
            log.error("cannot gate the service containers' addresses: %s", error)
            self._direct = None  # tried again after the next event
            return
        self._direct = entries

    # ----------------------------------------------------------------- workers

    def _start_unit(self, unit: Unit) -> None:
        """Worker: start a labelled unit's containers in order, each answering before the
        next is started; report started, then ready (or failed)."""
        runtime = self.launcher.runtime
        began = self.clock()
        try:
            for index, member in enumerate(unit.members):
                container = runtime.refresh(Container(member.id, member.name, "", "exited"))
                if container.state == "missing":
                    raise ContainerError(f"container {member.name} is gone")
                if container.state == "paused":
                    runtime.unpause(container)
                elif container.state != "running":
                    runtime.start(container)
                container = runtime.refresh(container)
                if container.state != "running":
                    raise ContainerError(f"container {member.name} is {container.state}")
                if index == 0:
                    self.enqueue(lc.ContainerStarted(self.clock(), unit.name, container.id))
                self._wait_member(member, container)
        except Exception as error:  # ContainerError, or a bug: either way, no grant
            if not isinstance(error, ContainerError):
                log.exception("%s: start failed", unit.name)
            reason = str(error) if isinstance(error, ContainerError) else f"internal error: {error}"
            self._stop_members(unit, "it did not start properly")
            self.enqueue(lc.ContainerFailed(self.clock(), unit.name, reason))
            return
        log.info("%s: ready in %.0f ms", unit.name, (self.clock() - began) * 1000)
        self.enqueue(lc.ContainerReady(self.clock(), unit.name))

    def _wait_member(self, member: GatedContainer, container: Container) -> None:
        """Until a started member answers its check: on its first gated (else published)
        port; a member without a port is ready when it runs, unless it has a healthcheck."""
        ready = member.ready
        ports = member.ports or self._published(member.id)
        if ready.kind != "healthcheck" and not ports:
            return
        if container.address is None and ready.kind != "healthcheck":
            raise ContainerError(f"container {member.name} has no address")
        runtime = self.launcher.runtime

        def healthy() -> bool:
            return runtime.refresh(container).health == "healthy"

        port = ports[0].port if ports else 0
        if not wait_ready(ready, container.address or "", port, healthy):
            raise ContainerError(
                f"container {member.name}: not ready after {ready.timeout:g} s "
                f"({ready.kind} check on {container.address}:{port})"
            )

    def _published(self, ident: str) -> tuple[Published, ...]:
        facts = self.facts.get(ident)  # read-only: a frozen value, replaced, never changed
        return () if facts is None else facts.published

    def _stop_unit(self, unit: Unit, why: str) -> None:
        """Worker: stop a labelled unit's containers in reverse order, and report."""
        try:
            self._stop_members(unit, why, quietly=False)
        except Exception as error:
            if not isinstance(error, ContainerError):
                log.exception("%s: stop failed", unit.name)
            self.enqueue(lc.ContainerFailed(self.clock(), unit.name, str(error)))
            return
        self.enqueue(lc.ContainerStopped(self.clock(), unit.name))

    def _stop_members(self, unit: Unit, why: str, quietly: bool = True) -> None:
        runtime = self.launcher.runtime
        for member in reversed(unit.members):
            try:
                container = runtime.refresh(Container(member.id, member.name, "", "exited"))
                if container.state == "paused":
                    runtime.unpause(container)
                if container.state in ("running", "paused"):
                    runtime.stop(container)
                    log.info("container %s: stopped (%s)", member.name, why)
            except ContainerError as error:
                if not quietly:
                    raise
                log.error("container %s: cannot stop it: %s", member.name, error)

    def _start(self, service: Service) -> None:
        """Worker: run the container, report it started, wait until it answers."""
        name = service.name
        began = self.clock()
        try:
            launched = self.launcher.run(service)
            container = launched.container
            version = container.labels.get(LABEL_CONFIG, "")
            now = self.clock()
            since = None  # Docker's start of this run (one already running keeps its age)
            if container.started_at is not None:
                since = container.started_at - (self.wall() - now)
            self.enqueue(
                lc.ContainerStarted(
                    now,
                    name,
                    container.id,
                    container.address,
                    container.inner,
                    version,
                    since,
                    launched.resumed,
                )
            )
            self.launcher.wait_ready(service, container, began)
        except Exception as error:  # ContainerError, or a bug: either way, no grant
            if not isinstance(error, ContainerError):
                log.exception("%s: launch failed", name)
            self.launcher.abandon(name)
            reason = str(error) if isinstance(error, ContainerError) else f"internal error: {error}"
            self.enqueue(lc.ContainerFailed(self.clock(), name, reason))
            return
        self.enqueue(lc.ContainerReady(self.clock(), name))

    def _stop(self, name: str, why: str, pause: bool) -> None:
        """Worker: stop or pause, and report."""
        try:
            self.launcher.stop(name, why, pause)
        except Exception as error:
            if not isinstance(error, ContainerError):
                log.exception("%s: stop failed", name)
            self.enqueue(lc.ContainerFailed(self.clock(), name, str(error)))
            return
        self.enqueue(lc.ContainerStopped(self.clock(), name, pause))

    # ----------------------------------------------------------------- status, shutdown

    def gated(self) -> list[dict[str, Any]]:
        """The labelled containers, for ``knockgate status``."""
        rows: list[dict[str, Any]] = []
        problems = {p.id: p for p in self.plan.problems}
        members = {m.id: (u, m) for u in self.plan.units for m in u.members}
        for facts in sorted(self.facts.values(), key=lambda f: (f.name, f.id)):
            row: dict[str, Any] = {"name": facts.name, "docker": facts.state}
            if facts.id in members:
                unit, member = members[facts.id]
                machine = self.labelled.machines.get(unit.name)
                row |= {
                    "unit": unit.name,
                    "door": member.door,
                    "ports": [str(s) for s in unit_ports(member)],
                    "state": machine.state if machine is not None else "cold",
                    "start_on_knock": member.start_on_knock,
                    "grants": len(machine.holders) if machine is not None else 0,
                    "problems": [],
                }
            else:
                label = dict(facts.labels)
                problem = problems.get(facts.id)
                row |= {
                    "unit": None,
                    "door": label.get("knockgate.door"),
                    "ports": [str(s) for s in _host(facts)],
                    "state": "closed" if problem is not None else "not gated",
                    "start_on_knock": False,
                    "grants": 0,
                    "problems": list(problem.lines) if problem is not None else [],
                }
            rows.append(row)
        return rows

    def snapshot(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [
            {
                "name": name,
                "state": machine.state,
                "running": machine.state in ("starting", *lc.RUNNING, "stopping"),
                "uptime": 0.0 if machine.started is None else round(now - machine.started, 1),
                "grants": len(machine.holders),
            }
            for name, machine in self.machines.machines.items()
        ]

    def shutdown(self) -> None:
        """Docker work under way gets ``SHUTDOWN_WAIT`` s at most (a launch cut short
        leaves a container the next start adopts); services with ``on_shutdown: stop``
        are stopped, the others keep running (and serving their sessions) for the next
        start to adopt."""
        self._closing.set()
        self._adopt_now.set()
        if self.discovery is not None:
            self.discovery.close(timeout=1.0)
        for stream in list(self._deaths):
            try:
                stream.close()
            except Exception as error:
                log.debug("closing docker events: %s", error)
        left = self.workers.close(SHUTDOWN_WAIT)
        if left:
            log.warning(
                "shutdown: %d Docker operation(s) still under way after %g s, left behind",
                left,
                SHUTDOWN_WAIT,
            )
        self.counter.shutdown(wait=False, cancel_futures=True)
        kept: list[str] = []
        for name, machine in self.machines.machines.items():
            if machine.state == "cold":
                continue
            service = self.catalogue.get(name)
            if service is not None and service.on_shutdown == "keep" and not machine.removed:
                kept.append(name)
                continue
            try:
                self.launcher.stop(name, "knockgate is stopping")
            except ContainerError as error:
                log.error("%s: stopping failed: %s", name, error)
        if kept:
            log.info(
                "services left running for the next start (on_shutdown: keep): %s", ", ".join(kept)
            )


def unit_ports(member: GatedContainer) -> tuple[Step, ...]:
    return host_steps(member.ports)


def _host(facts: ContainerFacts) -> tuple[Step, ...]:
    return host_steps(facts.published)


def _describe(unit: Unit) -> str:
    """One line for the log: what gates the unit, and how it runs."""
    gated = ", ".join(
        f"{m.name} ({m.door}: {' '.join(str(s) for s in unit_ports(m))})" for m in unit.gated
    )
    how = (
        f"started on a knock, stopped after {unit.idle_timeout:g} s idle"
        if unit.managed
        else "gated only (start_on_knock=false)"
    )
    order = ""
    if len(unit.members) > 1:
        order = "; start order " + " -> ".join(m.name for m in unit.members)
    return f"gated: {gated}; {how}{order}"
