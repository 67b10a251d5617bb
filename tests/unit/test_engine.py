"""Playbooks for the knock engine: events in, the exact commands out."""

from __future__ import annotations

import itertools
import math

import pytest

from appliance.core.engine import KnockEngine
from appliance.core.events import (
    DoorExhausted,
    Grant,
    MarkSequenceUsed,
    OneTimeAdvanced,
    Opened,
    Revoke,
    RunCommand,
    SequenceReset,
    SequenceTimeout,
    StageReached,
    Tick,
    Vet,
    Vetted,
)
from appliance.core.model import Commands, OneTimeFile, OneTimeSequence, TcpFlags
from tests.unit.helpers import ACK, FIN, RST, SYN, door, play, play_all, steps, tcp, udp

A, B, C = "198.18.5.1", "198.18.5.2", "198.18.5.3"
SSH = steps(22)


def opened(ts: float, name: str, src: str, until: float, ports: tuple = SSH) -> list:
    return [Opened(ts, name, src), Grant(ts, name, src, ports, until)]


# ----------------------------------------------------------------- the basic knock


def test_full_sequence_opens_with_grant_until_duration() -> None:
    engine = KnockEngine([door("ssh", 7113, "2231/udp", 9157, duration=30)])
    assert play(engine, tcp(100.0, A, 7113)) == [StageReached(100.0, "ssh", A, 1, 3)]
    assert play(engine, udp(100.2, A, 2231)) == [StageReached(100.2, "ssh", A, 2, 3)]
    assert play(engine, tcp(100.4, A, 9157)) == opened(100.4, "ssh", A, 130.4)
    assert engine.attempt_count == 0
    assert engine.counters.opened == 1


def test_single_step_sequence_opens_at_once() -> None:
    engine = KnockEngine([door("one", 4321)])
    assert play(engine, tcp(1.0, A, 4321)) == opened(1.0, "one", A, 31.0)
    assert engine.attempt_count == 0


def test_ports_outside_every_door_are_ignored_and_do_not_reset() -> None:
    engine = KnockEngine([door("ssh", 7113, 2231, 9157)])
    play(engine, tcp(1.0, A, 7113))
    assert play(engine, tcp(1.1, A, 80)) == []
    assert play(engine, tcp(1.2, A, 2231)) == [StageReached(1.2, "ssh", A, 2, 3)]
    assert engine.counters.ignored == 1


# ----------------------------------------------------------------- wrong steps


def test_wrong_step_resets_the_attempt() -> None:
    engine = KnockEngine([door("ssh", 7113, 2231, 9157)])
    play(engine, tcp(1.0, A, 7113))
    play(engine, tcp(1.1, A, 2231))
    assert play(engine, tcp(1.2, A, 7113)) == [
        SequenceReset(1.2, "ssh", A, 2, 7113, "tcp"),
        StageReached(1.2, "ssh", A, 1, 3),
    ]
    assert engine.counters.resets == 1


def test_wrong_step_that_is_not_the_first_step_leaves_no_attempt() -> None:
    engine = KnockEngine([door("ssh", 7113, 2231, 9157)])
    play(engine, tcp(1.0, A, 7113))
    assert play(engine, tcp(1.1, A, 9157)) == [SequenceReset(1.1, "ssh", A, 1, 9157, "tcp")]
    assert engine.attempt_count == 0
    assert play(engine, tcp(1.2, A, 2231)) == []  # not a first step: nothing starts


def test_knockd_defect_reset_packet_that_is_a_first_step_starts_a_fresh_attempt() -> None:
    """knockd drops the packet that broke an attempt; here it starts the next one."""
    engine = KnockEngine([door("ssh", 7113, 2231, 9157)])
    play(engine, tcp(1.0, A, 7113))
    play(engine, tcp(1.1, A, 2231))
    play(engine, tcp(1.2, A, 7113))  # wrong at stage 2, but it is step 1
    play(engine, tcp(1.3, A, 2231))
    assert play(engine, tcp(1.4, A, 9157)) == opened(1.4, "ssh", A, 31.4)


def test_tcp_flags_mismatch_is_ignored_not_a_reset() -> None:
    engine = KnockEngine([door("ssh", 7113, 2231, 9157, flags=TcpFlags(SYN, ACK))])
    assert play(engine, tcp(1.0, A, 7113, SYN | ACK)) == []  # !ack fails: ignored
    play(engine, tcp(1.1, A, 7113, SYN))
    assert play(engine, tcp(1.2, A, 9157, RST)) == []  # would be a wrong step, but flags fail
    assert play(engine, tcp(1.3, A, 2231, SYN)) == [StageReached(1.3, "ssh", A, 2, 3)]
    assert engine.counters.resets == 0


