"""Property: a mutated configuration ends in a valid ``Loaded`` or a ``ConfigError``.

Valid YAML and knockd.conf files are mutated the ways a hostile or broken file
differs from a good one (explicit tags, anchors and aliases, alias bombs, deep
nesting, huge numbers, control bytes, flipped bytes, duplicated, deleted, swapped
and re-indented lines, merge keys, truncation). ``load_config`` and then
``preflight`` must end in a ``Loaded`` or a ``ConfigError`` whose every line is
``FILE:LINE: key: message`` (or ``command line: ...``), within the hypothesis
deadline (2 s, tracing included) and 64 MiB of traced memory. Any other exception
fails the test: it would kill the daemon on a reload.
"""

from __future__ import annotations

import atexit
import base64
import re
import shutil
import tempfile
import tracemalloc
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.config import Loaded, load_config
from appliance.errors import ConfigError
from appliance.runtime.preflight import preflight

WORK = Path(tempfile.mkdtemp(prefix="knockgate-fuzz-"))
atexit.register(shutil.rmtree, WORK, True)
KEY = base64.b64encode(b"k" * 32).decode()
HMAC = base64.b64encode(b"h" * 64).decode()
SECRET = base64.b32encode(b"0123456789abcdefghij").decode()
(WORK / "seqs").write_text(" 7113,2231:udp,9157\n#1,2,3\n 4001,4003:udp,4002\n")
(WORK / "bob.keys").write_text(
    f"KEY_BASE64: {base64.b64encode(b'K' * 32).decode()}\n"
    f"HMAC_KEY_BASE64: {base64.b64encode(b'H' * 64).decode()}\n"
)

YAML_SEED = f"""\
interfaces: [eth0, eth1]
log: {{file: {WORK}/k.log, syslog: false, format: json, level: debug}}
pid_file: {WORK}/k.pid
max_attempts: 5000
duplicates: reset
firewall:
  backend: iptables
  always_allow: [198.18.200.0/24, "2001:2::1"]
  scan: {{ports: 20, window: 1.5, hold: 120}}
on_shutdown: revoke
status_socket: {WORK}/run/kg.sock
state_dir: {WORK}/state
services:
  ssh:
    image: knockgate/ssh:local
    container_port: 22
    host_port: 2222
    environment: {{AUTHORIZED_KEYS: /keys, DEBUG: true}}
    volumes: [/srv/keys:/keys:ro]
    ready: {{banner: "SSH-", timeout: 5}}
    idle_timeout: 120
doors:
  ssh:
    description: SSH for the admins
    knock:
      sequence: [7113/tcp, "2231:udp", 9157]
      seq_timeout: 2.5
      tcpflags: syn,!ack
      target: 2001:DB8::1
      duplicates: ignore
    open: {{ports: [22/tcp, 2223], duration: 45}}
    start_command: logger open %IP%
    stop_command: logger close %IP%
    cmd_timeout: 0.5
  close-ssh:
    knock: {{sequence: "9157,2231:udp,7113", tcpflags: [syn]}}
    close: ssh
  container:
    knock: {{one_time_sequences: seqs}}
    service: {{name: ssh, duration: 60}}
  otp:
    knock:
      totp: {{secret: "{SECRET}", steps: 5, period: 60, ports: 30000-30999, skew: 2}}
      seq_timeout: 8
    open: {{ports: [22/tcp], duration: 20}}
  spa:
    spa:
      port: 40000
      max_age: 60
      max_time: 900
      users:
        alice:
          key_base64: {KEY}
          hmac_key_base64: {HMAC}
          sources: [198.18.0.0/16]
          ports: [22/tcp]
          max_time: 120
        bob:
          key_file: bob.keys
    open: {{ports: [22/tcp, 80/tcp], duration: 30}}
"""

KNOCKD_SEED = f"""\
# a comment line
[options]
    UseSyslog
    LogFile = {WORK}/knockd.log
    PidFile = {WORK}/knockd.pid
    Interface = eth1

[openSSH]
    Sequence    = 7113,2231:udp, 9157:TCP
    Seq_Timeout = 5
    Start_Command = /sbin/iptables -A INPUT -s %IP% -p tcp --dport 22 -j ACCEPT
    Stop_Command = /sbin/iptables -D INPUT -s %IP% -p tcp --dport 22 -j ACCEPT
    Cmd_Timeout = 2.5
    TCPFlags = syn
    TCPFlags = !ack, !fin
    Target = 198.18.0.9
[oneTime]
    One_Time_Sequences = {WORK}/seqs
    Command = /bin/true %IP%
"""
SEEDS = {"knockgate.yaml": YAML_SEED.encode(), "knockd.conf": KNOCKD_SEED.encode()}

