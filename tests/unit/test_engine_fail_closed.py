"""Engine playbooks for the fail-closed rules: destinations, the two clocks, records
first, and what an untrusted state file means for SPA and TOTP."""

from __future__ import annotations

from appliance.core.engine import KnockEngine
from appliance.core.events import (
    ClockStepped,
    Grant,
    LocalAddresses,
    MarkSequenceUsed,
    Opened,
    SequenceTimeout,
    SpaAccepted,
    SpaDigestSeen,
    SpaRefused,
    StageReached,
    TotpStepUsed,
    WallClock,
)
from appliance.core.model import OneTimeFile, OneTimeSequence
from appliance.core.totp import totp_sequence
from tests.unit.helpers import HOST, door, play, play_all, steps, tcp
from tests.unit.test_engine_auth import TOTP, spa_door, spa_knock, totp_door

A = "198.18.5.1"
TARGET = "198.18.99.9"  # another door's target: not one of the host's addresses


# ----------------------------------------------------------------- destinations


def test_a_door_without_target_ignores_knocks_sent_to_another_address() -> None:
    """Regression: packets sent to another door's target advanced a door without target
    (the capture filter lets them through and only doors with a target checked)."""
    doors = [door("plain", 7113, 2231, 9157), door("routed", 4001, 4002, target=TARGET)]
    engine = KnockEngine(doors, local=frozenset({HOST}))
    sent_elsewhere = [
        tcp(1.0 + i / 10, A, port, dst=TARGET) for i, port in enumerate((7113, 2231, 9157))
    ]
    assert play_all(engine, sent_elsewhere) == []
    assert engine.counters.ignored == 3
    # The same knock to the host opens; the routed door still counts its own target.
    to_host = [tcp(2.0 + i / 10, A, port) for i, port in enumerate((7113, 2231, 9157))]
    assert Opened(2.2, "plain", A) in play_all(engine, to_host)
    routed = [tcp(3.0, A, 4001, dst=TARGET), tcp(3.1, A, 4002, dst=TARGET)]
    assert Opened(3.1, "routed", A) in play_all(engine, routed)


def test_local_addresses_change_while_running() -> None:
    engine = KnockEngine([door("plain", 7113, 2231)], local=frozenset({HOST}))
    play(engine, LocalAddresses(0.5, frozenset({"198.18.0.2"})))  # DHCP gave a new one
    assert play(engine, tcp(1.0, A, 7113)) == []
    assert play(engine, tcp(1.1, A, 7113, dst="198.18.0.2")) == [
        StageReached(1.1, "plain", A, 1, 2)
    ]


# ----------------------------------------------------------------- two clocks


def test_timeouts_follow_the_engine_clock_whatever_the_wall_clock_does() -> None:
    engine = KnockEngine([door("ssh", 7113, 2231, 9157, timeout=5.0)])
    play(engine, WallClock(0.0, 1_700_000_000.0))
    play(engine, tcp(1.0, A, 7113))
    assert play(engine, WallClock(2.0, 1_700_000_000.0 - 3600 + 2.0)) == [
        ClockStepped(2.0, -3600.0)
    ]
    play(engine, tcp(3.0, A, 2231))
    # Too late: the attempt timed out at 6.0 on the engine's clock (the wall clock went
    # back an hour, which once froze the engine's time and let this open).
    assert play(engine, tcp(601.0, A, 9157)) == [SequenceTimeout(601.0, "ssh", A, 2)]
    assert engine.counters.opened == 0


def test_spa_ages_are_measured_on_the_wall_clock() -> None:
    engine = KnockEngine([spa_door()])
    play(engine, WallClock(10.0, 1000.0))  # engine time 10 is wall time 1000
    out = play(engine, spa_knock(10.0, timestamp=1000))
    assert [type(c) for c in out][:2] == [SpaDigestSeen, SpaAccepted]
    refused = play(engine, spa_knock(20.0, timestamp=1000 - 200, digest=b"d2"))
    assert refused == [SpaRefused(20.0, "spa", A, "alice", "stale")]


def test_a_small_drift_is_followed_without_a_step_line() -> None:
    engine = KnockEngine([door("ssh", 7113, 2231)])
    assert play(engine, WallClock(0.0, 100.0)) == []
    assert play(engine, WallClock(50.0, 150.3)) == []
    assert abs(engine.wall_offset - 100.3) < 1e-9


# ----------------------------------------------------------------- records first


def test_a_one_time_line_is_marked_before_anything_opens() -> None:
    one_time = OneTimeFile("/tmp/seqs", (OneTimeSequence(steps(1001, 1002), 1, 0),))
    engine = KnockEngine([door("ot", one_time=one_time)])
    out = play_all(engine, [tcp(1.0, A, 1001), tcp(1.1, A, 1002)])
    kinds = [type(command) for command in out]
    assert kinds.index(MarkSequenceUsed) < kinds.index(Grant)
    assert MarkSequenceUsed(1.1, "ot", A, "/tmp/seqs", 1, 0) in out


def test_spa_and_totp_are_recorded_before_anything_opens() -> None:
    engine = KnockEngine([spa_door()])
    kinds = [type(command) for command in play(engine, spa_knock(1000.0))]
    assert kinds.index(SpaDigestSeen) < kinds.index(Grant)
    now = 30.0 * 1_000_000 + 3
    engine = KnockEngine([totp_door()])
    out = play_all(
        engine,
        [tcp(now + i / 100, A, s.port) for i, s in enumerate(totp_sequence(TOTP, 1_000_000))],
    )
    kinds = [type(command) for command in out]
    assert kinds.index(TotpStepUsed) < kinds.index(Grant)


# ----------------------------------------------------------------- untrusted state


def test_spa_made_before_an_untrusted_start_is_refused() -> None:
    """Regression: a truncated or damaged replay file gave an empty cache, so a packet
    captured before the restart was accepted again within its age limit."""
    engine = KnockEngine([spa_door()])
    engine.restore(untrusted_before=1000.0)
    assert play(engine, spa_knock(1010.0, timestamp=1000)) == [
        SpaRefused(1010.0, "spa", A, "alice", "before-start")
    ]
    assert SpaDigestSeen in [
        type(c) for c in play(engine, spa_knock(1010.0, timestamp=1001, digest=b"d2"))
    ]


def test_totp_steps_begun_before_an_untrusted_start_are_refused() -> None:
    now = 30.0 * 1_000_000 + 3  # 3 s into step 1_000_000
    engine = KnockEngine([totp_door()])
    engine.restore(untrusted_before=now - 1)
    for step in (999_999, 1_000_000):  # begun before the start: may have been used then
        ports = totp_sequence(TOTP, step)
        out = play_all(engine, [tcp(now + i / 100, A, s.port) for i, s in enumerate(ports)])
        assert not any(isinstance(c, Opened) for c in out)
    ports = totp_sequence(TOTP, 1_000_001)  # the next step begins after it: fine
    out = play_all(engine, [tcp(now + 1 + i / 100, A, s.port) for i, s in enumerate(ports)])
    assert Opened(now + 1.02, "otp", A) in out
