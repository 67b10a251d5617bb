"""The README's single-host fleet trial (Compose), run as a user would, but on volumes of its own.

``compose/docker-compose.yml`` names its volumes ``knockgate-config``, ``knockgate-ssh-keys``
and ``knockgate-state`` (and ``fleet-trial.yml`` ``knockgate-redis-data``): a real
installation's. So the trial runs as ``docker compose -p kgtrial<pid> -f
compose/docker-compose.yml -f compose/fleet-trial.yml -f OVERRIDE``, where OVERRIDE (in a
temporary directory) renames every volume ``kgtrial-<pid>-...`` and points the Redis password
secret at a file made as the README says (``install -m 0640 -g 64110``, ``openssl rand -hex
32``). ``docker compose config`` must show no other volume name: the module refuses to start
anything otherwise. It also refuses while another knockgate appliance runs, while a service
container of the default installation (``/etc/knockgate/knockgate.yaml``'s owner label)
exists, or while something listens on 127.0.0.1:6379 (the trial's Redis port).

Then the README's steps: ``up -d`` (the images built beforehand from this tree, BuildKit's cache:
seconds), wait for knockgate, ``config show`` + ``compose/fleet-trial.yaml`` -> ``config apply``,
``restart knockgate``. The generated configuration's ssh service mounts the Docker volumes
``knockgate-ssh-keys`` and ``knockgate-ssh-hostkeys``, a real installation's too: those two
names (and nothing else) are renamed to this run's in what is applied. Checked:

1. plain ``docker compose -f compose/docker-compose.yml config`` has no redis service and no
   secret (the trial file is opt-in);
2. ``knockgate status`` shows ``fleet trial: ... redis://knockgate@127.0.0.1:6379/0 reachable``;
3. Redis listens on 127.0.0.1:6379 only;
4. a client in a network namespace of its own (198.18.73.2, veth to the host's 198.18.73.1)
   knocks the generated ``ssh`` door (``knockgate knock HOST --door ssh --config FILE`` with
   the file ``config show`` printed): the grant for it on 2222/tcp is in knockgate's nftables
   set, the ssh service answers it there, and status shows ``published 1``.

Teardown, even after a failure, each step guarded: ``down -v`` of the project, the service
containers this appliance launched and this run's volumes, knockgate's nftables table, the
namespace and veth, the temporary files; then anything left fails the run. A killed earlier
run's project (``kgtrial<pid>`` of a dead pid) and volumes are removed first. Run under
``flock /tmp/kg-testbed.lock``; the module also takes the testbed's own lock.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.services.runtime import owner_of
from tests.integration.conftest import require
from tests.integration.netns import pid_alive
from tests.testbed.test_swarm_stack import appliance_running, lock_testbed
from tests.testbed.test_testbed import (
    DOCKER,
    REPO,
    docker,
    grant_for,
    nft_table_exists,
    prerequisites,
    run,
    wait_for,
)

pytestmark = pytest.mark.testbed

BASE_FILE = REPO / "compose" / "docker-compose.yml"
TRIAL_FILE = REPO / "compose" / "fleet-trial.yml"
FLEET_BLOCK = REPO / "compose" / "fleet-trial.yaml"
IMAGES = (
    ("knockgate:local", REPO, REPO / "Dockerfile"),
    ("knockgate-redis:local", REPO / "compose" / "redis", None),
    ("knockgate/ssh:local", REPO / "compose" / "services" / "ssh", None),
)
# The compose files' volume keys; their names there are a real installation's.
VOLUME_KEYS = ("knockgate-config", "knockgate-ssh-keys", "knockgate-state", "knockgate-redis-data")
# The Docker volumes the generated configuration's ssh service mounts (by name).
SERVICE_VOLUMES = ("knockgate-ssh-keys", "knockgate-ssh-hostkeys")
CONFIG = "/etc/knockgate/knockgate.yaml"  # the appliance's (compose: KNOCKGATE_CONFIG)
OWNER = owner_of(CONFIG)
REDIS_PORT = 6379
SSH_PORT = 2222  # the generated ssh service's host port
PASSWORD_GID = 64110  # knockgate-config in the image
NETNS = "kgtrial-client"
HOST_IF, NS_IF = "kgtrial-h", "kgtrial-n"
HOST_ADDRESS, CLIENT_ADDRESS = "198.18.73.1", "198.18.73.2"

BANNER = """\
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as sock:
        sock.settimeout(3)
        print(sock.recv(64).decode(errors="replace").strip() or "empty")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
