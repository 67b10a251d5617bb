#!/usr/bin/env python3
"""Knock-to-service-ready for the bundled ssh service, cold and warm, on the Docker testbed.

Not a test: it prints Markdown tables. Run from the repository root, as root, with the
images built (knockgate:local, knockgate/ssh:local, knockgate/testbed-client:local; web
and mail only for their sizes):

    python testbed/bench/service_bench.py [--trials 20] [--quick] [--log-dir DIR]

(--quick: 3 trials per variant; --log-dir: keep the appliance's logs and Docker's events
for knockgate-ssh there, as evidence.) About 25 s quick, 2 minutes with 20 trials.

The set-up is the testbed's (testbed/compose.yaml), with names of its own: the Compose
project ``kgsb<pid>`` (written to a temporary directory), the appliance (knockgate:local,
host network, its config at /etc/knockgate/service-bench.yaml, so its owner label is not
the testbed's) and one knocker, ``client``, 198.18.66.10 on the bridge ``kgsb0``
(198.18.66.0/24), which knocks and connects to the bridge's gateway, 198.18.66.1.

One trial: ``service_probe.py knock`` in the client (one process: it sends the knock
sequence with plain sockets, then connects to 198.18.66.1:2222 over and over until it
reads a line starting with ``SSH-``, at most 10 s) gives the time from the last knock
packet sent to the banner received. Then a close knock (door ``ssh-close``), and the
next trial starts once the appliance logged the stop and ``docker inspect`` shows the
container stopped (cold: ``exited``) or paused (warm).

* first launch: the container does not exist yet (create + start); the host-key volume
  was filled beforehand, so no key generation is in it;
* cold: the container exists and is stopped; a knock starts it (``docker start``);
* warm: the appliance restarted with ``keep_warm: true``: the container is kept paused,
  a knock only unpauses it.

Also printed: the appliance's own ``ssh: ready in N ms`` lines, and per variant a split of
the interval from the appliance's JSON log (ms timestamps) and Docker's events: the knock
seen (``OPEN SESAME``, the packet's time), the Docker action done (event ``start`` /
``unpause`` / ``create``), ready (the log line), granted (the ``open 2222/tcp`` line), the
banner at the client. Same host, same clock.

And, before the appliance starts, a Docker floor: a container of the same image with the
same volumes and a published port (127.0.0.1, random), started, paused and unpaused
straight through the Engine API (no knockgate), its banner read from the container's
address every 2 ms; then the same through the appliance's own code (DockerRuntime calls in
ServiceLauncher._ensure_running's order, and readiness.wait_ready) in a one-off
knockgate:local container. The difference to the knock measurements is the appliance.

One run at a time, and never together with the testbed tests: the bench takes the
testbed's lock (/run/lock/knockgate-testbed.lock): both use the container name
knockgate-ssh, host port 2222 and knockgate's table ``inet knockgate``. It refuses to start
when that table exists and no killed bench run explains it (a knockgate runs on this
host), or when port 2222 is taken.

Everything is removed at the end, also on failure and on Ctrl-C/SIGTERM: the Compose
project (``down -v -t 0``), the service containers labelled with this appliance's owner,
the bench's own containers and volumes, and ``table inet knockgate`` (once the appliance
is gone). A run that was killed leaves its project behind; the next run removes it (a
``kgsb<pid>`` project whose pid is gone, its volumes and temporary directory) before it
starts.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DOCKER = os.environ.get("KG_DOCKER", "/usr/bin/docker")
HERE = Path(__file__).resolve().parent
PROBE = HERE / "service_probe.py"

PROJECT = f"kgsb{os.getpid()}"
BRIDGE = "kgsb0"
SUBNET = "198.18.66.0/24"
GATEWAY = "198.18.66.1"
CLIENT = "198.18.66.10"
APPLIANCE_CONFIG = "/etc/knockgate/service-bench.yaml"
OWNER = hashlib.sha256(APPLIANCE_CONFIG.encode()).hexdigest()[:12]  # appliance/cli.py
CONTAINER = "knockgate-ssh"
SSH_PORT = 2222
KEYS_VOLUME = f"{PROJECT}-ssh-keys"
HOSTKEYS_VOLUME = f"{PROJECT}-ssh-hostkeys"
LOCK = "/run/lock/knockgate-testbed.lock"  # the testbed's: one of the two at a time
LABEL = "knockgate.bench"
BASELINE = f"{PROJECT}-baseline"  # the Docker floor's own container (no knockgate)
DOCKER_SOCKET = "/var/run/docker.sock"
API = "/v1.41"  # what appliance/services/docker_runtime.py pins

SSH_KNOCK = "41873/tcp,39211/udp,45007/tcp"
CLOSE_KNOCK = "47119/tcp,36641/udp,43383/tcp"
GRANT_SECONDS = 8  # the close knock ends every grant long before
PROBE_TIMEOUT = 10.0

IMAGES = {
    "appliance": "knockgate:local",
    "client": "knockgate/testbed-client:local",
    "ssh": "knockgate/ssh:local",
}
SIZE_IMAGES = (
    "knockgate:local",
    "knockgate/ssh:local",
    "knockgate/web:local",
    "knockgate/mail:local",
)
TARGETS = {"warm": 150.0, "cold": 700.0}
APPLIANCE_SIZE_TARGET_MB = 350.0

CONFIG = """\
# service_bench.py ({variant}): the ssh service of testbed/config/knockgate.yaml behind a
# knock, with a close door; the close knock ends each trial.
interfaces: [{bridge}]
log: {{format: json, level: info}}   # JSON: log times with milliseconds
firewall:
  backend: nftables
  scan: {{ports: 12, window: 2, hold: 5}}
