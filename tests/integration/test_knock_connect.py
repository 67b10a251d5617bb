"""Knock, wait, connect on real packets: ``knock --wait`` and ``connect`` against the daemon.

Each test builds its own topology (a bridge namespace with a server and a client),
runs ``knockgate run`` (nftables) and a real OpenSSH server (Debian's
openssh-server, a throwaway host key and user key in the test's directory) in the
server namespace on its 198.18.x.y address, and removes everything, daemon, sshd and
namespaces, even on failure. The client side is the real ``ssh`` with
``ProxyCommand knockgate connect %h %p --door ssh``.

Measured here (``-s`` prints it): ssh's wall time through ``connect`` (median of
10) next to ssh straight to a port opened beforehand, and the renewal behaviour of a
session longer than its grant.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.spa.keyfile import format_keys, generate_keys
from tests.integration.conftest import require
from tests.integration.daemon import PYTHON, REPO, Knockgate, connect
from tests.integration.netns import Topology, cleanup_stale, ensure_root_tools

pytestmark = pytest.mark.integration

SSHD = "/usr/sbin/sshd"
SSH_PORT = 2222
GRANT = 3  # seconds: short, so a session outlives several grants
CONFIG = """\
interfaces: [eth0]
status_socket: @SOCKET@
state_dir: {state_dir}
firewall: {{backend: {backend}}}
doors:
  ssh:
    knock: {{sequence: [7113/tcp, 2231/udp, 9157/tcp], seq_timeout: 5}}
    open: {{ports: [{port}/tcp], duration: {grant}}}
  spa:
    spa:
      port: 62201
      users:
        alice: {{key_base64: {spa_key}, hmac_key_base64: {spa_hmac}}}
    open: {{ports: [{echo}/tcp], duration: {grant}}}
  otp:
    knock:
      totp: {{secret: JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP, steps: 3, period: 30, ports: 20000-20999}}
      seq_timeout: 5
    open: {{ports: [{echo}/tcp], duration: {grant}}}
"""
ECHO_PORT = 2224  # an echo server: reads to the end, sends it all back, closes
ECHO = """import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{address}", {port}))
s.listen(16)
while True:
    c, _ = s.accept()
    data = b""
    while chunk := c.recv(65536):
        data += chunk
    c.sendall(data)
    c.close()
