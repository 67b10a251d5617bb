"""The fleet (issue 14) with an in-memory store: settings, messages, and daemons that
share grants, revocations and claims through it."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.config import load_config
from appliance.config.schema import FleetSettings
from appliance.core.events import MarkSequenceUsed, Packet, SpaDigestSeen, TotpStepUsed
from appliance.core.model import Step
from appliance.errors import ConfigError
from appliance.firewall.memory import MemoryBackend
from appliance.fleet import link as link_module
from appliance.fleet.messages import (
    CLOCK_SKEW,
    ONE_TIME_CLAIM,
    FleetApply,
    FleetClaimed,
    FleetHealth,
    FleetItem,
    FleetMessage,
    Keys,
    decode,
    decode_bytes,
    decode_live,
    decode_live_bytes,
    encode_live,
    grant,
    grantable,
)
from appliance.fleet.store import FleetUnreachable, MemoryStore
from appliance.runtime import daemon as daemon_module
from appliance.runtime.daemon import Daemon
from appliance.spa.keyfile import generate_keys
from appliance.spa.wire import SpaKeys, new_message, seal

SSH = Step(22, "tcp")
A = "198.18.5.1"
B = "198.18.5.2"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


CONFIG = """\
status_socket: {dir}/status.sock
state_dir: {dir}/state
fleet:
  name: prod
  host: {host}
  redis: redis://knockgate@198.18.0.5:6379/0
  on_outage: {on_outage}
doors:
  ssh:
    knock: {{sequence: [7113, 2231/udp, 9157], seq_timeout: 5}}
    open: {{ports: [22/tcp], duration: 30}}
  close:
    knock: {{sequence: [9157, 2231/udp, 7113], seq_timeout: 5}}
    close: [ssh]
  local:
    knock: {{sequence: [5001, 5002]}}
    open: {{ports: [23/tcp], duration: 30}}
    fleet: false
  spa:
    spa:
      users:
        alice: {{key_base64: {key}, hmac_key_base64: {hmac}, ports: [2222/tcp]}}
    open: {{ports: [2222/tcp, 2223/tcp], duration: 30}}
"""


@pytest.fixture(autouse=True)
def _short_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(link_module, "BLOCK", 0.05)
    monkeypatch.setattr(link_module, "MIN_BACKOFF", 0.02)
    monkeypatch.setattr(link_module, "MAX_BACKOFF", 0.05)


class Cut:
    """One host's view of the shared store: ``cut`` makes every command fail there
    only (that host is cut off from Redis; the others still reach it)."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.cut = False

    def __getattr__(self, name: str) -> Any:
        command = getattr(self.store, name)
        if name in ("close", "keys") or not callable(command):
            return command

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.cut:
                raise FleetUnreachable("cut off (test)")
            result = command(*args, **kwargs)
            if self.cut:  # cut while waiting in a read
                raise FleetUnreachable("cut off (test)")
            return result

        return call


