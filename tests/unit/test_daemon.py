"""The daemon's loop with an in-memory firewall: commands carried out, failures contained."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.core.events import Packet
from appliance.core.model import Step
from appliance.firewall.memory import MemoryBackend
from appliance.runtime.daemon import Daemon, Overrides, firewall_plan, ssh_lockout
from appliance.runtime.items import Signal, StatusRequest
from appliance.spa.keyfile import generate_keys
from appliance.spa.wire import SpaKeys, new_message, seal

CONFIG = """\
status_socket: {socket}
state_dir: {socket}.state
firewall:
  always_allow: [198.18.200.0/24]
  scan: {{ports: 10, window: 2, hold: 60}}
doors:
  ssh:
    knock: {{sequence: [7113, 2231/udp, 9157], seq_timeout: 5}}
    open: {{ports: [22/tcp], duration: 30}}
  close:
    knock: {{sequence: [9157, 2231/udp, 7113], seq_timeout: 5}}
    close: [ssh]
  cmd:
    knock: {{sequence: [4001, 4002, 4003]}}
    start_command: echo start %IP% >> {marks}
    stop_command: echo stop %IP% >> {marks}
    cmd_timeout: 1
"""

A = "198.18.5.1"
KEY, HMAC_KEY = base64.b64encode(b"k" * 32).decode(), base64.b64encode(b"h" * 32).decode()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Daemon, MemoryBackend, Clock, Path]:
    marks = tmp_path / "marks"
    path = tmp_path / "k.yaml"
    path.write_text(CONFIG.format(socket=tmp_path / "status.sock", marks=marks))
    clock = Clock()
    backend = MemoryBackend(clock)
    daemon = Daemon(load_config(str(path)), backend, clock=clock, wall=clock, capture=False)
    daemon.start()
    yield daemon, backend, clock, marks
    daemon.shutdown()


def knock(daemon: Daemon, clock: Clock, src: str, *steps: str) -> None:
    for step in steps:
        port, _, proto = step.partition("/")
        clock.now += 0.1
        daemon._item(Packet(clock.now, src, "198.18.0.1", proto or "tcp", int(port), 0x02))


def test_start_sets_up_the_plan(setup: tuple[Daemon, MemoryBackend, Clock, Path]) -> None:
    daemon, backend, _, _ = setup
    assert backend.plan == firewall_plan(daemon.config)
    assert backend.plan.protected == (Step(22, "tcp"),)
    assert backend.plan.always_allow == ("198.18.200.0/24",)


def test_knock_grants_until_the_deadline_and_close_revokes(
    setup: tuple[Daemon, MemoryBackend, Clock, Path],
) -> None:
    daemon, backend, clock, _ = setup
    knock(daemon, clock, A, "7113", "2231/udp", "9157")
    assert backend.is_open(A, Step(22, "tcp"))
    assert not backend.is_open("198.18.5.2", Step(22, "tcp"))
    clock.now += 29.9
    assert backend.is_open(A, Step(22, "tcp"))
    clock.now += 0.2
    assert not backend.is_open(A, Step(22, "tcp"))  # the kernel timeout did it
    knock(daemon, clock, A, "7113", "2231/udp", "9157")
    knock(daemon, clock, A, "9157", "2231/udp", "7113")
    assert not backend.is_open(A, Step(22, "tcp"))


def test_a_held_scanner_gets_no_grant_and_no_command(
    setup: tuple[Daemon, MemoryBackend, Clock, Path],
) -> None:
    daemon, backend, clock, marks = setup
    backend.held.add(A)
    knock(daemon, clock, A, "7113", "2231/udp", "9157")
    knock(daemon, clock, A, "4001", "4002", "4003")
    assert not backend.is_open(A, Step(22, "tcp"))
    assert daemon.stats.held_off == 2  # both knocks refused
    clock.now += 5
    daemon._item(Signal("stop"))
    daemon.shutdown()
    daemon.runner.shutdown()
    assert not marks.exists()  # neither the start nor the stop command ran


def test_grant_failure_leaves_the_door_closed_and_keeps_serving(
    setup: tuple[Daemon, MemoryBackend, Clock, Path], caplog: pytest.LogCaptureFixture
) -> None:
    daemon, backend, clock, _ = setup
    backend.fail = "grant"
    with caplog.at_level(logging.ERROR, logger="knockgate"):
        knock(daemon, clock, A, "7113", "2231/udp", "9157")
    assert "grant failed, door stays closed" in caplog.text
    assert daemon.stats.grant_failures == 1
    backend.fail = None
    knock(daemon, clock, "198.18.5.2", "7113", "2231/udp", "9157")
    assert backend.is_open("198.18.5.2", Step(22, "tcp"))


def test_commands_run_and_pending_stops_run_at_shutdown(
    setup: tuple[Daemon, MemoryBackend, Clock, Path],
) -> None:
    daemon, _, clock, marks = setup
    knock(daemon, clock, A, "4001", "4002", "4003")
    daemon.shutdown()  # the stop is due in 1 s: shutdown runs it now
    assert marks.read_text().splitlines() == [f"start {A}", f"stop {A}"]


def test_on_shutdown_revoke_closes_every_grant(
    setup: tuple[Daemon, MemoryBackend, Clock, Path], tmp_path: Path
) -> None:
    daemon, backend, clock, _ = setup
    knock(daemon, clock, A, "7113", "2231/udp", "9157")
    daemon.shutdown()
    assert backend.is_open(A, Step(22, "tcp"))  # default: keep, the deadline closes it
    path = Path(daemon.config.path)
    path.write_text(path.read_text().replace("doors:", "on_shutdown: revoke\ndoors:"))
    again = Daemon(load_config(str(path)), backend, clock=clock, wall=clock, capture=False)
    again.start()
    again.shutdown()
    assert not backend.is_open(A, Step(22, "tcp"))


def test_bad_reload_keeps_the_running_config(
    setup: tuple[Daemon, MemoryBackend, Clock, Path], caplog: pytest.LogCaptureFixture
) -> None:
    daemon, _, _, _ = setup
    path = Path(daemon.config.path)
    good = path.read_text()
    path.write_text(good.replace("9157]", "abc]", 1))
    with caplog.at_level(logging.ERROR, logger="knockgate"):
        daemon.reload()
    assert "reload refused, keeping the running configuration" in caplog.text
    assert "'abc' is not a port" in caplog.text
    assert daemon.stats.reload_failures == 1
    assert [d.name for d in daemon.config.doors] == ["ssh", "close", "cmd"]
    path.write_text(good.replace("duration: 30", "duration: 60"))
    daemon.reload()
    assert daemon.config.doors[0].open is not None
    assert daemon.config.doors[0].open.duration == 60.0
    assert daemon.stats.reloads == 1


def test_flushed_firewall_is_detected_and_repaired(
    setup: tuple[Daemon, MemoryBackend, Clock, Path],
) -> None:
    daemon, backend, _, _ = setup
    backend.plan = None  # someone flushed the ruleset
    daemon._check_firewall()
    assert backend.plan == firewall_plan(daemon.config)
    assert daemon.stats.firewall_repairs == 1


def test_status_snapshot(setup: tuple[Daemon, MemoryBackend, Clock, Path]) -> None:
    daemon, _, clock, _ = setup
    knock(daemon, clock, A, "7113", "2231/udp", "9157", "4001")
    snapshot = daemon.snapshot()
    assert snapshot["backend"] == "memory"
    assert snapshot["grants"] == [
        {"address": A, "port": "22/tcp", "expires_in": 29.9, "door": "ssh"}
    ]
    assert snapshot["attempts"] == 2  # 9157 also began door close; 4001 began door cmd
    assert snapshot["counters"]["opened"] == 1
    assert [d["name"] for d in snapshot["doors"]] == ["ssh", "close", "cmd"]
    assert snapshot["host"]


def test_status_over_the_socket(setup: tuple[Daemon, MemoryBackend, Clock, Path]) -> None:
    import threading

    from appliance.runtime.status import query

    daemon, _, _, _ = setup
    answered = threading.Event()

    def serve() -> None:  # the loop's side: answer one status request
        item = daemon.queue.get(timeout=5)
        daemon._item(item)
        answered.set()

    server = threading.Thread(target=serve)
    server.start()
    data = query(daemon.config.settings.status_socket)
    server.join()
    assert answered.is_set()
    assert data["config"] == daemon.config.path


@pytest.mark.parametrize(
    ("connection", "refused"),
    [
        ("198.18.7.7 50000 198.18.0.1 22", True),
        ("198.18.200.9 50000 198.18.0.1 22", False),  # in always_allow
        ("198.18.7.7 50000 198.18.0.1 2222", False),  # sshd on a port knockgate leaves alone
        ("", False),
    ],
)
def test_ssh_lockout(tmp_path: Path, connection: str, refused: bool) -> None:
    path = tmp_path / "k.yaml"
    path.write_text(CONFIG.format(socket=tmp_path / "s", marks=tmp_path / "m"))
    config = load_config(str(path)).config
    reason = ssh_lockout(config, {"SSH_CONNECTION": connection} if connection else {})
    assert (reason is not None) == refused
    if refused:
        assert "198.18.7.7" in reason and "--i-know" in reason


@pytest.mark.parametrize("how", ["knock", "spa"])
def test_service_door_grants_only_once_the_service_answers(tmp_path: Path, how: str) -> None:
    import socket

    from appliance.services.fake import FakeRuntime
    from appliance.services.launcher import ServiceLauncher

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    path = tmp_path / "k.yaml"
    path.write_text(
        f"status_socket: {tmp_path / 's.sock'}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        "services:\n"
        f"  web: {{image: 'web:test', container_port: {port}, host_port: 8080,"
        " ready: {tcp: true, timeout: 2}}\n"
        "doors:\n"
        "  web:\n"
        "    knock: {sequence: [7113, 2231/udp, 9157]}\n"
        "    service: {name: web, duration: 30}\n"
        "  web-spa:\n"
        f"    spa: {{users: {{alice: {{key_base64: {KEY}, hmac_key_base64: {HMAC_KEY}}}}}}}\n"
        "    service: {name: web, duration: 30}\n"
    )
    clock = Clock()
    backend = MemoryBackend(clock)
    loaded = load_config(str(path))
    runtime = FakeRuntime()
    launcher = ServiceLauncher(runtime, loaded.config.services, "o1", clock=clock)
    daemon = Daemon(loaded, backend, clock=clock, wall=clock, capture=False, launcher=launcher)
    daemon.start()
    try:
        if how == "knock":
            knock(daemon, clock, A, "7113", "2231/udp", "9157")
        else:
            keys = SpaKeys.from_base64(KEY, HMAC_KEY)
            daemon._item(_spa_packet(clock, seal(new_message("a", 1000, f"{A},tcp/8080"), keys)))
        assert not backend.is_open(A, Step(8080, "tcp"))  # not before the service answers
        for _ in range(20):  # the launch reports back through the queue
            item = daemon.queue.get(timeout=5)
            daemon._item(item)
            if type(item).__name__ == "ContainerReady":
                break
        assert backend.is_open(A, Step(8080, "tcp"))
        assert "create" in runtime.calls
        assert backend.plan is not None and Step(8080, "tcp") in backend.plan.protected
    finally:
        daemon.shutdown()
        listener.close()
    # on_shutdown: keep (the default): the service outlives knockgate, for the next start.
    assert "stop web" not in runtime.calls


def test_the_first_services_added_by_a_reload_start_their_runtime(tmp_path: Path) -> None:
    """Regression: a knockgate started without services refused a reload that added
    some ("restart knockgate to apply them")."""
    import socket

    from appliance.config.schema import Service
    from appliance.services.fake import FakeRuntime
    from appliance.services.launcher import ServiceLauncher

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    path = tmp_path / "k.yaml"
    head = f"status_socket: {tmp_path / 's.sock'}\nstate_dir: {tmp_path / 'state'}\n"
    path.write_text(head + "doors:\n  ssh:\n    knock: {sequence: [7113, 2231/udp, 9157]}\n")
    clock = Clock()
    backend = MemoryBackend(clock)
    runtime = FakeRuntime()
    made: list[ServiceLauncher] = []

    def launchers(services: tuple[Service, ...]) -> ServiceLauncher:
        made.append(ServiceLauncher(runtime, services, "o1", clock=clock))
        return made[-1]

    daemon = Daemon(
        load_config(str(path)), backend, clock=clock, wall=clock, capture=False, launchers=launchers
    )
    daemon.start()
    try:
        assert daemon.services is None and made == []
        path.write_text(
            head + "services:\n"
            f"  web: {{image: 'web:test', container_port: {port}, host_port: 8080,"
            " ready: {tcp: true, timeout: 2}}\n"
            "doors:\n  web:\n    knock: {sequence: [7113, 2231/udp, 9157]}\n"
            "    service: {name: web, duration: 30}\n"
        )
        daemon.reload()
        assert daemon.stats.reloads == 1 and daemon.stats.reload_failures == 0
        assert daemon.services is not None and len(made) == 1
        knock(daemon, clock, A, "7113", "2231/udp", "9157")
        for _ in range(20):
            item = daemon.queue.get(timeout=5)
            daemon._item(item)
            if type(item).__name__ == "ContainerReady":
                break
        assert backend.is_open(A, Step(8080, "tcp"))
    finally:
        daemon.shutdown()
        listener.close()


# ----------------------------------------------------------------- SPA and TOTP

SPA_CONFIG = """\
status_socket: {socket}
state_dir: {state}
doors:
  spa:
    spa:
      users:
        alice: {{key_base64: {key}, hmac_key_base64: {hmac}, ports: [22/tcp]}}
    open: {{ports: [22/tcp, 80/tcp], duration: 30}}
