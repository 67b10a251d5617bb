"""YAML for TOTP and SPA doors: every key, every error with its file, line and key."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.core.model import Spa, SpaUser, Step, Totp
from appliance.errors import ConfigError

KEY = base64.b64encode(b"k" * 32).decode()
HMAC = base64.b64encode(b"h" * 64).decode()
SECRET = base64.b32encode(b"0123456789abcdefghij").decode()

FULL = f"""\
state_dir: /tmp/kg-state
doors:
  otp:
    knock:
      totp: {{secret: "{SECRET.lower()}", steps: 5, period: 60, ports: 30000-30999, protocol: udp, skew: 2}}
      seq_timeout: 8
    open: {{ports: [22/tcp], duration: 20}}
  spa:
    spa:
      port: 40000
      max_age: 60
      max_time: 900
      require_source_address: true
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


def write(tmp_path: Path, text: str) -> str:
    (tmp_path / "bob.keys").write_text(
        f"KEY_BASE64: {base64.b64encode(b'K' * 32).decode()}\n"
        f"HMAC_KEY_BASE64: {base64.b64encode(b'H' * 64).decode()}\n"
    )
    path = tmp_path / "knockgate.yaml"
    path.write_text(text)
    return str(path)


def test_every_key_is_read(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL)).config
    assert config.settings.state_dir == "/tmp/kg-state"
    otp = config.door("otp")
    assert otp.knock.totp == Totp(b"0123456789abcdefghij", 5, 60, 30000, 30999, "udp", 2)
    assert otp.knock.seq_timeout == 8
    spa = config.door("spa")
    assert spa.knock.sequence == ()
    assert spa.spa == Spa(
        users=(
            SpaUser("alice", b"k" * 32, b"h" * 64, ("198.18.0.0/16",), (Step(22, "tcp"),), 120.0),
            SpaUser("bob", b"K" * 32, b"H" * 64),
        ),
        port=40000,
        max_age=60.0,
        max_time=900.0,
        require_source_address=True,
    )


def test_defaults(tmp_path: Path) -> None:
    body = f"""\
doors:
  otp:
    knock: {{totp: {{secret: {SECRET}}}}}
    open: {{ports: [22/tcp]}}
  spa:
    spa: {{users: {{alice: {{key_base64: {KEY}, hmac_key_base64: {HMAC}}}}}}}
    open: {{ports: [22/tcp]}}
"""
    config = load_config(write(tmp_path, body)).config
    assert config.door("otp").knock.totp == Totp(b"0123456789abcdefghij")
    spa = config.door("spa").spa
    assert spa is not None and (spa.port, spa.max_age, spa.max_time) == (62201, 120.0, 3600.0)
    assert config.settings.state_dir == "/var/lib/knockgate"


CASES = [
    # (old text, new text, key in the error, what the message says; None: valid)
    (f'"{SECRET.lower()}"', "MZXW6", "doors.otp.knock.totp.secret", "expected at least 10"),
    (f'"{SECRET.lower()}"', "not*base32", "doors.otp.knock.totp.secret", "is not base32"),
    ("30000-30999", "30000-30010", "doors.otp.knock.totp.ports", "too narrow"),
    ("30000-30999", "30999-30000", "doors.otp.knock.totp.ports", "runs backwards"),
    ("steps: 5", "steps: 40", "doors.otp.knock.totp.steps", "expected 1 to 32"),
    ("period: 60", "period: 1", "doors.otp.knock.totp.period", "expected 5 to 3600"),
    ("totp:", "sequence: [1, 2, 3]\n      totp:", "doors.otp.knock.totp", "cannot be combined"),
    ("port: 40000", "port: 70000", "doors.spa.spa.port", "expected"),
    ("max_age: 60", "max_age: 0", "doors.spa.spa.max_age", "1 to 3600"),
    (
        f"key_base64: {KEY}",
        "key_base64: abc$",
        "doors.spa.spa.users.alice.key_base64",
        "not base64",
    ),
    (f"key_base64: {KEY}", "key_base64: YWJj", "doors.spa.spa.users.alice.key_base64", "3 bytes"),
    (f"hmac_key_base64: {HMAC}", f"hmac_key_base64: {KEY}", "doors.spa.spa.users.alice", "equals"),
    (f"hmac_key_base64: {HMAC}", "", "doors.spa.spa.users.alice.hmac_key_base64", "missing"),
    (
        "ports: [22/tcp]\n",
        "ports: [443/tcp]\n",
        "doors.spa.spa.users.alice.ports",
        "443/tcp is not",
    ),
    ("bob.keys", "missing.keys", "doors.spa.spa.users.bob.key_file", "cannot read"),
    ("[198.18.0.0/16]", "[nowhere]", "doors.spa.spa.users.alice.sources", "is not a network"),
    (
        "    open: {ports: [22/tcp, 80",
        "    knock: {sequence: [1, 2, 3]}\n    open: {ports: [22/tcp, 80",
        "doors.spa.spa",
        "not both",
    ),
    ("        bob:\n          key_file: bob.keys\n", "", "", None),
]


