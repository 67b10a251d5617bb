"""Label-gated containers end to end: a user's own compose project (a web app and its
"database", both the testbed's plain web image, never built by knockgate), gated by
labels, with the real daemon on the host network and real clients on the project's own
bridge (198.18.90.0/24).

1. the bad-labelled container runs and stays closed (reset) to everyone; its problem is
   logged once and shown by ``knockgate status``;
2. the app is closed to everyone while stopped; a knock starts its group in order (the
   database first) and opens the app's host port for the knocker only; the other
   client is refused, on the host port and on the app's own address;
3. once the grant has expired and nobody connects, the group is stopped (idle_timeout),
   in reverse order.

Twice: with the daemon reaching Docker itself, and as in the appliance, only through
``knockgate launcher`` (the containers' facts, addresses included, cross its socket).

Run under ``flock /tmp/kg-testbed.lock`` with a Docker engine from
``eval "$(testbed/setup-docker.sh)"``, as root. Everything is named kg-lbl*: the Compose
project, its network and bridge, the daemon's files; all removed afterwards (``compose
down``, ``knockgate teardown``), even on failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import require
from tests.testbed.test_testbed import CONNECT, compose_v2, engine_answers, run, wait_for

pytestmark = pytest.mark.testbed

DOCKER = os.environ.get("KG_DOCKER", "/usr/bin/docker")
KNOCKGATE = str(Path(sys.executable).parent / "knockgate")
WEB_IMAGE = "knockgate/web:local"
CLIENT_IMAGE = "knockgate/testbed-client:local"
BRIDGE = "kglbl0"
GATEWAY = "198.18.90.1"
CLIENT, OTHER = "198.18.90.10", "198.18.90.11"
APP_PORT, BAD_PORT = 18480, 18481
KNOCK = ("7101", "7102", "7103")
GRANT = 5  # seconds a knock grants
IDLE = 3  # the app's idle_timeout

CONFIG = f"""\
interfaces: [{BRIDGE}]
log: {{format: text, level: info}}
firewall:
  backend: nftables
  scan: {{ports: 12, window: 2, hold: 5}}
on_shutdown: keep
doors:
  web:
    knock: {{sequence: [{", ".join(KNOCK)}], seq_timeout: 5}}
    open: {{duration: {GRANT}}}
"""


def compose_file(group: str) -> str:
    return f"""\
services:
  db:
    image: {WEB_IMAGE}
    labels:
      knockgate.group: {group}
    networks: [net]
  app:
    image: {WEB_IMAGE}
    depends_on: [db]
    ports: ["{APP_PORT}:80"]
    labels:
      knockgate.door: web
      knockgate.start_on_knock: "true"
      knockgate.idle_timeout: "{IDLE}"
      knockgate.ready: http
      knockgate.group: {group}
    networks: [net]
  bad:
    image: {WEB_IMAGE}
    ports: ["{BAD_PORT}:80"]
    labels:
      knockgate.door: web
      knockgate.idle_timeout: "5m"
    networks: [net]
  client:
    image: {CLIENT_IMAGE}
    init: true
    command: [sleep, infinity]
    networks: {{net: {{ipv4_address: {CLIENT}}}}}
  other:
    image: {CLIENT_IMAGE}
    init: true
    command: [sleep, infinity]
    networks: {{net: {{ipv4_address: {OTHER}}}}}
networks:
  net:
    driver: bridge
    driver_opts: {{com.docker.network.bridge.name: {BRIDGE}}}
    ipam: {{config: [{{subnet: 198.18.90.0/24, gateway: {GATEWAY}}}]}}