on_shutdown: keep
services:
  ssh:
    image: knockgate/ssh:local
    container_port: 22
    host_port: {port}
    volumes:
      - {keys}:/keys:ro
      - {hostkeys}:/etc/ssh/hostkeys
    ready: {{banner: "SSH-", timeout: 20}}
    idle_timeout: 120
    max_lifetime: 1800
    keep_warm: {keep_warm}
doors:
  ssh:
    knock: {{sequence: [41873, 39211/udp, 45007], seq_timeout: 5, tcpflags: "syn,!ack"}}
    service: {{name: ssh, duration: {grant}}}
  ssh-close:
    knock: {{sequence: [47119, 36641/udp, 43383], seq_timeout: 5, tcpflags: "syn,!ack"}}
    close: [ssh]
"""

COMPOSE = """\
# service_bench.py: the testbed's appliance and one knocker, with names of their own.
name: {project}
services:
  appliance:
    image: knockgate:local
    network_mode: host
    cap_add: [NET_ADMIN, NET_RAW]
    environment:
      KNOCKGATE_CONFIG: {config_path}
      DOCKER_HOST: unix:///run/knockgate-docker/docker.sock
    volumes:
      - /var/run/docker.sock:/run/knockgate-docker/docker.sock   # the launcher's only
      - ${{KGSB_CONFIG:-./cold.yaml}}:{config_path}:ro
    tmpfs: [/etc/knockgate]
    labels:
      {label}: appliance
    depends_on: [client]
    stop_grace_period: 10s
  client:
    image: knockgate/testbed-client:local
    init: true
    command: [sleep, infinity]
    networks:
      knockers:
        ipv4_address: {client}
    volumes:
      - {probe}:/bench/service_probe.py:ro
    labels:
      {label}: client
networks:
  knockers:
    driver: bridge
    driver_opts:
      com.docker.network.bridge.name: {bridge}
    ipam:
      config:
        - subnet: {subnet}
          gateway: {gateway}
    labels:
      {label}: network
"""


class BenchError(Exception):
    pass


class Interrupted(BaseException):
    pass


# ---------------------------------------------------------------------------- helpers


def run(
    argv: list[str],
    *,
    check: bool = True,
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc


def docker(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run([DOCKER, *args], **kwargs)


def wait_for(what: str, probe: Callable[[], Any], timeout: float, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise BenchError(f"not within {timeout:g} s: {what}")
        time.sleep(every)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def nft_table_exists() -> bool:
    return run(["nft", "list", "table", "inet", "knockgate"], check=False).returncode == 0


def owned_containers() -> list[str]:
    args = ["ps", "-aq", "--filter", "label=knockgate.service"]
    args += ["--filter", f"label=knockgate.owner={OWNER}"]
    return docker(*args, check=False).stdout.split()


def container_state(name: str = CONTAINER) -> str:
    proc = docker("inspect", "-f", "{{.State.Status}}", name, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else "missing"


def die_with_parent() -> None:
    """In a child, before exec: SIGTERM when the bench dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# ---------------------------------------------------------------------------- the bench


@dataclass
class Trial:
    variant: str
    latency_ms: float | None
    knock_wall: float
    banner_wall: float | None
    attempts: int
    refused: int
    line: str
    accepted_ms: float | None = None
    error: str | None = None


@dataclass
class Phase:
    name: str  # "first", "cold", "warm"
    trials: list[Trial] = field(default_factory=list)


