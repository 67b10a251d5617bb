"""Writes a Config as knockgate YAML (``knockgate import-knockd``).

The output reads back (``parse_yaml``) into a Config with the same doors, so the
converted file behaves the same in ``simulate`` and in the daemon.
"""

from __future__ import annotations

from typing import Any

import yaml

from appliance.config.schema import Config
from appliance.core.model import (
    DEFAULT_CMD_TIMEOUT,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_SEQ_TIMEOUT,
    Door,
    Step,
)


class _Flow(list[str]):
    """A list written in flow style: ``[7000/tcp, 8000/udp]``."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(
    _Flow, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, True)
)


def _steps(steps: tuple[Step, ...]) -> _Flow:
    return _Flow(str(step) for step in steps)


def _number(value: float) -> int | float:
    return int(value) if value == int(value) else value


def door_to_data(door: Door) -> dict[str, Any]:
    knock: dict[str, Any] = {}
    if door.knock.one_time is not None:
        knock["one_time_sequences"] = door.knock.one_time.path
    else:
        knock["sequence"] = _steps(door.knock.sequence)
    if door.knock.seq_timeout != DEFAULT_SEQ_TIMEOUT:
        knock["seq_timeout"] = _number(door.knock.seq_timeout)
    if not door.knock.tcpflags.empty:
        knock["tcpflags"] = str(door.knock.tcpflags)
    if door.knock.target is not None:
        knock["target"] = door.knock.target
    if door.knock.duplicates != "ignore":
        knock["duplicates"] = door.knock.duplicates
    data: dict[str, Any] = {"knock": knock}
    if door.open is not None:
        data["open"] = {"ports": _steps(door.open.ports), "duration": _number(door.open.duration)}
        if not door.open.ports:  # a door for labelled containers only
            del data["open"]["ports"]
    if door.close:
        data["close"] = _Flow(door.close)
    commands = door.commands
    for key, value in (
        ("start_command", commands.start),
        ("start_command_6", commands.start6),
        ("stop_command", commands.stop),
        ("stop_command_6", commands.stop6),
    ):
        if value is not None:
            data[key] = value
    if commands.cmd_timeout != DEFAULT_CMD_TIMEOUT and (commands.stop or commands.stop6):
        data["cmd_timeout"] = _number(commands.cmd_timeout)
    return data


def config_to_data(config: Config) -> dict[str, Any]:
    settings = config.settings
    data: dict[str, Any] = {}
    if settings.interfaces:
        data["interfaces"] = _Flow(settings.interfaces)
    log: dict[str, Any] = {}
    if settings.log.file is not None:
        log["file"] = settings.log.file
    if settings.log.syslog:
        log["syslog"] = True
    if settings.log.format != "text":
        log["format"] = settings.log.format
    if settings.log.level != "info":
        log["level"] = settings.log.level
    if log:
        data["log"] = log
    if settings.pid_file is not None:
        data["pid_file"] = settings.pid_file
    if settings.max_attempts != DEFAULT_MAX_ATTEMPTS:
        data["max_attempts"] = settings.max_attempts
    data["doors"] = {door.name: door_to_data(door) for door in config.doors}
    return data


def to_yaml(config: Config, warnings: tuple[str, ...] = ()) -> str:
    header = [f"# knockgate configuration converted from {config.path} (knockd.conf)."]
    if warnings:
        header.append("# Warnings about the original:")
        header.extend(f"#   {warning}" for warning in warnings)
    body = yaml.dump(
        config_to_data(config), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100
    )
    return "\n".join(header) + "\n" + body
