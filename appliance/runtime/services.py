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
once per tick, one netlink dump for every service whose idleness is in question.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
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
from appliance.services.launcher import ServiceLauncher, config_hash
from appliance.services.runtime import LABEL_CONFIG, Deaths

log = logging.getLogger("knockgate.services")

EVENTS_RETRY = 5.0  # seconds between attempts to follow Docker's events again
LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

Counter = Callable[[Collection[Step]], dict[Step, int] | None]


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
    ) -> None:
        self.launcher = launcher
        self.backend = backend
        self.enqueue = enqueue
        self.clock = clock  # the loop's (monotonic)
        self.wall = wall  # unix time: Docker's start times, log stamps
        self.connections: Counter = connections or ConnectionCounter()
        self.catalogue = {service.name: service for service in launcher.services}
        self.machines = lc.Lifecycles(tuple(policy(s) for s in launcher.services))
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="service")
        self.grant_failures = 0
        self._direct: tuple[tuple[str, Step], ...] | None = None
        self._closing = threading.Event()
        self._deaths: list[Deaths] = []  # the listener's current stream, to close it
        self._listener: threading.Thread | None = None

    @property
    def launches(self) -> int:
        return self.machines.launches

    @property
    def failures(self) -> int:
        return self.machines.failures + self.grant_failures

    # ----------------------------------------------------------------- start-up

    def start(self) -> None:
        """Adopt what a previous run left (off the loop); follow Docker's events."""
        self.pool.submit(self._adopt, tuple(self.catalogue))
        self._listener = threading.Thread(
            target=self._follow_deaths, name="service-events", daemon=True
        )
        self._listener.start()

    def _adopt(self, names: tuple[str, ...]) -> None:
        """Worker: our running and paused containers, with their original start time."""
        found: list[lc.Found] = []
        try:
            containers = self.launcher.adopt(names)
            offset = self.wall() - self.clock()  # unix time -> the loop's clock
            now = self.clock()
            for c in containers:
                state: Any = c.state
                started = now if c.started_at is None else c.started_at - offset
                version = c.labels.get(LABEL_CONFIG, "")
                found.append(lc.Found(c.service, c.id, state, started, c.address, c.inner, version))
        except ContainerError as error:
            log.error("cannot look for knockgate's containers: %s", error)
        except Exception:
            log.exception("looking for knockgate's containers failed")
        self.enqueue(lc.Adopted(self.clock(), tuple(found)))

    def _follow_deaths(self) -> None:
        """Listener thread: Docker's die/stop events of our containers, as events."""
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
                for service, container in stream:
                    self.enqueue(lc.ContainerDied(self.clock(), service, container))
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
        self._carry_out(self.machines.handle(event))
        self._update_direct()

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
        counting = self.machines.counting()
        if counting:
            counts = self.connections(set(counting.values()))
            for name, step in counting.items():
                seen = None if counts is None else counts.get(step, 0)
                self.handle(lc.ConnectionsSeen(now, name, seen))
        self.handle(lc.Tick(now))

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
            match command:
                case lc.Start(service=name):
                    service = self.catalogue.get(name)
                    if service is None:  # the machine starts only catalogue entries
                        raise AssertionError(f"start of {name}, not in the catalogue")
                    self.pool.submit(self._start, service)
                case lc.Stop(service=name, why=why):
                    self.pool.submit(self._stop, name, why, False)
                case lc.Pause(service=name, why=why):
                    self.pool.submit(self._stop, name, why, True)
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
        entries = self.machines.direct()
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

    def _start(self, service: Service) -> None:
        """Worker: run the container, report it started, wait until it answers."""
        name = service.name
        began = self.clock()
        try:
            container = self.launcher.run(service)
            version = container.labels.get(LABEL_CONFIG, "")
            self.enqueue(
                lc.ContainerStarted(
                    self.clock(), name, container.id, container.address, container.inner, version
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
        """Pending launches finish; services with ``on_shutdown: stop`` are stopped, the
        others keep running (and serving their sessions) for the next start to adopt."""
        self._closing.set()
        for stream in list(self._deaths):
            try:
                stream.close()
            except Exception as error:
                log.debug("closing docker events: %s", error)
        self.pool.shutdown(wait=True)
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