class Bench:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.compose_file = workdir / "compose.yaml"
        self.configs = {v: workdir / f"{v}.yaml" for v in ("cold", "warm")}
        self.appliance = f"{PROJECT}-appliance-1"
        self.client = f"{PROJECT}-client-1"
        self.current = "cold"
        self.logs: dict[str, str] = {}  # variant -> the appliance's log (one container each)
        self.events: list[dict[str, Any]] = []
        self.events_proc: subprocess.Popen[bytes] | None = None
        self.events_file: Any = None
        self.started_wall = time.time()
        self.appliance_started = False  # from here on, table inet knockgate is ours

    # -- files and compose

    def write_files(self) -> None:
        for variant, path in self.configs.items():
            path.write_text(
                CONFIG.format(
                    variant=variant,
                    bridge=BRIDGE,
                    port=SSH_PORT,
                    keys=KEYS_VOLUME,
                    hostkeys=HOSTKEYS_VOLUME,
                    keep_warm="true" if variant == "warm" else "false",
                    grant=GRANT_SECONDS,
                )
            )
        self.compose_file.write_text(
            COMPOSE.format(
                project=PROJECT,
                config_path=APPLIANCE_CONFIG,
                label=LABEL,
                client=CLIENT,
                probe=PROBE,
                bridge=BRIDGE,
                subnet=SUBNET,
                gateway=GATEWAY,
            )
        )

    def compose(self, *args: str, variant: str | None = None, timeout: float = 180) -> None:
        env = dict(os.environ)
        env["KGSB_CONFIG"] = str(self.configs[variant or self.current])
        argv = [DOCKER, "compose", "-f", str(self.compose_file), "-p", PROJECT, *args]
        run(argv, env=env, timeout=timeout)

    def appliance_log(self) -> str:
        proc = docker("logs", self.appliance, check=False)
        return proc.stdout + proc.stderr

    def records(self, text: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in (self.appliance_log() if text is None else text).splitlines():
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
        return found

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        return sum(1 for r in self.records() if regex.search(str(r.get("message", ""))))

    def wait_log(self, pattern: str, after: int, timeout: float) -> None:
        try:
            wait_for(f"log /{pattern}/", lambda: self.count(pattern) > after, timeout, 0.05)
        except BenchError as error:
            tail = "\n".join(self.appliance_log().splitlines()[-15:])
            raise BenchError(f"{error}\nappliance log:\n{tail}") from None

    def wait_state(self, want: str, timeout: float = 15) -> None:
        wait_for(f"{CONTAINER} {want}", lambda: container_state() == want, timeout, 0.05)

    # -- set-up

    def prepare_volumes(self) -> None:
        for volume in (KEYS_VOLUME, HOSTKEYS_VOLUME):
            docker("volume", "create", "--label", f"{LABEL}={PROJECT}", volume)
        # Host keys made once, beforehand (the entry script, then `sshd -t` checks the
        # config and exits): no launch measured here spends time generating keys.
        docker(
            "run", "--rm", "--network", "none", "--name", f"{PROJECT}-keygen",
            "--label", f"{LABEL}={PROJECT}",
            "-v", f"{KEYS_VOLUME}:/keys:ro", "-v", f"{HOSTKEYS_VOLUME}:/etc/ssh/hostkeys",
            IMAGES["ssh"], "-t",
            timeout=120,
        )  # fmt: skip

    def up(self, variant: str) -> None:
        self.current = variant
        self.appliance_started = True
        if variant == "cold":
            self.compose("up", "-d", "--no-build")
        else:  # the appliance re-created with the other config; the client stays
            self.compose("up", "-d", "--no-build", "--no-deps", "appliance")
        self.wait_log(rf"^{BRIDGE}: capturing", 0, 40)
        time.sleep(0.5)  # adoption and the first address scan settle

    # -- trials

    def probe(self) -> dict[str, Any]:
        proc = docker(
            "exec", self.client, "python3", "/bench/service_probe.py", "knock",
            "--gateway", GATEWAY, "--steps", SSH_KNOCK, "--port", str(SSH_PORT),
            "--expect", "SSH-", "--timeout", str(PROBE_TIMEOUT),
            check=False, timeout=PROBE_TIMEOUT + 30,
        )  # fmt: skip
        try:
            found: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
            return found
        except (ValueError, IndexError):
            raise BenchError(f"probe failed: {proc.stdout}{proc.stderr}") from None

    def close_knock(self) -> None:
        docker(
            "exec", self.client, "python3", "/bench/service_probe.py", "send",
            "--gateway", GATEWAY, "--steps", CLOSE_KNOCK, timeout=30,
        )  # fmt: skip

    def grant_present(self) -> bool:
        """Does knockgate's grants4 set hold CLIENT . tcp . 2222?"""
        proc = run(["nft", "-j", "list", "set", "inet", "knockgate", "grants4"], check=False)
        if proc.returncode != 0:
            return False
        for item in json.loads(proc.stdout).get("nftables", []):
            for elem in item.get("set", {}).get("elem", []):
                inner = elem.get("elem", elem) if isinstance(elem, dict) else elem
                value = inner.get("val", inner) if isinstance(inner, dict) else inner
                concat = value.get("concat", []) if isinstance(value, dict) else []
                if len(concat) == 3 and concat[0] == CLIENT and concat[2] == SSH_PORT:
                    return True
        return False

    def trial(self, variant: str, rest_state: str) -> Trial:
        """Knock, measure, close; leave the service in ``rest_state`` again."""
        stopped_word = "paused" if rest_state == "paused" else "stopped"
        stop_pattern = rf"^ssh: {stopped_word} \(close knock from {re.escape(CLIENT)}\)"
        stops = self.count(stop_pattern)
        wait_for("no grant left for the client", lambda: not self.grant_present(), 15, 0.1)
        result = self.probe()
        latency = result.get("latency")
        trial = Trial(
            variant=variant,
            latency_ms=None if latency is None else latency * 1000,
            knock_wall=float(result["knock_wall"]),
            banner_wall=result.get("banner_wall"),
            attempts=int(result.get("attempts", 0)),
            refused=int(result.get("refused", 0)),
            line=str(result.get("line", "")),
            accepted_ms=None if result.get("accepted") is None else result["accepted"] * 1000,
        )
        if latency is None:
            trial.error = f"no banner within {PROBE_TIMEOUT:g} s ({result})"
            # The launch may still be on its way: let it finish before the close knock.
            with contextlib.suppress(BenchError):
                self.wait_log(r"^ssh: ready in|service ssh unavailable", 0, 25)
        time.sleep(0.2)
        self.close_knock()
        self.wait_log(stop_pattern, stops, 20)
        self.wait_state(rest_state)
        time.sleep(0.3)  # quiet before the next knock
        return trial

    def run_phase(self, variant: str, trials: int, progress: bool = True) -> list[Trial]:
        rest = "paused" if variant == "warm" else "exited"
        done = []
        for index in range(trials):
            trial = self.trial(variant, rest)
            done.append(trial)
            if progress:
                shown = trial.error or f"{trial.latency_ms:.0f} ms"
                print(f"  {variant} {index + 1}/{trials}: {shown}", file=sys.stderr, flush=True)
        return done

    def watch_events(self) -> None:
        """Docker's events for knockgate-ssh, streamed to a file from now on (the engine
        keeps only its last 256 events: asking afterwards would lose most of them)."""
        self.events_file = (self.workdir / "events.jsonl").open("w")
        self.events_proc = subprocess.Popen(
            [DOCKER, "events", "--filter", f"container={CONTAINER}", "--format", "{{json .}}"],
            stdout=self.events_file,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )

    def collect_events(self) -> None:
        """Stop the event stream (this run's own process) and read what it wrote."""
        if self.events_proc is None:
            return
        time.sleep(0.3)  # the last events reach the stream
        self.events_proc.terminate()
        try:
            self.events_proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.events_proc.kill()
            self.events_proc.wait(timeout=10)
        self.events_proc = None
        if self.events_file is not None:
            self.events_file.close()
        for line in (self.workdir / "events.jsonl").read_text().splitlines():
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))


