"""The loop's side of service doors: who holds a grant on which service, and when
a service is idle, too old, or closed by a knock.

Docker work (start, readiness, stop) runs on worker threads that only report
back through the daemon's queue; grants are applied by the loop, and only once
the service answers (fail closed: no answer, no grant).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from appliance.config.schema import Service
from appliance.core.events import Grant
from appliance.core.model import Step
from appliance.errors import ContainerError, FirewallError
from appliance.firewall import FirewallBackend
from appliance.services.conntrack import connections as conntrack_connections
from appliance.services.launcher import ServiceLauncher

log = logging.getLogger("knockgate.services")


class ServiceManager:
    def __init__(
        self,
        launcher: ServiceLauncher,
        backend: FirewallBackend,
        enqueue: Callable[[Any], None],
        clock: Callable[[], float],
        connections: Callable[[int, str], int | None] = conntrack_connections,
    ) -> None:
        self.launcher = launcher
        self.backend = backend
        self.enqueue = enqueue
        self.clock = clock
        self.connections = connections
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="service")
        self.grants: dict[str, dict[str, float]] = {name: {} for name in launcher.services}
        self.idle_since: dict[str, float] = {}
        self.failures = 0
        self.launches = 0

    # ----------------------------------------------------------------- start-up

    def start(self) -> None:
        self.pool.submit(self._prepare)

    def _prepare(self) -> None:
        try:
            self.launcher.adopt()
        except ContainerError as error:
            log.error("cannot look for knockgate's containers: %s", error)
        for name, service in self.launcher.services.items():
            if service.keep_warm:
                try:
                    self.launcher.warm(name)
                except ContainerError as error:
                    log.error("%s: cannot keep warm: %s", name, error)
        self.enqueue(("services-prepared",))

    # ----------------------------------------------------------------- knocks

    def request(self, grant: Grant, service: Service) -> None:
        """A completed knock on a service door: launch (off the loop), grant when ready."""
        self.pool.submit(self._launch, grant, service.name)

    def _launch(self, grant: Grant, name: str) -> None:
        try:
            self.launcher.ensure_ready(name)
        except ContainerError as error:
            self.enqueue(("service-ready", grant, name, str(error)))
            return
        except Exception as error:  # a bug must not kill the worker silently
            log.exception("%s: launch failed", name)
            self.enqueue(("service-ready", grant, name, f"internal error: {error}"))
            return
        self.enqueue(("service-ready", grant, name, None))

    def ready(self, grant: Grant, name: str, error: str | None) -> bool:
        """In the loop: the launch finished. Grant now, or log why not."""
        if error is not None:
            self.failures += 1
            log.error(
                "%s: %s: service %s unavailable, no access: %s",
                grant.address,
                grant.door,
                name,
                error,
            )
            return False
        self.launches += 1
        self.update_direct()
        seconds = grant.seconds_left(self.clock())
        if seconds <= 0:
            log.warning(
                "%s: %s: service %s was ready too late for the grant",
                grant.address,
                grant.door,
                name,
            )
            return False
        try:
            self.backend.grant(grant.address, grant.ports, seconds)
        except FirewallError as error:
            self.failures += 1
            log.error(
                "%s: %s: grant failed, door stays closed: %s", grant.address, grant.door, error
            )
            return False
        self.grants[name][grant.address] = grant.until
        self.idle_since.pop(name, None)
        return True

    def prepared(self) -> None:
        """In the loop, once adopted containers are known: grants that survived a restart
        (kernel timeouts) count as holders again, so an adopted service is not stopped
        under a client whose grant is still live."""
        try:
            live = self.backend.grants()
        except FirewallError as error:
            log.error("cannot read the live grants: %s", error)
            live = []
        now = self.clock()
        for entry in live:
            for name, service in self.launcher.services.items():
                if entry.step == service.step and self.launcher.running(name):
                    self.grants[name][entry.address] = now + entry.expires_in
        self.update_direct()

    def revoked(self, name: str, address: str) -> None:
        """A close knock: this address lost its grant; the last one out stops the service."""
        self.grants[name].pop(address, None)
        if not self.grants[name] and self.launcher.running(name):
            self.launcher.stopping(name)  # a launch after this wins the race
            self.pool.submit(self.launcher.stop, name, f"close knock from {address}")

    def update_direct(self) -> None:
        entries: list[tuple[str, Step]] = []
        for name, container in self.launcher.containers.items():
            service = self.launcher.services.get(name)
            if service is not None and container.address:
                entries.append((container.address, Step(service.container_port, service.proto)))
        try:
            self.backend.set_direct(tuple(entries))
        except FirewallError as error:
            log.error("cannot gate the service containers' addresses: %s", error)

    # ----------------------------------------------------------------- upkeep

    def tick(self) -> None:
        """Expire grants, then stop services that are idle or too old."""
        now = self.clock()
        for name, holders in self.grants.items():
            for address in [a for a, until in holders.items() if until <= now]:
                del holders[address]
            if not self.launcher.running(name):
                self.idle_since.pop(name, None)
                continue
            service = self.launcher.services[name]
            if self.launcher.uptime(name) >= service.max_lifetime:
                self._retire(name, service, "max_lifetime reached")
                continue
            if holders:
                self.idle_since.pop(name, None)
                continue
            open_connections = self.connections(service.host_port, service.proto)
            if open_connections is None or open_connections > 0:
                self.idle_since.pop(name, None)
                continue
            since = self.idle_since.setdefault(name, now)
            if now - since >= service.idle_timeout:
                self.idle_since.pop(name, None)
                self.launcher.stopping(name)  # no second stop from the next tick
                self.pool.submit(self.launcher.stop, name, f"idle for {service.idle_timeout:g} s")

    def _retire(self, name: str, service: Service, why: str) -> None:
        for address in list(self.grants[name]):
            try:
                self.backend.revoke(address, (service.step,))
            except FirewallError as error:
                log.error("%s: revoke %s failed: %s", name, address, error)
        self.grants[name].clear()
        self.launcher.stopping(name)
        self.pool.submit(self.launcher.stop, name, why)

    def snapshot(self) -> list[dict[str, Any]]:
        return [
            {
                "name": name,
                "running": self.launcher.running(name),
                "uptime": round(self.launcher.uptime(name), 1),
                "grants": len(self.grants[name]),
            }
            for name in self.launcher.services
        ]

    def shutdown(self) -> None:
        """Stop every running service after the pending launches finish."""
        self.pool.shutdown(wait=True)
        self.launcher.shutdown()
