"""Configuration: native YAML or knockd.conf, validated once into frozen model objects.

``load_config(path)`` detects the format, reports every problem as
``FILE:LINE: key.path: what is wrong (what was expected)`` in a :class:`ConfigError`,
and returns the :class:`~appliance.core.model.Config` with the warnings about weak
choices (short or monotonic sequences, published example sequences, doors that
collide with the scan detector).

Whatever the bytes, ``load_config`` ends in a ``Loaded`` or a ``ConfigError``, in
bounded time and memory: files are read only when regular and small
(:mod:`appliance.config.files`), YAML is composed with limits on depth, size and
alias expansion and without explicit tags (:mod:`appliance.config.yaml_nodes`),
numbers are capped in digits, and an error echoes at most ~60 characters of what
the user wrote (:func:`appliance.config.values.shown`). What the configuration
needs from the machine it runs on (writable log, pid and state paths, a status
socket, a capture filter the kernel takes) is checked by
:func:`appliance.runtime.preflight.preflight`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from appliance.config.files import CONFIG_LIMIT, line_of_offset, read_bounded
from appliance.config.knockd_format import looks_like_knockd, parse_knockd
from appliance.config.managed_users import merge_users, read_users, users_file_for
from appliance.config.problems import Place, Problems
from appliance.config.schema import Config
from appliance.config.values import Invalid
from appliance.config.yaml_format import parse_yaml
from appliance.errors import ConfigError

__all__ = ["Loaded", "Place", "detect_format", "load_config"]


@dataclass(frozen=True)
class Loaded:
    config: Config
    warnings: tuple[str, ...]
    # Where the file sets what preflight checks: "log.file", "pid_file", "status_socket",
    # "state_dir", "doors" -> Place(line, key as the file's messages name it). A setting
    # left at its default has no entry.
    places: Mapping[str, Place] = field(default_factory=dict)


def detect_format(path: str, text: str) -> str:
    """``knockd`` for knockd.conf, ``yaml`` for knockgate's own format."""
    extension = os.path.splitext(path)[1].lower()
    if extension in (".yaml", ".yml"):
        return "yaml"
    if extension == ".conf" or looks_like_knockd(text):
        return "knockd"
    return "yaml"


def load_config(path: str, users_file: str | None = None) -> Loaded:
    """Read, validate and return the configuration at ``path`` (raises ConfigError).

    A YAML configuration gains the users of its managed file
    (:mod:`appliance.config.managed_users`): ``users_file`` when given (a candidate,
    reported under the real name), else ``knockgate-users.yaml`` next to ``path``."""
    try:
        data = read_bounded(path, CONFIG_LIMIT)
    except Invalid as problem:
        raise ConfigError([f"{path}:0: (file): {problem}"]) from None
    try:
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as error:
        line = line_of_offset(data, error.start)
        raise ConfigError(
            [f"{path}:{line}: (file): not UTF-8 text (expected a text file)"]
        ) from None
    problems = Problems(path)
    if detect_format(path, text) == "knockd":
        config = parse_knockd(text, path, problems)
    else:
        config = parse_yaml(text, path, problems)
    problems.raise_if_any()
    assert config is not None
    warnings = list(problems.warnings)
    if config.format == "yaml":
        config = _with_managed_users(config, path, users_file, warnings)
    return Loaded(config, tuple(warnings), dict(problems.places))


def _with_managed_users(
    config: Config, path: str, candidate: str | None, warnings: list[str]
) -> Config:
    real = users_file_for(path)
    users = read_users(candidate or real, shown_as=real)
    config = merge_users(config, users, real, warnings)
    for door in config.doors:
        if door.spa is not None and not door.spa.users:
            line = door.origin.line if door.origin is not None else 0
            warnings.append(
                f"{path}:{line}: doors.{door.name}.spa.users: warning: no user: the door opens "
                f"for nobody (expected users, or `knockgate user add NAME --door {door.name}`)"
            )
    return config
