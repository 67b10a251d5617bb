#!/usr/bin/env python3
"""knockgate's SPA door under a flood of garbage UDP on its port, on real packets.

Not a test: it prints a Markdown table. Needs root, iproute2 and nftables. Built on
daemon_bench.py (its topology preparation, address pool, /proc helpers) and probe.py
(its connect loop), with a flood generator and an SPA client of its own:

* Topology (tests/integration/netns.py): server, client, other, attacker namespaces on a
  bridge; ``knockgate run`` in the server namespace with ``firewall: {backend: nftables}``
  and one SPA door on UDP 62201 (user alice, fresh keys from ``generate_keys()``) opening
  22/tcp for 10 s; a TCP listener on 22 in the server namespace (probe.py serve).
* A trial (``spa_flood.py knock``, in the client namespace): a fresh SPA packet (new
  timestamp, random and salt) granting the trial's own source address (a fresh address
  of 198.18.252.0/22 per trial, so no earlier grant can answer), sent from that address;
  then a connect to 22/tcp from it, retried (probe.py ``wait_open``: every 0.2 ms for
  10 ms, then every 2 % of the wait) until accepted or 2 s have passed. Latency: from
  the SPA datagram sent to the first accepted connect.
* The flood (``spa_flood.py gen``, in the attacker namespace, AF_PACKET): Ethernet/IPv4/UDP
  frames to the server's 62201 from random spoofed sources in a /18 of 198.18.0.0/16 that
  holds neither the topology's /24 nor the client block; payloads 150-400 bytes, half
  random bytes, half random base64 text (``--plausible F``: that fraction of the text
  also passes wire.py's cheap checks, first character and length class, so its HMAC is
  computed: the expensive garbage). It runs ``--warmup`` s before the first trial and for
  the whole measurement.

Measured per flood rate: trials opened, latency median/p90/max, the generator's achieved
rate, the daemon's CPU (utime+stime over the window, % of one core), its RSS (peak of
0.5 s samples and VmHWM), frames it captured and SPA packets it counted (status deltas),
and the drops of its capture socket (``ss -0 -m``: skmem ``d``). Also a run without flood,
and ``knockgate status --json`` counters at the end.

Namespaces and processes are removed at the end (Topology's exit, the daemon stopped and
its table torn down), also on failure and on Ctrl-C/SIGTERM.

    python testbed/bench/spa_flood.py [--rates 10000,50000] [--trials 30] [--plausible 0]
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import random
import re
import resource
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

BENCH_NET = ipaddress.IPv4Network("198.18.0.0/15")
SPA_PORT = 62201
USER = "alice"
B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
ETH_P_IP = 0x0800


def body_lengths(low: int, high: int) -> list[int]:
    """UDP payload lengths (low..high) an fwknop packet can have (wire.py's length class:
    base64 of "Salted__"+salt+16k bytes, minus the 10 unsent characters, plus the HMAC)."""
    out = []
    for k in range(1, 200):
        size = (4 * (16 + 16 * k) + 2) // 3 - 10 + 43
        if low <= size <= high:
            out.append(size)
    return out


# ------------------------------------------------------------------ gen (attacker side)


def build_udp_frames(
    count: int,
    src_mac: bytes,
    dst_mac: bytes,
    dst_ip: str,
    port: int,
    spoof: ipaddress.IPv4Network,
    seed: int,
    plausible: float,
) -> list[bytes]:
    from flood import checksum

    rng = random.Random(seed)
    eth = dst_mac + src_mac + struct.pack("!H", ETH_P_IP)
    dst = ipaddress.IPv4Address(dst_ip).packed
    base, span = int(spoof.network_address), spoof.num_addresses
    classes = body_lengths(150, 400)
    frames = []
    for i in range(count):
        if i % 2 == 0:
            payload = rng.randbytes(rng.randint(150, 400))
        elif rng.random() < plausible:  # passes the cheap checks: the HMAC is computed
            size = rng.choice(classes)
            payload = bytes([rng.choice(b"89+/")]) + bytes(rng.choices(B64, k=size - 1))
        else:
            payload = bytes(rng.choices(B64, k=rng.randint(150, 400)))
        src = struct.pack("!I", base + rng.randrange(1, span - 1))
        sport = rng.randrange(1024, 65536)
        total = 20 + 8 + len(payload)
        ip = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, total, rng.getrandbits(16), 0x4000, 64, 17, 0, src, dst
        )
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        udp = struct.pack("!HHHH", sport, port, 8 + len(payload), 0)  # checksum 0: none
        frames.append(eth + ip + udp + payload)
    return frames


def cmd_gen(args: argparse.Namespace) -> int:
    from flood import mac_bytes, run_flood

    spoof = ipaddress.IPv4Network(args.spoof)
    if not spoof.subnet_of(BENCH_NET) or ipaddress.IPv4Address(args.dst_ip) not in BENCH_NET:
        print("refusing: sources and destination must stay inside 198.18.0.0/15", file=sys.stderr)
        return 2
    if not 0 < args.seconds <= 600 or args.rate <= 0:
        print("refusing: --seconds must be in (0, 600] and --rate > 0", file=sys.stderr)
        return 2
    max_packets = int(args.rate * args.seconds) + args.batch

    def build(src_mac: bytes) -> list[bytes]:
        dst_mac = mac_bytes(args.dst_mac)
        return build_udp_frames(
            args.pool, src_mac, dst_mac, args.dst_ip, args.port, spoof, args.seed, args.plausible
        )

    report = run_flood(args.ifname, build, args.rate, args.seconds, max_packets, args.batch)
    print(json.dumps(report), flush=True)
    return 0


# ------------------------------------------------------------------ knock (client side)


def cmd_knock(args: argparse.Namespace) -> int:
    from probe import wait_open

    from appliance.spa.wire import SpaKeys, new_message, seal

    secrets_ = json.loads(Path(args.keys).read_text())
    keys = SpaKeys.from_base64(secrets_["key"], secrets_["hmac"])
    results: list[float | None] = []
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_start = usage.ru_utime + usage.ru_stime
    for src in args.sources.split(","):
        packet = seal(new_message(USER, int(time.time()), f"{src},tcp/{args.port}"), keys)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((src, 0))
            s.sendto(packet, (args.server, args.spa_port))
            t_sent = time.perf_counter()
        results.append(wait_open(src, args.server, args.port, t_sent, args.timeout, 0.0002, 0.02))
        time.sleep(args.gap)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - cpu_start
    print(json.dumps({"latencies": results, "cpu_seconds": cpu}), flush=True)
    return 0


# ------------------------------------------------------------------ the orchestration


def spoof_range(server_ipv4: str, client_block: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
    """A /18 of 198.18.0.0/16 with neither the topology's /24 nor the client block in it."""
    own = ipaddress.IPv4Network(f"{server_ipv4}/24", strict=False)
    for candidate in ipaddress.IPv4Network("198.18.0.0/16").subnets(new_prefix=18):
        if not candidate.overlaps(own) and not candidate.overlaps(client_block):
            return candidate
    raise RuntimeError("no free /18 for spoofed sources")


