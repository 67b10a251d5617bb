"""Collects configuration errors and warnings, each located by file, line and key."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from appliance.config.values import Invalid
from appliance.errors import ConfigError

T = TypeVar("T")


class Problems:
    """Every problem found in one file: errors stop the load, warnings do not."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, line: int, key: str, message: str) -> None:
        self.errors.append(f"{self.file}:{line}: {key}: {message}")

    def warn(self, line: int, key: str, message: str, file: str | None = None) -> None:
        self.warnings.append(f"{file or self.file}:{line}: {key}: warning: {message}")

    def parse(self, line: int, key: str, parser: Callable[[], T]) -> T | None:
        """Run ``parser``; on :class:`Invalid` record an error and return ``None``."""
        try:
            return parser()
        except Invalid as problem:
            self.error(line, key, str(problem))
            return None

    def raise_if_any(self) -> None:
        if self.errors:
            raise ConfigError(self.errors)
