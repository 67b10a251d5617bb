"""The testbed: the appliance image under Docker Compose (testbed/compose.yaml), knocked by
real clients in containers, launching the bundled service images on demand.

One Compose project per run (``kgtb<pid>``): the appliance (host network, as deployed, with
testbed/config/knockgate.yaml) and two knockers, ``client`` (198.18.64.10) and ``other``
(198.18.64.11), on the bridge kgtb0 (198.18.64.0/24). The knockers reach the appliance and
the services it publishes at the bridge's gateway, 198.18.64.1. Scenarios, in order:

1. before any knock, nmap sees the service ports closed (not filtered); no service runs;
2. ``knockgate knock --door ssh`` starts ssh; the knocker logs in with a key, ``other`` is
   refused;
3. knockd's ``knock`` opens web (curl: 200, the page) and mail (smtplib: the message lands
   in the Maildir volume);
4. a close knock stops ssh at once and 2222 is refused again;
5. a service nobody holds a grant on or talks to stops after its idle timeout;
6. ``docker kill`` of the appliance, then a restart: its service container is adopted, not
   duplicated, the grant ends at its own deadline and the service stops when unused;
7. with the Docker engine unreachable, a knock gets no grant and a clear log line;
8. fwknop's client (SPA) starts web for the address inside its packet, not for the sender;
   ``knockgate spa`` with a fwknoprc-style key file does the same for the sender.

Teardown, even after a failure: ``compose down -v``, the service containers this
appliance launched (label ``knockgate.owner`` = the hash of its config path), the named
volumes of the testbed config, and knockgate's nftables table ``inet knockgate``.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from appliance.config import load_config
from appliance.services.runtime import owner_of
from tests.integration.conftest import require
from tests.integration.netns import pid_alive

pytestmark = pytest.mark.testbed

T = TypeVar("T")

DOCKER = os.environ.get("KG_DOCKER", "/usr/bin/docker")
REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "testbed" / "compose.yaml"
SETUP_DOCKER = REPO / "testbed" / "setup-docker.sh"
BASE_IMAGE = "debian:bookworm-slim"
# (tag, build context, Dockerfile relative to the repository root or None)
IMAGES = (
    ("knockgate:local", ".", "Dockerfile"),
    ("knockgate/testbed-client:local", ".", "testbed/client/Dockerfile"),
    ("knockgate/ssh:local", "compose/services/ssh", None),
    ("knockgate/web:local", "compose/services/web", None),
    ("knockgate/mail:local", "compose/services/mail", None),
)

GATEWAY = "198.18.64.1"  # kgtb0's address on the host: where the knockers knock and connect
CLIENT = "198.18.64.10"
OTHER = "198.18.64.11"
BRIDGE = "kgtb0"
# The appliance's config path (compose.yaml) and knockgate's owner label derived from it.
APPLIANCE_CONFIG = "/etc/knockgate/testbed.yaml"
OWNER = owner_of(APPLIANCE_CONFIG)
CLIENT_CONFIG = "/etc/knockgate/knockgate.yaml"  # the same file, in the clients
VOLUMES = ("kgtb-ssh-keys", "kgtb-ssh-hostkeys", "kgtb-www", "kgtb-maildir")
KEY = "/root/kgtb_key"  # the throwaway key pair, made in the client container
MAIL_DOMAIN = "testbed.knockgate.test"
NO_DOCKER = "unix:///run/kg-nonexistent.sock"
LOCK = "/run/lock/knockgate-testbed.lock"

# From testbed/config/knockgate.yaml.
SSH_PORT, WEB_PORT, MAIL_PORT = 2222, 8080, 2525
SSH_GRANT, WEB_GRANT = 10.0, 6.0
SSH_IDLE, WEB_IDLE = 5.0, 4.0
WEB_KNOCK = ("52214:tcp", "48731:udp", "50102:tcp")
MAIL_KNOCK = ("33871:udp", "37402:tcp", "35519:tcp")

CONNECT = """\
import socket, sys
sock = socket.socket()
sock.settimeout(3)
try:
    sock.connect((sys.argv[1], int(sys.argv[2])))
    print("open")
