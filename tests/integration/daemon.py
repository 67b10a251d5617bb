"""Running the real daemon inside a test namespace, and probing it from others.

Kept free of pytest so that benchmark scripts can use it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.integration.netns import Topology

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


class Knockgate:
    """``knockgate run`` in the server namespace, with its log and status socket."""

    def __init__(
        self,
        topo: Topology,
        workdir: Path,
        config: str,
        host: str = "server",
        config_path: Path | None = None,
        state_dir: Path | None = None,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
        python: str = PYTHON,
    ) -> None:
        self.topo = topo
        self.args = tuple(args)  # more options for `knockgate run` (e.g. --user)
        self.python = python
        self.env = env or {}  # more environment for the daemon (tests' harnesses)
        # The SPA replay cache and used TOTP steps: never the host's /var/lib/knockgate.
        self.state_dir = state_dir or workdir / "state"
        self.host = host
        self.workdir = workdir
        self.socket = workdir / "status.sock"
        if config_path is None:  # YAML written here; otherwise a file the test wrote
            config_path = workdir / "knockgate.yaml"
            config_path.write_text(config.replace("@SOCKET@", str(self.socket)))
        self.config_path = config_path
        self.log_path = workdir / "knockgate.log"
        self.process: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 15.0) -> Knockgate:
        log = self.log_path.open("a")
        self.process = self.topo.popen(
            self.host,
            [
                self.python,
                "-m",
                "appliance.cli",
                "run",
                "--config",
                str(self.config_path),
                "--status-socket",
                str(self.socket),
                "--state-dir",
                str(self.state_dir),
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
            env={**os.environ, "PYTHONPATH": str(REPO), **self.env},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"knockgate exited {self.process.returncode}:\n{self.log()}")
            if "capturing" in self.log() and self.socket.exists():
                with contextlib.suppress(RuntimeError):
                    self.status()
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"knockgate did not come up:\n{self.log()}")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.topo.run(
            self.host,
            [PYTHON, "-m", "appliance.cli", *args],
            check=check,
            cwd=str(REPO),
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    def status(self) -> dict[str, object]:
        done = self.cli("status", "--socket", str(self.socket), "--json", check=False)
        if done.returncode != 0:
            raise RuntimeError(f"status failed: {done.stderr}")
        data: dict[str, object] = json.loads(done.stdout)
        return data

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return True
            time.sleep(0.05)
        return False

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()


def connect(topo: Topology, client: str, address: str, port: int, timeout: float = 1.5) -> str:
    """``open`` (connected), ``refused`` (RST) or ``timeout`` (dropped), from ``client``."""
    code = (
        "import socket,sys\n"
        f"s=socket.socket(socket.AF_INET6 if ':' in {address!r} else socket.AF_INET)\n"
        f"s.settimeout({timeout})\n"
        f"try: s.connect(({address!r},{port})); print('open')\n"
        "except ConnectionRefusedError: print('refused')\n"
        "except OSError: print('timeout')\n"
    )
    return topo.run(client, [PYTHON, "-c", code], timeout=timeout + 10).stdout.strip()


def nmap_state(topo: Topology, client: str, address: str, port: int, udp: bool = False) -> str:
    argv = ["nmap", "-n", "-Pn", "-p", str(port), "--max-retries", "1"]
    argv += ["-sU"] if udp else ["-sS"]
    if ":" in address:
        argv.append("-6")
    out = topo.run(client, [*argv, address], timeout=60).stdout
    for line in out.splitlines():
        if line.startswith(f"{port}/"):
            return line.split()[1]
    raise AssertionError(f"nmap said nothing about port {port}:\n{out}")


def serve(topo: Topology, host: str, port: int) -> subprocess.Popen[str]:
    """A TCP listener on every address of ``host`` (IPv4 and IPv6), for connect checks."""
    code = (
        "import socket,time\n"
        "s=socket.socket(socket.AF_INET6)\n"
        "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        "s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0)\n"
        f"s.bind(('::',{port})); s.listen(64)\n"
        "while True:\n"
        "    c,_=s.accept(); c.close()\n"
    )
    process = topo.popen(host, [PYTHON, "-c", code])
    time.sleep(0.2)
    return process
