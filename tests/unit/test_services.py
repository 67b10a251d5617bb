"""Service launcher and the loop's service bookkeeping, with a fake runtime.

Readiness is real: the fake's containers "live" at 127.0.0.1, where each test
runs a small TCP server that answers like the service would.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Collection, Iterator
from typing import Any

import pytest

from appliance.config.schema import Readiness, Service
from appliance.core import lifecycle as lc
from appliance.core.events import Grant
from appliance.core.model import Step
from appliance.errors import ContainerError
from appliance.firewall.memory import MemoryBackend
from appliance.runtime import services
from appliance.runtime.services import ServiceManager
from appliance.services.conntrack import TCP_ESTABLISHED, ConnectionCounter, Entry
from appliance.services.docker_runtime import DockerDeaths
from appliance.services.fake import FakeRuntime
from appliance.services.launcher import ServiceLauncher, config_hash
from appliance.services.readiness import probe, wait_ready
from appliance.services.runtime import LABEL, LABEL_CONFIG, Death

A, B = "198.18.5.1", "198.18.5.2"


@pytest.fixture
def banner_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that greets like sshd."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"SSH-2.0-test\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def ssh_service(port: int, **changes: Any) -> Service:
    values: dict[str, Any] = {
        "name": "ssh",
        "image": "ssh:test",
        "container_port": port,
        "host_port": 2222,
        "ready": Readiness("banner", expect="SSH-", timeout=2.0),
        "idle_timeout": 10.0,
        "max_lifetime": 100.0,
    }
    values.update(changes)
    return Service(**values)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_readiness_checks_need_an_application_answer(banner_server: int) -> None:
    assert probe(Readiness("banner", expect="SSH-"), "127.0.0.1", banner_server)
    assert not probe(Readiness("banner", expect="220 "), "127.0.0.1", banner_server)
    assert probe(Readiness("tcp"), "127.0.0.1", banner_server)
    assert not probe(Readiness("http", path="/", status=200), "127.0.0.1", banner_server)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    assert not wait_ready(Readiness("tcp", timeout=0.3), "127.0.0.1", port)


# ----------------------------------------------------------------- the launcher


def test_run_creates_starts_and_shares(banner_server: int) -> None:
    runtime = FakeRuntime()
    service = ssh_service(banner_server)
    launcher = ServiceLauncher(runtime, [service], owner="o1")
    container = launcher.run(service).container
    launcher.wait_ready(service, container, time.monotonic())
    assert container.state == "running" and container.inner == Step(banner_server, "tcp")
    assert launcher.run(service).container.id == container.id  # a running one is reused
    assert runtime.calls == ["owned", "create", "start ssh", "owned"]


def test_pause_and_unpause(banner_server: int) -> None:
    runtime = FakeRuntime()
    service = ssh_service(banner_server, keep_warm=True)
    launcher = ServiceLauncher(runtime, [service], "o1")
    launcher.run(service)
    assert launcher.stop("ssh", "kept warm", pause=True)
    assert runtime.calls[-1] == "pause ssh"
    assert launcher.run(service).resumed
    assert runtime.calls[-1] == "unpause ssh"
    launcher.stop("ssh", "pause then stop", pause=True)
    assert launcher.stop("ssh", "removed")  # a paused container is unpaused, then stopped
    assert runtime.calls[-2:] == ["unpause ssh", "stop ssh"]
    assert not launcher.stop("ssh", "again")  # nothing runs: nothing to do


def test_a_changed_definition_is_recreated_at_its_next_start(banner_server: int) -> None:
    runtime = FakeRuntime()
    old = ssh_service(banner_server)
    launcher = ServiceLauncher(runtime, [old], "o1")
    first = launcher.run(old).container
    new = ssh_service(banner_server, environment=(("TZ", "UTC"),))
    assert launcher.run(new).container.id == first.id  # still running: kept
    launcher.stop("ssh", "idle")
    second = launcher.run(new).container
    assert second.id != first.id and first.id not in runtime.containers
    assert second.labels[LABEL_CONFIG] == config_hash(new)
    # Lifecycle settings are not part of the definition.
    assert config_hash(old) == config_hash(ssh_service(banner_server, idle_timeout=99.0))


def test_not_ready_in_time_is_a_container_error() -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    service = ssh_service(port, ready=Readiness("banner", expect="SSH-", timeout=0.3))
    launcher = ServiceLauncher(FakeRuntime(), [service], "o1")
    container = launcher.run(service).container
    with pytest.raises(ContainerError, match=r"not ready after 0\.3 s"):
        launcher.wait_ready(service, container, time.monotonic())


def test_adopt_keeps_running_containers_and_removes_orphans(banner_server: int) -> None:
    runtime = FakeRuntime()
    service = ssh_service(banner_server)
    current = runtime.create(service, "o1", "an-older-definition")
    runtime.start(current)
    stale = runtime.create(ssh_service(banner_server, host_port=2223), "o1", "old-hash")
    runtime.containers[stale.id].service = "web"  # a service no longer in the catalogue
    foreign = runtime.create(service, "someone-else", config_hash(service))
    launcher = ServiceLauncher(runtime, [service], "o1")
    adopted = launcher.adopt(["ssh"])
    assert [c.id for c in adopted] == [current.id]  # kept though its definition changed
    assert adopted[0].started_at is not None
    assert stale.id not in runtime.containers  # orphan removed
    assert foreign.id in runtime.containers  # never touched


# ----------------------------------------------------------------- conntrack


def test_connections_counted_in_one_read_established_tcp_only() -> None:
    entries: list[Entry] = [
        ("tcp", 2222, TCP_ESTABLISHED),
        ("tcp", 2222, TCP_ESTABLISHED),
        ("tcp", 2222, 7),  # TIME_WAIT
        ("tcp", 8080, TCP_ESTABLISHED),
        ("udp", 2222, None),
        ("udp", 5353, None),
    ]
    reads: list[int] = []

    def read() -> Any:
        reads.append(1)
        return iter(entries)

    counter = ConnectionCounter(read)
    wanted = {Step(2222, "tcp"), Step(5353, "udp"), Step(9999, "tcp")}
    assert counter(wanted) == {Step(2222, "tcp"): 2, Step(5353, "udp"): 1, Step(9999, "tcp"): 0}
    assert len(reads) == 1
    assert counter(set()) == {} and len(reads) == 1  # nothing to count: no read


def test_unreadable_conntrack_is_unknown_and_logged_once_per_streak(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = [True]

    def read() -> Any:
        if broken[0]:
            raise OSError("netlink: permission denied")
        return iter([])

    counter = ConnectionCounter(read)
    with caplog.at_level(logging.WARNING, "knockgate.services"):
        assert counter({Step(22, "tcp")}) is None
        assert counter({Step(22, "tcp")}) is None
        broken[0] = False
        assert counter({Step(22, "tcp")}) == {Step(22, "tcp"): 0}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "cannot be read" in lines[0] and "2 failed" in lines[1]


# ----------------------------------------------------------------- the manager


class Harness:
    """A ServiceManager on the fake runtime; ``pump`` runs the workers' reports
    through the loop's side, as the daemon does."""

    def __init__(self, runtime: FakeRuntime, services: list[Service], conns: list[int | None]):
        self.clock = Clock()
        self.wall_offset = 1_700_000_000.0
        self.runtime = runtime
        runtime.wall = self.wall
        self.backend = MemoryBackend(self.clock)
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.conns = conns
        launcher = ServiceLauncher(runtime, services, "o1")
        self.manager = ServiceManager(
            launcher,
            self.backend,
            self.queue.put,
            self.clock,
            self.wall,
            connections=self.count,
        )

    def wall(self) -> float:
        return self.clock.now + self.wall_offset

    def count(self, steps: Collection[Step]) -> dict[Step, int] | None:
        value = self.conns[0]
        return None if value is None else dict.fromkeys(steps, value)

    def pump(self, until: Any = None, timeout: float = 5.0) -> None:
        """Feed reports to the manager until one of type ``until`` was handled (or,
        without ``until``, until the queue stays empty for a moment)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self.queue.get(timeout=0.3 if until is None else 0.05)
            except queue.Empty:
                if until is None:
                    return
                continue
            self.manager.handle(item)
            if until is not None and isinstance(item, until):
                return
        if until is not None:
            raise AssertionError(f"no {until.__name__} within {timeout} s")

    def start(self) -> None:
        self.manager.start()
        self.pump(lc.Adopted)

    def tick(self) -> None:
        """The loop's once-a-second tick; the conntrack read it starts (on a thread of
        its own) is waited for and its counts handled, as the loop would next."""
        self.manager.tick()
        deadline = time.monotonic() + 5
        while self.manager._counting.is_set() and time.monotonic() < deadline:
            time.sleep(0.005)
        others = []
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, lc.ConnectionsSeen):
                self.manager.handle(item)
            else:
                others.append(item)  # left for pump(), in order
        for item in others:
            self.queue.put(item)

    def knock(self, address: str, seconds: float = 30) -> None:
        now = self.clock.now
        grant = Grant(now, "ssh-door", address, (Step(2222, "tcp"),), now + seconds)
        self.manager.request(grant, "ssh")

    def close(self) -> None:
        self.manager.shutdown()


@pytest.fixture
def harness(banner_server: int) -> Iterator[Any]:
    made: list[Harness] = []

    def make(conns: list[int | None] | None = None, **changes: Any) -> Harness:
        h = Harness(FakeRuntime(), [ssh_service(banner_server, **changes)], conns or [0])
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


SSH = Step(2222, "tcp")


def test_grant_only_after_ready_and_shared_by_knockers(harness: Any, banner_server: int) -> None:
    h = harness()
    h.start()
    h.knock(A)
    assert not h.backend.is_open(A, SSH)  # not before the service answers
    h.pump(lc.ContainerReady)
    h.knock(B)
    assert h.backend.is_open(A, SSH) and h.backend.is_open(B, SSH)
    assert h.runtime.calls.count("create") == 1
    assert h.backend.direct == (("127.0.0.1", Step(banner_server, "tcp")),)
    assert h.manager.launches == 1
    assert h.manager.snapshot()[0]["state"] == "serving"


def test_docker_failure_gives_no_grant(harness: Any, caplog: pytest.LogCaptureFixture) -> None:
    h = harness()
    h.runtime.fail = "create"
    h.start()
    with caplog.at_level(logging.ERROR, "knockgate.services"):
        h.knock(A)
        h.pump(lc.ContainerFailed)
    assert not h.backend.is_open(A, SSH)
    assert h.manager.failures == 1
    assert f"{A}: ssh-door: service ssh unavailable, no access: fake docker" in caplog.text


def test_idle_service_stops_after_last_grant_and_connections(harness: Any) -> None:
    conns: list[int | None] = [0]
    h = harness(conns, idle_timeout=10.0)
    h.start()
    h.knock(A, seconds=5)
    h.pump(lc.ContainerReady)
    h.clock.now += 6  # the grant expired
    conns[0] = 1  # but a session is still open
    h.tick()
    h.clock.now += 20
    h.tick()
    conns[0] = None  # conntrack unreadable: unknown keeps it up
    h.clock.now += 20
    h.tick()
    conns[0] = 0
    h.tick()  # idle from now
    h.clock.now += 9
    h.tick()
    assert "stop ssh" not in h.runtime.calls
    h.clock.now += 1
    h.tick()
    h.pump(lc.ContainerStopped)
    assert h.runtime.calls[-1] == "stop ssh"
    assert h.manager.snapshot()[0]["state"] == "cold"
    assert h.backend.direct == ()


def test_close_knock_from_the_last_holder_stops_the_service(harness: Any) -> None:
    h = harness([5])
    h.start()
    h.knock(A)
    h.pump(lc.ContainerReady)
    h.knock(B)
    h.manager.revoked("ssh", A)
    h.pump()
    assert "stop ssh" not in h.runtime.calls
    h.manager.revoked("ssh", B)
    h.pump(lc.ContainerStopped)
    assert h.runtime.calls[-1] == "stop ssh"


def test_max_lifetime_revokes_and_stops(harness: Any) -> None:
    h = harness([3], max_lifetime=50.0)
    h.start()
    h.knock(A, seconds=500)
    h.pump(lc.ContainerReady)
    h.clock.now += 50
    h.tick()
    assert not h.backend.is_open(A, SSH)
    h.pump(lc.ContainerStopped)
    assert h.runtime.calls[-1] == "stop ssh"


def test_max_lifetime_counts_from_the_adopted_containers_original_start(
    banner_server: int,
) -> None:
    """A restart of knockgate does not give a running service a new max_lifetime."""
    runtime = FakeRuntime()
    service = ssh_service(banner_server, max_lifetime=100.0, idle_timeout=1000.0)
    h = Harness(runtime, [service], [2])
    try:
        h.clock.now -= 80  # the previous knockgate started it 80 s ago
        running = runtime.create(service, "o1", config_hash(service))
        runtime.start(running)
        h.clock.now += 80
        h.backend.grant(A, (SSH,), 60)  # left in the kernel by the previous run
        h.start()
        assert h.manager.snapshot()[0] == {
            "name": "ssh",
            "state": "serving",
            "running": True,
            "uptime": 80.0,
            "grants": 1,
        }
        h.clock.now += 19
        h.tick()
        h.pump()
        assert "stop ssh" not in runtime.calls
        h.clock.now += 1  # 100 s after its original start
        h.tick()
        assert not h.backend.is_open(A, SSH)
        h.pump(lc.ContainerStopped)
        assert runtime.calls[-1] == "stop ssh"
    finally:
        h.close()


def test_grants_that_survived_a_restart_keep_an_adopted_service_up(banner_server: int) -> None:
    runtime = FakeRuntime()
    service = ssh_service(banner_server, idle_timeout=5.0)
    h = Harness(runtime, [service], [0])
    try:
        running = runtime.create(service, "o1", config_hash(service))
        runtime.start(running)
        h.backend.grant(A, (SSH,), 40)
        h.start()
        h.clock.now += 30  # longer than idle_timeout, shorter than the grant
        h.tick()
        h.clock.now += 1
        h.tick()
        h.pump()
        assert "stop ssh" not in runtime.calls
        h.clock.now += 10  # the grant is gone
        h.tick()
        h.tick()  # no connection: idle from now
        h.clock.now += 5
        h.tick()
        h.pump(lc.ContainerStopped)
        assert runtime.calls[-1] == "stop ssh" and "create" not in runtime.calls[1:]
    finally:
        h.close()


def test_a_container_stopped_outside_knockgate_is_noticed(harness: Any) -> None:
    h = harness([1])
    h.start()
    h.knock(A)
    h.pump(lc.ContainerReady)
    (container,) = h.runtime.containers.values()
    h.runtime.containers[container.id].state = "exited"
    h.runtime.die(container)  # Docker's die event, through the events listener
    h.pump(lc.ContainerDied)
    assert not h.backend.is_open(A, SSH)
    assert h.manager.snapshot()[0]["state"] == "cold"


def test_shutdown_keeps_services_running_unless_told_to_stop(
    banner_server: int,
) -> None:
    for on_shutdown in ("keep", "stop"):
        runtime = FakeRuntime()
        h = Harness(runtime, [ssh_service(banner_server, on_shutdown=on_shutdown)], [1])
        h.start()
        h.knock(A)
        h.pump(lc.ContainerReady)
        h.close()
        assert ("stop ssh" in runtime.calls) == (on_shutdown == "stop"), on_shutdown


def test_reload_adds_removes_and_defers_changes(banner_server: int) -> None:
    runtime = FakeRuntime()
    ssh = ssh_service(banner_server)
    h = Harness(runtime, [ssh], [1])
    try:
        h.start()
        h.knock(A)
        h.pump(lc.ContainerReady)
        web = ssh_service(banner_server, name="web", host_port=8080)
        changed = ssh_service(banner_server, environment=(("TZ", "UTC"),))
        h.manager.reload((changed, web))
        assert [s["name"] for s in h.manager.snapshot()] == ["ssh", "web"]
        assert h.backend.is_open(A, SSH)  # the changed one keeps serving
        h.manager.reload((web,))  # ssh removed: grants revoked, stopped
        assert not h.backend.is_open(A, SSH)
        h.pump(lc.ContainerStopped)
        assert runtime.calls[-1] == "stop ssh"
        assert [s["name"] for s in h.manager.snapshot()] == ["web"]
    finally:
        h.close()


# ----------------------------------------------------------------- regressions


def test_docker_down_at_start_keeps_the_gate_and_adopts_once_it_answers(
    banner_server: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Defect b: the first tick called set_direct(()) while every machine was still cold,
    clearing the gate entries of containers the previous run left running; and when
    Docker failed at start, adoption was given up for good."""
    monkeypatch.setattr(services, "ADOPT_RETRY", 0.02)
    runtime = FakeRuntime()
    service = ssh_service(banner_server, idle_timeout=5.0)
    h = Harness(runtime, [service], [0])
    try:
        kept = runtime.create(service, "o1", config_hash(service))
        runtime.start(kept)
        left = (("127.0.0.1", Step(banner_server, "tcp")),)
        h.backend.direct = left  # what the previous run set, still in the kernel
        runtime.fail = "owned"
        with caplog.at_level(logging.INFO, "knockgate.services"):
            h.manager.start()
            for _ in range(3):
                h.clock.now += 1
                h.tick()
                time.sleep(0.1)  # a few failed attempts
            assert h.backend.direct == left and "set_direct" not in h.backend.calls
            assert runtime.calls.count("owned") >= 3
            runtime.fail = None
            h.pump(lc.Adopted)
        lines = [r.getMessage() for r in caplog.records]
        assert len([line for line in lines if "cannot look for" in line]) == 1, lines
        assert any("looked for after" in line for line in lines), lines
        assert h.backend.direct == left
        assert h.manager.snapshot()[0]["state"] == "ready"
        h.tick()  # no connection: idle from now, and it stops on its own rule
        h.clock.now += 5
        h.tick()
        h.pump(lc.ContainerStopped)
        assert runtime.calls[-1] == "stop ssh" and h.backend.direct == ()
    finally:
        h.close()