# ---------------------------------------------------------------------------- Docker floor

# Run in a one-off knockgate:local container (host network, the engine's socket): the
# appliance's own DockerRuntime calls, in the order ServiceLauncher._ensure_running makes
# them, and its own wait_ready (readiness.py), on the floor's container. argv: container
# name, trials. Prints {step: [ms, ...]}.
SDK_STEPS = """\
import json, sys, time
from appliance.config.schema import Readiness
from appliance.services.docker_runtime import DockerRuntime
from appliance.services.readiness import wait_ready
from appliance.services.runtime import Container

rt = DockerRuntime()
name, trials = sys.argv[1], int(sys.argv[2])
box = [Container(id=name, name=name, service="floor", state="missing")]
out = {}
banner = Readiness(kind="banner", expect="SSH-", timeout=20)

def timed(step, action):
    began = time.perf_counter()
    result = action()
    out.setdefault(step, []).append((time.perf_counter() - began) * 1000)
    return result

def settle(state):
    deadline = time.monotonic() + 15
    while rt.refresh(box[0]).state != state:
        if time.monotonic() > deadline:
            raise SystemExit(f"not {state}")
        time.sleep(0.05)
    box[0] = rt.refresh(box[0])

def launch(action, label):
    began = time.perf_counter()
    box[0] = timed("refresh (before)", lambda: rt.refresh(box[0]))
    timed(label, lambda: action(box[0]))
    box[0] = timed("refresh (after)", lambda: rt.refresh(box[0]))
    assert wait_ready(banner, box[0].address, 22), "not ready"
    out.setdefault(label.split()[0] + " -> ready, as ensure_ready", []).append(
        (time.perf_counter() - began) * 1000
    )

settle("exited")
for _ in range(trials):
    launch(rt.start, "start (inspect + start)")
    rt.stop(box[0])
    settle("exited")
    time.sleep(0.2)
rt.start(box[0])
settle("running")
assert wait_ready(banner, box[0].address, 22)
for _ in range(trials):
    rt.pause(box[0])
    time.sleep(0.3)
    launch(rt.unpause, "unpause (inspect + unpause)")
rt.stop(box[0])
print(json.dumps(out))
"""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=60)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(60)
        sock.connect(self.path)
        self.sock = sock


class Engine:
    """The Engine API over its socket, one kept-alive connection (as the SDK's session)."""

    def __init__(self, path: str = DOCKER_SOCKET) -> None:
        self.conn = _UnixConnection(path)

    def call(self, method: str, path: str) -> tuple[Any, float]:
        """(decoded answer or None, milliseconds the call took)."""
        began = time.perf_counter()
        self.conn.request(method, API + path, headers={"Content-Length": "0"})
        response = self.conn.getresponse()
        body = response.read()
        took = (time.perf_counter() - began) * 1000
        if response.status >= 300 and response.status != 304:
            raise BenchError(f"engine: {method} {path}: {response.status} {body[:200]!r}")
        return (json.loads(body) if body.strip() else None), took

    def close(self) -> None:
        self.conn.close()


def banner_after(address: str, began: float, timeout: float = 10.0) -> float:
    """ms from ``began`` until ``address``:22 answers ``SSH-`` (tries every 2 ms)."""
    deadline = began + timeout
    while time.perf_counter() < deadline:
        try:
            with socket.create_connection((address, 22), timeout=1) as sock:
                data = b""
                while b"\n" not in data and len(data) < 256:
                    chunk = sock.recv(256)
                    if not chunk:
                        break
                    data += chunk
                if data.startswith(b"SSH-"):
                    return (time.perf_counter() - began) * 1000
        except OSError:
            pass
        time.sleep(0.002)
    raise BenchError(f"baseline: no banner from {address}:22 within {timeout:g} s")


