"""An in-memory container runtime for unit tests: same protocol, a dict for Docker."""

from __future__ import annotations

import itertools

from appliance.config.schema import Service
from appliance.errors import ContainerError
from appliance.services.runtime import LABEL, LABEL_CONFIG, LABEL_OWNER, Container


class FakeRuntime:
    """Containers get ``address``; ``fail`` names a method that raises ContainerError."""

    def __init__(self, address: str = "127.0.0.1") -> None:
        self.address = address
        self.containers: dict[str, Container] = {}
        self.calls: list[str] = []
        self.fail: str | None = None
        self.health = "healthy"
        self._ids = itertools.count(1)

    def _call(self, name: str, container: Container | None = None) -> None:
        self.calls.append(name if container is None else f"{name} {container.service}")
        if self.fail == name:
            raise ContainerError(f"fake docker: {name} failed (as the test asked)")

    def owned(self, owner: str) -> list[Container]:
        self._call("owned")
        return [c for c in self.containers.values() if c.labels.get(LABEL_OWNER) == owner]

    def create(self, service: Service, owner: str, config_hash: str) -> Container:
        self._call("create")
        container = Container(
            id=f"c{next(self._ids)}",
            name=f"knockgate-{service.name}",
            service=service.name,
            state="created",
            address=self.address,
            labels={LABEL: service.name, LABEL_OWNER: owner, LABEL_CONFIG: config_hash},
        )
        self.containers[container.id] = container
        return container

    def _set(self, name: str, container: Container, state: str) -> None:
        self._call(name, container)
        self.containers[container.id].state = state  # type: ignore[assignment]

    def start(self, container: Container) -> None:
        self._set("start", container, "running")

    def pause(self, container: Container) -> None:
        self._set("pause", container, "paused")

    def unpause(self, container: Container) -> None:
        self._set("unpause", container, "running")

    def stop(self, container: Container) -> None:
        self._set("stop", container, "exited")

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
        return Container(
            current.id,
            current.name,
            current.service,
            current.state,
            current.address,
            dict(current.labels),
            current.health,
        )