def test_without_tcpflags_every_tcp_packet_counts() -> None:
    engine = KnockEngine([door("ssh", 7113, 2231, 9157)])
    play(engine, tcp(1.0, A, 7113, FIN))
    play(engine, tcp(1.1, A, 2231, ACK))
    assert play(engine, tcp(1.2, A, 9157, RST)) == opened(1.2, "ssh", A, 31.2)


def test_wrong_protocol_is_ignored_when_the_pair_is_not_in_the_door() -> None:
    engine = KnockEngine([door("ssh", 7113, "2231/udp", 9157)])
    play(engine, tcp(1.0, A, 7113))
    assert play(engine, tcp(1.1, A, 2231)) == []  # 2231/tcp is not a step: ignored
    assert play(engine, udp(1.2, A, 9157)) == []  # 9157/udp neither
    assert play(engine, udp(1.3, A, 2231)) == [StageReached(1.3, "ssh", A, 2, 3)]


def test_wrong_protocol_is_a_wrong_step_when_the_pair_is_in_the_door() -> None:
    engine = KnockEngine([door("mixed", 7113, "9157/udp", 9157)])
    play(engine, tcp(1.0, A, 7113))
    # 9157/tcp is the door's third step: sent now, it is the wrong step.
    assert play(engine, tcp(1.1, A, 9157)) == [SequenceReset(1.1, "mixed", A, 1, 9157, "tcp")]


# ----------------------------------------------------------------- time


def test_sub_second_sequence_within_timeout_opens() -> None:
    """knockd counts whole seconds: two knocks 0.15 s apart can straddle a second and fail."""
    engine = KnockEngine([door("fast", 7113, 2231, 9157, timeout=0.5)])
    play(engine, tcp(9.95, A, 7113))
    play(engine, tcp(10.10, A, 2231))
    assert play(engine, tcp(10.25, A, 9157)) == opened(10.25, "fast", A, 40.25)


def test_seq_timeout_bounds_the_whole_sequence_from_the_first_knock() -> None:
    engine = KnockEngine([door("ssh", 7113, 2231, 9157, timeout=1.0)])
    play(engine, tcp(1.0, A, 7113))
    play(engine, tcp(1.6, A, 2231))
    # 1.0 + 1.0 is the deadline: a knock at it is too late; it times out, is not a step.
    assert play(engine, tcp(2.0, A, 9157)) == [SequenceTimeout(2.0, "ssh", A, 2)]
    assert engine.counters.timeouts == 1
    assert engine.attempt_count == 0


def test_timed_out_attempt_restarts_on_a_first_step() -> None:
    engine = KnockEngine([door("ssh", 7113, 2231, 9157, timeout=1.0)])
    play(engine, tcp(1.0, A, 7113))
    play(engine, tcp(1.5, A, 2231))
    assert play(engine, tcp(3.0, A, 7113)) == [
        SequenceTimeout(3.0, "ssh", A, 2),
        StageReached(3.0, "ssh", A, 1, 3),
    ]


def test_timer_expires_attempts_and_reports_the_next_deadline() -> None:
    engine = KnockEngine([door("ssh", 7113, 2231, 9157, timeout=2.0)])
    assert engine.next_deadline() is None
    assert engine.handle(tcp(1.0, A, 7113)) == [StageReached(1.0, "ssh", A, 1, 3)]
    assert engine.next_deadline() == 3.0
    assert engine.handle(tcp(1.5, B, 7113)) == [StageReached(1.5, "ssh", B, 1, 3)]
    assert engine.next_deadline() == 3.0  # the earliest one
    engine.handle(tcp(1.6, B, 2231))
    # At 3.0 A's lone first knock expires silently (counted); next comes B's deadline.
    assert engine.handle(Tick(3.0)) == []
    assert engine.next_deadline() == 3.5
    assert engine.handle(Tick(3.5)) == [SequenceTimeout(3.5, "ssh", B, 2)]
    assert engine.counters.timeouts == 2
    assert engine.attempt_count == 0
    assert engine.next_deadline() is None