class Fleet:
    """Daemons on one clock sharing one memory store."""

    def __init__(self, tmp_path: Path, on_outage: str = "refuse") -> None:
        self.tmp_path = tmp_path
        self.clock = Clock()
        self.store = MemoryStore("prod")
        self.keys = generate_keys()
        self.on_outage = on_outage
        self.daemons: dict[str, tuple[Daemon, MemoryBackend]] = {}
        self.views: dict[str, Cut] = {}

    def cut(self, host: str, cut: bool = True) -> None:
        self.views[host].cut = cut
        self.store.wake()
        if cut:
            daemon = self.daemons[host][0]
            assert self.pump(lambda: daemon.fleet is not None and not daemon.fleet.reachable)

    def start(self, host: str) -> tuple[Daemon, MemoryBackend]:
        directory = self.tmp_path / host
        directory.mkdir(exist_ok=True)
        path = directory / "k.yaml"
        key, hmac_key = self.keys
        path.write_text(
            CONFIG.format(
                dir=directory, host=host, key=key, hmac=hmac_key, on_outage=self.on_outage
            )
        )
        backend = MemoryBackend(self.clock)
        daemon = Daemon(
            load_config(str(path)), backend, clock=self.clock, wall=self.clock, capture=False
        )
        view = self.views.setdefault(host, Cut(self.store))
        daemon.fleet_store = lambda _settings: view  # type: ignore[assignment,return-value]
        daemon.start()
        self.daemons[host] = (daemon, backend)
        self.pump(lambda: (daemon.fleet is not None and daemon.fleet.reachable) or self.store.down)
        return daemon, backend

    def stop(self, host: str) -> None:
        daemon, _ = self.daemons.pop(host)
        daemon.shutdown()

    def pump(self, done: Callable[[], bool], timeout: float = 3.0) -> bool:
        """Run every daemon's queue until ``done`` (the links work on their threads)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for daemon, _ in list(self.daemons.values()):
                daemon._drain_queue()
            if done():
                return True
            time.sleep(0.005)
        return False

    def knock(self, host: str, src: str, *steps: str) -> None:
        daemon, _ = self.daemons[host]
        for step in steps:
            port, _, proto = step.partition("/")
            self.clock.now += 0.1
            daemon._item(Packet(self.clock.now, src, "198.18.0.1", proto or "tcp", int(port), 2))

    def spa(self, host: str, data: bytes, src: str = A) -> None:
        daemon, _ = self.daemons[host]
        daemon._item(Packet(self.clock.now, src, "198.18.0.1", "udp", 62201, 0, data))

    def packet(self) -> bytes:
        return seal(
            new_message("alice", int(self.clock.now), f"{A},tcp/2222"),
            SpaKeys.from_base64(*self.keys),
        )

    def close(self) -> None:
        for host in list(self.daemons):
            self.stop(host)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    group = Fleet(tmp_path)
    try:
        yield group
    finally:
        group.close()


# ----------------------------------------------------------------- settings


def _load(tmp_path: Path, text: str) -> FleetSettings | None:
    path = tmp_path / "k.yaml"
    path.write_text(text)
    return load_config(str(path)).config.settings.fleet


DOORS = "doors:\n  ssh:\n    knock: {sequence: [7113, 9157]}\n    open: {ports: [22/tcp]}\n"


def test_fleet_settings_are_read_with_defaults(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    settings = _load(
        tmp_path,
        f"fleet:\n  name: prod\n  host: web-1\n  redis: redis://knockgate@198.18.0.5:6379/0\n"
        f"  password_file: {secret}\n" + DOORS,
    )
    assert settings is not None
    assert (settings.name, settings.host, settings.on_outage) == ("prod", "web-1", "refuse")
    assert settings.password_file == str(secret)
    assert settings.shares("ssh")
    assert _load(tmp_path, DOORS) is None


@pytest.mark.parametrize(
    ("fleet", "message"),
    [
        (
            "{name: prod, redis: 'redis://u:pw@198.18.0.5/0'}",
            "fleet.redis: the URL holds a password",
        ),
        (
            "{name: prod, redis: 'http://198.18.0.5'}",
            "fleet.redis: 'http://198.18.0.5' is not a Redis URL",
        ),
        ("{redis: 'redis://198.18.0.5'}", "fleet.name: missing"),
        (
            "{name: 'a{b}', redis: 'redis://198.18.0.5'}",
            "fleet.name: 'a{b}' is not a fleet or host name",
        ),
        (
            "{name: prod, redis: 'redis://198.18.0.5', on_outage: maybe}",
            "fleet.on_outage: 'maybe' is not allowed",
        ),
        (
            "{name: prod, redis: 'redis://198.18.0.5', password_file: /nonexistent/kg}",
            "fleet.password_file: /nonexistent/kg is not a readable file",
        ),
        (
            "{name: prod, redis: 'redis://198.18.0.5', tls: {ca: /etc/hostname}}",
            "fleet.tls: TLS needs a rediss:// URL",
        ),
    ],
)
def test_bad_fleet_settings_name_the_line_and_key(tmp_path: Path, fleet: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, f"fleet: {fleet}\n" + DOORS)
    assert f"k.yaml:1: {message}" in str(error.value)


def test_a_door_may_stay_local_or_start_its_service(tmp_path: Path) -> None:
    settings = _load(
        tmp_path,
        "fleet: {name: prod, redis: 'redis://198.18.0.5'}\n" + DOORS + "    fleet: false\n"
        "  web:\n    knock: {sequence: [1, 2]}\n    open: {ports: [80/tcp]}\n"
        "    fleet: {start_services: true}\n",
    )
    assert settings is not None
    assert settings.local_doors == frozenset({"ssh"})
    assert settings.start_services == frozenset({"web"})
    with pytest.raises(ConfigError, match=r"k.yaml:6: doors.ssh.fleet: 'sometimes' is not allowed"):
        _load(
            tmp_path,
            "fleet: {name: prod, redis: 'redis://198.18.0.5'}\n" + DOORS + "    fleet: sometimes\n",
        )


# ----------------------------------------------------------------- messages


def test_messages_round_trip_and_garbage_is_refused() -> None:
    message = grant("ssh", "2001:db8::1", 1234.5, "web-1", (SSH, Step(53, "udp")))
    assert decode(message.fields()) == message
    assert decode_live(message.field, encode_live(message)) == message
    assert decode({**message.fields(), "address": "198.18.0.1; flush ruleset"}) is None
    assert decode({**message.fields(), "door": "../x"}) is None
    assert decode({**message.fields(), "deadline": "nan"}) is None
    assert decode({**message.fields(), "kind": "open"}) is None
    assert decode_live("ssh|198.18.0.1", "12 web-1") is None
    assert decode({**message.fields(), "ports": "22/tcp,99999/tcp"}) is None
    assert decode({**message.fields(), "ports": "-"}) is None  # a grant opens something


def test_claim_keys_share_the_local_caches_identity() -> None:
    keys = Keys("prod")
    records = (
        SpaDigestSeen(0, "spa", A, b"\x01\x02", 1120.0),
        TotpStepUsed(0, "t", A, 7, 1090.0),
        MarkSequenceUsed(0, "once", A, "/etc/knockgate/once", 3, 40),
        SpaDigestSeen(0, "spa", A, b"\x03", 900.0),  # already past: kept a second anyway
    )
    assert keys.claims(records, 1000.0) == (  # + CLOCK_SKEW: a host behind is covered too
        ("kg:{prod}:spa:0102", 120.0 + CLOCK_SKEW),
        ("kg:{prod}:totp:t:7", 90.0 + CLOCK_SKEW),
        ("kg:{prod}:onetime:once:3", ONE_TIME_CLAIM),
        ("kg:{prod}:spa:03", 1.0),
    )


# ----------------------------------------------------------------- daemons


def test_a_knock_on_one_host_opens_the_others_with_the_same_deadline(fleet: Fleet) -> None:
    a, wall_a = fleet.start("a")
    b, wall_b = fleet.start("b")
    fleet.knock("a", A, "7113", "2231/udp", "9157")
    assert wall_a.is_open(A, SSH)
    assert fleet.pump(lambda: wall_b.is_open(A, SSH))
    assert wall_b.table[(A, SSH)] == pytest.approx(wall_a.table[(A, SSH)], abs=0.01)
    assert not wall_b.is_open(B, SSH)
    assert b.fleet is not None and b.fleet.applied == 1
    assert a.fleet is not None and a.fleet.applied == 0  # its own grant is not applied again
    assert b.snapshot()["fleet"]["peers"] == {"a": 0.0}
    # A close knock on B closes A too.
    fleet.knock("b", A, "9157", "2231/udp", "7113")
    assert not wall_b.is_open(A, SSH)
    assert fleet.pump(lambda: not wall_a.is_open(A, SSH))


def test_a_local_door_is_neither_published_nor_applied(fleet: Fleet) -> None:
    a, _ = fleet.start("a")
    _, wall_b = fleet.start("b")
    fleet.knock("a", A, "5001", "5002")
    fleet.knock("a", A, "7113", "2231/udp", "9157")
    assert fleet.pump(lambda: wall_b.is_open(A, SSH))
    assert not wall_b.is_open(A, Step(23, "tcp"))
    assert fleet.pump(lambda: a.fleet is not None and a.fleet.link.published == 1)


def test_a_host_started_later_catches_up_on_live_grants_only(fleet: Fleet) -> None:
    fleet.start("a")
    fleet.knock("a", A, "7113", "2231/udp", "9157")
    fleet.knock("a", B, "7113", "2231/udp", "9157")
    fleet.pump(lambda: fleet.store.last_id() == "2-0")
    fleet.clock.now += 10
    _, wall_c = fleet.start("c")
    assert fleet.pump(lambda: wall_c.is_open(A, SSH) and wall_c.is_open(B, SSH))
    assert wall_c.table[(A, SSH)] == pytest.approx(fleet.clock.now + 30 - 10 - 0.3, abs=0.05)
    fleet.stop("c")
    fleet.clock.now += 25  # past both deadlines
    _, wall_c = fleet.start("c")
    fleet.pump(lambda: False, timeout=0.2)
    assert wall_c.table == {}


def test_an_spa_packet_used_on_one_host_is_refused_on_another(fleet: Fleet) -> None:
    a, wall_a = fleet.start("a")
    b, wall_b = fleet.start("b")
    port = Step(2222, "tcp")
    data = fleet.packet()
    fleet.spa("a", data)
    assert fleet.pump(lambda: wall_a.is_open(A, port))  # the claim answered, then the grant
    assert fleet.pump(lambda: wall_b.is_open(A, port))  # the fleet grant reaches B
    assert not wall_b.is_open(A, Step(2223, "tcp"))  # alice may open 2222 only, there too
    wall_b.table.clear()
    fleet.spa("b", data)  # the same bytes, replayed to B
    assert fleet.pump(lambda: b.fleet is not None and b.fleet.claims["taken"] == 1)
    assert not wall_b.is_open(A, port)
    assert a.fleet is not None and a.fleet.claims["claimed"] == 1


def test_refuse_on_outage_refuses_spa_but_sequences_still_open(fleet: Fleet) -> None:
    a, wall_a = fleet.start("a")
    _, wall_b = fleet.start("b")
    fleet.store.down = True
    fleet.store.wake()
    assert fleet.pump(lambda: a.fleet is not None and not a.fleet.reachable)
    fleet.spa("a", fleet.packet())
    assert fleet.pump(lambda: a.fleet is not None and a.fleet.claims["unreachable"] == 1)
    assert not wall_a.is_open(A, Step(2222, "tcp"))
    fleet.knock("a", A, "7113", "2231/udp", "9157")
    assert wall_a.is_open(A, SSH)
    assert fleet.pump(lambda: a.snapshot()["fleet"]["backlog"] == 1)
    # Back: the grant made during the outage reaches B (it is still live).
    fleet.store.down = False
    assert fleet.pump(lambda: wall_b.is_open(A, SSH) and a.fleet is not None and a.fleet.reachable)


def test_local_on_outage_opens_spa_on_the_local_cache(tmp_path: Path) -> None:
    group = Fleet(tmp_path, on_outage="local")
    try:
        a, wall_a = group.start("a")
        group.store.down = True
        group.store.wake()
        assert group.pump(lambda: a.fleet is not None and not a.fleet.reachable)
        group.spa("a", group.packet())
        assert group.pump(lambda: wall_a.is_open(A, Step(2222, "tcp")))
        assert a.fleet is not None and a.fleet.claims["local"] == 1
    finally:
        group.close()


def test_a_claim_that_never_answers_counts_as_unreachable(fleet: Fleet) -> None:
    a, wall_a = fleet.start("a")
    assert a.fleet is not None
    a.fleet.link.claim = lambda ticket, claims: None  # type: ignore[method-assign]
    fleet.spa("a", fleet.packet())
    assert a.fleet.pending
    fleet.clock.now += 2.5
    a._upkeep()
    assert not a.fleet.pending
    assert a.fleet.claims["unreachable"] == 1
    assert not wall_a.is_open(A, Step(2222, "tcp"))


# ----------------------------------------------------------------- status, metrics


def test_status_and_metrics_show_the_fleets_health(fleet: Fleet) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from appliance.runtime.metrics_server import MetricsHub
    from appliance.runtime.status import fleet_lines

    a, _ = fleet.start("a")
    fleet.start("b")
    fleet.knock("b", A, "7113", "2231/udp", "9157")
    assert fleet.pump(lambda: a.fleet is not None and a.fleet.applied == 1)
    fleet.store.down = True
    fleet.store.wake()
    assert fleet.pump(lambda: a.fleet is not None and not a.fleet.reachable)
    block = a.snapshot()["fleet"]
    assert block["reachable"] is False and "memory store down" in block["last_error"]
    lines = fleet_lines(block)
    assert lines[0].startswith(
        "fleet prod: this host a, redis://knockgate@198.18.0.5:6379/0 UNREACHABLE"
    )
    assert "peers seen: b (" in lines[2]
    assert fleet_lines(None) == []

    snapshot = a.metrics_snapshot()
    hub = MetricsHub(lambda item: item.reply(snapshot), clock=lambda: snapshot.taken)
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(hub.exposition().decode())
        for s in family.samples
    }
    assert got[("knockgate_fleet_reachable", ())] == 0
    assert got[("knockgate_fleet_applied_total", (("kind", "grant"),))] == 1
    assert got[("knockgate_fleet_claims_total", (("outcome", "taken"),))] == 0


def test_a_daemon_without_a_fleet_does_not_import_redis() -> None:
    import subprocess
    import sys

    code = "import sys, appliance.runtime.daemon, appliance.runtime.fleet; print('redis' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_a_reload_applies_door_keys_at_once_and_group_settings_at_the_next_start(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = fleet.start("a")
    _, wall_b = fleet.start("b")
    path = Path(a.config.path)
    path.write_text(
        path.read_text().replace(
            "    open: {ports: [22/tcp], duration: 30}\n",
            "    open: {ports: [22/tcp], duration: 30}\n    fleet: false\n",
        )
    )
    a.reload()
    assert a.config.settings.fleet is not None and a.config.settings.fleet.local_doors == {
        "local",
        "ssh",
    }
    fleet.knock("a", A, "7113", "2231/udp", "9157")
    fleet.pump(lambda: False, timeout=0.2)
    assert not wall_b.is_open(A, SSH)
    path.write_text(path.read_text().replace("on_outage: refuse", "on_outage: local"))
    warnings: list[str] = []
    monkeypatch.setattr(
        daemon_module.log, "warning", lambda text, *args: warnings.append(text % args)
    )
    a.reload()
    assert "fleet: the new fleet settings take effect at the next start" in warnings


def test_an_outage_backlog_publishes_only_grants_still_live(fleet: Fleet) -> None:
    a, wall_a = fleet.start("a")
    _, wall_b = fleet.start("b")
    fleet.store.down = True
    fleet.store.wake()
    assert fleet.pump(lambda: a.fleet is not None and not a.fleet.reachable)
    fleet.knock("a", A, "7113", "2231/udp", "9157")
    assert fleet.pump(lambda: a.fleet is not None and a.fleet.link.backlog == 1)
    fleet.clock.now += 31  # its deadline passes during the outage
    fleet.knock("a", B, "7113", "2231/udp", "9157")
    fleet.store.down = False
    assert fleet.pump(lambda: wall_b.is_open(B, SSH))
    assert not wall_b.is_open(A, SSH)
    assert fleet.pump(lambda: a.fleet is not None and a.fleet.link.published == 1)
    assert a.fleet is not None and a.fleet.link.backlog == 0
    assert wall_a.is_open(B, SSH)


def test_a_fleet_grant_starts_a_service_only_where_the_door_says_so(tmp_path: Path) -> None:
    import socket

    from appliance.services.fake import FakeRuntime
    from appliance.services.launcher import ServiceLauncher

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    clock = Clock()
    store = MemoryStore("prod")
    web = Step(8080, "tcp")
    group = Fleet(tmp_path)
    group.clock = clock
    started: dict[str, tuple[Daemon, MemoryBackend, FakeRuntime]] = {}
    try:
        for host, door_fleet in (
            ("a", ""),
            ("b", "    fleet: {start_services: true}\n"),
            ("c", ""),
        ):
            path = tmp_path / f"{host}.yaml"
            path.write_text(
                f"status_socket: {tmp_path / host}.sock\nstate_dir: {tmp_path / host}-state\n"
                f"fleet: {{name: prod, host: {host}, redis: 'redis://198.18.0.5'}}\n"
                "services:\n"
                f"  web: {{image: 'web:test', container_port: {port}, host_port: 8080,"
                " ready: {tcp: true, timeout: 2}}\n"
                "doors:\n  web:\n    knock: {sequence: [7113, 2231/udp, 9157]}\n"
                "    service: {name: web, duration: 30}\n" + door_fleet
            )
            loaded = load_config(str(path))
            runtime = FakeRuntime()
            launcher = ServiceLauncher(runtime, loaded.config.services, f"o-{host}", clock=clock)
            backend = MemoryBackend(clock)
            daemon = Daemon(
                loaded, backend, clock=clock, wall=clock, capture=False, launcher=launcher
            )
            daemon.fleet_store = lambda _settings: store
            daemon.start()
            started[host] = (daemon, backend, runtime)
            group.daemons[host] = (daemon, backend)
        assert group.pump(
            lambda: all(d.fleet and d.fleet.reachable for d, _, _ in started.values())
        )
        group.knock("a", A, "7113", "2231/udp", "9157")
        assert group.pump(
            lambda: started["a"][1].is_open(A, web) and started["b"][1].is_open(A, web)
        )
        assert "create" in started["b"][2].calls
        group.pump(lambda: False, timeout=0.3)
        assert not started["c"][1].is_open(A, web)
        assert started["c"][2].calls.count("create") == 0
        assert started["c"][0].fleet is not None and started["c"][0].fleet.skipped == 1
    finally:
        group.close()
        listener.close()


# ----------------------------------------------------------------- review findings (R2)

OPEN = ("7113", "2231/udp", "9157")
CLOSE = ("9157", "2231/udp", "7113")


def test_a_close_made_elsewhere_while_cut_off_reaches_this_host_when_it_reconnects(
    fleet: Fleet,
) -> None:
    _, wall_a = fleet.start("a")
    _, wall_b = fleet.start("b")
    fleet.knock("a", A, *OPEN)
    assert fleet.pump(lambda: wall_b.is_open(A, SSH))
    fleet.cut("a")
    fleet.knock("b", A, *CLOSE)
    assert not wall_b.is_open(A, SSH)
    fleet.pump(lambda: False, timeout=0.2)
    assert wall_a.is_open(A, SSH)  # cut off: it cannot know yet
    fleet.cut("a", False)
    assert fleet.pump(lambda: not wall_a.is_open(A, SSH))


def test_a_close_made_here_during_an_outage_closes_everywhere(fleet: Fleet) -> None:
    a, wall_a = fleet.start("a")
    _, wall_b = fleet.start("b")
    fleet.knock("a", A, *OPEN)
    assert fleet.pump(lambda: wall_b.is_open(A, SSH))
    fleet.cut("a")
    fleet.knock("a", A, *CLOSE)
    assert not wall_a.is_open(A, SSH)
    fleet.cut("a", False)
    assert fleet.pump(lambda: not wall_b.is_open(A, SSH))
    assert fleet.pump(lambda: a.fleet is not None and a.fleet.reachable)
    fleet.pump(lambda: False, timeout=0.2)
    assert not wall_a.is_open(A, SSH)  # its own grant is not caught up again


def test_a_trimmed_stream_position_reconciles_on_the_live_grants(fleet: Fleet) -> None:
    a, wall_a = fleet.start("a")
    b, wall_b = fleet.start("b")
    fleet.knock("a", A, *OPEN)
    fleet.knock("a", B, *OPEN)
    assert fleet.pump(lambda: wall_b.is_open(A, SSH) and wall_b.is_open(B, SSH))
    fleet.cut("b")
    fleet.knock("a", A, *CLOSE)
    assert fleet.pump(lambda: a.fleet is not None and a.fleet.link.published == 3)
    fleet.store.trim(0)  # B's position is gone
    fleet.cut("b", False)
    assert fleet.pump(lambda: not wall_b.is_open(A, SSH))
    assert wall_b.is_open(B, SSH)  # still live
    assert b.fleet is not None and b.snapshot()["fleet"]["reconciled_closes"] == 1
    assert not wall_a.is_open(A, SSH)


def test_a_non_utf8_entry_is_skipped_and_counted_and_the_fleet_goes_on(fleet: Fleet) -> None:
    _, wall_a = fleet.start("a")
    b, wall_b = fleet.start("b")
    fleet.store.inject({b"kind": b"grant", b"door": b"ssh\xff", b"address": b"\xc3("})
    fleet.store.inject({b"\xff": b"\xfe"})
    fleet.knock("a", A, *OPEN)
    assert fleet.pump(lambda: wall_b.is_open(A, SSH))
    assert b.fleet is not None and b.snapshot()["fleet"]["refused"]["malformed"] == 2
    assert b.fleet.reachable
    # The same bytes in the live grants: a host started later still comes up.
    fleet.store.inject_live(b"ssh|\xff", b"\xff\xfe")
    c, wall_c = fleet.start("c")
    assert fleet.pump(lambda: wall_c.is_open(A, SSH))
    assert c.fleet is not None and c.fleet.reachable
    assert c.snapshot()["fleet"]["refused"]["malformed"] == 1
    assert wall_a.is_open(A, SSH)


@pytest.mark.parametrize(
    "address",
    [
        "fe80::1%eth0\nforged log line",
        "fe80::1%eth0",
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "ff02::1",
        "127.0.0.1",
        "::1",
        "::ffff:198.18.0.1",
        "240.0.0.1",
        "198.018.0.1",
        "2001:DB8::1",
    ],
)
def test_hostile_addresses_from_the_fleet_are_refused(address: str) -> None:
    message = grant("ssh", A, 1234.5, "web-1", (SSH,))
    assert decode({**message.fields(), "address": address}) is None


@given(
    st.dictionaries(
        st.sampled_from(
            [b"kind", b"door", b"address", b"deadline", b"origin", b"id", b"ports", b"made_at"]
        )
        | st.binary(max_size=8),
        st.binary(max_size=40)
        | st.sampled_from([b"grant", b"revoke", b"ssh", b"198.18.0.1", b"22/tcp", b"1e400"]),
        max_size=9,
    )
)
def test_decode_never_raises_on_hostile_bytes(fields: dict[bytes, bytes]) -> None:
    message = decode_bytes(fields)
    if message is not None:
        assert grantable(message.address) == message.address
        assert math.isfinite(message.deadline) and math.isfinite(message.made_at)


@given(st.binary(max_size=40), st.binary(max_size=80))
def test_decode_live_never_raises_on_hostile_bytes(field: bytes, value: bytes) -> None:
    decode_live_bytes(field, value)


def _arrive(fleet: Fleet, host: str, message: FleetMessage) -> None:
    daemon, _ = fleet.daemons[host]
    fleet.store.publish(message, fleet.clock.now)
    fleet.pump(lambda: False, timeout=0.15)
    assert daemon.fleet is not None


def test_a_fleet_grant_lasts_no_longer_than_this_hosts_door_allows(fleet: Fleet) -> None:
    from appliance.runtime.metrics_server import _fleet_families

    b, wall_b = fleet.start("b")
    now = fleet.clock.now
    _arrive(fleet, "b", grant("ssh", A, now + 10 * 365 * 86_400, "x", (SSH,)))
    assert wall_b.table[(A, SSH)] == pytest.approx(now + 30 + 2)  # duration + CAP_SLACK
    _arrive(fleet, "b", grant("ssh", B, now - 5, "x", (SSH,)))  # a clock ahead, or late
    assert not wall_b.is_open(B, SSH)
    refused = b.snapshot()["fleet"]["refused"]
    assert (refused["capped"], refused["expired"]) == (1, 1)
    from appliance.runtime.status import fleet_lines

    assert "  refused from the fleet: capped 1, expired 1" in fleet_lines(b.snapshot()["fleet"])
    assert b.fleet is not None
    families = list(_fleet_families(b.fleet.numbers()))
    (family,) = [f for f in families if f.name == "knockgate_fleet_refused"]
    got = {s.labels["reason"]: s.value for s in family.samples}
    assert got["capped"] == 1 and got["expired"] == 1 and got["malformed"] == 0


def test_a_fleet_grant_for_this_hosts_own_address_is_refused(fleet: Fleet) -> None:
    from appliance.capture.host import HostState

    b, wall_b = fleet.start("b")
    b.host = HostState(frozenset({"198.18.0.1"}), ())
    _arrive(fleet, "b", grant("ssh", "198.18.0.1", fleet.clock.now + 20, "x", (SSH,)))
    assert wall_b.table == {}
    assert b.snapshot()["fleet"]["refused"]["own_address"] == 1


def test_a_knock_waiting_for_its_claim_is_refused_when_its_door_changes_in_a_reload(
    fleet: Fleet,
) -> None:
    a, wall_a = fleet.start("a")
    assert a.fleet is not None
    asked: list[int] = []
    a.fleet.link.claim = lambda ticket, claims: asked.append(ticket)  # type: ignore[method-assign]
    fleet.spa("a", fleet.packet())
    assert a.fleet.pending and asked
    path = Path(a.config.path)
    path.write_text(path.read_text().replace("2223/tcp], duration: 30", "2223/tcp], duration: 60"))
    a.reload()
    assert not a.fleet.pending
    a.fleet.item(FleetClaimed(asked[0], "claimed"))  # the answer, too late
    assert wall_a.table == {}


def test_a_store_that_answers_ping_but_refuses_xread_is_one_warning_not_a_storm() -> None:
    store = MemoryStore("prod")
    store.failing = {"XREAD"}
    items: list[object] = []
    link = link_module.FleetLink("a", store, items.append, block=0.02)
    link_module.MIN_BACKOFF, link_module.MAX_BACKOFF = 0.02, 0.3
    link.start()
    try:
        time.sleep(1.0)
    finally:
        link.stop()
    assert [type(item).__name__ for item in items] == ["FleetHealth"]
    assert store.calls["PING"] <= 12  # 0.02 doubling to 0.3, jittered: not 50 in a second


def test_a_grant_queued_during_an_outage_does_not_reopen_after_a_later_close(
    fleet: Fleet,
) -> None:
    a, wall_a = fleet.start("a")
    _, wall_b = fleet.start("b")
    fleet.knock("a", A, *OPEN)
    assert fleet.pump(lambda: wall_b.is_open(A, SSH))
    fleet.cut("a")
    fleet.knock("a", A, *OPEN)  # again: queued, A is cut off
    fleet.clock.now += 1
    fleet.knock("b", A, *CLOSE)  # a later close, made on B meanwhile
    fleet.cut("a", False)
    assert fleet.pump(lambda: not wall_a.is_open(A, SSH))  # the later close reaches A
    fleet.pump(lambda: False, timeout=0.2)
    assert not wall_b.is_open(A, SSH)  # and the older grant does not reopen B
    assert a.snapshot()["fleet"]["refused"]["stale"] == 1
    assert a.fleet is not None and a.fleet.link.backlog == 0


def test_claims_do_not_wait_behind_the_backlog(fleet: Fleet) -> None:
    a, _ = fleet.start("a")
    assert a.fleet is not None
    slow = threading.Event()
    publish = fleet.store.publish

    def slowly(message: FleetMessage, now: float) -> None:
        slow.wait(0.02)
        publish(message, now)

    fleet.store.publish = slowly  # type: ignore[method-assign]
    for _ in range(100):  # two seconds of publishes
        fleet.knock("a", A, *OPEN)
    answers: list[FleetItem] = []
    a.fleet.link.enqueue = answers.append
    started = time.monotonic()
    a.fleet.link.claim(99, (("kg:{prod}:spa:01", 10.0),))
    while not answers and time.monotonic() - started < 3:
        time.sleep(0.005)
    assert answers and time.monotonic() - started < 0.5
    assert answers[0] == FleetClaimed(99, "claimed")


def test_peers_are_bounded(fleet: Fleet) -> None:
    b, _ = fleet.start("b")
    assert b.fleet is not None
    for number in range(200):
        b.fleet.item(FleetApply(grant("nodoor", A, fleet.clock.now + 5, f"h{number}", (SSH,))))
    assert len(b.fleet.peers) == 64 and "h199" in b.fleet.peers


def test_a_reconnect_does_not_catch_up_this_hosts_own_grants(fleet: Fleet) -> None:
    a, _ = fleet.start("a")
    fleet.start("b")
    fleet.knock("a", A, *OPEN)
    assert fleet.pump(lambda: a.fleet is not None and a.fleet.link.published == 1)
    fleet.cut("a")
    fleet.cut("a", False)
    assert fleet.pump(lambda: a.fleet is not None and a.fleet.reachable)
    fleet.pump(lambda: False, timeout=0.2)
    assert a.fleet is not None and a.fleet.applied == 0
    assert "a" not in a.fleet.peers
    assert not [e for e in a.events.recent() if "fleet from a" in str(e.as_dict())]


def test_stop_returns_in_time_with_the_store_blackholed() -> None:
    class Blackhole(MemoryStore):
        def ping(self) -> None:
            time.sleep(30)

    link = link_module.FleetLink("a", Blackhole("prod"), lambda item: None)
    link.start()
    time.sleep(0.05)
    started = time.monotonic()
    link.stop(timeout=1.0)
    assert time.monotonic() - started < 1.3


# ----------------------------------------------------------------- the Redis client


def _settings(**changes: Any) -> FleetSettings:
    base: dict[str, Any] = {"name": "prod", "host": "a", "redis": "redis://knockgate@127.0.0.1:1/0"}
    return FleetSettings(**{**base, **changes})


def test_sentinel_with_rediss_uses_tls_for_the_master_and_the_sentinels(tmp_path: Path) -> None:
    import redis.sentinel

    from appliance.config.schema import FleetSentinel, FleetTls
    from appliance.fleet.redis_store import make_client

    ca = tmp_path / "ca.pem"
    ca.write_text("")
    sentinel = FleetSentinel("mymaster", (("198.18.0.6", 26379),))
    for tls in (FleetTls(ca=str(ca), cert=None, key=None), None):
        client = make_client(
            _settings(redis="rediss://knockgate@198.18.0.5/0", sentinel=sentinel, tls=tls),
            "pw",
            1.0,
        )
        pool = client.connection_pool
        assert pool.connection_class is redis.sentinel.SentinelManagedSSLConnection
        sentinels = getattr(pool, "proxy", pool).sentinel_manager.sentinels  # redis-py 5 | 4
        assert sentinels[0].connection_pool.connection_class is redis.connection.SSLConnection
        if tls is not None:
            assert pool.connection_kwargs["ssl_ca_certs"] == str(ca)
            assert sentinels[0].connection_pool.connection_kwargs["ssl_ca_certs"] == str(ca)
    plain = make_client(_settings(sentinel=sentinel), "pw", 1.0)
    assert plain.connection_pool.connection_class is redis.sentinel.SentinelManagedConnection


def test_a_cluster_that_cannot_be_reached_does_not_stop_the_start() -> None:
    from appliance.fleet.redis_store import RedisStore

    store = RedisStore(_settings(cluster=True, claim_timeout=0.2), 0.1)  # connects lazily
    with pytest.raises(FleetUnreachable, match="PING"):
        store.ping()
    store.close()


def test_a_redis_password_never_shows_in_a_config_error(tmp_path: Path) -> None:
    for url in (
        "redis://u:s3cret@198.18.0.5:99999/0",
        "http://u:s3cret@198.18.0.5/",
        "redis://kg:s3cr/et@198.18.0.5:6379",  # urlsplit reads 's3cr' as the port
        "redis://kg:s3cr#et@198.18.0.5:6379",
        "redis://kg:s3cr?et@198.18.0.5:6379",
    ):
        with pytest.raises(ConfigError) as error:
            _load(tmp_path, f"fleet: {{name: prod, redis: '{url}'}}\n" + DOORS)
        assert "s3cr" not in str(error.value)
        assert "the URL holds a password" in str(error.value)
    for url in ("redis://s3cr/et@198.18.0.5:6379", "redis://s3cret@198.18.0.5:99999/0"):
        with pytest.raises(ConfigError) as error:  # a password given as the user name
            _load(tmp_path, f"fleet: {{name: prod, redis: '{url}'}}\n" + DOORS)
        assert "s3cr" not in str(error.value) and "is not a Redis URL" in str(error.value)
        assert "'redis://***@198.18.0.5:" in str(error.value)


def test_a_password_file_readable_by_others_is_warned_about(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o644)
    path = tmp_path / "k.yaml"
    path.write_text(
        f"fleet: {{name: prod, redis: 'redis://198.18.0.5', password_file: {secret}}}\n" + DOORS
    )
    warnings = load_config(str(path)).warnings
    assert any("readable by every user" in w for w in warnings)
    for mode in (0o600, 0o640):  # the shipped deployments use 0640 / 0440 with a group
        secret.chmod(mode)
        assert not any("readable by every" in w for w in load_config(str(path)).warnings)


def test_a_grant_made_during_an_outage_after_a_close_elsewhere_leaves_the_fleet_agreeing(
    fleet: Fleet,
) -> None:
    a, wall_a = fleet.start("a")
    _, wall_b = fleet.start("b")
    fleet.knock("a", A, *OPEN)
    assert fleet.pump(lambda: wall_b.is_open(A, SSH))
    fleet.cut("a")
    fleet.knock("b", A, *CLOSE)
    fleet.clock.now += 1
    fleet.knock("a", A, *CLOSE)
    fleet.knock("a", A, *OPEN)  # made after B's close; the clocks cannot tell
    fleet.cut("a", False)
    assert fleet.pump(lambda: not wall_a.is_open(A, SSH))  # B's close closes it here
    assert fleet.pump(lambda: a.fleet is not None and a.fleet.link.backlog == 0)
    fleet.pump(lambda: False, timeout=0.2)
    assert not wall_b.is_open(A, SSH)  # and it is not published: closed everywhere
    assert a.snapshot()["fleet"]["refused"]["stale"] == 1


def test_the_reader_hands_the_loop_a_bounded_number_of_applies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(link_module, "IN_FLIGHT", 5)
    store = MemoryStore("prod")
    items: list[FleetItem] = []
    link = link_module.FleetLink("a", store, items.append, wall=lambda: 1000.0, block=0.02)
    link.start()
    try:
        deadline = time.monotonic() + 3
        while not any(isinstance(item, FleetHealth) for item in items):  # connected first:
            assert time.monotonic() < deadline  # what is published later is followed
            time.sleep(0.005)
        for number in range(50):
            store.publish(grant("ssh", A, 2000.0, f"h{number}", (SSH,)), 1000.0)
        time.sleep(0.3)
        assert sum(isinstance(item, FleetApply) for item in items) == 5
        for _ in range(5):
            link.applied()
        time.sleep(0.3)
        assert sum(isinstance(item, FleetApply) for item in items) == 10
    finally:
        link.stop()


def test_a_daemon_with_cluster_true_starts_with_redis_down(tmp_path: Path) -> None:
    path = tmp_path / "k.yaml"
    path.write_text(
        f"status_socket: {tmp_path}/status.sock\nstate_dir: {tmp_path}/state\n"
        "fleet: {name: prod, host: a, redis: 'redis://knockgate@127.0.0.1:1/0', cluster: true,"
        " claim_timeout: 0.2}\n" + DOORS
    )
    clock = Clock()
    daemon = Daemon(
        load_config(str(path)), MemoryBackend(clock), clock=clock, wall=clock, capture=False
    )
    daemon.start()
    try:
        assert daemon.fleet is not None
        deadline = time.monotonic() + 5
        while daemon.fleet.last_error == "" and time.monotonic() < deadline:
            daemon._drain_queue()
            time.sleep(0.02)
        assert not daemon.fleet.reachable
        assert "PING" in daemon.fleet.last_error
    finally:
        daemon.shutdown()


def test_status_shows_redis_error_text_without_control_characters() -> None:
    """Redis's error words reach the terminal without escapes or line breaks."""
    from appliance.runtime.status import fleet_lines

    block = {"name": "prod", "host": "a", "redis": "redis://kg@198.18.0.5:6379/0"}
    block["last_error"] = "ERR bad\n2026 opened door ssh\x1b[2J"
    (error,) = [line for line in fleet_lines(block) if "last error" in line]
    assert error == "  last error: ERR bad?2026 opened door ssh?[2J"


