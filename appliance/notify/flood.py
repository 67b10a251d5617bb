"""A flood becomes one summary a minute, never a notification per packet.

The event log already sums knock noise (first knocks that go nowhere, resets, time-outs)
into one ``knocks`` record per 10 s and budgets refusals (held off, SPA refused) at 100
per 10 s: still far too many for a phone. Per notifier, an :class:`Aggregator` lets a
few records that one address caused (:data:`PER_ADDRESS`: opens, closes, expiries,
failed grants, refusals) through one by one (:data:`SHOWN` a window, all kinds
together), holds the rest and the knock noise, and at the end of each
:data:`SUMMARY_SECONDS` window gives one ``knocks`` summary when something was held back
or the noise reached a flood (``threshold`` knocks, :data:`FLOOD_KNOCKS` by default):
"12 000 first knocks, 40 resets in the last minute; 95 more refusals not sent one by one
(80 held-off, 15 refused)". A stray knock or background scanning below the threshold
gives nothing (the mail digest still counts it). Records no address causes (services,
reloads, repairs) pass at once. Pure: the caller passes the time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.runtime.events_log import SUMMARY_SECONDS as LOG_WINDOW
from appliance.runtime.events_log import EventRecord

SUMMARY_SECONDS = 60.0
SHOWN = 5  # records of PER_ADDRESS kinds sent one by one per window; the rest summed up
FLOOD_KNOCKS = 100  # knock noise in a window that is a flood worth a summary on its own
REFUSALS = ("held-off", "refused")
PER_ADDRESS = ("opened", "closed", "expired", "grant-failed", *REFUSALS)
WORDS = {
    "first_knock": "first knocks",
    "stage": "later steps",
    "reset": "resets",
    "timed_out": "timed out",
}


def number(n: int) -> str:
    """``12 000``: a thin-spaced thousands separator reads well in any locale."""
    return f"{n:,}".replace(",", " ")


@dataclass
class _Window:
    start: float  # monotonic
    since: float  # what it sums up began then (a knocks record covers the 10 s before it)
    shown: int = 0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # door -> outcome -> n
    held: dict[str, int] = field(default_factory=dict)  # kind -> n not shown
    held_by_log: int = 0  # refusals the event log itself only counted

    def worth_a_summary(self, threshold: int) -> bool:
        """Something was held back, or the noise is a flood."""
        if self.held or self.held_by_log:
            return True
        noise = sum(n for by in self.counts.values() for n in by.values())
        return noise >= threshold


class Aggregator:
    def __init__(self, shown: int = SHOWN, threshold: int = FLOOD_KNOCKS) -> None:
        self.shown = shown
        self.threshold = threshold
        self._window: _Window | None = None

    def offer(self, record: EventRecord, now: float) -> list[EventRecord]:
        """What to send now for ``record`` (it, or nothing while it is held)."""
        if record.kind == "knocks":
            window = self._open(now, LOG_WINDOW)
            for door, by in (record.counts or {}).items():
                mine = window.counts.setdefault(door, {})
                for outcome, n in by.items():
                    mine[outcome] = mine.get(outcome, 0) + n
            window.held_by_log += record.held_back
            return []
        if record.kind in PER_ADDRESS:
            window = self._open(now)
            if window.shown < self.shown:
                window.shown += 1
                return [record]
            window.held[record.kind] = window.held.get(record.kind, 0) + 1
            return []
        return [record]

    def _open(self, now: float, before: float = 0.0) -> _Window:
        if self._window is None:
            self._window = _Window(now, now - before)
        return self._window

    def due(self, now: float, wall: float) -> list[EventRecord]:
        """The summary of a window that has ended (nothing when nothing was held)."""
        window = self._window
        if window is None or now < window.start + SUMMARY_SECONDS:
            return []
        return self.flush(now, wall)

    def flush(self, now: float, wall: float) -> list[EventRecord]:
        """The summary of the current window, ended now (at shutdown: what was held);
        nothing when nothing was held and the noise stayed under the threshold."""
        window, self._window = self._window, None
        if window is None or not window.worth_a_summary(self.threshold):
            return []
        seconds = now - window.since
        return [summary(window.counts, window.held, window.held_by_log, seconds, wall)]


def summary(
    counts: dict[str, dict[str, int]],
    held: dict[str, int],
    held_by_log: int,
    seconds: float,
    wall: float,
) -> EventRecord:
    totals: dict[str, int] = {}
    for by in counts.values():
        for outcome, n in by.items():
            totals[outcome] = totals.get(outcome, 0) + n
    parts = [
        f"{number(totals[outcome])} {words}"
        for outcome, words in WORDS.items()
        if outcome in totals
    ]
    span = "the last minute" if 55 <= seconds <= 75 else f"the last {seconds:.0f} s"
    detail = (", ".join(parts) or "no knock noise") + f" in {span}"
    refused = sum(held.values()) + held_by_log
    if refused:
        kinds = ", ".join(f"{number(n)} {kind}" for kind, n in sorted(held.items()))
        what = "refusals" if all(kind in REFUSALS for kind in held) else "events"
        detail += f"; {number(refused)} more {what} not sent one by one"
        if kinds:
            detail += f" ({kinds}{', ' if held_by_log else ''}"
            detail += f"{number(held_by_log)} only counted)" if held_by_log else ")"
    return EventRecord(wall, "knocks", detail=detail, counts=counts or None)
