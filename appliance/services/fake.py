"""An in-memory container runtime for unit tests: same protocol, a dict for Docker."""

from __future__ import annotations

import itertools
import queue
import time
from collections.abc import Callable, Iterator

from appliance.config.schema import Service
from appliance.core.model import Step
from appliance.errors import ContainerError
from appliance.services.runtime import LABEL, LABEL_CONFIG, LABEL_OWNER, Container, Death


class FakeDeaths:
    """What :meth:`FakeRuntime.stop` (or a test's :meth:`die`) reports, until closed."""

    def __init__(self) -> None:
        self.items: queue.SimpleQueue[Death | None] = queue.SimpleQueue()

    def __iter__(self) -> Iterator[Death]:
        while (item := self.items.get()) is not None:
            yield item

    def close(self) -> None:
        self.items.put(None)


class FakeRuntime:
    """Containers get ``address``; ``fail`` names a method that raises ContainerError;
    ``wall`` stamps their start (unix time)."""

    def __init__(self, address: str = "127.0.0.1", wall: Callable[[], float] = time.time) -> None:
        self.address = address
        self.wall = wall
        self.containers: dict[str, Container] = {}
        self.calls: list[str] = []
        self.fail: str | None = None
        self.health = "healthy"
        self.watchers: list[FakeDeaths] = []
        self._ids = itertools.count(1)

    def _call(self, name: str, container: Container | None = None) -> None:
        self.calls.append(name if container is None else f"{name} {container.service}")
        if self.fail == name:
            raise ContainerError(f"fake docker: {name} failed (as the test asked)")

    def owned(self, owner: str) -> list[Container]:
        self._call("owned")
        return [
            self._copy(c) for c in self.containers.values() if c.labels.get(LABEL_OWNER) == owner
        ]

    def create(self, service: Service, owner: str, config_hash: str) -> Container:
        self._call("create")
        container = Container(
            id=f"c{next(self._ids)}",
            name=f"knockgate-{service.name}",
            service=service.name,
            state="created",
            address=self.address,
            labels={LABEL: service.name, LABEL_OWNER: owner, LABEL_CONFIG: config_hash},
            inner=Step(service.container_port, service.proto),
        )
        self.containers[container.id] = container
        return self._copy(container)

    def _set(self, name: str, container: Container, state: str) -> None:
        self._call(name, container)
        current = self.containers[container.id]
        current.state = state  # type: ignore[assignment]
        if name == "start":
            current.started_at = self.wall()
        elif state == "exited":
            current.started_at = None

    def start(self, container: Container) -> None:
        self._set("start", container, "running")

    def pause(self, container: Container) -> None:
        self._set("pause", container, "paused")

    def unpause(self, container: Container) -> None:
        self._set("unpause", container, "running")

    def stop(self, container: Container) -> None:
        self._set("stop", container, "exited")
        self.die(container)

    def die(self, container: Container, at: float | None = None) -> None:
        """Report the container's end to the watchers (as Docker's ``die`` event, stamped
        ``at``, unix time: now unless told)."""
        death = Death(container.service, container.id, self.wall() if at is None else at)
        for watcher in self.watchers:
            watcher.items.put(death)

    def remove(self, container: Container) -> None:
        self._call("remove", container)
        self.containers.pop(container.id, None)

    def refresh(self, container: Container) -> Container:
        if self.fail == "refresh":
            raise ContainerError("fake docker: refresh failed")
        current = self.containers.get(container.id)
        if current is None:
            return Container(container.id, container.name, container.service, "missing")
        current.health = self.health if current.state == "running" else None
        return self._copy(current)

    def deaths(self, owner: str) -> FakeDeaths:
        self._call("deaths")
        watcher = FakeDeaths()
        self.watchers.append(watcher)
        return watcher

    @staticmethod
    def _copy(c: Container) -> Container:
        return Container(
            c.id,
            c.name,
            c.service,
            c.state,
            c.address,
            dict(c.labels),
            c.health,
            c.started_at,
            c.inner,
        )
