"""Provisioning without a daemon: the managed users file, its merge, the CLI's errors
and the client bundle (config, .fwknoprc stanza, ssh entry, knockgate:// URI)."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.config import load_config
from appliance.config.managed_users import (
    USERS_FILE,
    ManagedDoor,
    ManagedUser,
    format_users,
    read_users,
)
from appliance.errors import ConfigError
from appliance.provision.bundle import (
    client_config,
    door_uri,
    fwknoprc_stanza,
    parse_uri,
    qr_text,
    render_bundle,
    ssh_entry,
)
from appliance.spa.keyfile import read_key_file

HAND_KEY = base64.b64encode(b"k" * 32).decode()
HAND_HMAC = base64.b64encode(b"h" * 64).decode()

CONFIG = f"""\
status_socket: {{dir}}/status.sock
state_dir: {{dir}}/state
doors:
  ssh-spa:
    spa:
      port: 62201
      users: {{{{}}}}
    open: {{{{ports: [22/tcp, 443/tcp], duration: 30}}}}
  ops:
    spa:
      port: 62202
      require_source_address: false
      users:
        root:
          key_base64: {HAND_KEY}
          hmac_key_base64: {HAND_HMAC}
    open: {{{{ports: [2200/tcp]}}}}
  otp:
    knock:
      totp: {{{{secret: JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP, steps: 3, ports: 20000-20999}}}}
    open: {{{{ports: [2222/tcp]}}}}
  seq:
    knock: {{{{sequence: [7113, 2231/udp, 9157]}}}}
    open: {{{{ports: [80/tcp]}}}}
  once:
    knock: {{{{one_time_sequences: {{dir}}/once.seq}}}}
    open: {{{{ports: [81/tcp]}}}}
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "state").mkdir()
    (tmp_path / "once.seq").write_text(" 31001,31002,31003\n")
    path = tmp_path / "knockgate.yaml"
    path.write_text(CONFIG.format(dir=tmp_path))
    return path


def users_file(config: Path) -> Path:
    return config.parent / USERS_FILE


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def add(capsys: pytest.CaptureFixture[str], config: Path, name: str, *doors: str) -> str:
    argv = ["user", "add", name, "--config", str(config), "--host", "198.18.0.1"]
    for door in doors:
        argv += ["--door", door]
    status, out, err = cli(capsys, *argv)
    assert status == 0, err
    return out


# --------------------------------------------------------------------------- managed file


def test_managed_file_round_trip(tmp_path: Path) -> None:
    users = (
        ManagedUser(
            "alice",
            "2026-12-04T23:00:00Z",
            (ManagedDoor("ssh-spa", b"a" * 32, b"b" * 64), ManagedDoor("otp")),
        ),
        ManagedUser(
            "bob.2", "2026-12-04T23:01:00Z", (ManagedDoor("ssh-spa", b"c" * 16, b"d" * 16),)
        ),
    )
    path = tmp_path / USERS_FILE
    path.write_text(format_users(users))
    read = read_users(str(path))
    assert [(u.name, u.created) for u in read] == [(u.name, u.created) for u in users]
    assert [[(d.door, d.key, d.hmac_key) for d in u.doors] for u in read] == [
        [(d.door, d.key, d.hmac_key) for d in u.doors] for u in users
    ]


def test_no_managed_file_means_no_users(tmp_path: Path) -> None:
    assert read_users(str(tmp_path / USERS_FILE)) == ()


def test_load_config_merges_managed_users_into_spa_doors(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add(capsys, config, "alice", "ssh-spa", "ops", "otp")
    doors = load_config(str(config)).config
    managed = read_users(str(users_file(config)))[0]
    spa = doors.door("ssh-spa").spa  # type: ignore[union-attr]
    assert spa is not None and [u.name for u in spa.users] == ["alice"]
    assert spa.users[0].key == managed.door("ssh-spa").key  # type: ignore[union-attr]
    ops = doors.door("ops").spa  # type: ignore[union-attr]
    assert ops is not None and [u.name for u in ops.users] == ["root", "alice"]
    # Each SPA door has keys of its own (one pair would always open the first door).
    assert managed.door("ssh-spa").key != managed.door("ops").key  # type: ignore[union-attr]
    assert managed.door("otp").key is None  # type: ignore[union-attr]


def test_broken_managed_file_is_one_error_naming_file_line_key(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    users_file(config).write_text(
        "users:\n  alice:\n    created: x\n    doors:\n      ssh-spa: {key_base64: 'no!', hmac_key_base64: 'no!'}\n"
    )
    status, _, err = cli(capsys, "check", str(config))
    assert status == 2
    name = users_file(config)
    assert err.splitlines() == [
        f"{name}:5: users.alice.doors.ssh-spa.key_base64: is not base64",
        f"{name}:5: users.alice.doors.ssh-spa.hmac_key_base64: is not base64",
    ]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("users: [a]\n", "users: expected a mapping of keys to values"),
        ("users:\n  -x: {doors: {}}\n", "users.-x: '-x' is not a user name"),
        ("users:\n  a: {created: x}\n", "users.a.doors: missing"),
        (
            "users:\n  a: {doors: {seq: {key_base64: "
            + HAND_KEY
            + ", hmac_key_base64: "
            + HAND_HMAC
            + "}}}\n",
            "keys for a door that is not an SPA door",
        ),
        ("users:\n  a: {doors: {ssh-spa: {}}}\n", "an SPA door needs keys"),
        (
            "users:\n  root: {doors: {ops: {key_base64: "
            + HAND_KEY
            + ", hmac_key_base64: "
            + HAND_HMAC
            + "}}}\n",
            "has a user root of its own",
        ),
        ("users: !!python/object:os.system x\n", "explicit tag"),
    ],
)
def test_managed_file_errors(config: Path, text: str, expected: str) -> None:
    users_file(config).write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(str(config))
    assert all(line.startswith(f"{users_file(config)}:") for line in raised.value.problems)
    assert expected in "\n".join(raised.value.problems)


