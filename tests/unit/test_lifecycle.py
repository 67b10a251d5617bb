"""The service lifecycle state machine as playbooks: events in, the exact commands out."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.core.lifecycle import (
    TRANSITIONS,
    Adopted,
    CatalogueChanged,
    CloseKnock,
    Command,
    ConnectionsSeen,
    ContainerDied,
    ContainerFailed,
    ContainerReady,
    ContainerStarted,
    ContainerStopped,
    Found,
    GrantAccess,
    KnockCompleted,
    Lifecycles,
    LiveGrant,
    Notice,
    Pause,
    Policy,
    RevokeAccess,
    ServiceEvent,
    Start,
    Stop,
    Tick,
)
from appliance.core.model import Step

A, B = "198.18.9.1", "198.18.9.2"
SSH = Step(2222, "tcp")
INNER = Step(22, "tcp")


def ssh(**changes: Any) -> Policy:
    values: dict[str, Any] = {
        "name": "ssh",
        "step": SSH,
        "idle_timeout": 10.0,
        "max_lifetime": 100.0,
        "version": "v1",
    }
    values.update(changes)
    return Policy(**values)


def machines(*policies: Policy, adopted: bool = True) -> Lifecycles:
    m = Lifecycles(policies or (ssh(),))
    if adopted:
        m.handle(Adopted(0.0))
    return m


def knock(
    ts: float, address: str = A, seconds: float = 30.0, service: str = "ssh"
) -> KnockCompleted:
    return KnockCompleted(ts, service, address, (SSH,), ts + seconds, door="ssh-door")


def granted(k: KnockCompleted) -> GrantAccess:
    return GrantAccess("ssh", k.address, k.ports, k.until, k.door, k.ts)


def play(m: Lifecycles, *steps: tuple[ServiceEvent, list[Command]]) -> None:
    for event, expected in steps:
        assert m.handle(event) == expected, event


def started(ts: float, container: str = "c1") -> ContainerStarted:
    return ContainerStarted(ts, "ssh", container, "172.17.0.2", INNER, "v1")


def running(m: Lifecycles, ts: float = 1.0, address: str = A) -> KnockCompleted:
    """Knock, start, ready: ``address`` holds a grant."""
    k = knock(ts, address)
    play(
        m,
        (k, [Start("ssh")]),
        (started(ts + 0.1), []),
        (ContainerReady(ts + 0.3, "ssh"), [granted(k)]),
    )
    return k


def state(m: Lifecycles, name: str = "ssh") -> str:
    return m.machines[name].state


# ----------------------------------------------------------------- granting


def test_grant_only_once_ready_and_shared_by_knockers() -> None:
    m = machines()
    first, second = knock(1.0, A), knock(1.1, B)
    play(
        m,
        (first, [Start("ssh")]),
        (second, []),  # the second knocker waits for the same start
        (started(1.2), []),
        (ContainerReady(1.4, "ssh"), [granted(first), granted(second)]),
    )
    assert state(m) == "serving"
    third = knock(2.0, "198.18.9.3")
    play(m, (third, [granted(third)]))  # running: granted at once
    assert m.direct() == (("172.17.0.2", INNER),)
    assert m.launches == 1


def test_failed_start_grants_nothing() -> None:
    m = machines()
    play(
        m,
        (knock(1.0), [Start("ssh")]),
        (
            ContainerFailed(2.0, "ssh", "docker: no such image"),
            [
                Notice(
                    "ssh",
                    "error",
                    f"{A}: ssh-door: service ssh unavailable, no access: docker: no such image",
                    refused=True,
                )
            ],
        ),
    )
    assert state(m) == "cold" and m.failures == 1
    play(m, (knock(3.0), [Start("ssh")]))  # the next knock tries again


def test_a_grant_whose_deadline_passed_before_ready_is_not_made() -> None:
    m = machines()
    late = knock(1.0, seconds=5.0)
    play(
        m,
        (late, [Start("ssh")]),
        (started(2.0), []),
        (
            ContainerReady(7.0, "ssh"),
            [
                Notice(
                    "ssh",
                    "warning",
                    f"{A}: ssh-door: service ssh was ready too late for the grant",
                    refused=True,
                )
            ],
        ),
    )
    assert state(m) == "ready"


def test_stale_reports_change_nothing() -> None:
    m = machines()
    play(
        m,
        (ContainerReady(1.0, "ssh"), []),
        (ContainerStopped(1.0, "ssh"), []),
        (ContainerDied(1.0, "ssh", "c9"), []),
        (ConnectionsSeen(1.0, "ssh", 0), []),
        (ContainerReady(1.0, "nosuch"), []),
    )
    assert state(m) == "cold"


# ----------------------------------------------------------------- stopping


def test_idle_after_last_grant_and_connections_then_stop() -> None:
    m = machines()
    running(m, 1.0)  # grant until 31
    play(
        m,
        (Tick(20.0), []),
        (Tick(31.0), []),  # the grant expired: no holder, connections unknown yet
        (ConnectionsSeen(31.0, "ssh", 2), []),  # a session keeps it up
        (Tick(60.0), []),
        (ConnectionsSeen(61.0, "ssh", None), []),  # unknown: up
        (Tick(80.0), []),
        (ConnectionsSeen(81.0, "ssh", 0), []),  # idle from 81
        (Tick(90.9), []),
        (Tick(91.0), [Stop("ssh", "idle for 10 s")]),
        (ContainerDied(91.5, "ssh", "c1"), []),  # our own stop: the worker reports
        (ContainerStopped(91.6, "ssh"), []),
    )
    assert state(m) == "cold" and m.direct() == ()


def test_keep_warm_pauses_instead_and_a_knock_unpauses() -> None:
    m = Lifecycles((ssh(keep_warm=True),))
    play(
        m,
        (Adopted(0.0), [Start("ssh")]),  # warmed up at start
        (started(0.5), []),
        (ContainerReady(1.0, "ssh"), [Pause("ssh", "kept warm")]),
        (ContainerStopped(1.1, "ssh", paused=True), []),
    )
    assert state(m) == "paused"
    assert m.direct() == (("172.17.0.2", INNER),)  # a paused container is still gated
    k = knock(5.0)
    play(
        m,
        (k, [Start("ssh")]),
        (started(5.05), []),
        (ContainerReady(5.1, "ssh"), [granted(k)]),
        (CloseKnock(6.0, "ssh", A), [Pause("ssh", f"close knock from {A}")]),
    )


def test_close_knock_by_the_last_holder_stops_it() -> None:
    m = machines()
    running(m, 1.0, A)
    b = knock(2.0, B)
    play(
        m,
        (b, [granted(b)]),
        (CloseKnock(3.0, "ssh", A), []),
        (CloseKnock(3.5, "ssh", "198.18.9.77"), []),  # never held it
        (CloseKnock(4.0, "ssh", B), [Stop("ssh", f"close knock from {B}")]),
    )
    assert state(m) == "stopping"


def test_max_lifetime_revokes_every_grant_then_stops() -> None:
    m = machines(ssh(max_lifetime=50.0))
    running(m, 1.0)  # the container started at 1.1
    b = knock(40.0, B, seconds=500)
    play(
        m,
        (b, [granted(b)]),
        (Tick(51.0), []),
        (
            Tick(51.1),
            [
                RevokeAccess("ssh", B, (SSH,), "max_lifetime reached"),
                Stop("ssh", "max_lifetime reached"),
            ],
        ),
    )


def test_a_knock_while_stopping_wins() -> None:
    m = machines()
    running(m, 1.0)
    late = knock(12.0, B)
    play(
        m,
        (CloseKnock(10.0, "ssh", A), [Stop("ssh", f"close knock from {A}")]),
        (
            late,
            [
                Notice(
                    "ssh",
                    "info",
                    "ssh: a knock came while it was stopping: started again once stopped",
                )
            ],
        ),
        (ContainerStopped(13.0, "ssh"), [Start("ssh")]),
        (started(13.2, "c2"), []),
        (ContainerReady(13.5, "ssh"), [granted(late)]),
    )
    assert state(m) == "serving"


def test_container_died_outside_knockgate_revokes_its_grants() -> None:
    m = machines()
    running(m, 1.0)
    play(
        m,
        (ContainerDied(5.0, "ssh", "an-older-one"), []),
        (
            ContainerDied(6.0, "ssh", "c1"),
            [
                RevokeAccess("ssh", A, (SSH,), "the container stopped"),
                Notice("ssh", "warning", "ssh: its container stopped outside knockgate"),
            ],
        ),
    )
    assert state(m) == "cold"


def test_failed_stop_keeps_the_container_gated_and_asks_again() -> None:
    """Defect c: a failed Stop set the state to cold and forgot the container, which may
    still run: direct() dropped it from the gate and nothing stopped it again."""
    m = machines()
    running(m, 1.0)
    play(
        m,
        (CloseKnock(5.0, "ssh", A), [Stop("ssh", f"close knock from {A}")]),
        (
            ContainerFailed(5.5, "ssh", "docker: connection refused"),
            [
                Notice(
                    "ssh",
                    "error",
                    "ssh: stopping failed: docker: connection refused; asked again until it stops",
                )
            ],
        ),
    )
    assert state(m) == "stopping" and m.direct() == (("172.17.0.2", INNER),)
    play(
        m,
        (Tick(6.0), []),  # 1 s after the failure
        (Tick(6.5), [Stop("ssh", f"close knock from {A}")]),
        (ContainerFailed(7.0, "ssh", "docker: connection refused"), []),  # logged once
        (Tick(8.5), []),  # backing off: 2 s now
        (Tick(9.0), [Stop("ssh", f"close knock from {A}")]),
        (
            ContainerStopped(9.5, "ssh"),
            [Notice("ssh", "info", "ssh: stopped after 2 failed attempts")],
        ),
    )
    assert state(m) == "cold" and m.direct() == ()


def test_failed_pause_of_a_warm_service_is_asked_again_as_a_pause() -> None:
    m = Lifecycles((ssh(keep_warm=True),))
    play(
        m,
        (Adopted(0.0), [Start("ssh")]),
        (started(0.5), []),
        (ContainerReady(1.0, "ssh"), [Pause("ssh", "kept warm")]),
        (
            ContainerFailed(1.1, "ssh", "boom"),
            [Notice("ssh", "error", "ssh: stopping failed: boom; asked again until it stops")],
        ),
        (Tick(2.1), [Pause("ssh", "kept warm")]),
        (
            ContainerStopped(2.2, "ssh", paused=True),
            [Notice("ssh", "info", "ssh: paused after 1 failed attempts")],
        ),
    )
    assert state(m) == "paused"


def test_a_late_death_from_our_own_stop_does_not_end_the_restarted_run() -> None:
    """Defect d: Docker starts the same stopped container again under the same id; the
    die event of knockgate's own stop, arriving after the restart, revoked the live
    grants and marked the running container cold (ungated)."""
    m = machines()
    running(m, 1.0)  # Docker started c1 at 1.1
    b = knock(12.0, B)
    play(
        m,
        (CloseKnock(10.0, "ssh", A), [Stop("ssh", f"close knock from {A}")]),
        (ContainerStopped(11.0, "ssh"), []),
        (b, [Start("ssh")]),
        (ContainerStarted(12.3, "ssh", "c1", "172.17.0.2", INNER, "v1", since=12.2), []),
        (ContainerReady(12.5, "ssh"), [granted(b)]),
        (ContainerDied(12.6, "ssh", "c1", died=10.8), []),  # the stop at 10.8, late
    )
    assert state(m) == "serving" and m.direct() == (("172.17.0.2", INNER),)
    play(
        m,
        (
            ContainerDied(20.0, "ssh", "c1", died=19.9),  # this run's end
            [
                RevokeAccess("ssh", B, (SSH,), "the container stopped"),
                Notice("ssh", "warning", "ssh: its container stopped outside knockgate"),
            ],
        ),
    )
    assert state(m) == "cold"


# ----------------------------------------------------------------- restarts


def test_adopted_container_keeps_its_original_start_and_live_grants() -> None:
    m = Lifecycles((ssh(max_lifetime=100.0),))
    found = Found("ssh", "c1", "running", started=-80.0, address="172.17.0.2", inner=INNER)
    live = (LiveGrant(A, SSH, 40.0), LiveGrant(B, Step(80, "tcp"), 40.0))
    play(m, (Adopted(0.0, (found,), live), []))
    assert state(m) == "serving" and set(m.machines["ssh"].holders) == {A}
    play(
        m,
        (Tick(19.9), []),
        (
            Tick(20.0),  # 100 s after its ORIGINAL start, not after adoption
            [
                RevokeAccess("ssh", A, (SSH,), "max_lifetime reached"),
                Stop("ssh", "max_lifetime reached"),
            ],
        ),
    )


def test_adopted_without_grants_stops_when_idle() -> None:
    m = Lifecycles((ssh(),))
    found = Found("ssh", "c1", "running", started=-5.0)
    play(
        m,
        (Adopted(0.0, (found,), (LiveGrant(A, SSH, -1.0),)), []),  # an expired grant
        (ConnectionsSeen(1.0, "ssh", 0), []),
        (Tick(11.0), [Stop("ssh", "idle for 10 s")]),
    )


def test_adoption_happens_once() -> None:
    m = Lifecycles((ssh(),))
    found = Found("ssh", "c1", "running", started=0.0)
    play(m, (Adopted(0.0), []), (Adopted(1.0, (found,)), []))
    assert state(m) == "cold"


def test_a_knock_before_adoption_keeps_the_containers_age_and_live_grants() -> None:
    """Defect e: a knock before ``Adopted`` put the machine in starting, so adoption was
    ignored; the launcher returned the container that already ran and max_lifetime
    counted from then, and the kernel's live grants were not holders."""
    m = Lifecycles((ssh(max_lifetime=100.0),))
    b = knock(5.0, B)
    found = Found("ssh", "c1", "running", started=-80.0, address="172.17.0.2", inner=INNER)
    play(
        m,
        (b, [Start("ssh")]),
        (ContainerStarted(5.1, "ssh", "c1", "172.17.0.2", INNER, "v1", since=-80.0), []),
        (Adopted(5.2, (found,), (LiveGrant(A, SSH, 40.0),)), []),
        (ContainerReady(5.3, "ssh"), [granted(b)]),
    )
    assert state(m) == "serving" and set(m.machines["ssh"].holders) == {A, B}
    play(
        m,
        (Tick(19.9), []),
        (
            Tick(20.0),  # 100 s after its real start
            [
                RevokeAccess("ssh", A, (SSH,), "max_lifetime reached"),
                RevokeAccess("ssh", B, (SSH,), "max_lifetime reached"),
                Stop("ssh", "max_lifetime reached"),
            ],
        ),
    )