def test_a_failed_stop_is_asked_again_and_the_container_stays_gated(
    harness: Any, banner_server: int
) -> None:
    """Defect c: a failed Stop made the service cold while its container ran on, out of
    the gate, and nothing stopped it again."""
    h = harness([1])
    h.start()
    h.knock(A)
    h.pump(lc.ContainerReady)
    h.runtime.fail = "stop"
    h.manager.revoked("ssh", A)
    h.pump(lc.ContainerFailed)
    gated = (("127.0.0.1", Step(banner_server, "tcp")),)
    assert h.manager.snapshot()[0]["state"] == "stopping" and h.backend.direct == gated
    h.runtime.fail = None
    h.clock.now += 1
    h.tick()  # asked again
    h.pump(lc.ContainerStopped)
    assert h.runtime.calls.count("stop ssh") == 2
    assert h.manager.snapshot()[0]["state"] == "cold" and h.backend.direct == ()


def test_a_late_death_from_our_own_stop_does_not_end_the_restarted_container(
    harness: Any,
) -> None:
    """Defect d: the die event of knockgate's own stop, arriving after the same container
    (same id) was started again, revoked the new grants and ungated it."""
    h = harness([1])
    h.start()
    h.knock(A)
    h.pump(lc.ContainerReady)
    listeners, h.runtime.watchers = h.runtime.watchers, []  # the event is late
    stopped_at = h.wall()
    h.manager.revoked("ssh", A)
    h.pump(lc.ContainerStopped)
    h.clock.now += 2
    h.knock(B)
    h.pump(lc.ContainerReady)
    (container,) = h.runtime.containers.values()
    assert h.runtime.calls.count("create") == 1  # the same container, started again
    h.runtime.watchers = listeners
    h.runtime.die(container, at=stopped_at)
    h.pump(lc.ContainerDied)
    assert h.backend.is_open(B, SSH) and h.backend.direct != ()
    assert h.manager.snapshot()[0]["state"] == "serving"


