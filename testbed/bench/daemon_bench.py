#!/usr/bin/env python3
"""knockgate (nftables backend) and knockd 0.8, side by side, on real packets.

Not a test: it prints a Markdown table. Needs root, iproute2, nftables, iptables-nft
and knockd (``/usr/sbin/knockd``). Each daemon gets a fresh topology of network
namespaces (tests/integration/netns.py: server, client, other, attacker on a bridge)
with the same knock sequence, 7113/tcp, 2231/udp, 9157/tcp, protecting 22/tcp:

* knockgate: ``knockgate run`` (tests/integration/daemon.py's ``Knockgate``) with
  ``firewall: {backend: nftables}``; its own table rejects 22/tcp with a reset.
* knockd: ``knockd -c CONF -i eth0`` in the foreground, ``Seq_Timeout = 5``,
  ``TCPFlags = syn``, and what knockd users typically write, an iptables command:
  ``Start_Command = iptables -I KGKNOCKD -s %IP% -p tcp --dport 22 -j ACCEPT``
  (run as ``/usr/sbin/iptables-nft``), into a chain of the bench's own, KGKNOCKD,
  whose last rule rejects 22/tcp with a reset.

Measured, for each daemon:

1. Knock-to-open latency: one process in the client namespace (probe.py latency),
   a fresh client source address per trial; from the last knock sent to the first
   accepted connect to 22/tcp, at most 2 s. The connect is retried every 0.2 ms for
   the first 10 ms, then every 2 % of the time waited so far (resolution within 2 %),
   so that a slow opening under a flood is not buried in SYNs from the probe.
2. The same 30 knocks while the attacker namespace floods the knock ports with
   spoofed TCP SYNs (flood.py, AF_PACKET, sources in 198.18.128.0/17) at 10 000 and
   50 000 frames/s; the flood runs for the whole measurement. The rate the generator
   achieved is printed. At 10 000/s also the daemon's CPU (utime+stime over the
   flood window, % of one core) and its RSS (before, after, peak VmHWM).
3. N clients knocking at once (100 and 250): every client step 1, then every client
   step 2, then step 3, then each connects (probe.py concurrent).

Client source addresses: 198.18.252.0/22 (never a topology's own /24), added as /32s
to the client's eth0, with an on-link route and permanent neighbour entries for
them in the server namespace (so no ARP lies on the measured path). The server
namespace has no default route: replies to spoofed sources go nowhere.

Everything (namespaces, processes, rules) is removed at the end, also on failure
and on Ctrl-C/SIGTERM; a measurement that fails shows as ``error: ...`` in the table.

With ``--metrics`` knockgate also serves its Prometheus metrics on a Unix socket and
the bench scrapes them once a second for the whole run (Prometheus' default is every
15 s), so the cost of the metrics shows in the same table.

    python testbed/bench/daemon_bench.py [--quick] [--only knockgate|knockd] [--metrics]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import tests.integration.daemon as daemon_module  # noqa: E402
from tests.integration.daemon import Knockgate  # noqa: E402
from tests.integration.netns import Topology, ensure_root_tools, list_namespaces  # noqa: E402

HERE = Path(__file__).resolve().parent
PROBE = HERE / "probe.py"
FLOOD = HERE / "flood.py"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
daemon_module.PYTHON = PYTHON  # knockgate's dependencies live in the venv

SEQUENCE = [(7113, "tcp"), (2231, "udp"), (9157, "tcp")]
STEPS = ",".join(f"{port}/{proto}" for port, proto in SEQUENCE)
PROTECTED = 22
CLIENT_BLOCK = ipaddress.IPv4Network("198.18.252.0/22")
SPOOF = "198.18.128.0/17"
IPTABLES = "/usr/sbin/iptables-nft"  # never the legacy one
KNOCKD = "/usr/sbin/knockd"
CHAIN = "KGKNOCKD"
CLK_TCK = os.sysconf("SC_CLK_TCK")

KNOCKGATE_CONFIG = f"""\
interfaces: [eth0]
status_socket: @SOCKET@
firewall: {{backend: nftables}}
doors:
  bench:
    knock: {{sequence: [7113, 2231/udp, 9157], seq_timeout: 5, tcpflags: "syn,!ack"}}
    open: {{ports: [{PROTECTED}/tcp], duration: 60}}
