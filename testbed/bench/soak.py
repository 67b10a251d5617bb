#!/usr/bin/env python3
"""A host you can leave running: knockgate for N minutes on a host that keeps changing.

Not a test: it prints a Markdown table. Needs root, iproute2, nftables and a Docker engine
(``eval "$(testbed/setup-docker.sh)"``) with the bundled web image (built here when
missing). knockgate runs as it does in the appliance: in the root namespace (host network),
``interfaces:`` unset, with one knock door (``ssh``: 3 steps, 5 s grants) and one service
door (``web``: the bundled web image, stopped after 10 s idle). Knockers live in network
namespaces of their own, on 198.18.220.0/22.

What happens during the run (all bounded in time and packets):

* a knock every second on ``ssh`` from a fresh address (one /32 added for it, then removed),
  through the first client's veth, or through a second client's veth that appears at 20 %
  of the run and is deleted at 80 %;
* a knock on ``web`` every ``--service-every`` seconds from a fresh address: the service
  starts, and stops again when idle;
* an ifb interface that appears, flaps up and down and disappears, over and over, and one
  that stays administratively down the whole run (as ``ifb0`` on a stock host);
* a SIGHUP every ``--hup-every`` seconds, alternately with the same file and with one more
  door;
* then a quiet minute: nothing is sent, nothing changes.

Printed: knocks opened/sent for each door (must be all), log lines per minute while things
happen and lines in the quiet minute (must be 0), lines that belong to no event (periodic
noise: must be none), RSS at start and end, and grants still in the kernel more than 1.5 s
past their deadline (must be 0).

    python testbed/bench/soak.py [--minutes 10] [--service-every 60] [--hup-every 90]

Everything it creates (namespaces, links, containers, the firewall table, the daemon) is
removed at the end, also on failure and on Ctrl-C; names start with ``kgsoak``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from appliance.services.runtime import owner_of  # noqa: E402

PYTHON = sys.executable
DOCKER = os.environ.get("KG_DOCKER", "/usr/bin/docker")
WEB_IMAGE = "knockgate/web:local"

SERVER = "198.18.220.1"  # the root namespace's side of every client veth
NETMASK = 22
SSH_STEPS = ((47113, "tcp"), (47114, "udp"), (47115, "tcp"))
WEB_STEPS = ((47201, "tcp"), (47202, "udp"), (47203, "tcp"))
GRANT = 5.0
WEB_PORT = 47080

CONFIG = """\
status_socket: {tmp}/status.sock
state_dir: {tmp}/state
log: {{file: {tmp}/knockgate.log, level: info}}
firewall: {{backend: nftables}}
services:
  web:
    image: {image}
    container_port: 80
    host_port: {web_port}
    ready: {{http: {{path: /, status: 200}}, timeout: 20}}
    idle_timeout: 10
    max_lifetime: 300
doors:
  ssh:
    knock: {{sequence: [47113, 47114/udp, 47115], seq_timeout: 5}}
    open: {{ports: [47022/tcp], duration: {grant}}}
  web:
    knock: {{sequence: [47201, 47202/udp, 47203], seq_timeout: 5}}
    service: {{name: web, duration: 20}}
{extra}"""
EXTRA_DOOR = """\
  extra:
    knock: {sequence: [47301, 47302/udp, 47303], seq_timeout: 5}
    open: {ports: [47023/tcp], duration: 5}
"""

# What a line that belongs to an event looks like (anything else is noise).
EVENT_LINE = re.compile(
    r"OPEN SESAME|: open |Stage \d|sequence|reload|doors:|capturing|gone|interface|"
    r"host addresses|web:|service|container|stopped|idle|ready|firewall: nftables rules|"
    r"starting up|shutting down|warning: the ports"
)
STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\]")


def sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


def in_ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *argv, check=check)


SEND = """
import socket, sys, time
src, dst, steps = sys.argv[1], sys.argv[2], sys.argv[3:]
for step in steps:
    port, proto = step.split('/')
    if proto == 'udp':
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((src, 0)); s.sendto(b'x', (dst, int(port)))
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((src, 0)); s.setblocking(False); s.connect_ex((dst, int(port)))
    s.close(); time.sleep(0.02)
