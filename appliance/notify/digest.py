"""The mail digest: what happened since the last one, summed up in a short text.

Opens by door (with how many addresses), closes and expiries, failures (grants the
firewall refused, services that failed, reloads refused), refusals, scanners held off,
service starts, firewall repairs and reloads, and the knock noise totals. Failures are
also listed one by one (the first :data:`LISTED`). A period with nothing to report gives
a one-line "quiet" digest unless the notifier says ``quiet: skip``: its arrival is the
proof that the daemon and the mail path work. Pure: records in, text out; memory is
bounded (counters, at most :data:`ADDRESSES` addresses remembered per door).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from appliance.notify.flood import WORDS, number
from appliance.runtime.events_log import EventRecord

LISTED = 20  # failures listed line by line
ADDRESSES = 1000  # distinct addresses remembered per door (then "1000+")
FAILURES = ("grant-failed", "service-failed", "reload-refused")


@dataclass
class Digest:
    since: float  # unix time
    opens: dict[str, int] = field(default_factory=dict)
    openers: dict[str, set[str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # by kind
    starts: dict[str, int] = field(default_factory=dict)  # by service
    noise: dict[str, int] = field(default_factory=dict)  # knock outcome -> n
    held_addresses: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)

    def add(self, record: EventRecord) -> None:
        kind = record.kind
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if kind == "opened":
            self.opens[record.door] = self.opens.get(record.door, 0) + 1
            seen = self.openers.setdefault(record.door, set())
            if len(seen) < ADDRESSES:
                seen.add(record.address)
        elif kind == "held-off" and len(self.held_addresses) < ADDRESSES:
            self.held_addresses.add(record.address)
        elif kind == "service-started":
            self.starts[record.service] = self.starts.get(record.service, 0) + 1
        elif kind == "knocks":
            for by in (record.counts or {}).values():
                for outcome, n in by.items():
                    if outcome in WORDS:
                        self.noise[outcome] = self.noise.get(outcome, 0) + n
        if kind in FAILURES and len(self.failures) < LISTED:
            self.failures.append(record.text())

    def quiet(self) -> bool:
        reported = ("opened", "held-off", "refused", "service-started", "repair", *FAILURES)
        return not self.noise and not any(self.counts.get(kind) for kind in reported)

    def render(self, host: str, until: float) -> tuple[str, str]:
        """(subject line's tail, body)."""
        c = self.counts.get
        span = f"{_stamp(self.since)} to {_stamp(until)}"
        if self.quiet():
            return "quiet", f"knockgate on {host}, {span}: quiet, nothing to report.\n"
        failures = sum(c(kind, 0) for kind in FAILURES)
        opens = sum(self.opens.values())
        lines = [f"knockgate on {host}, {span}", ""]
        by_door = ", ".join(
            f"{door}: {number(n)} from {_addresses(self.openers.get(door, set()))}"
            for door, n in sorted(self.opens.items())
        )
        lines.append(f"Opens: {number(opens)}" + (f" ({by_door})" if by_door else ""))
        if c("closed") or c("expired"):
            lines.append(f"Closed: {number(c('closed', 0))}; expired: {number(c('expired', 0))}")
        lines.append(
            f"Failures: {number(failures)} ({number(c('grant-failed', 0))} grants failed, "
            f"{number(c('service-failed', 0))} services failed, "
            f"{number(c('reload-refused', 0))} reloads refused)"
        )
        lines.append(f"Refused: {number(c('refused', 0))}")
        lines.append(
            f"Scanners held off: {number(c('held-off', 0))}"
            + (f" (from {_addresses(self.held_addresses)})" if self.held_addresses else "")
        )
        if self.starts:
            starts = ", ".join(f"{name}: {number(n)}" for name, n in sorted(self.starts.items()))
            lines.append(f"Service starts: {starts}")
        if c("repair") or c("reload"):
            lines.append(
                f"Firewall repairs: {number(c('repair', 0))}; reloads: {number(c('reload', 0))}"
            )
        noise = ", ".join(
            f"{number(self.noise[outcome])} {words}"
            for outcome, words in WORDS.items()
            if outcome in self.noise
        )
        lines.append(f"Knock noise: {noise or 'none'}")
        if self.failures:
            lines += ["", "Failures:"] + [f"  {line}" for line in self.failures]
            if failures > len(self.failures):
                lines.append(f"  ... and {number(failures - len(self.failures))} more")
        subject = f"{number(opens)} opens, {number(failures)} failures"
        if c("held-off"):
            subject += f", {number(c('held-off', 0))} held off"
        return subject, "\n".join(lines) + "\n"


def _addresses(seen: set[str]) -> str:
    n = len(seen)
    more = "+" if n >= ADDRESSES else ""
    return f"{number(n)}{more} address" + ("" if n == 1 and not more else "es")


def _stamp(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(when))


def next_digest(now: float, every: float | None, at: tuple[int, int]) -> float:
    """When the next digest is due (unix time): ``every`` seconds after ``now``, or the
    next ``at`` (local HH:MM) after it."""
    if every is not None:
        return now + every
    local = time.localtime(now)
    hour, minute = at
    for days in range(3):  # today, or tomorrow (a DST change may skip an hour)
        candidate = time.mktime(
            (local.tm_year, local.tm_mon, local.tm_mday + days, hour, minute, 0, 0, 0, -1)
        )
        if candidate > now:
            return candidate
    return now + 86400.0
