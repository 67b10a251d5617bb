"""The Docker SDK adapter of :class:`~appliance.services.runtime.ContainerRuntime`.

Every Docker error becomes a :class:`ContainerError` naming the service and the
call; the daemon logs it and grants nothing (fail closed).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

from appliance.config.schema import Service
from appliance.core.model import Step
from appliance.errors import ContainerError
from appliance.services.runtime import LABEL, LABEL_CONFIG, LABEL_OWNER, Container, Death, State

T = TypeVar("T")
STOP_TIMEOUT = 5  # seconds Docker waits before SIGKILL
API_VERSION = "1.41"  # Docker 20.10 (Debian bookworm's docker.io); newer engines accept it


def _state(attrs: dict[str, Any]) -> State:
    status = str(attrs.get("State", {}).get("Status", "missing"))
    if status in ("running", "paused", "exited", "created"):
        return status  # type: ignore[return-value]
    if status in ("restarting",):
        return "running"
    return "exited" if status in ("dead", "removing") else "missing"


def _address(attrs: dict[str, Any]) -> str | None:
    settings = attrs.get("NetworkSettings", {})
    if settings.get("IPAddress"):
        return str(settings["IPAddress"])
    for network in (settings.get("Networks") or {}).values():
        if network.get("IPAddress"):
            return str(network["IPAddress"])
    return None


def started_at(attrs: dict[str, Any]) -> float | None:
    """``State.StartedAt`` ("2026-12-01T10:20:30.123456789Z") as unix time, while the
    container runs or is paused (``None`` otherwise, or when it cannot be read)."""
    state = attrs.get("State", {})
    if not (state.get("Running") or state.get("Paused")):
        return None
    text = str(state.get("StartedAt") or "")
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if match is None:
        return None
    whole, fraction, zone = match.groups()
    try:
        stamp = datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone))
    except ValueError:
        return None
    return stamp.timestamp() + float(f"0.{fraction or 0}")


def _inner(attrs: dict[str, Any]) -> Step | None:
    """The container's own published port ("22/tcp" in ``HostConfig.PortBindings``)."""
    for key in attrs.get("HostConfig", {}).get("PortBindings") or {}:
        port, _, proto = str(key).partition("/")
        if port.isdigit() and proto in ("tcp", "udp"):
            return Step(int(port), proto)  # type: ignore[arg-type]
    return None


def _when(event: dict[str, Any]) -> float | None:
    """An event's time as unix time: ``timeNano`` (ns), else ``time`` (s)."""
    for key, scale in (("timeNano", 1e-9), ("time", 1.0)):
        value = event.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return float(value) * scale
    return None


