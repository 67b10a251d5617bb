"""The command line: exit codes, one-line errors without tracebacks, simulate output."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from appliance.cli import main

CONFIG = """\
doors:
  ssh:
    knock:
      sequence: [7113, 2231/udp, 9157]
      seq_timeout: 1.5
      tcpflags: syn,!ack
    open: {ports: [22/tcp], duration: 60}
    start_command: allow %IP%
    stop_command: deny %IP%
    cmd_timeout: 5
"""

KNOCKER, OTHER, HOST = "198.18.3.7", "198.18.3.8", "198.18.0.1"


def frame(src: str, port: int, ts: float, proto: str = "tcp", flags: str = "S") -> Ether:
    ip = IPv6(src=src, dst="2001:db8::1") if ":" in src else IP(src=src, dst=HOST)
    l4 = TCP(dport=port, flags=flags) if proto == "tcp" else UDP(dport=port)
    packet = Ether() / ip / l4
    packet.time = ts
    return packet


def capture(tmp_path: Path) -> str:
    frames = [
        frame(KNOCKER, 7113, 1000.0),
        frame(OTHER, 7113, 1000.1),
        frame(KNOCKER, 2231, 1000.2, "udp"),
        frame(OTHER, 9157, 1000.3),  # OTHER skips a step: reset
        frame(KNOCKER, 9157, 1000.4, flags="SA"),  # wrong flags: ignored
        frame(KNOCKER, 9157, 1000.5),  # opens
        frame("2001:db8::99", 7113, 1001.0),
        frame("2001:db8::99", 2231, 1001.1, "udp"),
        frame("2001:db8::99", 9157, 1003.0),  # 2 s after the first knock: too late
    ]
    path = tmp_path / "knocks.pcap"
    wrpcap(str(path), frames)
    return str(path)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args], capture_output=True, text=True, check=False
    )


def test_simulate_prints_what_opens_for_whom_and_when(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path, "k.yaml", CONFIG)
    assert main(["simulate", "--config", config, "--pcap", capture(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "1970-01-01 00:16:40.500  198.18.3.7: ssh: OPEN SESAME" in out
    assert (
        "1970-01-01 00:16:40.500  198.18.3.7: ssh: open 22/tcp until 1970-01-01 00:17:40.500" in out
    )
    assert "1970-01-01 00:16:40.500  ssh: running start command: allow 198.18.3.7" in out
    assert "1970-01-01 00:16:45.500  ssh: running stop command: deny 198.18.3.7" in out
    assert "1970-01-01 00:16:40.300  198.18.3.8: ssh: sequence reset at stage 1 by 9157/tcp" in out
    assert "1970-01-01 00:16:42.500  2001:db8::99: ssh: sequence timeout (stage 2)" in out
    assert out[-2:] == [
        "summary: 9 frame(s), 0 not TCP/UDP over IP, 0 to other hosts, 1 door(s) opened",
        "  1970-01-01 00:16:40.500  ssh opened for 198.18.3.7",
    ]


def test_simulate_json_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path, "k.yaml", CONFIG)
    assert main(["simulate", "--config", config, "--pcap", capture(tmp_path), "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    grants = [r for r in records if r["event"] == "Grant"]
    assert grants == [
        {
            "event": "Grant",
            "at": 1000.5,
            "door": "ssh",
            "address": KNOCKER,
            "ports": ["22/tcp"],
            "until": 1060.5,
        }
    ]
    assert records[-1] == {
        "event": "Summary",
        "frames": 9,
        "undecoded": 0,
        "skipped_destination": 0,
        "opened": 1,
    }


def test_simulate_host_filter_skips_other_destinations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path, "k.yaml", CONFIG)
    args = ["simulate", "--config", config, "--pcap", capture(tmp_path), "--host", "198.18.0.2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "OPEN SESAME" not in out
    assert "9 to other hosts, 0 door(s) opened" in out


def test_check_valid_config_exits_0_and_warns_on_stderr(tmp_path: Path) -> None:
    config = write(tmp_path, "k.yaml", CONFIG.replace("7113, 2231/udp, 9157", "7000, 8000, 9000"))
    result = run("check", config)
    assert result.returncode == 0
    assert result.stdout == f"{config}: valid yaml configuration, 1 door(s)\n"
    assert "published example sequence" in result.stderr
    assert run("check", "--strict", config).returncode == 2


def test_check_bad_config_exits_2_one_line_per_problem_no_traceback(tmp_path: Path) -> None:
    config = write(tmp_path, "bad.conf", "[d]\nsequence = 7000,abc\nseq_timeout = x\ncommand = y\n")
    result = run("check", config)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{config}:2: d.sequence: 'abc' is not a port (expected a number from 1 to 65535)",
        f"{config}:3: d.seq_timeout: 'x' is not a number of seconds (expected seconds, 0 or more)",
    ]


@pytest.mark.parametrize(
    "args",
    [
        ["check", "/nonexistent/knockgate.yaml"],
        ["simulate", "--config", "/nonexistent.yaml", "--pcap", "/nonexistent.pcap"],
        ["import-knockd", "/nonexistent.conf"],
    ],
)
def test_missing_files_exit_2_without_traceback(args: list[str]) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_simulate_rejects_a_file_that_is_not_a_capture(tmp_path: Path) -> None:
    config = write(tmp_path, "k.yaml", CONFIG)
    result = run("simulate", "--config", config, "--pcap", config)
    assert result.returncode == 2
    assert "not a pcap or pcapng file" in result.stderr
    assert "Traceback" not in result.stderr


def test_import_knockd_prints_yaml_that_checks(tmp_path: Path) -> None:
    knockd = write(
        tmp_path, "knockd.conf", "[d]\nsequence = 7113,2231:udp,9157\ncommand = x %IP%\n"
    )
    result = run("import-knockd", knockd)
    assert result.returncode == 0, result.stderr
    converted = write(tmp_path, "converted.yaml", result.stdout)
    assert run("check", converted).returncode == 0


def test_import_knockd_refuses_yaml(tmp_path: Path) -> None:
    result = run("import-knockd", write(tmp_path, "k.yaml", CONFIG))
    assert result.returncode == 2
    assert "this is knockgate YAML already" in result.stderr


def test_knock_argument_errors_exit_1_with_a_message(tmp_path: Path) -> None:
    result = run("knock", "127.0.0.1")
    assert result.returncode == 1
    assert result.stderr.startswith("knockgate knock: no ports given")
    assert run("knock", "127.0.0.1", "7000", "--delay=-5").returncode == 1
    result = run(
        "knock", "127.0.0.1", "--door", "nope", "--config", write(tmp_path, "k.yaml", CONFIG)
    )
    assert result.returncode == 1
    assert "nope" in result.stderr


def test_init_writes_a_fresh_random_valid_config_once(tmp_path: Path) -> None:
    first = tmp_path / "a" / "knockgate.yaml"
    second = tmp_path / "b" / "knockgate.yaml"
    result = run("init", "--config", str(first))
    assert result.returncode == 0, result.stderr
    assert "knockgate knock HOST --door ssh --config" in result.stdout
    assert run("init", "--config", str(second)).returncode == 0
    assert first.read_text() != second.read_text()  # a new sequence every time
    assert oct(first.stat().st_mode & 0o777) == "0o600"
    check = run("check", "--strict", str(first))  # no weak-sequence warning
    assert check.returncode == 0, check.stderr
    before = first.read_text()
    assert run("init", "--config", str(first)).returncode == 0
    assert first.read_text() == before  # never overwritten


# --- authenticated knocks: one-time files, TOTP, SPA, keygen ------------------


def _udp_listeners(count: int) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(2.0)
        sockets.append(sock)
    return sockets


def test_knock_one_time_sends_the_next_line_and_marks_it_used(tmp_path: Path) -> None:
    listeners = _udp_listeners(4)
    ports = [sock.getsockname()[1] for sock in listeners]
    try:
        path = write(
            tmp_path,
            "otp.txt",
            f"#{ports[3]}:udp\n {ports[0]}:udp,{ports[1]}:udp\n {ports[2]}:udp,{ports[3]}:udp\n",
        )
        assert main(["knock", "127.0.0.1", "--one-time", path]) == 0
        assert [listeners[i].recvfrom(64)[1][0] for i in (0, 1)] == ["127.0.0.1"] * 2
        assert Path(path).read_text().splitlines()[1].startswith("#")
        assert main(["knock", "127.0.0.1", "--one-time", path]) == 0
        listeners[2].recvfrom(64)
        listeners[3].recvfrom(64)
        assert main(["knock", "127.0.0.1", "--one-time", path]) == 1  # none left
    finally:
        for sock in listeners:
            sock.close()


def test_knock_totp_door_sends_the_current_steps(tmp_path: Path) -> None:
    import base64
    import time

    from appliance.config import load_config
    from appliance.core.totp import time_step, totp_sequence

    secret = base64.b32encode(b"0123456789abcdefghij").decode()
    body = (
        "doors:\n  otp:\n    knock: {totp: {secret: "
        + secret
        + ", steps: 3, period: 3600, ports: 40000-40999, protocol: udp}}\n"
        "    open: {ports: [22/tcp]}\n"
    )
    config_path = write(tmp_path, "otp.yaml", body)
    totp = load_config(config_path).config.door("otp").knock.totp
    assert totp is not None
    expected = totp_sequence(totp, time_step(totp, time.time()))
    listeners = []
    try:
        for step in expected:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", step.port))
            sock.settimeout(2.0)
            listeners.append(sock)
        assert main(["knock", "127.0.0.1", "--door", "otp", "--config", config_path]) == 0
        for sock in listeners:
            sock.recvfrom(64)
    finally:
        for sock in listeners:
            sock.close()


def test_keygen_and_spa_client_build_a_packet_that_opens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from appliance.spa.keyfile import read_key_file
    from appliance.spa.wire import open_packet

    assert main(["keygen"]) == 0
    key_file = write(tmp_path, "alice.keys", "[ssh]\n" + capsys.readouterr().out)
    keys = read_key_file(key_file, "ssh").keys
    (listener,) = _udp_listeners(1)
    port = listener.getsockname()[1]
    try:
        args = ["spa", "127.0.0.1", "--door", "ssh", "--key-file", key_file, "--port", str(port)]
        assert main([*args, "-A", "tcp/22", "-a", "198.18.0.5", "-f", "60"]) == 0
        message = open_packet(listener.recvfrom(2048)[0], keys)
        assert (message.message, message.msg_type, message.client_timeout) == (
            "198.18.0.5,tcp/22",
            3,
            60,
        )
        assert main([*args, "-A", "tcp/22,udp/53", "-s", "-U", "bob"]) == 0
        message = open_packet(listener.recvfrom(2048)[0], keys)
        assert (message.message, message.username) == ("0.0.0.0,tcp/22,udp/53", "bob")
        assert main([*args]) == 1  # no ports to ask for
    finally:
        listener.close()


def test_keygen_totp_prints_a_usable_secret(capsys: pytest.CaptureFixture[str]) -> None:
    import base64

    assert main(["keygen", "--totp"]) == 0
    assert len(base64.b32decode(capsys.readouterr().out.strip())) == 20


def test_knock_refuses_spa_doors_with_a_pointer_to_knockgate_spa(tmp_path: Path) -> None:
    import base64

    key, mac = (base64.b64encode(c * 32).decode() for c in (b"k", b"h"))
    body = (
        f"doors:\n  spa:\n    spa: {{users: {{a: {{key_base64: {key}, hmac_key_base64: {mac}}}}}}}\n"
        "    open: {ports: [22/tcp]}\n"
    )
    result = run("knock", "127.0.0.1", "--door", "spa", "--config", write(tmp_path, "s.yaml", body))
    assert result.returncode == 1
    assert "use knockgate spa" in result.stderr


def test_simulate_spa_capture_opens_once_and_refuses_the_replay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import base64

    from scapy.packet import Raw

    from appliance.spa.wire import SpaKeys, new_message, seal

    key, mac = b"k" * 32, b"h" * 32
    body = (
        "doors:\n  spa:\n    spa: {users: {alice: {key_base64: "
        + base64.b64encode(key).decode()
        + ", hmac_key_base64: "
        + base64.b64encode(mac).decode()
        + "}}}\n    open: {ports: [22/tcp], duration: 30}\n"
    )
    data = seal(new_message("alice", 1000, "198.18.3.50,tcp/22"), SpaKeys(key, mac))
    frames = []
    for ts, payload in ((1000.0, data), (1001.0, b"9" * 200), (1050.0, data)):
        packet = Ether() / IP(src=KNOCKER, dst=HOST) / UDP(dport=62201) / Raw(payload)
        packet.time = ts
        frames.append(packet)
    capture_path = tmp_path / "spa.pcap"
    wrpcap(str(capture_path), frames)
    config = write(tmp_path, "spa.yaml", body)
    assert main(["simulate", "--config", config, "--pcap", str(capture_path)]) == 0
    out = capsys.readouterr().out
    assert "198.18.3.50: spa: SPA from user alice accepted" in out
    assert "refused: replay" in out
    assert "1 door(s) opened" in out


# --- check and run agree: what run refuses, check refuses, with the same line -----

KEYS = (
    f"key_base64: {base64.b64encode(b'k' * 32).decode()}, "
    f"hmac_key_base64: {base64.b64encode(b'h' * 32).decode()}"
)
HOSTILE = {
    "log_file_in_a_missing_directory": "log: {file: /nonexistent/knockgate.log}\n",
    "log_file_that_is_a_directory": "log: {file: {tmp}}\n",
    "pid_file_in_a_missing_directory": "pid_file: /nonexistent/knockgate.pid\n",
    "status_socket_too_long": "status_socket: /tmp/" + "s" * 110 + "\n",
    "status_socket_under_a_file": "status_socket: {tmp}/file/status.sock\n",
    "state_dir_under_a_file_with_spa": "state_dir: {tmp}/file/state\n"
    "doors:\n  spa:\n    spa: {users: {a: {" + KEYS + "}}}\n    open: {ports: [22/tcp]}\n",
    "zone_target": "doors:\n  d:\n    knock: {sequence: [7113, 2231, 9157], "
    "target: 'fe80::1%eth0'}\n",
    "alias_bomb": "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n"
    + "".join(
        f"a{i}: &a{i} [{', '.join(['*a' + (str(i - 1) if i else '')] * 10)}]\n" for i in range(6)
    ),
    "explicit_tag": "max_attempts: !!python/object/apply:os.system ['true']\n",
    "key_file_dev_zero": "doors:\n  spa:\n    spa: {users: {a: {key_file: /dev/zero}}}\n"
    "    open: {ports: [22/tcp]}\n",
    "huge_integer": "max_attempts: " + "9" * 5000 + "\n",
    "capture_filter_too_long": "doors:\n"
    + "".join(
        f"  d{n}:\n    knock: {{sequence: {[10_000 + n * 30 + (i * 7) % 30 for i in range(30)]}}}\n"
        for n in range(40)
    ),
}
SHARED_DOOR = (
    "doors:\n  ssh:\n    knock: {sequence: [7113, 2231/udp, 9157]}\n    open: {ports: [22]}\n"
)


def hostile_config(tmp_path: Path, case: str) -> str:
    (tmp_path / "file").write_text("")
    body = HOSTILE[case].replace("{tmp}", str(tmp_path))
    if "status_socket" not in body:
        body = f"status_socket: {tmp_path}/run/status.sock\n" + body
    if "doors:" not in body:
        body += SHARED_DOOR
    return write(tmp_path, "k.yaml", body)


@pytest.fixture
def no_firewall(monkeypatch: pytest.MonkeyPatch) -> None:
    """``run`` must refuse before it chooses a backend or configures logging."""

    def touched(*args: object, **kwargs: object) -> None:
        raise AssertionError("run touched the firewall (or the log) before refusing")

    monkeypatch.setattr("appliance.firewall.choose.choose_backend", touched)
    monkeypatch.setattr("appliance.runtime.logs.configure", touched)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_check_and_run_refuse_the_same_file_with_the_same_line(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str], no_firewall: None
) -> None:
    config = hostile_config(tmp_path, case)
    assert main(["check", config]) == 2
    checked = capsys.readouterr()
    assert main(["run", "--config", config]) == 2
    ran = capsys.readouterr()
    assert (checked.out, ran.out) == ("", "")
    assert checked.err == ran.err
    (line,) = checked.err.splitlines()
    assert line.startswith(f"{config}:") and "Traceback" not in line
    assert len(line) < 500


@pytest.mark.parametrize("case", ["alias_bomb", "log_file_in_a_missing_directory", "zone_target"])
def test_check_refuses_hostile_files_with_exit_2_one_line_no_traceback(
    tmp_path: Path, case: str
) -> None:
    result = run("check", hostile_config(tmp_path, case))
    assert (result.returncode, result.stdout) == (2, "")
    assert len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_run_reports_command_line_overrides_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_firewall: None
) -> None:
    config = hostile_config(tmp_path, "state_dir_under_a_file_with_spa")
    args = ["run", "--config", config, "--status-socket", "/tmp/" + "s" * 110]
    assert main([*args, "--state-dir", f"{tmp_path}/file"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"command line: --status-socket: /tmp/{'s' * 110} is 115 bytes long (expected at most "
        "107 bytes: the limit of a Unix socket's path)",
        f"command line: --state-dir: {tmp_path}/file is not a directory (expected a directory "
        "it can create or write: SPA and TOTP doors record used packets there)",
    ]


def test_client_commands_do_not_check_the_daemons_paths(tmp_path: Path) -> None:
    """knock --config runs on a client machine: no /var/log/knockgate there."""
    config = hostile_config(tmp_path, "log_file_in_a_missing_directory")
    result = run("knock", "127.0.0.1", "--door", "ssh", "--config", config, "-d", "0")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("config", ["/dev/zero", "/nonexistent/knockgate.yaml"])
def test_check_and_run_refuse_an_unreadable_config_alike(
    config: str, capsys: pytest.CaptureFixture[str], no_firewall: None
) -> None:
    assert main(["check", config]) == 2
    checked = capsys.readouterr().err
    assert main(["run", "--config", config]) == 2
    assert capsys.readouterr().err == checked
    (line,) = checked.splitlines()
    assert line.startswith(f"{config}:0: (file): ")


def status_text(tmp_path: Path, capsys: pytest.CaptureFixture[str], snapshot: object) -> str:
    """What ``knockgate status`` prints (without --json) for a daemon answering ``snapshot``."""
    from appliance.runtime.items import StatusRequest
    from appliance.runtime.status import StatusServer

    def enqueue(item: object) -> None:  # the loop's side, answering at once
        assert isinstance(item, StatusRequest)
        item.reply(snapshot)  # type: ignore[arg-type]

    server = StatusServer(str(tmp_path / "s.sock"), enqueue)
    server.start()
    try:
        assert main(["status", "--socket", str(tmp_path / "s.sock")]) == 0
    finally:
        server.stop()
    return capsys.readouterr().out


def test_status_text_shows_interfaces_and_services(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A daemon's snapshot as ``knockgate status`` prints it (without --json)."""
    snapshot = {
        "pid": 42,
        "uptime": 12.5,
        "config": "/etc/knockgate/knockgate.yaml",
        "backend": "nftables",
        "interfaces": ["eth0", "kgwg0"],
        "doors": [{"name": "ssh", "knock": "sequence", "steps": 3, "open": ["2222/tcp"]}],
        "grants": [{"address": "198.18.0.7", "port": "2222/tcp", "expires_in": 9.0}],
        "services": [{"name": "ssh", "state": "serving", "uptime": 30.0, "grants": 1}],
        "attempts": 0,
        "counters": {"packets": 3},
    }
    out = status_text(tmp_path, capsys, snapshot)
    assert "capturing on: eth0, kgwg0" in out
    assert "  ssh: serving, up 30.0 s, 1 grant(s)" in out
    assert "  198.18.0.7 2222/tcp for 9.0 s" in out


