"""Playbooks for the authenticated knocks: TOTP sequences and SPA policy in the engine."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.core.engine import KnockEngine
from appliance.core.events import (
    Grant,
    Opened,
    RunCommand,
    SpaAccepted,
    SpaDigestSeen,
    SpaKnock,
    SpaRefused,
    StageReached,
    TotpStepUsed,
)
from appliance.core.model import Commands, Door, Knock, OpenPorts, Spa, SpaUser, Totp
from appliance.core.totp import time_step, totp_sequence, window
from tests.unit.helpers import play, steps, tcp

A, B = "198.18.5.1", "198.18.5.2"
SECRET = b"0123456789abcdefghij"
TOTP = Totp(SECRET, steps=3, period=30, low=20000, high=20999)


def totp_door(totp: Totp = TOTP) -> Door:
    return Door(
        name="otp",
        knock=Knock(sequence=(), seq_timeout=5.0, totp=totp),
        open=OpenPorts(steps(22), 10.0),
    )


def knock(engine: KnockEngine, ts: float, src: str, step: int) -> list:
    out: list = []
    for i, port in enumerate(totp_sequence(TOTP, step)):
        out += play(engine, tcp(ts + i * 0.01, src, port.port))
    return out


# ----------------------------------------------------------------- TOTP derivation


def test_totp_sequence_is_deterministic_distinct_and_in_range() -> None:
    first = totp_sequence(TOTP, 1000)
    assert first == totp_sequence(TOTP, 1000)
    assert len(set(first)) == 3
    assert all(20000 <= step.port <= 20999 and step.proto == "tcp" for step in first)
    assert totp_sequence(TOTP, 1001) != first
    assert totp_sequence(Totp(b"another secret 1234", 3, 30, 20000, 20999), 1000) != first


def test_totp_sequence_pinned() -> None:
    """The derivation is a wire format shared with every client: it must not drift."""
    # As documented: HMAC-SHA256(secret, step as 8 bytes || block 0 as 4 bytes), 4-byte words.
    words = struct.unpack(">8I", hmac.digest(SECRET, struct.pack(">qI", 7, 0), hashlib.sha256))
    expected = []
    for word in words:
        port = 20000 + word % 1000
        if port not in expected:
            expected.append(port)
    assert [step.port for step in totp_sequence(TOTP, 7)] == expected[:3]


def test_window_is_current_step_and_one_either_side() -> None:
    assert list(window(TOTP, 30 * 100 + 5)) == [99, 100, 101]
    assert time_step(TOTP, 30 * 100 - 0.001) == 99


# ----------------------------------------------------------------- TOTP doors

NOW = 30.0 * 1_000_000 + 3  # early in time step 1_000_000


def test_current_previous_and_next_steps_open() -> None:
    for step in (999_999, 1_000_000, 1_000_001):
        engine = KnockEngine([totp_door()])
        out = knock(engine, NOW, A, step)
        assert Opened(NOW + 0.02, "otp", A) in out
        assert TotpStepUsed(NOW + 0.02, "otp", A, step, (step + 6) * 30.0) in out  # max skew 5
        assert out.index(TotpStepUsed(NOW + 0.02, "otp", A, step, (step + 6) * 30.0)) < out.index(
            Grant(NOW + 0.02, "otp", A, steps(22), NOW + 10.02)
        )  # recorded before anything opens


def test_steps_outside_the_window_do_not_open() -> None:
    engine = KnockEngine([totp_door()])
    for step in (999_998, 1_000_002):
        assert not any(isinstance(c, Opened) for c in knock(engine, NOW, A, step))


def test_a_used_step_is_refused_even_from_another_address() -> None:
    engine = KnockEngine([totp_door()])
    assert any(isinstance(c, Opened) for c in knock(engine, NOW, A, 1_000_000))
    assert not any(isinstance(c, Opened) for c in knock(engine, NOW + 1, A, 1_000_000))
    assert not any(isinstance(c, Opened) for c in knock(engine, NOW + 2, B, 1_000_000))
    # The next step still opens.
    assert any(isinstance(c, Opened) for c in knock(engine, NOW + 3, B, 1_000_001))


def test_previous_window_sequence_replayed_later_is_refused() -> None:
    engine = KnockEngine([totp_door()])
    assert any(isinstance(c, Opened) for c in knock(engine, NOW, A, 1_000_000))
    later = NOW + 30  # step 1_000_001: 1_000_000 is "the previous one", still in the window
    assert not any(isinstance(c, Opened) for c in knock(engine, later, A, 1_000_000))
    much_later = NOW + 90  # 1_000_000 has left the window: refused as too old
    assert not any(isinstance(c, Opened) for c in knock(engine, much_later, A, 1_000_000))


def test_used_steps_survive_a_restart_through_restore() -> None:
    engine = KnockEngine([totp_door()])
    out = knock(engine, NOW, A, 1_000_000)
    used = [(c.door, c.step, c.until) for c in out if isinstance(c, TotpStepUsed)]
    restarted = KnockEngine([totp_door()])
    restarted.restore(totp_used=used)
    assert not any(isinstance(c, Opened) for c in knock(restarted, NOW + 1, A, 1_000_000))
    assert restarted.saved_state()[1] == used


def test_sequences_roll_over_as_time_moves() -> None:
    engine = KnockEngine([totp_door()])
    later = NOW + 30 * 5
    step = time_step(TOTP, later)
    assert any(isinstance(c, Opened) for c in knock(engine, later, A, step))
    assert engine.active_sequence("otp") == totp_sequence(TOTP, step)


def test_a_used_step_stays_refused_after_a_reload_raises_skew() -> None:
    """Regression: used steps were forgotten when they left the current window."""
    engine = KnockEngine([totp_door()])
    out = knock(engine, NOW, A, 1_000_000)
    used = [(c.door, c.step, c.until) for c in out if isinstance(c, TotpStepUsed)]
    wider = Totp(SECRET, steps=3, period=30, low=20000, high=20999, skew=3)
    reloaded = KnockEngine([totp_door(wider)])
    reloaded.restore(totp_used=used)
    later = NOW + 30 * 2  # step 1_000_002: 1_000_000 is inside skew 3
    assert not any(isinstance(c, Opened) for c in knock(reloaded, later, B, 1_000_000))


def test_a_sweep_of_the_range_in_port_order_never_opens() -> None:
    """Regression: packets off a TOTP sequence did not reset it, so a sweep completed any
    time step whose ports happen to ascend."""
    engine = KnockEngine([totp_door()])
    ascending = next(
        step
        for step in range(1_000_000, 1_100_000)
        if list(totp_sequence(TOTP, step)) == sorted(totp_sequence(TOTP, step))
    )
    ts = ascending * 30.0 + 1
    opened = False
    for i, port in enumerate(range(TOTP.low, TOTP.high + 1)):
        out = play(engine, tcp(ts + i * 0.001, A, port))
        opened = opened or any(isinstance(c, Opened) for c in out)
    assert not opened


def test_a_stage_is_reported_with_the_door_name() -> None:
    engine = KnockEngine([totp_door()])
    first = totp_sequence(TOTP, 1_000_000)[0]
    out = play(engine, tcp(NOW, A, first.port))
    assert StageReached(NOW, "otp", A, 1, 3) in out


# ----------------------------------------------------------------- SPA policy

ALICE = SpaUser("alice", b"k" * 32, b"h" * 32)
BOB = SpaUser("bob", b"K" * 32, b"H" * 32, ports=steps(22), max_time=60.0)


def spa_door(**spa: object) -> Door:
    settings = Spa(users=(ALICE, BOB), **spa)  # type: ignore[arg-type]
    return Door(
        name="spa",
        knock=Knock(sequence=()),
        open=OpenPorts(steps(22, 80), 30.0),
        spa=settings,
        commands=Commands(start="allow %IP%"),
    )


def spa_knock(
    ts: float,
    *,
    user: str = "alice",
    timestamp: int | None = None,
    address: str = B,
    ports: tuple = steps(22),
    client_timeout: int | None = None,
    digest: bytes = b"d1",
    msg_type: int = 1,
) -> SpaKnock:
    return SpaKnock(
        ts,
        A,
        "spa",
        user,
        "someone",
        int(ts) if timestamp is None else timestamp,
        msg_type,
        address,
        ports,
        client_timeout,
        digest,
    )


def test_spa_grants_the_address_inside_the_packet() -> None:
    engine = KnockEngine([spa_door()])
    out = play(engine, spa_knock(1000.0))
    assert out == [
        SpaDigestSeen(1000.0, "spa", B, b"d1", 1000 + 3600 + 1.0),  # kept for the largest max_age
        SpaAccepted(1000.0, "spa", B, A, "alice", steps(22), 1030.0),
        Grant(1000.0, "spa", B, steps(22), 1030.0),
        RunCommand(1000.0, "spa", B, "start", f"allow {B}"),
    ]
    assert engine.counters.spa_accepted == 1


def test_spa_source_address_zero_means_the_sender_when_allowed() -> None:
    engine = KnockEngine([spa_door(require_source_address=False)])
    out = play(engine, spa_knock(1000.0, address="0.0.0.0"))
    assert Grant(1000.0, "spa", A, steps(22), 1030.0) in out


def test_spa_source_address_zero_refused_by_default() -> None:
    engine = KnockEngine([spa_door()])
    out = play(engine, spa_knock(1000.0, address="0.0.0.0"))
    assert out == [SpaRefused(1000.0, "spa", A, "alice", "address")]


def test_spa_source_address_zero_from_an_unspecified_sender_is_refused() -> None:
    engine = KnockEngine([spa_door(require_source_address=False)])
    knock = spa_knock(1000.0, address="::")._replace(src="::")
    assert play(engine, knock) == [SpaRefused(1000.0, "spa", "::", "alice", "address")]


def test_spa_replay_refused_after_a_reload_raises_max_age() -> None:
    """Regression: the cache kept entries for the door's max_age, so raising it reopened them."""
    engine = KnockEngine([spa_door()])
    play(engine, spa_knock(1000.0))
    reloaded = KnockEngine([spa_door(max_age=600.0)])
    reloaded.restore(spa_seen=engine.saved_state()[0])
    assert play(reloaded, spa_knock(1200.0, timestamp=1000)) == [
        SpaRefused(1200.0, "spa", A, "alice", "replay")
    ]


