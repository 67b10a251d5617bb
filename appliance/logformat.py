"""Turns engine commands into log lines: knockd-style text or JSON records.

knockd's wording is kept (``IP: door: Stage N``, ``OPEN SESAME``, ``running
command``, ``sequence timeout``) so log watchers written for knockd keep working.

Commands carry times on the engine's clock; ``wall_offset`` (the engine's
``wall_offset``) turns them into wall-clock times for people and JSON readers.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from appliance.core.events import (
    ClockStepped,
    Command,
    DoorExhausted,
    DoorsReloaded,
    Grant,
    MarkSequenceUsed,
    OneTimeAdvanced,
    Opened,
    Record,
    Refused,
    Revoke,
    RunCommand,
    SendReceipt,
    SequenceReset,
    SequenceTimeout,
    SpaAccepted,
    SpaDigestSeen,
    SpaRefused,
    StageReached,
    TotpStepUsed,
    Vet,
)

Line = Command | Record


def clock(ts: float) -> str:
    """A timestamp as UTC wall-clock time with milliseconds."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


# Records whose ``until`` is a wall-clock time already (what the state file keeps).
WALL_UNTIL = (SpaDigestSeen, TotpStepUsed)


def describe(command: Line, wall_offset: float = 0.0) -> str | None:
    """One knockd-style line for a command or record, or ``None`` for internal ones."""
    match command:
        case StageReached(door=door, address=address, stage=stage, total=total):
            return f"{address}: {door}: Stage {stage} of {total}"
        case Opened(door=door, address=address):
            return f"{address}: {door}: OPEN SESAME"
        case Grant(door=door, address=address, ports=ports, until=until):
            opened = ", ".join(str(port) for port in ports)
            return f"{address}: {door}: open {opened} until {clock(until + wall_offset)}"
        case Revoke(door=door, address=address, by=by):
            return f"{address}: {door}: close (knock on {by})"
        case RunCommand(door=door, phase=phase, command=text):
            return f"{door}: running {phase} command: {text}"
        case SequenceReset(door=door, address=address, stage=stage, dport=dport, proto=proto):
            return f"{address}: {door}: sequence reset at stage {stage} by {dport}/{proto}"
        case SequenceTimeout(door=door, address=address, stage=stage):
            return f"{address}: {door}: sequence timeout (stage {stage})"
        case MarkSequenceUsed(door=door, path=path, line=line):
            return f"{door}: one-time sequence on line {line} of {path} used"
        case OneTimeAdvanced(door=door, remaining=remaining):
            return f"{door}: {remaining} one-time sequence(s) left"
        case DoorExhausted(door=door, path=path):
            return f"{door}: no more sequences left in {path}: door disabled"
        case SpaAccepted(door=door, address=address, src=src, user=user, ports=ports, until=until):
            opened = ", ".join(str(port) for port in ports)
            via = "" if src == address else f" (SPA from {src})"
            return (
                f"{address}: {door}: SPA from user {user} accepted{via}: "
                f"{opened} until {clock(until + wall_offset)}"
            )
        case SpaRefused(door=door, src=src, user=user, reason=reason):
            return f"{src}: {door}: SPA from user {user} refused: {reason}"
        case TotpStepUsed(door=door, step=step):
            return f"{door}: time step {step} used; its sequence is refused from now on"
        case ClockStepped(by=by):
            direction = "back" if by < 0 else "forward"
            return (
                f"the wall clock stepped {direction} by {abs(by):.1f} s: timeouts unaffected, "
                "TOTP steps and SPA ages follow the new time"
            )
        case Refused(door=door, address=address, reason=reason):
            return f"{address}: {door}: {reason}: no access"
        case DoorsReloaded(kept=kept, changed=changed, added=added, removed=removed):
            parts = [
                f"{what} {', '.join(names)}"
                for what, names in (
                    ("kept (attempts in progress go on)", kept),
                    ("changed (attempts dropped)", changed),
                    ("added", added),
                    ("removed", removed),
                )
                if names
            ]
            return "doors: " + ("; ".join(parts) or "none")
        case SpaDigestSeen() | Vet() | SendReceipt():
            return None  # internal (a receipt is not a decision: its grant was logged)
    raise TypeError(f"unknown command {command!r}")


def record(command: Line, wall_offset: float = 0.0) -> dict[str, Any]:
    """A command as a JSON-ready mapping: ``event`` names it, times on the wall clock."""
    data: dict[str, Any] = {"event": type(command).__name__, **command._asdict()}
    data["at"] = round(command.at + wall_offset, 6)
    if "until" in data and not isinstance(command, WALL_UNTIL):
        data["until"] = round(data["until"] + wall_offset, 6)
    if "ports" in data:
        data["ports"] = [str(port) for port in data["ports"]]
    if "digest" in data:
        data["digest"] = data["digest"].hex()
    return data


def json_line(command: Line, wall_offset: float = 0.0) -> str:
    return json.dumps(record(command, wall_offset), sort_keys=False)
