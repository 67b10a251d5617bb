"""What must outlive a restart: the SPA replay cache and the used TOTP steps.

One text file, ``STATE_DIR/replay``: a header, a line per entry, each with a CRC-32
of the rest of its line, and, only after a clean shutdown, a trailer with the
number of entries::

    knockgate-state 1
    spa HEXDIGEST UNTIL CRC
    totp DOOR STEP UNTIL CRC
    end COUNT CRC

``UNTIL`` is the unix time after which the entry no longer matters (the packet or
the time step is then refused as too old anyway). Each entry is flushed and
fsync'd before the grant it belongs to is carried out; when that fails the
runtime refuses the grant (record first, then grant), so a packet or a step can
never become usable again after a restart because writing it down failed.

On start the file is read, expired entries dropped, and the rest written back
without the trailer (atomically, by rename); the daemon does the same every
:data:`COMPACT_EVERY` entries, from its own memory, and writes the trailer when
it stops. A file that cannot be trusted to hold every entry (unreadable, a
damaged line, no header, or no trailer: the last run did not stop cleanly, or the
file was cut short) is reported by :meth:`StateStore.load`: the engine then
refuses SPA packets made, and TOTP steps begun, before this start, which the lost
entries could be about (fail closed), and says so in the log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import zlib
from typing import NamedTuple, TextIO

from appliance.core.model import Step

log = logging.getLogger("knockgate.state")

FILE_NAME = "replay"
HEADER = "knockgate-state 1"
COMPACT_EVERY = 1000  # appended entries between two rewrites of the file
MAX_FILE_BYTES = 64 << 20  # far beyond any real cache; a bigger file is not ours


class Saved(NamedTuple):
    spa_seen: list[tuple[bytes, float]]
    totp_used: list[tuple[str, int, float]]


class Restored(NamedTuple):
    """What :meth:`StateStore.load` found: the entries, and why they may be incomplete
    (``None``: the file is whole)."""

    saved: Saved
    problem: str | None


class StateStore:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, FILE_NAME)
        self._file: TextIO | None = None
        self._failed = False
        self.appended = 0  # entries written since the file was last rewritten

    def load(self, now: float) -> Restored:
        """Read the saved entries still in force at ``now`` (wall clock), say whether the
        file held them all, and write it back compacted."""
        saved = Saved([], [])
        try:
            info = os.stat(self.path)
            if not stat.S_ISREG(info.st_mode):
                return Restored(saved, "cannot be read (not a regular file)")
            if info.st_size > MAX_FILE_BYTES:
                return Restored(saved, f"is {info.st_size} bytes, more than a state file can be")
            with open(self.path, encoding="ascii", errors="replace") as handle:
                text = handle.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return Restored(saved, None)  # a first start: the directory is made on first use
        except OSError as error:
            self._fail(error)
            return Restored(saved, f"cannot be read ({error.strerror or error})")
        problem = _read(text, now, saved)
        self._rewrite(saved)
        return Restored(saved, problem)

    def compact(self, saved: Saved, now: float) -> None:
        """Rewrite the file with the entries of ``saved`` still in force at ``now``."""
        self._rewrite(_live(saved, now))

    def finish(self, saved: Saved, now: float) -> None:
        """A clean stop: the entries in force and the trailer that proves the file whole
        (nothing at all when there is neither a file nor an entry: a config without SPA
        or TOTP doors leaves no state behind)."""
        live = _live(saved, now)
        if live.spa_seen or live.totp_used or os.path.exists(self.path):
            self._rewrite(live, trailer=True)

    def spa_seen(self, digest: bytes, until: float) -> bool:
        """Record an accepted SPA packet; False when it could not be written to disk."""
        return self._append(_line(f"spa {digest.hex()} {until:.3f}"))

    def totp_used(self, door: str, step: int, until: float) -> bool:
        """Record a used TOTP step; False when it could not be written to disk."""
        return self._append(_line(f"totp {door} {step} {until:.3f}"))

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    # ----------------------------------------------------------------- internals

    def _rewrite(self, saved: Saved, trailer: bool = False) -> None:
        self.close()
        self.appended = 0
        lines = [HEADER + "\n"]
        lines += [_line(f"spa {digest.hex()} {until:.3f}") for digest, until in saved.spa_seen]
        lines += [_line(f"totp {door} {step} {until:.3f}") for door, step, until in saved.totp_used]
        if trailer:
            lines.append(_line(f"end {len(lines) - 1}"))
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

    def _append(self, line: str) -> bool:
        try:
            if self._file is None:
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
                created = not os.path.exists(self.path)
                self._file = open(self.path, "a", encoding="ascii")  # noqa: SIM115
                if created:
                    self._file.write(HEADER + "\n")
                    _sync_directory(self.directory)
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            self.appended += 1
        except OSError as error:
            self.close()
            self._fail(error)
            return False
        if self._failed:
            log.warning("state: writing %s again", self.path)
            self._failed = False
        return True

    def _fail(self, error: OSError) -> None:
        if not self._failed:
            log.error(
                "state: cannot write %s (%s): SPA and TOTP knocks are refused until it can "
                "be written (what is not on disk could be replayed after a restart)",
                self.path,
                error.strerror or error,
            )
        self._failed = True


def _line(body: str) -> str:
    return f"{body} {zlib.crc32(body.encode()):08x}\n"


def _live(saved: Saved, now: float) -> Saved:
    return Saved(
        [(digest, until) for digest, until in saved.spa_seen if until > now],
        [(door, step, until) for door, step, until in saved.totp_used if until > now],
    )


def _read(text: str, now: float, saved: Saved) -> str | None:
    """Fill ``saved`` with the entries of ``text`` in force at ``now``; return what makes
    the file untrustworthy (``None``: nothing)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    elif lines:
        return f"ends in the middle of line {len(lines)} (cut short)"
    if not lines or lines[0] != HEADER:
        return "has no header (damaged, cut short, or written by an older knockgate)"
    problem: str | None = None
    entries = 0
    ended = False
    for number, line in enumerate(lines[1:], 2):
        entry = _parse(line)
        if ended or entry is None:
            problem = problem or f"line {number} is damaged"
        elif isinstance(entry, int):
            ended = True
            if entry != entries:
                problem = problem or f"holds {entries} entries where its trailer says {entry}"
        else:
            entries += 1
            if entry[-1] > now:
                if isinstance(entry[0], bytes):
                    saved.spa_seen.append((entry[0], entry[1]))
                else:
                    door, step, until = entry
                    saved.totp_used.append((door, step, until))
    if problem is None and not ended:
        problem = "was not closed by a clean stop (a crash, kill -9, or a cut)"
    return problem