# ----------------------------------------------------------------- re-check (fix2)

C = "198.18.5.3"


def test_a_close_and_reopen_here_during_an_outage_leave_the_fleet_open(fleet: Fleet) -> None:
    a, wall_a = fleet.start("a")
    _, wall_b = fleet.start("b")
    fleet.knock("a", A, *OPEN)
    assert fleet.pump(lambda: wall_b.is_open(A, SSH))
    fleet.cut("a")
    fleet.knock("a", A, *CLOSE)
    fleet.knock("a", A, *OPEN)  # re-opened here: the newer grant
    fleet.cut("a", False)
    assert fleet.pump(lambda: a.fleet is not None and a.fleet.reachable)
    assert fleet.pump(lambda: a.fleet is not None and a.fleet.link.backlog == 0)
    fleet.pump(lambda: False, timeout=0.2)
    assert wall_b.is_open(A, SSH)  # close, then grant: open
    assert wall_a.is_open(A, SSH)  # its own close read back does not shut its newer grant


def test_a_close_made_here_read_back_closes_a_fleet_grant_applied_before_it(
    fleet: Fleet,
) -> None:
    a, wall_a = fleet.start("a")
    b, wall_b = fleet.start("b")
    fleet.knock("a", A, *OPEN)
    assert fleet.pump(lambda: wall_b.is_open(A, SSH))
    fleet.cut("a")
    fleet.knock("a", A, *CLOSE)  # waits in A's backlog
    fleet.knock("b", A, *OPEN)  # in the stream before A's close
    assert fleet.pump(lambda: b.fleet is not None and b.fleet.link.published == 1)
    fleet.cut("a", False)  # A reads B's grant on (applies it), then publishes its close
    assert fleet.pump(lambda: not wall_b.is_open(A, SSH))
    assert fleet.pump(lambda: not wall_a.is_open(A, SSH))  # grant, then close: closed
    fleet.pump(lambda: False, timeout=0.2)
    assert not wall_a.is_open(A, SSH) and not wall_b.is_open(A, SSH)
    assert a.fleet is not None and a.fleet.revocations_applied == 1


