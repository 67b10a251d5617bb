"""``knockgate top``: a live terminal dashboard of the running daemon.

Each refresh asks the status socket for a snapshot (what ``knockgate status --json``
prints) and the last few events, and draws one frame: the header (host, firewall
backend, uptime, interfaces, packet process), the doors, the grants with their time
left, the services and label-gated containers, the rates, the recent events. Rates
are counter deltas between two snapshots over the daemon's own uptime clock, so a
slow refresh does not inflate them; a daemon that restarted (uptime or a counter
went back) has no rate until its next snapshot.

:func:`frame` and :func:`rates` are pure (a snapshot dict in, a renderable or rows
out): the unit tests render a frame into a recording console. :func:`run` is the
loop: a daemon that is not there is a "not reachable, retrying" frame, never a
traceback; Ctrl-C ends it with status 0.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from appliance.errors import KnockgateError
from appliance.runtime.events_log import EventRecord
from appliance.runtime.status import events, query

EVENTS_SHOWN = 6
MAX_ROWS = 20  # grants or containers listed; the rest are counted ("... 3 more")
WIDE = 100  # columns from which the tables sit two by two
DATE = len("2026-12-04 ")  # an event line's date, left out


@dataclass(frozen=True, slots=True)
class RateKind:
    name: str
    counters: tuple[str, ...]  # summed
    per: float  # seconds: 1 for "/s", 60 for "/min"


RATE_KINDS = (
    RateKind("packets/s", ("packets",), 1),  # knock-port packets the engine saw
    RateKind("knocks/s", ("stages", "spa_accepted", "spa_refused"), 1),  # steps, SPA knocks
    RateKind("opens/min", ("opened",), 60),  # completed knocks
    RateKind("drops/s", ("frames_dropped",), 1),  # dropped by the kernel before capture
    RateKind("refused/s", ("refused", "spa_refused"), 1),  # held off, unrecorded, bad SPA
)


@dataclass(frozen=True, slots=True)
class Rate:
    name: str
    value: float | None  # None: not known yet (one snapshot, or the daemon restarted)
    total: int  # since the daemon started


def rates(before: dict[str, Any] | None, after: dict[str, Any]) -> list[Rate]:
    """Each :data:`RATE_KINDS` row from the counters of two snapshots, over the time
    between them on the daemon's clock (``uptime``)."""
    now = after.get("counters") or {}
    totals = [sum(int(now.get(c, 0)) for c in kind.counters) for kind in RATE_KINDS]
    elapsed = 0.0
    then: dict[str, Any] = {}
    if before is not None:
        elapsed = float(after.get("uptime", 0)) - float(before.get("uptime", 0))
        then = before.get("counters") or {}
    restarted = any(int(now.get(k, 0)) < int(v) for k, v in then.items() if k in now)
    rows = []
    for kind, total in zip(RATE_KINDS, totals, strict=True):
        value = None
        if before is not None and elapsed > 0 and not restarted:
            delta = total - sum(int(then.get(c, 0)) for c in kind.counters)
            value = delta / elapsed * kind.per
        rows.append(Rate(kind.name, value, total))
    return rows


def duration(seconds: float) -> str:
    """``29 s``, ``4m05s``, ``2h07m``, ``3d04h``: the time left of a grant, an uptime."""
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def frame(
    snapshot: dict[str, Any],
    rows: Sequence[Rate] = (),
    recent: Sequence[dict[str, Any]] = (),
) -> RenderableType:
    """One dashboard frame from a status snapshot, its rates and recent event records."""
    panes = _Panes(_doors(snapshot), _rates(rows), _grants(snapshot), _services(snapshot))
    return Group(_header(snapshot), panes, _events(recent))


class _Panes:
    """Doors beside rates (the doors wider), grants beside services, or one under the
    other when the terminal is narrow (decided at each render, so a resized terminal
    gets the layout that fits)."""

    def __init__(self, *tables: Table) -> None:
        self.tables = tables

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if options.max_width < WIDE:
            yield Group(*self.tables)
            return
        doors, rates, grants, services = self.tables
        for (left, right), ratios in (((doors, rates), (3, 2)), ((grants, services), (1, 1))):
            grid = Table.grid(expand=True, padding=(0, 1))
            grid.add_column(ratio=ratios[0])
            grid.add_column(ratio=ratios[1])
            grid.add_row(left, right)
            yield grid