def test_adoption_after_a_knock_made_it_ready_adds_the_live_grants() -> None:
    m = Lifecycles((ssh(),))
    b = knock(5.0, B, seconds=3.0)
    play(
        m,
        (b, [Start("ssh")]),
        (ContainerStarted(5.1, "ssh", "c1", "172.17.0.2", INNER, "v1", since=-80.0), []),
        (ContainerReady(5.3, "ssh"), [granted(b)]),
        (Tick(8.0), []),  # B's grant is over
        (ConnectionsSeen(8.0, "ssh", 0), []),  # idle from 8
        (Adopted(9.0, (Found("ssh", "c1", "running", -80.0),), (LiveGrant(A, SSH, 40.0),)), []),
    )
    assert state(m) == "serving" and set(m.machines["ssh"].holders) == {A}
    play(m, (Tick(19.0), []))  # A's live grant keeps it up past idle_timeout


def test_live_grants_adopted_while_starting_are_revoked_when_the_start_fails() -> None:
    m = Lifecycles((ssh(),))
    play(
        m,
        (knock(5.0, B), [Start("ssh")]),
        (Adopted(5.2, (Found("ssh", "c1", "running", -80.0),), (LiveGrant(A, SSH, 40.0),)), []),
        (
            ContainerFailed(6.0, "ssh", "boom"),
            [
                Notice(
                    "ssh",
                    "error",
                    f"{B}: ssh-door: service ssh unavailable, no access: boom",
                    refused=True,
                ),
                RevokeAccess("ssh", A, (SSH,), "the container did not start"),
            ],
        ),
    )
    assert state(m) == "cold" and not m.machines["ssh"].holders