def test_clock_never_goes_back_and_malformed_times_are_counted() -> None:
    engine = KnockEngine([door("ssh", 7113, 2231, 9157, timeout=1.0)])
    play(engine, tcp(10.0, A, 7113))
    # A late event is handled as "now" (10.0), so it is still in time.
    assert play(engine, tcp(5.0, A, 2231)) == [StageReached(10.0, "ssh", A, 2, 3)]
    assert play(engine, tcp(math.nan, A, 9157)) == []
    assert play(engine, tcp(math.inf, A, 9157)) == []
    assert play(engine, tcp(-math.inf, A, 9157)) == []
    assert engine.counters.malformed == 3
    assert play(engine, tcp(10.5, A, 9157)) == opened(10.5, "ssh", A, 40.5)


# ----------------------------------------------------------------- independence


def test_knockd_defect_expiry_of_the_oldest_attempt_wipes_everyone() -> None:
    """knockd 0.8 unlinks the list head and drops every pending attempt with it.

    Here an attacker's attempt that times out, and another source's wrong steps,
    never disturb a third source's progress.
    """
    engine = KnockEngine([door("ssh", 7113, 2231, 9157, timeout=3.0)])
    play(engine, tcp(0.0, C, 7113))  # the attacker: oldest attempt, will time out
    play(engine, tcp(1.0, A, 7113))
    play(engine, tcp(1.5, B, 7113))
    play(engine, tcp(2.0, A, 2231))
    assert play(engine, Tick(3.0)) == []  # C's attempt expires (silently: stage 1)
    play(engine, tcp(3.1, C, 9157))  # C's wrong knocks touch only C
    play(engine, tcp(3.2, B, 2231))
    assert play(engine, tcp(3.3, A, 9157)) == opened(3.3, "ssh", A, 33.3)
    assert play(engine, tcp(3.4, B, 9157)) == opened(3.4, "ssh", B, 33.4)


def test_interleaved_sources_all_open() -> None:
    engine = KnockEngine([door("ssh", 7113, 2231, 9157)])
    sources = [f"198.18.7.{i}" for i in range(1, 101)]
    out = []
    for step_index, port in enumerate((7113, 2231, 9157)):
        for i, src in enumerate(sources):
            out += play(engine, tcp(1.0 + step_index + i / 1000, src, port))
    assert {c.address for c in out if isinstance(c, Opened)} == set(sources)


def test_attempts_at_different_doors_do_not_disturb_each_other() -> None:
    """A knock on one door's port never resets an attempt at another door."""
    engine = KnockEngine([door("ssh", 7113, 2231, 9157), door("web", 4001, 4002, 4003)])
    play(engine, tcp(1.0, A, 7113))
    play(engine, tcp(1.1, A, 4001))
    play(engine, tcp(1.2, A, 2231))
    play(engine, tcp(1.3, A, 4002))
    assert play(engine, tcp(1.4, A, 9157)) == opened(1.4, "ssh", A, 31.4)
    assert play(engine, tcp(1.5, A, 4003)) == opened(1.5, "web", A, 31.5)


def test_order_of_doors_never_matters() -> None:
    doors = [
        door("a", 7113, 2231, 9157),
        door("b", 7113, 2231, 9157, 1234),
        door("c", 2231, 9157),
        door("d", 9157, 7113, flags=TcpFlags(SYN, ACK)),
    ]
    events = [
        tcp(1.0, A, 7113),
        tcp(1.1, A, 2231),
        tcp(1.2, A, 9157),
        tcp(1.3, A, 7113),
        tcp(1.4, B, 9157),
        tcp(1.5, B, 7113, SYN | ACK),
        tcp(1.6, A, 1234),
        tcp(1.7, B, 7113),
    ]
    results = []
    for order in itertools.permutations(doors):
        engine = KnockEngine(list(order))
        results.append(sorted(map(repr, play_all(engine, list(events)))))
    assert all(result == results[0] for result in results)
    assert "Opened(at=1.2, door='a'" in " ".join(results[0])


def test_several_doors_complete_on_one_packet_each_once() -> None:
    engine = KnockEngine([door("a", 7113, 2231, 9157), door("b", 2231, 9157, open_ports=(443,))])
    play(engine, tcp(1.0, A, 7113))
    play(engine, tcp(1.1, A, 2231))
    out = play(engine, tcp(1.2, A, 9157))
    assert out == opened(1.2, "a", A, 31.2) + opened(1.2, "b", A, 31.2, steps(443))
    assert play(engine, tcp(1.3, A, 9157)) == []  # nothing left to complete


