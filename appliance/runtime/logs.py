"""Log output: knockd-style text lines or JSON lines, to a file, syslog or stdout."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time
from typing import Any

from appliance.core.events import Command, StageReached
from appliance.core.model import LogSettings
from appliance.logformat import describe, record

log = logging.getLogger("knockgate")
events_log = logging.getLogger("knockgate.events")


class TextFormatter(logging.Formatter):
    """``[2026-11-25 10:00:01] message``: knockd's layout, to the second."""

    def format(self, entry: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.created))
        return f"[{stamp}] {entry.getMessage()}"


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


def log_command(command: Command) -> None:
    """Log an engine command (stages, OPEN SESAME, timeouts, ...) as one line.

    A first knock (stage 1) is logged at debug level: alone it is noise, and a
    flood of spoofed first knocks must not become a flood of log lines. Every
    later stage, and every decision, is logged at info level, as knockd does.
    """
    level = (
        logging.DEBUG if isinstance(command, StageReached) and command.stage == 1 else logging.INFO
    )
    if not events_log.isEnabledFor(level):
        return
    line = describe(command)
    if line is not None:
        events_log.log(level, line, extra={"fields": record(command)})