def socket_drops(topo: Any, pid: int) -> int | None:
    """Drops (skmem ``d``) summed over the daemon's packet sockets, from ``ss -0 -m -p``."""
    out = topo.run("server", ["ss", "-0", "-a", "-m", "-p"], check=False).stdout
    total, found, mine = 0, False, False
    for line in out.splitlines():  # skmem is on the socket's line (or the next one)
        if f"pid={pid}," not in line and not line.startswith((" ", "\t")):
            mine = False
            continue
        mine = mine or f"pid={pid}," in line
        match = re.search(r"skmem:\(.*\bd(\d+)\)", line)
        if mine and match:
            total += int(match[1])
            found = True
    return total if found else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    gen = sub.add_parser("gen", help="(internal) the garbage flood, in the attacker namespace")
    gen.add_argument("--ifname", default="eth0")
    gen.add_argument("--dst-mac", required=True)
    gen.add_argument("--dst-ip", required=True)
    gen.add_argument("--port", type=int, default=SPA_PORT)
    gen.add_argument("--rate", type=float, required=True)
    gen.add_argument("--seconds", type=float, required=True)
    gen.add_argument("--spoof", required=True)
    gen.add_argument("--pool", type=int, default=20000)
    gen.add_argument("--batch", type=int, default=50)
    gen.add_argument("--seed", type=int, default=1)
    gen.add_argument("--plausible", type=float, default=0.0)
    knock = sub.add_parser("knock", help="(internal) SPA trials, in the client namespace")
    knock.add_argument("--server", required=True)
    knock.add_argument("--port", type=int, default=22)
    knock.add_argument("--spa-port", type=int, default=SPA_PORT)
    knock.add_argument("--sources", required=True)
    knock.add_argument("--keys", required=True)
    knock.add_argument("--timeout", type=float, default=2.0)
    knock.add_argument("--gap", type=float, default=0.02)
    parser.add_argument("--rates", default="10000,50000", help="flood rates, packets/s")
    parser.add_argument("--trials", type=int, default=30, help="SPA knocks per measurement")
    parser.add_argument("--warmup", type=float, default=2.0, help="flood seconds before trial 1")
    parser.add_argument("--settle", type=float, default=3.0, help="pause after each flood")
    parser.add_argument("--senders", type=int, default=1, help="flood generator processes")
    parser.add_argument(
        "--plausible",
        type=float,
        default=0.0,
        help="fraction of the base64 garbage that passes the cheap checks (HMAC computed)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    args = parser.parse_args()
    internal = {"gen": cmd_gen, "knock": cmd_knock}
    return internal.get(args.command, run_bench)(args)


def run_bench(args: argparse.Namespace) -> int:
    import daemon_bench as db  # sets tests.integration.daemon.PYTHON to the venv's
    from daemon_bench import (
        CLK_TCK,
        PYTHON,
        Bench,
        Failed,
        Params,
        flood_generators,
        interrupt_on_signals,
        knockgate_daemon,
        machine_busy,
        percentile,
        proc_stat,
        proc_status_kib,
        short_error,
        softnet_drops,
        stderr_log,
        system_cpu,
    )

    from appliance.spa.keyfile import generate_keys
    from tests.integration.netns import Topology, ensure_root_tools, list_namespaces

    rates = tuple(int(r) for r in args.rates.split(",") if r.strip())
    missing = ensure_root_tools(vlan=False)
    if missing:
        print("spa_flood: " + "; ".join(missing), file=sys.stderr)
        return 2

    interrupt_on_signals()
    started = time.monotonic()
    log = stderr_log(started)
    baseline = machine_busy()
    others = [n for n in list_namespaces() if n.startswith("kg")]
    log(f"machine {baseline:.0f} % busy; {len(others)} kg* namespaces of others exist")

    params = Params(args.trials, rates, args.warmup, args.settle, (), 0.0)
    timeout, gap = params.trial_timeout, params.gap
    results: dict[str, Any] = {"rates": rates, "trials": args.trials}
    interrupted = False
    try:
        with (
            tempfile.TemporaryDirectory(prefix="kgspaflood-") as tmp,
            Topology(vlan=False) as topo,
        ):
            workdir = Path(tmp)
            bench = Bench(topo, params, workdir)
            bench.prepare()
            server = bench.server.ipv4
            spoof = spoof_range(server, db.CLIENT_BLOCK)
            key_b64, hmac_b64 = generate_keys()
            keys_path = workdir / "keys.json"
            keys_path.write_text(json.dumps({"key": key_b64, "hmac": hmac_b64}))
            state_dir = workdir / "state"
            state_dir.mkdir()
            config = (
                "interfaces: [eth0]\n"
                "status_socket: @SOCKET@\n"
                f"state_dir: {state_dir}\n"
                "firewall: {backend: nftables}\n"
                "doors:\n"
                "  spa:\n"
                "    spa:\n"
                f"      port: {SPA_PORT}\n"
                "      users:\n"
                f"        {USER}: {{key_base64: {key_b64}, hmac_key_base64: {hmac_b64}}}\n"
                "    open: {ports: [22/tcp], duration: 10}\n"
            )
            with knockgate_daemon(topo, workdir, config, results, 1500) as (daemon, pid):
                log(f"knockgate up, pid {pid}; spoofed sources {spoof}")

                def counters() -> dict[str, int]:
                    data = daemon.status()
                    found: dict[str, int] = data.get("counters", {})  # type: ignore[assignment]
                    return found

                def knock_run() -> tuple[list[float | None], float]:
                    sources = bench.pool.take(params.trials)
                    argv = [PYTHON, __file__, "knock", "--server", server, "--keys"]
                    argv += [str(keys_path), "--sources", ",".join(sources)]
                    argv += ["--timeout", str(timeout), "--gap", str(gap)]
                    t0 = time.monotonic()
                    done = topo.run(
                        "client",
                        argv,
                        timeout=params.trials * (timeout + gap + 0.5) + 30,
                        check=False,
                    )
                    if done.returncode != 0:
                        raise Failed(f"knock exited {done.returncode}: {done.stderr[-300:]}")
                    out = json.loads(done.stdout.strip().splitlines()[-1])
                    return out["latencies"], 100.0 * out["cpu_seconds"] / (time.monotonic() - t0)

                def summary(values: list[float | None]) -> dict[str, Any]:
                    opened = [v for v in values if v is not None]
                    return {
                        "opened": len(opened),
                        "trials": len(values),
                        "median": statistics.median(opened) if opened else None,
                        "p90": percentile(opened, 0.9) if opened else None,
                        "max": max(opened) if opened else None,
                        "missed": [i for i, v in enumerate(values) if v is None],
                    }

                @contextlib.contextmanager
                def flood(rate: int, seconds: float, report: dict[str, Any]) -> Iterator[None]:
                    senders = max(1, args.senders)
                    argv = [PYTHON, __file__, "gen", "--dst-mac", bench.server_mac]
                    argv += ["--dst-ip", server, "--spoof", str(spoof)]
                    argv += ["--rate", f"{rate / senders:.1f}", "--seconds", f"{seconds:.1f}"]
                    argv += ["--plausible", str(args.plausible)]
                    with flood_generators(topo, argv, senders, rate, report, ready_timeout=60):
                        yield

                def flooded(rate: int) -> dict[str, Any]:
                    out: dict[str, Any] = {"rate_target": rate}
                    gen: dict[str, Any] = {}
                    bound = params.warmup + params.trials * (timeout + gap + 0.3) + 20
                    samples: list[int] = []
                    stop_sampling = threading.Event()

                    def sample() -> None:
                        while not stop_sampling.wait(0.5):
                            with contextlib.suppress(OSError, Failed):
                                samples.append(proc_status_kib(pid, "VmRSS"))

                    out["rss_before_kib"] = proc_status_kib(pid, "VmRSS")
                    c0 = counters()
                    d0 = socket_drops(topo, pid)
                    sampler = threading.Thread(target=sample, daemon=True)
                    try:
                        with flood(rate, bound, gen):
                            t0 = time.monotonic()
                            sampler.start()
                            cpu0, _ = proc_stat(pid)
                            busy0, total0 = system_cpu()
                            drops0 = softnet_drops()
                            time.sleep(params.warmup)
                            values, probe_cpu = knock_run()
                            t1 = time.monotonic()
                            cpu1, _ = proc_stat(pid)
                            busy1, total1 = system_cpu()
                            out["softnet_drops"] = softnet_drops() - drops0
                            out["hwm_kib"] = proc_status_kib(pid, "VmHWM")
                            out["rss_after_kib"] = proc_status_kib(pid, "VmRSS")
                    finally:
                        out["generator"] = gen
                        stop_sampling.set()
                        if sampler.is_alive():
                            sampler.join(2)
                    time.sleep(0.5)  # the daemon drains its socket
                    c1 = counters()
                    d1 = socket_drops(topo, pid)
                    out.update(summary(values))
                    window = t1 - t0
                    out.update(
                        window=window,
                        cpu=100.0 * (cpu1 - cpu0) / CLK_TCK / window,
                        machine_busy=100.0 * (busy1 - busy0) / max(1, total1 - total0),
                        probe_cpu=probe_cpu,
                        rss_peak_kib=max(samples, default=out["rss_after_kib"]),
                        delta={k: c1.get(k, 0) - c0.get(k, 0) for k in c1},
                        socket_drops=None if d0 is None or d1 is None else d1 - d0,
                    )
                    time.sleep(params.settle)
                    return out

                log("no flood: latency")
                try:
                    values, _ = knock_run()
                    results["no_flood"] = summary(values)
                except Exception as error:
                    results["no_flood"] = short_error(error)
                log(f"  no_flood: {results['no_flood']}")
                for rate in rates:
                    key = f"flood_{rate}"
                    log(f"flood {rate} pps")
                    try:
                        results[key] = flooded(rate)
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as error:
                        results[key] = short_error(error)
                    log(f"  {key}: {results[key]}")
                results["status_after"] = counters()
                process = daemon.process
                if process is not None and process.poll() is not None:
                    results["died"] = f"the daemon exited {process.returncode}"
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; everything was cleaned up")
    except Exception as error:
        results["error"] = short_error(error)
        log(results["error"])
    elapsed = time.monotonic() - started
    print()
    print(report_table(results, args, elapsed, baseline, len(others)))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if interrupted:
        return 130
    return 0 if "error" not in results else 1


# ------------------------------------------------------------------ the table


def report_table(
    res: dict[str, Any], args: argparse.Namespace, elapsed: float, baseline: float, others: int
) -> str:
    from daemon_bench import fmt_ms, mib, num

    n = args.trials
    rows: list[tuple[str, str, str]] = []

    def lat(r: Any) -> str:
        if not isinstance(r, dict):
            return str(r)
        if r["median"] is None:
            return "-"
        return f"{fmt_ms(r['median'])} / {fmt_ms(r['p90'])} / {fmt_ms(r['max'])}"

    def opened(r: Any, need: int | None) -> str:
        if not isinstance(r, dict):
            return str(r)
        text = f"{r['opened']}/{r['trials']}"
        if need is not None:
            text += " ✅" if r["opened"] >= need else " ❌"
        if r.get("missed"):
            text += f" (missed trials {r['missed']})"
        return text

    nf = res.get("no_flood", "not run")
    rows.append(("No flood: SPA knocks opened", f"{n}/{n}", opened(nf, n)))
    rows.append(("No flood: latency median / p90 / max", "-", lat(nf)))
    for rate in res.get("rates", ()):
        r = res.get(f"flood_{rate}", "not run")
        at = f"{num(rate)} pps"
        rows.append((f"{at}: valid SPA knocks opened", f"{n}/{n}", opened(r, n)))
        rows.append((f"{at}: latency median / p90 / max", "-", lat(r)))
        if not isinstance(r, dict):
            continue
        gen = r.get("generator") or {}
        rows.append(
            (
                f"{at}: flood rate achieved",
                f"≥ {num(0.95 * rate)} pps",
                f"{num(gen['rate'])} pps ({num(gen['sent'])} frames, {gen['errors']} errors, "
                f"generator {gen['cpu']:.0f} % of a core)"
                if gen
                else "no report",
            )
        )
        rows.append((f"{at}: daemon CPU (% of one core)", "-", f"{r['cpu']:.1f} %"))
        rows.append(
            (
                f"{at}: daemon RSS peak (samples) / VmHWM",
                "-",
                f"{mib(r['rss_peak_kib']):.1f} MiB / {mib(r['hwm_kib']):.1f} MiB "
                f"(before {mib(r['rss_before_kib']):.1f})",
            )
        )
        d = r.get("delta", {})
        sent = gen.get("sent", 0) - gen.get("errors", 0)
        frames = d.get("frames", 0)
        share = f" ({100.0 * frames / sent:.1f} % of the frames sent)" if sent else ""
        rows.append(
            (
                f"{at}: frames captured / spa_packets / spa_unauthenticated (deltas)",
                "-",
                f"{num(frames)} / {num(d.get('spa_packets', 0))} / "
                f"{num(d.get('spa_unauthenticated', 0))}{share}; spa_accepted "
                f"{d.get('spa_accepted', 0)}, capture socket drops {r.get('socket_drops')}",
            )
        )
    status = res.get("status_after")
    if isinstance(status, dict):
        keys = [k for k in status if k.startswith("spa_")] + ["frames"]
        rows.append(
            (
                "`knockgate status --json` counters after the run",
                "-",
                ", ".join(f"{k} {num(status[k])}" for k in keys if k in status),
            )
        )

    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        f"## knockgate SPA under a garbage UDP flood ({n} trials per row, {elapsed:.0f} s)",
        "",
        "| Measurement | target | knockgate (nftables) |",
        "|---|---|---|",
    ]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    lines.append("")
    lines.append(
        f"SPA door on udp/{SPA_PORT} opening 22/tcp; a trial = one fresh SPA packet from a "
        "fresh client address, then connects to 22/tcp until accepted (2 s bound); latency "
        "from the SPA datagram sent to the accepted connect. Flood: spoofed garbage UDP "
        "(150-400 bytes, half random bytes, half base64 text, "
        f"{100 * args.plausible:.0f} % of the text passing the cheap checks) for "
        f"{args.warmup:g} s before the first trial and during all of them."
    )
    notes = [
        f"- Before the run the machine ({os.cpu_count()} CPUs) was {baseline:.0f} % busy; "
        f"{others} kg* namespaces of other runs existed."
    ]
    for key in ("error", "died", "stop"):
        if key in res:
            notes.append(f"- {key}: {res[key]}")
    for rate in res.get("rates", ()):
        r = res.get(f"flood_{rate}")
        if isinstance(r, dict):
            notes.append(
                f"- {num(rate)} pps: window {r['window']:.1f} s, machine {r['machine_busy']:.0f} "
                f"% busy, kernel backlog drops {r.get('softnet_drops')}, client probe "
                f"{r['probe_cpu']:.0f} % of a core"
            )
    return "\n".join([*lines, "", *notes])


if __name__ == "__main__":
    sys.exit(main())
