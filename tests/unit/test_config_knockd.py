"""knockd.conf: every directive, every alias, every error (file, line, key, expectation)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.cli import main
from appliance.config import load_config
from appliance.config.export import to_yaml
from appliance.core.engine import KnockEngine
from appliance.core.events import Opened
from appliance.core.model import Commands, Step, TcpFlags
from appliance.errors import ConfigError
from tests.unit.helpers import HOST, play_all, tcp, udp

SYN, ACK, FIN = 0x02, 0x10, 0x01


def write(tmp_path: Path, text: str, name: str = "knockd.conf") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def errors_of(path: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.problems


FULL = """\
# a comment line
[options]
    UseSyslog
    LogFile = /var/log/knockd.log
    PidFile = /run/knockd.pid
    Interface = eth1

[openSSH]
    Sequence    = 7113,2231:udp, 9157:TCP
    Seq_Timeout = 5
    Start_Command = /sbin/iptables -A INPUT -s %IP% -p tcp --dport 22 -j ACCEPT
    Start_Command_6 = /sbin/ip6tables -A INPUT -s %IP% -p tcp --dport 22 -j ACCEPT
    Stop_Command = /sbin/iptables -D INPUT -s %IP% -p tcp --dport 22 -j ACCEPT
    Stop_Command_6 =
    Cmd_Timeout = 2.5
    TCPFlags = syn
    TCPFlags = !ack, !fin
    Target = 198.18.0.9
"""


def test_every_directive_is_read(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, FULL))
    config = loaded.config
    assert config.format == "knockd"
    assert config.settings.log.syslog is True
    assert config.settings.log.file == "/var/log/knockd.log"
    assert config.settings.pid_file == "/run/knockd.pid"
    assert config.settings.interfaces == ("eth1",)
    (door,) = config.doors
    assert door.name == "openSSH"
    assert door.knock.sequence == (Step(7113, "tcp"), Step(2231, "udp"), Step(9157, "tcp"))
    assert door.knock.seq_timeout == 5.0
    assert door.knock.tcpflags == TcpFlags(SYN, ACK | FIN)  # lines accumulate
    assert door.knock.target == "198.18.0.9"
    assert door.commands == Commands(
        start="/sbin/iptables -A INPUT -s %IP% -p tcp --dport 22 -j ACCEPT",
        start6="/sbin/ip6tables -A INPUT -s %IP% -p tcp --dport 22 -j ACCEPT",
        stop="/sbin/iptables -D INPUT -s %IP% -p tcp --dport 22 -j ACCEPT",
        stop6="",
        cmd_timeout=2.5,
    )
    assert door.origin is not None and door.origin.line == 8
    assert loaded.warnings == ()


def test_aliases_case_insensitive_keys_and_defaults(tmp_path: Path) -> None:
    text = """\
[door]
  SEQUENCE = 7113,2231,9157
  timeout = 3
  COMMAND = open %IP%
  command_6 = open6 %IP%
