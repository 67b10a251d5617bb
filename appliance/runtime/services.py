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
from appliance.services.launcher import ServiceLauncher, config_hash
from appliance.services.runtime import LABEL_CONFIG, Deaths

log = logging.getLogger("knockgate.services")

EVENTS_RETRY = 5.0  # seconds between attempts to follow Docker's events again
ADOPT_RETRY = 1.0  # seconds before looking for our containers again, doubled up to:
ADOPT_RETRY_MAX = 30.0
SHUTDOWN_WAIT = 3.0  # seconds shutdown waits for Docker work under way
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
        self._direct: tuple[tuple[str, Step], ...] | None = None
        self._closing = threading.Event()
        self._adopt_now = threading.Event()  # look for our containers again at once
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
        self.workers.submit(self._adopt, tuple(self.catalogue))
        self._listener = threading.Thread(
            target=self._follow_deaths, name="service-events", daemon=True
        )
        self._listener.start()

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
        if counting and not self._counting.is_set():
            # The dump takes 10-50 ms: on a thread of its own, never in the packet loop;
            # a read still under way when the next tick comes is not doubled.
            self._counting.set()
            self.counter.submit(self._count, dict(counting))
        self.handle(lc.Tick(now))

    def _count(self, counting: dict[str, Step]) -> None:
        """Worker: one conntrack read; each service's count goes back as an event."""
        try:
            counts = self.connections(set(counting.values()))
            now = self.clock()
            for name, step in counting.items():
                seen = None if counts is None else counts.get(step, 0)
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
            match command:
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
