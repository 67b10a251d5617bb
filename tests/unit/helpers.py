"""Builders shared by the unit tests: doors, packets, and a playbook runner."""

from __future__ import annotations

from typing import Any

from appliance.core.engine import KnockEngine
from appliance.core.events import Event, Packet, Vet, Vetted
from appliance.core.model import (
    Commands,
    Door,
    DuplicatePolicy,
    Knock,
    OneTimeFile,
    OpenPorts,
    Step,
    TcpFlags,
)

HOST = "198.18.0.1"
SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04


def steps(*specs: str | int) -> tuple[Step, ...]:
    """``steps(7000, "8000/udp")`` -> (Step(7000, "tcp"), Step(8000, "udp"))."""
    out = []
    for spec in specs:
        port, _, proto = str(spec).partition("/")
        out.append(Step(int(port), "udp" if proto == "udp" else "tcp"))
    return tuple(out)


def door(
    name: str,
    *sequence: str | int,
    timeout: float = 5.0,
    flags: TcpFlags | None = None,
    target: str | None = None,
    duplicates: DuplicatePolicy = "ignore",
    open_ports: tuple[str | int, ...] | None = (22,),
    duration: float = 30.0,
    close: tuple[str, ...] = (),
    commands: Commands | None = None,
    one_time: OneTimeFile | None = None,
) -> Door:
    return Door(
        name=name,
        knock=Knock(
            sequence=steps(*sequence),
            seq_timeout=timeout,
            tcpflags=flags or TcpFlags(),
            target=target,
            duplicates=duplicates,
            one_time=one_time,
        ),
        open=OpenPorts(steps(*open_ports), duration) if open_ports is not None else None,
        close=close,
        commands=commands or Commands(),
    )


def tcp(ts: float, src: str, port: int, flags: int = SYN, dst: str = HOST) -> Packet:
    return Packet(ts, src, dst, "tcp", port, flags)


def udp(ts: float, src: str, port: int, dst: str = HOST) -> Packet:
    return Packet(ts, src, dst, "udp", port, 0)


def play(engine: KnockEngine, event: Event) -> list[Any]:
    """The engine's decisions for one event, as the daemon carries them out for a knocker
    that is not held off and whose records are written: each :class:`Vet` becomes its
    records, followed by what the engine does once it is answered without a refusal."""
    out: list[Any] = []
    for command in engine.handle(event):
        if isinstance(command, Vet):
            out.extend(command.records)
            out.extend(play(engine, Vetted(command.at, command.ticket, None)))
        else:
            out.append(command)
    return out


def play_all(engine: KnockEngine, events: list[Event]) -> list[Any]:
    out: list[Any] = []
    for event in events:
        out.extend(play(engine, event))
    return out
