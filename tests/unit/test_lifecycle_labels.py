"""Playbooks of label-gated units in the lifecycle machine: events in, commands out."""

from __future__ import annotations

from appliance.core import lifecycle as lc
from appliance.core.model import Step
from appliance.services.labels import (
    Binding,
    ContainerFacts,
    LabelProblem,
    Published,
    host_steps,
    plan,
)

A = "198.18.6.1"
WEB = Step(8080, "tcp")
ALT = Step(8443, "tcp")


def policy(managed: bool, **changes: object) -> lc.Policy:
    values: dict[str, object] = {
        "name": "container web-1",
        "step": WEB,
        "idle_timeout": 5.0,
        "max_lifetime": 100.0,
        "steps": (WEB, ALT),
        "managed": managed,
    }
    values.update(changes)
    return lc.Policy(**values)  # type: ignore[arg-type]


def units(*policies: lc.Policy) -> lc.Lifecycles:
    machines = lc.Lifecycles()
    machines.adopted = True
    for p in policies:
        assert machines.put(p) == []
    return machines


def knock(ts: float, until: float = 60.0, name: str = "container web-1") -> lc.KnockCompleted:
    return lc.KnockCompleted(ts, name, A, (WEB, ALT), until, "web")


def test_a_user_container_not_started_on_knock_is_refused_while_stopped() -> None:
    machines = units(policy(managed=False))
    [notice] = machines.handle(knock(1.0))
    assert isinstance(notice, lc.Notice) and notice.refused
    assert "start_on_knock is false" in notice.text
    assert machines.machines["container web-1"].state == "cold"  # never started


def test_a_running_user_container_is_granted_and_never_stopped() -> None:
    machines = units(policy(managed=False))
    [seen] = machines.handle(lc.Observed(1.0, "container web-1", True, "id1"))
    assert isinstance(seen, lc.Notice)
    assert machines.handle(knock(2.0, until=30.0)) == [
        lc.GrantAccess("container web-1", A, (WEB, ALT), 30.0, "web", 2.0)
    ]
    # Idle far past idle_timeout and max_lifetime: only the grant expires, no Stop.
    assert machines.handle(lc.ConnectionsSeen(3.0, "container web-1", 0)) == []
    assert machines.handle(lc.Tick(1000.0)) == []
    machine = machines.machines["container web-1"]
    assert machine.state == "ready" and not machine.holders
    assert machines.counting() == {}  # its connections decide nothing


def test_a_user_container_stopped_by_hand_loses_its_grants() -> None:
    machines = units(policy(managed=False))
    machines.handle(lc.Observed(1.0, "container web-1", True, "id1"))
    machines.handle(knock(2.0))
    out = machines.handle(lc.Observed(3.0, "container web-1", False))
    assert out[0] == lc.RevokeAccess("container web-1", A, (WEB, ALT), "the container stopped")
    assert machines.machines["container web-1"].state == "cold"


def test_started_on_knock_granted_once_ready_then_stopped_when_idle() -> None:
    machines = units(policy(managed=True))
    name = "container web-1"
    assert machines.handle(knock(1.0)) == [lc.Start(name)]
    assert machines.handle(lc.ContainerStarted(1.2, name, "id1")) == []
    assert machines.handle(lc.ContainerReady(1.5, name)) == [
        lc.GrantAccess(name, A, (WEB, ALT), 60.0, "web", 1.0)
    ]
    assert machines.counting() == {}  # serving: a holder keeps it up
    assert machines.handle(lc.Tick(61.0)) == []  # the grant expired: ready
    assert machines.counting() == {name: (WEB, ALT)}
    machines.handle(lc.ConnectionsSeen(62.0, name, 0))
    assert machines.handle(lc.Tick(66.0)) == []
    assert machines.handle(lc.Tick(67.0)) == [lc.Stop(name, "idle for 5 s")]
    assert machines.handle(lc.ContainerStopped(68.0, name)) == []
    assert machines.machines[name].state == "cold"


def test_a_stopped_container_seen_running_is_taken_over_and_stopped_when_idle() -> None:
    machines = units(policy(managed=True))
    name = "container web-1"
    machines.handle(lc.Observed(1.0, name, True, "id1"))
    machines.handle(lc.ConnectionsSeen(2.0, name, 0))
    assert machines.handle(lc.Tick(8.0)) == [lc.Stop(name, "idle for 5 s")]
    # Docker's die arrives while stopping: the worker's report decides, not discovery.
    assert machines.handle(lc.Observed(8.5, name, False)) == []
    assert machines.handle(lc.ContainerStopped(9.0, name)) == []