def unreachable(path: str, reason: str, interval: float) -> Panel:
    """The frame shown while no daemon answers."""
    stamp = time.strftime("%H:%M:%S")
    text = Text.assemble(
        ("daemon not reachable, retrying", "bold red"),
        f" every {interval:g} s ({stamp})\n",
        (reason, "dim"),
    )
    return Panel(text, title="knockgate top", subtitle=Text(path), border_style="red")


def _header(snapshot: dict[str, Any]) -> Panel:
    interfaces = ", ".join(snapshot.get("interfaces") or []) or "(no interface)"
    packet = snapshot.get("packet_process")
    if isinstance(packet, dict):
        process = f"pid {packet.get('pid')}, user {packet.get('user')}"
    else:
        process = "in the daemon"
    line = Text.assemble(
        ("host ", "dim"),
        (str(snapshot.get("host", "?")), "bold"),
        ("  firewall ", "dim"),
        str(snapshot.get("backend", "?")),
        ("  up ", "dim"),
        duration(float(snapshot.get("uptime", 0))),
        ("  pid ", "dim"),
        str(snapshot.get("pid", "?")),
        ("  attempts ", "dim"),
        str(snapshot.get("attempts", 0)),
        "\n",
        ("capturing on ", "dim"),
        interfaces,
        ("  packet process ", "dim"),
        process,
    )
    stamp = time.strftime("%H:%M:%S")
    return Panel(line, title=f"knockgate top · {stamp}", title_align="left", box=box.ROUNDED)


def _row(table: Table, *cells: RenderableType) -> None:
    """A row whose plain strings are shown as they are: text from the daemon (an event's
    detail, a container or error name) is never read as rich markup."""
    table.add_row(*(Text(cell) if isinstance(cell, str) else cell for cell in cells))


def _table(title: str, *columns: str, wide: str = "") -> Table:
    """A titled table; the ``wide`` column takes the room left (the others fit their
    content), so short cells stay on one line."""
    table = Table(
        title=title,
        title_justify="left",
        title_style="bold",
        expand=True,
        box=box.SIMPLE_HEAD,
        show_edge=False,
    )
    for column in columns:
        table.add_column(column, overflow="fold", ratio=1 if column == wide else None)
    return table


def _doors(snapshot: dict[str, Any]) -> Table:
    """Each door, with the addresses its grants in the kernel are for now."""
    table = _table("doors", "door", "knock", "opens", "grants", wide="opens")
    holders: dict[str, set[str]] = {}
    for grant in snapshot.get("grants") or []:
        if grant.get("door"):
            holders.setdefault(str(grant["door"]), set()).add(str(grant.get("address")))
    for door in snapshot.get("doors") or []:
        kind = str(door.get("knock", "sequence"))
        how = kind if kind.startswith("spa") else f"{door.get('steps')}-step {kind}"
        opens = ", ".join(door.get("open") or [])
        if door.get("closes"):
            opens = "closes " + ", ".join(door["closes"])
        grants = len(holders.get(str(door.get("name")), ()))
        _row(table, str(door.get("name")), how, opens or "(commands)", str(grants))
    return table


def _grants(snapshot: dict[str, Any]) -> Table:
    table = _table("grants", "door", "address", "port", "remaining", wide="address")
    grants = snapshot.get("grants") or []
    if grants and "error" in grants[0]:
        _row(table, Text(f"cannot list: {grants[0]['error']}", "red"), "", "", "")
        return table
    ordered = sorted(grants, key=lambda g: float(g.get("expires_in", 0)))
    for grant in ordered[:MAX_ROWS]:
        service = f"service {grant['service']}" if grant.get("service") else "?"
        _row(
            table,
            str(grant.get("door") or service),
            str(grant.get("address")),
            str(grant.get("port")),
            duration(float(grant.get("expires_in", 0))),
        )
    _more(table, len(ordered), 4)
    if not ordered:
        _row(table, Text("none open", "dim"), "", "", "")
    return table


