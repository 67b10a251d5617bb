"""The launcher's catalogue: read at its start and on its SIGHUP only, and never a
service that bind-mounts what would hand out the host (review finding 1)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from appliance.config.schema import Service
from appliance.services.broker import Broker, Catalogue, forbidden_volume
from appliance.services.launcher import config_hash
from tests.unit.test_launcher_rpc import OWNER, FakeEngine

WEB = Service("web", "kg-web:local", 80, 8080)


@pytest.mark.parametrize(
    "volume",
    [
        "/:/host",
        "//:/host",
        "/var/run/docker.sock:/var/run/docker.sock",
        "/run/docker.sock:/d.sock",
        "/srv/kg/docker.sock:/d.sock:ro",
        "/proc:/p",
        "/sys/fs/cgroup:/c:ro",
        "/dev/sda:/disk",
        "/etc:/e:ro",
        "/etc/shadow:/s:ro",
        "/etc/../etc:/e",
        "/var:/v",
        "/var/lib:/v",
        "/var/lib/docker/overlay2:/o",
        "/root/.ssh:/keys",
        "/usr/bin:/b",
    ],
)
def test_host_giving_bind_sources_are_refused(volume: str) -> None:
    assert forbidden_volume(volume) is not None


@pytest.mark.parametrize(
    "volume",
    [
        "kg-data:/data",
        "knockgate-ssh-keys:/keys:ro",
        "/srv/www:/usr/share/www:ro",
        "/home/kg/site:/site",
        "/var/lib/kg-app:/data",
        "/opt/kg:/kg",
    ],
)
def test_named_volumes_and_plain_host_paths_are_fine(volume: str) -> None:
    assert forbidden_volume(volume) is None


def _yaml(image: str, volume: str | None = None) -> str:
    volumes = f", volumes: ['{volume}']" if volume else ""
    return f"services:\n  web: {{image: {image}, container_port: 80, host_port: 8080{volumes}}}\n"


def test_the_catalogue_changes_only_on_reload_and_a_bad_file_keeps_the_last(
    tmp_path: Path,
) -> None:
    config = tmp_path / "kg.yaml"
    config.write_text(_yaml("kg-web:local"))
    catalogue = Catalogue(str(config))
    assert catalogue() == {}
    assert catalogue.reload()
    first = catalogue()
    assert first["web"].image == "kg-web:local"
    config.write_text(_yaml("kg-evil:local", "/:/host"))  # rewritten behind its back
    assert catalogue() == first
    config.write_text("services: [")
    assert not catalogue.reload()
    assert catalogue() == first
    config.write_text(_yaml("kg-web:2"))
    assert catalogue.reload() and catalogue()["web"].image == "kg-web:2"


def test_create_of_a_service_mounting_the_docker_socket_is_refused() -> None:
    bad = dataclasses.replace(WEB, volumes=("/var/run/docker.sock:/var/run/docker.sock",))
    engine = FakeEngine()
    b = Broker(engine, OWNER, lambda: {"web": bad})
    request = {"verb": "create", "service": "web", "owner": OWNER, "config_hash": config_hash(bad)}
    reply, _ = b.answer(json.dumps(request).encode() + b"\n")
    assert reply["ok"] is False and "refused create of service web" in reply["error"]
    assert "engine's socket" in reply["error"]
    assert engine.containers == {}