def test_a_trimmed_position_publishes_the_backlogs_closes_only(fleet: Fleet) -> None:
    a, wall_a = fleet.start("a")
    _, wall_b = fleet.start("b")
    fleet.knock("a", A, *OPEN)
    fleet.knock("a", B, *OPEN)
    assert fleet.pump(lambda: wall_b.is_open(A, SSH) and wall_b.is_open(B, SSH))
    fleet.cut("a")
    fleet.knock("a", A, *OPEN)  # again: queued before B's close
    fleet.knock("a", B, *CLOSE)  # a close made here: still published
    fleet.knock("b", A, *CLOSE)  # a later close, made on B meanwhile
    fleet.store.trim(0)  # A's position (and B's close) are gone
    fleet.cut("a", False)
    assert fleet.pump(lambda: a.fleet is not None and a.fleet.link.backlog == 0)
    assert fleet.pump(lambda: not wall_b.is_open(B, SSH))
    assert fleet.pump(lambda: not wall_a.is_open(A, SSH))  # dropped: closed here too
    fleet.pump(lambda: False, timeout=0.2)
    assert not wall_b.is_open(A, SSH)  # the older grant does not reopen B
    assert not wall_a.is_open(A, SSH)
    assert a.snapshot()["fleet"]["refused"]["stale"] == 1