def _services(snapshot: dict[str, Any]) -> Table:
    table = _table(
        "services and gated containers", "name", "state", "detail", "grants", wide="detail"
    )
    rows: list[tuple[str, str, str, str]] = []
    for service in snapshot.get("services") or []:
        up = f"up {duration(float(service.get('uptime', 0)))}" if service.get("running") else ""
        rows.append(
            (str(service.get("name")), str(service.get("state")), up, str(service.get("grants")))
        )
    for row in snapshot.get("gated") or []:
        ports = ", ".join(row.get("ports") or []) or "no port"
        door = f"door {row['door']}" if row.get("door") else "no door"
        detail = f"{door}, {ports}"
        if row.get("docker") != "running":
            detail += f", docker {row.get('docker')}"
        if row.get("problems"):
            detail += f"; {len(row['problems'])} problem(s)"
        rows.append((str(row.get("name")), str(row.get("state")), detail, str(row.get("grants"))))
    for name, state, detail, grants in rows[:MAX_ROWS]:
        _row(table, name, Text(state, _state_style(state)), detail, grants)
    _more(table, len(rows), 4)
    if not rows:
        _row(table, Text("none", "dim"), "", "", "")
    return table


def _state_style(state: str) -> str:
    if state in ("ready", "serving", "idle", "open"):
        return "green"
    if state in ("failed", "closed"):
        return "red"
    return "yellow" if state in ("starting", "stopping", "paused") else ""


def _rates(rows: Iterable[Rate]) -> Table:
    table = _table("rates", "rate", "now", "total", wide="total")
    for rate in rows:
        now = "-" if rate.value is None else f"{rate.value:.1f}"
        _row(table, rate.name, now, str(rate.total))
    return table


def _events(recent: Sequence[dict[str, Any]]) -> Table:
    table = _table("recent events", "event", wide="event")
    table.show_header = False
    for record in recent[-EVENTS_SHOWN:]:
        _row(table, EventRecord.from_dict(record).text()[DATE:])  # the time is enough
    if not recent:
        _row(table, Text("none yet", "dim"))
    return table


def _more(table: Table, count: int, width: int) -> None:
    if count > MAX_ROWS:
        _row(table, Text(f"... {count - MAX_ROWS} more", "dim"), *[""] * (width - 1))


class Top:
    """The loop's state: the last snapshot (for rates) and the socket it reads."""

    def __init__(self, path: str, interval: float) -> None:
        self.path = path
        self.interval = interval
        self.last: dict[str, Any] | None = None

    def refresh(self) -> RenderableType:
        """The next frame: the daemon's state now, or why there is none."""
        try:
            snapshot = query(self.path)
        except KnockgateError as error:
            self.last = None  # it may come back as a new process: rates start over
            return unreachable(self.path, str(error), self.interval)
        if "error" in snapshot:
            return unreachable(self.path, str(snapshot["error"]), self.interval)
        try:
            rows = rates(self.last, snapshot)
            drawn = frame(snapshot, rows, self.recent())
        except (AttributeError, KeyError, TypeError, ValueError) as error:  # not our shape
            self.last = None
            why = f"the daemon's answer cannot be shown (another version?): {error!r}"
            return unreachable(self.path, why, self.interval)
        self.last = snapshot
        return drawn

    def recent(self) -> list[dict[str, Any]]:
        try:
            return [r for r in events(self.path, history=EVENTS_SHOWN) if r.get("kind")]
        except KnockgateError:  # a daemon without an event log, or gone just now
            return []


def run(path: str, interval: float, once: bool, console: Console | None = None) -> int:
    """Draw frames until Ctrl-C (status 0); ``once``: print one frame, its rates over
    ``interval``, and return (a daemon that is not there is then an error)."""
    console = console or Console(markup=False)  # no cell is markup
    top = Top(path, interval)
    try:
        if once:
            first = query(path)
            if "error" in first:
                raise KnockgateError(f"{path}: {first['error']}")
            time.sleep(interval)
            top.last = first
            console.print(top.refresh())
            return 0
        if not console.is_terminal:
            raise KnockgateError("top: standard output is not a terminal (use --once)")
        with Live(console=console, screen=True, refresh_per_second=4) as live:
            while True:
                live.update(top.refresh())
                time.sleep(interval)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `knockgate top --once | head`
        return 0