"""
    (door,) = load_config(write(tmp_path, text)).config.doors
    assert door.knock.seq_timeout == 3.0
    assert door.commands.start == "open %IP%"
    assert door.commands.start6 == "open6 %IP%"
    assert door.commands.cmd_timeout == 10.0  # knockd's default


def test_default_seq_timeout_is_25_seconds(tmp_path: Path) -> None:
    (door,) = load_config(write(tmp_path, "[d]\nsequence=7113,2231,9157\ncommand=x\n")).config.doors
    assert door.knock.seq_timeout == 25.0
    assert door.knock.tcpflags == TcpFlags()


def test_harmless_variations_are_tolerated(tmp_path: Path) -> None:
    text = "[options]\nUseSyslog = yes\n[d]\nsequence = 7113 , 2231:udp ,9157\ncommand=x\ntcpflags = syn, !ack\n"
    config = load_config(write(tmp_path, text)).config
    assert config.settings.log.syslog is True
    assert config.doors[0].knock.sequence == (
        Step(7113, "tcp"),
        Step(2231, "udp"),
        Step(9157, "tcp"),
    )
    assert config.doors[0].knock.tcpflags == TcpFlags(SYN, ACK)


@pytest.mark.parametrize(
    ("body", "line", "key", "message"),
    [
        ("[d]\nsequence = 7000,abc,9000\ncommand=x\n", 2, "d.sequence", "'abc' is not a port"),
        ("[d]\nsequence = 7000,-1,9000\ncommand=x\n", 2, "d.sequence", "'-1' is not a port"),
        ("[d]\nsequence = 7000,2x,9000\ncommand=x\n", 2, "d.sequence", "'2x' is not a port"),
        ("[d]\nsequence = 7000,0,9000\ncommand=x\n", 2, "d.sequence", "port 0 is out of range"),
        ("[d]\nsequence = 70000\ncommand=x\n", 2, "d.sequence", "port 70000 is out of range"),
        ("[d]\nsequence = 7000,,9000\ncommand=x\n", 2, "d.sequence", "has an empty step"),
        ("[d]\nsequence = 7000:icmp\ncommand=x\n", 2, "d.sequence", "expected tcp or udp"),
        (
            "[d]\nsequence = " + ",".join(str(1000 + i) for i in range(33)) + "\ncommand=x\n",
            2,
            "d.sequence",
            "expected at most 32",
        ),
        ("[d]\nsequence = 1,2,3\nseq_timeout = 5s\ncommand=x\n", 3, "d.seq_timeout", "'5s'"),
        ("[d]\nsequence = 1,2,3\nseq_timeout = -1\ncommand=x\n", 3, "d.seq_timeout", "'-1'"),
        ("[d]\nsequence = 1\nseq_timeout = 86401\ncommand=x\n", 3, "d.seq_timeout", "out of range"),
        ("[d]\nsequence = 1,2,3\ncmd_timeout = -1\ncommand=x\n", 3, "d.cmd_timeout", "'-1'"),
        ("[d]\nsequence = 1,2,3\ntcpflags = syn,xmas\ncommand=x\n", 3, "d.tcpflags", "'xmas'"),
        ("[d]\nsequence = 1,2,3\ntcpflags = syn,!syn\ncommand=x\n", 3, "d.tcpflags", "both"),
        ("[d]\nsequence = 1,2,3\ntarget = 300.1.1.1\ncommand=x\n", 3, "d.target", "not an address"),
        ("[d]\nsequence = 1,2,3\nfrobnicate = 1\n", 3, "d.frobnicate", "unknown directive"),
        (
            "[d]\nsequence = 1,2,3\nsequence = 4,5,6\n",
            3,
            "d.sequence",
            "given twice (first on line 2",
        ),
        ("[d]\nsequence\n", 2, "d.sequence", "needs a value"),
        ("[d]\nseq_timeout = 5\ncommand=x\n", 1, "d", "door has no sequence"),
        ("sequence = 1,2,3\n", 1, "sequence", "outside a section"),
        ("[]\n", 1, "section", "not a section header"),
        ("[d]\nsequence=1,2,3\n[d]\nsequence=4,5,6\n", 3, "d", "section given twice"),
        (
            "[options]\ninterface = eth0 eth1\n[d]\nsequence=1\n",
            2,
            "options.interface",
            "interface",
        ),
        ("[options]\nusesyslog = maybe\n[d]\nsequence=1\n", 2, "options.usesyslog", "yes or no"),
        ("[options]\nsequence = 1\n", 2, "options.sequence", "unknown directive"),
        ("[options]\nusesyslog\n", 1, "doors", "no door is defined"),
        ("[bad name!]\nsequence=1,2,3\ncommand=x\n", 1, "bad name!", "not a door name"),
    ],
)
def test_errors_name_file_line_key_and_expectation(
    tmp_path: Path, body: str, line: int, key: str, message: str
) -> None:
    path = write(tmp_path, body)
    problems = errors_of(path)
    assert any(p.startswith(f"{path}:{line}: {key}: ") and message in p for p in problems), problems
    assert all("expected" in p for p in problems), problems


def test_every_problem_is_reported_not_only_the_first(tmp_path: Path) -> None:
    path = write(tmp_path, "[a]\nsequence = abc\n[b]\nsequence = 1,2,3\ntcpflags = nope\n")
    problems = errors_of(path)
    assert [p.split(": ")[1] for p in problems] == ["a.sequence", "b.tcpflags"]


def test_warnings_for_weak_sequences(tmp_path: Path) -> None:
    text = "[short]\nsequence=7113,2231\ncommand=x\n[up]\nsequence=1000,2000,3000\ncommand=x\n"
    warnings = load_config(write(tmp_path, text)).warnings
    assert any(":2: short.sequence: warning: only 2 step(s)" in w for w in warnings)
    assert any(":5: up.sequence: warning: the ports only go up" in w for w in warnings)


def test_door_without_command_only_warns(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, "[d]\nsequence=7113,2231,9157\n"))
    assert loaded.warnings == (
        f"{tmp_path}/knockd.conf:1: d: warning: door has no command: "
        "a completed knock is only logged",
    )


def test_one_time_sequences_file_relative_to_config(tmp_path: Path) -> None:
    (tmp_path / "seqs").write_bytes(b"#1,2,3\n 7113,2231:udp,9157\n\nnot,a,port\n 4001,4002,4003\n")
    text = "[d]\none_time_sequences = seqs\ncommand = x\n"
    loaded = load_config(write(tmp_path, text))
    one_time = loaded.config.doors[0].knock.one_time
    assert one_time is not None
    assert one_time.path == str(tmp_path / "seqs")
    assert [(s.line, s.offset, s.steps) for s in one_time.sequences] == [
        (2, 7, (Step(7113, "tcp"), Step(2231, "udp"), Step(9157, "tcp"))),
        (5, 39, (Step(4001, "tcp"), Step(4002, "tcp"), Step(4003, "tcp"))),
    ]
    assert any(
        w.startswith(f"{tmp_path}/seqs:4: one_time_sequences: warning: line skipped")
        for w in loaded.warnings
    )


def test_one_time_sequences_replace_sequence_with_a_warning(tmp_path: Path) -> None:
    (tmp_path / "seqs").write_text("7113,2231,9157\n")
    text = "[d]\nsequence = 1,2,3\none_time_sequences = seqs\ncommand = x\n"
    loaded = load_config(write(tmp_path, text))
    assert loaded.config.doors[0].knock.sequence == ()
    assert any("d.sequence: warning: ignored" in w for w in loaded.warnings)


def test_missing_one_time_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[d]\none_time_sequences = /nonexistent/seqs\ncommand=x\n")
    (problem,) = errors_of(path)
    assert problem.startswith(f"{path}:2: d.one_time_sequences: cannot read /nonexistent/seqs")


# ---------------------------------------------------------------- Seq_Timeout = 0

ZERO = """\
[one]
    Sequence = 7113
    Seq_Timeout = 0
    Command = open %IP%