def test_a_knock_before_adoption_keeps_the_containers_age_and_live_grants(
    banner_server: int,
) -> None:
    """Defect e: a knock before ``Adopted`` got the container that already ran reported
    as started now (max_lifetime counted from then) and the live grants were ignored."""
    runtime = FakeRuntime()
    service = ssh_service(banner_server, max_lifetime=100.0, idle_timeout=1000.0)
    h = Harness(runtime, [service], [2])
    try:
        h.clock.now -= 80  # the previous knockgate started it 80 s ago
        running = runtime.create(service, "o1", config_hash(service))
        runtime.start(running)
        h.clock.now += 80
        h.backend.grant(A, (SSH,), 60)  # left in the kernel by the previous run
        h.knock(B, seconds=60)  # before adoption (Docker slow to list)
        h.pump(lc.ContainerReady)
        h.start()
        snapshot = h.manager.snapshot()[0]
        assert (snapshot["uptime"], snapshot["grants"]) == (80.0, 2)
        assert runtime.calls.count("create") == 1  # the one the previous run made
        h.clock.now += 20  # 100 s after its real start
        h.tick()
        assert not h.backend.is_open(A, SSH) and not h.backend.is_open(B, SSH)
        h.pump(lc.ContainerStopped)
    finally:
        h.close()


