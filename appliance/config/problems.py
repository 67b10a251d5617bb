"""Collects configuration errors and warnings, each located by file, line and key.

At most :data:`MAX_SHOWN` errors and as many warnings are kept, then one line says
how many more there were: a file of a million bad lines costs a counter, not a
million messages (nor a million-line log entry on a refused reload).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, TypeVar

from appliance.config.values import Invalid
from appliance.errors import ConfigError

T = TypeVar("T")

MAX_SHOWN = 100


class Place(NamedTuple):
    """Where a file sets something: its line and its key as the file's messages name it
    (``log.file`` in YAML, ``options.logfile`` in knockd.conf)."""

    line: int
    key: str


class Problems:
    """Every problem found in one file: errors stop the load, warnings do not."""

    def __init__(self, file: str) -> None:
        self.file = file
        self._errors: list[str] = []
        self._warnings: list[str] = []
        self.error_count = 0  # every error, also those beyond MAX_SHOWN
        self.warning_count = 0
        self.places: dict[str, Place] = {}  # setting (log.file, pid_file, ...) -> where set

    def place(self, setting: str, line: int, key: str) -> None:
        """Note where ``setting`` is given, for the checks made after loading (preflight)."""
        self.places[setting] = Place(line, key)

    def error(self, line: int, key: str, message: str) -> None:
        self.error_count += 1
        if len(self._errors) < MAX_SHOWN:
            self._errors.append(f"{self.file}:{line}: {key}: {message}")

    def warn(self, line: int, key: str, message: str, file: str | None = None) -> None:
        self.warning_count += 1
        if len(self._warnings) < MAX_SHOWN:
            self._warnings.append(f"{file or self.file}:{line}: {key}: warning: {message}")

    @property
    def errors(self) -> list[str]:
        """The error lines, with a last one counting those not shown."""
        hidden = self.error_count - len(self._errors)
        more = [f"{self.file}:0: (file): {hidden} more problem(s) not shown"] if hidden else []
        return self._errors + more

    @property
    def warnings(self) -> list[str]:
        hidden = self.warning_count - len(self._warnings)
        more = [f"{self.file}:0: (file): warning: {hidden} more warning(s) not shown"]
        return self._warnings + (more if hidden else [])

    def parse(self, line: int, key: str, parser: Callable[[], T]) -> T | None:
        """Run ``parser``; on :class:`Invalid` record an error and return ``None``."""
        try:
            return parser()
        except Invalid as problem:
            self.error(line, key, str(problem))
            return None

    def raise_if_any(self) -> None:
        if self.error_count:
            raise ConfigError(self.errors)
