"""The label parser: a user's container labels -> a GatedContainer or a LabelProblem."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.config.schema import Readiness
from appliance.services.labels import (
    Binding,
    ContainerFacts,
    GatedContainer,
    LabelProblem,
    Published,
    parse,
    start_order,
)

DOORS = frozenset({"web", "ssh"})
HTTP = Published(80, "tcp", (Binding("0.0.0.0", 8080), Binding("::", 8080)))
HTTPS = Published(443, "tcp", (Binding("0.0.0.0", 8443),))
DNS = Published(53, "udp", (Binding("198.18.0.1", 5353),))
EPHEMERAL = Published(9000, "tcp", (Binding("0.0.0.0", 0),))


def facts(
    labels: dict[str, str], published: tuple[Published, ...] = (HTTP, HTTPS)
) -> ContainerFacts:
    return ContainerFacts("0123456789abcdef", "web-1", "running", tuple(labels.items()), published)


def gated(
    labels: dict[str, str], published: tuple[Published, ...] = (HTTP, HTTPS)
) -> GatedContainer:
    result = parse(facts(labels, published), DOORS)
    assert isinstance(result, GatedContainer), result
    return result


def problem(
    labels: dict[str, str], published: tuple[Published, ...] = (HTTP, HTTPS)
) -> LabelProblem:
    result = parse(facts(labels, published), DOORS)
    assert isinstance(result, LabelProblem), result
    return result


def test_a_door_alone_gates_every_published_port_with_the_defaults() -> None:
    result = gated({"knockgate.door": "web"})
    assert result.door == "web"
    assert result.ports == (HTTP, HTTPS)
    assert result.ready == Readiness()
    assert result.start_on_knock is False
    assert (result.idle_timeout, result.max_lifetime) == (300.0, 86_400.0)
    assert result.group is None


def test_every_label_is_read() -> None:
    labels = {
        "knockgate.door": " web ",
        "knockgate.ports": "443, 53/udp",
        "knockgate.ready": "http:/healthz",
        "knockgate.start_on_knock": "TRUE",
        "knockgate.idle_timeout": "120",
        "knockgate.max_lifetime": "3600.5",
        "knockgate.group": "blog",
        "com.docker.compose.project": "blog",
        "com.docker.compose.service": "app",
        "com.docker.compose.depends_on": "db:service_started:false,cache:service_healthy:true",
    }
    result = gated(labels, (HTTP, HTTPS, DNS))
    assert result.ports == (HTTPS, DNS)
    assert result.ready == Readiness(kind="http", path="/healthz")
    assert result.start_on_knock is True
    assert (result.idle_timeout, result.max_lifetime) == (120.0, 3600.5)
    assert (result.group, result.compose_project, result.compose_service) == ("blog", "blog", "app")
    assert result.depends_on == ("db", "cache")


@pytest.mark.parametrize(
    ("value", "ready"),
    [
        ("tcp", Readiness()),
        ("http", Readiness(kind="http", path="/")),
        ("banner:SSH-", Readiness(kind="banner", expect="SSH-")),
        ("healthcheck", Readiness(kind="healthcheck")),
    ],
)
def test_ready_forms(value: str, ready: Readiness) -> None:
    assert gated({"knockgate.door": "web", "knockgate.ready": value}).ready == ready


def test_the_issue_example_names_container_label_and_what_was_expected() -> None:
    labels = {"knockgate.door": "web", "knockgate.start_on_knock": "true"}
    result = problem(labels | {"knockgate.idle_timeout": "5m"})
    assert result.lines == (
        'container web-1: label knockgate.idle_timeout="5m": expected seconds, a number',
    )


@pytest.mark.parametrize(
    ("labels", "line"),
    [
        ({}, "label knockgate.door: missing"),
        (
            {"knockgate.door": "nope"},
            'knockgate.door="nope": no such door in knockgate\'s configuration (doors: ssh, web)',
        ),
        (
            {"knockgate.door": "web", "knockgate.idel_timeout": "5"},
            "label knockgate.idel_timeout: unknown knockgate label",
        ),
        ({"knockgate.door": "web", "Knockgate.Group": "x"}, "did you mean knockgate.group?"),
        (
            {"knockgate.door": "web", "knockgate.ports": "8080"},
            "8080/tcp is a host port: name the container's port (80/tcp)",
        ),
        (
            {"knockgate.door": "web", "knockgate.ports": "22"},
            "22/tcp is not a published port of this container (published: 80/tcp, 443/tcp)",
        ),
        (
            {"knockgate.door": "web", "knockgate.ports": "80/sctp"},
            '"80/sctp": expected PORT or PORT/tcp or PORT/udp',
        ),
        ({"knockgate.door": "web", "knockgate.ports": "70000"}, "1 to 65535"),
        ({"knockgate.door": "web", "knockgate.ports": ""}, '""'),
        ({"knockgate.door": "web", "knockgate.ready": "http:no-slash"}, "expected http:/path"),
        ({"knockgate.door": "web", "knockgate.ready": "banner:"}, "expected banner:TEXT"),
        ({"knockgate.door": "web", "knockgate.ready": "udp"}, "expected tcp, http"),
        ({"knockgate.door": "web", "knockgate.start_on_knock": "maybe"}, "expected true or false"),
        (
            {"knockgate.door": "web", "knockgate.idle_timeout": "60"},
            "has no effect without knockgate.start_on_knock=true",
        ),
        (
            {
                "knockgate.door": "web",
                "knockgate.start_on_knock": "1",
                "knockgate.max_lifetime": "0",
            },
            "expected seconds, 1 to",
        ),
        (
            {
                "knockgate.door": "web",
                "knockgate.start_on_knock": "1",
                "knockgate.idle_timeout": "nan",
            },
            "expected seconds, a number",
        ),
        (
            {"knockgate.door": "web", "knockgate.group": "app"},
            "needs knockgate.start_on_knock=true",
        ),
        (
            {
                "knockgate.door": "web",
                "knockgate.start_on_knock": "1",
                "knockgate.group": "Bad Name",
            },
            "expected 1-63",
        ),
        (
            {"knockgate.group": "app", "knockgate.ports": "80"},
            "a group member without knockgate.door is never gated",
        ),
        ({"knockgate.door": "web", "knockgate.owner": "x"}, "catalogue container"),
        ({"knockgate.group": "app", "knockgate.service": "ssh"}, "catalogue container"),
    ],
)
def test_each_bad_label_is_one_line_naming_container_and_label(
    labels: dict[str, str], line: str
) -> None:
    result = problem(labels)
    assert len(result.lines) >= 1
    assert all(
        text.startswith("container web-1: label knockgate.")
        or text.startswith("container web-1: label Knockgate.")
        for text in result.lines
    )
    assert any(line in text for text in result.lines), result.lines
    assert (result.id, result.name) == ("0123456789abcdef", "web-1")


def test_every_problem_is_reported_not_only_the_first() -> None:
    result = problem({"knockgate.door": "nope", "knockgate.ready": "x", "knockgate.typo": "1"})
    assert len(result.lines) == 3


def test_nothing_published_or_an_ephemeral_port_cannot_be_gated() -> None:
    assert "publishes no port" in problem({"knockgate.door": "web"}, ()).message
    assert "ephemeral host port" in problem({"knockgate.door": "web"}, (HTTP, EPHEMERAL)).message
    # naming only the fixed port is fine
    assert gated({"knockgate.door": "web", "knockgate.ports": "80"}, (HTTP, EPHEMERAL)).ports == (
        HTTP,
    )


def test_a_door_less_group_member_is_started_with_its_group_and_never_gated() -> None:
    result = gated({"knockgate.group": "blog", "knockgate.ready": "tcp"}, ())
    assert (result.door, result.ports, result.group, result.start_on_knock) == (
        None,
        (),
        "blog",
        True,
    )


def test_other_labels_and_knockgate_own_catalogue_labels_are_not_problems() -> None:
    assert (
        gated({"knockgate.door": "web", "traefik.enable": "true", "knockgatex": "1"}).door == "web"
    )


def test_a_hostile_value_is_escaped_and_cut_short() -> None:
    result = problem({"knockgate.door": "web", "knockgate.ready": "x\n" + "A" * 5000})
    line = result.lines[0]
    assert "\n" not in line and len(line) < 300
    assert "\\x0a" in line and "5002 characters" in line


LABEL_KEYS = st.sampled_from(
    [
        "knockgate.door",
        "knockgate.ports",
        "knockgate.ready",
        "knockgate.start_on_knock",
        "knockgate.idle_timeout",
        "knockgate.max_lifetime",
        "knockgate.group",
        "knockgate.owner",
        "com.docker.compose.depends_on",
        "com.docker.compose.project",
    ]
)
LABEL_VALUES = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["web", "ssh", "80", "8080", "80/udp", "true", "1e9", "http:/", "banner:"]),
)
BINDINGS = st.builds(Binding, st.sampled_from(["0.0.0.0", "::"]), st.integers(0, 65535))
PUBLISHED = st.builds(
    Published, st.integers(1, 65535), st.sampled_from(["tcp", "udp"]), st.tuples(BINDINGS)
)


@settings(max_examples=400, deadline=None)
@given(
    labels=st.dictionaries(st.one_of(LABEL_KEYS, st.text(max_size=20)), LABEL_VALUES, max_size=8),
    published=st.lists(PUBLISHED, max_size=3).map(tuple),
    name=st.text(max_size=30),
)
def test_arbitrary_labels_never_raise(
    labels: dict[str, str], published: tuple[Published, ...], name: str
) -> None:
    result = parse(ContainerFacts("id", name, "exited", tuple(labels.items()), published), DOORS)
    assert isinstance(result, GatedContainer | LabelProblem)
    if isinstance(result, LabelProblem):
        assert result.lines and all(line.startswith("container ") for line in result.lines)
        assert all("\n" not in line for line in result.lines)
    elif result.door is not None:
        assert result.door in DOORS and result.ports


def member(
    name: str, service: str, depends_on: tuple[str, ...] = (), project: str = "blog"
) -> GatedContainer:
    return GatedContainer(
        id=f"id-{name}",
        name=name,
        state="exited",
        door=None,
        ports=(),
        group="blog",
        compose_project=project,
        compose_service=service,
        depends_on=depends_on,
    )


def test_a_group_starts_in_compose_dependency_order() -> None:
    app = member("blog-app-1", "app", ("db", "cache"))
    db = member("blog-db-1", "db")
    cache = member("blog-cache-1", "cache", ("db",))
    worker = member("blog-worker-1", "worker", ("app", "mail"))  # mail: not in the group
    assert start_order([worker, app, db, cache]) == (db, cache, app, worker)


def test_depends_on_counts_only_within_one_compose_project() -> None:
    app = member("a-app", "app", ("db",), project="a")
    other_db = member("b-db", "db", project="b")
    assert start_order([other_db, app]) == (app, other_db)  # no order: by name


def test_a_dependency_cycle_or_mixed_groups_are_refused() -> None:
    one, two = member("one", "one", ("two",)), member("two", "two", ("one",))
    assert start_order([one, two]) == "group blog: a dependency cycle among one, two"
    other = GatedContainer("x", "x", "exited", None, (), group="other")
    assert start_order([one, other]) == "members of several groups: blog, other"
    assert start_order([]) == ()


@settings(max_examples=200, deadline=None)
@given(edges=st.lists(st.tuples(st.sampled_from("abcde"), st.sampled_from("abcdef")), max_size=10))
def test_any_order_found_respects_every_dependency(edges: list[tuple[str, str]]) -> None:
    names = sorted({a for a, _ in edges} | {"a"})
    members = [member(n, n, tuple(b for a, b in edges if a == n)) for n in names]
    order = start_order(members)
    if isinstance(order, str):
        assert "cycle" in order
        return
    position = {m.compose_service: i for i, m in enumerate(order)}
    assert sorted(position) == names
    for a, b in edges:
        if b in position and a != b:
            assert position[b] < position[a]
