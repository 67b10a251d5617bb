"""Hostile configurations: refused with one line per problem, never a crash or a freeze.

A SIGHUP reload with a bad configuration must keep the running one, whatever is
wrong with it: ``load_config`` (and ``preflight``) end in a ``ConfigError`` whose
every line is ``FILE:LINE: key: what is wrong (what was expected)``, quickly and in
little memory, without echoing a huge value. One test per defect.
"""

from __future__ import annotations

import base64
import contextlib
import os
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.config import Loaded, load_config
from appliance.errors import ConfigError
from appliance.runtime import preflight as preflight_module
from appliance.runtime.daemon import Overrides
from appliance.runtime.preflight import command_line, preflight

DOOR = "doors:\n  d:\n    knock: {sequence: [7113, 2231/udp, 9157]}\n    open: {ports: [22/tcp]}\n"
KEY = base64.b64encode(b"k" * 32).decode()
HMAC = base64.b64encode(b"h" * 32).decode()
LONGEST_LINE = 500  # no refusal line is longer: values are echoed shortened


def write(tmp_path: Path, text: str | bytes, name: str = "knockgate.yaml") -> str:
    path = tmp_path / name
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    return str(path)


def refused(path: str, check: Callable[[Loaded], None] | None = None) -> list[str]:
    """The problems of ``path`` (load_config, then preflight when given), each one line."""
    with pytest.raises(ConfigError) as caught:
        loaded = load_config(path)
        if check is not None:
            check(loaded)
    problems = caught.value.problems
    assert str(caught.value) == "\n".join(problems)
    for problem in problems:
        assert "\n" not in problem and len(problem) < LONGEST_LINE, problem
    return problems


def only(path: str, check: Callable[[Loaded], None] | None = None) -> str:
    problems = refused(path, check)
    assert len(problems) == 1, problems
    return problems[0]


def quickly(load: Callable[[], object], seconds: float = 1.0, mib: int = 32) -> None:
    """``load`` ends within ``seconds`` (timed alone) and ``mib`` MiB (traced again)."""
    started = time.monotonic()
    with contextlib.suppress(ConfigError):
        load()
    assert time.monotonic() - started < seconds
    tracemalloc.start()
    try:
        with contextlib.suppress(ConfigError):
            load()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < mib << 20, peak


def local_paths(tmp_path: Path) -> str:
    """Settings that pass preflight on any machine (no /run, no /var/lib needed)."""
    return f"status_socket: {tmp_path}/run/status.sock\nstate_dir: {tmp_path}/state\n"


# --- explicit YAML tags --------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("!!int abc", "!!int"),
        ("!!int 5", "!!int"),
        ("!!str 5", "!!str"),
        ("!!binary aGVsbG8=", "!!binary"),
        ("!!python/object/apply:os.system ['true']", "!!python/object/apply:os.system"),
        ("!!python/name:os.system ''", "!!python/name:os.system"),
        ("!foo bar", "!foo"),
        ("! 5", "!"),
        ("!<tag:example.com,2000:x> 5", "tag:example.com,2000:x"),
        ("!!map {a: 1}", "!!map"),
        ("!!set {a, b}", "!!set"),
    ],
)
def test_yaml_explicit_tags_are_refused(tmp_path: Path, value: str, shown: str) -> None:
    path = write(tmp_path, DOOR + f"max_attempts: {value}\n")
    assert only(path) == (
        f"{path}:5: max_attempts: explicit tag {shown} is not accepted (expected a plain "
        "value, typed by YAML's own rules; quote it to make it text)"
    )


def test_yaml_tag_inside_a_door_is_refused_at_its_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "doors:\n  d:\n    knock:\n      sequence: [7113, !!int 2231, 9157]\n"
        "    open: {ports: [22/tcp]}\n",
    )
    assert only(path).startswith(f"{path}:4: doors.d.knock.sequence: explicit tag !!int ")


# --- alias bombs, recursive aliases, depth -------------------------------------

BILLION_LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]\n"
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True)
)


