"""The Docker Swarm stack (deploy/swarm/knockgate-stack.yml) on a single-node swarm.

The engine joins a swarm only for this module when it is not in one already (``docker swarm
init`` on 127.0.0.1, so nothing listens beyond loopback, with its address pool in
198.19.64.0/18), and leaves it at the end, with the ``docker_gwbridge`` network it made; an
engine that was in a swarm is left as it was. The swarm it made is marked
(/run/lock/knockgate-swarm-test.pid): a killed run's swarm is left by the next run, before
that run looks for another appliance (a leftover stack's task would be one). The node gets the
``knockgate-redis=true`` label the stack's Redis is placed by (removed again on a swarm that
was there before).

The stack is deployed as written (``kgsw<pid>``), with this module's own knockgate config
(a door on a test port, the stack's Redis on a free loopback port) and a fresh Redis password:
``KNOCKGATE_CONFIG_FILE``, ``KNOCKGATE_REDIS_PASSWORD_FILE``, ``KNOCKGATE_FLEET`` and
``KNOCKGATE_REDIS_PORT`` in the environment of ``docker stack deploy``. Then:

1. the global knockgate service runs one task on the node, with the capabilities, read-only
   root, the config and secret as written in the stack file;
2. ``knockgate status`` in that task shows the fleet reachable (the stack's Redis, ACL user,
   password from the secret); that Redis listens on 127.0.0.1 only and refuses the default
   user; AUTH with the real password reaches the fleet's keys and nothing else (NOPERM);
3. a client in a network namespace of its own (198.18.71.2, veth to the host's 198.18.71.1)
   finds the door's port closed, knocks the sequence, and then connects to a listener on
   the host: the door opened for it, the grant is in knockgate's nftables set and was
   published to the fleet (status: published 1).

Without a swarm: the Redis image refuses a missing, short or multi-line password file and a
non-loopback bind (exit status 2, never serving), and the knockgate image runs as the
Kubernetes DaemonSet's pod would (its capabilities only, read-only, a 1777 /run) with
``knockgate status`` answering.

Teardown, even after a failure: ``docker stack rm`` (services, configs and secrets it made),
its containers gone, its volumes, knockgate's nftables table, the namespace, the swarm if
this module made it. Run under ``flock /tmp/kg-testbed.lock``; the module also takes the
testbed's own lock, so it never runs while another testbed module's appliance is up.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import require
from tests.integration.netns import pid_alive
from tests.testbed.test_testbed import (
    DOCKER,
    LOCK,
    REPO,
    docker,
    grant_for,
    nft_table_exists,
    prerequisites,
    run,
    wait_for,
)

pytestmark = pytest.mark.testbed

STACK_FILE = REPO / "deploy" / "swarm" / "knockgate-stack.yml"
IMAGES = (
    ("knockgate:local", REPO, REPO / "Dockerfile"),
    ("knockgate-redis:local", REPO / "compose" / "redis", None),
)
NETNS = "kgsw-client"
HOST_IF, NS_IF = "kgsw-h", "kgsw-n"
HOST_ADDRESS, CLIENT_ADDRESS = "198.18.71.1", "198.18.71.2"
DOOR_PORT = 47022
KNOCK = ("41731", "45219:udp", "43310")
FLEET = "kgsw"
# Written when this module makes the engine join a swarm (the pid that did): a killed run's
# swarm is left by the next run; an engine's own swarm (no mark) never.
SWARM_MARK = Path("/run/lock/knockgate-swarm-test.pid")
# Not 10.0.0.0/8 (the default pool): every address here is in 198.18.0.0/15.
ADDRESS_POOL = ("--default-addr-pool", "198.19.64.0/18", "--default-addr-pool-mask-length", "24")

CONFIG = f"""\
fleet:
  name: {FLEET}
  host: kgsw-node
  redis: redis://knockgate@127.0.0.1:{{port}}/0
  password_file: /run/secrets/knockgate-redis-password
  on_outage: refuse
