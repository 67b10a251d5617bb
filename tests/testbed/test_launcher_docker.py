"""The launcher (``knockgate launcher``'s server) against a real Docker engine, through
``RemoteRuntime`` over its Unix socket:

- a container that is neither knockgate's nor labelled (named kg-... like ours, but with
  no label) is refused for start, stop, inspect, refresh and remove, and stays as it was;
- a labelled container (``knockgate.door``) is started, inspected and stopped, never removed;
- a catalogue service is created by name (the launcher reads the config file), started,
  its death is streamed, and it is removed.

Run under ``flock /tmp/kg-testbed.lock`` with a Docker engine from
``eval "$(testbed/setup-docker.sh)"``. Everything made here is named kg-launcher-test-* (the
catalogue container knockgate-kgltest, with this test's own owner label) and removed
afterwards, even on failure. No traffic is sent.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.errors import ContainerError
from appliance.services.broker import Broker, DockerEngine, LauncherServer, read_catalogue
from appliance.services.launcher import config_hash
from appliance.services.remote import RemoteRuntime
from appliance.services.runtime import LABEL_OWNER, Container, owner_of
from tests.integration.conftest import require

pytestmark = pytest.mark.testbed

DOCKER = os.environ.get("KG_DOCKER", "/usr/bin/docker")
IMAGE = "debian:bookworm-slim"
PREFIX = "kg-launcher-test"
STRANGER, APP = f"{PREFIX}-stranger", f"{PREFIX}-app"
CONFIG = f"""\
services:
  kgltest:
    image: {IMAGE}
    container_port: 80
    host_port: 18381
    command: [sleep, infinity]
doors:
  kgltest:
    knock: {{sequence: [7001, 7002, 7003]}}
    service: kgltest
"""


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=60, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


def engine_answers() -> bool:
    try:
        return docker("version", "--format", "{{.Server.Version}}", check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def state(name: str) -> str:
    return docker("inspect", "-f", "{{.State.Status}}", name).stdout.strip()


def remove_ours(owner: str) -> None:
    ids = docker("ps", "-aq", "--filter", f"name=^{PREFIX}-", check=False).stdout.split()
    ids += docker(
        "ps", "-aq", "--filter", f"label={LABEL_OWNER}={owner}", check=False
    ).stdout.split()
    if ids:
        docker("rm", "-f", "-v", *ids, check=False)


def container(name: str) -> Container:
    ident = docker("inspect", "-f", "{{.Id}}", name).stdout.strip()
    return Container(ident, name, "", "created")


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[tuple[RemoteRuntime, str]]:
    require(engine_answers(), "needs a Docker engine (testbed/setup-docker.sh)")
    require(docker("image", "inspect", IMAGE, check=False).returncode == 0, f"needs {IMAGE}")
    config = tmp_path / "kg-launcher.yaml"
    config.write_text(CONFIG)
    owner = owner_of(str(config))
    remove_ours(owner)
    server = LauncherServer(
        Broker(DockerEngine(), owner, lambda: read_catalogue(str(config))),
        str(tmp_path / "kg-launcher.sock"),
    )
    server.bind()
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        for name, labels in ((STRANGER, []), (APP, ["--label", "knockgate.door=web"])):
            docker("create", "--name", name, *labels, IMAGE, "sleep", "infinity")
        yield RemoteRuntime(server.path), str(config)
    finally:
        server.close()
        thread.join(5)
        remove_ours(owner)


def test_a_container_neither_ours_nor_labelled_is_refused(
    launcher: tuple[RemoteRuntime, str],
) -> None:
    remote, _ = launcher
    stranger = container(STRANGER)
    for call in (remote.start, remote.stop, remote.pause, remote.remove, remote.refresh):
        with pytest.raises(ContainerError, match=f"refused .* of container {STRANGER}"):
            call(stranger)
    with pytest.raises(ContainerError, match="refused inspect"):
        remote.inspect(stranger.id)
    assert state(STRANGER) == "created"  # untouched


def test_a_labelled_container_is_started_and_stopped_never_removed(
    launcher: tuple[RemoteRuntime, str],
) -> None:
    remote, _ = launcher
    app = container(APP)
    assert APP in [f.name for f in remote.labelled()]
    remote.start(app)
    assert state(APP) == "running"
    facts = remote.inspect(app.id)
    assert facts is not None and facts.label_map["knockgate.door"] == "web"
    assert remote.refresh(app).state == "running"
    remote.stop(app)
    assert state(APP) == "exited"
    with pytest.raises(ContainerError, match="only knockgate's own containers are removed"):
        remote.remove(app)
    assert state(APP) == "exited"


def test_a_catalogue_service_is_created_by_name_and_followed(
    launcher: tuple[RemoteRuntime, str],
) -> None:
    remote, config = launcher
    owner = owner_of(config)
    service = read_catalogue(config)["kgltest"]
    deaths = remote.deaths(owner)
    try:
        made = remote.create(service, owner, config_hash(service))
        assert made.labels[LABEL_OWNER] == owner and made.service == "kgltest"
        remote.start(made)
        assert remote.refresh(made).state == "running"
        assert [c.name for c in remote.owned(owner)] == ["knockgate-kgltest"]
        remote.stop(made)
        death = next(iter(deaths))
        assert (death.service, death.container) == ("kgltest", made.id)
    finally:
        deaths.close()
    remote.remove(made)
    assert remote.refresh(made).state == "missing"