"""


def _spa_daemon(
    tmp_path: Path, clock: Clock, keys: tuple[str, str] | None = None
) -> tuple[Daemon, MemoryBackend, SpaKeys]:
    key, hmac_key = keys or generate_keys()
    path = tmp_path / "spa.yaml"
    path.write_text(
        SPA_CONFIG.format(
            socket=tmp_path / "status.sock", state=tmp_path / "state", key=key, hmac=hmac_key
        )
    )
    backend = MemoryBackend(clock)
    daemon = Daemon(load_config(str(path)), backend, clock=clock, wall=clock, capture=False)
    daemon.start()
    return daemon, backend, SpaKeys.from_base64(key, hmac_key)


def _config_keys(daemon: Daemon) -> tuple[str, str]:
    spa = daemon.config.doors[0].spa
    assert spa is not None
    user = spa.users[0]
    return base64.b64encode(user.key).decode(), base64.b64encode(user.hmac_key).decode()


def _spa_packet(clock: Clock, data: bytes, src: str = A) -> Packet:
    return Packet(clock.now, src, "198.18.0.1", "udp", 62201, 0, data)


def test_spa_packet_grants_and_its_replay_is_refused_across_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    daemon, backend, keys = _spa_daemon(tmp_path, clock)
    data = seal(new_message("alice", int(clock.now), "198.18.9.9,tcp/22"), keys)
    daemon._item(_spa_packet(clock, data))
    assert backend.is_open("198.18.9.9", Step(22, "tcp"))
    assert not backend.is_open(A, Step(22, "tcp"))
    clock.now += 31
    daemon._item(_spa_packet(clock, data))
    assert not backend.is_open("198.18.9.9", Step(22, "tcp"))
    assert daemon.snapshot()["counters"]["spa_refused"] == 1
    daemon.shutdown()
    assert (tmp_path / "state" / "replay").read_text().splitlines()[1].startswith("spa ")
    restarted, backend, _ = _spa_daemon(tmp_path, clock, _config_keys(daemon))
    try:
        restarted._item(_spa_packet(clock, data))
        assert not backend.is_open("198.18.9.9", Step(22, "tcp"))
        assert restarted.snapshot()["counters"]["spa_refused"] == 1
    finally:
        restarted.shutdown()


def test_spa_garbage_and_wrong_allowance_are_counted_not_granted(tmp_path: Path) -> None:
    clock = Clock()
    daemon, backend, keys = _spa_daemon(tmp_path, clock)
    try:
        daemon._item(_spa_packet(clock, b"x" * 200))
        port80 = seal(new_message("alice", int(clock.now), "198.18.9.9,tcp/80"), keys)
        daemon._item(_spa_packet(clock, port80))
        counters = daemon.snapshot()["counters"]
        assert counters["spa_unauthenticated"] == 1
        assert counters["spa_refused"] == 1
        assert backend.grants() == []
    finally:
        daemon.shutdown()


def test_spa_reader_tries_the_next_user_sharing_an_hmac_key() -> None:
    from appliance.capture.spa import SpaReader
    from appliance.core.model import Door, Knock, OpenPorts, Spa, SpaUser

    users = (SpaUser("first", b"1" * 32, b"h" * 32), SpaUser("second", b"2" * 32, b"h" * 32))
    door = Door("spa", Knock(()), OpenPorts((Step(22, "tcp"),)), spa=Spa(users=users))
    reader = SpaReader([door])
    data = seal(new_message("x", 1000, f"{A},tcp/22"), SpaKeys(b"2" * 32, b"h" * 32))
    knock = reader.read(Packet(1000.0, A, "198.18.0.1", "udp", 62201, 0, data))
    assert knock is not None and knock.user == "second"
    assert reader.counters.spa_undecodable == 0


def test_a_clock_stepped_back_never_lengthens_a_grant(
    setup: tuple[Daemon, MemoryBackend, Clock, Path],
) -> None:
    """Regression: the engine's clock never goes back, so after the host's clock was
    stepped back a grant's deadline lay that much further in the future."""
    daemon, backend, clock, _ = setup
    knock(daemon, clock, A, "7113")  # the engine has seen 1000.1
    clock.now -= 3600  # NTP steps the clock back an hour
    knock(daemon, clock, A, "2231/udp", "9157")
    assert backend.is_open(A, Step(22, "tcp"))
    clock.now += 30.5
    assert not backend.is_open(A, Step(22, "tcp"))