except OSError as error:
    print("error", error)
"""


@dataclass
class Trial:
    pid: int
    workdir: Path
    isolated: bool = False  # docker compose config showed this run's volume names only

    @property
    def project(self) -> str:
        return f"kgtrial{self.pid}"

    @property
    def prefix(self) -> str:
        return f"kgtrial-{self.pid}-"

    @property
    def override(self) -> Path:
        return self.workdir / "override.yml"

    @property
    def password(self) -> Path:
        return self.workdir / "redis-password"

    @property
    def appliance(self) -> str:
        return f"{self.project}-knockgate-1"

    def compose(self, *args: str, check: bool = True, timeout: float = 120, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        files = ("-f", str(BASE_FILE), "-f", str(TRIAL_FILE), "-f", str(self.override))
        return docker(
            "compose", "-p", self.project, *files, *args,
            check=check, timeout=timeout, stdin=stdin,
        )  # fmt: skip

    def knockgate(self, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """``docker compose exec -T knockgate knockgate ARGV`` (the README's way)."""
        return self.compose("exec", "-T", "knockgate", "knockgate", *argv, check=False, stdin=stdin)

    def status(self) -> str | None:
        proc = self.knockgate("status")
        return proc.stdout if proc.returncode == 0 else None

    def logs(self) -> str:
        proc = docker("logs", self.appliance, check=False)
        lines = (proc.stdout + proc.stderr).splitlines()
        return "\n".join(line for line in lines if "host addresses changed" not in line)

    def log_tail(self) -> str:
        return "appliance log:\n" + "\n".join(self.logs().splitlines()[-30:])

    def wait(self, what: str, probe: Callable[[], Any], timeout: float, every: float = 0.25) -> Any:
        return wait_for(what, probe, timeout, every, self.log_tail)

    def volumes(self) -> list[str]:
        listing = docker("volume", "ls", "-q", check=False).stdout.split()
        return [name for name in listing if name.startswith(self.prefix)]


# ---------------------------------------------------------------------------- helpers


def in_client(*argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return run(["ip", "netns", "exec", NETNS, *argv], check=False, timeout=timeout)


def banner() -> str:
    """What the client reads from HOST_ADDRESS:SSH_PORT (a banner, refused, timeout)."""
    return in_client(sys.executable, "-c", BANNER, HOST_ADDRESS, str(SSH_PORT)).stdout.strip()


def loopback_listeners(port: int) -> list[str]:
    listing = run(["ss", "-Hltn", f"sport = :{port}"]).stdout.splitlines()
    return sorted(line.split()[3] for line in listing if line.strip())


def owned_containers() -> list[str]:
    """Service containers of the default installation (the appliance's config path)."""
    label = f"label=knockgate.owner={OWNER}"
    return docker("ps", "-aq", "--filter", label, check=False).stdout.split()


def project_containers(project: str) -> list[str]:
    label = f"label=com.docker.compose.project={project}"
    return docker("ps", "-aq", "--filter", label, check=False).stdout.split()


def override_text(trial: Trial) -> str:
    volumes = "".join(f"  {key}:\n    name: {trial.prefix}{key[10:]}\n" for key in VOLUME_KEYS)
    return (
        "# knockgate's fleet-trial test: this run's volumes and password, never the defaults\n"
        f"secrets:\n  knockgate-redis-password:\n    file: {trial.password}\n"
        f"volumes:\n{volumes}"
    )


def make_password(path: Path) -> None:
    """The README's two lines: ``install -m 0640 -g 64110 /dev/null FILE``, then
    ``openssl rand -hex 32 > FILE``."""
    run(["install", "-m", "0640", "-g", str(PASSWORD_GID), "/dev/null", str(path)])
    run(["sh", "-c", 'openssl rand -hex 32 > "$1"', "sh", str(path)])


def remove_leftovers() -> None:
    """A killed earlier run's project (its containers by label: a ``down -v`` without its
    override would name the default volumes), the service containers its appliance launched,
    then its volumes (once no container holds them), its table, the namespace."""
    projects = docker(
        "ps", "-a", "--filter", "label=com.docker.compose.project",
        "--format", '{{.Label "com.docker.compose.project"}}', check=False,
    ).stdout.split()  # fmt: skip
    volumes = docker("volume", "ls", "-q", check=False).stdout.split()
    dead_projects = [
        project
        for project in set(projects)
        if (match := re.fullmatch(r"kgtrial(\d+)", project)) and not pid_alive(int(match[1]))
    ]
    dead_volumes = [
        volume
        for volume in volumes
        if (match := re.match(r"kgtrial-(\d+)-", volume)) and not pid_alive(int(match[1]))
    ]
    for project in dead_projects:
        ids = project_containers(project)
        if ids:
            docker("rm", "-f", "-v", *ids, check=False)
    if dead_projects or dead_volumes:  # that run's appliance launched them and made the table
        ids = owned_containers()
        if ids:
            docker("rm", "-f", "-v", *ids, check=False)
        if dead_volumes:
            docker("volume", "rm", "-f", *dead_volumes, check=False)
        if nft_table_exists() and not appliance_running():
            run(["nft", "delete", "table", "inet", "knockgate"], check=False)
    run(["ip", "netns", "del", NETNS], check=False)
    run(["ip", "link", "del", HOST_IF], check=False)


def make_client() -> None:
    run(["ip", "netns", "add", NETNS])
    run(["ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF])
    run(["ip", "link", "set", NS_IF, "netns", NETNS])
    run(["ip", "addr", "add", f"{HOST_ADDRESS}/24", "dev", HOST_IF])
    run(["ip", "link", "set", HOST_IF, "up"])
    for argv in (
        ["ip", "link", "set", "lo", "up"],
        ["ip", "addr", "add", f"{CLIENT_ADDRESS}/24", "dev", NS_IF],
        ["ip", "link", "set", NS_IF, "up"],
    ):
        proc = in_client(*argv)
        assert proc.returncode == 0, proc.stderr


def volume_names(trial: Trial) -> list[str]:
    """The volume names ``docker compose config`` resolves for the trial's three files."""
    config = json.loads(trial.compose("config", "--format", "json").stdout)
    return sorted(volume.get("name", key) for key, volume in config.get("volumes", {}).items())


def refuse_unless_isolated(trial: Trial) -> None:
    names = volume_names(trial)
    expected = sorted(f"{trial.prefix}{key[10:]}" for key in VOLUME_KEYS)
    if names != expected:
        pytest.fail(
            f"refusing to run the trial: docker compose config names the volumes {names}, "
            f"expected only {expected} (a default name is a real installation's)",
            pytrace=False,
        )
    others = appliance_running()
    assert not others, f"another knockgate appliance runs on this host: {others}"
    leftovers = owned_containers()
    assert not leftovers, f"service containers of {CONFIG}'s installation exist: {leftovers}"
    taken = loopback_listeners(REDIS_PORT)
    assert not taken, f"something listens on the trial's Redis port already: {taken}"


def applied_config(shown: str, trial: Trial) -> str:
    """``config show`` + fleet-trial.yaml (the README), the ssh service's Docker volumes renamed
    to this run's: they are named, not compose's, so the override cannot rename them."""
    for volume in SERVICE_VOLUMES:
        pattern = rf"(?m)^(\s+- ){re.escape(volume)}:"
        shown, count = re.subn(pattern, rf"\g<1>{trial.prefix}{volume[10:]}:", shown)
        assert count == 1, f"the generated config mounts {volume} {count} times:\n{shown}"
    leaked = [name for name in SERVICE_VOLUMES if re.search(rf"\b{name}\b", shown)]
    assert not leaked, f"default volume names left in the applied config: {leaked}"
    return shown + FLEET_BLOCK.read_text()


def teardown(trial: Trial) -> None:
    """Every step guarded: one failure never leaves the rest undone; leftovers fail the run."""
    problems: list[str] = []

    def remove_services() -> None:
        ids = owned_containers()
        if ids:
            docker("rm", "-f", "-v", *ids, check=False)

    def remove_volumes() -> None:
        left = trial.volumes()
        if left:
            docker("volume", "rm", "-f", *left, check=False)

    def remove_table() -> None:
        if nft_table_exists():
            run(["nft", "delete", "table", "inet", "knockgate"], check=False)

    def compose_down() -> None:
        # Only once the override was checked: a down -v without it removes a real
        # installation's volumes. Before that, nothing was started.
        if trial.isolated:
            trial.compose("down", "-v", "-t", "0", "--remove-orphans", check=False)

    steps: list[tuple[str, Callable[[], Any]]] = [
        ("compose down -v", compose_down),
        ("service containers", remove_services),
        ("volumes", remove_volumes),
        ("nftables table", remove_table),
        ("namespace", lambda: run(["ip", "netns", "del", NETNS], check=False)),
        ("veth", lambda: run(["ip", "link", "del", HOST_IF], check=False)),
        ("temporary files", lambda: shutil.rmtree(trial.workdir, ignore_errors=True)),
    ]  # fmt: skip
    for what, step in steps:
        try:
            step()
        except Exception as error:  # reported after the other steps ran
            problems.append(f"{what}: {error}")
    if project_containers(trial.project):
        problems.append("containers of the project are left")
    if owned_containers():
        problems.append("service containers are left")
    if trial.volumes():
        problems.append(f"volumes are left: {trial.volumes()}")
    if nft_table_exists():
        problems.append("table inet knockgate is left")
    if NETNS in run(["ip", "netns", "list"], check=False).stdout.split():
        problems.append(f"namespace {NETNS} is left")
    if trial.workdir.exists():
        problems.append(f"{trial.workdir} is left")
    if problems:
        raise AssertionError("fleet trial teardown: " + "; ".join(problems))


# ---------------------------------------------------------------------------- the trial


@pytest.fixture(scope="module")
def trial(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trial]:
    prerequisites()
    require(shutil.which("openssl") is not None, "openssl is not installed (the README uses it)")
    require(shutil.which("ss") is not None, "ss is not installed (apt-get install iproute2)")
    handle = lock_testbed()
    try:
        remove_leftovers()
        buildkit = {**os.environ, "DOCKER_BUILDKIT": "1"}
        for tag, context, dockerfile in IMAGES:
            args = ["build", "-q", "-t", tag]
            if dockerfile is not None:
                args += ["-f", str(dockerfile)]
            run([DOCKER, *args, str(context)], timeout=1800, env=buildkit)
        trial = Trial(os.getpid(), tmp_path_factory.mktemp("kgtrial"))
        try:
            yield start(trial)
        finally:
            teardown(trial)
    finally:
        os.close(handle)


def start(trial: Trial) -> Trial:
    """The README's steps, on this run's volumes and password."""
    make_password(trial.password)
    trial.override.write_text(override_text(trial))
    refuse_unless_isolated(trial)
    trial.isolated = True
    trial.compose("up", "-d", "--no-build")  # built above, from this tree
    trial.wait("knockgate status answers", trial.status, 60, 0.5)
    shown = trial.knockgate("config", "show")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    (trial.workdir / "shown.yaml").write_text(shown.stdout)  # the knock's --config file
    applied = trial.knockgate("config", "apply", stdin=applied_config(shown.stdout, trial))
    assert applied.returncode == 0, applied.stdout + applied.stderr
    trial.compose("restart", "knockgate")

    def fleet_reachable() -> str | None:
        text = trial.status() or ""
        return text if re.search(r"^fleet trial: .* reachable", text, re.M) else None

    trial.wait("knockgate status: fleet trial reachable", fleet_reachable, 60, 0.5)
    return trial


def test_plain_compose_file_has_no_redis_service(trial: Trial) -> None:
    """``docker compose up`` without the trial file is exactly as before."""
    config = json.loads(
        docker("compose", "-f", str(BASE_FILE), "config", "--format", "json").stdout
    )
    assert sorted(config["services"]) == ["knockgate"]
    assert "secrets" not in config and "secrets" not in config["services"]["knockgate"]
    assert sorted(config["volumes"]) == sorted(VOLUME_KEYS[:3])


def test_the_trial_uses_this_runs_volumes_and_password_only(trial: Trial) -> None:
    assert volume_names(trial) == sorted(f"{trial.prefix}{key[10:]}" for key in VOLUME_KEYS)
    mounts = json.loads(docker("inspect", "-f", "{{json .Mounts}}", trial.appliance).stdout)
    named = sorted(m["Name"] for m in mounts if m["Type"] == "volume")
    assert named == sorted(f"{trial.prefix}{key[10:]}" for key in VOLUME_KEYS[:3])
    secret = [m for m in mounts if m["Destination"] == "/run/secrets/knockgate-redis-password"]
    assert [m["Source"] for m in secret] == [str(trial.password)]
    mode = os.stat(trial.password)
    assert (mode.st_mode & 0o777, mode.st_gid) == (0o640, PASSWORD_GID)
    assert re.fullmatch(r"[0-9a-f]{64}\n", trial.password.read_text())


def test_status_shows_the_fleet_reachable_on_loopback(trial: Trial) -> None:
    text = trial.status()
    assert text is not None, trial.log_tail()
    line = r"^fleet trial: this host \S+, redis://knockgate@127\.0\.0\.1:6379/0 reachable for "
    assert re.search(line, text, re.M), text
    assert "last error" not in text, text


def test_redis_listens_on_loopback_only(trial: Trial) -> None:
    assert loopback_listeners(REDIS_PORT) == [f"127.0.0.1:{REDIS_PORT}"]


def test_a_knock_from_a_client_is_granted_and_published(trial: Trial) -> None:
    make_client()
    trial.wait(
        "the appliance captures on the client's link",
        lambda: re.search(rf"{HOST_IF}: capturing", trial.logs()),
        30,
        0.5,
    )
    time.sleep(0.3)  # the loop takes the first packets right after
    assert banner() in ("refused", "timeout"), "the door's port answered before a knock"
    assert grant_for(CLIENT_ADDRESS, SSH_PORT) is None
    shown = str(trial.workdir / "shown.yaml")
    knock = [sys.executable, "-m", "appliance.cli", "knock", HOST_ADDRESS, "--door", "ssh"]
    proc = in_client("env", f"PYTHONPATH={REPO}", *knock, "--config", shown)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    grant = trial.wait("the grant for the client", lambda: grant_for(CLIENT_ADDRESS, SSH_PORT), 30)
    assert grant["proto"] == "tcp"
    said = trial.wait("the ssh service answers the client", lambda: banner().startswith("SSH-"), 30)
    assert said

    def published() -> str | None:
        text = trial.status() or ""
        return text if re.search(r"^  published 1,", text, re.M) else None

    trial.wait("knockgate status: published 1", published, 10)