def test_a_host_that_connected_to_an_empty_stream_reconciles_when_it_was_trimmed(
    fleet: Fleet,
) -> None:
    a, wall_a = fleet.start("a")  # the stream is empty: position 0-0
    _, _ = fleet.start("b")
    fleet.cut("a")
    fleet.knock("b", B, *OPEN)
    fleet.knock("b", A, *OPEN)
    fleet.store.trim(1)  # B's grant for B is gone from the stream, still live
    fleet.cut("a", False)
    assert fleet.pump(lambda: wall_a.is_open(A, SSH) and wall_a.is_open(B, SSH))
    assert a.fleet is not None and a.fleet.link.reconciled == 1


def test_a_position_trimmed_while_reading_on_reconciles(fleet: Fleet) -> None:
    fleet.start("a")
    b, wall_b = fleet.start("b")
    fleet.knock("a", C, *OPEN)
    assert fleet.pump(lambda: wall_b.is_open(C, SSH))
    fleet.cut("b")
    fleet.knock("a", A, *OPEN)
    fleet.knock("a", B, *OPEN)
    store = fleet.store
    trimmed = store.trimmed
    once = [True]

    def trimmed_then_trim(after: str) -> bool:
        gone = trimmed(after)
        if once.pop() if once else False:
            store.trim(1)  # between the check and the read: B's position and A's grant go
        return gone

    store.trimmed = trimmed_then_trim  # type: ignore[method-assign]
    fleet.cut("b", False)
    assert fleet.pump(lambda: wall_b.is_open(B, SSH) and wall_b.is_open(A, SSH))
    assert b.fleet is not None and b.fleet.link.reconciled == 1


