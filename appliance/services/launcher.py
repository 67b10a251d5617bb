"""One launcher for every service of the catalogue: start on demand, share, stop.

``ensure_ready`` blocks (Docker calls, readiness polling) and is called from
worker threads, never from the daemon's loop; a per-service lock makes two
knockers arriving together share one container. The loop decides *when* a
service stops (its last grant gone and no connection left for ``idle_timeout``,
a close knock, ``max_lifetime``); the launcher only carries it out.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence

from appliance.config.schema import Service
from appliance.errors import ContainerError
from appliance.services.readiness import wait_ready
from appliance.services.runtime import LABEL_CONFIG, Container, ContainerRuntime

log = logging.getLogger("knockgate.services")


def config_hash(service: Service) -> str:
    """Changes whenever the service definition changes (then the container is re-created)."""
    return hashlib.sha256(repr(service).encode()).hexdigest()[:16]


class ServiceLauncher:
    def __init__(
        self,
        runtime: ContainerRuntime,
        services: Sequence[Service],
        owner: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime = runtime
        self.services = {service.name: service for service in services}
        self.owner = owner
        self.clock = clock
        self.containers: dict[str, Container] = {}
        self.started_at: dict[str, float] = {}  # when the container last began to serve
        self.locks = {name: threading.Lock() for name in self.services}

    # ----------------------------------------------------------------- start-up

    def adopt(self) -> None:
        """Take over our own containers from a previous run; remove the orphans.

        Only containers labelled with this owner are looked at: nothing else on
        the Docker engine is ever touched.
        """
        for container in self.runtime.owned(self.owner):
            service = self.services.get(container.service)
            current = service is not None and container.labels.get(LABEL_CONFIG) == config_hash(
                service
            )
            if not current or container.service in self.containers:
                log.info("removing orphan container %s (%s)", container.name, container.service)
                self._quietly(self.runtime.remove, container)
                continue
            self.containers[container.service] = container
            if container.state == "running":
                self.started_at[container.service] = self.clock()
            log.info(
                "adopted container %s (%s, %s)", container.name, container.service, container.state
            )

    def warm(self, name: str) -> None:
        """``keep_warm``: created, started, ready, then paused, so a knock only unpauses."""
        service = self.services[name]
        with self.locks[name]:
            container = self._ensure_running(service)
            self._wait_ready(service, container)
            self.runtime.pause(container)
            container.state = "paused"
            self.started_at.pop(name, None)
        log.info("%s: warm (paused) and ready", name)

    # ----------------------------------------------------------------- serving

    def ensure_ready(self, name: str) -> Container:
        """Make the service run and answer; raise ContainerError when it cannot."""
        service = self.services[name]
        with self.locks[name]:
            started = time.monotonic()
            container = self._ensure_running(service)
            self._wait_ready(service, container)
            self.started_at.setdefault(name, self.clock())
            log.info(
                "%s: ready in %.0f ms (%s)",
                name,
                (time.monotonic() - started) * 1000,
                container.name,
            )
            return container

    def _ensure_running(self, service: Service) -> Container:
        container = self.containers.get(service.name)
        if container is not None:
            try:
                container = self.runtime.refresh(container)
            except ContainerError:
                container = None
        if container is None or container.state == "missing":
            container = self.runtime.create(service, self.owner, config_hash(service))
        if container.state == "paused":
            self.runtime.unpause(container)
        elif container.state != "running":
            self.runtime.start(container)
        container = self.runtime.refresh(container)
        self.containers[service.name] = container
        if container.state != "running":
            raise ContainerError(f"{service.name}: container {container.name} is {container.state}")
        return container

    def _wait_ready(self, service: Service, container: Container) -> None:
        if container.address is None:
            raise ContainerError(f"{service.name}: container {container.name} has no address")

        def healthy() -> bool:
            return self.runtime.refresh(container).health == "healthy"

        if not wait_ready(service.ready, container.address, service.container_port, healthy):
            raise ContainerError(
                f"{service.name}: not ready after {service.ready.timeout:g} s "
                f"({service.ready.kind} check on {container.address}:{service.container_port})"
            )

    # ----------------------------------------------------------------- stopping

    def stop(self, name: str, why: str, force: bool = False) -> None:
        """Stop the service (pause it when ``keep_warm``); errors are logged, not raised.

        The caller clears ``started_at`` when it decides to stop; a launch that wins
        the lock before this stop sets it again, and then the stop is dropped (unless
        ``force``): a knocker who was just granted access keeps a running service.
        """
        service = self.services[name]
        with self.locks[name]:
            if name in self.started_at and not force:
                log.info("%s: not stopped (%s): a knock launched it again", name, why)
                return
            container = self.containers.get(name)
            self.started_at.pop(name, None)
            if container is None:
                return
            try:
                container = self.runtime.refresh(container)
                if container.state == "running":
                    if service.keep_warm:
                        self.runtime.pause(container)
                    else:
                        self.runtime.stop(container)
            except ContainerError as error:
                log.error("%s: stopping failed: %s", name, error)
                return
        log.info("%s: %s (%s)", name, "paused" if service.keep_warm else "stopped", why)

    def stopping(self, name: str) -> None:
        """The loop decided to stop ``name``: until a launch marks it started again, a
        queued :meth:`stop` goes ahead (and one that loses to a new launch is dropped)."""
        self.started_at.pop(name, None)

    def running(self, name: str) -> bool:
        return name in self.started_at

    def uptime(self, name: str) -> float:
        started = self.started_at.get(name)
        return 0.0 if started is None else self.clock() - started

    def shutdown(self) -> None:
        for name in list(self.started_at):
            self.stop(name, "knockgate is stopping", force=True)

    def _quietly(self, action: Callable[[Container], None], container: Container) -> None:
        try:
            action(container)
        except ContainerError as error:
            log.error("%s: %s", container.name, error)