doors:
  door:
    knock: {{{{sequence: [41731, 45219/udp, 43310], seq_timeout: 5}}}}
    open: {{{{ports: [{DOOR_PORT}/tcp], duration: 20}}}}
"""

CONNECT = """\
import socket, sys
sock = socket.socket()
sock.settimeout(1)
try:
    sock.connect((sys.argv[1], int(sys.argv[2])))
    print("open")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
except OSError as error:
    print("error", error)
"""


@dataclass
class Stack:
    name: str
    workdir: Path
    made_swarm: bool = False
    labelled: str = ""  # the node this module gave the knockgate-redis label
    password: str = ""
    redis_port: int = 0
    listener: socket.socket | None = None
    served: list[str] = field(default_factory=list)

    @property
    def service(self) -> str:
        return f"{self.name}_knockgate"

    def task_container(self) -> str | None:
        """The running container of the knockgate service's task on this node."""
        found = docker(
            "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={self.service}",
            check=False,
        ).stdout.split()  # fmt: skip
        return found[0] if len(found) == 1 else None

    def logs(self) -> str:
        """The task's log (``docker logs``: faster than ``docker service logs``)."""
        container = self.task_container()
        if container is None:
            proc = docker("service", "ps", "--no-trunc", self.service, check=False)
            return proc.stdout + proc.stderr
        proc = docker("logs", container, check=False, timeout=20)
        lines = (proc.stdout + proc.stderr).splitlines()
        return "\n".join(line for line in lines if "host addresses changed" not in line)[-4000:]

    def status(self) -> dict[str, object] | None:
        container = self.task_container()
        if container is None:
            return None
        proc = docker(
            "exec", container, "knockgate", "status", "--json", "--config",
            "/etc/knockgate/knockgate.yaml", check=False, timeout=20,
        )  # fmt: skip
        if proc.returncode != 0:
            return None
        status: dict[str, object] = json.loads(proc.stdout)
        return status


# ---------------------------------------------------------------------------- helpers