def test_the_first_connect_drops_backlog_grants_closed_during_the_startup_outage() -> None:
    from appliance.fleet.messages import FleetReconcile, revoke

    store = MemoryStore("prod")
    store.publish(grant("ssh", A, 2000.0, "b", (SSH,)), 1000.0)
    store.publish(grant("ssh", B, 2000.0, "b", (SSH,)), 1000.0)
    store.down = True
    items: list[FleetItem] = []
    link = link_module.FleetLink("a", store, items.append, wall=lambda: 1000.0, block=0.02)
    link.start()
    try:
        link.publish(grant("ssh", A, 1030.0, "a", (SSH,)))  # knocked here, Redis down
        link.publish(grant("ssh", C, 1030.0, "a", (SSH,)))  # never closed anywhere
        deadline = time.monotonic() + 3
        while link.backlog < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert link.backlog == 2
        store.down = False
        store.publish(revoke("ssh", A, "b"), 1000.0)  # closed elsewhere meanwhile
        store.wake()
        while link.backlog and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.1)
    finally:
        link.stop()
    live = {m.field for m in store.live(1000.0) if m is not None}
    assert live == {f"ssh|{B}", f"ssh|{C}"}  # A's grant does not reopen fleet-wide
    assert link.stale == 1
    closing = [item for item in items if isinstance(item, FleetReconcile)]
    assert closing and f"ssh|{A}" not in closing[0].live


