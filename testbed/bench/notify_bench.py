#!/usr/bin/env python3
"""The cost of metrics and notifications under a flood: knockgate with them off and on.

Not a test: it prints a Markdown table. Needs root, iproute2, nftables and aiosmtpd
(the test extra). Built on daemon_bench.py (its topology, probes and flood generator):

* ``off``: knockgate with neither metrics nor notifiers.
* ``on``: knockgate with metrics on a Unix socket (scraped every second) and two
  notifiers: a signed webhook for the default events (opened, refusals, knock noise
  summaries, failures) and a mail digest every 10 s (both to real receivers on the
  server namespace's loopback: tests/integration/notify_receivers.py).
* ``metrics``, ``notify`` (with ``--modes``): one of the two alone.

Each run gets a fresh topology; while spoofed SYNs hit the knock ports at ``--rate``
(10 000/s) for ``--seconds`` (30), ``--trials`` (30) knocks are timed from the client
(knock->open latency), and the daemon's CPU (its packet process included) is measured
over the whole flood. Then the daemon is stopped (its notifications flushed) and the
notifications the receivers got are counted. The machine is shared: the modes are run
``--rounds`` times (2), interleaved (off, on, off, on), and each row printed.

    python testbed/bench/notify_bench.py [--rate 10000] [--seconds 30] [--rounds 2]
        [--modes off,metrics,notify,on]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import daemon_bench as db  # noqa: E402

from tests.integration.netns import Topology, ensure_root_tools  # noqa: E402

HOOK_PORT = 8765
SMTP_PORT = 8025
NOTIFY = f"""\
notify:
  hook:
    webhook: {{url: "http://127.0.0.1:{HOOK_PORT}/bench", secret_file: @DIR@/hook.secret}}
  digest:
    mail: {{host: 127.0.0.1, port: {SMTP_PORT}, from: kg@example.org, to: ops@example.org,
           every: 10}}