"""

SSHD_CONFIG = """\
Port {port}
ListenAddress {address}
HostKey {dir}/host_key
AuthorizedKeysFile {dir}/authorized_keys
PidFile {dir}/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
MaxStartups 100:30:200
LogLevel VERBOSE
"""


def prerequisites() -> None:
    missing = ensure_root_tools(vlan=False)
    require(not missing, ", ".join(missing))
    require(shutil.which("nft") is not None, "nft is not installed")
    require(os.path.exists(SSHD), "openssh-server is not installed (sshd)")
    require(shutil.which("ssh") is not None, "openssh-client is not installed (ssh)")
    require(shutil.which("ssh-keygen") is not None, "ssh-keygen is not installed")


@dataclass
class Lab:
    topo: Topology
    workdir: Path
    daemon: Knockgate
    keys: Path  # the throwaway keys, sshd's config and known_hosts

    @property
    def server(self) -> str:
        return self.topo.host("server").ipv4

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.topo.run(
            "client",
            [PYTHON, "-m", "appliance.cli", *args],
            check=False,
            timeout=timeout,
            cwd=str(REPO),
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    def proxy(self, *extra: str) -> str:
        config = self.daemon.config_path
        return f"{PYTHON} -m appliance.cli connect %h %p --door ssh --config {config} " + " ".join(
            extra
        )

    def ssh_argv(self, command: str, proxy: str | None) -> list[str]:
        argv = [
            "ssh",
            "-F",
            "/dev/null",
            "-n",
            "-i",
            str(self.keys / "id"),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={self.keys / 'known_hosts'}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ConnectTimeout=20",
            "-p",
            str(SSH_PORT),
        ]
        if proxy is not None:
            argv += ["-o", f"ProxyCommand={proxy}"]
        return [*argv, f"root@{self.server}", command]

    def ssh(
        self, command: str, proxy: str | None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return self.topo.run(
            "client",
            self.ssh_argv(command, proxy),
            check=False,
            timeout=timeout,
            cwd=str(REPO),
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )


def make_keys(keys: Path, address: str) -> None:
    keys.mkdir()
    for name in ("host_key", "id"):
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "kg-test",
                "-f",
                str(keys / name),
            ],
            check=True,
        )
    (keys / "authorized_keys").write_text((keys / "id.pub").read_text())
    host_pub = (keys / "host_key.pub").read_text().split()
    (keys / "known_hosts").write_text(f"[{address}]:{SSH_PORT} {host_pub[0]} {host_pub[1]}\n")
    (keys / "sshd_config").write_text(SSHD_CONFIG.format(port=SSH_PORT, address=address, dir=keys))


@pytest.fixture
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Lab]:
    backend = getattr(request, "param", "nftables")
    prerequisites()
    require(shutil.which("ipset") is not None or backend != "iptables", "ipset is not installed")
    cleanup_stale()
    made_run_dir = not os.path.isdir("/run/sshd")  # sshd's privilege separation directory
    if made_run_dir:
        os.makedirs("/run/sshd", mode=0o755)
    try:
        with Topology(("server", "client"), vlan=False) as topo:
            server = topo.host("server").ipv4
            keys = tmp_path / "keys"
            make_keys(keys, server)
            topo.run("server", [SSHD, "-t", "-f", str(keys / "sshd_config")])
            sshd_log = (tmp_path / "sshd.log").open("w")
            topo.popen(
                "server",
                [SSHD, "-D", "-e", "-f", str(keys / "sshd_config")],
                stdout=sshd_log,
                stderr=subprocess.STDOUT,
            )
            sshd_log.close()
            spa_key, spa_hmac = generate_keys()
            (keys / "alice.key").write_text(format_keys(spa_key, spa_hmac))
            topo.popen("server", [PYTHON, "-c", ECHO.format(address=server, port=ECHO_PORT)])
            config = CONFIG.format(
                state_dir=tmp_path / "state",
                port=SSH_PORT,
                grant=GRANT,
                backend=backend,
                spa_key=spa_key,
                spa_hmac=spa_hmac,
                echo=ECHO_PORT,
            )
            daemon = Knockgate(topo, tmp_path, config).start()
            yield Lab(topo, tmp_path, daemon, keys)
    finally:
        if made_run_dir:
            shutil.rmtree("/run/sshd", ignore_errors=True)


def test_knock_wait_reports_a_door_that_never_opens(lab: Lab) -> None:
    started = time.monotonic()
    done = lab.cli(
        "knock", lab.server, "7113", "9157", "--wait", "--port", str(SSH_PORT), "--timeout", "2"
    )
    assert done.returncode == 3, done
    assert 1.9 < time.monotonic() - started < 10
    assert done.stdout == ""
    assert f"{lab.server} port {SSH_PORT}/tcp answers (reset: still closed to us)" in done.stderr
    assert "did not open within 2 s" in done.stderr
    assert "the door did not open for this address. Check the knock" in done.stderr


def test_knock_wait_returns_when_the_door_opens(lab: Lab) -> None:
    config = str(lab.daemon.config_path)
    done = lab.cli("knock", lab.server, "--door", "ssh", "--config", config, "--wait")
    assert done.returncode == 0, done
    assert f"knock sent to {lab.server}: 3 knock(s), waiting for port {SSH_PORT}" in done.stderr
    opened = re.search(r"accepts connections: open after (\d+\.\d+) s", done.stderr)
    assert opened is not None, done.stderr
    assert float(opened[1]) < 2.0


def test_ssh_logs_in_through_proxycommand_connect(lab: Lab) -> None:
    assert connect(lab.topo, "client", lab.server, SSH_PORT) == "refused"  # closed before
    done = lab.ssh("echo logged-in-as-$(id -un)", lab.proxy())
    assert done.returncode == 0, (done, lab.daemon.log())
    assert done.stdout == "logged-in-as-root\n"
    assert "OPEN SESAME" in lab.daemon.log() or "open ssh" in lab.daemon.log()


def test_ssh_without_the_door_fails_with_a_clear_message(lab: Lab) -> None:
    proxy = f"{PYTHON} -m appliance.cli connect %h %p --door ssh --config /nonexistent.yaml"
    done = lab.ssh("true", proxy)
    assert done.returncode == 255
    assert "/nonexistent.yaml" in done.stderr


@pytest.mark.parametrize("lab", ["nftables", "iptables"], indirect=True)
def test_renewal_keeps_the_port_open_past_the_first_grant_while_the_session_runs(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    session = 8.0  # seconds: well past the first grant's deadline (3 s)
    ssh = lab.topo.popen(
        "client",
        lab.ssh_argv(f"sleep {session:g}; echo done", lab.proxy("-v")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
        start_new_session=True,
    )
    # A new connection from the same client every 0.25 s, as a second ssh would make.
    probes: list[tuple[float, str]] = []
    started = time.monotonic()
    while ssh.poll() is None and time.monotonic() - started < session + 20:
        probes.append(
            (time.monotonic() - started, connect(lab.topo, "client", lab.server, SSH_PORT))
        )
        time.sleep(0.25)
    out, err = ssh.communicate(timeout=30)
    assert ssh.returncode == 0, (out, err, lab.daemon.log())
    assert out == "done\n"
    first_open = next(at for at, state in probes if state == "open")
    during = [(at, state) for at, state in probes if at >= first_open]
    closed = [(at, state) for at, state in during if state != "open"]
    assert not closed, f"the port closed during the session: {closed}"
    assert during[-1][0] > GRANT + 3  # probed open well past the first grant's deadline
    # ssh ends its ProxyCommand with SIGHUP when the session closes: -v's line per
    # renewal is the record (the daemon grants each one: one OPEN SESAME more).
    renewals = err.count("renewed the grant (3 s)")
    opened = lab.daemon.log().count("OPEN SESAME")
    assert renewals >= 4 and opened == renewals + 1, (err, lab.daemon.log())
    # Once the relay is gone nothing renews: the last grant runs out.
    time.sleep(GRANT + 0.5)
    assert connect(lab.topo, "client", lab.server, SSH_PORT) == "refused"
    with capsys.disabled():
        print(
            f"\nrenewal ({lab.daemon.log().count('OPEN SESAME')} grants): session {session:g} s, grant {GRANT} s: {renewals} renewal(s), "
            f"{len(during)} probes from the first open to the end, none refused"
        )


def test_ssh_wall_time_through_connect(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    """ssh through connect (knock + wait + relay) logs in each time, and a knock --wait
    before a plain ssh too; the times are printed (testbed/bench/ssh_connect_bench.py
    measures them properly: this only runs each way three times)."""

    def timed(proxy: str | None) -> float:
        started = time.monotonic()
        done = lab.ssh("true", proxy)
        if done.returncode != 0 and "kex_exchange_identification" in done.stderr:
            # sshd closed the connection before its banner: once in a CI run on a loaded
            # machine, with the port open (not a reset). Timed again; the log says why.
            print(f"sshd closed a connection before its banner:\n{sshd_log()}")
            started = time.monotonic()
            done = lab.ssh("true", proxy)
        assert done.returncode == 0, (done, sshd_log())
        return time.monotonic() - started

    def sshd_log() -> str:
        text = (lab.workdir / "sshd.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-15:])

    through = [timed(lab.proxy()) for _ in range(3)]
    direct, knock_wait, opened_after = [], [], []
    for _ in range(3):
        time.sleep(GRANT + 0.2)  # the last grant is gone: each knock opens a closed port
        started = time.monotonic()
        opened = lab.cli(
            "knock", lab.server, "--door", "ssh", "--config", str(lab.daemon.config_path), "--wait"
        )
        knock_wait.append(time.monotonic() - started)
        assert opened.returncode == 0, opened
        after = re.search(r"open after (\d+\.\d+) s", opened.stderr)
        assert after is not None, opened.stderr
        opened_after.append(float(after[1]))
        direct.append(timed(None))
    with capsys.disabled():
        print(
            f"\nssh wall time, median of 3: through connect {statistics.median(through) * 1000:.0f} ms "
            f"(min {min(through) * 1000:.0f}, max {max(through) * 1000:.0f}); "
            f"direct to an open port {statistics.median(direct) * 1000:.0f} ms; "
            f"knock --wait {statistics.median(knock_wait) * 1000:.0f} ms as a process, "
            f"port open {statistics.median(opened_after) * 1000:.0f} ms after the knock"
        )


@pytest.mark.parametrize("door", ["spa", "otp"])
def test_connect_knocks_spa_and_totp_doors_and_relays_both_ways(lab: Lab, door: str) -> None:
    """The echo server answers only after the end of its input: the relay's half-close."""
    assert connect(lab.topo, "client", lab.server, ECHO_PORT) == "refused"
    argv = ["connect", lab.server, str(ECHO_PORT), "--door", door]
    argv += ["--config", str(lab.daemon.config_path), "-v"]
    if door == "spa":
        argv += ["--key-file", str(lab.keys / "alice.key")]
    payload = "".join(f"line {n}\n" for n in range(20000))  # 220 kB, past every buffer
    done = lab.topo.run(
        "client",
        [PYTHON, "-m", "appliance.cli", *argv],
        check=False,
        input=payload,
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, (done, lab.daemon.log())
    assert done.stdout == payload
    assert "accepts connections: open after" in done.stderr
    kind = "SPA packet" if door == "spa" else "TOTP sequence of 3 knock(s)"
    assert f"knock sent: {kind}" in done.stderr
