"""Restarts keep sessions: a real ssh session through the ssh service container outlives a
``docker compose restart`` of the appliance and an upgrade of its image (the container is
recreated), and the service still stops later on its own rule (idle, once the session ends).

Uses the testbed of tests/testbed/test_testbed.py (its ``testbed`` fixture: one Compose
project, torn down even on failure). Run under ``flock /tmp/kg-testbed.lock``.
"""

from __future__ import annotations

import os
import time
import uuid

from tests.testbed.test_testbed import (  # noqa: F401  (testbed: the fixture)
    BRIDGE,
    DOCKER,
    GATEWAY,
    KEY,
    SSH_IDLE,
    SSH_PORT,
    Testbed,
    docker,
    grant_for,
    run,
    testbed,
)
from tests.testbed.test_testbed import CLIENT as CLIENT_ADDRESS

SESSION = "/tmp/kg-session"  # in the client container: .out (one line a second), .pid
ADOPTED = r"adopted container knockgate-ssh \(ssh, running\)"


def open_session(bed: Testbed) -> None:
    """A long ssh session from the client: the remote side prints a line every second."""
    ssh = (
        f"ssh -i {KEY} -p {SSH_PORT} -o BatchMode=yes -o StrictHostKeyChecking=no "
        f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR root@{GATEWAY} "
        "'while :; do date +%s; sleep 1; done'"
    )
    script = f"{ssh} > {SESSION}.out 2> {SESSION}.err & echo $! > {SESSION}.pid; wait"
    docker("exec", "-d", f"{bed.project}-client-1", "sh", "-c", script)


def session_lines(bed: Testbed) -> int:
    proc = bed.exec("client", "sh", "-c", f"cat {SESSION}.out 2>/dev/null | wc -l")
    return int(proc.stdout.strip() or 0)


def assert_session_alive(bed: Testbed, what: str) -> None:
    before = session_lines(bed)
    bed.wait(
        f"the ssh session still prints lines {what}",
        lambda: session_lines(bed) >= before + 2,
        8,
    )


def ssh_container() -> tuple[str, str]:
    """The one ssh service container of the testbed: (id, State.StartedAt)."""
    ids = docker(
        "ps", "-q", "--no-trunc", "--filter", "label=knockgate.service=ssh", check=False
    ).stdout.split()
    assert len(ids) == 1, f"ssh containers: {ids}"
    started = docker("inspect", "-f", "{{.State.StartedAt}}", ids[0]).stdout.strip()
    return ids[0], started


def appliance_id(bed: Testbed) -> str:
    return docker("inspect", "-f", "{{.Id}}", bed.appliance).stdout.strip()


def test_ssh_session_survives_restart_and_upgrade_then_stops_when_idle(
    testbed: Testbed,  # noqa: F811  (the fixture imported above)
) -> None:
    bed = testbed
    bed.wait_capturing(before=0)
    bed.ssh_up()
    open_session(bed)
    assert_session_alive(bed, "after it was opened")
    container = ssh_container()

    # 1. docker compose restart: SIGTERM, the daemon stops and starts in the same container.
    starts = bed.count_log(rf"{BRIDGE}: capturing")
    adopted = bed.count_log(ADOPTED)
    bed.compose("restart", "appliance")
    bed.wait_capturing(before=starts)
    bed.wait_log(ADOPTED, 15, after=adopted)
    assert bed.count_log(r"services left running for the next start \(on_shutdown: keep\)") >= 1
    assert ssh_container() == container, "the ssh container was restarted or replaced"
    assert_session_alive(bed, "after the appliance restarted")

    # 2. An image upgrade: a new image under the same tag, so `up -d` recreates the appliance.
    old = appliance_id(bed)
    upgrade = f"FROM knockgate:local\nLABEL knockgate.testbed.upgrade={uuid.uuid4().hex}\n"
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    run([DOCKER, "build", "-q", "-t", "knockgate:local", "-"], stdin=upgrade, env=env)
    bed.compose("up", "-d", "--no-build", "--no-deps", "appliance")
    assert appliance_id(bed) != old, "the appliance was not recreated"
    bed.wait_capturing(before=0)  # a new container: its log starts empty
    bed.wait_log(ADOPTED, 15)
    assert ssh_container() == container
    assert_session_alive(bed, "after the appliance was upgraded")
    # The ssh door's grant (10 s) is long over: the open session alone kept the service up.
    assert grant_for(CLIENT_ADDRESS, SSH_PORT) is None
    assert bed.running("ssh")

    # 3. The session ends: no grant, no connection, so it stops after idle_timeout.
    bed.exec("client", "sh", "-c", f"kill $(cat {SESSION}.pid)", check=True)
    ended = time.monotonic()
    bed.wait("ssh stopped once idle", lambda: not bed.running("ssh"), SSH_IDLE + 10, every=0.5)
    assert time.monotonic() - ended >= SSH_IDLE - 1, "stopped before its idle_timeout"
    assert bed.count_log(r"ssh: stopped \(idle for 5 s\)") >= 1
    assert bed.connect("client", SSH_PORT) == "refused"