def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    path = write(tmp_path, BILLION_LAUGHS + DOOR)
    quickly(lambda: load_config(path))
    assert len(BILLION_LAUGHS) < 1400  # ~1.3 kB that expands to 9**9 strings
    assert only(path) == (
        f"{path}:5: e: holds 66430 values once its aliases are expanded (expected at most 20000)"
    )


def test_yaml_alias_bomb_used_by_a_door_is_refused_quickly(tmp_path: Path) -> None:
    text = (
        "services:\n  s: &s [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n"
        + "".join(
            f"  s{i}: &s{i} [{', '.join(['*' + (f's{i - 1}' if i else 's')] * 10)}]\n"
            for i in range(8)
        )
        + "doors:\n  d:\n    knock: {sequence: *s7}\n    open: {ports: [22]}\n"
    )
    path = write(tmp_path, text)
    quickly(lambda: load_config(path))
    assert only(path) == (
        f"{path}:6: services.s3: holds 111111 values once its aliases are expanded "
        "(expected at most 20000)"
    )


@pytest.mark.parametrize(
    "text", ["a: &a [1, *a]\n", "a: &a {b: *a}\n", "a: &a {<<: *a}\n", "a: &a [[[*a]]]\n"]
)
def test_yaml_alias_to_its_own_ancestor_is_refused(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text + DOOR)
    problem = only(path)
    assert problem.startswith(f"{path}:1: a")
    assert problem.endswith(
        ": an alias refers to a mapping or sequence that contains it (expected no recursive "
        "structure)"
    )


def test_yaml_nesting_thousands_of_levels_deep_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, DOOR + "description: " + "[" * 5000 + "]" * 5000 + "\n")
    quickly(lambda: load_config(path))
    assert only(path) == (
        f"{path}:5: description: is nested more than 32 levels deep (expected at most 32)"
    )


def test_yaml_block_nesting_is_refused_at_the_33rd_level(tmp_path: Path) -> None:
    path = write(tmp_path, "".join("  " * level + f"k{level}:\n" for level in range(500)))
    keys = ".".join(f"k{level}" for level in range(31))
    assert only(path) == (
        f"{path}:32: {keys}: is nested more than 32 levels deep (expected at most 32)"
    )


def test_yaml_aliases_stacked_beyond_the_depth_limit_are_refused(tmp_path: Path) -> None:
    nested = "[" * 20 + "1" + "]" * 20
    text = f"a: &a {nested}\nb: &b {nested.replace('1', '*a')}\n"
    path = write(tmp_path, text + DOOR)
    assert only(path) == (
        f"{path}:2: b: is nested 42 levels deep once its aliases are expanded (expected at most 32)"
    )