@pytest.mark.parametrize(("old", "new", "key", "message"), CASES)
def test_errors_name_file_line_key_and_expectation(
    tmp_path: Path, old: str, new: str, key: str, message: str | None
) -> None:
    assert FULL.count(old) == 1, old
    text = FULL.replace(old, new)
    path = write(tmp_path, text)
    if message is None:  # a control case: the edit is valid
        load_config(path)
        return
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = caught.value.problems
    # The line of the last key of ``key`` that is in the text (a missing key: its parent's).
    lines: list[int] = []
    for name in reversed(key.split(".")):
        lines = [n for n, line in enumerate(text.splitlines(), 1) if f"{name}:" in line]
        if lines:
            break
    assert any(
        any(p.startswith(f"{path}:{n}: {key}: ") for n in lines) and message in p for p in problems
    ), (problems, lines)


def test_key_file_without_keys_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    (tmp_path / "bob.keys").write_text("# nothing here\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert any("has no KEY_BASE64 line" in p for p in caught.value.problems)


SPA_ONLY = f"""\
doors:
  spa:
    spa: {{users: {{alice: {{key_base64: {KEY}, hmac_key_base64: {HMAC}}}}}}}
    open: {{ports: [22/tcp]}}
"""


@pytest.mark.parametrize(
    "knock",
    [
        "{sequence: [7000, 62201/udp, 9000]}",
        "{totp: {secret: " + SECRET + ", ports: 62000-62999, protocol: udp}}",
    ],
)
def test_a_knock_on_the_spa_port_is_an_error(tmp_path: Path, knock: str) -> None:
    path = write(
        tmp_path, SPA_ONLY + f"  other:\n    knock: {knock}\n    open: {{ports: [22/tcp]}}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"{path}:2: doors.spa.spa.port: 62201/udp is also a knock port of door other "
        "(expected a port no door knocks on)"
    ]


def test_source_address_is_required_by_default(tmp_path: Path) -> None:
    spa = load_config(write(tmp_path, SPA_ONLY)).config.door("spa").spa
    assert spa is not None and spa.require_source_address


def test_same_hmac_key_on_two_doors_of_one_port_warns(tmp_path: Path) -> None:
    body = SPA_ONLY + SPA_ONLY.replace("doors:\n  spa:", "  spa2:")
    loaded = load_config(write(tmp_path, body))
    assert any("door spa on the same port has the same HMAC key" in w for w in loaded.warnings)


def test_weak_totp_warns(tmp_path: Path) -> None:
    body = f"doors:\n  otp:\n    knock: {{totp: {{secret: {SECRET}, steps: 2}}}}\n    open: {{ports: [22/tcp]}}\n"
    loaded = load_config(write(tmp_path, body))
    assert any("2 step(s) over 10000 ports can be guessed" in w for w in loaded.warnings)