def test_spa_replay_is_refused_until_the_packet_is_too_old_anyway() -> None:
    engine = KnockEngine([spa_door()])
    play(engine, spa_knock(1000.0))
    assert play(engine, spa_knock(1001.0, timestamp=1000)) == [
        SpaRefused(1001.0, "spa", A, "alice", "replay")
    ]
    assert play(engine, spa_knock(1200.0, timestamp=1000)) == [
        SpaRefused(1200.0, "spa", A, "alice", "stale")
    ]


def test_spa_replay_refused_after_restore() -> None:
    engine = KnockEngine([spa_door()])
    play(engine, spa_knock(1000.0))
    restarted = KnockEngine([spa_door()])
    restarted.restore(spa_seen=engine.saved_state()[0])
    assert play(restarted, spa_knock(1010.0, timestamp=1000)) == [
        SpaRefused(1010.0, "spa", A, "alice", "replay")
    ]


@pytest.mark.parametrize(
    ("timestamp", "reason"),
    [(1000 - 121, "stale"), (1000 + 121, "future")],
)
def test_spa_clock_window(timestamp: int, reason: str) -> None:
    engine = KnockEngine([spa_door()])
    assert play(engine, spa_knock(1000.0, timestamp=timestamp)) == [
        SpaRefused(1000.0, "spa", A, "alice", reason)
    ]


