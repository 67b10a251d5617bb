"""knockd's one-time-sequences file: one sequence per line, used lines start with ``#``.

The active sequence is the first valid uncommented line. Marking a line used
overwrites its first byte with ``#`` (what knockd does), so the file stays
usable by knockd and by ``knockgate knock --one-time``. Lines that do not parse
are skipped with a warning and never become usable.
"""

from __future__ import annotations

import os
from typing import overload

from appliance.config.files import ONE_TIME_LIMIT, read_bounded
from appliance.config.problems import Problems
from appliance.config.values import PATH_SHOWN, Invalid, parse_sequence, shown
from appliance.core.model import OneTimeFile, OneTimeSequence

MAX_LINES = 10_000  # unused lines read from one file (the capture filter holds far fewer)


def read_one_time_file(path: str, problems: Problems, key: str, line: int) -> OneTimeFile | None:
    """Read the usable sequences of ``path``; problems are reported against ``key``."""
    try:
        data = read_bounded(path, ONE_TIME_LIMIT)
    except Invalid as problem:
        problems.error(line, key, str(problem))
        return None
    name = shown(path, text=True, limit=PATH_SHOWN)
    sequences = parse_one_time_lines(data, path, problems, most=MAX_LINES)
    if sequences is None:
        problems.error(
            line,
            key,
            f"{name} has more than {MAX_LINES} unused lines (expected at most {MAX_LINES}: "
            "start a new file)",
        )
        return None
    if not sequences:
        problems.warn(line, key, f"{name} has no unused sequence: the door stays disabled")
    return OneTimeFile(os.path.abspath(path), tuple(sequences))


@overload
def parse_one_time_lines(
    data: bytes, path: str, problems: Problems | None
) -> list[OneTimeSequence]: ...


@overload
def parse_one_time_lines(
    data: bytes, path: str, problems: Problems | None, *, most: int
) -> list[OneTimeSequence] | None: ...


def parse_one_time_lines(
    data: bytes, path: str, problems: Problems | None, *, most: int | None = None
) -> list[OneTimeSequence] | None:
    """The usable sequences, in file order; ``None`` when there are more than ``most``
    unused (uncommented, non-empty) lines, good or bad."""
    sequences: list[OneTimeSequence] = []
    looked_at = 0
    start, number, size = 0, 0, len(data)
    while start <= size:
        end = data.find(b"\n", start)
        end = size if end < 0 else end
        raw, offset, start = data[start:end], start, end + 1
        number += 1
        stripped = raw.decode("utf-8", "replace").strip()
        if not stripped or stripped.startswith("#"):
            continue
        looked_at += 1
        if most is not None and looked_at > most:
            return None
        try:
            steps = parse_sequence(stripped)
        except Invalid as problem:
            if problems is not None:
                problems.warn(
                    number,
                    "one_time_sequences",
                    f"line skipped: {problem}",
                    shown(path, text=True, limit=PATH_SHOWN),
                )
            continue
        # knockd overwrites the line's first byte (its man page suggests starting each
        # line with a space for that reason); so do we.
        sequences.append(OneTimeSequence(steps, number, offset))
    return sequences


def mark_line_used(path: str, offset: int) -> None:
    """Overwrite the byte at ``offset`` (a line's first byte) with ``#``, as knockd does."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"#")
        handle.flush()
        os.fsync(handle.fileno())