def _parse(line: str) -> tuple[bytes, float] | tuple[str, int, float] | int | None:
    """An entry (``spa``: digest, until; ``totp``: door, step, until), the trailer's
    count, or ``None`` for a line that is not intact."""
    body, _, crc = line.rpartition(" ")
    if not body or len(crc) != 8 or crc != f"{zlib.crc32(body.encode()):08x}":
        return None
    words = body.split()
    try:
        if len(words) == 3 and words[0] == "spa":
            return bytes.fromhex(words[1]), float(words[2])
        if len(words) == 4 and words[0] == "totp":
            return words[1], int(words[2]), float(words[3])
        if len(words) == 2 and words[0] == "end":
            return int(words[1])
    except ValueError:
        return None
    return None


def _sync_directory(directory: str) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


LABELLED_FILE = "labelled-ports"  # the host ports of label-gated containers, as last set


def save_labelled(directory: str, steps: tuple[Step, ...]) -> None:
    """Remember the labelled containers' protected host ports (``PORT/PROTO`` a line,
    written by rename), for a next start that cannot list the containers."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, LABELLED_FILE)
    temporary = path + ".new"
    with open(temporary, "w", encoding="ascii") as out:
        out.writelines(f"{step}\n" for step in steps)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


def load_labelled(directory: str) -> tuple[Step, ...]:
    """The ports :func:`save_labelled` wrote (none when there is no file); a line that is
    not ``PORT/tcp`` or ``PORT/udp`` is skipped (what remains is still kept closed)."""
    try:
        with open(os.path.join(directory, LABELLED_FILE), encoding="ascii", errors="replace") as f:
            lines = f.read(1 << 20).splitlines()
    except FileNotFoundError:
        return ()
    steps: dict[Step, None] = {}
    for line in lines:
        port, _, proto = line.strip().partition("/")
        if port.isdigit() and 0 < int(port) < 65536 and proto in ("tcp", "udp"):
            steps[Step(int(port), "tcp" if proto == "tcp" else "udp")] = None
    return tuple(sorted(steps))
