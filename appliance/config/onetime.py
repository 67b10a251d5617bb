"""knockd's one-time-sequences file: one sequence per line, used lines start with ``#``.

The active sequence is the first valid uncommented line. Marking a line used
overwrites its first byte with ``#`` (what knockd does), so the file stays
usable by knockd and by ``knockgate knock --one-time``. Lines that do not parse
are skipped with a warning and never become usable.
"""

from __future__ import annotations

import os

from appliance.config.problems import Problems
from appliance.config.values import Invalid, parse_sequence
from appliance.core.model import OneTimeFile, OneTimeSequence


def read_one_time_file(path: str, problems: Problems, key: str, line: int) -> OneTimeFile | None:
    """Read the usable sequences of ``path``; problems are reported against ``key``."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        problems.error(
            line, key, f"cannot read {path}: {error.strerror} (expected a readable file)"
        )
        return None
    sequences = parse_one_time_lines(data, path, problems)
    if not sequences:
        problems.warn(line, key, f"{path} has no unused sequence: the door stays disabled")
    return OneTimeFile(os.path.abspath(path), tuple(sequences))


def parse_one_time_lines(
    data: bytes, path: str, problems: Problems | None
) -> list[OneTimeSequence]:
    sequences: list[OneTimeSequence] = []
    offset = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        start, offset = offset, offset + len(raw) + 1
        text = raw.decode("utf-8", "replace")
        stripped = text.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            steps = parse_sequence(stripped)
        except Invalid as problem:
            if problems is not None:
                problems.warn(number, "one_time_sequences", f"line skipped: {problem}", path)
            continue
        # knockd overwrites the line's first byte (its man page suggests starting each
        # line with a space for that reason); so do we.
        sequences.append(OneTimeSequence(steps, number, start))
    return sequences


def mark_line_used(path: str, offset: int) -> None:
    """Overwrite the byte at ``offset`` (a line's first byte) with ``#``, as knockd does."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"#")
        handle.flush()
        os.fsync(handle.fileno())