def test_recursion_error_from_the_composer_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever MAX_DEPTH says, a RecursionError (a deep stack at the call) is one line."""
    from yaml.composer import Composer

    def deep(*args: object) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(Composer, "compose_sequence_node", deep)
    path = write(tmp_path, "interfaces: [[eth0]]\n" + DOOR)
    assert only(path) == (
        f"{path}:1: interfaces: is nested too deep to read (expected at most 32 levels)"
    )


def test_yaml_with_too_many_values_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, DOOR + "interfaces: [" + ", ".join(["eth0"] * 25_000) + "]\n")
    quickly(lambda: load_config(path))
    assert only(path) == f"{path}:5: (file): holds more than 20000 values (expected at most 20000)"


# --- numbers -------------------------------------------------------------------


@pytest.mark.parametrize(
    "digits", ["9" * 4301, "9" * 100_000, "0x" + "f" * 5000, "1:" * 3000 + "1"]
)
def test_integer_of_thousands_of_digits_in_yaml_is_refused(tmp_path: Path, digits: str) -> None:
    path = write(tmp_path, DOOR + f"max_attempts: {digits}\n")
    assert only(path) == (
        f"{path}:5: max_attempts: '{digits[:60]}…' ({len(digits)} characters) is too long for a "
        "number (expected at most 32 characters)"
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [("seq_timeout", "9" * 4301), ("port", "9" * 4301), ("max_age", "9" * 4301 + ".5")],
)
def test_number_of_thousands_of_digits_in_a_door_is_refused(
    tmp_path: Path, key: str, value: str
) -> None:
    spec = {"seq_timeout": "knock", "port": "spa", "max_age": "spa"}[key]
    if spec == "knock":
        door = f"    knock: {{sequence: [7113, 2231, 9157], {key}: {value}}}\n"
    else:
        door = (
            f"    spa: {{{key}: {value}, users: {{a: {{key_base64: {KEY}, "
            f"hmac_key_base64: {HMAC}}}}}}}\n"
        )
    path = write(tmp_path, f"doors:\n  d:\n{door}    open: {{ports: [22]}}\n")
    problem = only(path)
    assert problem.startswith(f"{path}:3: doors.d.{spec}.{key}: '999999")
    assert "is too long for a number (expected at most 32 characters)" in problem


@pytest.mark.parametrize(
    ("body", "line", "key", "message"),
    [
        (
            "[d]\nsequence = 7113," + "9" * 4301 + ",9157\ncommand = x\n",
            2,
            "d.sequence",
            "is not a port (expected a number from 1 to 65535)",
        ),
        (
            "[d]\nsequence = 7113,2231,9157\nseq_timeout = " + "9" * 4301 + "\ncommand = x\n",
            3,
            "d.seq_timeout",
            "is not a number of seconds (expected seconds, 0 or more)",
        ),
        (
            "[d]\nsequence = 7113,2231,9157\ncmd_timeout = 1." + "9" * 4301 + "\ncommand = x\n",
            3,
            "d.cmd_timeout",
            "is not a number of seconds (expected seconds, 0 or more)",
        ),
    ],
)
def test_integer_of_thousands_of_digits_in_knockd_conf_is_refused(
    tmp_path: Path, body: str, line: int, key: str, message: str
) -> None:
    path = write(tmp_path, body, "knockd.conf")
    problem = only(path)
    assert problem.startswith(f"{path}:{line}: {key}: '")
    size = len(body.split("\n")[line - 1].split("=")[1].strip().split(",")[0 if line > 2 else 1])
    assert problem.endswith(f"…' ({size} characters) {message}"), problem


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2024-02-30", "'2024-02-30' is not a whole number (expected 1 to 10000000)"),
        ("0b_", "cannot be read: invalid literal for int() with base 2: '' (expected plain YAML"),
        ("0x_", "cannot be read: invalid literal for int() with base 16: '' (expected plain YAML"),
        ("=", "'=' is not a whole number (expected 1 to 10000000)"),
        ("{<<: 1}", "expected a mapping or list of mappings for merging, but found scalar"),
        ("{[a]: 1}", "found unhashable key (expected plain YAML values)"),
    ],
)
def test_yaml_values_the_constructor_chokes_on_are_refused(
    tmp_path: Path, value: str, message: str
) -> None:
    path = write(tmp_path, DOOR + f"max_attempts: {value}\n")
    problem = only(path)
    assert problem.startswith(f"{path}:5: max_attempts: ")
    assert message in problem, problem


# --- files that are not files ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "what"), [("/dev/zero", "a device"), ("/dev/null", "a device"), ("/", "a directory")]
)
def test_dev_zero_as_the_config_is_refused(name: str, what: str) -> None:
    quickly(lambda: load_config(name))
    assert only(name) == f"{name}:0: (file): {name} is {what} (expected a regular file)"


def test_fifo_as_the_config_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "knockgate.yaml"
    os.mkfifo(fifo)
    quickly(lambda: load_config(str(fifo)))
    assert only(str(fifo)) == f"{fifo}:0: (file): {fifo} is a pipe (expected a regular file)"


def test_config_larger_than_1_mib_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "knockgate.yaml"
    with open(path, "wb") as handle:
        handle.truncate(2 << 20)  # sparse: costs nothing to make, 2 MiB to read
    quickly(lambda: load_config(str(path)))
    assert only(str(path)) == (
        f"{path}:0: (file): {path} is larger than 1 MiB (expected at most 1048576 bytes)"
    )


def test_dev_zero_as_key_file_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "doors:\n  s:\n    spa:\n      users:\n        alice:\n          key_file: /dev/zero\n"
        "    open: {ports: [22/tcp]}\n",
    )
    quickly(lambda: load_config(path))
    assert only(path) == (
        f"{path}:6: doors.s.spa.users.alice.key_file: /dev/zero is a device (expected a "
        "regular file)"
    )


def test_key_file_larger_than_64_kib_is_refused(tmp_path: Path) -> None:
    (tmp_path / "alice.keys").write_text(f"KEY_BASE64: {KEY}\n" + "#" * (64 << 10))
    path = write(
        tmp_path,
        "doors:\n  s:\n    spa: {users: {alice: {key_file: alice.keys}}}\n"
        "    open: {ports: [22/tcp]}\n",
    )
    assert only(path) == (
        f"{path}:3: doors.s.spa.users.alice.key_file: {tmp_path}/alice.keys is larger than "
        "64 KiB (expected at most 65536 bytes)"
    )


@pytest.mark.parametrize("name", ["knockd.conf", "knockgate.yaml"])
def test_dev_zero_as_one_time_file_is_refused(tmp_path: Path, name: str) -> None:
    if name.endswith(".conf"):
        body, key = "[d]\none_time_sequences = /dev/zero\ncommand = x\n", "d.one_time_sequences"
    else:
        body = "doors:\n  d:\n    knock: {one_time_sequences: /dev/zero}\n    open: {ports: [22]}\n"
        key = "doors.d.knock.one_time_sequences"
    path = write(tmp_path, body, name)
    line = 2 if name.endswith(".conf") else 3
    quickly(lambda: load_config(path))
    assert only(path) == f"{path}:{line}: {key}: /dev/zero is a device (expected a regular file)"


def test_one_time_file_of_too_many_lines_is_refused(tmp_path: Path) -> None:
    (tmp_path / "seqs").write_bytes(b"1\n" * (512 << 10))  # 1 MiB: 524 288 sequences
    path = write(tmp_path, "[d]\none_time_sequences = seqs\ncommand = x\n", "knockd.conf")
    quickly(lambda: load_config(path))
    assert only(path) == (
        f"{path}:2: d.one_time_sequences: {tmp_path}/seqs has more than 10000 unused lines "
        "(expected at most 10000: start a new file)"
    )


# --- echoes, lines, counts -------------------------------------------------------


def test_control_character_is_one_line_with_its_real_line(tmp_path: Path) -> None:
    path = write(tmp_path, DOOR + "\n\npid_file: /run/k\x01.pid\n")
    assert only(path) == (
        f"{path}:7: (yaml): not valid YAML: character #x0001 is not allowed (expected "
        "printable text: no control characters but tab and line breaks)"
    )


def test_yaml_scanner_error_is_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, DOOR + 'pid_file: "\\q"\n')
    assert only(path) == f"{path}:5: (yaml): not valid YAML: found unknown escape character 'q'"


def test_knockd_lines_are_counted_at_newlines_only(tmp_path: Path) -> None:
    """str.splitlines() also splits at \\x0c, \\x1c-\\x1e and \\x85: every later line was off."""
    path = write(tmp_path, "[d]\n# form\x0cfeed\x1c\nsequence = 1,2,abc\ncommand = x\n", "k.conf")
    assert only(path).startswith(f"{path}:3: d.sequence: 'abc' is not a port")


def test_huge_values_are_not_echoed_whole(tmp_path: Path) -> None:
    huge = "x" * 100_000
    path = write(
        tmp_path,
        f"interfaces: [{huge}]\nlog: {{level: {huge}}}\n"
        f"doors:\n  d:\n    knock: {{sequence: [7113, {huge}], target: {huge}}}\n"
        f"    open: {{ports: [22]}}\n    close: [{huge}]\n",
    )
    shown = f"'{'x' * 60}…' (100000 characters)"
    assert refused(path) == [
        f"{path}:1: interfaces: {shown} is not an interface name (expected a name like eth0)",
        f"{path}:2: log.level: {shown} is not allowed (expected one of debug, info, warning, "
        "error)",
        f"{path}:5: doors.d.knock.sequence: {shown} is not a port (expected a number from 1 "
        "to 65535)",
        f"{path}:5: doors.d.knock.target: {shown} is not an address (expected an IPv4 or IPv6 "
        "address)",
        f"{path}:7: doors.d.close: {shown} is not allowed (expected one of d)",
    ]


def test_huge_names_are_shortened_in_keys(tmp_path: Path) -> None:
    name = "n" * 1000
    path = write(tmp_path, f"[{name}]\nsequence = 7113,2231,9157\n{name} = 1\n", "k.conf")
    short = "n" * 60 + "… (1000 characters)"
    assert refused(path) == [
        f"{path}:3: {short}.{short}: unknown directive (expected one of Cmd_Timeout, "
        "One_Time_Sequences, Seq_Timeout, Sequence, Start_Command, Start_Command_6, "
        "Stop_Command, Stop_Command_6, TCPFlags, Target)",
        f"{path}:1: {short}: '{'n' * 60}…' (1000 characters) is not a door name (expected "
        "letters, digits, '_', '.', '-', starting with a letter or digit, at most 63 "
        "characters)",
    ]


def test_twenty_thousand_bad_lines_make_101_problem_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "[d]\n" + "x\n" * 20_000, "knockd.conf")
    quickly(lambda: load_config(path))
    problems = refused(path)
    assert len(problems) == 101
    assert problems[0].startswith(f"{path}:2: d.x: unknown directive")
    assert problems[-1] == f"{path}:0: (file): 19901 more problem(s) not shown"  # +no sequence


# --- zones -----------------------------------------------------------------------

ZONE = (
    "'fe80::1%eth0' has a zone (scope id) after '%' (expected an address without %zone: the "
    "capture filter and the firewall match addresses, not zones)"
)


def test_zone_target_is_refused_in_yaml(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "doors:\n  d:\n    knock: {sequence: [7113, 2231, 9157], target: 'fe80::1%eth0'}\n"
        "    open: {ports: [22]}\n",
    )
    assert only(path) == f"{path}:3: doors.d.knock.target: {ZONE}"


def test_zone_target_is_refused_in_knockd_conf(tmp_path: Path) -> None:
    path = write(tmp_path, "[d]\nsequence = 7113,2231,9157\ntarget = fe80::1%eth0\n", "k.conf")
    assert only(path) == f"{path}:3: d.target: {ZONE}"


def test_zone_network_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "firewall: {always_allow: ['fe80::%eth0/64']}\n" + DOOR)
    assert only(path).startswith(
        f"{path}:1: firewall.always_allow: 'fe80::%eth0/64' has a zone (scope id)"
    )


# --- preflight: what run needs from the machine ------------------------------------


def test_log_file_in_a_missing_directory_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, local_paths(tmp_path) + "log:\n  file: /nonexistent/k.log\n" + DOOR)
    assert only(path, preflight) == (
        f"{path}:4: log.file: directory /nonexistent does not exist (expected an existing "
        "directory it can write for the log file)"
    )


def test_log_file_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, local_paths(tmp_path) + f"log: {{file: {tmp_path}}}\n" + DOOR)
    assert only(path, preflight) == (
        f"{path}:3: log.file: {tmp_path} is a directory (expected a log file knockgate can write)"
    )


def test_log_file_on_a_read_only_file_system_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.access(W_OK) is how EROFS shows (even to root); statvfs says why."""
    log = tmp_path / "k.log"
    log.write_text("")
    path = write(tmp_path, local_paths(tmp_path) + f"log: {{file: {log}}}\n" + DOOR)
    real_access = os.access
    monkeypatch.setattr(
        preflight_module.os,
        "access",
        lambda where, mode: False if str(where) == str(log) else real_access(where, mode),
    )
    monkeypatch.setattr(
        preflight_module.os,
        "statvfs",
        lambda where: os.statvfs_result((0, 0, 0, 0, 0, 0, 0, 0, os.ST_RDONLY, 255)),
    )
    assert only(path, preflight) == (
        f"{path}:3: log.file: cannot write {log}: read-only file system (expected a log file "
        "knockgate can write)"
    )


