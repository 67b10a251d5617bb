"""The Docker side of service doors: find, start, wait for, stop and adopt containers.

Every method blocks (Docker calls, readiness polling) and is called from the
runtime's worker threads, never from the daemon's loop. The launcher keeps no
state of its own: each call asks Docker (one list call) for the service's
container, so nothing is shared with the loop. *When* a service starts or stops
is decided by the lifecycle state machine (``appliance.core.lifecycle``), which
asks for at most one operation per service at a time.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from appliance.config.schema import Service
from appliance.errors import ContainerError
from appliance.services.readiness import wait_ready
from appliance.services.runtime import LABEL_CONFIG, Container, ContainerRuntime

log = logging.getLogger("knockgate.services")


def config_hash(service: Service) -> str:
    """Names the container definition: when it changes, the container is re-created at
    its next start. Lifecycle settings (ready, idle_timeout, max_lifetime, keep_warm,
    on_shutdown) are left out: changing them keeps the container."""
    definition = (
        service.name,
        service.image,
        service.container_port,
        service.host_port,
        service.proto,
        service.build,
        service.environment,
        service.volumes,
        service.command,
    )
    return hashlib.sha256(repr(definition).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Launched:
    """What :meth:`ServiceLauncher.run` made of the container: it runs; ``resumed``:
    it was paused and is now unpaused (its ``started_at`` is the start of a run that
    was paused since)."""

    container: Container
    resumed: bool = False


class ServiceLauncher:
    def __init__(
        self,
        runtime: ContainerRuntime,
        services: Sequence[Service],
        owner: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime = runtime
        self.services = tuple(services)  # the catalogue at start (the runtime keeps its own)
        self.owner = owner
        self.clock = clock  # only to say how long a launch took

    # ----------------------------------------------------------------- start-up

    def adopt(self, names: Collection[str]) -> list[Container]:
        """Our running and paused containers of the services ``names``, to take over;
        the orphans (no such service any more, a second container of one) are removed.

        Only containers labelled with this owner are looked at: nothing else on the
        Docker engine is ever touched.
        """
        kept: list[Container] = []
        seen: set[str] = set()
        ranked = sorted(self.runtime.owned(self.owner), key=_liveliness)
        for container in ranked:
            if container.service not in names or container.service in seen:
                log.info("removing orphan container %s (%s)", container.name, container.service)
                self._quietly(self.runtime.remove, container)
                continue
            seen.add(container.service)
            if container.state in ("running", "paused"):
                kept.append(container)
                log.info(
                    "adopted container %s (%s, %s)",
                    container.name,
                    container.service,
                    container.state,
                )
        return kept

    # ----------------------------------------------------------------- serving

    def run(self, service: Service) -> Launched:
        """Make the service's container run (create, start or unpause; one whose
        definition changed is created anew unless it runs; one that runs already is
        taken as it is, its ``started_at`` its real start)."""
        container = self.find(service.name)
        wanted = config_hash(service)
        if (
            container is not None
            and container.labels.get(LABEL_CONFIG) != wanted
            and container.state != "running"
        ):
            log.info(
                "%s: definition changed: container %s re-created", service.name, container.name
            )
            self.runtime.remove(container)
            container = None
        if container is None:
            container = self.runtime.create(service, self.owner, wanted)
        resumed = container.state == "paused"
        if resumed:
            self.runtime.unpause(container)
        elif container.state != "running":
            self.runtime.start(container)
        container = self.runtime.refresh(container)
        if container.state != "running":
            raise ContainerError(f"{service.name}: container {container.name} is {container.state}")
        return Launched(container, resumed)

    def wait_ready(self, service: Service, container: Container, began: float) -> None:
        """Until the service answers; raise ContainerError when it does not in time."""
        if container.address is None:
            raise ContainerError(f"{service.name}: container {container.name} has no address")

        def healthy() -> bool:
            return self.runtime.refresh(container).health == "healthy"

        if not wait_ready(service.ready, container.address, service.container_port, healthy):
            raise ContainerError(
                f"{service.name}: not ready after {service.ready.timeout:g} s "
                f"({service.ready.kind} check on {container.address}:{service.container_port})"
            )
        log.info(
            "%s: ready in %.0f ms (%s)",
            service.name,
            (self.clock() - began) * 1000,
            container.name,
        )

    def find(self, name: str) -> Container | None:
        """The service's container (the liveliest, should there be more)."""
        found = sorted(
            (c for c in self.runtime.owned(self.owner) if c.service == name), key=_liveliness
        )
        return found[0] if found else None

    # ----------------------------------------------------------------- stopping

    def stop(self, name: str, why: str, pause: bool = False) -> bool:
        """Stop (or pause) the service's container; True when it was running or paused.
        Raises ContainerError when Docker refuses."""
        container = self.find(name)
        if container is None or container.state not in ("running", "paused"):
            return False
        if pause:
            if container.state == "running":
                self.runtime.pause(container)
        else:
            if container.state == "paused":
                self.runtime.unpause(container)
            self.runtime.stop(container)
        log.info("%s: %s (%s)", name, "paused" if pause else "stopped", why)
        return True

    def abandon(self, name: str) -> None:
        """After a failed start: stop whatever was started, quietly."""
        try:
            self.stop(name, "it did not start properly")
        except ContainerError as error:
            log.error("%s: cannot stop the failed container: %s", name, error)

    def _quietly(self, action: Callable[[Container], None], container: Container) -> None:
        try:
            action(container)
        except ContainerError as error:
            log.error("%s: %s", container.name, error)


def _liveliness(container: Container) -> int:
    return {"running": 0, "paused": 1}.get(container.state, 2)