def test_status_text_describes_a_close_door_and_a_stopped_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A close door says what it closes (it was shown as "opens (commands only)"); a
    service whose container is gone shows cold, without an uptime. The doors come from
    a real daemon's snapshot."""
    from appliance.config import load_config
    from appliance.firewall.memory import MemoryBackend
    from appliance.runtime.daemon import Daemon

    path = tmp_path / "k.yaml"
    path.write_text(
        f"status_socket: {tmp_path}/status.sock\n"
        f"state_dir: {tmp_path}/state\n"
        "doors:\n"
        "  ssh:\n"
        "    knock: {sequence: [7113, 2231/udp, 9157]}\n"
        "    open: {ports: [22/tcp], duration: 30}\n"
        "  ssh-close:\n"
        "    knock: {sequence: [9157, 2231/udp, 7113]}\n"
        "    close: [ssh]\n"
        "  cmd:\n"
        "    knock: {sequence: [4001, 4002]}\n"
        "    start_command: 'true'\n"
    )
    clock = lambda: 1000.0  # noqa: E731
    daemon = Daemon(
        load_config(str(path)), MemoryBackend(clock), clock=clock, wall=clock, capture=False
    )
    daemon.start()
    try:
        snapshot = daemon.snapshot()
    finally:
        daemon.shutdown()
    assert [d["closes"] for d in snapshot["doors"]] == [[], ["ssh"], []]
    snapshot["services"] = [
        {"name": "ssh", "state": "cold", "running": False, "uptime": 0.0, "grants": 0},
        {"name": "web", "state": "idle", "running": True, "uptime": 12.0, "grants": 0},
    ]
    out = status_text(tmp_path, capsys, snapshot)
    assert "  ssh: 3-step sequence, opens 22/tcp\n" in out
    assert "  ssh-close: 3-step sequence, closes ssh (the knocker's grants)\n" in out
    assert "  cmd: 2-step sequence, opens (commands only)\n" in out
    assert "  ssh: cold, 0 grant(s)\n" in out
    assert "  web: idle, up 12.0 s, 0 grant(s)\n" in out


