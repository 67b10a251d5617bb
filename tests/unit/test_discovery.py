"""Discovery of labelled containers, against an in-memory Docker client."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.services.discovery import (
    Changed,
    Discovery,
    DiscoveryEvent,
    DockerLabelSource,
    Listed,
    Removed,
    container_event,
    facts_of,
    published,
)
from appliance.services.labels import Binding, GatedContainer, LabelProblem, Published, parse


def inspect(
    ident: str, labels: dict[str, str], status: str = "running", ports: Any = None
) -> dict[str, Any]:
    return {
        "Id": ident,
        "Name": f"/kg-{ident}",
        "State": {"Status": status},
        "Config": {"Labels": labels},
        "HostConfig": {
            "PortBindings": ports
            if ports is not None
            else {"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}
        },
    }


class Raw:
    def __init__(self, attrs: dict[str, Any]) -> None:
        self.attrs = attrs


class NotFound(Exception):
    pass


class Down(Exception):
    pass


class Stream:
    """A blocking event stream: the test pushes events; ``None`` ends it; an
    exception instance is raised from the iteration."""

    def __init__(self) -> None:
        self.items: queue.Queue[Any] = queue.Queue()
        self.closed = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            item = self.items.get()
            if item is None or self.closed:
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def close(self) -> None:
        self.closed = True
        self.items.put(None)


class FakeContainers:
    def __init__(self, docker: FakeDocker) -> None:
        self.docker = docker

    def list(self, all: bool, filters: dict[str, str]) -> list[Raw]:
        assert all is True
        self.docker.calls.append(("list", filters["label"]))
        self.docker.check()
        label = filters["label"]
        return [Raw(a) for a in self.docker.containers.values() if label in a["Config"]["Labels"]]

    def get(self, ident: str) -> Raw:
        self.docker.check()
        if ident not in self.docker.containers:
            raise NotFound(ident)
        return Raw(self.docker.containers[ident])


class FakeDocker:
    def __init__(self) -> None:
        self.containers: dict[str, dict[str, Any]] = {}
        self.streams: list[Stream] = []
        self.down = 0  # calls that fail before Docker answers again
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.containers_api = FakeContainers(self)

    def check(self) -> None:
        with self.lock:
            if self.down:
                self.down -= 1
                raise Down("connection refused")

    def events(self, filters: dict[str, Any], decode: bool) -> Stream:
        assert decode and filters == {
            "type": "container",
            "event": ["create", "start", "die", "destroy"],
        }
        self.check()
        stream = Stream()
        self.streams.append(stream)
        return stream


class Client:
    """What Discovery sees: ``client.containers`` and ``client.events``."""

    def __init__(self, docker: FakeDocker) -> None:
        self.docker = docker
        self.containers = docker.containers_api

    def events(self, filters: dict[str, Any], decode: bool) -> Stream:
        return self.docker.events(filters, decode)


def event(action: str, ident: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "Type": "container",
        "Action": action,
        "Actor": {"ID": ident, "Attributes": {**labels, "name": f"kg-{ident}"}},
    }


@pytest.fixture
def docker() -> FakeDocker:
    return FakeDocker()


@pytest.fixture
def running(docker: FakeDocker) -> Iterator[tuple[Discovery, queue.Queue[DiscoveryEvent]]]:
    got: queue.Queue[DiscoveryEvent] = queue.Queue()
    discovery = Discovery(
        got.put, DockerLabelSource(Client(docker)), clock=lambda: 1.0, retry=0.01, retry_max=0.04
    )
    yield discovery, got
    discovery.close()


def next_event(got: queue.Queue[DiscoveryEvent]) -> DiscoveryEvent:
    return got.get(timeout=5)


def wait_stream(docker: FakeDocker, count: int) -> Stream:
    for _ in range(500):
        if len(docker.streams) >= count:
            return docker.streams[count - 1]
        threading.Event().wait(0.01)
    raise AssertionError("no event stream opened")


def test_the_listing_has_door_and_group_containers_and_nothing_else(
    docker: FakeDocker, running: tuple[Discovery, queue.Queue[DiscoveryEvent]]
) -> None:
    docker.containers["a"] = inspect("a", {"knockgate.door": "web"})
    docker.containers["b"] = inspect("b", {"knockgate.group": "blog"}, "exited", {})
    docker.containers["c"] = inspect("c", {"traefik.enable": "true"})
    discovery, got = running
    discovery.start()
    listed = next_event(got)
    assert isinstance(listed, Listed)
    assert [(f.id, f.name, f.state) for f in listed.containers] == [
        ("a", "kg-a", "running"),
        ("b", "kg-b", "exited"),
    ]
    assert ("list", "knockgate.door") in docker.calls and (
        "list",
        "knockgate.group",
    ) in docker.calls


def test_events_become_typed_changes_with_the_facts_inspected_then(
    docker: FakeDocker, running: tuple[Discovery, queue.Queue[DiscoveryEvent]]
) -> None:
    discovery, got = running
    discovery.start()
    assert next_event(got) == Listed(1.0, ())
    stream = wait_stream(docker, 1)
    labels = {"knockgate.door": "web"}
    docker.containers["a"] = inspect("a", labels, "created")
    stream.items.put(event("create", "a", labels))
    stream.items.put(event("start", "z", {"other": "1"}))  # not labelled: not looked at
    docker.containers["a"] = inspect("a", labels, "running")
    stream.items.put(event("start", "a", labels))
    stream.items.put(event("destroy", "a", labels))
    first, second, third = next_event(got), next_event(got), next_event(got)
    assert isinstance(first, Changed) and first.action == "create"
    assert isinstance(second, Changed) and second.container.state == "running"
    assert third == Removed(1.0, "a", "kg-a")
    assert got.empty()


def test_a_container_gone_before_its_inspect_is_removed(
    docker: FakeDocker, running: tuple[Discovery, queue.Queue[DiscoveryEvent]]
) -> None:
    discovery, got = running
    discovery.start()
    next_event(got)
    wait_stream(docker, 1).items.put(event("die", "gone", {"knockgate.door": "web"}))
    assert next_event(got) == Removed(1.0, "gone", "kg-gone")


def test_docker_down_is_retried_and_logged_once_per_streak(
    docker: FakeDocker,
    running: tuple[Discovery, queue.Queue[DiscoveryEvent]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    docker.down = 5
    discovery, got = running
    with caplog.at_level(logging.WARNING, logger="knockgate.services.discovery"):
        discovery.start()
        assert isinstance(next_event(got), Listed)
        # the stream breaks: listed again after the reconnect (events may have been missed)
        docker.containers["a"] = inspect("a", {"knockgate.door": "web"})
        wait_stream(docker, 1).items.put(Down("reset by peer"))
        again = next_event(got)
    assert isinstance(again, Listed) and [f.id for f in again.containers] == ["a"]
    lines = [r.getMessage() for r in caplog.records]
    assert len([line for line in lines if line.startswith("cannot follow")]) == 2, lines
    assert "docker answers again after 5 failed attempts" in lines
    assert len(lines) == 4  # two streaks: each logged when it starts and when it ends


def test_close_ends_the_thread_while_it_waits_for_events(
    docker: FakeDocker, running: tuple[Discovery, queue.Queue[DiscoveryEvent]]
) -> None:
    discovery, got = running
    discovery.start()
    next_event(got)
    wait_stream(docker, 1)
    discovery.close()
    assert discovery._thread is not None and not discovery._thread.is_alive()


def test_a_receiver_that_raises_does_not_stop_the_discovery(
    docker: FakeDocker, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[DiscoveryEvent] = []

    def deliver(event: DiscoveryEvent) -> None:
        got.append(event)
        if len(got) == 1:
            raise RuntimeError("bug in the receiver")

    discovery = Discovery(deliver, DockerLabelSource(Client(docker)), clock=lambda: 1.0)
    try:
        discovery.start()
        stream = wait_stream(docker, 1)
        stream.items.put(event("destroy", "a", {"knockgate.door": "web"}))
        for _ in range(500):
            if len(got) == 2:
                break
            threading.Event().wait(0.01)
    finally:
        discovery.close()
    assert isinstance(got[1], Removed)
    assert "delivering Listed failed" in caplog.text


def test_published_ports_come_from_the_configured_bindings() -> None:
    attrs = {
        "HostConfig": {
            "PortBindings": {
                "443/tcp": [{"HostIp": "", "HostPort": "8443"}],
                "80/tcp": [
                    {"HostIp": "0.0.0.0", "HostPort": "8080"},
                    {"HostIp": "::", "HostPort": "8080"},
                ],
                "53/udp": [{"HostIp": "198.18.0.1", "HostPort": ""}],
                "9/sctp": [{"HostIp": "", "HostPort": "9"}],
                "bad": None,
            }
        }
    }
    assert published(attrs) == (
        Published(53, "udp", (Binding("198.18.0.1", 0),)),
        Published(80, "tcp", (Binding("0.0.0.0", 8080), Binding("::", 8080))),
        Published(443, "tcp", (Binding("", 8443),)),
    )
    assert published({}) == () and published({"HostConfig": {"PortBindings": None}}) == ()


def test_facts_feed_the_parser() -> None:
    facts = facts_of(inspect("a", {"knockgate.door": "web", "knockgate.idle_timeout": "5m"}))
    result = parse(facts, {"web"})
    assert isinstance(result, LabelProblem)
    assert result.lines[0].startswith('container kg-a: label knockgate.idle_timeout="5m"')
    ok = parse(facts_of(inspect("b", {"knockgate.door": "web"})), {"web"})
    assert isinstance(ok, GatedContainer) and ok.ports == (
        Published(80, "tcp", (Binding("", 8080),)),
    )


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
EVENTS = st.fixed_dictionaries(
    {},
    optional={
        "Action": st.sampled_from(["create", "start", "die", "destroy", "exec_start"]) | JSON,
        "status": JSON,
        "id": JSON,
        "Actor": st.fixed_dictionaries(
            {},
            optional={
                "ID": st.text(max_size=8) | JSON,
                "Attributes": st.dictionaries(
                    st.sampled_from(["knockgate.door", "knockgate.group", "name", "x"]),
                    st.text(max_size=8),
                )
                | JSON,
            },
        )
        | JSON,
    },
)


@settings(max_examples=300, deadline=None)
@given(event=EVENTS | JSON)
def test_any_event_gives_nothing_or_a_typed_event(event: Any) -> None:
    docker = FakeDocker()
    docker.containers["a"] = inspect("a", {"knockgate.door": "web"})
    found = container_event(event)
    if found is None:
        return
    assert found.action in ("create", "start", "die", "destroy") and found.id
    discovery = Discovery(lambda e: None, DockerLabelSource(Client(docker)), clock=lambda: 1.0)
    assert isinstance(discovery._change(found), Changed | Removed)


def test_facts_carry_every_network_address_and_the_start_time() -> None:
    attrs = inspect("a", {"knockgate.door": "web"})
    attrs["State"] = {"Status": "running", "Running": True, "StartedAt": "2026-12-04T10:00:00.5Z"}
    attrs["NetworkSettings"] = {
        "IPAddress": "",
        "Networks": {
            "front": {"IPAddress": "198.18.7.2", "GlobalIPv6Address": "2001:2:0::7"},
            "back": {"IPAddress": "198.18.8.2", "GlobalIPv6Address": ""},
            "odd": {"IPAddress": "not an address"},
        },
    }
    facts = facts_of(attrs)
    assert facts.addresses == ("198.18.7.2", "2001:2::7", "198.18.8.2")
    assert facts.started_at == 1796378400.5
    stopped = facts_of(inspect("b", {"knockgate.door": "web"}, status="exited"))
    assert stopped.addresses == () and stopped.started_at is None