def test_spa_edges_of_the_clock_window_are_accepted() -> None:
    for timestamp in (1000 - 120, 1000 + 120):
        engine = KnockEngine([spa_door()])
        assert any(
            isinstance(c, SpaAccepted) for c in play(engine, spa_knock(1000.0, timestamp=timestamp))
        )


def test_spa_port_outside_the_allowance_refuses_the_whole_request() -> None:
    engine = KnockEngine([spa_door()])
    assert play(engine, spa_knock(1000.0, user="bob", ports=steps(22, 80))) == [
        SpaRefused(1000.0, "spa", A, "bob", "ports")
    ]
    assert play(engine, spa_knock(1000.0, ports=steps(443), digest=b"d2")) == [
        SpaRefused(1000.0, "spa", A, "alice", "ports")
    ]


def test_spa_time_is_capped_by_user_and_door() -> None:
    engine = KnockEngine([spa_door(max_time=600.0)])
    out = play(engine, spa_knock(1000.0, client_timeout=5000, msg_type=3))
    assert Grant(1000.0, "spa", B, steps(22), 1600.0) in out
    out = play(engine, spa_knock(1000.0, user="bob", client_timeout=5000, msg_type=3, digest=b"x"))
    assert Grant(1000.0, "spa", B, steps(22), 1060.0) in out
    out = play(engine, spa_knock(1000.0, client_timeout=10, msg_type=3, digest=b"y"))
    assert Grant(1000.0, "spa", B, steps(22), 1010.0) in out