def test_log_file_in_knockd_conf_is_checked(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[options]\nLogFile = /nonexistent/knockd.log\n[d]\nsequence = 7113,2231,9157\n",
        "knockd.conf",
    )
    socket = f"{tmp_path}/s.sock"
    loaded = Overrides(status_socket=socket).apply(load_config(path))
    with pytest.raises(ConfigError) as caught:
        preflight(loaded, overridden=command_line(status_socket=socket))
    assert caught.value.problems == [
        f"{path}:2: options.logfile: directory /nonexistent does not exist (expected an "
        "existing directory it can write for the log file)"
    ]


@pytest.mark.parametrize(
    ("pid", "message"),
    [
        ("/nonexistent/k.pid", "directory /nonexistent does not exist (expected an existing "),
        ("/dev/null", "/dev/null is not a regular file (expected a pid file knockgate can write)"),
        ("{tmp}", "{tmp} is a directory (expected a pid file knockgate can write)"),
        ("{tmp}/file/k.pid", "cannot use {tmp}/file/k.pid: Not a directory (expected a pid "),
    ],
)
def test_unusable_pid_file_is_refused(tmp_path: Path, pid: str, message: str) -> None:
    (tmp_path / "file").write_text("")
    pid, message = pid.format(tmp=tmp_path), message.format(tmp=tmp_path)
    path = write(tmp_path, local_paths(tmp_path) + f"pid_file: {pid}\n" + DOOR)
    problem = only(path, preflight)
    assert problem.startswith(f"{path}:3: pid_file: {message}"), problem


