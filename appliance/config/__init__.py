"""Configuration: native YAML or knockd.conf, validated once into frozen model objects.

``load_config(path)`` detects the format, reports every problem as
``FILE:LINE: key.path: what is wrong (what was expected)`` in a :class:`ConfigError`,
and returns the :class:`~appliance.core.model.Config` with the warnings about weak
choices (short or monotonic sequences, published example sequences).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from appliance.config.knockd_format import looks_like_knockd, parse_knockd
from appliance.config.problems import Problems
from appliance.config.yaml_format import parse_yaml
from appliance.core.model import Config
from appliance.errors import ConfigError


@dataclass(frozen=True)
class Loaded:
    config: Config
    warnings: tuple[str, ...]


def detect_format(path: str, text: str) -> str:
    """``knockd`` for knockd.conf, ``yaml`` for knockgate's own format."""
    extension = os.path.splitext(path)[1].lower()
    if extension in (".yaml", ".yml"):
        return "yaml"
    if extension == ".conf" or looks_like_knockd(text):
        return "knockd"
    return "yaml"


def load_config(path: str) -> Loaded:
    """Read, validate and return the configuration at ``path`` (raises ConfigError)."""
    try:
        with open(path, encoding="utf-8", errors="strict") as handle:
            text = handle.read()
    except OSError as error:
        raise ConfigError([f"{path}:0: (file): cannot read: {error.strerror}"]) from None
    except UnicodeDecodeError as error:
        line = text_line_of(path, error.start)
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
    return Loaded(config, tuple(problems.warnings))


def text_line_of(path: str, offset: int) -> int:
    with open(path, "rb") as handle:
        return handle.read(offset).count(b"\n") + 1
