"""What must outlive a restart: the SPA replay cache and the used TOTP time steps.

One append-only text file, ``STATE_DIR/replay``, a line per entry::

    spa HEXDIGEST UNTIL
    totp DOOR STEP UNTIL

``UNTIL`` is the unix time after which the entry no longer matters (the packet or
the time step is then refused as too old anyway). Each entry is flushed and
fsync'd before the grant it belongs to is carried out, so a crash right after an
accepted packet cannot make that packet acceptable again. On start the file is
read, expired entries dropped, and the rest written back (atomically, by rename);
the daemon does the same every :data:`COMPACT_EVERY` entries, from its own memory.

A state directory that cannot be written is logged, not fatal: the engine keeps
the same cache in memory, so replays stay refused until the daemon restarts.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import NamedTuple, TextIO

log = logging.getLogger("knockgate.state")

FILE_NAME = "replay"
COMPACT_EVERY = 1000  # appended entries between two rewrites of the file


class Saved(NamedTuple):
    spa_seen: list[tuple[bytes, float]]
    totp_used: list[tuple[str, int, float]]


class StateStore:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, FILE_NAME)
        self._file: TextIO | None = None
        self._failed = False
        self.appended = 0  # entries written since the file was last rewritten

    def load(self, now: float) -> Saved:
        """Read the saved entries still in force at ``now`` and compact the file."""
        saved = Saved([], [])
        try:
            with open(self.path, encoding="ascii", errors="replace") as handle:
                lines = handle.read().splitlines()
        except FileNotFoundError:
            return saved  # nothing saved yet; the directory is made on the first entry
        except OSError as error:
            self._fail(error)
            return saved
        for number, line in enumerate(lines, 1):
            entry = _parse(line)
            if entry is None:
                log.warning("%s:%d: unreadable entry ignored", self.path, number)
            elif entry[-1] > now:
                if isinstance(entry[0], bytes):
                    saved.spa_seen.append((entry[0], entry[1]))
                else:
                    door, step, until = entry
                    saved.totp_used.append((door, step, until))
        self._rewrite(saved)
        return saved

    def compact(self, saved: Saved, now: float) -> None:
        """Rewrite the file with the entries of ``saved`` still in force at ``now``."""
        live = Saved(
            [(digest, until) for digest, until in saved.spa_seen if until > now],
            [(door, step, until) for door, step, until in saved.totp_used if until > now],
        )
        self._rewrite(live)

    def spa_seen(self, digest: bytes, until: float) -> None:
        self._append(f"spa {digest.hex()} {until:.3f}\n")

    def totp_used(self, door: str, step: int, until: float) -> None:
        self._append(f"totp {door} {step} {until:.3f}\n")

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    # ----------------------------------------------------------------- internals

    def _rewrite(self, saved: Saved) -> None:
        self.close()
        self.appended = 0
        lines = [f"spa {digest.hex()} {until:.3f}\n" for digest, until in saved.spa_seen]
        lines += [f"totp {door} {step} {until:.3f}\n" for door, step, until in saved.totp_used]
        temporary = self.path + ".new"
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            with open(temporary, "w", encoding="ascii") as handle:
                handle.writelines(lines)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
            _sync_directory(self.directory)  # the rename itself must survive a power loss
        except OSError as error:
            self._fail(error)

    def _append(self, line: str) -> None:
        try:
            if self._file is None:
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
                created = not os.path.exists(self.path)
                self._file = open(self.path, "a", encoding="ascii")  # noqa: SIM115
                if created:
                    _sync_directory(self.directory)
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            self.appended += 1
        except OSError as error:
            self.close()
            self._fail(error)
        else:
            if self._failed:
                log.warning("state: writing %s again", self.path)
                self._failed = False

    def _fail(self, error: OSError) -> None:
        if not self._failed:
            log.error(
                "state: cannot write %s (%s): replays stay refused only until a restart",
                self.path,
                error,
            )
        self._failed = True


def _sync_directory(directory: str) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _parse(line: str) -> tuple[bytes, float] | tuple[str, int, float] | None:
    words = line.split()
    try:
        if len(words) == 3 and words[0] == "spa":
            return bytes.fromhex(words[1]), float(words[2])
        if len(words) == 4 and words[0] == "totp":
            return words[1], int(words[2]), float(words[3])
    except ValueError:
        return None
    return None