def test_grants_made_while_redis_was_gone_come_back_when_it_returns_empty(
    fleet: Fleet,
) -> None:
    """CI found it: Redis restarted without its data; the host that reconnected last
    found the stream holding another's grant past its old position, took the position
    for trimmed and dropped the grant made here during the outage. A new epoch is a
    store that lost its data: every host publishes what it made meanwhile."""
    a, wall_a = fleet.start("a")
    b, wall_b = fleet.start("b")
    c, wall_c = fleet.start("c")
    fleet.knock("b", A, *OPEN)  # before the loss: a and c apply it from the fleet
    assert fleet.pump(lambda: wall_a.is_open(A, SSH) and wall_c.is_open(A, SSH))
    fleet.store.down = True
    fleet.store.wake()
    hosts = (a, b, c)
    assert fleet.pump(lambda: all(d.fleet is not None and not d.fleet.reachable for d in hosts))
    fleet.knock("a", B, *OPEN)  # made during the outage, on the host that comes back last
    fleet.knock("c", B, "5001", "5002")  # a local door: never published
    fleet.cut("a")
    fleet.store.lose_data()
    fleet.store.down = False
    fleet.store.wake()
    assert fleet.pump(lambda: b.fleet is not None and b.fleet.reachable)
    assert fleet.pump(lambda: c.fleet is not None and c.fleet.reachable)
    fleet.knock("c", A, *CLOSE)  # a close made after the loss, before a is back
    fleet.cut("a", False)
    assert fleet.pump(lambda: wall_b.is_open(B, SSH) and wall_c.is_open(B, SSH))
    assert fleet.pump(lambda: a.fleet is not None and a.fleet.link.backlog == 0)
    assert fleet.pump(lambda: not wall_a.is_open(A, SSH))  # the close reached a
    fleet.pump(lambda: False, timeout=0.2)
    assert wall_a.is_open(B, SSH)  # its own grant was published, not dropped
    assert a.fleet is not None and a.fleet.link.stale == 0
    assert not wall_b.is_open(B, Step(23, "tcp"))