def test_status_socket_longer_than_af_unix_allows_is_refused(tmp_path: Path) -> None:
    socket = "/tmp/" + "s" * 100 + ".sock"
    path = write(tmp_path, f"status_socket: {socket}\n" + DOOR)
    assert only(path, preflight) == (
        f"{path}:1: status_socket: {socket} is 110 bytes long (expected at most 107 bytes: the "
        "limit of a Unix socket's path)"
    )


def test_status_socket_whose_directory_cannot_be_created_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    socket = f"{tmp_path}/file/run/status.sock"
    path = write(tmp_path, f"status_socket: {socket}\n" + DOOR)
    assert only(path, preflight) == (
        f"{path}:1: status_socket: cannot use {socket}: Not a directory (expected a path for "
        "the status socket)"
    )


def test_status_socket_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, f"status_socket: {tmp_path}\n" + DOOR)
    assert only(path, preflight) == (
        f"{path}:1: status_socket: {tmp_path} is a directory (expected a path for the status "
        "socket)"
    )


def test_status_socket_given_on_the_command_line_is_reported_as_such(tmp_path: Path) -> None:
    path = write(tmp_path, local_paths(tmp_path) + DOOR)
    loaded = Overrides(status_socket="/x" * 60).apply(load_config(path))
    with pytest.raises(ConfigError) as caught:
        preflight(loaded, overridden=command_line(status_socket="/x" * 60, state_dir=None))
    assert caught.value.problems == [
        f"command line: --status-socket: {'/x' * 60} is 120 bytes long (expected at most 107 "
        "bytes: the limit of a Unix socket's path)"
    ]