"""


@dataclass
class Knock:
    door: str
    address: str
    sent: float
    link: str = ""
    wall: float = 0.0
    deadline: float = 0.0
    opened: bool = False


@dataclass
class Soak:
    tmp: Path
    minutes: float
    service_every: float
    hup_every: float
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    daemon: subprocess.Popen[str] | None = None
    knocks: list[Knock] = field(default_factory=list)
    late_grants: set[str] = field(default_factory=set)
    events: list[tuple[float, str]] = field(default_factory=list)
    next_address: int = 1

    # ------------------------------------------------------------ set-up

    def config_path(self) -> Path:
        return self.tmp / "knockgate.yaml"

    def write_config(self, extra: bool) -> None:
        self.config_path().write_text(
            CONFIG.format(
                tmp=self.tmp,
                image=WEB_IMAGE,
                web_port=WEB_PORT,
                grant=GRANT,
                extra=EXTRA_DOOR if extra else "",
            )
        )

    def client(self, ns: str, link: str, address: str) -> None:
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "link", "add", link, "type", "veth", "peer", "name", "kgsoak-peer", "netns", ns)
        self.links.append(link)
        in_ns(ns, "ip", "link", "set", "lo", "up")
        in_ns(ns, "ip", "link", "set", "kgsoak-peer", "up")
        in_ns(ns, "ip", "addr", "add", f"{address}/{NETMASK}", "dev", "kgsoak-peer")
        sh("ip", "addr", "add", f"{SERVER}/32", "dev", link)
        sh("ip", "link", "set", link, "up")
        sh("ip", "route", "replace", f"{address}/32", "dev", link)

    def start_daemon(self) -> None:
        self.write_config(extra=False)
        log = (self.tmp / "stdout.log").open("w")
        self.daemon = subprocess.Popen(
            [PYTHON, "-m", "appliance.cli", "run", "--config", str(self.config_path())],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
            env={**os.environ, "PYTHONPATH": str(REPO)},
            text=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise RuntimeError(f"knockgate exited:\n{(self.tmp / 'stdout.log').read_text()}")
            with contextlib.suppress(RuntimeError):
                self.status()
                return
            time.sleep(0.2)
        raise RuntimeError("knockgate did not come up")

    def status(self) -> dict[str, object]:
        done = sh(
            PYTHON,
            "-m",
            "appliance.cli",
            "status",
            "--socket",
            str(self.tmp / "status.sock"),
            "--json",
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
        data: dict[str, object] = json.loads(done.stdout)
        return data

    def rss_kib(self) -> int:
        assert self.daemon is not None
        for line in Path(f"/proc/{self.daemon.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    # ------------------------------------------------------------ actions

    def fresh_address(self) -> str:
        n = self.next_address
        self.next_address += 1
        return f"198.18.{221 + n // 250}.{n % 250 + 1}"

    def knock(self, door: str, ns: str, link: str) -> Knock:
        address = self.fresh_address()
        in_ns(ns, "ip", "addr", "add", f"{address}/32", "dev", "kgsoak-peer")
        sh("ip", "route", "replace", f"{address}/32", "dev", link)
        steps = SSH_STEPS if door == "ssh" else WEB_STEPS
        knock = Knock(door, address, time.monotonic(), link, time.time())
        in_ns(ns, PYTHON, "-c", SEND, address, SERVER, *(f"{p}/{q}" for p, q in steps))
        self.knocks.append(knock)
        self.event(f"knock {door} from {address}")
        return knock

    def forget(self, knock: Knock, ns: str) -> None:
        in_ns(ns, "ip", "addr", "del", f"{knock.address}/32", "dev", "kgsoak-peer", check=False)
        sh("ip", "route", "del", f"{knock.address}/32", check=False)

    def event(self, what: str) -> None:
        self.events.append((time.time(), what))

    def grants(self) -> dict[str, float]:
        """address -> seconds left, as the kernel holds them."""
        out: dict[str, float] = {}
        for entry in self.status().get("grants", []):  # type: ignore[union-attr]
            if isinstance(entry, dict) and "address" in entry:
                out[entry["address"]] = float(entry["expires_in"])
        return out

    def check_grants(self, pending: list[tuple[Knock, str]]) -> None:
        now = time.monotonic()
        grants = self.grants()
        for knock, ns in list(pending):
            if not knock.opened and knock.address in grants:
                knock.opened = True
                knock.deadline = now + grants[knock.address]
            if knock.opened and now > knock.deadline + 1.5 and knock.address in grants:
                self.late_grants.add(knock.address)
            limit = 25.0 if knock.door == "web" else 3.0
            if (knock.opened and now > knock.deadline + 3) or (
                not knock.opened and now > knock.sent + limit
            ):
                pending.remove((knock, ns))
                self.forget(knock, ns)

    # ------------------------------------------------------------ the run

    def run(self) -> dict[str, object]:
        self.client("kgsoak-c", "kgsoak-c0", "198.18.220.2")
        sh("ip", "link", "add", "kgsoak-down", "type", "ifb")  # stays down: silence
        self.links.append("kgsoak-down")
        self.start_daemon()
        time.sleep(2)
        rss_start = self.rss_kib()
        start = time.monotonic()
        length = self.minutes * 60
        pending: list[tuple[Knock, str]] = []
        flap = 0
        extra = False
        late_up = False
        next_service = start + 5
        next_hup = start + self.hup_every
        second = 0
        next_second = start
        while time.monotonic() - start < length:
            second += 1
            elapsed = time.monotonic() - start
            if not late_up and 0.2 * length <= elapsed < 0.8 * length:
                self.client("kgsoak-l", "kgsoak-l0", "198.18.220.3")
                self.event("late client link up")
                late_up = True
                time.sleep(1.0)  # the bound: captured within 1 s
            elif late_up and elapsed >= 0.8 * length:
                sh("ip", "netns", "del", "kgsoak-l")
                self.namespaces.remove("kgsoak-l")
                self.links.remove("kgsoak-l0")
                self.event("late client gone")
                late_up = False
                pending = [(k, ns) for k, ns in pending if ns != "kgsoak-l"]
            late = late_up and second % 2 == 1
            ns, link = ("kgsoak-l", "kgsoak-l0") if late else ("kgsoak-c", "kgsoak-c0")
            pending.append((self.knock("ssh", ns, link), ns))
            if time.monotonic() >= next_service:
                next_service += self.service_every
                pending.append((self.knock("web", "kgsoak-c", "kgsoak-c0"), "kgsoak-c"))
            if time.monotonic() >= next_hup:
                next_hup += self.hup_every
                extra = not extra
                self.write_config(extra)
                assert self.daemon is not None
                self.daemon.send_signal(signal.SIGHUP)
                self.event("sighup")
            flap = self.flap(flap, second)
            next_second += 1.0  # a knock a second, whatever each one took
            while time.monotonic() < next_second:
                self.check_grants(pending)
                time.sleep(0.1)
        sh("ip", "link", "del", "kgsoak-f", check=False)
        self.event("last action")
        settle_end = time.monotonic() + 30  # grants expire, the service stops when idle
        while time.monotonic() < settle_end:
            self.check_grants(pending)
            time.sleep(0.5)
        quiet_from = time.time()
        time.sleep(60)
        quiet_to = time.time()
        rss_end = self.rss_kib()
        return self.report(rss_start, rss_end, quiet_from, quiet_to, time.monotonic() - start)

    def flap(self, state: int, second: int) -> int:
        """Every 7 s one step of: add, up, down, up, delete (a link that comes and goes)."""
        if second % 7:
            return state
        step = state % 5
        if step == 0:
            sh("ip", "link", "add", "kgsoak-f", "type", "ifb")
            sh("ip", "addr", "add", "198.18.230.250/32", "dev", "kgsoak-f")
        elif step in (1, 3):
            sh("ip", "link", "set", "kgsoak-f", "up")
        elif step == 2:
            sh("ip", "link", "set", "kgsoak-f", "down")
        else:
            sh("ip", "link", "del", "kgsoak-f")
        self.event(f"flap step {step}")
        return state + 1

    # ------------------------------------------------------------ results

    def report(
        self, rss_start: int, rss_end: int, quiet_from: float, quiet_to: float, took: float
    ) -> dict[str, object]:
        lines = (self.tmp / "knockgate.log").read_text().splitlines()
        per_minute: dict[str, int] = {}
        quiet: list[str] = []
        noise: list[str] = []
        for line in lines:
            match = STAMP.match(line)
            if match is None:
                continue
            per_minute[match.group(1)[:16]] = per_minute.get(match.group(1)[:16], 0) + 1
            stamp = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) - time.timezone
            if quiet_from <= stamp <= quiet_to:
                quiet.append(line)
            if not EVENT_LINE.search(line):
                noise.append(line)
        counts = sorted(per_minute.values())
        result: dict[str, object] = {"minutes": round(took / 60, 1)}
        for door in ("ssh", "web"):
            sent = [k for k in self.knocks if k.door == door]
            result[f"{door} opened/sent"] = f"{sum(k.opened for k in sent)}/{len(sent)}"
        result["log lines/min while active (median, max)"] = (
            f"{counts[len(counts) // 2]}, {counts[-1]}" if counts else "0, 0"
        )
        result["log lines in the quiet minute"] = len(quiet)
        result["lines that belong to no event"] = len(noise)
        result["RSS start -> end (MiB)"] = f"{rss_start / 1024:.1f} -> {rss_end / 1024:.1f}"
        result["grants past their deadline"] = len(self.late_grants)
        for line in (quiet + noise)[:20]:
            print(f"  unexpected: {line}", file=sys.stderr)
        for knock in self.knocks:
            if not knock.opened:  # what happened around it, for the reader
                at = time.strftime("%H:%M:%S", time.gmtime(knock.wall))
                near = [w for t, w in self.events if abs(t - knock.wall) < 3 and w[:5] != "knock"]
                print(
                    f"  not opened: {knock.door} from {knock.address} via {knock.link} at {at} "
                    f"(near: {', '.join(near) or 'nothing'})",
                    file=sys.stderr,
                )
                for line in [x for x in lines if knock.address + ":" in x]:
                    print(f"    {line}", file=sys.stderr)
        if any(not k.opened for k in self.knocks) or quiet or noise:
            kept = Path(tempfile.gettempdir()) / "kgsoak-last.log"
            kept.write_text("\n".join(lines) + "\n")
            print(f"  the daemon's log is kept in {kept}", file=sys.stderr)
        return result

    # ------------------------------------------------------------ clean-up

    def close(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        if self.config_path().exists():
            sh(
                PYTHON,
                "-m",
                "appliance.cli",
                "teardown",
                "--config",
                str(self.config_path()),
                check=False,
            )
        owner = owner_of(str(self.config_path()))
        listed = sh(DOCKER, "ps", "-aq", "--filter", f"label=knockgate.owner={owner}", check=False)
        for container in listed.stdout.split():
            sh(DOCKER, "rm", "-f", container, check=False)
        for link in ["kgsoak-f", *self.links]:
            sh("ip", "link", "del", link, check=False)
        for ns in self.namespaces:
            sh("ip", "netns", "del", ns, check=False)


@contextlib.contextmanager
def soak(args: argparse.Namespace) -> Iterator[Soak]:
    with tempfile.TemporaryDirectory(prefix="kgsoak-") as tmp:
        run = Soak(Path(tmp), args.minutes, args.service_every, args.hup_every)
        try:
            yield run
        finally:
            run.close()


def ensure_image() -> None:
    if sh(DOCKER, "image", "inspect", WEB_IMAGE, check=False).returncode != 0:
        sh(DOCKER, "build", "-t", WEB_IMAGE, str(REPO / "compose/services/web"), timeout=600)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--service-every", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument("--hup-every", type=float, default=90.0, metavar="SECONDS")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("soak.py: needs root", file=sys.stderr)
        return 2
    ensure_image()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    with soak(args) as run:
        result = run.run()
    print("| measure | value |\n|---|---|")
    for key, value in result.items():
        print(f"| {key} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