def test_the_state_file_is_compacted_from_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("appliance.runtime.daemon.COMPACT_EVERY", 2)
    clock = Clock()
    daemon, _, keys = _spa_daemon(tmp_path, clock)
    replay = tmp_path / "state" / "replay"
    try:
        for _ in range(2):
            daemon._item(
                _spa_packet(clock, seal(new_message("a", int(clock.now), f"{A},tcp/22"), keys))
            )
        first = replay.read_text().splitlines()[1:]  # after the header
        assert len(first) == 2
        clock.now += 4000  # both entries have run out
        for _ in range(2):
            daemon._item(
                _spa_packet(clock, seal(new_message("a", int(clock.now), f"{A},tcp/22"), keys))
            )
        second = replay.read_text().splitlines()[1:]
        assert len(second) == 2 and not set(first) & set(second)
    finally:
        daemon.shutdown()


def test_a_reload_to_another_state_dir_carries_the_replay_cache(tmp_path: Path) -> None:
    clock = Clock()
    daemon, _, keys = _spa_daemon(tmp_path, clock)
    try:
        data = seal(new_message("a", int(clock.now), f"{A},tcp/22"), keys)
        daemon._item(_spa_packet(clock, data))
        path = Path(daemon.config.path)
        path.write_text(path.read_text().replace(str(tmp_path / "state"), str(tmp_path / "new")))
        daemon.reload()
        assert (tmp_path / "new" / "replay").read_text().splitlines()[1].startswith("spa ")
        daemon._item(_spa_packet(clock, data))
        assert daemon.snapshot()["counters"]["spa_refused"] == 1  # still a replay
    finally:
        daemon.shutdown()


