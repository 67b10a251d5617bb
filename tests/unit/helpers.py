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


class FakeChannel:
    """An in-memory packet process (appliance.runtime.privsep.PacketChannel): records what
    the daemon tells it; ``messages`` are the raw messages ``receive`` decodes in turn."""

    def __init__(self) -> None:
        import socket

        from appliance.capture.records import COUNTER_NAMES, RecordReader

        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self.records = RecordReader()
        self.calls: list[tuple[Any, ...]] = []
        self.messages: list[bytes] = []
        self.gone = False
        self.stuck = False  # configure: as PacketChild when the packet process does not read
        self.closed = False
        self._r, self._w = socket.socketpair()

    def fileno(self) -> int:
        return self._r.fileno()

    def configure(self, doors: Any, local: frozenset[str] | None) -> None:
        from appliance.capture.records import spa_users
        from appliance.runtime.privsep import PacketProcessGone

        if self.stuck:
            raise PacketProcessGone("the packet process does not read its socket (stuck)")
        self.records.spa_users = spa_users(doors)
        self.calls.append(("config", tuple(door.name for door in doors), local))

    def add(self, key: int, interface: str, sock: Any, replaces: int | None = None) -> None:
        self.calls.append(
            ("add", key, interface) if replaces is None else ("add", key, interface, replaces)
        )

    def remove(self, key: int) -> None:
        self.calls.append(("remove", key))

    def receive(self, now: float) -> Any:
        from appliance.capture.records import Batch
        from appliance.runtime.privsep import PacketProcessGone

        if self.gone:
            raise PacketProcessGone("the packet process closed its socket")
        merged = Batch()
        while self.messages:
            batch = self.records.read(self.messages.pop(0), now)
            merged.events += batch.events
            merged.logs += batch.logs
            merged.failed += batch.failed
            if batch.counters is not None:
                self.counters = merged.counters = batch.counters
        return merged

    @property
    def malformed(self) -> int:
        return self.records.malformed

    def describe(self) -> dict[str, object]:
        return {"pid": None, "user": "fake"}

    def exit_status(self) -> int | None:
        return 1 if self.gone else None

    def close(self) -> None:
        self.closed = True
        self._r.close()
        self._w.close()