[two]
    Sequence = 2231:udp,9157
    Seq_Timeout = 0
    Command = open %IP%
"""
NEVER = "warning: 0 with a 2-step sequence: the knock can never complete"


def test_seq_timeout_zero_is_accepted_as_knockd_does(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, ZERO))
    assert [d.knock.seq_timeout for d in loaded.config.doors] == [0.0, 0.0]
    # The one-step door gets the usual short-sequence warning, nothing about its timeout.
    seq_warnings = [w for w in loaded.warnings if ".seq_timeout: " in w]
    assert seq_warnings == [
        f"{tmp_path}/knockd.conf:7: two.seq_timeout: {NEVER} (an attempt times out at its "
        "next packet, as in knockd; expected more than 0, or 0 only for a one-step sequence)"
    ]


def test_check_warns_that_a_multi_step_door_with_seq_timeout_zero_never_opens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, ZERO)
    assert main(["check", path]) == 0
    captured = capsys.readouterr()
    assert f"{path}:7: two.seq_timeout: {NEVER}" in captured.err
    assert "one.seq_timeout" not in captured.err
    assert main(["check", "--strict", path]) == 2


def test_seq_timeout_zero_in_the_engine_is_knockds_rule(tmp_path: Path) -> None:
    """knockd drops an attempt when ``now - start >= seq_timeout``: with 0, at the
    knocker's next packet, even one with the same timestamp. A one-step door opens on
    every first-step packet; a two-step door never opens."""
    config = load_config(write(tmp_path, ZERO)).config
    engine = KnockEngine(config.doors, local=frozenset({HOST}))
    knocker = "198.18.3.7"
    events = [
        udp(100.0, knocker, 2231),
        tcp(100.0, knocker, 9157),  # the same instant: already too late
        udp(101.0, knocker, 2231),
        tcp(101.001, knocker, 9157),
        tcp(102.0, knocker, 7113),  # the one-step door
        tcp(103.0, knocker, 7113),
    ]
    opened = [c for c in play_all(engine, events) if isinstance(c, Opened)]
    assert [(c.door, c.at) for c in opened] == [("one", 102.0), ("one", 103.0)]
    assert engine.counters.timeouts == 2


def test_seq_timeout_zero_warning_counts_one_time_lines(tmp_path: Path) -> None:
    (tmp_path / "ones").write_text("7113\n4001\n")
    (tmp_path / "mixed").write_text("#7113,2231,9157\n4001\n4002,4003\n")
    text = (
        "[ones]\none_time_sequences = ones\nseq_timeout = 0\ncommand = x\n"
        "[mixed]\none_time_sequences = mixed\nseq_timeout = 0\ncommand = x\n"
    )
    warnings = [w for w in load_config(write(tmp_path, text)).warnings if ".seq_timeout: " in w]
    assert len(warnings) == 1
    assert f"knockd.conf:7: mixed.seq_timeout: {NEVER}" in warnings[0]  # its line 3


def test_seq_timeout_zero_survives_import_knockd(tmp_path: Path) -> None:
    original = load_config(write(tmp_path, ZERO))
    text = to_yaml(original.config)
    assert text.count("seq_timeout: 0") == 2
    converted = load_config(write(tmp_path, text, "converted.yaml"))
    assert [d.knock for d in converted.config.doors] == [d.knock for d in original.config.doors]
    assert any(f"two.knock.seq_timeout: {NEVER}" in w for w in converted.warnings)