SPA_DOOR = (
    f"doors:\n  s:\n    spa: {{users: {{a: {{key_base64: {KEY}, hmac_key_base64: {HMAC}}}}}}}\n"
    "    open: {ports: [22/tcp]}\n"
)
TOTP_DOOR = (
    "doors:\n  t:\n    knock: {totp: {secret: "
    + base64.b32encode(b"0123456789abcdefghij").decode()
    + "}}\n    open: {ports: [22/tcp]}\n"
)


@pytest.mark.parametrize("door", [SPA_DOOR, TOTP_DOOR])
def test_state_dir_that_cannot_be_created_is_refused_for_spa_and_totp(
    tmp_path: Path, door: str
) -> None:
    (tmp_path / "file").write_text("")
    path = write(
        tmp_path,
        f"status_socket: {tmp_path}/s.sock\nstate_dir: {tmp_path}/file/state\n" + door,
    )
    assert only(path, preflight) == (
        f"{path}:2: state_dir: cannot use {tmp_path}/file/state: Not a directory (expected a "
        "directory it can create or write: SPA and TOTP doors record used packets there)"
    )


def test_state_dir_on_the_command_line_is_reported_as_such(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    path = write(tmp_path, f"status_socket: {tmp_path}/s.sock\n" + SPA_DOOR)
    loaded = Overrides(state_dir=f"{tmp_path}/file").apply(load_config(path))
    with pytest.raises(ConfigError) as caught:
        preflight(loaded, overridden=command_line(state_dir=f"{tmp_path}/file"))
    assert caught.value.problems == [
        f"command line: --state-dir: {tmp_path}/file is not a directory (expected a directory "
        "it can create or write: SPA and TOTP doors record used packets there)"
    ]


def test_state_dir_is_not_needed_without_spa_or_totp(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    path = write(
        tmp_path, f"status_socket: {tmp_path}/s.sock\nstate_dir: {tmp_path}/file/state\n" + DOOR
    )
    preflight(load_config(path))


def test_preflight_creates_nothing(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"status_socket: {tmp_path}/a/b/s.sock\nstate_dir: {tmp_path}/c/d\n"
        f"log: {{file: {tmp_path}/k.log}}\npid_file: {tmp_path}/k.pid\n" + SPA_DOOR,
    )
    preflight(load_config(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["knockgate.yaml"]


def many_port_doors(doors: int, steps: int = 30) -> str:
    lines = ["doors:"]
    for number in range(doors):
        base = 10_000 + number * steps
        ports = [base + (index * 7) % steps for index in range(steps)]
        lines.append(f"  d{number}:\n    knock: {{sequence: {ports}}}\n    open: {{ports: [22]}}")
    return "\n".join(lines) + "\n"


def test_capture_filter_too_long_for_the_kernel_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, local_paths(tmp_path) + many_port_doors(40))  # 1200 ports
    problem = only(path, preflight)
    assert problem.startswith(f"{path}:3: doors: the capture filter for these doors is ")
    assert problem.endswith(
        " instructions (expected at most 4096, the kernel's limit: fewer knock ports)"
    )


def test_capture_filter_of_thousands_of_ports_is_refused_before_libpcap(tmp_path: Path) -> None:
    path = write(tmp_path, local_paths(tmp_path) + many_port_doors(100))  # 3000 ports
    quickly(lambda: preflight(load_config(path)))
    assert only(path, preflight) == (
        f"{path}:3: doors: the doors knock on 3000 ports and addresses: the capture filter "
        "cannot hold them (expected at most about 1000 knock ports in all)"
    )


def test_capture_filter_rejected_by_libpcap_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the daemon compiles it (check_filter); an expression libpcap refuses."""
    monkeypatch.setattr(preflight_module, "capture_filter", lambda doors, hosts: "dst port 99999")
    path = write(tmp_path, local_paths(tmp_path) + DOOR)
    problem = only(path, preflight)
    assert problem.startswith(f"{path}:3: doors: capture filter rejected: ")
    assert problem.endswith("(expected a filter libpcap compiles)")


def test_a_valid_configuration_passes_preflight(tmp_path: Path) -> None:
    path = write(tmp_path, local_paths(tmp_path) + many_port_doors(20) + SPA_DOOR[7:])
    preflight(load_config(path))


def test_long_lists_are_not_echoed_whole(tmp_path: Path) -> None:
    door_ports = ", ".join(f"{port}/tcp" for port in range(1001, 1031))
    user_ports = ", ".join(f"{port}/tcp" for port in range(2001, 2031))
    names = ", ".join(f"door{n}" for n in range(3000))
    path = write(
        tmp_path,
        f"doors:\n  s:\n    spa:\n      users:\n        alice: {{key_base64: {KEY}, "
        f"hmac_key_base64: {HMAC}, ports: [{user_ports}]}}\n    open: {{ports: [{door_ports}]}}\n"
        f"  t:\n    knock: {{sequence: [7113, 2231, 9157]}}\n    close: [{names}]\n",
    )
    beyond = ", ".join(f"{port}/tcp" for port in range(2001, 2013))
    allowed = ", ".join(f"{port}/tcp" for port in range(1001, 1013))
    assert refused(path) == [
        f"{path}:5: doors.s.spa.users.alice.ports: {beyond}, … (30 in all) is not a port of the "
        f"door (expected some of {allowed}, … (30 in all))",
        f"{path}:9: doors.t.close: 'door0' is not allowed (expected one of s, t)",
    ]