def test_an_unpaused_container_counts_max_lifetime_from_the_unpause() -> None:
    m = Lifecycles((ssh(keep_warm=True, max_lifetime=50.0),))
    k = knock(500.0, seconds=100.0)
    play(
        m,
        (Adopted(0.0, (Found("ssh", "c1", "paused", -1000.0, "172.17.0.2", INNER),)), []),
        (k, [Start("ssh")]),
        (
            ContainerStarted(500.1, "ssh", "c1", "172.17.0.2", INNER, "v1", -1000.0, resumed=True),
            [],
        ),
        (ContainerReady(500.2, "ssh"), [granted(k)]),
        (Tick(550.0), []),
        (
            Tick(550.1),
            [
                RevokeAccess("ssh", A, (SSH,), "max_lifetime reached"),
                Pause("ssh", "max_lifetime reached"),
            ],
        ),
    )


# ----------------------------------------------------------------- the catalogue


def test_catalogue_added_removed_and_changed() -> None:
    m = machines(ssh(), ssh(name="web", step=Step(8080, "tcp"), keep_warm=True))
    assert m.handle(Adopted(0.0)) == []  # machines() adopted already: warming was asked then
    running(m, 1.0)
    changed = ssh(version="v2", idle_timeout=20.0)
    mail = ssh(name="mail", step=Step(2525, "tcp"))
    play(
        m,
        (
            CatalogueChanged(5.0, (changed, mail)),
            [
                Notice("web", "info", "web: removed from the catalogue; stopping it"),
                Notice(
                    "ssh",
                    "info",
                    "ssh: definition changed; the running container keeps serving until it "
                    "stops, then it is recreated",
                ),
                Notice("mail", "info", "mail: added to the catalogue"),
            ],
        ),
    )
    assert m.machines["ssh"].policy.idle_timeout == 10.0  # the old one, while it runs
    play(
        m,
        (CloseKnock(6.0, "ssh", A), [Stop("ssh", f"close knock from {A}")]),
        (ContainerStopped(7.0, "ssh"), []),
    )
    assert m.machines["ssh"].policy == changed  # in force once stopped
    # web was starting (warm-up): stopped once its start ends, then forgotten.
    play(
        m,
        (ContainerReady(8.0, "web"), [Stop("web", "removed from the catalogue")]),
        (ContainerStopped(9.0, "web"), []),
    )
    assert set(m.machines) == {"ssh", "mail"}
    assert m.handle(knock(10.0, service="web")) == [
        Notice("web", "error", f"{A}: ssh-door: no service web, no access", refused=True)
    ]


