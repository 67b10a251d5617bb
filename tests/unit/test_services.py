"""Service launcher and the loop's service bookkeeping, with a fake runtime.

Readiness is real: the fake's containers "live" at 127.0.0.1, where each test
runs a small TCP server that answers like the service would.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from appliance.config.schema import Readiness, Service
from appliance.core.events import Grant
from appliance.core.model import Step
from appliance.errors import ContainerError
from appliance.firewall.memory import MemoryBackend
from appliance.runtime.services import ServiceManager
from appliance.services.fake import FakeRuntime
from appliance.services.launcher import ServiceLauncher, config_hash
from appliance.services.readiness import probe, wait_ready
from appliance.services.runtime import LABEL_CONFIG

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


def test_ensure_ready_creates_starts_and_waits(banner_server: int) -> None:
    runtime = FakeRuntime()
    launcher = ServiceLauncher(runtime, [ssh_service(banner_server)], owner="o1")
    container = launcher.ensure_ready("ssh")
    assert container.state == "running"
    assert runtime.calls == ["create", "start ssh"]
    assert launcher.running("ssh")
    launcher.ensure_ready("ssh")  # a second knocker shares the running container
    assert runtime.calls == ["create", "start ssh"]


def test_keep_warm_pauses_and_a_knock_only_unpauses(banner_server: int) -> None:
    runtime = FakeRuntime()
    launcher = ServiceLauncher(runtime, [ssh_service(banner_server, keep_warm=True)], "o1")
    launcher.warm("ssh")
    assert runtime.calls == ["create", "start ssh", "pause ssh"]
    assert not launcher.running("ssh")
    launcher.ensure_ready("ssh")
    assert runtime.calls[-1] == "unpause ssh"
    launcher.stop("ssh", "idle", force=True)
    assert runtime.calls[-1] == "pause ssh"  # keep_warm: paused again, not stopped


def test_a_stop_decided_before_a_new_launch_is_dropped(banner_server: int) -> None:
    runtime = FakeRuntime()
    launcher = ServiceLauncher(runtime, [ssh_service(banner_server)], "o1")
    launcher.ensure_ready("ssh")
    launcher.stopping("ssh")  # the loop decided: idle, stop it
    launcher.ensure_ready("ssh")  # ...but a knock launched it again first
    launcher.stop("ssh", "idle")
    assert "stop ssh" not in runtime.calls
    assert launcher.running("ssh")


def test_not_ready_in_time_is_a_container_error() -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    service = ssh_service(port, ready=Readiness("banner", expect="SSH-", timeout=0.3))
    launcher = ServiceLauncher(FakeRuntime(), [service], "o1")
    with pytest.raises(ContainerError, match=r"not ready after 0\.3 s"):
        launcher.ensure_ready("ssh")


def test_adopt_keeps_current_containers_and_removes_orphans(banner_server: int) -> None:
    runtime = FakeRuntime()
    service = ssh_service(banner_server)
    current = runtime.create(service, "o1", config_hash(service))
    runtime.start(current)
    stale = runtime.create(ssh_service(banner_server, host_port=2223), "o1", "old-hash")
    stale.service = "web"  # a service no longer in the catalogue
    runtime.containers[stale.id].service = "web"
    foreign = runtime.create(service, "someone-else", config_hash(service))
    launcher = ServiceLauncher(runtime, [service], "o1")
    launcher.adopt()
    assert launcher.containers["ssh"].id == current.id
    assert launcher.running("ssh")
    assert stale.id not in runtime.containers  # orphan removed
    assert foreign.id in runtime.containers  # never touched
    assert runtime.containers[current.id].labels[LABEL_CONFIG] == config_hash(service)


def make_manager(
    port: int, runtime: FakeRuntime, conns: list[int | None], **changes: Any
) -> tuple[ServiceManager, MemoryBackend, Clock, list[Any]]:
    clock = Clock()
    backend = MemoryBackend(clock)
    queue: list[Any] = []
    launcher = ServiceLauncher(runtime, [ssh_service(port, **changes)], "o1", clock=clock)
    manager = ServiceManager(launcher, backend, queue.append, clock, lambda p, proto: conns[0])
    return manager, backend, clock, queue


def grant(clock: Clock, address: str, seconds: float = 30) -> Grant:
    return Grant(clock.now, "ssh-door", address, (Step(2222, "tcp"),), clock.now + seconds)


def launch(manager: ServiceManager, queue: list[Any], g: Grant) -> bool:
    manager.request(g, manager.launcher.services["ssh"])
    manager.pool.shutdown(wait=True)  # wait for the worker
    manager.pool = type(manager.pool)(max_workers=1)
    item = queue.pop()
    assert item[0] == "service-ready"
    return manager.ready(item[1], item[2], item[3])


def test_grant_only_after_ready_and_shared_by_knockers(banner_server: int) -> None:
    runtime = FakeRuntime()
    manager, backend, clock, queue = make_manager(banner_server, runtime, [0])
    assert launch(manager, queue, grant(clock, A))
    assert launch(manager, queue, grant(clock, B))
    assert backend.is_open(A, Step(2222, "tcp")) and backend.is_open(B, Step(2222, "tcp"))
    assert runtime.calls.count("create") == 1
    assert backend.direct == (("127.0.0.1", Step(banner_server, "tcp")),)


def test_docker_failure_gives_no_grant(banner_server: int) -> None:
    runtime = FakeRuntime()
    runtime.fail = "create"
    manager, backend, clock, queue = make_manager(banner_server, runtime, [0])
    assert not launch(manager, queue, grant(clock, A))
    assert not backend.is_open(A, Step(2222, "tcp"))
    assert manager.failures == 1


def test_idle_service_stops_after_last_grant_and_connections(banner_server: int) -> None:
    runtime = FakeRuntime()
    conns: list[int | None] = [0]
    manager, _, clock, queue = make_manager(banner_server, runtime, conns, idle_timeout=10.0)
    launch(manager, queue, grant(clock, A, seconds=5))
    clock.now += 6  # grant expired
    conns[0] = 1  # but a session is still open
    manager.tick()
    clock.now += 20
    manager.tick()
    assert manager.launcher.running("ssh")
    conns[0] = 0
    manager.tick()  # idle from now
    clock.now += 9
    manager.tick()
    assert manager.launcher.running("ssh")
    clock.now += 1
    manager.tick()
    manager.pool.shutdown(wait=True)
    assert runtime.calls[-1] == "stop ssh"


def test_close_knock_from_the_last_holder_stops_the_service(banner_server: int) -> None:
    runtime = FakeRuntime()
    manager, _, clock, queue = make_manager(banner_server, runtime, [5])
    launch(manager, queue, grant(clock, A))
    launch(manager, queue, grant(clock, B))
    manager.revoked("ssh", A)
    assert manager.launcher.running("ssh")
    manager.revoked("ssh", B)
    manager.pool.shutdown(wait=True)
    assert runtime.calls[-1] == "stop ssh"


def test_max_lifetime_revokes_and_stops(banner_server: int) -> None:
    runtime = FakeRuntime()
    manager, backend, clock, queue = make_manager(banner_server, runtime, [3], max_lifetime=50.0)
    launch(manager, queue, grant(clock, A, seconds=500))
    clock.now += 50
    manager.tick()
    manager.pool.shutdown(wait=True)
    assert not backend.is_open(A, Step(2222, "tcp"))
    assert runtime.calls[-1] == "stop ssh"


def test_grants_that_survived_a_restart_keep_an_adopted_service_up(banner_server: int) -> None:
    runtime = FakeRuntime()
    service = ssh_service(banner_server, idle_timeout=5.0)
    running = runtime.create(service, "o1", config_hash(service))
    runtime.start(running)
    manager, backend, clock, _ = make_manager(banner_server, runtime, [0], idle_timeout=5.0)
    backend.grant(A, (Step(2222, "tcp"),), 40)  # left in the kernel by the killed daemon
    manager.launcher.adopt()
    manager.prepared()
    assert manager.grants["ssh"] == {A: clock.now + 40}
    clock.now += 30  # longer than idle_timeout, shorter than the grant
    manager.tick()
    clock.now += 1
    manager.tick()
    manager.pool.shutdown(wait=True)
    assert "stop ssh" not in runtime.calls