"""


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    return run([DOCKER, *args], check=check, timeout=timeout).stdout


@dataclass
class Bed:
    project: str
    group: str
    files: Path
    through_launcher: bool = False
    daemon: subprocess.Popen[bytes] | None = None
    launcher: subprocess.Popen[bytes] | None = None

    @property
    def compose(self) -> list[str]:
        return ["compose", "-p", self.project, "-f", str(self.files / "compose.yaml")]

    @property
    def socket(self) -> str:
        return str(self.files / "status.sock")

    @property
    def log(self) -> str:
        return (self.files / "daemon.log").read_text(errors="replace")

    def container(self, service: str) -> str:
        return f"{self.project}-{service}-1"

    def connect(self, who: str, address: str, port: int) -> str:
        proc = run(
            [DOCKER, "exec", self.container(who), "python3", "-c", CONNECT, address, str(port)],
            check=False,
        )
        return proc.stdout.strip() or f"exit {proc.returncode}: {proc.stderr.strip()}"

    def http(self, who: str, port: int) -> int:
        proc = run(
            [DOCKER, "exec", self.container(who), "curl", "-s", "-o", "/dev/null", "--max-time",
             "3", "-w", "%{http_code}", f"http://{GATEWAY}:{port}/"],
            check=False,
        )  # fmt: skip
        return int(proc.stdout) if proc.stdout.strip().isdigit() else 0

    def state(self, service: str) -> str:
        return docker("inspect", "-f", "{{.State.Status}}", self.container(service)).strip()

    def started(self, service: str) -> str:
        return docker("inspect", "-f", "{{.State.StartedAt}}", self.container(service)).strip()

    def status(self) -> dict[str, Any]:
        proc = run([KNOCKGATE, "status", "--socket", self.socket, "--json"], check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else {}

    def gated(self) -> dict[str, dict[str, Any]]:
        return {row["name"]: row for row in self.status().get("gated", [])}

    def tail(self) -> str:
        return "\n".join(self.log.splitlines()[-30:])


def start_daemon(bed: Bed) -> None:
    """The daemon reaching Docker itself, or (as in the appliance) only through
    ``knockgate launcher``."""
    config = bed.files / "knockgate.yaml"
    config.write_text(CONFIG)
    handle = (bed.files / "daemon.log").open("wb")
    through: list[str] = []
    if bed.through_launcher:
        sock = str(bed.files / "launcher.sock")
        bed.launcher = subprocess.Popen(
            [KNOCKGATE, "launcher", "--config", str(config), "--socket", sock],
            stdout=handle, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for("the launcher listens", lambda: os.path.exists(sock), 10)
        through = ["--launcher", sock]
    bed.daemon = subprocess.Popen(
        [KNOCKGATE, "run", "--config", str(config), "--status-socket", bed.socket,
         "--state-dir", str(bed.files / "state"), "--i-know", *through],
        stdout=handle, stderr=subprocess.STDOUT,
    )  # fmt: skip


def stop_daemon(bed: Bed) -> None:
    for proc in (bed.daemon, bed.launcher):
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture(params=["docker-in-process", "through-launcher"])
def bed(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Bed]:
    require(os.geteuid() == 0, "needs root (Docker engine, host nftables)")
    require(engine_answers() and compose_v2(), "needs Docker and Compose v2 (setup-docker.sh)")
    for image in (WEB_IMAGE, CLIENT_IMAGE):
        found = run([DOCKER, "image", "inspect", image], check=False).returncode == 0
        require(found, f"needs {image}")
    require(run(["nft", "list", "table", "inet", "knockgate"], check=False).returncode != 0,
            "the host's knockgate table is in use (another appliance runs)")  # fmt: skip
    tag = uuid.uuid4().hex[:8]
    bed = Bed(f"kg-lbl-{tag}", f"kglbl-{tag}", tmp_path, request.param == "through-launcher")
    (tmp_path / "compose.yaml").write_text(compose_file(bed.group))
    try:
        docker(*bed.compose, "up", "-d", "--no-build", "--pull", "never", timeout=300)
        docker(*bed.compose, "stop", "-t", "0", "app", "db")
        start_daemon(bed)
        yield bed
    finally:
        stop_daemon(bed)
        docker(*bed.compose, "down", "-v", "-t", "0", "--remove-orphans", check=False)
        run([KNOCKGATE, "teardown", "--config", str(tmp_path / "knockgate.yaml")], check=False)


def test_label_gated_group_opens_for_the_knocker_only_and_stops_when_idle(bed: Bed) -> None:
    app, bad = bed.container("app"), bed.container("bad")
    rows = wait_for(
        "the daemon shows both gated containers",
        lambda: (lambda g: g if app in g and bad in g else None)(bed.gated()),
        20,
        context=bed.tail,
    )
    # 1. a bad label: reported once, named, and the running container stays closed
    assert rows[bad]["state"] == "closed", rows[bad]
    assert rows[bad]["problems"] == [
        f'container {bad}: label knockgate.idle_timeout="5m": expected seconds, a number'
    ]
    assert bed.state("bad") == "running"
    for who in ("client", "other"):
        assert bed.connect(who, GATEWAY, BAD_PORT) == "refused"
    assert bed.log.count("label knockgate.idle_timeout") == 1, bed.tail()

    # 2. the app: closed while stopped, started on the knock (db first), open for the
    # knocker only
    assert rows[app]["state"] == "cold" and rows[app]["ports"] == [f"{APP_PORT}/tcp"]
    assert bed.state("app") == "exited" and bed.state("db") == "exited"
    assert bed.connect("client", GATEWAY, APP_PORT) == "refused"
    knocked = time.monotonic()
    run([DOCKER, "exec", bed.container("client"), "knock", GATEWAY, *KNOCK])
    wait_for("the knocker gets the app's page", lambda: bed.http("client", APP_PORT) == 200,
             20, every=0.1, context=bed.tail)  # fmt: skip
    took = time.monotonic() - knocked
    assert bed.started("db") < bed.started("app"), "the group starts in dependency order"
    assert bed.connect("other", GATEWAY, APP_PORT) == "refused"
    app_address = docker(
        "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", app
    ).strip()
    assert bed.connect("other", app_address, 80) == "refused"  # its own address too
    assert bed.gated()[app]["state"] == "serving"
    print(f"knock -> page for a stopped label-gated group: {took * 1000:.0f} ms")

    # 3. the grant expires, nobody connects: the group stops, the app first
    wait_for("the group is stopped once idle",
             lambda: bed.state("app") == "exited" and bed.state("db") == "exited",
             GRANT + IDLE + 20, every=0.5, context=bed.tail)  # fmt: skip
    assert bed.connect("client", GATEWAY, APP_PORT) == "refused"
    stopped = [line for line in bed.log.splitlines() if ": stopped (" in line]
    assert [app in stopped[0], bed.container("db") in stopped[1]] == [True, True], stopped