# ---------------------------------------------------------------- show-knock, config, uninstall


def test_show_knock_prints_each_doors_commands_and_never_a_secret(tmp_path: Path) -> None:
    import base64

    secret = base64.b32encode(b"0123456789abcdefghij").decode()
    key, mac = (base64.b64encode(c * 32).decode() for c in (b"k", b"h"))
    body = (
        CONFIG + "  otp:\n    knock: {totp: {secret: " + secret + ", steps: 3, period: 60, "
        "ports: 40000-40999, protocol: udp}}\n    open: {ports: [23/tcp]}\n"
        f"  pkt:\n    spa: {{users: {{alice: {{key_base64: {key}, hmac_key_base64: {mac}}}}}}}\n"
        "    open: {ports: [24/tcp]}\n"
        "  shut:\n    knock: {sequence: [1111, 2222/udp, 1333]}\n    close: [ssh]\n"
    )
    path = write(tmp_path, "k.yaml", body)
    result = run("show-knock", "--config", path, "--host", "gate.example")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "door ssh: opens 22/tcp for 60 s" in out
    assert "sequence 7113:tcp 2231:udp 9157:tcp within 1.5 s:" in out
    assert f"knockgate knock gate.example --door ssh --config {path}" in out
    assert "or: knock gate.example 7113:tcp 2231:udp 9157:tcp" in out
    assert "TOTP: 3 udp ports in 40000-40999, new every 60 s" in out
    assert f"knockgate spa gate.example --door pkt --key-file KEYS --config {path}" in out
    assert "door shut: closes ssh" in out
    assert "or: knock gate.example 1111:tcp 2222:udp 1333:tcp" in out
    for secret_text in (secret, key, mac):
        assert secret_text not in out

    only = run("show-knock", "--config", path, "--door", "shut")
    assert only.returncode == 0 and only.stdout.startswith("door shut:")
    assert "door ssh:" not in only.stdout


