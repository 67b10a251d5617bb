"""Reads knockd.conf (knockd 0.8) into the model.

Format: ``[section]`` headers, ``key = value`` lines, ``#`` comment lines. Keys are
case-insensitive; ``[options]`` holds the global settings, every other section is
a door. Differences from knockd, each deliberate:

* garbage is an error, not a number (knockd reads port ``abc`` as 0, ``2x`` as 2);
* a directive given twice is an error (knockd keeps the last), except TCPFlags,
  whose lines accumulate as in knockd;
* an unknown directive or a door without a sequence is an error;
* ``Seq_Timeout`` and ``Cmd_Timeout`` accept fractions of a second, not a negative
  number (knockd takes ``-1``, which then acts as 0); ``Seq_Timeout = 0`` works as in
  knockd (only a one-step sequence can complete), with a warning for a longer one;
* ``UseSyslog`` may be bare (knockd) or ``= yes``/``= no``;
* a relative ``One_Time_Sequences`` path is taken relative to the config file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from appliance.config.lint import lint_seq_timeout, lint_sequence
from appliance.config.onetime import read_one_time_file
from appliance.config.problems import Problems
from appliance.config.schema import Config, LogSettings, Settings
from appliance.config.values import (
    Invalid,
    parse_address,
    parse_bool,
    parse_door_name,
    parse_interface,
    parse_seconds,
    parse_sequence,
    parse_tcpflags,
    shown,
)
from appliance.core.model import (
    DEFAULT_CMD_TIMEOUT,
    DEFAULT_SEQ_TIMEOUT,
    Commands,
    Door,
    Knock,
    OneTimeFile,
    Origin,
    Step,
    TcpFlags,
)

OPTION_KEYS = {
    "usesyslog": "UseSyslog",
    "logfile": "LogFile",
    "pidfile": "PidFile",
    "interface": "Interface",
}

# knockd directive (lower case) -> canonical name; aliases share a canonical name.
DOOR_KEYS = {
    "sequence": "Sequence",
    "one_time_sequences": "One_Time_Sequences",
    "seq_timeout": "Seq_Timeout",
    "timeout": "Seq_Timeout",
    "start_command": "Start_Command",
    "command": "Start_Command",
    "start_command_6": "Start_Command_6",
    "command_6": "Start_Command_6",
    "stop_command": "Stop_Command",
    "stop_command_6": "Stop_Command_6",
    "cmd_timeout": "Cmd_Timeout",
    "tcpflags": "TCPFlags",
    "target": "Target",
}

SECONDS_LIMIT = 86_400.0
_NAMES = {
    options: ", ".join(sorted(set(keys.values())))
    for options, keys in ((True, OPTION_KEYS), (False, DOOR_KEYS))
}


@dataclass
class _Section:
    name: str
    line: int
    values: dict[str, tuple[str, int]] = field(default_factory=dict)  # canonical -> (value, line)
    flags: list[tuple[str, int]] = field(default_factory=list)


def looks_like_knockd(text: str) -> bool:
    """True when the text has a ``[section]`` header line (YAML never does)."""
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return stripped.startswith("[") and stripped.endswith("]")
    return False


def parse_knockd(text: str, path: str, problems: Problems) -> Config | None:
    sections = _split_sections(text, problems)
    settings = Settings()
    doors: list[Door] = []
    for section in sections:
        if section.name.lower() == "options":
            settings = _options(section, problems)
        else:
            door = _door(section, path, problems)
            if door is not None:
                doors.append(door)
    if not doors and not problems.error_count:
        problems.error(1, "doors", "no door is defined (expected at least one [door] section)")
    if problems.error_count:
        return None
    return Config(path, "knockd", settings, tuple(doors))


def _split_sections(text: str, problems: Problems) -> list[_Section]:
    sections: list[_Section] = []
    seen: dict[str, int] = {}
    current: _Section | None = None
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            name = line[1:-1].strip() if line.endswith("]") else ""
            if not name:
                problems.error(
                    number, "section", f"{shown(line)} is not a section header (expected [name])"
                )
                current = None
                continue
            if name.lower() in seen:
                first = seen[name.lower()]
                problems.error(
                    number,
                    shown(name, text=True),
                    f"section given twice (first on line {first}; expected unique names)",
                )
                current = _Section(name, number)  # still checked, never used
                continue
            seen[name.lower()] = number
            current = _Section(name, number)
            sections.append(current)
            continue
        key, has_value, value = line.partition("=")
        key = key.strip().lower()
        value = value.strip()
        if current is None:
            problems.error(
                number,
                shown(key, text=True) or "line",
                "directive outside a section (expected a [section] first)",
            )
            continue
        is_options = current.name.lower() == "options"
        known = OPTION_KEYS if is_options else DOOR_KEYS
        canonical = known.get(key)
        where = f"{shown(current.name, text=True)}.{shown(key, text=True)}"
        if canonical is None:
            problems.error(
                number,
                where,
                f"unknown directive (expected one of {_NAMES[is_options]})",
            )
            continue
        if not has_value and canonical != "UseSyslog":
            problems.error(number, where, f"{canonical} needs a value (expected {canonical} = ...)")
            continue
        if canonical == "TCPFlags":
            current.flags.append((value, number))
            continue
        if canonical in current.values:
            first = current.values[canonical][1]
            problems.error(
                number, where, f"{canonical} given twice (first on line {first}; expected once)"
            )
            continue
        current.values[canonical] = (value if has_value else "yes", number)
    return sections


def _options(section: _Section, problems: Problems) -> Settings:
    values = section.values
    for canonical, setting in (("LogFile", "log.file"), ("PidFile", "pid_file")):
        if canonical in values:
            problems.place(setting, values[canonical][1], f"options.{canonical.lower()}")
    syslog = False
    if "UseSyslog" in values:
        text, line = values["UseSyslog"]
        syslog = problems.parse(line, "options.usesyslog", lambda: parse_bool(text)) or False
    interfaces: tuple[str, ...] = ()
    if "Interface" in values:
        text, line = values["Interface"]
        name = problems.parse(line, "options.interface", lambda: parse_interface(text))
        interfaces = (name,) if name else ()
    log_file = values["LogFile"][0] if "LogFile" in values else None
    pid_file = values["PidFile"][0] if "PidFile" in values else None
    return Settings(
        interfaces=interfaces, log=LogSettings(file=log_file, syslog=syslog), pid_file=pid_file
    )


def _door(section: _Section, path: str, problems: Problems) -> Door | None:
    name = section.name
    values = section.values
    errors_before = problems.error_count
    shown_name = shown(name, text=True)
    problems.parse(section.line, shown_name, lambda: parse_door_name(name))
    if "doors" not in problems.places:
        problems.place("doors", section.line, "doors")

    def get(key: str) -> tuple[str, int] | None:
        return values.get(key)

    def key_path(canonical: str) -> str:
        return f"{shown_name}.{canonical.lower()}"

    sequence: tuple[Step, ...] | None = None
    one_time: OneTimeFile | None = None
    if (entry := get("One_Time_Sequences")) is not None:
        text, line = entry
        file = text if os.path.isabs(text) else os.path.join(os.path.dirname(path) or ".", text)
        one_time = read_one_time_file(file, problems, key_path("One_Time_Sequences"), line)
        if (seq := get("Sequence")) is not None:
            problems.warn(
                seq[1],
                key_path("Sequence"),
                "ignored: One_Time_Sequences replaces it (as in knockd)",
            )
    elif (entry := get("Sequence")) is not None:
        text, line = entry
        sequence = problems.parse(line, key_path("Sequence"), lambda: parse_sequence(text))
        if sequence is not None:
            lint_sequence(sequence, problems, line, key_path("Sequence"))
    else:
        problems.error(
            section.line,
            shown_name,
            "door has no sequence (expected Sequence or One_Time_Sequences)",
        )

    def seconds(canonical: str, default: float, minimum: float, what: str) -> float:
        entry = get(canonical)
        if entry is None:
            return default
        text, line = entry
        parsed = problems.parse(
            line,
            key_path(canonical),
            lambda: parse_seconds(text, minimum=minimum, maximum=SECONDS_LIMIT, what=what),
        )
        return default if parsed is None else parsed

    seq_timeout = seconds("Seq_Timeout", DEFAULT_SEQ_TIMEOUT, 0.0, "seconds, 0 or more")
    if (entry := get("Seq_Timeout")) is not None:
        key = key_path("Seq_Timeout")
        lint_seq_timeout(seq_timeout, sequence, one_time, problems, entry[1], key)
    cmd_timeout = seconds("Cmd_Timeout", DEFAULT_CMD_TIMEOUT, 0.0, "seconds, 0 or more")
    flags = TcpFlags()
    for text, line in section.flags:
        try:
            flags = parse_tcpflags(text.split(","), flags)
        except Invalid as problem:
            problems.error(line, key_path("TCPFlags"), str(problem))
    target = None
    if (entry := get("Target")) is not None:
        text, line = entry
        target = problems.parse(line, key_path("Target"), lambda: parse_address(text))

    def command(canonical: str) -> str | None:
        entry = get(canonical)
        return None if entry is None else entry[0]

    commands = Commands(
        start=command("Start_Command"),
        start6=command("Start_Command_6"),
        stop=command("Stop_Command"),
        stop6=command("Stop_Command_6"),
        cmd_timeout=cmd_timeout,
    )
    if not (commands.start or commands.start6):
        problems.warn(
            section.line, shown_name, "door has no command: a completed knock is only logged"
        )
    if problems.error_count != errors_before:
        return None
    if one_time is not None:
        sequence = ()
    assert sequence is not None
    knock = Knock(
        sequence=sequence, seq_timeout=seq_timeout, tcpflags=flags, target=target, one_time=one_time
    )
    return Door(name=name, knock=knock, commands=commands, origin=Origin(path, section.line))