"""


@contextlib.contextmanager
def receiver(topo: Topology, argv: list[str]) -> Any:
    proc = topo.popen(
        "server",
        [db.PYTHON, "-m", "tests.integration.notify_receivers", *argv],
        stdout=subprocess.PIPE,
        cwd=str(db.REPO),
    )
    try:
        if db.read_line(proc, 15) != "ready":
            raise db.Failed(f"receiver {argv[0]} did not start")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def thread_ticks(pid: int) -> tuple[int, int]:
    """(the loop's thread, every other thread of the monitor): utime+stime in ticks."""
    main = others = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError), open(task / "stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
            ticks = int(rest[11]) + int(rest[12])
            if task.name == str(pid):
                main += ticks
            else:
                others += ticks
    return main, others


def lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def one_run(mode: str, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    params = db.Params(args.trials, (args.rate,), 2.0, 0.0, (), 5.0)
    out: dict[str, Any] = {"mode": mode}
    with tempfile.TemporaryDirectory(prefix="kgbench-") as tmp, Topology(vlan=False) as topo:
        workdir = Path(tmp)
        bench = db.Bench(topo, params, workdir)
        bench.prepare()
        config = db.KNOCKGATE_CONFIG
        sock = workdir / "metrics.sock"
        hook_out, mail_out = workdir / "hook.jsonl", workdir / "mail.jsonl"
        on = mode in ("on", "notify")
        metrics = mode in ("on", "metrics")
        if metrics:
            config = config.replace("doors:", f"metrics: {{listen: 'unix:{sock}'}}\ndoors:")
        if on:
            secret = workdir / "hook.secret"
            secret.write_text("bench-secret\n")
            secret.chmod(0o600)
            config += NOTIFY.replace("@DIR@", str(workdir))
        stack = contextlib.ExitStack()
        with stack:
            if on:
                hook = ["webhook", "--port", str(HOOK_PORT), "--out", str(hook_out)]
                stack.enter_context(receiver(topo, [*hook, "--secret-file", str(secret)]))
                mail = ["smtp", "--port", str(SMTP_PORT), "--out", str(mail_out)]
                stack.enter_context(receiver(topo, mail))
            results: dict[str, Any] = {}
            with db.knockgate_daemon(topo, workdir, config, results, 1500) as (_daemon, pid):
                stack2 = contextlib.ExitStack()
                with stack2:
                    if metrics:
                        stack2.enter_context(db.scraping(sock, out))
                    gen: dict[str, Any] = {}
                    with bench.flood(args.rate, args.seconds + 30, gen):
                        t0 = time.monotonic()
                        cpu0, _ = db.proc_stat(pid)
                        main0, threads0 = thread_ticks(pid)
                        helpers = db.children(pid)
                        packet0 = db.children_cpu(helpers)
                        time.sleep(2.0)
                        values = bench.latency_run(args.trials)
                        time.sleep(max(0.0, args.seconds - (time.monotonic() - t0)))
                        t1 = time.monotonic()
                        cpu1, _ = db.proc_stat(pid)
                        main1, threads1 = thread_ticks(pid)
                        packet1 = db.children_cpu(helpers)
                    out["generator_rate"] = gen.get("rate")
            out["stop"] = results.get("stop", "ok")
            opened = [v for v in values if v is not None]
            out.update(
                window=round(t1 - t0, 1),
                cpu=100.0 * (cpu1 - cpu0 + packet1 - packet0) / db.CLK_TCK / (t1 - t0),
                packet_cpu=100.0 * (packet1 - packet0) / db.CLK_TCK / (t1 - t0),
                loop_cpu=100.0 * (main1 - main0) / db.CLK_TCK / (t1 - t0),
                threads_cpu=100.0 * (threads1 - threads0) / db.CLK_TCK / (t1 - t0),
                opened=f"{len(opened)}/{len(values)}",
                median_ms=1000 * statistics.median(opened) if opened else None,
                p90_ms=1000 * db.percentile(opened, 0.9) if opened else None,
            )
            if on:
                got = [line["event"] for line in lines(hook_out)]
                kinds: dict[str, int] = {}
                for event in got:
                    kinds[event.get("kind", "?")] = kinds.get(event.get("kind", "?"), 0) + 1
                out["webhook"] = len(got)
                out["webhook_kinds"] = kinds
                out["verified"] = all(line["verified"] for line in lines(hook_out))
                out["mails"] = len(lines(mail_out))
                out["summaries"] = [e.get("detail") for e in got if e.get("kind") == "knocks"]
    log(f"{mode}: {out}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--modes",
        default="off,on",
        help="comma-separated, run in this order each round: off, metrics, notify, on",
    )
    args = parser.parse_args()
    missing = ensure_root_tools()
    if missing:
        print("notify_bench: " + "; ".join(missing), file=sys.stderr)
        return 2
    db.interrupt_on_signals()
    log = db.stderr_log(time.monotonic())
    log(f"machine {db.machine_busy():.0f} % busy before the run")
    rows = []
    for round_ in range(args.rounds):
        for mode in args.modes.split(","):
            try:
                rows.append(one_run(mode, args, log) | {"round": round_ + 1})
            except db.Failed as error:
                rows.append({"mode": mode, "round": round_ + 1, "error": str(error)})
    print(f"\n{args.rate} spoofed SYN/s on the knock ports for {args.seconds:.0f} s\n")
    print(
        "| round | metrics+notifiers | daemon CPU (% of a core) | packet process | loop "
        "thread | other threads | knocks opened | knock->open median | p90 | "
        "notifications sent (webhook; mails) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['round']} | {row['mode']} | error: {row['error']} |" + " |" * 7)
            continue
        sent = "-"
        if row["mode"] in ("on", "notify"):
            sent = f"{row['webhook']} {row['webhook_kinds']}; {row['mails']} mails"
        median = "-" if row["median_ms"] is None else f"{row['median_ms']:.1f} ms"
        p90 = "-" if row["p90_ms"] is None else f"{row['p90_ms']:.1f} ms"
        print(
            f"| {row['round']} | {row['mode']} | {row['cpu']:.1f} | {row['packet_cpu']:.1f} | "
            f"{row['loop_cpu']:.1f} | {row['threads_cpu']:.2f} | {row['opened']} | "
            f"{median} | {p90} | {sent} |"
        )
    for row in rows:
        if row.get("summaries"):
            print(f"\nround {row['round']} summaries: {row['summaries']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