def test_show_knock_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "k.yaml", CONFIG)
    unknown = run("show-knock", "--config", path, "--door", "nope")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == f"knockgate: no door 'nope' in {path} (doors: ssh)"
    env = {k: v for k, v in os.environ.items() if k != "KNOCKGATE_CONFIG"}
    missing = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "show-knock"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert missing.returncode == 2 and "give --config FILE" in missing.stderr
    assert "Traceback" not in missing.stderr + unknown.stderr


def test_show_knock_takes_the_config_from_knockgate_config(tmp_path: Path) -> None:

    path = write(tmp_path, "k.yaml", CONFIG)
    result = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "show-knock"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "KNOCKGATE_CONFIG": path},
    )
    assert result.returncode == 0 and "door ssh:" in result.stdout


def test_config_apply_refuses_a_broken_file_and_keeps_the_old_one(tmp_path: Path) -> None:
    path = write(tmp_path, "k.yaml", CONFIG)
    broken = CONFIG.replace("seq_timeout: 1.5", "seq_timeout: soon")
    result = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "config", "apply", "--config", path],
        input=broken,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "seq_timeout" in result.stderr and "Traceback" not in result.stderr
    assert Path(path).read_text() == CONFIG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.yaml"]  # no .new left


def test_config_apply_writes_a_valid_file_and_show_prints_it(tmp_path: Path) -> None:
    path = write(tmp_path, "k.yaml", CONFIG)
    new = CONFIG.replace("7113", "7117")
    source = write(tmp_path, "edited.yaml", new)
    result = run("config", "apply", "--config", path, "--from", source, "--no-reload")
    assert result.returncode == 0, result.stderr
    assert f"{path} replaced: valid, 1 door(s)" in result.stdout
    assert "docker compose kill -s HUP knockgate" in result.stdout
    assert Path(path).read_text() == new
    assert (Path(path).stat().st_mode & 0o777) == 0o600
    shown = run("config", "show", "--config", path)
    assert shown.returncode == 0 and shown.stdout == new


