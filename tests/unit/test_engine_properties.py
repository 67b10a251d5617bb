"""Properties of the engine under arbitrary, hostile event streams."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.core.engine import KnockEngine
from appliance.core.events import Event, Opened, Packet, Tick
from appliance.core.model import Door, TcpFlags
from tests.unit.helpers import ACK, SYN, door

DOORS = [
    door("a", 7113, "2231/udp", 9157, timeout=2.0),
    door("b", 2231, 9157, timeout=0.5, flags=TcpFlags(SYN, ACK), duplicates="reset"),
    door("c", 7113, 7113, 7113, timeout=1.0, target="198.18.0.9"),
    door("d", 4001, timeout=3.0),
]
SOURCES = ["198.18.1.1", "198.18.1.2", "2001:db8::1", "", "not-an-address"]
PORTS = [7113, 2231, 9157, 4001, 0, 1, 65535, 70000, -1]


@st.composite
def packets(draw: st.DrawFn) -> Packet:
    ts = draw(
        st.one_of(
            st.floats(min_value=0, max_value=20, allow_nan=False),
            st.sampled_from([math.nan, math.inf, -math.inf, -1.0]),
        )
    )
    return Packet(
        ts=ts,
        src=draw(st.sampled_from(SOURCES)),
        dst=draw(st.sampled_from(["198.18.0.1", "198.18.0.9", "::1"])),
        proto=draw(st.sampled_from(["tcp", "udp", "icmp", ""])),
        dport=draw(st.sampled_from(PORTS)),
        flags=draw(st.integers(min_value=-1, max_value=0x1FF)),
    )


events_strategy = st.lists(
    st.one_of(packets(), st.builds(Tick, st.floats(min_value=0, max_value=25))), max_size=120
)


@settings(max_examples=300, deadline=None)
@given(events_strategy, st.integers(min_value=1, max_value=5))
def test_no_stream_of_hostile_events_raises(events: list[Event], max_attempts: int) -> None:
    engine = KnockEngine(DOORS, max_attempts=max_attempts)
    for event in events:
        engine.handle(event)
        assert 0 <= engine.attempt_count <= max_attempts
    engine.drain()


def counts_for(door_: Door, packet: Packet) -> tuple[int, str] | None:
    """The step key a packet presents to a door, or None when the door ignores it."""
    knock = door_.knock
    key = (packet.dport, packet.proto)
    if key not in knock.sequence:
        return None
    if knock.target is not None and packet.dst != knock.target:
        return None
    if packet.proto == "tcp" and not knock.tcpflags.matches(packet.flags):
        return None
    return key


def sent_full_sequence_in_time(door_: Door, history: list[tuple[float, Packet]], at: float) -> bool:
    """Did the source send the door's steps, in order, all within seq_timeout before ``at``?"""
    window = [(ts, p) for ts, p in history if at - door_.knock.seq_timeout < ts <= at]
    wanted = list(door_.knock.sequence)
    position = 0
    for _, packet in window:
        if position < len(wanted) and counts_for(door_, packet) == wanted[position]:
            position += 1
    return position == len(wanted)


@settings(max_examples=400, deadline=None)
@given(st.lists(packets(), max_size=80), st.integers(min_value=1, max_value=4))
def test_a_door_opens_only_for_a_source_that_sent_its_full_sequence_in_time(
    stream: list[Packet], max_attempts: int
) -> None:
    engine = KnockEngine(DOORS, max_attempts=max_attempts)
    by_name = {d.name: d for d in DOORS}
    history: dict[str, list[tuple[float, Packet]]] = {}
    now = -math.inf
    for packet in stream:
        if not math.isfinite(packet.ts):
            engine.handle(packet)
            continue
        now = max(now, packet.ts)  # the engine's clock never goes back
        history.setdefault(packet.src, []).append((now, packet))
        for command in engine.handle(packet):
            if isinstance(command, Opened):
                assert command.at == now
                assert sent_full_sequence_in_time(
                    by_name[command.door], history[command.address], now
                ), f"{command.door} opened for {command.address} without its sequence"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(packets(), max_size=40),
    st.floats(min_value=0, max_value=0.4),
)
def test_noise_from_other_sources_never_stops_a_valid_knock(
    noise: list[Packet], spacing: float
) -> None:
    """A source that sends door a's sequence in time opens, whatever others send."""
    engine = KnockEngine(DOORS)
    me = "198.18.200.200"
    mine = [
        Packet(30.0, me, "198.18.0.1", "tcp", 7113, SYN),
        Packet(30.0 + spacing, me, "198.18.0.1", "udp", 2231, 0),
        Packet(30.0 + 2 * spacing, me, "198.18.0.1", "tcp", 9157, SYN),
    ]
    stream: list[Event] = []
    for i, packet in enumerate(noise):  # noise spread around and between my knocks
        stream.append(
            Packet(
                29.5 + i * 0.03, packet.src, packet.dst, packet.proto, packet.dport, packet.flags
            )
        )
    stream.extend(mine)
    stream.sort(key=lambda e: e.ts)
    opened = [c for e in stream for c in engine.handle(e) if isinstance(c, Opened)]
    assert any(c.door == "a" and c.address == me for c in opened)
