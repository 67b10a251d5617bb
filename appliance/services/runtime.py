"""The container runtime protocol, and an in-memory fake for unit tests."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from appliance.config.schema import Service
from appliance.core.model import Step

State = Literal["running", "paused", "exited", "created", "missing"]

LABEL = "knockgate.service"  # every container knockgate creates carries it
LABEL_OWNER = "knockgate.owner"  # which knockgate installation (a stable id)
LABEL_CONFIG = "knockgate.config-hash"  # the service definition it was created from


def owner_of(config_path: str) -> str:
    """The ``knockgate.owner`` of an installation: a stable id of its config file's path
    (``run`` labels what it creates with it; ``uninstall`` removes only that)."""
    return hashlib.sha256(os.path.abspath(config_path).encode()).hexdigest()[:12]


@dataclass
class Container:
    id: str
    name: str
    service: str
    state: State
    address: str | None = None  # the container's address on its network
    labels: dict[str, str] = field(default_factory=dict)
    health: str | None = None
    started_at: float | None = None  # when it last started (unix time), while it runs
    inner: Step | None = None  # the container's own port (what its host port leads to)


@dataclass(frozen=True, slots=True)
class Death:
    """One ``die``/``stop`` event: ``at`` is Docker's time of it (unix time, ``None``
    when the event did not say)."""

    service: str
    container: str
    at: float | None = None


class Deaths(Protocol):
    """Docker's ``die``/``stop`` events of our containers, until :meth:`close` (from
    another thread) ends the iteration."""

    def __iter__(self) -> Iterator[Death]: ...

    def close(self) -> None: ...


class ContainerRuntime(Protocol):
    """What the launcher needs from Docker."""

    def owned(self, owner: str) -> list[Container]:
        """Every container labelled as created by ``owner``."""

    def create(self, service: Service, owner: str, config_hash: str) -> Container: ...

    def start(self, container: Container) -> None: ...

    def pause(self, container: Container) -> None: ...

    def unpause(self, container: Container) -> None: ...

    def stop(self, container: Container) -> None: ...

    def remove(self, container: Container) -> None: ...

    def refresh(self, container: Container) -> Container:
        """The container's current state, address and health."""

    def deaths(self, owner: str) -> Deaths:
        """Follow the ends of ``owner``'s containers (raises ContainerError when Docker
        cannot be asked; the iteration raises it when the stream breaks)."""
