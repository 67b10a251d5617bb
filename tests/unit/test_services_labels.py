"""The loop's side of label-gated containers, with a fake runtime and a memory firewall."""

from __future__ import annotations

import logging
import queue
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from appliance.core import lifecycle as lc
from appliance.core.events import Grant
from appliance.core.model import Step
from appliance.firewall.memory import MemoryBackend
from appliance.runtime.services import ServiceManager
from appliance.services.discovery import Changed, Listed, Removed
from appliance.services.fake import FakeRuntime
from appliance.services.labels import Binding, ContainerFacts, Published
from appliance.services.launcher import ServiceLauncher
from appliance.services.runtime import Container

A = "198.18.6.1"
HOST = Step(8080, "tcp")


@pytest.fixture
def listening() -> Iterator[int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield server.getsockname()[1]
    server.close()


def facts(ident: str, labels: dict[str, str], port: int, state: str = "exited") -> ContainerFacts:
    published = (Published(port, "tcp", (Binding("", 8080),)),) if port else ()
    return ContainerFacts(
        ident, f"kg-{ident}", state, tuple(sorted(labels.items())), published, ("127.0.0.1",)
    )


class Harness:
    def __init__(self) -> None:
        self.runtime = FakeRuntime()
        self.backend = MemoryBackend(time.monotonic)
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.manager = ServiceManager(
            ServiceLauncher(self.runtime, (), "o1"),
            self.backend,
            self.queue.put,
            time.monotonic,
            time.time,
            connections=lambda steps: {},
        )
        self.manager.set_doors({"web": True})
        self.manager.handle(lc.Adopted(time.monotonic()))  # no catalogue container left

    def container(self, ident: str, state: str = "exited") -> None:
        self.runtime.containers[ident] = Container(
            ident,
            f"kg-{ident}",
            f"kg-{ident}",
            state,
            "127.0.0.1",  # type: ignore[arg-type]
        )

    def pump(self, until: type, timeout: float = 5.0) -> None:
        """Hand the workers' events to the manager until one of type ``until``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self.manager.handle(event)
            if isinstance(event, until):
                return
        raise AssertionError(f"no {until.__name__}")


def test_a_group_starts_in_order_on_a_knock_and_stops_in_reverse(listening: int) -> None:
    h = Harness()
    project = {"com.docker.compose.project": "shop"}
    app = facts(
        "app",
        {
            **project,
            "com.docker.compose.service": "app",
            "com.docker.compose.depends_on": "db:service_started:false",
            "knockgate.door": "web",
            "knockgate.start_on_knock": "true",
            "knockgate.group": "shop",
        },
        listening,
    )
    db = facts("db", {**project, "com.docker.compose.service": "db", "knockgate.group": "shop"}, 0)
    h.container("app")
    h.container("db")
    h.manager.discovered(Listed(1.0, (app, db)))
    assert h.manager.label_protected == (HOST,)
    assert h.backend.direct == (("127.0.0.1", Step(listening, "tcp")),)
    now = time.monotonic()
    h.manager.knocked(Grant(now, "web", A, (), now + 60))
    h.pump(lc.ContainerReady)
    assert h.runtime.calls == ["start kg-db", "start kg-app"]
    assert (A, HOST) in {(g.address, g.step) for g in h.backend.grants()}
    assert h.manager.gated()[0]["state"] == "serving"
    h.manager.closed("web", A)  # the last holder's close knock stops the group
    h.pump(lc.ContainerStopped)
    assert h.runtime.calls[2:] == ["stop kg-app", "stop kg-db"]
    assert h.backend.grants() == []


def test_a_user_container_is_only_gated(listening: int) -> None:
    h = Harness()
    web = facts("web", {"knockgate.door": "web"}, listening, state="running")
    h.container("web", "running")
    h.manager.discovered(Listed(1.0, (web,)))
    now = time.monotonic()
    h.manager.knocked(Grant(now, "web", A, (), now + 60))
    assert [(g.address, g.step) for g in h.backend.grants()] == [(A, HOST)]
    h.manager.discovered(Changed(2.0, "die", facts("web", {"knockgate.door": "web"}, listening)))
    assert h.backend.grants() == [] and h.runtime.calls == []  # never started nor stopped
    h.manager.discovered(Removed(3.0, "web", "kg-web"))
    assert h.manager.label_protected == () and h.backend.direct == ()
    assert h.manager.gated() == []


def test_a_label_problem_is_logged_once_and_the_ports_stay_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = Harness()
    bad = facts("bad", {"knockgate.door": "web", "knockgate.ready": "udp"}, 80, "running")
    with caplog.at_level(logging.ERROR, "knockgate.services"):
        h.manager.discovered(Listed(1.0, (bad,)))
        h.manager.discovered(Changed(2.0, "start", bad))
        h.manager.set_doors({"web": True})
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        'container kg-bad: label knockgate.ready="udp": expected tcp, http, http:/path, '
        "banner:TEXT or healthcheck; its ports stay closed"
    ]
    assert h.manager.label_protected == (HOST,)
    [row] = h.manager.gated()
    assert row["state"] == "closed" and row["problems"]


def test_a_door_removed_at_reload_revokes_and_closes(listening: int) -> None:
    h = Harness()
    web = facts("web", {"knockgate.door": "web"}, listening, state="running")
    h.container("web", "running")
    h.manager.discovered(Listed(1.0, (web,)))
    now = time.monotonic()
    h.manager.knocked(Grant(now, "web", A, (), now + 60))
    h.manager.set_doors({"other": True})
    assert h.backend.grants() == []
    assert h.manager.label_protected == (HOST,)
    assert "no such door" in h.manager.gated()[0]["problems"][0]