"""

KNOCKD_CONFIG = f"""\
[options]
    Interface = eth0
    LogFile = @LOG@

[bench]
    Sequence = 7113:tcp,2231:udp,9157:tcp
    Seq_Timeout = 5
    TCPFlags = syn
    Start_Command = {IPTABLES} -I {CHAIN} -s %IP% -p tcp --dport {PROTECTED} -j ACCEPT
"""


@dataclass
class Params:
    trials: int
    rates: tuple[int, ...]
    warmup: float  # seconds of flood before the first knock
    settle: float  # seconds after a flood before the next measurement
    concurrency: tuple[int, ...]
    window: float  # seconds the concurrent clients keep trying to connect
    trial_timeout: float = 2.0
    gap: float = 0.02
    senders: int = 1  # flood generator processes


FULL = Params(30, (10_000, 50_000), 2.0, 6.0, (100, 250), 10.0)
QUICK = Params(5, (10_000, 50_000), 0.5, 1.0, (20,), 5.0)


class Failed(Exception):
    pass


# ------------------------------------------------------------------ small helpers


def short_error(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"error: {type(error).__name__}: {text[:160]}"


def proc_stat(pid: int) -> tuple[int, int]:
    """(utime+stime, cutime+cstime) in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12]), int(rest[13]) + int(rest[14])


