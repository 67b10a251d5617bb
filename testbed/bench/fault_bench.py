#!/usr/bin/env python3
"""Faults against a running knockgate, on real packets: does it fail closed?

Not a test: it prints a Markdown table. Needs root, iproute2, nftables, iptables-nft and
ipset. One topology of network namespaces (tests/integration/netns.py: server, client,
other, attacker on a bridge); ``knockgate run`` in the server namespace with
``testbed/bench/faultinject`` on its PYTHONPATH (exceptions on demand, a wall clock
that can be stepped; see its docstring). The config: door ``ssh`` (3 steps, opening
22/tcp for GRANT seconds), door ``cmd`` (knockd-style start/stop commands, stop
``CMD_TIMEOUT`` s after the start).

Each fault runs the same protocol:

1. the client knocks ``ssh`` (a grant with a deadline) and ``cmd`` (a stop command due);
2. the attacker namespace probes 22/tcp every 20 ms for the whole run (it never knocks);
3. the fault is applied;
4. after it: the client's grant must close at its deadline, the stop command must run by
   its due time, and a fresh knock from the ``other`` host must open.

Printed per fault: **holes open past their deadline** (the client's grant still open
after its deadline, or the stop command not run by its due time: must be 0), **doors
opened that should not** (attacker probes that connected outside the window the tamper
itself opened, plus grants to the attacker: must be 0), **time to repair** (tampering:
from the tamper to the attacker's first refused probe after which no probe connects
again; hostile reload: to the "reload refused" log line), and whether **the daemon kept
serving** (the fresh knock opened; for a fault that ends the loop, that the shutdown ran
and a restart serves).

    python testbed/bench/fault_bench.py [--backend nftables|iptables|both] [--only NAME ...]
        [--kills 5]

Everything it creates (namespaces, processes, rules) is removed at the end, also on
failure and on Ctrl-C. Bounded: each fault takes about 10 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import tests.integration.daemon as daemon_module  # noqa: E402
from tests.integration.daemon import Knockgate, connect, serve  # noqa: E402
from tests.integration.netns import Topology, cleanup_stale, ensure_root_tools  # noqa: E402

HERE = Path(__file__).resolve().parent
FAULTINJECT = HERE / "faultinject"
FLOOD = HERE / "flood.py"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
daemon_module.PYTHON = PYTHON

GRANT = 8.0  # seconds the client's grant lasts
CMD_TIMEOUT = 4.0  # seconds from the start command to the stop command
WATCH = 9.0  # seconds the attacker probes, from just before the fault
SSH, PROTECTED = (7113, "2231:udp", 9157), 22
CMD = (4001, "4002:udp", 4003)

CONFIG = """\
interfaces: [eth0]
status_socket: @SOCKET@
firewall: {{backend: {backend}}}
log: {{level: info}}
doors:
  ssh:
    knock: {{sequence: [7113, 2231/udp, 9157], seq_timeout: 3}}
    open: {{ports: [22/tcp], duration: {grant}}}
  cmd:
    knock: {{sequence: [4001, 4002/udp, 4003], seq_timeout: 3}}
    start_command: echo start %IP% >> {marks}
    stop_command: echo stop %IP% >> {marks}
    cmd_timeout: {cmd_timeout}
"""

WATCHER = """\
import json, socket, sys, time
server, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.monotonic() + seconds
seen = []
while time.monotonic() < end:
    s = socket.socket()
    s.settimeout(0.2)
    try:
        s.connect((server, port)); state = "open"
    except ConnectionRefusedError:
        state = "refused"
    except OSError:
        state = "timeout"
    finally:
        s.close()
    seen.append((time.monotonic(), state))
    time.sleep(0.02)
