"""``knockgate uninstall``: remove what the appliance leaves behind after ``docker compose down``.

The service containers knockgate created (label ``knockgate.owner`` = this installation's
owner id, the hash of its config path; nobody else's), the volumes they mounted (unless
another container still uses one: ``docker compose down -v`` removes the appliance's own),
and knockgate's firewall (the nftables table ``inet knockgate``, or the iptables chains and
ipsets), which otherwise keeps answering on the protected ports with resets.

It refuses while an appliance runs (a running daemon would relaunch services and rebuild
its firewall). Each step is guarded: one failure never leaves the rest undone; what failed
is reported at the end (exit 1).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from appliance.errors import ContainerError, KnockgateError
from appliance.services.docker_runtime import docker_call, docker_client
from appliance.services.runtime import LABEL, LABEL_OWNER, owner_of

__all__ = ["DockerEngine", "Firewall", "UninstallError", "host_firewalls", "owner_of", "uninstall"]

ENTRYPOINT = "/usr/local/bin/knockgate-entrypoint"  # the appliance image's (Dockerfile)


@dataclass(frozen=True)
class Owned:
    id: str
    name: str
    service: str
    volumes: tuple[str, ...]  # the named volumes it mounts


class Engine(Protocol):
    def running_appliances(self) -> list[str]:
        """Names of running appliance containers (the entrypoint without arguments)."""
        ...

    def owned(self, owner: str) -> list[Owned]: ...

    def remove(self, container: Owned) -> None: ...

    def remove_volume(self, name: str) -> str | None:
        """Remove a volume; the reason it was kept (in use), or None when it is gone."""
        ...


@dataclass(frozen=True)
class Firewall:
    name: str  # what it removes, for the report
    present: Callable[[], bool]
    teardown: Callable[[], None]


class UninstallError(KnockgateError):
    """Some steps failed; the others ran."""


def uninstall(
    engine: Engine, firewalls: list[Firewall], owner: str, keep_volumes: bool = False
) -> list[str]:
    """Remove it all; the report, one line per thing removed or kept."""
    running = engine.running_appliances()
    if running:
        raise UninstallError(
            f"the appliance is running ({', '.join(running)}): stop it first "
            "(docker compose down), then run uninstall again"
        )
    report: list[str] = []
    errors: list[str] = []
    volumes: list[str] = []
    try:
        containers = engine.owned(owner)
    except KnockgateError as error:
        errors.append(str(error))
        containers = []
    for container in containers:
        try:
            engine.remove(container)
            report.append(f"removed container {container.name} (service {container.service})")
            volumes += [v for v in container.volumes if v not in volumes]
        except KnockgateError as error:
            errors.append(str(error))
    if not containers:
        report.append(f"no service container of owner {owner}")
    for volume in volumes:
        if keep_volumes:
            report.append(f"kept volume {volume} (--keep-volumes)")
            continue
        try:
            kept = engine.remove_volume(volume)
        except KnockgateError as error:
            errors.append(str(error))
            continue
        report.append(
            f"removed volume {volume}" if kept is None else f"kept volume {volume}: {kept}"
        )
    for firewall in firewalls:
        try:
            if firewall.present():
                firewall.teardown()
                report.append(f"removed {firewall.name}")
            else:
                report.append(f"no {firewall.name}")
        except Exception as error:  # each step guarded: the rest still runs
            errors.append(f"{firewall.name}: {error}")
    if errors:
        raise UninstallError("uninstall incomplete: " + "; ".join(errors))
    return report


class DockerEngine:
    """The Docker SDK behind :class:`Engine`."""

    def __init__(self, client: Any = None) -> None:
        self.client = docker_client() if client is None else client

    def running_appliances(self) -> list[str]:
        found = docker_call("list containers", lambda: self.client.containers.list())
        names = []
        for raw in found:
            config = raw.attrs.get("Config", {})
            if (config.get("Entrypoint") or []) == [ENTRYPOINT] and not config.get("Cmd"):
                names.append(str(raw.name))
        return names

    def owned(self, owner: str) -> list[Owned]:
        found = docker_call(
            "list containers",
            lambda: self.client.containers.list(
                all=True, filters={"label": [f"{LABEL_OWNER}={owner}"]}
            ),
        )
        return [
            Owned(
                id=raw.id,
                name=raw.name,
                service=(raw.attrs.get("Config", {}).get("Labels") or {}).get(LABEL, ""),
                volumes=tuple(
                    mount["Name"]
                    for mount in raw.attrs.get("Mounts") or []
                    if mount.get("Type") == "volume" and mount.get("Name")
                ),
            )
            for raw in found
        ]

    def remove(self, container: Owned) -> None:
        raw = docker_call(
            f"inspect {container.name}", lambda: self.client.containers.get(container.id)
        )
        docker_call(f"remove {container.name}", lambda: raw.remove(force=True, v=True))

    def remove_volume(self, name: str) -> str | None:
        import docker.errors

        try:
            volume = self.client.volumes.get(name)
        except docker.errors.NotFound:
            return None  # an anonymous volume, gone with its container
        except Exception as error:
            raise ContainerError(f"docker: inspect volume {name}: {error}") from None
        users = docker_call(
            "list containers",
            lambda: self.client.containers.list(all=True, filters={"volume": name}),
        )
        if users:
            using = ", ".join(str(raw.name) for raw in users)
            return f"in use by {using} (docker compose down -v removes the appliance's own)"
        docker_call(f"remove volume {name}", volume.remove)
        return None


def host_firewalls() -> list[Firewall]:
    """knockgate's nftables table and iptables chains/sets, where those tools exist."""
    found: list[Firewall] = []
    if shutil.which("nft"):
        from appliance.firewall.nftables import NftablesBackend

        nft = NftablesBackend()
        found.append(Firewall("nftables table inet knockgate", nft.installed, nft.teardown))
    if shutil.which("iptables"):
        from appliance.firewall.iptables import IptablesBackend

        backend = IptablesBackend()
        found.append(
            Firewall(
                "iptables chains and ipsets of knockgate (any there were)",
                lambda: True,
                backend.teardown,
            )
        )
    return found
