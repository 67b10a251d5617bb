"""The launcher's RPC (appliance.services.broker / remote / rpc) against an in-memory engine.

- hostile request lines never raise: each gets an error reply (hypothesis);
- a container that is neither this owner's nor labelled is refused for every verb that
  names it (logged once), ``remove`` only for the owner's own;
- ``create`` names a catalogue service only, with its definition's hash;
- over a real Unix socket: ``RemoteRuntime`` drives ``ServiceLauncher``, streams end on
  ``close``, a bad client gets an error and the server goes on serving others.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.config.schema import Service
from appliance.errors import ContainerError
from appliance.services.broker import Broker, LauncherServer, read_catalogue
from appliance.services.discovery import ContainerEvent
from appliance.services.fake import FakeRuntime
from appliance.services.labels import Binding, ContainerFacts, Published
from appliance.services.launcher import ServiceLauncher, config_hash
from appliance.services.remote import RemoteRuntime
from appliance.services.rpc import (
    MAX_REQUEST,
    SHAPES,
    Invalid,
    container_from,
    container_json,
    facts_from,
    facts_json,
)
from appliance.services.runtime import LABEL_OWNER, Container

OWNER = "0123456789ab"
OTHER_OWNER = "ba9876543210"
WEB = Service("web", "kg-web:local", 80, 8080)
CATALOGUE = {"web": WEB}


class FakeEvents:
    def __init__(self) -> None:
        self.items: queue.SimpleQueue[ContainerEvent | None] = queue.SimpleQueue()

    def __iter__(self) -> Iterator[ContainerEvent]:
        while (item := self.items.get()) is not None:
            yield item

    def close(self) -> None:
        self.items.put(None)


class FakeEngine(FakeRuntime):
    """FakeRuntime plus the launcher's looks at one container and the labelled ones."""

    def __init__(self) -> None:
        super().__init__()
        self.event_streams: list[FakeEvents] = []

    def add(self, ident: str, labels: dict[str, str], state: str = "exited") -> Container:
        container = Container(ident, f"kg-{ident}", "", state, labels=labels)  # type: ignore[arg-type]
        self.containers[ident] = container
        return container

    def get(self, ident: str) -> Container | None:
        found = self.containers.get(ident)
        return None if found is None else self._copy(found)

    def facts(self, ident: str) -> ContainerFacts | None:
        found = self.containers.get(ident)
        if found is None:
            return None
        return ContainerFacts(
            found.id, found.name, found.state, tuple(sorted(found.labels.items()))
        )

    def labelled(self) -> tuple[ContainerFacts, ...]:
        return tuple(
            f
            for c in self.containers.values()
            if (f := self.facts(c.id)) is not None
            and ("knockgate.door" in c.labels or "knockgate.group" in c.labels)
        )

    def events(self) -> FakeEvents:
        stream = FakeEvents()
        self.event_streams.append(stream)
        return stream


def broker(engine: FakeEngine | None = None) -> Broker:
    return Broker(engine or FakeEngine(), OWNER, lambda: dict(CATALOGUE))


def ask(b: Broker, **request: Any) -> dict[str, Any]:
    reply, stream = b.answer(json.dumps(request).encode() + b"\n")
    if stream is not None:
        stream[1]()
    return reply


# ------------------------------------------------------------------ hostile input


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=MAX_REQUEST + 64))
def test_any_bytes_get_a_reply_never_an_exception(line: bytes) -> None:
    reply, stream = broker().answer(line)
    assert isinstance(reply, dict) and reply["ok"] in (True, False)
    if stream is not None:
        stream[1]()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=200),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from([*SHAPES, "exec", "", "START"]),
    st.dictionaries(
        st.sampled_from(["container", "owner", "service", "config_hash", "image", "x"]),
        json_values,
        max_size=4,
    ),
)
def test_hostile_requests_of_every_verb_get_an_error_reply(verb: str, args: dict[str, Any]) -> None:
    engine = FakeEngine()
    engine.add("stranger", {})
    reply = ask(broker(engine), verb=verb, **args)
    assert reply["ok"] in (True, False)
    if not reply["ok"]:
        assert isinstance(reply["error"], str) and reply["error"]
    # Nothing that is not knockgate's or labelled was touched.
    assert engine.containers["stranger"].state == "exited"
    assert "stranger" in engine.containers


@pytest.mark.parametrize(
    "line, error",
    [
        (b"\n", "not a JSON line"),
        (b"[]\n", "expected a JSON object"),
        (b'{"verb": "exec"}\n', "unknown verb"),
        (b'{"verb": "start"}\n', "expected container"),
        (b'{"verb": "start", "container": "c1", "image": "x"}\n', "expected container"),
        (b'{"verb": "start", "container": "../x"}\n', "is not valid"),
        (b'{"verb": "start", "container": 7}\n', "is not valid"),
        (b'{"verb": "create", "service": "web", "owner": "0123456789ab"}\n', "expected"),
        (b"x" * (MAX_REQUEST + 1), "too long"),
        (b"[" * 3000 + b"\n", "not a JSON line"),
    ],
)
def test_bad_requests_are_named(line: bytes, error: str) -> None:
    reply, stream = broker().answer(line)
    assert stream is None
    assert reply["ok"] is False and error in reply["error"], reply


