"""Debian's shipped /etc/knockd.conf, knocked by knockd's own `knock` client.

Real packets on loopback are captured with tcpdump; ``knockgate simulate`` must
open the same doors from the knockd.conf and from its ``import-knockd`` YAML.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import require

pytestmark = pytest.mark.integration

DEBIAN_CONF = "/etc/knockd.conf"
KNOCK_PORTS = (7000, 8000, 9000, 12345, 54321, 24680, 13579)


def knockgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args], capture_output=True, text=True, check=False
    )


@pytest.fixture
def debian_conf() -> str:
    require(Path(DEBIAN_CONF).is_file(), f"{DEBIAN_CONF} missing (Debian's knockd not installed)")
    return DEBIAN_CONF


def capture_knocks(tmp_path: Path, *sequences: tuple[int, ...]) -> str:
    require(os.geteuid() == 0, "needs root to capture on lo")
    require(shutil.which("tcpdump") is not None, "tcpdump not installed")
    require(shutil.which("knock") is not None, "knockd's knock client not installed")
    pcap = tmp_path / "knocks.pcap"
    port_filter = " or ".join(f"dst port {port}" for port in KNOCK_PORTS)
    tcpdump = subprocess.Popen(
        [
            "tcpdump",
            "-i",
            "lo",
            "-U",
            "--immediate-mode",
            "-n",
            "-w",
            str(pcap),
            f"tcp and ({port_filter})",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # tcpdump says "listening on lo" once its filter is live.
        assert tcpdump.stderr is not None
        ready, _, _ = select.select([tcpdump.stderr], [], [], 10)
        assert ready and "listening on" in tcpdump.stderr.readline(), "tcpdump did not start"
        time.sleep(0.2)
        for sequence in sequences:
            subprocess.run(
                ["knock", "127.0.0.1", *map(str, sequence)], check=True, capture_output=True
            )
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        tcpdump.send_signal(signal.SIGINT)
        try:
            tcpdump.wait(timeout=10)
        except subprocess.TimeoutExpired:
            tcpdump.kill()
            tcpdump.wait()
    return str(pcap)


def opened_lines(output: str) -> list[str]:
    return [line.split("  ", 1)[1] for line in output.splitlines() if "OPEN SESAME" in line]


def command_lines(output: str) -> list[str]:
    return [line.split("  ", 1)[1] for line in output.splitlines() if "running" in line]


def test_debian_config_is_read_with_weak_sequence_warnings(debian_conf: str) -> None:
    result = knockgate("check", debian_conf)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{debian_conf}: valid knockd configuration, 3 door(s)"
    assert (
        f"{debian_conf}:5: openSSH.sequence: warning: 7000,8000,9000 is a published"
        in result.stderr
    )


def test_knock_client_opens_debian_doors_in_both_formats(debian_conf: str, tmp_path: Path) -> None:
    pcap = capture_knocks(tmp_path, (7000, 8000, 9000), (12345, 54321, 24680, 13579))

    converted = knockgate("import-knockd", debian_conf)
    assert converted.returncode == 0, converted.stderr
    yaml_path = tmp_path / "knockgate.yaml"
    yaml_path.write_text(converted.stdout)

    from_knockd = knockgate("simulate", "--config", debian_conf, "--pcap", pcap)
    from_yaml = knockgate("simulate", "--config", str(yaml_path), "--pcap", pcap)
    assert from_knockd.returncode == 0, from_knockd.stderr
    assert from_yaml.returncode == 0, from_yaml.stderr

    assert opened_lines(from_knockd.stdout) == [
        "127.0.0.1: openSSH: OPEN SESAME",
        "127.0.0.1: openHTTPS: OPEN SESAME",
    ]
    assert command_lines(from_knockd.stdout) == [
        "openSSH: running start command: "
        "/sbin/iptables -A INPUT -s 127.0.0.1 -p tcp --dport 22 -j ACCEPT",
        "openHTTPS: running start command: "
        "/usr/local/sbin/knock_add -i -c INPUT -p tcp -d 443 -f 127.0.0.1",
    ]
    # The converted YAML behaves the same, line for line.
    assert from_yaml.stdout == from_knockd.stdout


def test_close_sequence_from_knock_client(debian_conf: str, tmp_path: Path) -> None:
    pcap = capture_knocks(tmp_path, (9000, 8000, 7000))
    result = knockgate("simulate", "--config", debian_conf, "--pcap", pcap)
    assert opened_lines(result.stdout) == ["127.0.0.1: closeSSH: OPEN SESAME"]
    assert command_lines(result.stdout) == [
        "closeSSH: running start command: "
        "/sbin/iptables -D INPUT -s 127.0.0.1 -p tcp --dport 22 -j ACCEPT"
    ]