except ConnectionRefusedError:
    print("refused")
except ConnectionResetError:
    print("reset")
except TimeoutError:
    print("timeout")
except OSError as error:
    print("error", error)
"""

SEND_MAIL = """\
import smtplib, sys, time
from email.message import EmailMessage
subject, host, port, domain = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
message = EmailMessage()
message["From"] = f"knocker@{domain}"
message["To"] = f"admin@{domain}"
message["Subject"] = subject
message.set_content("delivered through a knock\\n")
deadline = time.monotonic() + 25
while True:
    try:
        with smtplib.SMTP(host, port, timeout=5) as smtp:
            refused = smtp.send_message(message)
        print("sent", refused)
        break
    except (OSError, smtplib.SMTPException) as error:
        if time.monotonic() > deadline:
            print("failed", error)
            sys.exit(1)
        time.sleep(0.3)
"""


# ---------------------------------------------------------------------------- helpers


def run(
    argv: list[str],
    *,
    check: bool = True,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
        input=stdin,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    return proc


def docker(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run([DOCKER, *args], **kwargs)


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    timeout: float,
    every: float = 0.25,
    context: Callable[[], str] | None = None,
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` (and what
    ``context`` says then) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f"\n{context()}" if context is not None else ""
            raise AssertionError(f"not within {timeout:g} s: {what}{detail}")
        time.sleep(every)


def engine_answers() -> bool:
    if not os.access(DOCKER, os.X_OK):
        return False
    try:
        return docker("version", check=False, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def compose_v2() -> bool:
    try:
        version = docker("compose", "version", "--short", check=False, timeout=15).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return version.strip().lstrip("v").startswith("2.")


def prerequisites() -> None:
    require(os.geteuid() == 0, "needs root (Docker engine, host nftables)")
    ready = engine_answers() and compose_v2()
    ready = ready and docker("image", "inspect", BASE_IMAGE, check=False).returncode == 0
    if not ready and SETUP_DOCKER.exists() and shutil.which("apt-get"):
        run(["bash", str(SETUP_DOCKER)], check=False, timeout=1800)
    require(engine_answers(), f"no Docker engine answers {DOCKER} (run testbed/setup-docker.sh)")
    require(compose_v2(), "Compose v2 is missing (run testbed/setup-docker.sh)")
    require(
        docker("image", "inspect", BASE_IMAGE, check=False).returncode == 0,
        f"base image {BASE_IMAGE} is missing (run testbed/setup-docker.sh)",
    )
    require(shutil.which("nft") is not None, "nft is not installed (apt-get install nftables)")


def owned_containers(filters: tuple[str, ...] = ()) -> list[str]:
    args = ["ps", "-aq", "--filter", "label=knockgate.service", "--filter"]
    args += [f"label=knockgate.owner={OWNER}", *filters]
    return docker(*args, check=False).stdout.split()


def remove_leftovers() -> None:
    """What a killed earlier run left: its Compose project (kgtb<pid> of a dead pid) and
    then its nftables table, the containers our appliance launched, the testbed volumes."""
    projects: set[str] = set()
    for kind in (["ps", "-a"], ["network", "ls"]):
        listing = docker(
            *kind,
            "--filter",
            "label=com.docker.compose.project",
            "--format",
            '{{.Label "com.docker.compose.project"}}',
            check=False,
        )
        projects.update(listing.stdout.split())
    killed_run = False
    for project in sorted(projects):
        match = re.fullmatch(r"kgtb(\d+)", project)
        if match and not pid_alive(int(match.group(1))):
            compose_down(project)
            killed_run = True
    if killed_run and nft_table_exists():  # that run's appliance made it; its grants go too
        run(["nft", "delete", "table", "inet", "knockgate"], check=False)
    stale = owned_containers()
    if stale:
        docker("rm", "-f", "-v", *stale, check=False)
    docker("volume", "rm", "-f", *VOLUMES, check=False)


def compose_down(project: str) -> None:
    docker(
        "compose",
        "-f",
        str(COMPOSE_FILE),
        "-p",
        project,
        "down",
        "-v",
        "-t",
        "0",
        "--remove-orphans",
        check=False,
        timeout=120,
    )


def nft_table_exists() -> bool:
    return run(["nft", "list", "table", "inet", "knockgate"], check=False).returncode == 0


def grant_elements() -> list[dict[str, Any]]:
    """The IPv4 grants in knockgate's table: {address, proto, port, expires} each."""
    proc = run(["nft", "-j", "list", "set", "inet", "knockgate", "grants4"], check=False)
    if proc.returncode != 0:
        return []
    found = []
    for item in json.loads(proc.stdout)["nftables"]:
        for elem in item.get("set", {}).get("elem", []):
            inner = elem.get("elem", elem) if isinstance(elem, dict) else elem
            value = inner.get("val", inner) if isinstance(inner, dict) else inner
            address, proto, port = value["concat"]
            expires = inner.get("expires") if isinstance(inner, dict) else None
            found.append({"address": address, "proto": proto, "port": port, "expires": expires})
    return found