def test_spa_command_messages_are_refused() -> None:
    engine = KnockEngine([spa_door()])
    assert play(engine, spa_knock(1000.0, msg_type=0)) == [
        SpaRefused(1000.0, "spa", A, "alice", "message-type")
    ]


def test_refused_packets_do_not_enter_the_replay_cache() -> None:
    engine = KnockEngine([spa_door()])
    play(engine, spa_knock(1000.0, ports=steps(443)))
    assert any(isinstance(c, SpaAccepted) for c in play(engine, spa_knock(1000.0)))


@given(
    events=st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=200.0),  # seconds after the start
            st.sampled_from([A, B, "2001:2::7"]),
            st.one_of(
                st.integers(min_value=19990, max_value=21010),
                st.sampled_from(  # the real sequences of the steps the events span
                    [p.port for c in range(999_999, 1_000_009) for p in totp_sequence(TOTP, c)]
                ),
            ),
        ),
        max_size=300,
    ),
    max_attempts=st.integers(min_value=1, max_value=4),
)
@settings(max_examples=200, deadline=None)
def test_totp_doors_keep_attempt_count_and_limits(
    events: list[tuple[float, str, int]], max_attempts: int
) -> None:
    """Time steps rolling over, steps used, evictions: the attempt count stays exact."""
    engine = KnockEngine([totp_door()], max_attempts=max_attempts)
    for offset, src, port in sorted(events, key=lambda event: event[0]):
        engine.handle(tcp(NOW + offset, src, port))
        held = sum(len(state.attempts) for state in engine.doors)
        assert engine.attempt_count == held <= max_attempts


def test_spa_age_is_measured_on_the_packets_own_clock_after_a_step_back() -> None:
    engine = KnockEngine([spa_door()])
    play(engine, spa_knock(5000.0, digest=b"first"))  # the host clock ran an hour fast
    out = play(engine, spa_knock(1400.0, digest=b"second"))  # NTP stepped it back
    assert any(isinstance(c, SpaAccepted) for c in out)


def test_a_reload_keeps_a_totp_doors_attempts_counted_and_expiring() -> None:
    """Regression: a reload that kept a TOTP door dropped its time-step states from the
    engine's list of doors until the next roll: their attempts were neither expired nor
    evicted, and the attempt count drifted."""
    from appliance.core.events import NewDoors, Tick

    engine = KnockEngine([totp_door()])
    step = time_step(TOTP, NOW)
    first = totp_sequence(TOTP, step)[0].port
    play(engine, tcp(NOW, A, first))
    assert engine.attempt_count == 1
    engine.handle(NewDoors(NOW + 0.1, (totp_door(),), 100))
    assert engine.attempt_count == sum(len(state.attempts) for state in engine.doors) == 1
    assert engine.next_deadline() is not None
    engine.handle(Tick(NOW + 6.0))  # seq_timeout 5 s: the attempt is gone
    assert engine.attempt_count == sum(len(state.attempts) for state in engine.doors) == 0
    assert knock(engine, NOW + 7.0, B, step)[-1] == Grant(
        NOW + 7.02, "otp", B, steps(22), NOW + 17.02
    )