# ------------------------------------------------------------------ who may be touched


@pytest.mark.parametrize("verb", ["start", "stop", "pause", "unpause", "remove", "refresh"])
def test_a_container_neither_ours_nor_labelled_is_refused(
    verb: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = FakeEngine()
    engine.add("stranger", {"com.example": "x", LABEL_OWNER: OTHER_OWNER})
    b = broker(engine)
    with caplog.at_level(logging.WARNING, "knockgate.launcher"):
        for _ in range(3):
            reply = ask(b, verb=verb, container="stranger")
            assert reply["ok"] is False
            assert f"refused {verb} of container kg-stranger" in reply["error"]
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1  # once per container
    assert engine.calls == []  # Docker was asked nothing beyond the look
    assert engine.containers["stranger"].state == "exited"


def test_inspect_refuses_a_stranger_and_answers_for_a_labelled_one() -> None:
    engine = FakeEngine()
    engine.add("stranger", {})
    engine.add("app", {"knockgate.door": "web"})
    b = broker(engine)
    assert ask(b, verb="inspect", container="stranger")["ok"] is False
    facts = facts_from(ask(b, verb="inspect", container="app")["result"])
    assert facts.label_map == {"knockgate.door": "web"}
    assert ask(b, verb="inspect", container="gone") == {"ok": True, "result": None}


@pytest.mark.parametrize(
    "labels", [{LABEL_OWNER: OWNER}, {"knockgate.door": "web"}, {"knockgate.group": "g"}]
)
def test_ours_or_labelled_may_be_started_stopped_paused(labels: dict[str, str]) -> None:
    engine = FakeEngine()
    engine.add("c1", labels)
    b = broker(engine)
    for verb, state in [("start", "running"), ("pause", "paused"), ("unpause", "running")]:
        assert ask(b, verb=verb, container="c1") == {"ok": True, "result": None}
        assert engine.containers["c1"].state == state
    assert container_from(ask(b, verb="refresh", container="c1")["result"]).state == "running"
    assert ask(b, verb="stop", container="c1")["ok"] is True
    assert engine.containers["c1"].state == "exited"


def test_remove_only_for_the_owners_own() -> None:
    engine = FakeEngine()
    engine.add("app", {"knockgate.door": "web"})
    engine.add("mine", {LABEL_OWNER: OWNER})
    b = broker(engine)
    reply = ask(b, verb="remove", container="app")
    assert reply["ok"] is False and "only knockgate's own" in reply["error"]
    assert "app" in engine.containers
    assert ask(b, verb="remove", container="mine")["ok"] is True
    assert "mine" not in engine.containers


def test_another_owner_is_refused_for_listing_and_creating() -> None:
    b = broker()
    for request in (
        {"verb": "owned", "owner": OTHER_OWNER},
        {"verb": "deaths", "owner": OTHER_OWNER},
        {"verb": "create", "service": "web", "owner": OTHER_OWNER, "config_hash": "0" * 16},
    ):
        reply = ask(b, **request)
        assert reply["ok"] is False and "not this installation's" in reply["error"]


def test_create_by_name_from_the_catalogue_only() -> None:
    engine = FakeEngine()
    b = broker(engine)
    wrong = ask(b, verb="create", service="web", owner=OWNER, config_hash="0" * 16)
    assert wrong["ok"] is False and "differs from the monitor's" in wrong["error"]
    unknown = ask(b, verb="create", service="db", owner=OWNER, config_hash=config_hash(WEB))
    assert unknown["ok"] is False and "no such service" in unknown["error"]
    assert engine.containers == {}
    made = ask(b, verb="create", service="web", owner=OWNER, config_hash=config_hash(WEB))
    container = container_from(made["result"])
    assert container.service == "web" and container.labels[LABEL_OWNER] == OWNER


def test_a_docker_failure_is_an_error_reply() -> None:
    engine = FakeEngine()
    engine.add("mine", {LABEL_OWNER: OWNER})
    engine.fail = "start"
    reply = ask(broker(engine), verb="start", container="mine")
    assert reply == {"ok": False, "error": "fake docker: start failed (as the test asked)"}


def test_the_types_survive_the_wire() -> None:
    container = FakeRuntime().create(WEB, OWNER, "h")
    container.started_at = 1.5
    assert container_from(json.loads(json.dumps(container_json(container)))) == container
    facts = ContainerFacts(
        "i",
        "n",
        "running",
        (("a", "b"),),
        (Published(80, "tcp", (Binding("", 8080),)),),
        addresses=("198.18.7.2", "2001:2::7"),
        started_at=1764840000.25,
    )
    # Regression: the addresses were left out, so in the appliance no labelled
    # container's own address was gated.
    assert facts_from(json.loads(json.dumps(facts_json(facts)))) == facts


@pytest.mark.parametrize(
    "address",
    ["fe80::1%eth0", "fe80::1%x\nforged log line", "198.018.7.2", "2001:0002::7", "", 7, None],
)
def test_an_address_not_in_canonical_form_is_refused_on_the_wire(address: object) -> None:
    facts = ContainerFacts("i", "n", "running", addresses=("198.18.7.2",))
    data = json.loads(json.dumps(facts_json(facts)))
    data["addresses"] = [address]
    with pytest.raises(Invalid):
        facts_from(data)


def test_the_catalogue_is_read_without_the_doors(tmp_path: Path) -> None:
    config = tmp_path / "kg.yaml"
    config.write_text(
        "services:\n  web: {image: kg-web:local, container_port: 80, host_port: 8080}\n"
        "doors:\n  ssh:\n    spa: {users: [{key_file: /nonexistent/kg-keys}]}\n"
    )
    assert read_catalogue(str(config)) == {
        "web": Service("web", "kg-web:local", 80, 8080, build=None)
    }
    config.write_text("services:\n  web: {image: x}\n")
    with pytest.raises(Exception, match="container_port"):
        read_catalogue(str(config))


# ------------------------------------------------------------------ over a socket


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[FakeEngine, str]]:
    engine = FakeEngine()
    path = str(tmp_path / "kg-launcher.sock")
    server = LauncherServer(broker(engine), path)
    server.bind()
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield engine, path
    finally:
        server.close()
        thread.join(5)
    assert not os.path.exists(path)