def children(pid: int) -> list[int]:
    """The running children of ``pid`` (knockgate's packet process; none for knockd)."""
    with contextlib.suppress(OSError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def children_cpu(pids: list[int]) -> int:
    """utime+stime of these (still running) processes, in clock ticks."""
    total = 0
    for child in pids:
        with contextlib.suppress(OSError):
            total += proc_stat(child)[0]
    return total


def proc_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise Failed(f"no {key} in /proc/{pid}/status")


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next line ``proc`` prints, or "" after ``timeout`` seconds or at its exit."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


def system_cpu() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine, every CPU."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user
    return total - idle, total


def interrupt_on_signals() -> None:
    """SIGTERM, SIGHUP and SIGINT raise KeyboardInterrupt, so that cleanup runs (SIGINT
    also when the process was started with it ignored)."""

    def on_signal(sig: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {sig}")

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, on_signal)


def stderr_log(started: float) -> Callable[[str], None]:
    """A log function: ``text`` on stderr, stamped with the seconds since ``started``."""

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    return log


def machine_busy(seconds: float = 1.0) -> float:
    """% of the whole machine busy over the next ``seconds``."""
    busy0, total0 = system_cpu()
    time.sleep(seconds)
    busy1, total1 = system_cpu()
    return 100.0 * (busy1 - busy0) / max(1, total1 - total0)


def softnet_drops() -> int:
    """Frames the kernel dropped because a CPU's input backlog was full (all CPUs)."""
    with open("/proc/net/softnet_stat") as f:
        return sum(int(line.split()[1], 16) for line in f if line.strip())


def mib(kib: int) -> float:
    return kib / 1024


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = q * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class AddressPool:
    """Fresh client source addresses, handed out once each."""

    def __init__(self, count: int) -> None:
        hosts = [a for a in CLIENT_BLOCK.hosts() if 10 <= int(a) & 0xFF <= 250]
        if count > len(hosts):
            raise ValueError(f"{count} client addresses wanted, {len(hosts)} available")
        self.addresses = [str(a) for a in hosts[:count]]
        self.next = 0

    def take(self, n: int) -> list[str]:
        if self.next + n > len(self.addresses):
            raise Failed("client address pool exhausted")
        taken = self.addresses[self.next : self.next + n]
        self.next += n
        return taken


# ------------------------------------------------------------------ the topology


class Bench:
    """One daemon's topology plus what the measurements need in it."""

    def __init__(self, topo: Topology, params: Params, workdir: Path) -> None:
        self.topo = topo
        self.params = params
        self.workdir = workdir
        self.server = topo.host("server")
        self.client = topo.host("client")
        wanted = params.trials * (1 + len(params.rates)) + sum(params.concurrency)
        self.pool = AddressPool(wanted)
        self.server_mac = ""
        self.probe_cpu = 0.0  # % of a core the last latency probe used
        self.on_between: Callable[[], None] = lambda: None  # reset grants between runs

    def ip_batch(self, host: str, lines: list[str]) -> None:
        self.topo.run(host, ["ip", "-batch", "-"], input="".join(f"{x}\n" for x in lines))

    def prepare(self) -> None:
        topo, server = self.topo, self.server
        links = json.loads(topo.run("server", ["ip", "-j", "link", "show", "eth0"]).stdout)
        self.server_mac = links[0]["address"]
        client_mac = json.loads(topo.run("client", ["ip", "-j", "link", "show", "eth0"]).stdout)[0][
            "address"
        ]
        self.ip_batch(
            "client",
            [f"addr add {a}/32 dev eth0" for a in self.pool.addresses]
            + [f"neigh replace {server.ipv4} lladdr {self.server_mac} dev eth0 nud permanent"],
        )
        self.ip_batch(
            "server",
            [f"route add {CLIENT_BLOCK} dev eth0 scope link src {server.ipv4}"]
            + [
                f"neigh replace {a} lladdr {client_mac} dev eth0 nud permanent"
                for a in self.pool.addresses
            ],
        )
        # Spoofed packets take the full path through the server's stack (no reverse-path
        # drop: there is no route back to them, only replies are lost).
        topo.run(
            "server",
            [
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.eth0.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ],
        )
        routes = topo.run("server", ["ip", "-j", "route", "show", "default"]).stdout.strip()
        if routes not in ("", "[]", "[ ]"):
            raise Failed(f"server namespace has a default route: {routes}")
        # The bridge learns the server's and the attacker's MACs before the flood.
        topo.ping("attacker", server.ipv4)
        topo.ping("client", server.ipv4)
        listener = topo.popen(
            "server",
            [PYTHON, str(PROBE), "serve", str(PROTECTED), "--seconds", "1800"],
            stdout=subprocess.PIPE,
        )
        if read_line(listener, 15) != "listening":
            raise Failed("the TCP listener on the server did not start")

    # -------------------------------------------------------------- client probes

    def probe(self, argv: list[str], timeout: float) -> dict[str, Any]:
        done = self.topo.run("client", [PYTHON, str(PROBE), *argv], timeout=timeout, check=False)
        if done.returncode != 0:
            raise Failed(f"probe {argv[0]} exited {done.returncode}: {done.stderr.strip()[-300:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    def latency_run(self, trials: int) -> list[float | None]:
        p = self.params
        sources = self.pool.take(trials)
        argv = ["latency", "--server", self.server.ipv4, "--port", str(PROTECTED)]
        argv += ["--steps", STEPS, "--sources", ",".join(sources)]
        argv += ["--timeout", str(p.trial_timeout), "--gap", str(p.gap)]
        started = time.monotonic()
        result = self.probe(argv, timeout=trials * (p.trial_timeout + p.gap + 0.5) + 30)
        self.probe_cpu = 100.0 * result.get("cpu_seconds", 0.0) / (time.monotonic() - started)
        latencies: list[float | None] = result["latencies"]
        return latencies

    def concurrent_run(self, clients: int) -> dict[str, Any]:
        sources = self.pool.take(clients)
        argv = ["concurrent", "--server", self.server.ipv4, "--port", str(PROTECTED)]
        argv += ["--steps", STEPS, "--sources", ",".join(sources)]
        argv += ["--window", str(self.params.window)]
        return self.probe(argv, timeout=self.params.window + 60)

    # -------------------------------------------------------------- the flood

    @contextlib.contextmanager
    def flood(self, rate: int, seconds: float, result: dict[str, Any]) -> Iterator[None]:
        """Spoofed SYNs at ``rate``/s (split over ``params.senders`` processes) for the
        duration of the with-block, bounded by ``seconds``; the generators' reports,
        summed, end up in ``result``."""
        senders = max(1, self.params.senders)
        argv = [PYTHON, str(FLOOD), "--ifname", "eth0", "--dst-mac", self.server_mac]
        argv += ["--dst-ip", self.server.ipv4, "--ports", ",".join(str(p) for p, _ in SEQUENCE)]
        argv += ["--spoof", SPOOF, "--rate", f"{rate / senders:.1f}", "--seconds", f"{seconds:.1f}"]
        with flood_generators(self.topo, argv, senders, rate, result, ready_timeout=30):
            yield


@contextlib.contextmanager
def flood_generators(
    topo: Topology,
    argv: list[str],
    senders: int,
    seed: int,
    result: dict[str, Any],
    ready_timeout: float,
) -> Iterator[None]:
    """``senders`` flood generator processes (``argv`` plus ``--seed seed+i``) in the
    attacker namespace, each awaited for its ``ready`` line (``ready_timeout`` s), for the
    duration of the with-block; then stopped with SIGTERM and their JSON reports, summed,
    put into ``result`` (senders, sent, errors, rate, cpu % of a core, stopped_by)."""
    procs: list[subprocess.Popen[str]] = []
    reports: list[dict[str, Any]] = []
    try:
        for i in range(senders):
            procs.append(
                topo.popen("attacker", [*argv, "--seed", str(seed + i)], stdout=subprocess.PIPE)
            )
        for proc in procs:
            if read_line(proc, ready_timeout) != "ready":
                raise Failed(f"flood generator did not start (exit {proc.poll()})")
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                continue
            lines = [x for x in (out or "").splitlines() if x.startswith("{")]
            if lines:
                reports.append(json.loads(lines[-1]))
        if reports:
            result.update(
                senders=len(reports),
                sent=sum(r["sent"] for r in reports),
                errors=sum(r["errors"] for r in reports),
                rate=sum(r["rate"] for r in reports),
                cpu=100.0
                * sum(r["cpu_seconds"] for r in reports)
                / max(r["seconds"] for r in reports),
                stopped_by=",".join(sorted({r["stopped_by"] for r in reports})),
            )


# ------------------------------------------------------------------ measurements


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms"


def measure(bench: Bench, pid: int, results: dict[str, Any], log: Callable[[str], None]) -> None:
    p = bench.params

    def guarded(key: str, fn: Callable[[], Any]) -> None:
        try:
            results[key] = fn()
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:
            results[key] = short_error(error)
        log(f"  {key}: {results[key]}")
        with contextlib.suppress(Exception):
            bench.on_between()

    def latency() -> dict[str, Any]:
        values = bench.latency_run(p.trials)
        opened = [v for v in values if v is not None]
        if not opened:
            raise Failed(f"0/{len(values)} knocks opened")
        return {
            "opened": len(opened),
            "trials": len(values),
            "median": statistics.median(opened),
            "p90": percentile(opened, 0.9),
            "max": max(opened),
        }

    def concurrent(n: int) -> Callable[[], dict[str, Any]]:
        return lambda: bench.concurrent_run(n)

    def flooded(rate: int) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            out: dict[str, Any] = {"rate_target": rate}
            gen: dict[str, Any] = {}
            bound = p.warmup + p.trials * (p.trial_timeout + p.gap + 0.2) + 20
            rss_before = proc_status_kib(pid, "VmRSS")
            samples: list[tuple[float, int]] = []  # (seconds into the flood, VmRSS KiB)
            stop_sampling = threading.Event()

            def sample(t0: float) -> None:
                while not stop_sampling.wait(0.5):
                    with contextlib.suppress(OSError, Failed):
                        samples.append((time.monotonic() - t0, proc_status_kib(pid, "VmRSS")))

            sampler: threading.Thread | None = None
            try:
                with bench.flood(rate, bound, gen):
                    t0 = time.monotonic()
                    sampler = threading.Thread(target=sample, args=(t0,), daemon=True)
                    sampler.start()
                    cpu0, child0 = proc_stat(pid)
                    helpers = children(pid)
                    packet0 = children_cpu(helpers)
                    busy0, total0 = system_cpu()
                    drops0 = softnet_drops()
                    time.sleep(p.warmup)
                    values = bench.latency_run(p.trials)
                    t1 = time.monotonic()
                    cpu1, child1 = proc_stat(pid)
                    packet1 = children_cpu(helpers)
                    busy1, total1 = system_cpu()
                    out["softnet_drops"] = softnet_drops() - drops0
                    out["probe_cpu"] = bench.probe_cpu
                    out["hwm_kib"] = proc_status_kib(pid, "VmHWM")
                    out["rss_after_kib"] = proc_status_kib(pid, "VmRSS")
            finally:
                out["generator"] = gen
                stop_sampling.set()
                if sampler is not None:
                    sampler.join(2)
                out["rss_samples"] = [(round(t, 1), kib) for t, kib in samples]
            opened = [v for v in values if v is not None]
            out.update(
                opened=len(opened),
                trials=len(values),
                median=statistics.median(opened) if opened else None,
                window=t1 - t0,
                # The daemon's own CPU, its packet process's included (privilege separation).
                cpu=100.0 * (cpu1 - cpu0 + packet1 - packet0) / CLK_TCK / (t1 - t0),
                packet_cpu=100.0 * (packet1 - packet0) / CLK_TCK / (t1 - t0),
                child_cpu=100.0 * (child1 - child0) / CLK_TCK / (t1 - t0),
                rss_before_kib=rss_before,
                machine_busy=100.0 * (busy1 - busy0) / max(1, total1 - total0),
            )
            if gen.get("rate", 0) < 0.95 * rate:
                out["note"] = "generator below its target rate"
            if gen.get("stopped_by") not in (None, "signal"):
                out["note"] = f"flood ended early ({gen.get('stopped_by')})"
            time.sleep(p.settle)
            return out

        return run

    guarded("latency", latency)
    for n in p.concurrency:
        guarded(f"concurrent_{n}", concurrent(n))
    for rate in p.rates:
        guarded(f"flood_{rate}", flooded(rate))
    if not os.path.exists(f"/proc/{pid}"):
        results["died"] = "the daemon is no longer running"


# ------------------------------------------------------------------ the daemons


@contextlib.contextmanager
def knockgate_daemon(
    topo: Topology, workdir: Path, config: str, results: dict[str, Any], log_chars: int
) -> Iterator[tuple[Knockgate, int]]:
    """``knockgate run`` (tests/integration/daemon.py) in the server namespace for the
    with-block, which gets it and its pid (checked to be knockgate's). Afterwards it is stopped
    (a non-zero exit or a failure to stop in ``results["stop"]``), its table torn down and
    the last ``log_chars`` characters of its log put in ``results["log_tail"]``."""
    daemon = Knockgate(topo, workdir, config)
    try:
        daemon.start()
        assert daemon.process is not None
        pid = daemon.process.pid
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"appliance.cli" not in cmdline:
            raise Failed(f"pid {pid} is not knockgate: {cmdline[:120]!r}")
        yield daemon, pid
    finally:
        try:
            rc = daemon.stop()
            if rc != 0:
                results["stop"] = f"exit status {rc}"
        except Exception as error:
            results["stop"] = short_error(error)
        with contextlib.suppress(Exception):
            daemon.cli("teardown", "--config", str(daemon.config_path), check=False)
        results["log_tail"] = daemon.log()[-log_chars:]


METRICS = {"on": False}  # --metrics


@contextlib.contextmanager
def scraping(path: Path, results: dict[str, Any]) -> Iterator[None]:
    """GET /metrics over the Unix socket ``path`` once a second for the with-block."""
    import http.client
    import socket

    stop = threading.Event()
    counts = {"scrapes": 0, "failures": 0}

    def scrape() -> None:
        while not stop.wait(1.0):
            connection = http.client.HTTPConnection("localhost", timeout=5)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(5)
                sock.connect(str(path))
                connection.sock = sock
                connection.request("GET", "/metrics")
                response = connection.getresponse()
                response.read()
                counts["scrapes" if response.status == 200 else "failures"] += 1
            except OSError:
                counts["failures"] += 1
            finally:
                connection.close()

    thread = threading.Thread(target=scrape, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
        results["metrics_scrapes"] = dict(counts)


def run_knockgate(params: Params, log: Callable[[str], None], results: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="kgbench-") as tmp, Topology(vlan=False) as topo:
        workdir = Path(tmp)
        bench = Bench(topo, params, workdir)
        bench.prepare()
        config = KNOCKGATE_CONFIG
        sock = workdir / "metrics.sock"
        if METRICS["on"]:
            config = config.replace("doors:", f"metrics: {{listen: 'unix:{sock}'}}\ndoors:")
        with knockgate_daemon(topo, workdir, config, results, 2000) as (_, pid):
            results["pid"] = pid
            log(f"knockgate up, pid {pid}" + (", metrics scraped every second" * METRICS["on"]))
            with scraping(sock, results) if METRICS["on"] else contextlib.nullcontext():
                measure(bench, pid, results, log)


def run_knockd(params: Params, log: Callable[[str], None], results: dict[str, Any]) -> None:
    if not os.access(KNOCKD, os.X_OK) or not os.access(IPTABLES, os.X_OK):
        raise Failed(f"needs {KNOCKD} and {IPTABLES}")
    with tempfile.TemporaryDirectory(prefix="kgbench-") as tmp, Topology(vlan=False) as topo:
        workdir = Path(tmp)
        bench = Bench(topo, params, workdir)
        bench.prepare()

        def ipt(*args: str) -> None:
            topo.run("server", [IPTABLES, "-w", *args])

        reject = ["-p", "tcp", "--dport", str(PROTECTED), "-j", "REJECT"]
        reject += ["--reject-with", "tcp-reset"]

        def reset_chain() -> None:  # between measurements: back to "closed to everyone"
            ipt("-F", CHAIN)
            ipt("-A", CHAIN, *reject)

        proc = None
        try:
            ipt("-N", CHAIN)
            ipt("-A", CHAIN, *reject)
            ipt("-A", "INPUT", "-p", "tcp", "--dport", str(PROTECTED), "-j", CHAIN)
            knockd_log = workdir / "knockd.log"
            conf = workdir / "knockd.conf"
            conf.write_text(KNOCKD_CONFIG.replace("@LOG@", str(knockd_log)))
            with (workdir / "knockd.out").open("w") as out:
                proc = topo.popen(
                    "server",
                    [KNOCKD, "-c", str(conf), "-i", "eth0"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            deadline = time.monotonic() + 15
            while "listening on" not in (knockd_log.read_text() if knockd_log.exists() else ""):
                if proc.poll() is not None or time.monotonic() > deadline:
                    said = (workdir / "knockd.out").read_text()[-500:]
                    raise Failed(f"knockd did not start (exit {proc.poll()}): {said}")
                time.sleep(0.05)
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            if not cmdline.startswith(KNOCKD.encode()):
                raise Failed(f"pid {proc.pid} is not knockd: {cmdline[:120]!r}")
            results["pid"] = proc.pid
            log(f"knockd up, pid {proc.pid}")
            bench.on_between = reset_chain
            measure(bench, proc.pid, results, log)
        finally:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for args in (
                ["-D", "INPUT", "-p", "tcp", "--dport", str(PROTECTED), "-j", CHAIN],
                ["-F", CHAIN],
                ["-X", CHAIN],
            ):
                with contextlib.suppress(Exception):
                    topo.run("server", [IPTABLES, "-w", *args], check=False)
            knockd_log = workdir / "knockd.log"
            if knockd_log.exists():
                results["log_tail"] = knockd_log.read_text()[-2000:]


# ------------------------------------------------------------------ the table


def num(value: float) -> str:
    """10 000 (a thin space would not survive every terminal)."""
    return f"{value:,.0f}".replace(",", " ")


def cell_latency(r: Any, key: str) -> str:
    if not isinstance(r, dict):
        return str(r)
    value = fmt_ms(r[key])
    if r["opened"] < r["trials"]:
        value += f" ({r['opened']}/{r['trials']} opened)"
    return value


def cell_flood(r: Any) -> str:
    if not isinstance(r, dict):
        return str(r)
    gen = r.get("generator", {})
    achieved = f"{num(gen['rate'])} pps" if gen.get("rate") else "rate unknown"
    text = f"{r['opened']}/{r['trials']} (flood {achieved}; median {fmt_ms(r['median'])})"
    if r.get("note"):
        text += f"; {r['note']}"
    return text


def cell_concurrent(r: Any) -> str:
    if not isinstance(r, dict):
        return str(r)
    text = f"{r['opened']}/{r['clients']}"
    if r.get("last") is not None:
        text += f" (last at {fmt_ms(r['last'])})"
    return text


def verdict(ok: bool | None) -> str:
    return "" if ok is None else (" ✅" if ok else " ❌")


def build_table(res: dict[str, dict[str, Any] | str], params: Params) -> str:
    kg = res.get("knockgate", "not run")
    kd = res.get("knockd", "not run")

    def get(r: dict[str, Any] | str, key: str) -> Any:
        if isinstance(r, str):
            return r
        if key in r:
            return r[key]
        if "error" in r:
            return r["error"]
        return "interrupted" if r.get("interrupted") else "not measured"

    rows: list[tuple[str, str, str, str, str]] = []
    n = params.trials

    for key, limit_ms, target, ref in (
        ("median", 3, "≤ 3 ms", "~20-25 ms"),
        ("p90", 8, "≤ 8 ms", "~45 ms"),
    ):
        kgr, kdr = get(kg, "latency"), get(kd, "latency")
        ok = None
        if isinstance(kgr, dict):
            ok = kgr[key] * 1000 <= limit_ms and kgr["opened"] == kgr["trials"]
        label = f"Knock-to-open latency, {key} ({n} knocks, no flood)"
        rows.append(
            (label, target, cell_latency(kgr, key) + verdict(ok), cell_latency(kdr, key), ref)
        )

    for rate in params.rates:
        key = f"flood_{rate}"
        kgr, kdr = get(kg, key), get(kd, key)
        need = n if rate <= 10_000 else n - max(1, n // 30)
        ok = kgr["opened"] >= need if isinstance(kgr, dict) else None
        target = f"{n}/{n}" if need == n else f"≥ {need}/{n}"
        ref = {10_000: "29/30", 50_000: "12/30"}.get(rate, "-")
        label = f"Valid knocks opened during a spoofed SYN flood of {num(rate)} pps"
        rows.append((label, target, cell_flood(kgr) + verdict(ok), cell_flood(kdr), ref))

    def cpu_cell(r: Any) -> str:
        if not isinstance(r, dict):
            return str(r)
        text = f"{r['cpu']:.1f} %"
        if r.get("packet_cpu", 0) >= 0.5:
            text += f" (of which {r['packet_cpu']:.1f} % in the packet process)"
        if r.get("child_cpu", 0) >= 0.5:
            text += f" (+{r['child_cpu']:.1f} % in the commands it runs)"
        return text

    for rate in params.rates:
        key = f"flood_{rate}"
        kgr = get(kg, key)
        ok = kgr["cpu"] < 35 if isinstance(kgr, dict) and rate == 10_000 else None
        target, ref = ("< 35 %", "~50 %") if rate == 10_000 else ("-", "-")
        label = f"Daemon CPU during the {num(rate)} pps flood (% of one core)"
        rows.append((label, target, cpu_cell(kgr) + verdict(ok), cpu_cell(get(kd, key)), ref))

    def rss_cells(r: Any) -> tuple[str, str, bool | None, bool | None]:
        if not isinstance(r, dict):
            return str(r), str(r), None, None
        hwm = mib(r["hwm_kib"])
        before, after = mib(r["rss_before_kib"]), mib(r["rss_after_kib"])
        return (
            f"{hwm:.1f} MiB",
            f"{before:.1f} → {after:.1f} MiB ({after - before:+.1f})",
            hwm <= 80,
            after - before <= 5,
        )

    first = f"flood_{params.rates[0]}"
    kg_hwm, kg_flat, ok_hwm, ok_flat = rss_cells(get(kg, first))
    kd_hwm, kd_flat, _, _ = rss_cells(get(kd, first))
    at = f"the {num(params.rates[0])} pps flood"
    rows.append(
        (f"Peak RSS (VmHWM) at the end of {at}", "≤ 80 MiB", kg_hwm + verdict(ok_hwm), kd_hwm, "-")
    )
    rows.append(
        (f"RSS before → after {at}", "flat (≤ +5 MiB)", kg_flat + verdict(ok_flat), kd_flat, "-")
    )
    for rate in params.rates[1:]:
        kg_hwm, _, _, _ = rss_cells(get(kg, f"flood_{rate}"))
        kd_hwm, _, _, _ = rss_cells(get(kd, f"flood_{rate}"))
        rows.append(
            (f"Peak RSS (VmHWM) at the end of the {num(rate)} pps flood", "-", kg_hwm, kd_hwm, "-")
        )
    for c in params.concurrency:
        key = f"concurrent_{c}"
        kgr, kdr = get(kg, key), get(kd, key)
        ok = kgr["opened"] == c if isinstance(kgr, dict) else None
        ref = "1/100" if c == 100 else "-"
        label = f"{c} clients knocking at once (interleaved steps), opened"
        rows.append(
            (label, f"{c}/{c}", cell_concurrent(kgr) + verdict(ok), cell_concurrent(kdr), ref)
        )

    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "| Measurement | knockgate target | knockgate (nftables) | knockd 0.8 (iptables) "
        "| knockd reference |",
        "|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def flood_notes(res: dict[str, dict[str, Any] | str], params: Params) -> list[str]:
    """One line per daemon and flood: what the generator and the machine did."""
    notes = []
    for name in ("knockgate", "knockd"):
        r = res.get(name)
        if not isinstance(r, dict):
            continue
        for key in ("error", "died", "stop"):
            if key in r:
                notes.append(f"- {name}: {key}: {r[key]}")
        for rate in params.rates:
            f = r.get(f"flood_{rate}")
            if not isinstance(f, dict):
                continue
            gen = f.get("generator", {})
            if not gen:
                notes.append(f"- {name}, {num(rate)} pps: no report from the generator")
                continue
            notes.append(
                f"- {name}, {num(rate)} pps: {gen['senders']} sender process(es) achieved "
                f"{num(gen['rate'])} frames/s ({num(gen['sent'])} frames, {gen['errors']} send "
                f"errors, {gen['cpu']:.0f} % of a core); measured window {f['window']:.1f} s; "
                f"the whole machine ({os.cpu_count()} CPUs) {f['machine_busy']:.0f} % busy; "
                f"kernel input-backlog drops {f['softnet_drops']}; the client's probe used "
                f"{f.get('probe_cpu', 0):.0f} % of a core"
            )
            trail = f.get("rss_samples") or []
            if trail:
                step = -(-len(trail) // 8)  # at most 8 samples, the last one included
                picked = trail[len(trail) - 1 :: -step][::-1]
                notes.append(
                    f"  RSS during it: {mib(f['rss_before_kib']):.0f} MiB before, then "
                    + ", ".join(f"{mib(kib):.0f} MiB at {t:.1f} s" for t, kib in picked)
                )
    return notes


# ------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced run for smoke testing")
    parser.add_argument("--only", choices=("knockgate", "knockd"), help="measure one daemon")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    parser.add_argument(
        "--metrics", action="store_true", help="knockgate serves metrics, scraped every second"
    )
    parser.add_argument(
        "--senders", type=int, default=1, help="flood generator processes (default 1)"
    )
    args = parser.parse_args()
    METRICS["on"] = args.metrics
    missing = ensure_root_tools()
    for tool in ("nft", IPTABLES, KNOCKD):
        if shutil.which(tool) is None:
            missing.append(f"needs {tool}")
    if missing:
        print("daemon_bench: " + "; ".join(missing), file=sys.stderr)
        return 2

    interrupt_on_signals()
    params = dataclasses.replace(QUICK if args.quick else FULL, senders=args.senders)
    started = time.monotonic()
    log = stderr_log(started)
    baseline = machine_busy()
    others = [n for n in list_namespaces() if n.startswith("kg")]
    log(f"machine {baseline:.0f} % busy before the run; {len(others)} kg* namespaces of others")

    runners = {"knockgate": run_knockgate, "knockd": run_knockd}
    names = [args.only] if args.only else list(runners)
    results: dict[str, dict[str, Any] | str] = {}
    interrupted = False
    try:
        for name in names:
            log(f"{name}: building the topology")
            partial: dict[str, Any] = {}
            results[name] = partial
            try:
                runners[name](params, log, partial)
            except (KeyboardInterrupt, SystemExit):
                partial["interrupted"] = True
                raise
            except Exception as error:  # shown in the table
                partial["error"] = short_error(error)
                log(f"{name}: {partial['error']}")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; everything was cleaned up")
    elapsed = time.monotonic() - started

    print()
    print(
        f"## knockgate vs knockd ({'quick' if args.quick else 'full'} run, "
        f"{params.trials} trials per row, {elapsed:.0f} s)"
    )
    print()
    print(build_table(results, params))
    print()
    print(
        f"Sequence {STEPS} protecting {PROTECTED}/tcp, Seq_Timeout 5 s; knockd opens with "
        f"`iptables -I {CHAIN} -s %IP% ... -j ACCEPT` (iptables-nft), knockgate with its "
        "nftables set. Latency: last knock sent → first accepted connect (retried every "
        "0.2 ms, after 10 ms every 2 % of the wait; 2 s bound), fresh source address per "
        "trial. Flood: spoofed TCP SYNs from "
        f"{SPOOF} to the 3 knock ports, {params.warmup:g} s before the first knock and for "
        "the whole measurement; CPU = utime+stime of the daemon process over that window."
    )
    notes = [
        f"- Before the run the machine ({os.cpu_count()} CPUs) was {baseline:.0f} % busy; "
        f"{len(others)} kg* namespaces of other runs existed (concurrent tests share the CPUs)."
    ]
    notes += flood_notes(results, params)
    if notes:
        print()
        print("\n".join(notes))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
