"""Playbooks for the engine's two conversations with the runtime: a completed knock is
vetted before it is acted on (scan hold, records), and a reload keeps unchanged doors."""

from __future__ import annotations

import dataclasses

from appliance.core.engine import KnockEngine
from appliance.core.events import (
    DoorsReloaded,
    Grant,
    MarkSequenceUsed,
    NewDoors,
    Opened,
    Refused,
    Revoke,
    RunCommand,
    SequenceTimeout,
    StageReached,
    Tick,
    Vet,
    Vetted,
)
from appliance.core.model import Commands, OneTimeFile, OneTimeSequence, Origin
from tests.unit.helpers import door, play, steps, tcp

A, B = "198.18.5.1", "198.18.5.2"
SSH = steps(22)
HELD = "held off as a port scanner"


def test_a_completed_knock_waits_for_its_verdict_and_then_opens() -> None:
    engine = KnockEngine([door("ssh", 7113, 7114, duration=30)])
    play(engine, tcp(1.0, A, 7113))
    assert engine.handle(tcp(2.0, A, 7114)) == [Opened(2.0, "ssh", A), Vet(2.0, 1, "ssh", A, ())]
    assert engine.handle(Vetted(2.0, 1, None)) == [Grant(2.0, "ssh", A, SSH, 32.0)]


def test_a_held_scanner_gets_nothing_no_close_no_command_and_no_stop_later() -> None:
    commands = Commands(start="on %IP%", stop="off %IP%", cmd_timeout=5.0)
    engine = KnockEngine(
        [door("web", 7000, open_ports=(80,)), door("ssh", 7113, close=("web",), commands=commands)]
    )
    play(engine, tcp(1.0, A, 7000))  # web opened for A
    assert engine.handle(tcp(2.0, A, 7113)) == [Opened(2.0, "ssh", A), Vet(2.0, 2, "ssh", A, ())]
    assert engine.handle(Vetted(2.0, 2, HELD)) == [Refused(2.0, "ssh", A, HELD)]
    assert engine.next_deadline() is None  # no stop command was scheduled
    assert engine.handle(Tick(100.0)) == []
    assert engine.counters.refused == 1


def test_an_unrecorded_one_time_line_is_refused_and_the_door_moves_on() -> None:
    one_time = OneTimeFile(
        "/x/seqs",
        (OneTimeSequence(steps(7001), 1, 0), OneTimeSequence(steps(7002), 2, 10)),
    )
    engine = KnockEngine([door("once", one_time=one_time)])
    out = engine.handle(tcp(1.0, A, 7001))
    vet = out[1]
    assert isinstance(vet, Vet)
    assert vet.records == (MarkSequenceUsed(1.0, "once", A, "/x/seqs", 1, 0),)
    refusal = "its use could not be recorded, so no access"
    assert engine.handle(Vetted(1.0, vet.ticket, refusal)) == [Refused(1.0, "once", A, refusal)]
    assert [type(c) for c in play(engine, tcp(2.0, A, 7001))] == []  # that line is spent


def test_an_unknown_or_repeated_ticket_is_counted_and_does_nothing() -> None:
    engine = KnockEngine([door("ssh", 7113)])
    assert engine.handle(Vetted(1.0, 99, None)) == []
    out = engine.handle(tcp(2.0, A, 7113))
    ticket = out[1].ticket
    assert engine.handle(Vetted(2.0, ticket, None)) == [Grant(2.0, "ssh", A, SSH, 32.0)]
    assert engine.handle(Vetted(2.0, ticket, None)) == []
    assert engine.counters.malformed == 2


# ----------------------------------------------------------------- reload


def test_a_reload_keeps_an_unchanged_doors_attempt_and_drops_a_changed_one() -> None:
    ssh = door("ssh", 7113, 7114, 7115, timeout=20)
    web = door("web", 8001, 8002, 8003, timeout=20, open_ports=(80,))
    engine = KnockEngine([ssh, web])
    play(engine, tcp(1.0, A, 7113))
    play(engine, tcp(1.1, A, 7114))
    play(engine, tcp(1.0, B, 8001))
    moved = dataclasses.replace(ssh, origin=Origin("knockgate.yaml", 40))  # same door, new line
    web2 = door("web", 8001, 8002, 8009, timeout=20, open_ports=(80,))
    new = door("mail", 9001)
    assert engine.handle(NewDoors(2.0, (moved, web2, new), 100)) == [
        DoorsReloaded(2.0, ("ssh",), ("web",), ("mail",), ())
    ]
    assert engine.attempt_count == 1  # A's ssh attempt
    assert play(engine, tcp(3.0, A, 7115)) == [
        Opened(3.0, "ssh", A),
        Grant(3.0, "ssh", A, SSH, 33.0),
    ]
    # B's web attempt is gone: its next step starts nothing and opens nothing.
    assert play(engine, tcp(3.0, B, 8002)) == []


def test_a_removed_door_loses_its_attempts_and_is_named() -> None:
    engine = KnockEngine([door("ssh", 7113, 7114), door("old", 6001, 6002)])
    play(engine, tcp(1.0, A, 6001))
    assert engine.handle(NewDoors(2.0, (door("ssh", 7113, 7114),), 100)) == [
        DoorsReloaded(2.0, ("ssh",), (), (), ("old",))
    ]
    assert engine.attempt_count == 0
    assert play(engine, tcp(3.0, A, 6002)) == []


def test_a_pending_stop_command_runs_at_its_own_time_across_a_reload() -> None:
    commands = Commands(start="on %IP%", stop="off %IP%", cmd_timeout=10.0)
    engine = KnockEngine([door("cmd", 7113, open_ports=None, commands=commands)])
    play(engine, tcp(1.0, A, 7113))
    engine.handle(NewDoors(2.0, (door("other", 7200),), 100))  # the door is even removed
    assert engine.handle(Tick(5.0)) == []
    assert engine.next_deadline() == 11.0
    assert engine.handle(Tick(11.0)) == [RunCommand(11.0, "cmd", A, "stop", f"off {A}")]


def test_an_attempt_kept_across_a_reload_keeps_its_original_deadline() -> None:
    ssh = door("ssh", 7113, 7114, 7115, timeout=5)
    engine = KnockEngine([ssh])
    play(engine, tcp(1.0, A, 7113))
    play(engine, tcp(1.0, B, 7113))
    play(engine, tcp(1.5, B, 7114))
    engine.handle(NewDoors(2.0, (ssh,), 100))
    assert engine.next_deadline() is not None and engine.next_deadline() <= 6.0
    assert play(engine, tcp(5.5, A, 7114)) == [StageReached(5.5, "ssh", A, 2, 3)]
    # Both deadlines were 1.0 + 5: the last step at 6.0 is too late for each.
    assert play(engine, tcp(6.0, B, 7115)) == [
        SequenceTimeout(6.0, "ssh", A, 2),
        SequenceTimeout(6.0, "ssh", B, 2),
    ]


def test_stage_logs_continue_after_a_reload() -> None:
    ssh = door("ssh", 7113, 7114, 7115)
    engine = KnockEngine([ssh])
    play(engine, tcp(1.0, A, 7113))
    engine.handle(NewDoors(1.5, (ssh,), 100))
    assert play(engine, tcp(2.0, A, 7114)) == [StageReached(2.0, "ssh", A, 2, 3)]


def test_a_close_knock_vetted_ok_revokes() -> None:
    engine = KnockEngine([door("web", 7000, open_ports=(80,)), door("shut", 7001, close=("web",))])
    assert play(engine, tcp(1.0, A, 7001))[-1] == Revoke(1.0, "web", A, "shut")