def test_removing_a_running_service_revokes_and_stops() -> None:
    m = machines()
    running(m, 1.0)
    play(
        m,
        (
            CatalogueChanged(5.0, ()),
            [
                Notice("ssh", "info", "ssh: removed from the catalogue; stopping it"),
                RevokeAccess("ssh", A, (SSH,), "removed from the catalogue"),
                Stop("ssh", "removed from the catalogue"),
            ],
        ),
        (ContainerStopped(6.0, "ssh"), []),
    )
    assert m.machines == {}


def test_settings_only_change_applies_at_once() -> None:
    m = machines()
    running(m, 1.0)
    play(
        m,
        (
            CatalogueChanged(2.0, (ssh(idle_timeout=3.0),)),
            [Notice("ssh", "info", "ssh: settings changed")],
        ),
        (Tick(31.0), []),
        (ConnectionsSeen(31.0, "ssh", 0), []),
        (Tick(34.0), [Stop("ssh", "idle for 3 s")]),
    )


# ----------------------------------------------------------------- properties

ADDRESSES = st.sampled_from([A, B, "198.18.9.3"])
NAMES = st.sampled_from(["ssh", "web"])


def _event(ts: float) -> st.SearchStrategy[ServiceEvent]:
    name = NAMES
    return st.one_of(
        st.builds(
            lambda n, a, s: KnockCompleted(ts, n, a, (SSH,), ts + s, "d"),
            name,
            ADDRESSES,
            st.floats(-5, 60),
        ),
        st.builds(lambda n, a: CloseKnock(ts, n, a), name, ADDRESSES),
        st.builds(
            lambda n, c, since, resumed: ContainerStarted(
                ts, n, c, "172.17.0.2", INNER, since=since, resumed=resumed
            ),
            name,
            st.sampled_from(["c1", "c2"]),
            st.one_of(st.none(), st.floats(ts - 200, ts)),
            st.booleans(),
        ),
        st.builds(lambda n: ContainerReady(ts, n), name),
        st.builds(lambda n: ContainerFailed(ts, n, "boom"), name),
        st.builds(lambda n, p: ContainerStopped(ts, n, p), name, st.booleans()),
        st.builds(
            lambda n, c, died: ContainerDied(ts, n, c, died),
            name,
            st.sampled_from(["c1", "c2"]),
            st.one_of(st.none(), st.floats(ts - 30, ts)),
        ),
        st.builds(
            lambda n, c: ConnectionsSeen(ts, n, c), name, st.one_of(st.none(), st.integers(0, 3))
        ),
        st.just(Tick(ts)),
        st.builds(
            lambda keep, version, rem: CatalogueChanged(
                ts,
                tuple(
                    p
                    for p in (
                        ssh(keep_warm=keep, version=version),
                        ssh(name="web", step=Step(8080, "tcp")),
                    )
                    if p.name != rem
                ),
            ),
            st.booleans(),
            st.sampled_from(["v1", "v2"]),
            st.sampled_from(["", "ssh", "web"]),
        ),
        st.builds(
            lambda s, a: Adopted(
                ts,
                (Found("ssh", "c1", "running", ts - s, "172.17.0.2", INNER),),
                (LiveGrant(a, SSH, ts + 20),),
            ),
            st.floats(0, 200),
            ADDRESSES,
        ),
    )