class DockerDeaths:
    """Docker's event stream, filtered to the ends of one owner's containers."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[Death]:
        try:
            for event in self.stream:
                attributes = (event.get("Actor") or {}).get("Attributes") or {}
                yield Death(str(attributes.get(LABEL, "")), str(event.get("id", "")), _when(event))
        except Exception as error:  # requests / urllib3 errors when the engine goes away
            raise ContainerError(f"docker: event stream: {error}") from None

    def close(self) -> None:
        self.stream.close()


def docker_client() -> Any:
    """A Docker SDK client. No connection is made here (a fixed API version: the client
    does not ask the engine at creation): an engine that is down fails each call later."""
    import docker

    try:
        return docker.from_env(version=API_VERSION, timeout=30)
    except Exception as error:
        raise ContainerError(f"docker: cannot create a client: {error}") from None


def docker_present() -> bool:
    """Whether a Docker engine is configured here: ``DOCKER_HOST`` set, or the default
    socket present (label-gated containers are then followed)."""
    import os

    return bool(os.environ.get("DOCKER_HOST")) or os.path.exists("/var/run/docker.sock")


def docker_call(what: str, action: Callable[[], T]) -> T:
    """Run one Docker call; any failure becomes a ContainerError naming ``what``."""
    try:
        return action()
    except Exception as error:  # docker.errors.*, requests.*, OSError
        raise ContainerError(f"docker: {what}: {error}") from None


class DockerRuntime:
    def __init__(self, client: Any = None) -> None:
        """An engine that is down now fails each call later (no grant, a clear log line)
        and is used again once it is back."""
        self.client = docker_client() if client is None else client

    def _wrap(self, raw: Any) -> Container:
        attrs = raw.attrs
        labels = dict(attrs.get("Config", {}).get("Labels") or {})
        health = (attrs.get("State", {}).get("Health") or {}).get("Status")
        return Container(
            id=raw.id,
            name=raw.name,
            service=labels.get(LABEL, ""),
            state=_state(attrs),
            address=_address(attrs),
            labels=labels,
            health=health,
            started_at=started_at(attrs),
            inner=_inner(attrs),
        )

    def owned(self, owner: str) -> list[Container]:
        found = docker_call(
            "list containers",
            lambda: self.client.containers.list(
                all=True, filters={"label": [f"{LABEL_OWNER}={owner}"]}
            ),
        )
        return [self._wrap(raw) for raw in found]

    def create(self, service: Service, owner: str, config_hash: str) -> Container:
        if service.build is not None:
            self.ensure_image(service)
        kwargs: dict[str, Any] = {
            "name": f"knockgate-{service.name}",
            "detach": True,
            "labels": {LABEL: service.name, LABEL_OWNER: owner, LABEL_CONFIG: config_hash},
            "environment": dict(service.environment),
            "ports": {f"{service.container_port}/{service.proto}": service.host_port},
        }
        if service.volumes:
            kwargs["volumes"] = list(service.volumes)
        if service.command is not None:
            kwargs["command"] = list(service.command)
        self._remove_by_name(kwargs["name"], owner)
        raw = docker_call(
            f"create {service.name}",
            lambda: self.client.containers.create(service.image, **kwargs),
        )
        return self._wrap(raw)

    def _remove_by_name(self, name: str, owner: str) -> None:
        """A stale container of ours with the same name would block the create."""
        for raw in docker_call(
            "list", lambda: self.client.containers.list(all=True, filters={"name": f"^{name}$"})
        ):
            labels = raw.attrs.get("Config", {}).get("Labels") or {}
            if labels.get(LABEL_OWNER) == owner:
                docker_call(f"remove {name}", partial(raw.remove, force=True, v=True))
            else:
                raise ContainerError(
                    f"docker: a container named {name} exists and is not knockgate's: "
                    "rename it or remove it"
                )

    def ensure_image(self, service: Service) -> None:
        def present() -> bool:
            try:
                self.client.images.get(service.image)
                return True
            except Exception:
                return False

        if present() or service.build is None:
            return
        docker_call(
            f"build {service.image} from {service.build}",
            lambda: self.client.images.build(path=service.build, tag=service.image, rm=True),
        )

    def _raw(self, container: Container) -> Any:
        return docker_call(
            f"inspect {container.name}", lambda: self.client.containers.get(container.id)
        )

    def start(self, container: Container) -> None:
        raw = self._raw(container)
        docker_call(f"start {container.name}", raw.start)

    def pause(self, container: Container) -> None:
        raw = self._raw(container)
        docker_call(f"pause {container.name}", raw.pause)

    def unpause(self, container: Container) -> None:
        raw = self._raw(container)
        docker_call(f"unpause {container.name}", raw.unpause)

    def stop(self, container: Container) -> None:
        raw = self._raw(container)
        docker_call(f"stop {container.name}", lambda: raw.stop(timeout=STOP_TIMEOUT))

    def remove(self, container: Container) -> None:
        raw = self._raw(container)
        docker_call(f"remove {container.name}", lambda: raw.remove(force=True, v=True))

    def deaths(self, owner: str) -> DockerDeaths:
        """``die`` and ``stop`` end a run; ``destroy`` (a container removed, also by hand
        with `docker rm -f`) is followed too, so a removal is never missed."""
        filters = {
            "label": [f"{LABEL_OWNER}={owner}"],
            "type": "container",
            "event": ["die", "stop", "destroy"],
        }
        stream = docker_call(
            "follow events", lambda: self.client.events(filters=filters, decode=True)
        )
        return DockerDeaths(stream)

    def refresh(self, container: Container) -> Container:
        try:
            raw = self.client.containers.get(container.id)
        except Exception as error:
            if type(error).__name__ == "NotFound":
                container.state = "missing"
                return container
            raise ContainerError(f"docker: inspect {container.name}: {error}") from None
        return self._wrap(raw)
