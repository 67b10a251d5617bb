"""``knockgate simulate``: replay a capture file through the knock engine.

No privileges, no side effects: frames are decoded with the same decoder the
daemon uses, fed to the engine with their capture timestamps, timers fire at
the capture's clock, and every command is reported instead of carried out.
SPA packets go through the same reader as in the daemon; the replay cache lives
only as long as the replay (nothing is read from or written to ``state_dir``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from appliance.capture.decode import decode_frame
from appliance.capture.pcap import read_capture
from appliance.capture.spa import SpaReader
from appliance.config.schema import Config
from appliance.core.engine import KnockEngine
from appliance.core.events import (
    Command,
    Grant,
    Opened,
    Packet,
    Record,
    SpaAccepted,
    Tick,
    Vet,
    Vetted,
)


@dataclass
class Summary:
    frames: int = 0
    undecoded: int = 0
    skipped_destination: int = 0
    opened: list[Opened] = field(default_factory=list)
    grants: list[Grant] = field(default_factory=list)


def packets(path: str, summary: Summary) -> Iterator[Packet]:
    for ts, linktype, frame in read_capture(path):
        summary.frames += 1
        packet = decode_frame(linktype, frame, ts)
        if packet is None:
            summary.undecoded += 1
        else:
            yield packet


def replay(
    config: Config,
    source: Iterable[Packet],
    emit: Callable[[Command | Record], None],
    *,
    hosts: frozenset[str] = frozenset(),
    summary: Summary | None = None,
) -> Summary:
    """Feed ``source`` to a fresh engine; ``emit`` sees every command in order.

    ``hosts``, when given, are the addresses of the simulated host: packets to any
    other destination are skipped unless a door targets that address (the
    daemon's capture filter does the same).
    """
    summary = summary or Summary()
    # A door without target counts only packets to the host itself (when it is given).
    local = hosts or None
    engine = KnockEngine(config.doors, max_attempts=config.settings.max_attempts, local=local)
    spa = SpaReader(config.doors, local)
    targets = frozenset(door.knock.target for door in config.doors if door.knock.target)
    accepted = hosts | targets

    def run(commands: list[Command]) -> None:
        for command in commands:
            if isinstance(command, Vet):  # nothing is held off or written in a replay
                for record in command.records:
                    emit(record)
                run(engine.handle(Vetted(command.at, command.ticket, None)))
                continue
            if isinstance(command, Opened):
                summary.opened.append(command)
            elif isinstance(command, SpaAccepted):
                summary.opened.append(Opened(command.at, command.door, command.address))
            elif isinstance(command, Grant):
                summary.grants.append(command)
            emit(command)

    def fire_timers(until: float) -> None:
        deadline = engine.next_deadline()
        while deadline is not None and deadline <= until:
            run(engine.handle(Tick(deadline)))
            deadline = engine.next_deadline()

    for packet in source:
        if hosts and packet.dst not in accepted:
            summary.skipped_destination += 1
            continue
        fire_timers(packet.ts)
        event = spa.route(packet)  # an SPA packet: authenticated at the edge first
        if event is not None:
            run(engine.handle(event))
    fire_timers(float("inf"))
    return summary