print(json.dumps(seen))
"""

HOSTILE_CONFIGS: dict[str, str] = {
    "alias bomb": "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
    )
    + "doors: {ssh: {knock: {sequence: *i}, open: {ports: [22/tcp]}}}\n",
    "deep nesting": "doors: " + "[" * 5000 + "]" * 5000 + "\n",
    "python tag": "doors: !!python/object/apply:os.system ['true']\n",
    "unknown tag": "doors: !knock {}\n",
    "binary tag": "interfaces: !!binary aGVsbG8=\ndoors: {}\n",
    "huge integer": "max_attempts: " + "9" * 5000 + "\ndoors: {}\n",
    "/dev/zero key file": "doors:\n  s:\n    spa: {users: {a: {key_file: /dev/zero}}}\n"
    "    open: {ports: [22/tcp]}\n",
    "/dev/zero one-time file": "doors:\n  o:\n    knock: {one_time_sequences: /dev/zero}\n"
    "    open: {ports: [22/tcp]}\n",
    "log file in a missing directory": "log: {file: /nonexistent/kg/knockgate.log}\n"
    "doors:\n  s:\n    knock: {sequence: [7113, 2231/udp, 9157]}\n    open: {ports: [22/tcp]}\n",
}


@dataclass
class Row:
    fault: str
    holes: int | str = "-"
    wrong_opens: int | str = "-"
    repair: str = "-"
    serving: str = "-"
    note: str = ""


@dataclass
class Run:
    topo: Topology
    workdir: Path
    backend: str
    daemon: Knockgate | None = None
    rng: random.Random = field(default_factory=lambda: random.Random(1))
    fault_file: Path = field(init=False)
    wall_file: Path = field(init=False)
    marks: Path = field(init=False)
    config_path: Path = field(init=False)
    runs: int = 0

    def __post_init__(self) -> None:
        self.fault_file = self.workdir / "fault"
        self.wall_file = self.workdir / "wall-offset"
        self.marks = self.workdir / "marks"
        self.config_path = self.workdir / "knockgate.yaml"
        self.fault_file.write_text("")
        self.wall_file.write_text("0")
        self.write_config()

    def write_config(self) -> None:
        self.config_path.write_text(
            CONFIG.format(
                backend=self.backend, grant=GRANT, cmd_timeout=CMD_TIMEOUT, marks=self.marks
            ).replace("@SOCKET@", str(self.workdir / "unused.sock"))
        )

    @property
    def server(self) -> str:
        return self.topo.host("server").ipv4

    def start(self) -> Knockgate:
        self.runs += 1
        workdir = self.workdir / f"run{self.runs}"
        workdir.mkdir()
        env = {
            "PYTHONPATH": f"{REPO}:{FAULTINJECT}",
            "KG_FAULT_FILE": str(self.fault_file),
            "KG_WALL_OFFSET_FILE": str(self.wall_file),
        }
        self.daemon = Knockgate(
            self.topo,
            workdir,
            "",
            config_path=self.config_path,
            state_dir=self.workdir / "state",
            env=env,
        ).start()
        return self.daemon

    def fresh(self) -> Knockgate:
        """A daemon of its own for each fault: the last one stopped, its rules removed."""
        if self.daemon is not None:
            with contextlib.suppress(Exception):
                self.daemon.stop()
            self.daemon.cli("teardown", "--config", str(self.config_path), check=False)
        self.wall_file.write_text("0")
        self.fault_file.write_text("")
        return self.start()

    def alive(self) -> bool:
        return (
            self.daemon is not None
            and self.daemon.process is not None
            and (self.daemon.process.poll() is None)
        )

    def knock(self, host: str, steps: tuple[int | str, ...]) -> None:
        argv = [PYTHON, "-m", "appliance.cli", "knock", self.server, *map(str, steps)]
        self.topo.run(host, argv, cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})

    def state(self, host: str) -> str:
        return connect(self.topo, host, self.server, PROTECTED, timeout=0.3)

    def wait_state(self, host: str, wanted: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state(host) == wanted:
                return True
            time.sleep(0.05)
        return False

    @contextlib.contextmanager
    def watch(self, seconds: float) -> Iterator[list[tuple[float, str]]]:
        seen: list[tuple[float, str]] = []
        proc = self.topo.popen(
            "attacker",
            [PYTHON, "-c", WATCHER, self.server, str(PROTECTED), str(seconds)],
            stdout=subprocess.PIPE,
        )
        try:
            yield seen
        finally:
            out, _ = proc.communicate(timeout=seconds + 30)
            seen.extend((t, s) for t, s in json.loads(out or "[]"))

    def log_since(self, mark: int) -> str:
        assert self.daemon is not None
        return self.daemon.log()[mark:]

    def nft(self, *script: str) -> None:
        self.topo.run("server", ["nft", *script])

    def sh(self, command: str) -> None:
        self.topo.run("server", ["sh", "-c", command])


# ------------------------------------------------------------------ the protocol


def scenario(run: Run, name: str, apply: Callable[[Run], None], kind: str) -> Row:
    """One fault with the common protocol; ``kind``: tamper, reload, clock, exception."""
    row = Row(name)
    run.fresh()
    run.marks.write_text("")
    assert run.daemon is not None
    log_mark = len(run.daemon.log())
    run.knock("client", SSH)
    granted_at = time.monotonic()
    if not run.wait_state("client", "open", 2.0):
        row.note = "the client's knock did not open before the fault"
    run.knock("client", CMD)
    cmd_at = time.monotonic()
    holes = 0
    with run.watch(WATCH) as seen:
        time.sleep(0.5 + run.rng.random())  # a random phase against the daemon's 1 s check
        fault_at = time.monotonic()
        apply(run)
        time.sleep(max(0.0, granted_at + GRANT + 0.6 - time.monotonic()))
        if run.state("client") == "open":  # the grant outlived its deadline
            holes += 1
    due = cmd_at + CMD_TIMEOUT
    lines = run.marks.read_text().splitlines()
    if not any(line.startswith("stop ") for line in lines) and time.monotonic() > due + 1.5:
        holes += 1
    row.holes = holes
    log = run.log_since(log_mark) if run.daemon is not None else ""
    attacker = run.topo.host("attacker").ipv4
    attacker_grants = log.count(f"{attacker}: ssh: open")
    opened = [t for t, state in seen if state == "open"]
    if kind == "tamper":
        after = [t for t, _ in seen if t >= fault_at]
        last_open = max(opened) if opened else None
        if last_open is None:
            row.repair = "no hole seen (still closed)"
            row.wrong_opens = attacker_grants
        else:
            refused_after = [t for t, s in seen if t > last_open and s == "refused"]
            repaired = refused_after[0] if refused_after else None
            row.repair = f"{repaired - fault_at:.2f} s" if repaired else "never"
            stray = [t for t in opened if t < fault_at]
            row.wrong_opens = len(stray) + attacker_grants + (0 if repaired else len(after))
    else:
        row.wrong_opens = len(opened) + attacker_grants
        if kind == "reload":
            refused = "reload refused" in log
            row.repair = "kept the running config" if refused else "NOT refused"
    if kind == "exception":
        name_fired = name.removeprefix("exception in ")
        full_log = run.daemon.log() if run.daemon is not None else ""
        fired = f"injected fault in {name_fired}" in full_log
        row.repair = "fault fired" if fired else "fault did NOT fire"
    if run.alive():
        run.knock("other", SSH)
        row.serving = "yes" if run.wait_state("other", "open", 3.0) else "NO"
    elif kind == "exception":
        stopped = "stopped; grants left in place" in (run.daemon.log() if run.daemon else "")
        run.start()
        run.knock("other", SSH)
        served = run.wait_state("other", "open", 3.0)
        shutdown = "ran" if stopped else "DID NOT run"
        row.serving = f"loop ended, shutdown {shutdown}; restart serves: {_yes(served)}"
    else:
        row.serving = "NO (daemon died)"
        run.start()
    run.wall_file.write_text("0")
    return row


def tamper(script: str) -> Callable[[Run], None]:
    def apply(run: Run) -> None:
        run.sh(script)

    return apply


NFT_TAMPER = {
    "nft flush table": "nft flush table inet knockgate",
    "nft flush chain gate": "nft flush chain inet knockgate gate",
    "nft table dormant": "nft add table inet knockgate '{ flags dormant; }'",
    "nft delete the reject rule": (
        "h=$(nft -a list chain inet knockgate gate | awk '/reject/ {print $NF}'); "
        "nft delete rule inet knockgate gate handle $h"
    ),
    "nft foreign accept first in gate": "nft insert rule inet knockgate gate accept",
    "nft flush ruleset": "nft flush ruleset",
}
IPT_TAMPER = {
    "iptables flush the gate chain": "iptables -w -F KNOCKGATE-GATE",
    "iptables delete the INPUT jump": "iptables -w -D INPUT -j KNOCKGATE",
    "iptables foreign RETURN first in gate": "iptables -w -I KNOCKGATE-GATE 1 -j RETURN",
}


def hostile_reload(text: str) -> Callable[[Run], None]:
    def apply(run: Run) -> None:
        good = run.config_path.read_text()
        run.config_path.write_text(text)
        assert run.daemon is not None
        run.daemon.signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "reload refused" not in run.daemon.log():
            time.sleep(0.05)
        run.config_path.write_text(good)

    return apply


def clock_step(seconds: float) -> Callable[[Run], None]:
    def apply(run: Run) -> None:
        run.wall_file.write_text(str(seconds))

    return apply


def inject(name: str) -> Callable[[Run], None]:
    def apply(run: Run) -> None:
        run.fault_file.write_text(name)
        if name == "reload":
            assert run.daemon is not None
            run.daemon.signal(signal.SIGHUP)
        elif name in ("packet", "grant", "record"):
            run.knock("client", SSH)  # something for the handler to do
        elif name == "status":
            assert run.daemon is not None
            run.daemon.cli("status", "--socket", str(run.daemon.socket), check=False)

    return apply


def kill9_during_flood(run: Run, rng: random.Random) -> Row:
    """kill -9 at a random moment of a knock flood; then the grant must still close at its
    deadline (kernel timeout) and a restart must serve."""
    row = Row("kill -9 during a knock flood")
    run.fresh()
    server = run.topo.host("server")
    flood = run.topo.popen(
        "attacker",
        [
            *(PYTHON, str(FLOOD), "--ifname", "eth0", "--dst-mac", server.mac),
            *("--dst-ip", server.ipv4, "--ports", "7113,9157", "--rate", "20000"),
            *("--seconds", "6"),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        run.knock("client", SSH)
        granted_at = time.monotonic()
        run.wait_state("client", "open", 2.0)
        time.sleep(rng.uniform(0.0, 2.0))
        assert run.daemon is not None
        run.daemon.kill9()
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            flood.communicate(timeout=15)
    time.sleep(max(0.0, granted_at + GRANT + 0.6 - time.monotonic()))
    row.holes = int(run.state("client") == "open")
    row.wrong_opens = int(run.state("attacker") == "open")
    restarted = run.start()
    run.knock("other", SSH)
    served = run.wait_state("other", "open", 3.0)
    untrusted = "before this start are refused" in restarted.log()
    row.serving = f"restart serves: {_yes(served)}" + (
        "; state file reported as not closed cleanly" if untrusted else ""
    )
    return row


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def faults(backend: str) -> list[tuple[str, Callable[[Run], None], str]]:
    listed: list[tuple[str, Callable[[Run], None], str]] = []
    table = NFT_TAMPER if backend == "nftables" else IPT_TAMPER
    listed += [(name, tamper(script), "tamper") for name, script in table.items()]
    if backend == "nftables":
        listed += [
            (f"reload: {name}", hostile_reload(text), "reload")
            for name, text in HOSTILE_CONFIGS.items()
        ]
        listed += [
            ("wall clock stepped back 1 h", clock_step(-3600.0), "clock"),
            ("wall clock stepped forward 1 h", clock_step(3600.0), "clock"),
        ]
        listed += [
            (f"exception in {name}", inject(name), "exception")
            for name in ("packet", "grant", "status", "reload", "check", "upkeep", "loop")
        ]
    return listed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("nftables", "iptables", "both"), default="both")
    parser.add_argument("--only", nargs="*", default=[], help="faults whose name contains this")
    parser.add_argument("--kills", type=int, default=5, help="kill -9 trials (nftables)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    missing = ensure_root_tools(vlan=False)
    if missing:
        print(f"fault_bench: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    rows: list[tuple[str, Row]] = []
    backends = ["nftables", "iptables"] if args.backend == "both" else [args.backend]
    cleanup_stale()
    for backend in backends:
        with tempfile.TemporaryDirectory(prefix="kgfault-") as tmp, Topology(vlan=False) as topo:
            serve(topo, "server", PROTECTED)
            run = Run(topo, Path(tmp), backend, rng=rng)
            try:
                run.start()
                for name, apply, kind in faults(backend):
                    if args.only and not any(word in name for word in args.only):
                        continue
                    started = time.monotonic()
                    try:
                        row = scenario(run, name, apply, kind)
                    except Exception as error:  # one broken scenario does not end the bench
                        row = Row(name, note=f"error: {error}")
                    print(
                        f"[{backend}] {name}: {row} ({time.monotonic() - started:.1f} s)",
                        file=sys.stderr,
                    )
                    rows.append((backend, row))
                if backend == "nftables" and (not args.only or any("kill" in w for w in args.only)):
                    for _ in range(args.kills):
                        row = kill9_during_flood(run, rng)
                        print(f"[{backend}] {row}", file=sys.stderr)
                        rows.append((backend, row))
            finally:
                if run.daemon is not None:
                    with contextlib.suppress(Exception):
                        run.daemon.stop()
                    with contextlib.suppress(Exception):
                        run.daemon.cli("teardown", "--config", str(run.config_path), check=False)
    print(
        "| backend | fault | holes open past their deadline | doors opened that should not "
        "| time to repair | daemon kept serving |"
    )
    print("|---|---|---|---|---|---|")
    for backend, row in rows:
        serving = row.serving + (f" ({row.note})" if row.note else "")
        cells = (backend, row.fault, row.holes, row.wrong_opens, row.repair, serving)
        print("| " + " | ".join(map(str, cells)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