TAGS = [
    b"!!int",
    b"!!str",
    b"!!float",
    b"!!binary",
    b"!!timestamp",
    b"!!python/object/apply:os.system",
    b"!!python/name:os.system",
    b"!foo",
    b"!",
    b"!!map",
    b"!!set",
    b"!<tag:x,2000:y>",
]
CONTROL = [bytes([code]) for code in (*range(0, 9), 11, 12, *range(14, 32), 127)] + [
    "\x85".encode(),
    "\u2028".encode(),
    "\ufeff".encode(),
    b"\r",
    b"\t",
    b"\xff",
]
VALUES = [
    b"*a",
    b"&a [*a]",
    b"=",
    b"0b_",
    b"0x_",
    b"2024-02-30",
    b"1:2:3",
    b".inf",
    b"~",
    b"{<<: 1}",
    b"{[a]: 1}",
    b"'fe80::1%eth0'",
    b"[]",
    b"{}",
    b"yes",
    b"''",
    b'"\\x00"',
]
KINDS = [
    "tag",
    "anchor_alias",
    "bomb",
    "nest",
    "number",
    "control",
    "flip",
    "duplicate",
    "delete",
    "swap",
    "indent",
    "merge",
    "value",
    "truncate",
]
MUTATION = st.tuples(
    st.sampled_from(KINDS),
    st.integers(0, 1 << 20),
    st.integers(0, 1 << 20),
    st.integers(0, 1 << 10),
)
PROBLEM = re.compile(r"(.+:\d+: [^\n]+: [^\n]+|command line: --[a-z-]+: [^\n]+)")


def _replace_value(line: bytes, value: bytes) -> bytes:
    if b": " in line:
        return line[: line.index(b": ") + 2] + value
    if b"=" in line:
        return line[: line.index(b"=") + 1] + b" " + value
    indent = len(line) - len(line.lstrip(b" "))
    return line[:indent] + value


def _bomb(depth: int, fanout: int) -> bytes:
    lines = [b"l0: &l0 [" + b", ".join([b"lol"] * fanout) + b"]"]
    for level in range(1, depth + 1):
        items = b", ".join([b"*l%d" % (level - 1)] * fanout)
        lines.append(b"l%d: &l%d [%s]" % (level, level, items))
    return b"\n".join(lines) + b"\n"


def mutate(data: bytes, kind: str, a: int, b: int, c: int) -> bytes:
    """One mutation of ``data``; ``a``, ``b``, ``c`` pick where and what."""
    lines = data.split(b"\n")
    i, j = a % len(lines), b % len(lines)
    if kind == "tag":
        lines[i] = _replace_value(lines[i], TAGS[c % len(TAGS)] + b" " + lines[i].split(b": ")[-1])
    elif kind == "anchor_alias":
        lines[i] = _replace_value(lines[i], b"&a " + lines[i].split(b": ")[-1])
        lines[j] = _replace_value(lines[j], b"*a")
    elif kind == "bomb":
        lines[i] = _replace_value(lines[i], b"*l%d" % (c % 9))
        lines.insert(0, _bomb(c % 9, b % 9 + 2).rstrip(b"\n"))
    elif kind == "nest":
        depth = b % 300
        opening, closing = (b"[", b"]") if c % 2 else (b"{k: ", b"}")
        lines[i] = _replace_value(lines[i], opening * depth + b"1" + closing * depth)
    elif kind == "number":
        digits = (b"0x" + b"f" * (b % 6000 + 1)) if c % 3 == 0 else b"9" * (b % 6000 + 1)
        lines[i] = _replace_value(lines[i], digits)
    elif kind == "control":
        at = a % (len(data) + 1)
        return data[:at] + CONTROL[c % len(CONTROL)] + data[at:]
    elif kind == "flip":
        if not data:
            return data
        at = a % len(data)
        return data[:at] + bytes([data[at] ^ (b % 255 + 1)]) + data[at + 1 :]
    elif kind == "duplicate":
        lines.insert(i, lines[i])
    elif kind == "delete":
        del lines[i]
    elif kind == "swap":
        lines[i], lines[j] = lines[j], lines[i]
    elif kind == "indent":
        body = lines[i].lstrip(b" \t")
        lines[i] = (b"\t" if c % 5 == 0 else b" " * (c % 9)) + body
    elif kind == "merge":
        indent = len(lines[i]) - len(lines[i].lstrip(b" "))
        lines.insert(i, b" " * indent + b"<<: *a")
    elif kind == "value":
        lines[i] = _replace_value(lines[i], VALUES[c % len(VALUES)])
    elif kind == "truncate":
        return data[: a % (len(data) + 1)]
    return b"\n".join(lines)


def test_the_seeds_are_valid_and_pass_preflight() -> None:
    for name, data in SEEDS.items():
        path = WORK / name
        path.write_bytes(data)
        loaded = load_config(str(path))
        preflight(loaded)
        assert len(loaded.config.doors) >= 2


def outcome(path: str) -> Loaded | ConfigError:
    try:
        loaded = load_config(path)
        preflight(loaded)
    except ConfigError as error:
        return error
    return loaded


@pytest.mark.parametrize("name", sorted(SEEDS))
@settings(
    max_examples=300,
    deadline=timedelta(seconds=2),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_mutated_configuration_ends_in_loaded_or_config_error(
    name: str, mutations: list[tuple[str, int, int, int]]
) -> None:
    data = SEEDS[name]
    for mutation in mutations:
        data = mutate(data, *mutation)
    path = WORK / f"fuzz-{name}"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        result = outcome(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak
    if isinstance(result, ConfigError):
        assert result.problems
        for problem in result.problems:
            assert PROBLEM.fullmatch(problem), problem
            assert len(problem) < 500, problem
            assert problem.startswith((f"{path}:", "command line: ")), problem
    else:
        assert result.config.doors