def test_forget_revokes_and_refuses_and_leaves_the_container() -> None:
    machines = units(policy(managed=True))
    name = "container web-1"
    machines.handle(lc.Observed(1.0, name, True, "id1"))
    machines.handle(knock(2.0))
    out = machines.forget(name, "no longer label-gated")
    assert out == [lc.RevokeAccess(name, A, (WEB, ALT), "no longer label-gated")]
    assert name not in machines.machines and not any(isinstance(c, lc.Stop) for c in out)
    [refusal] = machines.handle(knock(3.0))  # a knock for a forgotten unit
    assert isinstance(refusal, lc.Notice) and refusal.refused


def test_changed_ports_revoke_the_grants_on_the_old_ones() -> None:
    machines = units(policy(managed=False))
    name = "container web-1"
    machines.handle(lc.Observed(1.0, name, True, "id1"))
    machines.handle(knock(2.0))
    out = machines.put(policy(managed=False, steps=(WEB,)))
    assert out == [lc.RevokeAccess(name, A, (WEB, ALT), "its gated ports changed")]
    assert machines.machines[name].state == "ready"


def test_a_close_knock_on_a_user_container_revokes_without_stopping_it() -> None:
    machines = units(policy(managed=False))
    name = "container web-1"
    machines.handle(lc.Observed(1.0, name, True, "id1"))
    machines.handle(knock(2.0))
    assert machines.handle(lc.CloseKnock(3.0, name, A)) == []
    assert machines.machines[name].state == "ready"


# ----------------------------------------------------------------- the plan


def facts(
    ident: str, labels: dict[str, str], port: int = 80, host: int = 8080, **more: object
) -> ContainerFacts:
    published = (Published(port, "tcp", (Binding("", host),)),) if host else ()
    return ContainerFacts(
        ident,
        f"kg-{ident}",
        str(more.get("state", "running")),
        tuple(sorted(labels.items())),
        published,
        more.get("addresses", (f"198.18.7.{len(ident)}",)),  # type: ignore[arg-type]
    )


def test_a_group_starts_in_dependency_order_and_only_gated_ports_are_closed() -> None:
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
    )
    db = facts(
        "db",
        {**project, "com.docker.compose.service": "db", "knockgate.group": "shop"},
        port=5432,
        host=0,
    )
    found = plan((app, db), {"web": True})
    [unit] = found.units
    assert unit.name == "group shop" and [m.name for m in unit.members] == ["kg-db", "kg-app"]
    assert unit.ports("web") == (WEB,) and unit.managed
    assert found.protected == (WEB,) and found.problems == ()
    assert found.direct == (("198.18.7.3", Step(80, "tcp")),)


def test_a_bad_label_or_a_door_without_open_closes_every_published_port() -> None:
    bad = facts("bad", {"knockgate.door": "web", "knockgate.idle_timeout": "5m"}, host=9090)
    shut = facts("shut", {"knockgate.door": "knock-only"}, host=9091)
    found = plan((bad, shut), {"web": True, "knock-only": False})
    assert found.units == ()
    assert [type(p) for p in found.problems] == [LabelProblem, LabelProblem]
    assert "knockgate.idle_timeout" in found.problems[0].message
    assert "has no open:" in found.problems[1].message
    assert found.protected == (Step(9090, "tcp"), Step(9091, "tcp"))
    assert {entry[1] for entry in found.direct} == {Step(80, "tcp")}


def test_a_missing_door_is_a_problem_and_stays_closed() -> None:
    found = plan((facts("a", {"knockgate.door": "gone"}),), {"web": True})
    assert found.units == () and found.protected == (WEB,)
    assert "no such door" in found.problems[0].message


def test_host_steps_leave_out_ephemeral_bindings() -> None:
    ports = (Published(80, "tcp", (Binding("", 0), Binding("127.0.0.1", 8080))),)
    assert host_steps(ports) == (WEB,)


def test_every_network_address_of_a_gated_container_is_gated() -> None:
    two = facts(
        "app",
        {"knockgate.door": "web"},
        addresses=("198.18.7.9", "198.18.8.9", "2001:2::9"),
    )
    found = plan((two,), {"web": True})
    assert set(found.direct) == {
        ("198.18.7.9", Step(80, "tcp")),
        ("198.18.8.9", Step(80, "tcp")),
        ("2001:2::9", Step(80, "tcp")),
    }


def test_max_lifetime_counts_from_the_containers_real_start_when_taken_over() -> None:
    """Regression: a unit found running (e.g. after a restart of knockgate) was given a
    fresh max_lifetime from the moment it was seen."""
    machines = units(policy(managed=True, max_lifetime=100.0, idle_timeout=1000.0))
    name = "container web-1"
    machines.handle(lc.Observed(500.0, name, True, "id1", since=450.0))
    machines.handle(lc.ConnectionsSeen(501.0, name, 1))
    assert machines.handle(lc.Tick(549.0)) == []
    assert machines.handle(lc.Tick(551.0)) == [lc.Stop(name, "max_lifetime reached")]