def test_config_apply_keeps_the_launchers_group_read(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (chown to another group)")
    path = write(tmp_path, "k.yaml", CONFIG)
    os.chown(path, -1, 54321)  # the appliance's knockgate-launcher group, say
    os.chmod(path, 0o640)
    source = write(tmp_path, "edited.yaml", CONFIG.replace("7113", "7117"))
    result = run("config", "apply", "--config", path, "--from", source, "--no-reload")
    assert result.returncode == 0, result.stderr
    after = Path(path).stat()
    assert (after.st_gid, after.st_mode & 0o777) == (54321, 0o640)


class FakeEngine:
    """In memory: containers (owner -> Owned) and volumes (name -> users)."""

    def __init__(self) -> None:
        from appliance.uninstall import Owned

        self.appliances: list[str] = []
        self.containers = {
            "mine": Owned("c1", "knockgate-ssh", "ssh", ("knockgate-ssh-hostkeys", "keys")),
            "theirs": Owned("c2", "knockgate-web", "web", ("www",)),
        }
        self.volume_users = {"knockgate-ssh-hostkeys": 1, "keys": 2, "www": 1}

    def running_appliances(self) -> list[str]:
        return list(self.appliances)

    def owned(self, owner: str) -> list[Any]:
        return [self.containers[owner]] if owner in self.containers else []

    def remove(self, container: Any) -> None:
        owner = next(o for o, c in self.containers.items() if c == container)
        del self.containers[owner]
        for volume in container.volumes:
            self.volume_users[volume] -= 1

    def remove_volume(self, name: str) -> str | None:
        if self.volume_users[name] > 0:
            return "in use by kg-other"
        del self.volume_users[name]
        return None


def test_uninstall_removes_only_its_owners_containers_volumes_and_firewall() -> None:
    from appliance.uninstall import Firewall, uninstall

    engine = FakeEngine()
    torn: list[str] = []
    firewalls = [
        Firewall("nftables table inet knockgate", lambda: True, lambda: torn.append("nft")),
        Firewall("iptables chains", lambda: False, lambda: torn.append("ipt")),
    ]
    report = uninstall(engine, firewalls, "mine")
    assert report == [
        "removed container knockgate-ssh (service ssh)",
        "removed volume knockgate-ssh-hostkeys",
        "kept volume keys: in use by kg-other",
        "removed nftables table inet knockgate",
        "no iptables chains",
    ]
    assert torn == ["nft"]
    assert list(engine.containers) == ["theirs"]  # another owner's container stays
    assert engine.volume_users == {"keys": 1, "www": 1}
    again = uninstall(engine, firewalls[1:], "mine")  # idempotent
    assert again == ["no service container of owner mine", "no iptables chains"]


def test_uninstall_refuses_while_an_appliance_runs_and_touches_nothing() -> None:
    from appliance.uninstall import Firewall, UninstallError, uninstall

    engine = FakeEngine()
    engine.appliances = ["knockgate-knockgate-1"]
    torn: list[str] = []
    with pytest.raises(UninstallError, match=r"knockgate-knockgate-1.*docker compose down"):
        uninstall(engine, [Firewall("t", lambda: True, lambda: torn.append("t"))], "mine")
    assert torn == [] and "mine" in engine.containers


def test_uninstall_runs_every_step_when_one_fails() -> None:
    from appliance.errors import FirewallError
    from appliance.uninstall import Firewall, UninstallError, uninstall

    def broken() -> None:
        raise FirewallError("nft: permission denied")

    torn: list[str] = []
    firewalls = [
        Firewall("nft", lambda: True, broken),
        Firewall("ipt", lambda: True, lambda: torn.append("ipt")),
    ]
    engine = FakeEngine()
    with pytest.raises(UninstallError, match="nft: nft: permission denied"):
        uninstall(engine, firewalls, "mine")
    assert torn == ["ipt"] and "mine" not in engine.containers


def test_uninstall_owner_is_the_daemons_owner_label() -> None:
    import hashlib

    from appliance.uninstall import owner_of

    path = "/etc/knockgate/knockgate.yaml"
    assert owner_of(path) == hashlib.sha256(path.encode()).hexdigest()[:12]


def test_status_text_lists_label_gated_containers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    snapshot = {
        "pid": 42,
        "uptime": 1.0,
        "config": "/etc/knockgate/knockgate.yaml",
        "backend": "nftables",
        "doors": [],
        "grants": [],
        "gated": [
            {"name": "shop-app-1", "docker": "running", "unit": "group shop", "door": "web",
             "ports": ["8080/tcp"], "state": "serving", "start_on_knock": True, "grants": 1,
             "problems": []},
            {"name": "shop-db-1", "docker": "running", "unit": "group shop", "door": None,
             "ports": [], "state": "serving", "start_on_knock": True, "grants": 0,
             "problems": []},
            {"name": "odd-1", "docker": "running", "unit": None, "door": "web",
             "ports": ["9090/tcp"], "state": "closed", "start_on_knock": False, "grants": 0,
             "problems": ['container odd-1: label knockgate.ready="x": expected tcp']},
        ],
        "attempts": 0,
        "counters": {},
    }  # fmt: skip
    out = status_text(tmp_path, capsys, snapshot)
    assert (
        "  shop-app-1: door web, 8080/tcp, serving (docker: running), start on knock, "
        "1 grant(s) [group shop]"
    ) in out
    assert "  shop-db-1: door (group member, no door), no port, serving" in out
    assert "  odd-1: door web, 9090/tcp, closed (docker: running), 0 grant(s)" in out
    assert '    problem: container odd-1: label knockgate.ready="x": expected tcp' in out