def test_command_line_overrides_survive_a_reload(tmp_path: Path) -> None:
    """Regression: a reload re-read state_dir from the file, so --state-dir moved the
    replay cache to the configured (default) directory."""
    path = tmp_path / "k.yaml"
    path.write_text(CONFIG.format(socket=tmp_path / "file.sock", marks=tmp_path / "marks"))
    overrides = Overrides(status_socket=str(tmp_path / "s.sock"), state_dir=str(tmp_path / "st"))
    clock = Clock()
    daemon = Daemon(
        overrides.apply(load_config(str(path))),
        MemoryBackend(clock),
        clock=clock,
        wall=clock,
        capture=False,
        overrides=overrides,
    )
    daemon.start()
    try:
        daemon.reload()
        assert daemon.stats.reloads == 1
        assert daemon.state.directory == str(tmp_path / "st")
        assert daemon.config.settings.status_socket == str(tmp_path / "s.sock")
    finally:
        daemon.shutdown()


# ----------------------------------------------------------------- records first


def test_a_one_time_sequence_that_cannot_be_marked_used_opens_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: the grant was made before the use was recorded, so with a read-only
    one-time file the same sequence was accepted again after a restart."""
    sequences = tmp_path / "seqs"
    sequences.write_text(" 5001,5002,5003\n 6001,6002,6003\n")
    path = tmp_path / "ot.yaml"
    path.write_text(
        f"status_socket: {tmp_path / 's.sock'}\nstate_dir: {tmp_path / 'state'}\n"
        "doors:\n  ot:\n"
        f"    knock: {{one_time_sequences: {sequences}}}\n"
        "    open: {ports: [22/tcp], duration: 30}\n"
        f"    start_command: echo start %IP% >> {tmp_path / 'marks'}\n"
    )

    def read_only(path: str, offset: int) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("appliance.runtime.daemon.mark_line_used", read_only)
    clock = Clock()
    backend = MemoryBackend(clock)
    daemon = Daemon(load_config(str(path)), backend, clock=clock, wall=clock, capture=False)
    daemon.start()
    try:
        with caplog.at_level(logging.WARNING, logger="knockgate"):
            knock(daemon, clock, A, "5001", "5002", "5003")
        assert not backend.is_open(A, Step(22, "tcp"))
        assert daemon.stats.refused_unrecorded == 1
        assert "cannot mark line 1" in caplog.text
        assert "its use could not be recorded, so no access" in caplog.text
    finally:
        daemon.shutdown()
    assert not (tmp_path / "marks").exists()  # the start command did not run either
    assert sequences.read_text().startswith(" 5001")  # still unused on disk: still unusable


def test_spa_that_cannot_be_recorded_opens_nothing(tmp_path: Path) -> None:
    """An SPA packet whose digest cannot be written to the replay cache is refused: after
    a restart it could be replayed."""
    clock = Clock()
    daemon, backend, keys = _spa_daemon(tmp_path, clock)
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    from appliance.runtime.state import StateStore

    daemon.state = StateStore(str(blocker / "state"))  # cannot be created: a file's child
    try:
        data = seal(new_message("alice", int(clock.now), "198.18.9.9,tcp/22"), keys)
        daemon._item(_spa_packet(clock, data))
        assert not backend.is_open("198.18.9.9", Step(22, "tcp"))
        assert daemon.stats.refused_unrecorded == 1
    finally:
        daemon.shutdown()


def test_a_damaged_replay_file_refuses_spa_made_before_the_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: a truncated replay file gave an empty cache that looked complete, so a
    packet captured before the restart was accepted again within its age limit."""
    clock = Clock()
    daemon, backend, keys = _spa_daemon(tmp_path, clock)
    captured = seal(new_message("alice", int(clock.now), "198.18.9.9,tcp/22"), keys)
    daemon._item(_spa_packet(clock, captured))
    assert backend.is_open("198.18.9.9", Step(22, "tcp"))
    daemon.shutdown()
    (tmp_path / "state" / "replay").write_text("")  # truncated while knockgate was down
    clock.now += 40  # the grant has expired; the packet is 40 s old, within max_age
    with caplog.at_level(logging.WARNING, logger="knockgate"):
        restarted, backend, _ = _spa_daemon(tmp_path, clock, _config_keys(daemon))
    try:
        assert "SPA packets made and TOTP steps begun before this start are refused" in caplog.text
        restarted._item(_spa_packet(clock, captured))
        assert not backend.is_open("198.18.9.9", Step(22, "tcp"))
        assert restarted.snapshot()["counters"]["spa_refused"] == 1
        fresh = seal(new_message("alice", int(clock.now) + 1, "198.18.9.9,tcp/22"), keys)
        clock.now += 1
        restarted._item(_spa_packet(clock, fresh))  # made after the start: accepted
        assert backend.is_open("198.18.9.9", Step(22, "tcp"))
    finally:
        restarted.shutdown()