def test_target_restricts_a_door_to_one_destination() -> None:
    engine = KnockEngine([door("t", 7113, 2231, target="198.18.0.9")])
    assert play(engine, tcp(1.0, A, 7113, dst="198.18.0.1")) == []
    play(engine, tcp(1.1, A, 7113, dst="198.18.0.9"))
    assert play(engine, tcp(1.2, A, 2231, dst="198.18.0.9")) == opened(1.2, "t", A, 31.2)


# ----------------------------------------------------------------- duplicates


def test_duplicates_ignore_treats_a_quick_repeat_as_retransmission() -> None:
    engine = KnockEngine([door("ssh", 7113, 2231, 9157)])
    play(engine, tcp(1.0, A, 7113))
    assert play(engine, tcp(1.5, A, 7113)) == []  # SYN retransmitted within 1 s
    play(engine, tcp(1.6, A, 2231))
    assert play(engine, tcp(1.7, A, 9157)) == opened(1.7, "ssh", A, 31.7)
    assert engine.counters.retransmissions == 1


def test_duplicates_ignore_still_resets_a_repeat_after_one_second() -> None:
    engine = KnockEngine([door("ssh", 7113, 2231, 9157)])
    play(engine, tcp(1.0, A, 7113))
    assert play(engine, tcp(2.5, A, 7113)) == [
        SequenceReset(2.5, "ssh", A, 1, 7113, "tcp"),
        StageReached(2.5, "ssh", A, 1, 3),
    ]


def test_duplicates_reset_keeps_knockd_behaviour() -> None:
    engine = KnockEngine([door("ssh", 7113, 2231, 9157, duplicates="reset")])
    play(engine, tcp(1.0, A, 7113))
    play(engine, tcp(1.1, A, 2231))
    assert play(engine, tcp(1.2, A, 2231)) == [SequenceReset(1.2, "ssh", A, 2, 2231, "tcp")]


def test_repeated_port_in_sequence_advances_before_duplicate_rule() -> None:
    engine = KnockEngine([door("rep", 7113, 7113, 9157)])
    play(engine, tcp(1.0, A, 7113))
    assert play(engine, tcp(1.1, A, 7113)) == [StageReached(1.1, "rep", A, 2, 3)]


# ----------------------------------------------------------------- actions


def test_commands_get_the_address_and_stop_is_due_after_cmd_timeout() -> None:
    commands = Commands(start="allow %IP% %IP%", stop="deny %IP%", cmd_timeout=10.0)
    engine = KnockEngine([door("k", 7113, 2231, open_ports=None, commands=commands)])
    play(engine, tcp(1.0, A, 7113))
    assert engine.handle(tcp(1.5, A, 2231)) == [Opened(1.5, "k", A), Vet(1.5, 1, "k", A, ())]
    assert engine.handle(Vetted(1.5, 1, None)) == [
        RunCommand(1.5, "k", A, "start", f"allow {A} {A}")
    ]
    assert engine.next_deadline() == 6.0  # A's attempt, begun at 1.0 (may be early)
    assert engine.handle(Tick(6.0)) == []
    assert engine.next_deadline() == 11.5  # the stop command
    assert engine.handle(Tick(11.5)) == [RunCommand(11.5, "k", A, "stop", f"deny {A}")]
    assert engine.next_deadline() is None


@pytest.mark.parametrize(
    ("commands", "start", "stop"),
    [
        (Commands(start="v4 %IP%", stop="s4 %IP%"), "v4 2001:db8::7", "s4 2001:db8::7"),
        (Commands(start="v4", start6="v6 %IP%", stop="s4"), "v6 2001:db8::7", "s4"),
        (Commands(start="v4", start6="", stop="s4"), None, None),
        (Commands(start="v4", stop="s4", stop6=""), "v4", None),
    ],
)
def test_ipv6_command_variants_fall_back_like_knockd(
    commands: Commands, start: str | None, stop: str | None
) -> None:
    src = "2001:db8::7"
    engine = KnockEngine([door("k", 7113, open_ports=None, commands=commands)])
    out = play(engine, tcp(1.0, src, 7113))
    assert [c.command for c in out if isinstance(c, RunCommand)] == ([start] if start else [])
    assert [c.command for c in engine.drain()] == ([stop] if stop else [])


