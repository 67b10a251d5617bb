"""The appliance's signals and log under Compose (the testbed of test_testbed.py).

The container's PID 1 is compose/entrypoint.sh: ``docker compose kill -s HUP appliance``
must reach knockgate as a reload in place (same pid, the new config in force, service
containers untouched), not supervisord's own SIGHUP (which restarts every program);
``docker compose restart`` must stop knockgate gracefully within stop_grace_period; an
orphan re-parented to PID 1 is reaped. ``docker compose config`` shows the json-file log
rotation of the appliance (testbed/compose.yaml and compose/docker-compose.yml).

The testbed's appliance reads testbed/config/knockgate.yaml read-only; here it is recreated
with a writable copy mounted in its place (a Compose override file), so the test can edit
the config the appliance runs with.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.testbed.test_testbed import (  # the module-scoped testbed fixture comes along
    APPLIANCE_CONFIG,
    BRIDGE,
    CLIENT,
    COMPOSE_FILE,
    OTHER,
    OWNER,
    REPO,
    SSH_PORT,
    WEB_KNOCK,
    WEB_PORT,
    Testbed,
    docker,
    grant_for,
    prerequisites,
    testbed,  # noqa: F401 (a fixture)
)

pytestmark = pytest.mark.testbed

OLD_SSH_KNOCK = "sequence: [41873, 39211/udp, 45007]"
NEW_SSH_KNOCK = "sequence: [44021, 38817/udp, 46133]"
NEW_SSH_STEPS = ("44021:tcp", "38817:udp", "46133:tcp")
OLD_SSH_STEPS = ("41873:tcp", "39211:udp", "45007:tcp")
GRACE = 10.0  # the appliance's stop_grace_period in testbed/compose.yaml
LOG_OPTIONS = {"driver": "json-file", "options": {"max-size": "10m", "max-file": "3"}}


@dataclass
class Appliance:
    """The testbed with its appliance reading ``config`` (writable) instead of the repo's."""

    bed: Testbed
    config: Path
    override: Path

    def compose(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "KGTB_DOCKER_HOST"}
        files = ["-f", str(COMPOSE_FILE), "-f", str(self.override)]
        return docker("compose", *files, "-p", self.bed.project, *args, env=env, timeout=timeout)

    def status(self) -> dict[str, Any]:
        proc = self.bed.exec("appliance", "knockgate", "status", "--config", APPLIANCE_CONFIG)
        assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{self.bed.log_tail()}"
        as_json = ["knockgate", "status", "--json", "--config", APPLIANCE_CONFIG]
        data: dict[str, Any] = json.loads(self.bed.exec("appliance", *as_json, check=True).stdout)
        assert proc.stdout.startswith(f"knockgate pid {data['pid']},"), proc.stdout
        return data

    def container_of(self, service: str) -> str | None:
        """The id of ``service``'s running container, launched by our appliance."""
        proc = docker(
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            f"label=knockgate.owner={OWNER}",
            "--filter",
            f"label=knockgate.service={service}",
            "--filter",
            "status=running",
            check=False,
        )
        ids = proc.stdout.split()
        return ids[0] if len(ids) == 1 else None