def grant_for(address: str, port: int) -> dict[str, Any] | None:
    return next(
        (g for g in grant_elements() if g["address"] == address and g["port"] == port), None
    )


# ---------------------------------------------------------------------------- the testbed


class Testbed:
    __test__ = False  # not a test class

    def __init__(self, project: str) -> None:
        self.project = project
        self.appliance = f"{project}-appliance-1"

    # -- compose and containers

    def compose(self, *args: str, docker_host: str | None = None, timeout: float = 180) -> None:
        env = {k: v for k, v in os.environ.items() if k != "KGTB_DOCKER_HOST"}
        if docker_host is not None:
            env["KGTB_DOCKER_HOST"] = docker_host
        compose = ["compose", "-f", str(COMPOSE_FILE), "-p", self.project]
        docker(*compose, *args, env=env, timeout=timeout)

    def exec(
        self, service: str, *argv: str, check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return docker("exec", f"{self.project}-{service}-1", *argv, check=check, timeout=timeout)

    def logs(self) -> str:
        proc = docker("logs", self.appliance, check=False)
        return proc.stdout + proc.stderr

    def log_tail(self, lines: int = 25) -> str:
        kept = [line for line in self.logs().splitlines() if "host addresses changed" not in line]
        return "\n".join(kept[-lines:])

    def wait(
        self, what: str, probe: Callable[[], T | None], timeout: float, every: float = 0.25
    ) -> T:
        """``wait_for``, with the appliance's recent log in the failure message."""
        return wait_for(what, probe, timeout, every, lambda: f"appliance log:\n{self.log_tail()}")

    def wait_log(self, pattern: str, timeout: float, after: int = 0) -> None:
        """Wait for more than ``after`` log lines matching ``pattern`` (a regex)."""
        self.wait(
            f"appliance log line /{pattern}/ (#{after + 1})",
            lambda: self.count_log(pattern) > after,
            timeout,
        )

    def count_log(self, pattern: str) -> int:
        return len(re.findall(pattern, self.logs()))

    def wait_capturing(self, before: int, timeout: float = 30) -> None:
        """The appliance (re)started and its sniffer on kgtb0 is attached."""
        self.wait_log(rf"{BRIDGE}: capturing", timeout, after=before)
        time.sleep(0.3)  # the loop takes the first packets right after

    def states(self) -> dict[str, list[str]]:
        """Our appliance's service containers: service name -> states (one per container)."""
        proc = docker(
            "ps",
            "-a",
            "--filter",
            f"label=knockgate.owner={OWNER}",
            "--format",
            '{{.Label "knockgate.service"}} {{.State}}',
            check=False,
        )
        found: dict[str, list[str]] = {}
        for line in proc.stdout.splitlines():
            name, _, state = line.partition(" ")
            found.setdefault(name, []).append(state)
        return found

    def running(self, service: str) -> bool:
        return "running" in self.states().get(service, [])

    def running_services(self) -> list[str]:
        return sorted(name for name, states in self.states().items() if "running" in states)

    # -- the clients

    def connect(self, who: str, port: int) -> str:
        proc = self.exec(who, "python3", "-c", CONNECT, GATEWAY, str(port))
        return proc.stdout.strip() or f"exit {proc.returncode}: {proc.stderr.strip()}"

    def knock_door(self, door: str, who: str = "client") -> float:
        argv = ["knockgate", "knock", GATEWAY, "--door", door, "--config", CLIENT_CONFIG]
        self.exec(who, *argv, check=True)
        return time.monotonic()

    def knockd_knock(self, *steps: str, who: str = "client") -> float:
        self.exec(who, "knock", GATEWAY, *steps, check=True)
        return time.monotonic()

    def ssh(self, who: str = "client") -> bool:
        proc = self.exec(
            who,
            "ssh",
            "-i",
            KEY,
            "-p",
            str(SSH_PORT),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=3",
            "-o",
            "LogLevel=ERROR",
            f"root@{GATEWAY}",
            "echo kgtb-ssh-ok",
            timeout=20,
        )
        return proc.returncode == 0 and "kgtb-ssh-ok" in proc.stdout

    def http(self, port: int) -> tuple[int, str]:
        proc = self.exec(
            "client",
            "curl",
            "-sS",
            "--max-time",
            "3",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            f"http://{GATEWAY}:{port}/",
        )
        body, _, code = proc.stdout.rpartition("\n")
        return (int(code) if code.isdigit() else 0), body

    def ssh_up(self, timeout: float = 30) -> float:
        """Knock the ssh door and wait until the key login works; the knock's time."""
        knocked = self.knock_door("ssh")
        self.wait("ssh login after the knock", self.ssh, timeout)
        return knocked


@pytest.fixture(scope="module")
def testbed() -> Iterator[Testbed]:
    prerequisites()
    # One testbed at a time: the bridge, subnet and volume names are fixed.
    with open(LOCK, "w") as lock:
        deadline = time.monotonic() + 900
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another testbed run holds {LOCK}", pytrace=False)
                time.sleep(1)
        remove_leftovers()
        buildkit = {**os.environ, "DOCKER_BUILDKIT": "1"}
        for tag, context, dockerfile in IMAGES:
            args = ["build", "-q", "-t", tag]
            if dockerfile is not None:
                args += ["-f", str(REPO / dockerfile)]
            run([DOCKER, *args, str(REPO / context)], timeout=1800, env=buildkit)
        bed = Testbed(f"kgtb{os.getpid()}")
        try:
            yield start(bed)
        finally:
            teardown(bed)


def start(bed: Testbed) -> Testbed:
    for volume in VOLUMES:
        docker("volume", "create", "--label", f"knockgate.testbed={bed.project}", volume)
    page = f"<h1>knockgate testbed {bed.project}</h1>\n"
    docker(
        "run",
        "--rm",
        "-i",
        "--name",
        f"{bed.project}-www",
        "-v",
        "kgtb-www:/www",
        BASE_IMAGE,
        "sh",
        "-c",
        "cat > /www/index.html && chmod 0644 /www/index.html",
        stdin=page,
    )
    bed.compose("up", "-d", "--no-build")
    bed.wait_capturing(before=0)
    # The throwaway key pair: made in the client, its public half into the keys volume.
    bed.exec("client", "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", KEY, check=True)
    public = bed.exec("client", "cat", f"{KEY}.pub", check=True).stdout
    docker(
        "run",
        "--rm",
        "-i",
        "--name",
        f"{bed.project}-keys",
        "-v",
        "kgtb-ssh-keys:/keys",
        BASE_IMAGE,
        "sh",
        "-c",
        "cat > /keys/authorized_keys && chmod 0644 /keys/authorized_keys",
        stdin=public,
    )
    return bed


def teardown(bed: Testbed) -> None:
    """Each step guarded: one failure never leaves the rest undone; leftovers fail the run."""
    problems: list[str] = []

    def remove_services() -> None:
        # Only the containers of this appliance (owner label), the killed runs' included.
        ids = owned_containers()
        if ids:
            docker("rm", "-f", "-v", *ids, check=False)

    def remove_table() -> None:
        # knockgate's own table, in the root namespace; the appliance is gone by now.
        if nft_table_exists():
            run(["nft", "delete", "table", "inet", "knockgate"], check=False)

    steps: list[tuple[str, Callable[[], Any]]] = [
        ("compose down", lambda: compose_down(bed.project)),
        ("service containers", remove_services),
        ("nftables table", remove_table),
        ("volumes", lambda: docker("volume", "rm", "-f", *VOLUMES, check=False)),
    ]
    for what, step in steps:
        try:
            step()
        except Exception as error:
            problems.append(f"{what}: {error}")
    label = f"label=com.docker.compose.project={bed.project}"
    if docker("ps", "-aq", "--filter", label, check=False).stdout.strip():
        problems.append("containers of the project are left")
    if docker("network", "ls", "-q", "--filter", label, check=False).stdout.strip():
        problems.append("the project's network is left")
    if owned_containers():
        problems.append("service containers are left")
    if nft_table_exists():
        problems.append("table inet knockgate is left")
    left = docker("volume", "ls", "-q", check=False).stdout.split()
    if any(volume in left for volume in VOLUMES):
        problems.append("testbed volumes are left")
    if problems:
        raise AssertionError("testbed teardown: " + "; ".join(problems))


# ---------------------------------------------------------------------------- scenarios


def nmap_states(bed: Testbed, ports: tuple[int, ...]) -> dict[int, str]:
    proc = bed.exec(
        "client",
        "nmap",
        "-Pn",
        "-n",
        "-sS",
        "--max-retries",
        "1",
        "-p",
        ",".join(map(str, ports)),
        "-oG",
        "-",
        GATEWAY,
        check=True,
    )
    return {int(port): state for port, state in re.findall(r"(\d+)/(\w+)/tcp", proc.stdout)}


def test_1_service_ports_closed_before_any_knock(testbed: Testbed) -> None:
    ports = (SSH_PORT, WEB_PORT, MAIL_PORT)
    assert nmap_states(testbed, ports) == dict.fromkeys(ports, "closed")
    assert testbed.running_services() == []
    assert grant_for(CLIENT, SSH_PORT) is None


def test_2_knockgate_knock_starts_ssh_for_the_knocker_only(testbed: Testbed) -> None:
    testbed.ssh_up()
    assert testbed.running("ssh")
    assert grant_for(CLIENT, SSH_PORT) is not None
    # The service runs and the port is granted, to the knocker's address only.
    assert testbed.connect("other", SSH_PORT) == "refused"
    assert not testbed.ssh("other")
    assert testbed.count_log(rf"{CLIENT}: ssh: open {SSH_PORT}/tcp until") >= 1


def test_3_knockd_knock_opens_web_and_mail(testbed: Testbed) -> None:
    testbed.knockd_knock(*WEB_KNOCK)

    def page() -> str | None:
        code, body = testbed.http(WEB_PORT)
        return body if code == 200 else None

    body = testbed.wait(f"HTTP 200 on {WEB_PORT} after the knock", page, 20)
    assert f"knockgate testbed {testbed.project}" in body
    assert testbed.connect("other", WEB_PORT) == "refused"

    token = f"kgtb-{uuid.uuid4().hex[:12]}"
    testbed.knockd_knock(*MAIL_KNOCK)
    mail = (token, GATEWAY, str(MAIL_PORT), MAIL_DOMAIN)
    sent = testbed.exec("client", "python3", "-c", SEND_MAIL, *mail, timeout=40)
    assert sent.returncode == 0, f"{sent.stdout}{sent.stderr}\n{testbed.log_tail()}"

    def delivered() -> bool:
        name = f"{testbed.project}-maildir"
        grep = ["grep", "-rlF", token, "/maildir/new"]
        proc = docker(
            "run",
            "--rm",
            "--name",
            name,
            "-v",
            "kgtb-maildir:/maildir:ro",
            BASE_IMAGE,
            *grep,
            check=False,
        )
        return proc.returncode == 0 and "/maildir/new/" in proc.stdout

    wait_for(f"the message {token} in the Maildir", delivered, 15, every=1.0)


def test_4_close_knock_stops_ssh(testbed: Testbed) -> None:
    knocked = testbed.ssh_up()
    testbed.knock_door("ssh-close")
    closed = time.monotonic()
    testbed.wait(
        "ssh stopped after the close knock",
        lambda: not testbed.running("ssh"),
        6,
    )
    # Well before the grant's own end (and the idle stop after it): the close knock did it.
    assert time.monotonic() - knocked < SSH_GRANT
    assert testbed.count_log(rf"ssh: stopped \(close knock from {re.escape(CLIENT)}\)") >= 1
    assert grant_for(CLIENT, SSH_PORT) is None
    assert testbed.connect("client", SSH_PORT) == "refused"
    assert time.monotonic() - closed < 10


def test_5_idle_service_stops(testbed: Testbed) -> None:
    # Start from a stopped web (the one scenario 3 launched goes idle on its own), so the
    # stop measured here is the one of this knock's container.
    testbed.wait(
        "web from scenario 3 stopped", lambda: not testbed.running("web"), WEB_GRANT + 8, 0.5
    )
    stops_before = testbed.count_log(r"web: stopped \(idle")
    knocked = testbed.knockd_knock(*WEB_KNOCK)
    testbed.wait(f"HTTP 200 on {WEB_PORT}", lambda: testbed.http(WEB_PORT)[0] == 200, 20)
    assert testbed.running("web")
    # Grant (6 s), then idle (4 s: no grant, no connection), then stopped.
    testbed.wait(
        "web stopped when idle",
        lambda: not testbed.running("web"),
        WEB_GRANT + WEB_IDLE + 10,
        every=0.5,
    )
    stopped = time.monotonic()
    assert stopped - knocked >= WEB_GRANT + WEB_IDLE - 1, "stopped before grant + idle time"
    assert testbed.count_log(r"web: stopped \(idle for 4 s\)") > stops_before
    assert testbed.connect("client", WEB_PORT) == "refused"


def test_6_killed_appliance_leaves_no_grant_and_no_orphan(testbed: Testbed) -> None:
    knocked = testbed.ssh_up()
    deadline = knocked + SSH_GRANT + 0.5  # the grant's end, from the completed knock
    starts = testbed.count_log(rf"{BRIDGE}: capturing")
    adopted = testbed.count_log(r"adopted container knockgate-ssh \(ssh, running\)")
    docker("kill", testbed.appliance)
    assert testbed.running("ssh"), "the service container died with the appliance"
    docker("start", testbed.appliance)
    testbed.wait_capturing(before=starts)
    testbed.wait_log(r"adopted container knockgate-ssh \(ssh, running\)", 10, after=adopted)
    grant = grant_for(CLIENT, SSH_PORT)
    if grant is not None and grant["expires"] is not None:  # kept, never extended
        assert grant["expires"] <= deadline - time.monotonic() + 1
    time.sleep(max(0.0, deadline - time.monotonic()))
    assert grant_for(CLIENT, SSH_PORT) is None, "a grant outlived its deadline"
    assert testbed.connect("client", SSH_PORT) == "refused"
    # The adopted container is stopped once unused (no grant, no connection, idle_timeout),
    # and no second one was ever made.
    testbed.wait(
        "the adopted ssh container stopped",
        lambda: not testbed.running_services(),
        SSH_IDLE + 8,
        every=0.5,
    )
    assert len(testbed.states().get("ssh", [])) == 1


def test_7_docker_unavailable_gives_no_access(testbed: Testbed) -> None:
    # A new container (its environment changed): its log starts empty.
    testbed.compose("up", "-d", "--no-build", "--no-deps", "appliance", docker_host=NO_DOCKER)
    try:
        testbed.wait_capturing(before=0)
        failures = testbed.count_log(r"service ssh unavailable, no access")
        testbed.knock_door("ssh")
        unavailable = rf"{re.escape(CLIENT)}: ssh: service ssh unavailable, no access: docker"
        testbed.wait_log(unavailable, 15, after=failures)
        assert grant_for(CLIENT, SSH_PORT) is None
        assert testbed.connect("client", SSH_PORT) == "refused"
        assert testbed.running_services() == []
    finally:  # back to a working engine, for whatever runs next
        testbed.compose("up", "-d", "--no-build", "--no-deps", "appliance")


def _spa_keys() -> tuple[str, str]:
    """The testbed's throwaway SPA keys, as base64 (from testbed/config/knockgate.yaml)."""
    spa = load_config(str(REPO / "testbed" / "config" / "knockgate.yaml")).config.door("web-spa")
    assert spa.spa is not None
    user = spa.spa.users[0]
    return base64.b64encode(user.key).decode(), base64.b64encode(user.hmac_key).decode()


def test_8_spa_starts_web_for_the_address_in_the_packet(testbed: Testbed) -> None:
    testbed.wait_capturing(before=0)  # test 7 recreated the appliance: its log starts empty
    key, hmac_key = _spa_keys()
    # fwknop's own client, in the client container, asks for web for `other`'s address.
    fwknop = ["env", "HOME=/tmp", "fwknop", "--no-rc-file", "--no-save-args", "--use-hmac"]
    fwknop += ["--key-base64-rijndael", key, "--key-base64-hmac", hmac_key]
    fwknop += ["-A", f"tcp/{WEB_PORT}", "-a", OTHER, "-D", GATEWAY]
    testbed.exec("client", *fwknop, check=True)
    accepted = rf"{re.escape(OTHER)}: web-spa: SPA from user tester accepted \(SPA from {CLIENT}\)"
    testbed.wait_log(accepted, 15, after=0)
    testbed.wait(
        f"{WEB_PORT} open for other after the SPA packet",
        lambda: testbed.connect("other", WEB_PORT) == "open",
        20,
    )
    assert testbed.connect("client", WEB_PORT) == "refused"  # the sender is not let in
    assert grant_for(OTHER, WEB_PORT) is not None
    # knockgate's own client, with a key file in fwknop's format, for the sender itself.
    keys = f"[web-spa]\nKEY_BASE64 {key}\nHMAC_KEY_BASE64 {hmac_key}\n"
    write = f"printf '%s' '{keys}' > /tmp/kg-spa.keys"
    spa = f"knockgate spa {GATEWAY} --door web-spa --key-file /tmp/kg-spa.keys --config {CLIENT_CONFIG}"
    testbed.exec("client", "sh", "-c", f"{write} && {spa}", check=True)

    def page() -> str | None:
        code, body = testbed.http(WEB_PORT)
        return body if code == 200 else None

    assert f"knockgate testbed {testbed.project}" in testbed.wait("HTTP 200 for client", page, 20)