def in_client(*argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return run(["ip", "netns", "exec", NETNS, *argv], check=False, timeout=timeout)


def connect_state() -> str:
    return in_client(sys.executable, "-c", CONNECT, HOST_ADDRESS, str(DOOR_PORT)).stdout.strip()


def swarm_state() -> str:
    info = docker("info", "--format", "{{.Swarm.LocalNodeState}}", check=False)
    return info.stdout.strip()


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def appliance_running() -> list[str]:
    """Containers of knockgate's image running now (another appliance on this host)."""
    listing = docker("ps", "--format", "{{.Names}} {{.Image}}", check=False).stdout
    return [line for line in listing.splitlines() if " knockgate:local" in f" {line}"]


def remove_leftovers() -> None:
    """A killed earlier run's stack (kgsw<pid> of a dead pid), its volumes, the namespace,
    and the swarm it made (SWARM_MARK names its pid; a swarm without the mark is not ours)."""
    stacks = docker("stack", "ls", "--format", "{{.Name}}", check=False).stdout.split()
    for name in stacks:
        match = re.fullmatch(r"kgsw(\d+)", name)
        if match and not pid_alive(int(match.group(1))):
            remove_stack(name)
    run(["ip", "netns", "del", NETNS], check=False)
    run(["ip", "link", "del", HOST_IF], check=False)
    try:
        pid = int(SWARM_MARK.read_text().strip() or 0)
    except (OSError, ValueError):
        return
    if not pid_alive(pid):
        if swarm_state() == "active":
            leave_swarm()
        SWARM_MARK.unlink(missing_ok=True)


def leave_swarm() -> None:
    docker("swarm", "leave", "--force", check=False, timeout=60)
    docker("network", "rm", "docker_gwbridge", check=False)


def remove_stack(name: str) -> None:
    """``docker stack rm`` (services, configs, secrets), then its containers and volumes."""
    docker("stack", "rm", name, check=False, timeout=60)
    label = f"label=com.docker.stack.namespace={name}"

    def containers() -> list[str]:
        return docker("ps", "-aq", "--filter", label, check=False).stdout.split()

    deadline = time.monotonic() + 60
    while containers() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = containers()
    if left:
        docker("rm", "-f", "-v", *left, check=False)
    volumes = docker("volume", "ls", "-q", "--filter", label, check=False).stdout.split()
    if volumes:
        docker("volume", "rm", "-f", *volumes, check=False)
    for kind in ("config", "secret"):
        made = docker(kind, "ls", "-q", "--filter", label, check=False).stdout.split()
        if made:
            docker(kind, "rm", *made, check=False)


def make_client() -> None:
    run(["ip", "netns", "add", NETNS])
    run(["ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF])
    run(["ip", "link", "set", NS_IF, "netns", NETNS])
    run(["ip", "addr", "add", f"{HOST_ADDRESS}/24", "dev", HOST_IF])
    run(["ip", "link", "set", HOST_IF, "up"])
    in_client("ip", "link", "set", "lo", "up")
    for argv in (
        ["ip", "addr", "add", f"{CLIENT_ADDRESS}/24", "dev", NS_IF],
        ["ip", "link", "set", NS_IF, "up"],
    ):
        proc = in_client(*argv)
        assert proc.returncode == 0, proc.stderr


def serve(stack: Stack) -> None:
    """A TCP listener on the host behind the door: answers ``kgsw-ok`` to whoever gets in."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST_ADDRESS, DOOR_PORT))
    listener.listen(8)
    stack.listener = listener

    def accept() -> None:
        while True:
            try:
                conn, peer = listener.accept()
            except OSError:
                return
            stack.served.append(peer[0])
            conn.close()

    threading.Thread(target=accept, daemon=True, name="kgsw-listener").start()


def lock_testbed() -> int:
    """The testbed's lock (test_testbed.py): one appliance on the host network at a time."""
    handle = os.open(LOCK, os.O_WRONLY | os.O_CREAT, 0o644)
    deadline = time.monotonic() + 900
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(handle)
                pytest.fail(f"another testbed run holds {LOCK}", pytrace=False)
            time.sleep(1)


def teardown(stack: Stack) -> None:
    """Every step guarded: one failure does not leave the rest undone."""
    steps = [
        lambda: remove_stack(stack.name),
        lambda: stack.listener.close() if stack.listener is not None else None,
        lambda: (
            run(["nft", "delete", "table", "inet", "knockgate"], check=False)
            if nft_table_exists()
            else None
        ),
        lambda: run(["ip", "netns", "del", NETNS], check=False),
        lambda: run(["ip", "link", "del", HOST_IF], check=False),
    ]
    if stack.labelled and not stack.made_swarm:
        steps.append(
            lambda: docker("node", "update", "--label-rm", "knockgate-redis", stack.labelled)
        )
    if stack.made_swarm:
        steps.append(leave_swarm)
        steps.append(lambda: SWARM_MARK.unlink(missing_ok=True))
    errors = []
    for step in steps:
        try:
            step()
        except Exception as error:  # reported after the other steps ran
            errors.append(error)
    if errors:
        raise errors[0]


# ---------------------------------------------------------------------------- the stack


@pytest.fixture(scope="module")
def images() -> None:
    """Both images of the stack, built from this tree (BuildKit's cache: seconds when unchanged)."""
    prerequisites()
    buildkit = {**os.environ, "DOCKER_BUILDKIT": "1"}
    for tag, context, dockerfile in IMAGES:
        args = ["build", "-q", "-t", tag]
        if dockerfile is not None:
            args += ["-f", str(dockerfile)]
        run([DOCKER, *args, str(context)], timeout=1800, env=buildkit)


@pytest.fixture(scope="module")
def stack(images: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require(
        docker("stack", "--help", check=False).returncode == 0,
        f"{DOCKER} has no `stack` command (Debian's docker.io client has it)",
    )
    handle = lock_testbed()
    try:
        remove_leftovers()
        others = appliance_running()
        assert not others, f"another knockgate appliance runs on this host: {others}"
        stack = Stack(f"kgsw{os.getpid()}", tmp_path_factory.mktemp("kgsw"))
        try:
            yield deploy(stack)
        finally:
            teardown(stack)
    finally:
        os.close(handle)


def deploy(stack: Stack) -> Stack:
    state = swarm_state()
    if state == "inactive":
        SWARM_MARK.write_text(f"{os.getpid()}\n")
        stack.made_swarm = True
        docker(
            "swarm", "init", "--listen-addr", "127.0.0.1:2377", "--advertise-addr", "127.0.0.1",
            *ADDRESS_POOL,
        )  # fmt: skip
    else:
        assert state == "active", f"the engine's swarm is {state!r} (expected inactive or active)"
    # The stack's Redis runs on the node labelled knockgate-redis=true (README).
    node = docker("info", "--format", "{{.Swarm.NodeID}}").stdout.strip()
    labels = json.loads(docker("node", "inspect", "--format", "{{json .Spec.Labels}}", node).stdout)
    if "knockgate-redis" not in (labels or {}):
        docker("node", "update", "--label-add", "knockgate-redis=true", node)
        stack.labelled = node
    make_client()
    serve(stack)
    stack.redis_port = redis_port = free_loopback_port()
    config = stack.workdir / "knockgate.yaml"
    config.write_text(CONFIG.format(port=redis_port))
    password = stack.workdir / "redis-password"
    stack.password = secrets.token_hex(24)
    password.write_text(stack.password + "\n")
    password.chmod(0o600)
    env = {
        **os.environ,
        "KNOCKGATE_CONFIG_FILE": str(config),
        "KNOCKGATE_REDIS_PASSWORD_FILE": str(password),
        "KNOCKGATE_FLEET": FLEET,
        "KNOCKGATE_REDIS_PORT": str(redis_port),
    }
    docker("stack", "deploy", "-c", str(STACK_FILE), stack.name, env=env, timeout=120)
    return stack


def test_the_global_service_runs_one_task_with_the_stack_files_settings(stack: Stack) -> None:
    container = wait_for(
        "the knockgate service's task runs", stack.task_container, 60, 0.5, stack.logs
    )
    spec = docker("service", "inspect", stack.service).stdout
    service = json.loads(spec)[0]["Spec"]
    assert "Global" in service["Mode"]
    task = service["TaskTemplate"]["ContainerSpec"]
    assert sorted(task["CapabilityAdd"]) == ["CAP_NET_ADMIN", "CAP_NET_RAW"]
    assert task["ReadOnly"] is True
    inspected = json.loads(docker("inspect", container).stdout)[0]
    assert inspected["HostConfig"]["NetworkMode"] == "host"
    assert set(inspected["HostConfig"]["CapAdd"]) >= {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    listing = docker(
        "exec", container, "stat", "-c", "%U:%G %a",
        "/etc/knockgate/knockgate.yaml", "/run/secrets/knockgate-redis-password",
    ).stdout.split("\n")  # fmt: skip
    assert listing[:2] == ["root:knockgate-config 440", "root:knockgate-config 440"]


def test_status_in_the_task_shows_the_fleet_reachable(stack: Stack) -> None:
    def reachable() -> dict[str, object] | None:
        status = stack.status()
        fleet = status.get("fleet") if status else None
        return fleet if isinstance(fleet, dict) and fleet.get("reachable") is True else None

    fleet = wait_for("knockgate status: fleet reachable", reachable, 60, 0.5, stack.logs)
    assert fleet["name"] == FLEET
    container = stack.task_container()
    assert container is not None
    text = docker("exec", container, "knockgate", "status").stdout
    line = rf"fleet {FLEET}: this host kgsw-node, redis://knockgate@127\.0\.0\.1:\d+/0 reachable"
    assert re.search(line, text), text


def test_the_stacks_redis_listens_on_loopback_only_and_refuses_the_default_user(
    stack: Stack,
) -> None:
    port = stack.redis_port
    wait_for("the stack's Redis answers", lambda: redis_says(port, b"PING\r\n"), 30, 0.5)
    assert redis_says(port, b"PING\r\n").startswith(b"-NOAUTH")
    listening = run(["ss", "-Hltn", f"sport = :{port}"]).stdout.split("\n")
    local = sorted(line.split()[3] for line in listening if line.strip())
    assert local == [f"127.0.0.1:{port}"]


def test_the_stacks_redis_acl_lets_knockgate_reach_its_fleets_keys_only(stack: Stack) -> None:
    """AUTH as knockgate with the real password works; anything beyond the fleet's keys and
    the commands a fleet uses is NOPERM."""
    port = stack.redis_port
    wait_for("the stack's Redis answers", lambda: redis_says(port, b"PING\r\n"), 30, 0.5)
    replies = redis_session(
        port,
        ["AUTH", "knockgate", stack.password],
        ["SET", f"kg:{{{FLEET}}}:kgsw-probe", "1", "PX", "1000"],
        ["SET", "other-key", "1"],
        ["SET", "kg:{other}:x", "1"],
        ["CONFIG", "GET", "*"],
        ["KEYS", "*"],
        ["FLUSHALL"],
    )
    assert replies[0] == b"+OK"
    assert replies[1] == b"+OK"
    for reply in replies[2:]:
        assert reply.startswith(b"-NOPERM"), replies
    wrong = redis_session(port, ["AUTH", "knockgate", "not-the-password"])
    assert wrong[0].startswith(b"-WRONGPASS"), wrong


def redis_session(port: int, *commands: list[str]) -> list[bytes]:
    """Each command in RESP on one connection: the first line of each reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        reader = conn.makefile("rb")
        replies = []
        for command in commands:
            request = f"*{len(command)}\r\n".encode()
            for part in command:
                request += f"${len(part.encode())}\r\n{part}\r\n".encode()
            conn.sendall(request)
            replies.append(reader.readline().rstrip(b"\r\n"))
        return replies


def redis_says(port: int, request: bytes) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
            conn.sendall(request)
            return conn.recv(200)
    except OSError:
        return b""


def test_a_knock_from_the_client_opens_the_door(stack: Stack) -> None:
    wait_for(
        "the appliance captures on the client's link",
        lambda: re.search(rf"{HOST_IF}: capturing", stack.logs()),
        30,
        0.5,
        stack.logs,
    )
    assert connect_state() in ("refused", "timeout"), "the door's port was open before a knock"
    assert not stack.served
    knock = [sys.executable, "-m", "appliance.cli", "knock", HOST_ADDRESS, *KNOCK]
    env = f"PYTHONPATH={REPO}"
    proc = in_client("env", env, *knock)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait_for(
        "the door opens for the client", lambda: connect_state() == "open", 10, 0.2, stack.logs
    )
    assert CLIENT_ADDRESS in stack.served
    grant = grant_for(CLIENT_ADDRESS, DOOR_PORT)
    assert grant is not None and grant["proto"] == "tcp"

    def published() -> bool:
        status = stack.status() or {}
        fleet = status.get("fleet")
        return isinstance(fleet, dict) and fleet.get("published") == 1

    wait_for("the grant is published to the fleet's Redis", published, 10, 0.2, stack.logs)


# ---------------------------------------------------------------------------- the Redis image


def redis_image_exit(
    password: str | None, tmp_path: Path, *argv: str, env: tuple[str, ...] = ()
) -> tuple[int, str]:
    """``knockgate-redis:local`` run with ``password`` as its secret file (None: no file), on
    a network of its own: its exit status once it ended (a Redis that serves never ends:
    ``docker wait`` times out) and its log."""
    name = f"kgsw-redis-{os.getpid()}"
    args = ["run", "-d", "--name", name, "--network", "none", "--read-only", "--tmpfs", "/run"]
    if password is not None:
        secret = tmp_path / "redis-password"
        secret.write_text(password)
        args += ["-v", f"{secret}:/run/secrets/knockgate-redis-password:ro"]
    for setting in env:
        args += ["-e", setting]
    docker("rm", "-f", name, check=False)
    try:
        docker(*args, "knockgate-redis:local", *argv)
        try:
            status = int(docker("wait", name, timeout=15).stdout.strip())
        except subprocess.TimeoutExpired:
            status = -1  # still running: it serves (the entrypoint's bug before exit 2 held)
        logs = docker("logs", name, check=False)
        return status, logs.stdout + logs.stderr
    finally:
        docker("rm", "-f", "-v", name, check=False)


@pytest.mark.parametrize(
    ("password", "said"),
    [
        (None, "no readable password file"),
        ("short\n", "shorter than 16 characters"),
        ("", "shorter than 16 characters"),
        ("a" * 32 + "\n" + "b" * 32 + "\n", "more than one line"),
        (" " + "a" * 32 + "\n", "spaces"),
    ],
    ids=["missing", "short", "empty", "two-lines", "leading-space"],
)
def test_the_redis_image_refuses_to_serve_without_a_good_password(
    images: None, tmp_path: Path, password: str | None, said: str
) -> None:
    """Exit status 2 and a clear line, never a Redis whose knockgate user has the empty
    password's hash (anyone could AUTH and write the fleet's grants)."""
    status, logs = redis_image_exit(password, tmp_path)
    assert status == 2, logs
    assert said in logs, logs
    assert "listening" not in logs and "Ready to accept" not in logs, logs


@pytest.mark.parametrize("bind", ["0.0.0.0", "127.0.0.1 198.18.71.1", "::", "127.0.0.1.example"])
def test_the_redis_image_binds_loopback_only(images: None, tmp_path: Path, bind: str) -> None:
    """Plain TCP carries the password and every grant in clear: one host only."""
    status, logs = redis_image_exit(
        "k" * 32 + "\n", tmp_path, env=(f"KNOCKGATE_REDIS_BIND={bind}",)
    )
    assert status == 2, logs
    assert "is not a loopback address" in logs, logs


@pytest.mark.parametrize("password", [None, "short\n"], ids=["missing", "short"])
def test_the_redis_health_check_fails_without_a_good_password(
    images: None, tmp_path: Path, password: str | None
) -> None:
    status, logs = redis_image_exit(password, tmp_path, "ping")
    assert status == 2, logs


def test_the_redis_image_serves_with_a_one_line_password_and_a_crlf(
    images: None, tmp_path: Path
) -> None:
    """A password file written on Windows (CRLF) is the same password: it starts."""
    name = f"kgsw-redis-{os.getpid()}"
    secret = tmp_path / "redis-password"
    secret.write_text("k" * 32 + "\r\n")
    docker("rm", "-f", name, check=False)
    try:
        docker(
            "run", "-d", "--name", name, "--network", "none", "--read-only", "--tmpfs", "/run",
            "-v", f"{secret}:/run/secrets/knockgate-redis-password:ro", "knockgate-redis:local",
        )  # fmt: skip

        def logs() -> str:
            proc = docker("logs", name, check=False)
            return proc.stdout + proc.stderr

        wait_for("Redis serves", lambda: "Ready to accept connections" in logs(), 15, 0.2, logs)
        health = docker("exec", name, "knockgate-redis-entrypoint", "ping", check=False)
        assert health.stdout.strip() == "PONG", health.stdout + health.stderr
    finally:
        docker("rm", "-f", "-v", name, check=False)


# ---------------------------------------------------------------------------- the Kubernetes pod

DAEMONSET = REPO / "deploy" / "kubernetes" / "knockgate-daemonset.yaml"
POD_CONFIG = """\
fleet:
  name: k8s
  redis: redis://knockgate@127.0.0.1:1/0
  password_file: /run/secrets/knockgate-redis-password
  on_outage: refuse
doors:
  ssh:
    knock: {sequence: [41731, 45219/udp, 43310], seq_timeout: 5}
    open: {ports: [22/tcp], duration: 30}
"""


@pytest.mark.parametrize("valid", [True, False], ids=["config", "placeholder-config"])
def test_the_image_runs_as_the_daemonsets_pod_and_status_answers(
    images: None, tmp_path: Path, valid: bool
) -> None:
    """No cluster here: ``docker run`` of knockgate:local as the DaemonSet's pod runs it —
    every capability dropped but the manifest's list, no new privileges, read-only root,
    /run world-writable as an emptyDir is (1777), no Docker socket, config and password
    ``0440`` group 64110 and that group added (fsGroup). Its own network (not the host's:
    the firewall it manages is its own). ``knockgate status`` (the liveness probe's command)
    answers, the monitor and packet process dropped to their users, and /run is 0755 again.
    With the shipped placeholder knock instead: the liveness probe passes (the pod waits for
    a fixed config, no restart loop) while no daemon runs and nothing is opened."""
    daemonset = next(
        doc for doc in yaml.safe_load_all(DAEMONSET.read_text()) if doc["kind"] == "DaemonSet"
    )
    pod = daemonset["spec"]["template"]["spec"]
    (spec,) = pod["containers"]
    context = spec["securityContext"]
    assert context["capabilities"]["drop"] == ["ALL"]
    assert context["allowPrivilegeEscalation"] is False
    group = str(pod["securityContext"]["fsGroup"])
    run_dir = tmp_path / "run"  # an emptyDir is a directory of the node's, mode 0777/1777
    run_dir.mkdir()
    run_dir.chmod(0o1777)
    config = tmp_path / "knockgate.yaml"
    text = (
        POD_CONFIG
        if valid
        else POD_CONFIG.replace("41731, 45219/udp, 43310", "REPLACE-with-a-random-knock")
    )
    config.write_text(text)
    password = tmp_path / "redis-password"
    password.write_text(secrets.token_hex(24) + "\n")
    for path in (config, password):
        os.chown(path, 0, int(group))
        path.chmod(0o440)
    name = f"kgsw-pod-{os.getpid()}"
    caps = [arg for cap in context["capabilities"]["add"] for arg in ("--cap-add", cap)]
    docker("rm", "-f", name, check=False)
    try:
        docker(
            "run", "-d", "--name", name, "--network", "none", "--read-only",
            "--cap-drop", "ALL", *caps, "--security-opt", "no-new-privileges",
            "--group-add", group, "--user", str(context["runAsUser"]),
            "-v", f"{run_dir}:/run", "--tmpfs", "/tmp", "--tmpfs", "/etc/knockgate",
            "--tmpfs", "/var/lib/knockgate",
            "-v", f"{config}:/etc/knockgate/knockgate.yaml:ro",
            "-v", f"{password}:/run/secrets/knockgate-redis-password:ro",
            "-e", "KNOCKGATE_CONFIG=/etc/knockgate/knockgate.yaml", "knockgate:local",
        )  # fmt: skip

        def logs() -> str:
            proc = docker("logs", name, check=False)
            return proc.stdout + proc.stderr

        def probe() -> bool:
            proc = docker("exec", name, *spec["livenessProbe"]["exec"]["command"], check=False)
            return proc.returncode == 0

        def status() -> str | None:
            proc = docker("exec", name, "knockgate", "status", check=False)
            return proc.stdout if proc.returncode == 0 else None

        if not valid:
            wait_for("the config is refused", lambda: "is not a port" in logs(), 30, 0.5, logs)
            assert probe(), logs()
            assert status() is None
            assert docker("exec", name, "nft", "list", "tables").stdout.strip() == ""
            return
        text = wait_for("knockgate status answers in the pod", status, 30, 0.5, logs)
        assert probe()
        assert "packet process: pid" in text and "user knockgate-packet" in text, text
        assert "fleet k8s:" in text, text  # the password file was readable: no read error
        assert "monitor runs as knockgate (uid 64111)" in logs()
        assert "Operation not permitted" not in logs()
        mode = docker("exec", name, "stat", "-c", "%a %U", "/run").stdout.strip()
        assert mode == "755 root"
    finally:
        docker("rm", "-f", "-v", name, check=False)