def test_remote_runtime_drives_the_service_launcher(served: tuple[FakeEngine, str]) -> None:
    engine, path = served
    remote = RemoteRuntime(path)
    launcher = ServiceLauncher(remote, [WEB], OWNER)
    launched = launcher.run(WEB)
    assert launched.container.state == "running"
    assert engine.calls == ["owned", "create", "start web"]
    assert [c.service for c in remote.owned(OWNER)] == ["web"]
    assert launcher.stop("web", "test") is True
    assert engine.containers[launched.container.id].state == "exited"
    launcher.adopt(())  # an orphan now: removed, as the owner's own
    assert engine.containers == {}
    gone = remote.refresh(launched.container)
    assert gone.state == "missing"


def test_remote_refusals_and_docker_errors_are_container_errors(
    served: tuple[FakeEngine, str],
) -> None:
    engine, path = served
    stranger = engine.add("stranger", {})
    remote = RemoteRuntime(path)
    with pytest.raises(ContainerError, match="refused start of container kg-stranger"):
        remote.start(stranger)
    with pytest.raises(ContainerError, match="refused"):
        remote.inspect("stranger")
    with pytest.raises(ContainerError, match="bad request"):
        remote.start(Container("bad id!", "x", "", "running"))


def test_streams_deliver_until_closed(served: tuple[FakeEngine, str]) -> None:
    engine, path = served
    remote = RemoteRuntime(path)
    mine = engine.create(WEB, OWNER, config_hash(WEB))
    deaths = remote.deaths(OWNER)
    events = remote.events()
    got: queue.SimpleQueue[object] = queue.SimpleQueue()

    def follow(stream: Any) -> None:
        try:
            for item in stream:
                got.put(item)
            got.put("ended")
        except ContainerError as error:
            got.put(error)

    for stream in (deaths, events):
        threading.Thread(target=follow, args=(stream,), daemon=True).start()
    engine.die(mine, at=5.0)
    assert got.get(timeout=5).container == mine.id  # type: ignore[attr-defined]
    engine.event_streams[0].items.put(ContainerEvent("start", "app", "kg-app"))
    assert got.get(timeout=5) == ContainerEvent("start", "app", "kg-app")
    deaths.close()
    events.close()
    assert {got.get(timeout=5), got.get(timeout=5)} == {"ended"}


def test_a_broken_stream_raises_in_the_client(served: tuple[FakeEngine, str]) -> None:
    engine, path = served
    events = RemoteRuntime(path).events()
    engine.event_streams[0].close()  # Docker's stream ends
    with pytest.raises(ContainerError, match="event stream ended"):
        list(events)


def test_a_hostile_client_gets_errors_and_others_are_served(
    served: tuple[FakeEngine, str],
) -> None:
    _, path = served
    hostile = socket.socket(socket.AF_UNIX)
    hostile.connect(path)
    reader = hostile.makefile("rb")
    for line in (b"\xff\xfe\n", b'{"verb": "exec", "argv": ["sh"]}\n', b"{}\n"):
        hostile.sendall(line)
        assert json.loads(reader.readline())["ok"] is False
    # Meanwhile other clients, at once, are answered.
    answers: list[int] = []

    def client() -> None:
        answers.append(len(RemoteRuntime(path).owned(OWNER)))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert answers == [0] * 8
    hostile.sendall(b"x" * (MAX_REQUEST + 10) + b"\n")
    assert "too long" in json.loads(reader.readline())["error"]
    assert reader.readline() == b""  # and that connection is closed
    reader.close()
    hostile.close()
    assert RemoteRuntime(path).owned(OWNER) == []


def test_no_launcher_is_a_container_error(tmp_path: Path) -> None:
    remote = RemoteRuntime(str(tmp_path / "kg-none.sock"), connect_wait=0.2)
    with pytest.raises(ContainerError, match="is `knockgate launcher` running"):
        remote.owned(OWNER)