def docker_floor(trials: int) -> dict[str, list[float]]:
    """The same image, volumes and kind of port publishing (docker-proxy), driven straight
    through the Engine API without knockgate: what a launch cannot go below here."""
    docker(
        "create", "--name", BASELINE, "--label", f"{LABEL}={PROJECT}",
        "-p", "127.0.0.1::22",  # a published port (loopback, random): as the service's
        "-v", f"{KEYS_VOLUME}:/keys:ro", "-v", f"{HOSTKEYS_VOLUME}:/etc/ssh/hostkeys",
        IMAGES["ssh"],
    )  # fmt: skip
    engine = Engine()
    found: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        found.setdefault(name, []).append(value)

    def address() -> str:
        attrs, took = engine.call("GET", f"/containers/{BASELINE}/json")
        add("inspect call", took)
        return str(attrs["NetworkSettings"]["Networks"]["bridge"]["IPAddress"])

    try:
        for _ in range(trials):
            began = time.perf_counter()
            _, took = engine.call("POST", f"/containers/{BASELINE}/start")
            add("start call", took)
            add("start -> banner (container address)", banner_after(address(), began))
            engine.call("POST", f"/containers/{BASELINE}/stop?t=5")
            wait_for("baseline stopped", lambda: container_state(BASELINE) == "exited", 15, 0.05)
            time.sleep(0.2)
        engine.call("POST", f"/containers/{BASELINE}/start")
        ip = address()
        banner_after(ip, time.perf_counter())
        for _ in range(trials):
            engine.call("POST", f"/containers/{BASELINE}/pause")
            time.sleep(0.3)
            began = time.perf_counter()
            _, took = engine.call("POST", f"/containers/{BASELINE}/unpause")
            add("unpause call", took)
            add("unpause -> banner (container address)", banner_after(ip, began))
        for _ in range(trials):  # running: what sshd itself takes per connection
            time.sleep(0.2)
            add(
                "running: connect -> banner (container address)",
                banner_after(ip, time.perf_counter()),
            )
        engine.call("POST", f"/containers/{BASELINE}/stop?t=5")
        wait_for("baseline stopped", lambda: container_state(BASELINE) == "exited", 15, 0.05)
        proc = docker(
            "run", "--rm", "--name", f"{PROJECT}-sdk", "--label", f"{LABEL}={PROJECT}",
            "--network", "host", "-v", f"{DOCKER_SOCKET}:{DOCKER_SOCKET}",
            "--entrypoint", "python3", IMAGES["appliance"], "-c", SDK_STEPS,
            BASELINE, str(trials),
            check=False, timeout=300,
        )  # fmt: skip
        try:
            sdk = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise BenchError(f"the SDK steps failed: {proc.stdout}{proc.stderr}") from None
        for step, values in sdk.items():
            found[f"appliance code: {step}"] = [float(v) for v in values]
    finally:
        engine.close()
        docker("rm", "-f", "-v", BASELINE, check=False)
    return found


# ---------------------------------------------------------------------------- analysis