@pytest.fixture(scope="module")
def appliance(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:  # noqa: F811
    workdir = tmp_path_factory.mktemp("kg-signals")
    config = workdir / "knockgate.yaml"
    config.write_text((REPO / "testbed" / "config" / "knockgate.yaml").read_text())
    config.chmod(0o644)
    override = workdir / "compose.override.yaml"
    # Compose merges volumes by target: this mount replaces the read-only one.
    override.write_text(
        f"services:\n  appliance:\n    volumes:\n      - {config}:{APPLIANCE_CONFIG}\n"
    )
    running = Appliance(testbed, config, override)
    running.compose("up", "-d", "--no-build", "--no-deps", "appliance")
    try:
        testbed.wait_capturing(before=0)  # a new container: its log starts empty
        yield running
    finally:  # the appliance as the testbed defines it, for whatever runs next
        testbed.compose("up", "-d", "--no-build", "--no-deps", "appliance")


def compose_config(*files: Path) -> dict[str, Any]:
    args = [arg for file in files for arg in ("-f", str(file))]
    proc = docker("compose", *args, "config", "--format", "json")
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def test_compose_config_bounds_the_appliance_log() -> None:
    prerequisites()
    testbed_services = compose_config(COMPOSE_FILE)["services"]
    assert testbed_services["appliance"]["logging"] == LOG_OPTIONS
    deployed = compose_config(REPO / "compose" / "docker-compose.yml")["services"]
    assert deployed["knockgate"]["logging"] == LOG_OPTIONS
    # At the root, compose.yaml includes compose/docker-compose.yml: the same options.
    assert compose_config(REPO / "compose.yaml")["services"]["knockgate"]["logging"] == LOG_OPTIONS


def test_running_appliance_has_the_log_options(appliance: Appliance) -> None:
    inspected = docker("inspect", "-f", "{{json .HostConfig.LogConfig}}", appliance.bed.appliance)
    log_config = json.loads(inspected.stdout)
    assert log_config == {"Type": "json-file", "Config": {"max-file": "3", "max-size": "10m"}}


def test_hup_reloads_in_place_and_keeps_running_services(appliance: Appliance) -> None:
    bed = appliance.bed
    before = appliance.status()
    spawned = bed.count_log(r"spawned: 'knockgate'")
    started = bed.count_log(r"starting up, listening on")
    reloads = bed.count_log(r"configuration reloaded")
    # A running service container, launched through the old config.
    bed.knockd_knock(*WEB_KNOCK)
    bed.wait(f"HTTP 200 on {WEB_PORT}", lambda: bed.http(WEB_PORT)[0] == 200, 20)
    web = appliance.container_of("web")
    assert web is not None, bed.states()

    text = appliance.config.read_text()
    assert OLD_SSH_KNOCK in text
    appliance.config.write_text(text.replace(OLD_SSH_KNOCK, NEW_SSH_KNOCK))  # same inode
    appliance.compose("kill", "-s", "HUP", "appliance")
    bed.wait_log(r"configuration reloaded: 5 door\(s\)", 10, after=reloads)

    after = appliance.status()
    assert after["pid"] == before["pid"], "knockgate was restarted, not reloaded"
    assert after["uptime"] > before["uptime"]
    assert bed.count_log(r"spawned: 'knockgate'") == spawned  # supervisord restarted nothing
    assert bed.count_log(r"starting up, listening on") == started
    assert bed.count_log(r"nothing reloaded") == 0
    # The service launched before the reload runs on, the same container, still answering.
    assert appliance.container_of("web") == web
    assert bed.http(WEB_PORT)[0] == 200

    # The old knock opens nothing; the new one opens ssh.
    bed.knockd_knock(*OLD_SSH_STEPS, who="other")
    bed.knockd_knock(*NEW_SSH_STEPS)
    bed.wait("ssh login after the new knock", bed.ssh, 30)
    assert bed.count_log(rf"{re.escape(CLIENT)}: ssh: OPEN SESAME") >= 1
    assert bed.count_log(rf"{re.escape(OTHER)}: ssh: OPEN SESAME") == 0
    assert grant_for(OTHER, SSH_PORT) is None
    assert bed.connect("other", SSH_PORT) == "refused"


def test_orphans_of_pid_1_are_reaped(appliance: Appliance) -> None:
    bed = appliance.bed
    # The exec'd shell exits at once; its two children are re-parented to PID 1.
    docker("exec", "-d", bed.appliance, "sh", "-c", "sleep 0.5 & sleep 1 & exit 0")
    listing = (
        "for p in /proc/[0-9]*; do "
        'echo "${p#/proc/} $(sed -n "s/^PPid:\\t//p;s/^State:\\t\\(.\\).*/\\1/p" $p/status '
        '| tr "\\n" " ")$(tr "\\0" " " < $p/cmdline)"; done 2>/dev/null'
    )

    def processes() -> list[str]:
        return bed.exec("appliance", "sh", "-c", listing, check=True).stdout.splitlines()

    orphans = bed.wait(
        "the sleeps re-parented to PID 1",
        lambda: [p for p in processes() if re.fullmatch(r"\d+ \w 1 sleep .*", p)],
        5,
        every=0.1,
    )
    assert len(orphans) == 2, processes()
    time.sleep(2)
    left = [p for p in processes() if re.fullmatch(r"\d+ Z .*|\d+ \w 1 sleep .*", p)]
    assert left == [], processes()


def test_restart_stops_knockgate_gracefully_within_the_grace_period(
    appliance: Appliance,
) -> None:
    bed = appliance.bed
    starts = bed.count_log(rf"{BRIDGE}: capturing")
    stops = bed.count_log(r"stopped; grants left in place expire at their own deadline")
    exits = bed.count_log(r"knockgate-entrypoint: supervisord exited with status 0")
    began = time.monotonic()
    appliance.compose("restart", "appliance", timeout=GRACE + 60)
    took = time.monotonic() - began
    assert took < GRACE, f"restart took {took:.1f} s (stop_grace_period {GRACE:g} s)"
    # knockgate's own shutdown ran to its end, then supervisord's, then PID 1's.
    assert bed.count_log(r"stopped; grants left in place") == stops + 1, bed.log_tail()
    assert bed.count_log(r"supervisord exited with status 0") == exits + 1, bed.log_tail()
    bed.wait_capturing(before=starts)
    assert appliance.status()["config"] == APPLIANCE_CONFIG
