"""Log output: knockd-style text lines or JSON lines, to a file, syslog or stdout."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from appliance.config.schema import LogSettings
from appliance.core.events import (
    Refused,
    SequenceReset,
    SequenceTimeout,
    SpaRefused,
    StageReached,
)
from appliance.logformat import Line, describe, record

log = logging.getLogger("knockgate")
events_log = logging.getLogger("knockgate.events")


class TextFormatter(logging.Formatter):
    """``[2026-11-25 10:00:01] message``: knockd's layout, to the second."""

    def format(self, entry: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.created))
        line = f"[{stamp}] {entry.getMessage()}"
        if entry.exc_info:  # a bug's traceback (logged once per handler), indented under it
            trace = self.formatException(entry.exc_info)
            line += "\n" + "\n".join("    " + row for row in trace.splitlines())
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message and the event's fields."""

    def format(self, entry: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": round(entry.created, 3),
            "level": entry.levelname.lower(),
            "message": entry.getMessage(),
        }
        fields = getattr(entry, "fields", None)
        if isinstance(fields, dict):
            data.update(fields)
        if entry.exc_info:
            data["traceback"] = self.formatException(entry.exc_info)
        return json.dumps(data)


def configure(settings: LogSettings, *, stream: Any = None) -> None:
    """Replace knockgate's handlers according to ``settings``."""
    root = logging.getLogger("knockgate")
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(settings.level.upper())
    root.propagate = False
    formatter: logging.Formatter = JsonFormatter() if settings.format == "json" else TextFormatter()
    handlers: list[logging.Handler] = []
    if settings.file:
        handlers.append(logging.FileHandler(settings.file))
    if settings.syslog and os.path.exists("/dev/log"):
        syslog = logging.handlers.SysLogHandler(address="/dev/log")
        syslog.ident = "knockgate: "
        handlers.append(syslog)
    if not handlers:
        handlers.append(logging.StreamHandler(stream or sys.stdout))
    for handler in handlers:
        if not isinstance(handler, logging.handlers.SysLogHandler):
            handler.setFormatter(formatter)
        root.addHandler(handler)


# Lines about attempts (stages, resets, timeouts) and refused SPA packets: at most
# NOISE_BUDGET of them per NOISE_WINDOW seconds reach the log; the rest are counted and
# summarised in one line, so a flood from a few sources cannot flood the log. Decisions
# (opened, granted, closed, commands) are never held back.
NOISY = (StageReached, SequenceReset, SequenceTimeout, SpaRefused)
NOISE_BUDGET = 600
NOISE_WINDOW = 60.0


class NoiseBudget:
    """How many noisy lines may still be written in the current window."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.window_start = clock()
        self.written = 0
        self.held_back = 0

    def allow(self) -> bool:
        if self.written < NOISE_BUDGET:
            self.written += 1
            return True
        self.held_back += 1
        return False

    def flush(self) -> None:
        """At the end of a window: one summary line if anything was held back."""
        now = self.clock()
        if now - self.window_start < NOISE_WINDOW:
            return
        if self.held_back:
            events_log.warning(
                "%d more lines about knock attempts and refused SPA packets in the last "
                "%.0f s were not written (%d a minute at most)",
                self.held_back,
                now - self.window_start,
                NOISE_BUDGET,
            )
        self.window_start, self.written, self.held_back = now, 0, 0


noise = NoiseBudget()


def flush_noise() -> None:
    noise.flush()


def log_command(command: Line, wall_offset: float = 0.0) -> None:
    """Log an engine command (stages, OPEN SESAME, timeouts, ...) as one line.

    A lone first knock (stage 1) and a reset at stage 1 are logged at debug level:
    alone they are noise, and a flood of spoofed first knocks must not become a
    flood of log lines. Every later stage, and every decision, is logged at info
    level, as knockd does; lines about attempts are held to a budget per minute.
    """
    level = logging.WARNING if isinstance(command, Refused) else logging.INFO
    if isinstance(command, NOISY):
        if isinstance(command, StageReached | SequenceReset) and command.stage == 1:
            level = logging.DEBUG
        if not events_log.isEnabledFor(level) or not noise.allow():
            return
    elif not events_log.isEnabledFor(level):
        return
    line = describe(command, wall_offset)
    if line is not None:
        events_log.log(level, line, extra={"fields": record(command, wall_offset)})