def ready_ms(records: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(log time, N) of every ``ssh: ready in N ms`` line."""
    found = []
    for r in records:
        match = re.match(r"ssh: ready in (\d+) ms", str(r.get("message", "")))
        if match:
            found.append((float(r["time"]), float(match.group(1))))
    return found


def split(
    trials: list[Trial], records: list[dict[str, Any]], events: list[dict[str, Any]]
) -> dict[str, list[float]]:
    """Per trial: where the time went (ms), from the log's and Docker's timestamps."""
    opened = [
        (float(r.get("at", r["time"])), float(r["time"]))
        for r in records
        if r.get("event") == "Opened" and r.get("door") == "ssh" and r.get("address") == CLIENT
    ]
    granted = [
        float(r["time"])
        for r in records
        if r.get("event") == "Grant" and r.get("door") == "ssh" and r.get("address") == CLIENT
    ]
    readies = ready_ms(records)
    actions = [
        (int(e.get("timeNano", 0)) / 1e9, str(e.get("Action") or e.get("status")))
        for e in events
        if (e.get("Action") or e.get("status")) in ("create", "start", "unpause")
    ]
    parts: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        parts.setdefault(name, []).append(value * 1000)

    for trial in trials:
        if trial.banner_wall is None:
            continue
        lo, hi = trial.knock_wall - 0.05, trial.banner_wall + 0.05
        seen = next((o for o in opened if lo <= o[0] <= hi), None)
        ready = next((r for r in readies if lo <= r[0] <= hi), None)
        grant = next((g for g in granted if lo <= g <= hi), None)
        acts = [a for a in actions if lo <= a[0] <= hi]
        if seen is None or ready is None or grant is None:
            continue
        add("knock seen (OPEN SESAME)", max(0.0, seen[0] - trial.knock_wall))
        add("seen -> launch begins", (ready[0] - ready[1] / 1000) - seen[0])
        if acts:
            last = acts[-1][0]
            add("launch begins -> Docker action done", last - (ready[0] - ready[1] / 1000))
            add("Docker action -> ready (log)", ready[0] - last)
        add("ready -> grant applied (log)", grant - ready[0])
        add("grant -> banner at the client", trial.banner_wall - grant)
        if trial.accepted_ms is not None:
            accepted = trial.knock_wall + trial.accepted_ms / 1000
            add("  of which: grant -> first connect accepted", accepted - grant)
            add("  of which: accepted -> banner", trial.banner_wall - accepted)
        add("total (client)", trial.banner_wall - trial.knock_wall)
    return parts


def action_counts(trials: list[Trial], events: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for trial in trials:
        if trial.banner_wall is None:
            continue
        for e in events:
            when = int(e.get("timeNano", 0)) / 1e9
            action = str(e.get("Action") or e.get("status"))
            if trial.knock_wall - 0.05 <= when <= trial.banner_wall + 0.05:
                counts[action] = counts.get(action, 0) + 1
    return ", ".join(f"{k}x{v}" for k, v in sorted(counts.items())) or "-"


def save_logs(bench: Bench, where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    for variant, text in bench.logs.items():
        (where / f"appliance-{variant}.log").write_text(text)
    (where / "docker-events.jsonl").write_text(
        "".join(json.dumps(event) + "\n" for event in bench.events)
    )
    print(f"{PROJECT}: logs in {where}", file=sys.stderr)


def image_sizes() -> list[tuple[str, float | None]]:
    sizes = []
    for image in SIZE_IMAGES:
        proc = docker("image", "inspect", "-f", "{{.Size}}", image, check=False)
        sizes.append((image, int(proc.stdout) / 1e6 if proc.returncode == 0 else None))
    return sizes


def report(
    bench: Bench, phases: dict[str, list[Trial]], floor: dict[str, list[float]], elapsed: float
) -> None:
    out = print
    out("\n## knock-to-service-ready, bundled ssh (knock sent -> `SSH-` banner, in the client)\n")
    out("| variant | trials | ok | median (ms) | p90 (ms) | min (ms) | max (ms) | target | met |")
    out("|---|---|---|---|---|---|---|---|---|")
    labels = {
        "first": "first launch (create + start)",
        "cold": "cold (stopped -> start)",
        "warm": "warm (paused -> unpause)",
    }
    for name, trials in phases.items():
        values = [t.latency_ms for t in trials if t.latency_ms is not None]
        target = TARGETS.get(name)
        if values:
            median = statistics.median(values)
            row: list[str] = [
                fmt(median),
                fmt(percentile(values, 0.9)),
                fmt(min(values)),
                fmt(max(values)),
            ]
            met = "-" if target is None else ("yes" if median <= target else "**no**")
        else:
            row, met = ["-"] * 4, "-" if target is None else "**no**"
        goal = "-" if target is None else f"median <= {target:g}"
        out(
            f"| {labels[name]} | {len(trials)} | {len(values)} | {' | '.join(row)} "
            f"| {goal} | {met} |"
        )
    failures = [t for trials in phases.values() for t in trials if t.error]
    for t in failures:
        out(f"\n- {t.variant}: {t.error}")

    out("\n## the appliance's `ssh: ready in N ms` (launch: Docker calls + readiness check)\n")
    out("| variant | lines | median (ms) | p90 (ms) | min (ms) | max (ms) |")
    out("|---|---|---|---|---|---|")
    for name, trials in phases.items():
        records = bench.records(bench.logs.get("warm" if name == "warm" else "cold", ""))
        values = []
        for trial in trials:
            if trial.banner_wall is None:
                continue
            lo, hi = trial.knock_wall - 0.05, trial.banner_wall + 0.05
            values += [n for when, n in ready_ms(records) if lo <= when <= hi]
        if values:
            cells = [statistics.median(values), percentile(values, 0.9), min(values), max(values)]
            out(f"| {labels[name]} | {len(values)} | {' | '.join(fmt(v) for v in cells)} |")
        else:
            out(f"| {labels[name]} | 0 | - | - | - | - |")

    out("\n## where the time goes (median ms per trial, from log and Docker event times)\n")
    columns: list[tuple[str, dict[str, list[float]]]] = []
    for name, trials in phases.items():
        records = bench.records(bench.logs.get("warm" if name == "warm" else "cold", ""))
        columns.append((name, split(trials, records, bench.events)))
    steps = [
        "knock seen (OPEN SESAME)",
        "seen -> launch begins",
        "launch begins -> Docker action done",
        "Docker action -> ready (log)",
        "ready -> grant applied (log)",
        "grant -> banner at the client",
        "  of which: grant -> first connect accepted",
        "  of which: accepted -> banner",
        "total (client)",
    ]
    out("| step | " + " | ".join(labels[n] for n, _ in columns) + " |")
    out("|---|" + "---|" * len(columns))
    for step in steps:
        shown = [
            fmt(statistics.median(parts[step]), 1) if parts.get(step) else "-"
            for _, parts in columns
        ]
        out(f"| {step} | " + " | ".join(shown) + " |")
    out(
        "| Docker events in the interval | "
        + " | ".join(action_counts(trials, bench.events) for trials in phases.values())
        + " |"
    )

    if floor:
        out("\n## Docker floor: the same image straight through the Engine API, no knockgate\n")
        out("| step | n | median (ms) | p90 (ms) | min (ms) | max (ms) |")
        out("|---|---|---|---|---|---|")
        for step, values in floor.items():
            cells = [statistics.median(values), percentile(values, 0.9), min(values), max(values)]
            out(f"| {step} | {len(values)} | {' | '.join(fmt(v, 1) for v in cells)} |")

    out("\n## image sizes (`docker image inspect`, MB = 10^6 bytes)\n")
    out("| image | size (MB) | target |")
    out("|---|---|---|")
    for image, size in image_sizes():
        if image == "knockgate:local":
            met = (
                "-"
                if size is None
                else ("met" if size < APPLIANCE_SIZE_TARGET_MB else "**not met**")
            )
            goal = f"< {APPLIANCE_SIZE_TARGET_MB:g} MB: {met}"
        else:
            goal = "-"
        out(f"| {image} | {fmt(size, 1)} | {goal} |")
    out(f"\nrun time: {elapsed:.0f} s")


# ---------------------------------------------------------------------------- life cycle


def prerequisites() -> None:
    if os.geteuid() != 0:
        raise BenchError("needs root (Docker engine, host nftables)")
    if docker("version", check=False, timeout=20).returncode != 0:
        raise BenchError(f"no Docker engine answers {DOCKER} (run testbed/setup-docker.sh)")
    version = docker("compose", "version", "--short", check=False).stdout.strip().lstrip("v")
    if not version.startswith("2."):
        raise BenchError("Compose v2 is missing (run testbed/setup-docker.sh)")
    if shutil.which("nft") is None:
        raise BenchError("nft is not installed")
    for image in IMAGES.values():
        if docker("image", "inspect", image, check=False).returncode != 0:
            raise BenchError(f"image {image} is missing: build it first (testbed/README.md)")


def compose_down_project(project: str) -> None:
    """A project by name only (its compose file may be gone with its temporary dir)."""
    down = ["compose", "-p", project, "down", "-v", "-t", "0", "--remove-orphans"]
    docker(*down, check=False, timeout=120)
    label = f"label=com.docker.compose.project={project}"
    ids = docker("ps", "-aq", "--filter", label, check=False).stdout.split()
    if ids:
        docker("rm", "-f", "-v", *ids, check=False)
    for net in docker("network", "ls", "-q", "--filter", label, check=False).stdout.split():
        docker("network", "rm", net, check=False)


def remove_leftovers() -> None:
    """A killed earlier bench run: its project, containers, volumes and table."""
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
    listing = docker("volume", "ls", "--filter", f"label={LABEL}", "--format", "{{.Name}}")
    volumes = listing.stdout.split()
    for volume in volumes:
        match = re.fullmatch(r"(kgsb\d+)-.*", volume)
        if match:
            projects.add(match.group(1))
    dead: list[str] = []
    for project in sorted(projects):
        match = re.fullmatch(r"kgsb(\d+)", project)
        if match and not pid_alive(int(match.group(1))) and project != PROJECT:
            compose_down_project(project)  # its appliance first: it launches no more
            dead.append(project)
    layout = f'{{{{.ID}}}} {{{{.Label "{LABEL}"}}}}'
    listing = docker("ps", "-a", "--filter", f"label={LABEL}", "--format", layout)
    for line in listing.stdout.splitlines():
        ident, _, project = line.partition(" ")
        match = re.fullmatch(r"kgsb(\d+)", project)
        if match and not pid_alive(int(match.group(1))) and project != PROJECT:
            docker("rm", "-f", "-v", ident, check=False)
    stale = owned_containers()
    if stale:
        docker("rm", "-f", "-v", *stale, check=False)
    for volume in volumes:  # once no container uses them
        if any(volume.startswith(f"{project}-") for project in dead):
            docker("volume", "rm", "-f", volume, check=False)
    if (dead or stale) and nft_table_exists():  # that run's appliance made it
        run(["nft", "delete", "table", "inet", "knockgate"], check=False)
    for path in Path(tempfile.gettempdir()).glob("kgsb*-*"):  # its temporary directory
        match = re.fullmatch(r"kgsb(\d+)-\w{8}", path.name)
        if match and path.is_dir() and not pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def preflight() -> None:
    if nft_table_exists():
        raise BenchError(
            "table inet knockgate exists and no killed bench run explains it: a knockgate "
            "seems to run on this host; stop it (or remove the table) first"
        )
    if container_state() != "missing":
        raise BenchError(f"a container named {CONTAINER} exists (not this bench's): remove it")
    listening = run(["ss", "-Hltn", f"sport = :{SSH_PORT}"], check=False).stdout.strip()
    if listening:
        raise BenchError(f"port {SSH_PORT} is in use on the host:\n{listening}")
    nets = docker("network", "ls", "--format", "{{.Name}}", check=False).stdout.split()
    for net in nets:
        layout = "{{range .IPAM.Config}}{{.Subnet}} {{end}}"
        subnets = docker("network", "inspect", "-f", layout, net, check=False).stdout
        if SUBNET in subnets.split():
            raise BenchError(f"Docker network {net} already uses {SUBNET}")


def teardown(bench: Bench | None) -> list[str]:
    """Each step guarded; returns what is left."""
    problems: list[str] = []
    ours = bench is not None and bench.appliance_started  # the table is this run's

    def compose_down() -> None:
        if bench is not None and bench.compose_file.exists():
            bench.compose("down", "-v", "-t", "0", "--remove-orphans", timeout=120)

    def remove_services() -> None:
        ids = owned_containers()
        if ids:
            docker("rm", "-f", "-v", *ids, check=False)

    def remove_table() -> None:  # after the appliance is gone: it cannot restore it
        if ours and nft_table_exists():
            run(["nft", "delete", "table", "inet", "knockgate"], check=False)

    def remove_own() -> None:
        names = (f"{PROJECT}-keygen", f"{PROJECT}-sdk", BASELINE)
        docker("rm", "-f", "-v", *names, check=False)

    steps: list[tuple[str, Callable[[], Any]]] = [
        ("compose down", compose_down),
        ("project leftovers", lambda: compose_down_project(PROJECT)),
        ("own containers", remove_own),
        ("service containers", remove_services),
        ("nftables table", remove_table),
        (
            "volumes",
            lambda: docker("volume", "rm", "-f", KEYS_VOLUME, HOSTKEYS_VOLUME, check=False),
        ),
    ]
    for what, step in steps:
        try:
            step()
        except Exception as error:  # every step runs
            problems.append(f"{what}: {error}")
    label = f"label=com.docker.compose.project={PROJECT}"
    if docker("ps", "-aq", "--filter", label, check=False).stdout.strip():
        problems.append("containers of the project are left")
    if docker("network", "ls", "-q", "--filter", label, check=False).stdout.strip():
        problems.append("the project's network is left")
    if owned_containers():
        problems.append("service containers are left")
    if ours and nft_table_exists():
        problems.append("table inet knockgate is left")
    left = docker("volume", "ls", "-q", check=False).stdout.split()
    if KEYS_VOLUME in left or HOSTKEYS_VOLUME in left:
        problems.append("the bench's volumes are left")
    return problems


@contextlib.contextmanager
def testbed_lock(timeout: float = 900) -> Iterator[None]:
    with open(LOCK, "w") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BenchError(f"another testbed run holds {LOCK}") from None
                time.sleep(1)
        yield


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="knock-to-service-ready for the ssh service")
    parser.add_argument("--trials", type=int, default=20, help="trials per variant (20)")
    parser.add_argument("--quick", action="store_true", help="3 trials per variant")
    parser.add_argument(
        "--log-dir", help="save the appliance's logs and the Docker events here (evidence)"
    )
    args = parser.parse_args(argv)
    trials = 3 if args.quick else max(1, args.trials)

    def interrupted(signum: int, _frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)

    began = time.monotonic()
    bench: Bench | None = None
    phases: dict[str, list[Trial]] = {}
    problems: list[str] = []
    left: list[str] = []
    floor: dict[str, list[float]] = {}
    status = 0
    try:
        prerequisites()
        with testbed_lock(), tempfile.TemporaryDirectory(prefix=f"{PROJECT}-") as tmp:
            try:
                remove_leftovers()
                preflight()
                bench = Bench(Path(tmp))
                bench.write_files()
                bench.prepare_volumes()
                print(f"{PROJECT}: Docker floor (Engine API, no knockgate)", file=sys.stderr)
                floor = docker_floor(trials)
                bench.watch_events()
                print(f"{PROJECT}: appliance up (cold config)", file=sys.stderr, flush=True)
                bench.up("cold")
                if container_state() != "missing":
                    raise BenchError(f"{CONTAINER} exists before the first knock")
                phases["first"] = bench.run_phase("first", 1)
                phases["cold"] = bench.run_phase("cold", trials)
                bench.logs["cold"] = bench.appliance_log()
                # The warm appliance makes its own container: the cold one goes first.
                docker("rm", "-f", "-v", *owned_containers(), check=False)
                print(f"{PROJECT}: appliance up (keep_warm)", file=sys.stderr, flush=True)
                bench.up("warm")
                bench.wait_log(r"^ssh: warm \(paused\) and ready", 0, 60)
                bench.wait_state("paused")
                time.sleep(0.5)
                phases["warm"] = bench.run_phase("warm", trials)
            finally:
                if bench is not None:
                    with contextlib.suppress(Exception):
                        bench.collect_events()
                    if bench.events_proc is not None:  # never left running
                        bench.events_proc.kill()
                        bench.events_proc.wait(timeout=10)
                if bench is not None and bench.appliance_started:
                    with contextlib.suppress(Exception):
                        bench.logs.setdefault(bench.current, bench.appliance_log())
                    problems = [
                        f"{bench_variant}: {r.get('level')}: {r.get('message')}"
                        for bench_variant, text in bench.logs.items()
                        for r in bench.records(text)
                        if r.get("level") in ("warning", "error")
                    ]
                if bench is not None and args.log_dir:
                    save_logs(bench, Path(args.log_dir))
                print(f"{PROJECT}: cleaning up", file=sys.stderr, flush=True)
                left = teardown(bench)
    except (BenchError, Interrupted, KeyboardInterrupt) as error:
        print(f"service_bench: {type(error).__name__}: {error}", file=sys.stderr)
        status = 1
    if bench is not None and phases:
        report(bench, phases, floor, time.monotonic() - began)
    if problems:
        print("\nappliance warnings/errors during the run:")
        for line in problems[:20]:
            print(f"- {line}")
    if left:
        print(f"\ncleanup problems: {'; '.join(left)}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