def test_shutdown_does_not_wait_for_a_slow_launch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Defect g: shutdown waited for launches under way (an image build, a readiness
    timeout) past supervisord's SIGKILL."""
    monkeypatch.setattr(services, "SHUTDOWN_WAIT", 0.3)
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing answers: the readiness wait lasts its whole timeout
    service = ssh_service(port, ready=Readiness("tcp", timeout=5.0))
    h = Harness(FakeRuntime(), [service], [0])
    h.start()
    h.knock(A)
    time.sleep(0.1)  # the launch is waiting for readiness
    began = time.monotonic()
    h.close()
    assert time.monotonic() - began < 1.5


def test_docker_death_events_carry_dockers_time() -> None:
    """The events API's ``timeNano`` (else ``time``) travels with each death (defect d)."""
    actor = {"Attributes": {LABEL: "ssh"}}
    events = [
        {"id": "c1", "Actor": actor, "time": 1_700_000_000, "timeNano": 1_700_000_000_250_000_000},
        {"id": "c2", "Actor": actor, "time": 1_700_000_001},
        {"id": "c3"},
    ]
    assert list(DockerDeaths(iter(events))) == [
        Death("ssh", "c1", 1_700_000_000.25),
        Death("ssh", "c2", 1_700_000_001.0),
        Death("", "c3", None),
    ]


