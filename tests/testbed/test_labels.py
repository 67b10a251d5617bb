"""Label discovery against a real Docker engine: a container created with knockgate.*
labels is found (listing and events), a bad label becomes a problem naming the
container and the label, a removed container is reported removed.

Run under ``flock /tmp/kg-testbed.lock`` with a Docker engine from
``eval "$(testbed/setup-docker.sh)"``. Everything made here is named kg-labels-test-*
and removed afterwards, even on failure. No traffic is sent: the published port is
bound on 127.0.0.1 only and nothing connects to it.
"""

from __future__ import annotations

import os
import queue
import subprocess
import time
from collections.abc import Iterator

import pytest

from appliance.services.discovery import (
    Changed,
    Discovery,
    DiscoveryEvent,
    DockerLabelSource,
    Listed,
    Removed,
)
from appliance.services.labels import (
    Binding,
    GatedContainer,
    LabelProblem,
    Published,
    parse,
)
from tests.integration.conftest import require

pytestmark = pytest.mark.testbed

DOCKER = os.environ.get("KG_DOCKER", "/usr/bin/docker")
IMAGE = "debian:bookworm-slim"
PREFIX = "kg-labels-test"
GOOD, BAD = f"{PREFIX}-good", f"{PREFIX}-bad"
HOST_PORT = 18_380  # on 127.0.0.1
DOORS = frozenset({"web"})
WAIT = 20.0


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


def remove_ours() -> None:
    ids = docker("ps", "-aq", "--filter", f"name=^{PREFIX}-", check=False).stdout.split()
    if ids:
        docker("rm", "-f", "-v", *ids, check=False)


@pytest.fixture
def events() -> Iterator[queue.Queue[DiscoveryEvent]]:
    require(engine_answers(), "needs a Docker engine (testbed/setup-docker.sh)")
    require(docker("image", "inspect", IMAGE, check=False).returncode == 0, f"needs {IMAGE}")
    remove_ours()
    got: queue.Queue[DiscoveryEvent] = queue.Queue()
    discovery = Discovery(got.put)
    discovery.start()
    try:
        yield got
    finally:
        discovery.close()
        remove_ours()


def expect(
    got: queue.Queue[DiscoveryEvent], want: type, name: str, action: str = ""
) -> DiscoveryEvent:
    """The next event of type ``want`` about container ``name`` (others skipped)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            event = got.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if isinstance(event, Changed) and event.container.name == name:
            if want is Changed and (not action or event.action == action):
                return event
        elif (isinstance(event, Removed) and event.name == name and want is Removed) or (
            isinstance(event, Listed) and want is Listed
        ):
            return event
    raise AssertionError(f"no {want.__name__} {action} event for {name} within {WAIT} s")


def test_a_labelled_container_is_discovered_and_a_bad_label_is_a_problem(
    events: queue.Queue[DiscoveryEvent],
) -> None:
    listed = expect(events, Listed, "")
    assert isinstance(listed, Listed)
    assert not [f for f in listed.containers if f.name.startswith(PREFIX)]

    docker(
        "create", "--name", GOOD, "-p", f"127.0.0.1:{HOST_PORT}:80",
        "-l", "knockgate.door=web", "-l", "knockgate.ports=80", "-l", "knockgate.ready=tcp",
        "-l", "knockgate.start_on_knock=true", "-l", "knockgate.idle_timeout=120",
        IMAGE, "sleep", "60",
    )  # fmt: skip
    created = expect(events, Changed, GOOD, "create")
    assert isinstance(created, Changed) and created.container.state == "created"
    good = parse(created.container, DOORS)
    assert isinstance(good, GatedContainer), good
    assert good.ports == (Published(80, "tcp", (Binding("127.0.0.1", HOST_PORT),)),)
    assert (good.door, good.start_on_knock, good.idle_timeout) == ("web", True, 120.0)

    docker(
        "create", "--name", BAD, "-p", f"127.0.0.1:{HOST_PORT + 1}:80",
        "-l", "knockgate.door=web", "-l", "knockgate.start_on_knock=true",
        "-l", "knockgate.idle_timeout=5m", IMAGE, "sleep", "60",
    )  # fmt: skip
    created_bad = expect(events, Changed, BAD, "create")
    assert isinstance(created_bad, Changed)
    bad = parse(created_bad.container, DOORS)
    assert isinstance(bad, LabelProblem)
    assert bad.lines == (
        f'container {BAD}: label knockgate.idle_timeout="5m": expected seconds, a number',
    )

    docker("start", GOOD)
    started = expect(events, Changed, GOOD, "start")
    assert isinstance(started, Changed) and started.container.state == "running"

    docker("rm", "-f", GOOD)
    assert isinstance(expect(events, Removed, GOOD), Removed)

    # a fresh listing sees the remaining (bad) one, with its labels
    names = [f.name for f in DockerLabelSource().labelled()]
    assert BAD in names and GOOD not in names