def test_drain_returns_pending_stop_commands_at_shutdown() -> None:
    commands = Commands(start="on %IP%", stop="off %IP%", cmd_timeout=60.0)
    engine = KnockEngine([door("k", 7113, open_ports=None, commands=commands)])
    play(engine, tcp(1.0, A, 7113))
    play(engine, tcp(2.0, B, 7113))
    assert engine.drain() == [
        RunCommand(61.0, "k", A, "stop", f"off {A}"),
        RunCommand(62.0, "k", B, "stop", f"off {B}"),
    ]
    assert engine.drain() == []


def test_close_door_revokes_the_other_doors_grant() -> None:
    engine = KnockEngine(
        [door("open", 7113, 2231), door("shut", 2231, 7113, open_ports=None, close=("open",))]
    )
    play(engine, tcp(1.0, A, 2231))
    assert play(engine, tcp(1.1, A, 7113)) == [
        StageReached(1.1, "open", A, 1, 2),  # doors are visited in config order
        Opened(1.1, "shut", A),
        Revoke(1.1, "open", A, "shut"),
    ]


# ----------------------------------------------------------------- one-time sequences


def one_time_file(*lines: tuple[int, ...]) -> OneTimeFile:
    return OneTimeFile(
        "/tmp/seqs",
        tuple(
            OneTimeSequence(steps(*ports), line=i + 1, offset=i * 20)
            for i, ports in enumerate(lines)
        ),
    )


def test_one_time_sequence_is_used_once_then_the_next_one_is_active() -> None:
    seqs = one_time_file((1001, 1002), (2001, 2002))
    engine = KnockEngine([door("ot", one_time=seqs)])
    assert engine.active_sequence("ot") == steps(1001, 1002)
    play(engine, tcp(1.0, A, 1001))
    # The line is marked used before anything opens (record first, then grant).
    opened_first, *granted = opened(1.1, "ot", A, 31.1)
    assert play(engine, tcp(1.1, A, 1002)) == [
        opened_first,
        MarkSequenceUsed(1.1, "ot", A, "/tmp/seqs", 1, 0),
        *granted,
        OneTimeAdvanced(1.1, "ot", 1),
    ]
    assert play(engine, tcp(1.2, A, 1001)) == []  # the used sequence no longer counts
    play(engine, tcp(1.3, A, 2001))
    opened_first, *granted = opened(1.4, "ot", A, 31.4)
    assert play(engine, tcp(1.4, A, 2002)) == [
        opened_first,
        MarkSequenceUsed(1.4, "ot", A, "/tmp/seqs", 2, 20),
        *granted,
        OneTimeAdvanced(1.4, "ot", 0),
        DoorExhausted(1.4, "ot", "/tmp/seqs"),
    ]
    assert play(engine, tcp(1.5, A, 2001)) == []  # disabled: nothing counts
    assert engine.attempt_count == 0


def test_one_time_sequence_in_progress_elsewhere_cannot_complete_after_use() -> None:
    seqs = one_time_file((1001, 1002, 1003), (1001, 1002, 1004))
    engine = KnockEngine([door("ot", one_time=seqs)])
    play(engine, tcp(1.0, B, 1001))  # B is half-way through the same sequence
    play(engine, tcp(1.1, B, 1002))
    play_all(engine, [tcp(1.2, A, 1001), tcp(1.3, A, 1002), tcp(1.4, A, 1003)])
    assert play(engine, tcp(1.5, B, 1003)) == []  # the used sequence opens nothing
    assert engine.counters.opened == 1


def test_one_time_door_with_no_sequence_left_is_disabled_from_the_start() -> None:
    engine = KnockEngine([door("ot", one_time=one_time_file())])
    assert play(engine, tcp(1.0, A, 1001)) == []
    assert engine.active_sequence("ot") == ()


# ----------------------------------------------------------------- bounded memory


def test_max_attempts_evicts_the_oldest_first_and_counts() -> None:
    engine = KnockEngine(
        [door("a", 7113, 2231, timeout=10.0), door("b", 4001, 4002, timeout=99.0)],
        max_attempts=3,
    )
    play(engine, tcp(1.0, A, 7113))
    play(engine, tcp(2.0, B, 4001))
    play(engine, tcp(3.0, C, 7113))
    play(engine, tcp(4.0, "198.18.9.9", 4001))  # full: A's attempt (the oldest) goes
    assert engine.attempt_count == 3
    assert engine.counters.evictions == 1
    assert play(engine, tcp(4.1, A, 2231)) == []  # A lost its progress
    assert play(engine, tcp(4.2, B, 4002)) == opened(4.2, "b", B, 34.2)


def test_max_attempts_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        KnockEngine([door("a", 1, 2)], max_attempts=0)