def test_managed_user_of_a_door_that_is_gone_is_a_warning(config: Path) -> None:
    users_file(config).write_text("users:\n  a: {doors: {gone: {}}}\n")
    warnings = load_config(str(config)).warnings
    assert any("has no door gone: this entry opens nothing" in w for w in warnings)


def test_spa_door_without_users_opens_for_nobody_with_a_warning(config: Path) -> None:
    loaded = load_config(str(config))
    assert loaded.config.door("ssh-spa").spa.users == ()  # type: ignore[union-attr]
    assert any("doors.ssh-spa.spa.users: warning: no user" in w for w in loaded.warnings)


# --------------------------------------------------------------------------- user commands


def test_add_writes_0600_and_remove_keeps_the_mode(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = config.read_text()
    add(capsys, config, "alice")
    path = users_file(config)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    os.chmod(path, 0o640)
    add(capsys, config, "bob")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    status, _, err = cli(capsys, "user", "remove", "alice", "--config", str(config))
    assert status == 0, err
    assert "no running knockgate found" in err
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [u.name for u in read_users(str(path))] == ["bob"]
    spa = load_config(str(config)).config.door("ssh-spa").spa  # type: ignore[union-attr]
    assert [u.name for u in spa.users] == ["bob"]  # type: ignore[union-attr]
    assert config.read_text() == before  # the hand-written file is never rewritten
    assert not [p for p in config.parent.iterdir() if p.name.endswith(".tmp")]


def test_add_defaults_to_every_spa_door(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add(capsys, config, "alice")
    assert [d.door for d in read_users(str(users_file(config)))[0].doors] == ["ssh-spa", "ops"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["alice"], "user 'alice' exists (added "),
        (["root"], "user 'root' is written in "),
        (["b b"], "user name: 'b b' is not a user name"),
        (["x" * 64], "is not a user name"),
        (["x/y"], "is not a user name"),
        (["carol", "--door", "nope"], "unknown door 'nope' in "),
        (["carol", "--door", "once"], "door 'once' uses one-time sequences"),
    ],
)
def test_add_refuses_bad_input_and_changes_nothing(
    config: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    add(capsys, config, "alice")
    before = users_file(config).read_bytes()
    status, out, err = cli(capsys, "user", "add", *argv, "--config", str(config))
    assert status == 2
    assert out == ""
    assert len(err.splitlines()) == 1 and expected in err, err
    assert "Traceback" not in err
    assert users_file(config).read_bytes() == before


def test_add_refused_by_the_check_changes_nothing(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A configuration the daemon would refuse is refused before the rename."""
    config.write_text(config.read_text().replace("users: {}", "users: {}\n      max_age: 0"))
    status, _, err = cli(capsys, "user", "add", "alice", "--config", str(config))
    assert status == 2 and "max_age" in err
    assert not users_file(config).exists()
    assert not [p for p in config.parent.iterdir() if p.name.endswith(".tmp")]


def test_remove_unknown_and_hand_written_users(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = cli(capsys, "user", "remove", "zed", "--config", str(config))
    assert status == 2 and "no user 'zed'" in err
    status, _, err = cli(capsys, "user", "remove", "root", "--config", str(config))
    assert status == 2 and "written in" in err and "remove her there" in err


def test_list_shows_names_doors_dates_never_secrets(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add(capsys, config, "alice", "ssh-spa", "otp")
    status, out, _ = cli(capsys, "user", "list", "--config", str(config))
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("alice  doors: ssh-spa, otp  added: 20")
    assert lines[1] == "root  doors: ops  added: -  (in the configuration)"
    managed = read_users(str(users_file(config)))[0].door("ssh-spa")
    assert managed is not None and managed.key is not None
    assert base64.b64encode(managed.key).decode() not in out
    assert "JBSWY3DP" not in out


def test_output_file_is_0600_and_stdout_stays_empty(
    config: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    target = tmp_path / "alice.bundle"
    status, out, err = cli(
        capsys, "user", "add", "alice", "--config", str(config), "--output", str(target)
    )
    assert status == 0 and out == ""
    assert f"written to {target} (mode 0600" in err
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert "KEY_BASE64" in target.read_text()


def test_output_file_is_removed_when_the_add_is_refused(
    config: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    target = tmp_path / "x.bundle"
    status, _, _ = cli(
        capsys,
        "user",
        "add",
        "x",
        "--door",
        "nope",
        "--config",
        str(config),
        "--output",
        str(target),
    )
    assert status == 2 and not target.exists()


def test_knockd_conf_has_no_users(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "knockd.conf"
    conf.write_text("[ssh]\n  sequence = 7000,8000,9000\n  command = true\n")
    status, _, err = cli(capsys, "user", "add", "a", "--config", str(conf))
    assert status == 2 and "is a knockd.conf" in err


# --------------------------------------------------------------------------- bundle


def test_bundle_pieces_work_for_the_clients(
    config: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = add(capsys, config, "alice", "ssh-spa", "ops", "otp", "seq")
    user = read_users(str(users_file(config)))[0]
    server = load_config(str(config)).config
    doors = [server.door(name) for name in ("ssh-spa", "ops", "otp", "seq")]
    assert all(door is not None for door in doors)
    spa_door, ops_door, otp_door, seq_door = doors  # type: ignore[misc]
    entry = user.door("ssh-spa")
    assert entry is not None and entry.key is not None and entry.hmac_key is not None

    # The client config is a valid knockgate configuration with the doors' knocks.
    client = tmp_path / "client" / "knockgate.yaml"
    client.parent.mkdir()
    client.write_text(client_config("alice", doors))  # type: ignore[arg-type]
    copy = load_config(str(client)).config
    assert copy.door("otp").knock.totp == otp_door.knock.totp  # type: ignore[union-attr]
    assert copy.door("seq").knock.sequence == seq_door.knock.sequence  # type: ignore[union-attr]
    assert copy.door("ssh-spa").spa.port == 62201  # type: ignore[union-attr]
    assert copy.door("ssh-spa").open == spa_door.open  # type: ignore[union-attr]

    # The .fwknoprc stanza: knockgate's reader gets the keys back (fwknop reads the same).
    rc = tmp_path / "fwknoprc"
    rc.write_text(fwknoprc_stanza("198.18.0.1", spa_door, entry))
    profile = read_key_file(str(rc), "ssh-spa")
    assert (profile.keys.encryption, profile.keys.hmac) == (entry.key, entry.hmac_key)
    assert profile.access == "tcp/22,tcp/443"
    assert profile.allow_ip is None  # the door requires the address: fwknop -a
    assert "ALLOW_IP            source" in fwknoprc_stanza("h", ops_door, user.door("ops"))  # type: ignore[arg-type]

    # ssh: connect with the key file for SPA, without it for TOTP.
    assert ssh_entry("198.18.0.1", spa_door) == (
        "Host 198.18.0.1-ssh-spa\n    HostName 198.18.0.1\n    Port 22\n"
        "    ProxyCommand knockgate connect %h %p --door ssh-spa --config "
        "~/.config/knockgate/knockgate.yaml --key-file ~/.fwknoprc\n"
    )
    assert "--key-file" not in (ssh_entry("h", otp_door) or "")

    # The URI carries what a client needs; the whole bundle holds each piece.
    link = parse_uri(door_uri("2001:db8::1", "alice", spa_door, entry))
    assert (link.host, link.door) == ("2001:db8::1", "ssh-spa")
    assert link.params["kind"] == "spa" and link.params["open"] == "tcp/22,tcp/443"
    assert base64.b64decode(link.params["key"]) == entry.key
    assert base64.b64decode(link.params["hmac"]) == entry.hmac_key
    totp = parse_uri(door_uri("h", "alice", otp_door, ManagedDoor("otp"))).params
    assert totp["secret"] == "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP" and totp["steps"] == "3"
    seq = parse_uri(door_uri("h", "alice", seq_door, ManagedDoor("seq"))).params
    assert seq["seq"] == "tcp/7113,udp/2231,tcp/9157"
    for piece in (
        "## 1. knockgate client configuration",
        "[ssh-spa]",
        "[ops]",
        "Host 198.18.0.1-otp",
        "knockgate://198.18.0.1/seq?v=1&kind=sequence",
        "Door(s) otp, seq: the door's own knock, shared",
    ):
        assert piece in out
    assert out == render_bundle("198.18.0.1", user, doors, out.split("(", 1)[1].split(")")[0])  # type: ignore[arg-type]


def test_qr_code_is_drawn_for_a_dark_terminal() -> None:
    code = qr_text("knockgate://h/d?v=1")
    assert code is not None
    lines = code.splitlines()
    assert lines[0] == "█" * len(lines[0])  # the quiet zone is light: drawn
    assert len({len(line) for line in lines}) == 1


@pytest.mark.parametrize(
    "uri",
    ["http://h/d?v=1", "knockgate:///d?v=1", "knockgate://h/?v=1", "knockgate://h/d?v=2"],
)
def test_parse_uri_refuses_what_is_not_a_v1_knockgate_uri(uri: str) -> None:
    with pytest.raises(ValueError):
        parse_uri(uri)


def test_existing_output_file_is_kept_when_the_add_is_refused(
    config: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    target = tmp_path / "x.bundle"
    target.write_text("an older bundle\n")
    status, _, _ = cli(
        capsys,
        "user",
        "add",
        "x",
        "--door",
        "nope",
        "--config",
        str(config),
        "--output",
        str(target),
    )
    assert status == 2 and target.read_text() == "an older bundle\n"
    status, _, _ = cli(capsys, "user", "add", "x", "--config", str(config), "--output", str(target))
    assert status == 0 and target.read_text().startswith("# knockgate client bundle for x")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


# --------------------------------------------------------------------------- reload

FAKE_DAEMON = """\
import json, os, signal, socket, sys
path, answer = sys.argv[1], sys.argv[2]
counters = {"reloads": 0, "reload_failures": 0}
def hup(*_):
    counters[answer] += 1
signal.signal(signal.SIGHUP, hup)
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(8)
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    conn.sendall(json.dumps({"pid": os.getpid(), "counters": counters}).encode())
    conn.close()
"""


@pytest.mark.parametrize(
    ("answer", "outcome", "status"), [("reloads", "reloaded", 0), ("reload_failures", "refused", 1)]
)
def test_reload_signals_the_status_sockets_pid_and_reads_its_counters(
    config: Path, capsys: pytest.CaptureFixture[str], answer: str, outcome: str, status: int
) -> None:
    """A stand-in daemon on the configuration's status socket: SIGHUP, then its counters."""
    import subprocess
    import sys

    from appliance.provision.reload import reload_daemon

    socket_path = config.parent / "status.sock"
    daemon = subprocess.Popen(
        [sys.executable, "-c", FAKE_DAEMON, str(socket_path), answer],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert daemon.stdout is not None and daemon.stdout.readline() == "ready\n"
        result = reload_daemon(load_config(str(config)).config, timeout=5)
        assert result.outcome == outcome, result.message
        assert f"pid {daemon.pid}" in result.message
        code, _, err = cli(capsys, "user", "add", "alice", "--config", str(config), "--host", "h")
        assert code == status
        if outcome == "refused":
            code, _, err = cli(capsys, "user", "remove", "alice", "--config", str(config))
            assert code == 1
            assert "alice's keys work in the running daemon until a reload succeeds" in err
    finally:
        daemon.kill()
        daemon.wait()


# --------------------------------------------------------------------------- hostile files

VALID_USERS = format_users(
    [
        ManagedUser(
            "alice",
            "2026-12-04T23:00:00Z",
            (ManagedDoor("ssh-spa", b"a" * 32, b"b" * 64), ManagedDoor("otp")),
        )
    ]
)


def test_hostile_managed_files_end_in_a_config_error_or_a_config(tmp_path: Path) -> None:
    """Mutated versions of a valid file: a Config or ConfigError lines naming the file."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    (tmp_path / "state").mkdir()
    (tmp_path / "once.seq").write_text(" 31001,31002,31003\n")
    config = tmp_path / "knockgate.yaml"
    config.write_text(CONFIG.format(dir=tmp_path))
    target = users_file(config)

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        cut=st.integers(0, len(VALID_USERS)),
        insert=st.text(alphabet=st.sampled_from(list(":{}[]-&*!|>'\"#%@` \n\tx1")), max_size=12),
        drop=st.integers(0, 8),
    )
    def check(cut: int, insert: str, drop: int) -> None:
        target.write_text(VALID_USERS[:cut] + insert + VALID_USERS[cut + drop :])
        try:
            load_config(str(config))
        except ConfigError as error:
            assert error.problems
            assert all(line.startswith(f"{target}:") for line in error.problems), error.problems

    check()