def test_a_fleet_grant_from_before_redis_lost_its_data_closes_where_it_was_applied(
    fleet: Fleet,
) -> None:
    a, wall_a = fleet.start("a")
    b, wall_b = fleet.start("b")
    fleet.knock("b", A, *OPEN)
    assert fleet.pump(lambda: wall_a.is_open(A, SSH))
    fleet.cut("a")
    fleet.store.lose_data()  # a close made meanwhile, if any, is gone with it
    fleet.cut("a", False)
    assert fleet.pump(lambda: not wall_a.is_open(A, SSH))  # fail closed: knock again
    assert a.fleet is not None and a.fleet.reachable
    assert fleet.pump(lambda: b.fleet is not None and b.fleet.link.backlog == 0)
    assert wall_b.is_open(A, SSH)  # the knocked host, never cut off, keeps its own grant


def test_a_store_that_cannot_tell_its_epoch_keeps_the_trimmed_rule(fleet: Fleet) -> None:
    """Redis before 7.0 (no SET NX GET): a position gone counts as trimmed, as before."""
    fleet.store.epoch = lambda token: None  # type: ignore[method-assign]
    a, wall_a = fleet.start("a")
    fleet.start("b")
    fleet.cut("a")
    fleet.knock("a", A, *OPEN)
    fleet.knock("b", B, *OPEN)
    fleet.cut("a", False)
    assert fleet.pump(lambda: a.fleet is not None and a.fleet.link.reconciled == 1)
    assert fleet.pump(lambda: not wall_a.is_open(A, SSH))  # dropped, as on a trim
    assert a.fleet.link.stale == 1