def test_docker_deaths_follow_die_stop_and_destroy_of_our_containers() -> None:
    """A container removed by hand (`docker rm -f`) is followed as well (``destroy``), so
    the service never stays shown running after its container is gone."""
    from appliance.services.docker_runtime import DockerRuntime

    asked: list[dict[str, Any]] = []

    class Client:
        def events(self, filters: dict[str, Any], decode: bool) -> Iterator[dict[str, Any]]:
            asked.append(filters)
            return iter(
                [{"id": "c1", "Action": "destroy", "Actor": {"Attributes": {LABEL: "ssh"}}}]
            )

    deaths = DockerRuntime(Client()).deaths("o1")
    assert asked == [
        {
            "label": ["knockgate.owner=o1"],
            "type": "container",
            "event": ["die", "stop", "destroy"],
        }
    ]
    assert list(deaths) == [Death("ssh", "c1", None)]


def test_a_container_removed_by_hand_is_shown_cold(harness: Any) -> None:
    h = harness([1])
    h.start()
    h.knock(A)
    h.pump(lc.ContainerReady)
    assert h.manager.snapshot()[0]["running"]
    (container,) = h.runtime.containers.values()
    h.runtime.remove(container)  # `docker rm -f`: die, then destroy
    h.runtime.die(container)
    h.runtime.die(container)
    h.pump(lc.ContainerDied)
    h.pump()
    assert not h.backend.is_open(A, SSH)
    (entry,) = h.manager.snapshot()
    assert entry["state"] == "cold" and not entry["running"] and entry["grants"] == 0