def test_a_clean_stop_leaves_a_replay_file_that_is_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    daemon, _, keys = _spa_daemon(tmp_path, clock)
    daemon._item(_spa_packet(clock, seal(new_message("alice", 1000, "198.18.9.9,tcp/22"), keys)))
    daemon.shutdown()
    with caplog.at_level(logging.WARNING, logger="knockgate"):
        restarted, _, _ = _spa_daemon(tmp_path, clock, _config_keys(daemon))
    restarted.shutdown()
    assert "refused" not in caplog.text
    assert restarted.engine.untrusted_before == float("-inf")


# ----------------------------------------------------------------- a quiet log


def test_a_flood_of_first_knocks_and_resets_adds_no_info_line(
    setup: tuple[Daemon, MemoryBackend, Clock, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: "sequence reset at stage 1" was logged at info: a flood of spoofed
    knocks wrote 22 MB of log in 15 s."""
    daemon, _, clock, _ = setup
    with caplog.at_level(logging.INFO, logger="knockgate"):
        for i in range(2000):
            src = f"198.18.{100 + i // 250}.{i % 250 + 1}"
            clock.now += 0.0001
            daemon._item(Packet(clock.now, src, "198.18.0.1", "tcp", 7113, 0x02))
            daemon._item(Packet(clock.now, src, "198.18.0.1", "tcp", 9157, 0x02))  # a reset
    assert daemon.engine.counters.resets >= 2000
    assert [r.getMessage() for r in caplog.records if r.name == "knockgate.events"] == []


def test_noisy_lines_are_held_to_a_budget_and_summarised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from appliance.core.events import SequenceReset
    from appliance.runtime import logs

    now = [0.0]
    monkeypatch.setattr(logs, "noise", logs.NoiseBudget(lambda: now[0]))
    with caplog.at_level(logging.INFO, logger="knockgate"):
        for i in range(logs.NOISE_BUDGET + 250):
            logs.log_command(SequenceReset(float(i), "ssh", A, 2, 9999, "tcp"))
        logs.flush_noise()  # the window is not over: nothing yet
        now[0] = logs.NOISE_WINDOW
        logs.flush_noise()
        logs.flush_noise()  # nothing held back since: no second summary
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == logs.NOISE_BUDGET + 1
    assert lines[-1].startswith("250 more lines about knock attempts")


# ----------------------------------------------------------------- status under pressure


def test_a_status_client_that_never_reads_blocks_no_one(tmp_path: Path) -> None:
    """Regression: one client that connected and did not read blocked the status thread
    (and with it every other client); with 20 000 grants the answer is over 1 MB."""
    import socket
    import threading
    import time

    from appliance.runtime.status import SEND_TIMEOUT, StatusServer, query

    big = {
        "grants": [
            {"address": f"198.18.{i // 250}.{i % 250}", "port": "22/tcp", "expires_in": 30.0}
            for i in range(20_000)
        ]
    }

    def enqueue(item: object) -> None:  # the loop's side, answering at once
        assert isinstance(item, StatusRequest)
        threading.Thread(target=item.reply, args=(big,)).start()

    server = StatusServer(str(tmp_path / "s.sock"), enqueue)
    server.start()
    stuck = []
    try:
        for _ in range(3):  # clients that never read a byte
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(str(tmp_path / "s.sock"))
            stuck.append(sock)
        started = time.monotonic()
        answer = query(str(tmp_path / "s.sock"))
        assert len(answer["grants"]) == 20_000
        assert time.monotonic() - started < SEND_TIMEOUT  # not served after the stuck ones
    finally:
        for sock in stuck:
            sock.close()
        server.stop()


def test_a_failing_firewall_check_is_logged_once_per_streak(
    setup: tuple[Daemon, MemoryBackend, Clock, Path],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from appliance.errors import FirewallError

    daemon, backend, _, _ = setup

    def broken() -> bool:
        raise FirewallError("nft: Operation not permitted")

    with caplog.at_level(logging.WARNING, logger="knockgate"):
        monkeypatch.setattr(backend, "check", broken)
        for _ in range(30):  # thirty seconds of checks
            daemon._check_firewall()
        monkeypatch.undo()
        daemon._check_firewall()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("firewall check or repair failed")
    assert lines[1] == "firewall: check and repair work again (30 failed in a row)"


@pytest.mark.parametrize("form", ["text", "json"])
def test_a_bugs_traceback_reaches_the_log(form: str) -> None:
    """The first internal error of a handler is logged with its traceback, in both formats."""
    import io
    import json

    from appliance.config.schema import LogSettings
    from appliance.runtime.logs import configure

    stream = io.StringIO()
    configure(LogSettings(format=form), stream=stream)
    try:
        try:
            raise RuntimeError("injected fault in grant")
        except RuntimeError:
            logging.getLogger("knockgate").exception("internal error in grant")
    finally:
        configure(LogSettings())
    text = stream.getvalue()
    if form == "json":
        assert "RuntimeError: injected fault in grant" in json.loads(text)["traceback"]
    else:
        assert text.splitlines()[0].endswith("internal error in grant")
        assert "    RuntimeError: injected fault in grant" in text.splitlines()


def test_labelled_containers_are_closed_and_opened_by_their_door(tmp_path: Path) -> None:
    """A discovery item closes a labelled container's host port in the firewall; a knock on
    its door (no open.ports of its own) grants it; a reload that removes the door revokes
    and keeps it closed; the container's removal takes its rules away."""
    from appliance.services.discovery import Listed, Removed
    from appliance.services.fake import FakeRuntime
    from appliance.services.labels import Binding, ContainerFacts, Published
    from appliance.services.launcher import ServiceLauncher

    path = tmp_path / "k.yaml"
    head = f"status_socket: {tmp_path / 's.sock'}\nstate_dir: {tmp_path / 'state'}\n"
    door = "doors:\n  web:\n    knock: {sequence: [7113, 2231/udp, 9157]}\n"
    path.write_text(head + door + "    open: {duration: 30}\n")
    clock = Clock()
    backend = MemoryBackend(clock)
    launcher = ServiceLauncher(FakeRuntime(), (), "o1", clock=clock)
    loaded = load_config(str(path))
    daemon = Daemon(loaded, backend, clock=clock, wall=clock, capture=False, launcher=launcher)
    daemon.start()
    web = Step(8080, "tcp")
    facts = ContainerFacts(
        "c1",
        "shop-app-1",
        "running",
        (("knockgate.door", "web"),),
        (Published(80, "tcp", (Binding("", 8080),)),),
        ("198.18.9.2",),
    )
    try:
        daemon._item(Listed(clock(), (facts,)))
        assert backend.plan is not None and web in backend.plan.protected
        knock(daemon, clock, A, "7113", "2231/udp", "9157")
        assert backend.is_open(A, web)
        [row] = daemon.snapshot()["gated"]
        assert (row["door"], row["ports"], row["state"]) == ("web", ["8080/tcp"], "serving")
        path.write_text(head + door.replace("web:", "other:") + "    open: {duration: 30}\n")
        daemon.reload()
        assert not backend.is_open(A, web) and web in backend.plan.protected
        assert "no such door" in daemon.snapshot()["gated"][0]["problems"][0]
        daemon._item(Removed(clock(), "c1", "shop-app-1"))
        assert web not in backend.plan.protected and daemon.snapshot()["gated"] == []
    finally:
        daemon.shutdown()


def test_labelled_ports_are_closed_by_the_first_setup(tmp_path: Path) -> None:
    """Regression guard: a restart must not open a labelled container's port until
    discovery catches up; the containers are listed before the first firewall setup."""
    from appliance.services.discovery import EventStream
    from appliance.services.fake import FakeRuntime
    from appliance.services.labels import Binding, ContainerFacts, Published
    from appliance.services.launcher import ServiceLauncher

    class Source:
        def labelled(self) -> tuple[ContainerFacts, ...]:
            published = (Published(80, "tcp", (Binding("", 8080),)),)
            labels = (("knockgate.door", "web"),)
            return (ContainerFacts("c1", "app-1", "running", labels, published),)

        def inspect(self, ident: str) -> ContainerFacts | None:
            return None

        def events(self) -> EventStream:
            from appliance.errors import ContainerError

            raise ContainerError("no events in this test")

    path = tmp_path / "k.yaml"
    path.write_text(
        f"status_socket: {tmp_path / 's.sock'}\nstate_dir: {tmp_path / 'state'}\n"
        "doors:\n  web:\n    knock: {sequence: [7113, 2231/udp, 9157]}\n"
        "    open: {duration: 30}\n"
    )
    clock = Clock()
    backend = MemoryBackend(clock)
    launcher = ServiceLauncher(FakeRuntime(), (), "o1", clock=clock)
    daemon = Daemon(
        load_config(str(path)), backend, clock=clock, wall=clock, capture=False,
        launcher=launcher, labels=Source(),
    )  # fmt: skip
    daemon.start()
    try:
        assert backend.plan is not None and Step(8080, "tcp") in backend.plan.protected
        assert backend.calls.count("setup") == 1
    finally:
        daemon.shutdown()


def test_a_start_that_cannot_list_keeps_the_last_runs_labelled_ports_closed(
    tmp_path: Path,
) -> None:
    """Regression: when Docker (or the launcher) did not answer at start, the first setup
    left out the labelled containers' ports, opening them until discovery caught up."""
    from appliance.errors import ContainerError
    from appliance.services.discovery import EventStream, Listed
    from appliance.services.fake import FakeRuntime
    from appliance.services.labels import Binding, ContainerFacts, Published
    from appliance.services.launcher import ServiceLauncher

    app = ContainerFacts(
        "c1", "app-1", "running", (("knockgate.door", "web"),),
        (Published(80, "tcp", (Binding("", 8080),)),),
    )  # fmt: skip

    class Source:
        answers = True

        def labelled(self) -> tuple[ContainerFacts, ...]:
            if not self.answers:
                raise ContainerError("docker: the launcher does not answer")
            return (app,)

        def inspect(self, ident: str) -> ContainerFacts | None:
            return None

        def events(self) -> EventStream:
            raise ContainerError("no events in this test")

    path = tmp_path / "k.yaml"
    path.write_text(
        f"status_socket: {tmp_path / 's.sock'}\nstate_dir: {tmp_path / 'state'}\n"
        "doors:\n  web:\n    knock: {sequence: [7113, 2231/udp, 9157]}\n"
        "    open: {duration: 30}\n"
    )
    source = Source()
    for answers in (True, False):
        source.answers = answers
        clock = Clock()
        backend = MemoryBackend(clock)
        launcher = ServiceLauncher(FakeRuntime(), (), "o1", clock=clock)
        daemon = Daemon(
            load_config(str(path)), backend, clock=clock, wall=clock, capture=False,
            launcher=launcher, labels=source,
        )  # fmt: skip
        daemon.start()
        try:
            assert backend.plan is not None and Step(8080, "tcp") in backend.plan.protected
            if not answers:
                daemon._upkeep()  # the firewall check: nothing listed, nothing changes
                daemon._check_firewall()
                assert Step(8080, "tcp") in backend.plan.protected
                daemon._item(Listed(clock(), ()))  # listed at last: nothing labelled now
                assert Step(8080, "tcp") not in backend.plan.protected
        finally:
            daemon.shutdown()