@st.composite
def scripts(draw: st.DrawFn) -> list[ServiceEvent]:
    gaps = draw(st.lists(st.floats(0, 30), min_size=1, max_size=60))
    ts, events = 0.0, []
    for gap in gaps:
        ts += gap
        events.append(draw(_event(ts)))
    return events


@settings(max_examples=300, deadline=None)
@given(scripts(), st.booleans())
def test_no_event_sequence_raises_or_leaves_a_grant_past_its_deadline(
    events: list[ServiceEvent], keep_warm: bool
) -> None:
    m = Lifecycles(
        (ssh(keep_warm=keep_warm, max_lifetime=120.0), ssh(name="web", step=Step(8080, "tcp")))
    )
    for event in events:
        for command in m.handle(event):
            if isinstance(command, GrantAccess):
                assert command.until > event.ts, "a grant already past its deadline"
        for machine in m.machines.values():
            assert (machine.state == "serving") == bool(machine.holders)
            if isinstance(event, Tick):
                assert all(h.until > event.ts for h in machine.holders.values())
                if machine.started is not None and machine.state in ("ready", "serving", "idle"):
                    assert event.ts - machine.started < machine.policy.max_lifetime


def _world_step(
    m: Lifecycles, outstanding: dict[str, Command], ts: float, choice: int
) -> list[Command]:
    """A well-behaved Docker: each asked operation reports exactly once, in order (a
    start or a stop may fail)."""
    if outstanding and choice % 3 == 0:
        name, op = next(iter(outstanding.items()))
        del outstanding[name]
        if isinstance(op, Start):
            if choice % 2:
                return m.handle(ContainerFailed(ts, name, "boom"))
            m.handle(ContainerStarted(ts, name, f"c-{ts}", "172.17.0.2", INNER))
            return m.handle(ContainerReady(ts, name))
        if choice % 2:  # Docker refused: asked again on a later tick
            return m.handle(ContainerFailed(ts, name, "boom"))
        return m.handle(ContainerStopped(ts, name, isinstance(op, Pause)))
    return []


@settings(max_examples=300, deadline=None)
@given(scripts(), st.lists(st.integers(0, 5), min_size=60, max_size=60), st.booleans())
def test_at_most_one_docker_operation_per_service_at_a_time(
    events: list[ServiceEvent], choices: list[int], keep_warm: bool
) -> None:
    m = Lifecycles((ssh(keep_warm=keep_warm), ssh(name="web", step=Step(8080, "tcp"))))
    outstanding: dict[str, Command] = {}
    for event, choice in zip(events, choices, strict=False):
        if isinstance(
            event, ContainerStarted | ContainerReady | ContainerFailed | ContainerStopped
        ):
            out = _world_step(m, outstanding, event.ts, choice)
        else:
            out = m.handle(event)
        for command in out:
            if isinstance(command, Start | Stop | Pause):
                assert command.service not in outstanding, (command, outstanding)
                outstanding[command.service] = command


def test_the_table_names_only_known_states() -> None:
    states = {"cold", "starting", "ready", "serving", "idle", "stopping", "paused"}
    assert {state for state, _ in TRANSITIONS} <= states


def test_a_container_removed_by_hand_goes_cold_once_for_die_and_destroy() -> None:
    """`docker rm -f` reports die, then destroy, of the same container: the first ends
    the run (grants revoked, cold, no longer gated), the second changes nothing; a knock
    after that starts a new container, which a late destroy of the old one cannot end."""
    m = machines()
    running(m, 1.0)
    play(
        m,
        (
            ContainerDied(6.0, "ssh", "c1", died=5.9),  # die
            [
                RevokeAccess("ssh", A, (SSH,), "the container stopped"),
                Notice("ssh", "warning", "ssh: its container stopped outside knockgate"),
            ],
        ),
        (ContainerDied(6.1, "ssh", "c1", died=6.0), []),  # destroy
    )
    assert state(m) == "cold" and m.direct() == ()
    k = knock(7.0)
    play(
        m,
        (k, [Start("ssh")]),
        (started(7.1, "c2"), []),
        (ContainerDied(7.2, "ssh", "c1", died=6.0), []),  # a late destroy of c1
        (ContainerReady(7.3, "ssh"), [granted(k)]),
    )
    assert state(m) == "serving"


def test_a_paused_container_removed_by_hand_goes_cold() -> None:
    m = Lifecycles((ssh(keep_warm=True),))
    play(
        m,
        (Adopted(0.0), [Start("ssh")]),
        (started(0.5), []),
        (ContainerReady(1.0, "ssh"), [Pause("ssh", "kept warm")]),
        (ContainerStopped(1.1, "ssh", paused=True), []),
    )
    assert state(m) == "paused"
    out = m.handle(ContainerDied(5.0, "ssh", "c1", died=4.9))
    assert out == [Notice("ssh", "warning", "ssh: its container stopped outside knockgate")]
    assert state(m) == "cold" and m.direct() == ()
