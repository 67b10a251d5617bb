"""Warnings about weak knock choices (the config is valid, but easy to guess)."""

from __future__ import annotations

from itertools import pairwise

from appliance.config.problems import Problems
from appliance.core.model import Step

# Sequences printed in knockd's and knock's man pages and shipped in Debian's
# /etc/knockd.conf: every scanner and every attacker knows them.
WELL_KNOWN_SEQUENCES: frozenset[tuple[int, ...]] = frozenset(
    {
        (7000, 8000, 9000),
        (9000, 8000, 7000),
        (12345, 54321, 24680, 13579),
        (2222, 3333, 4444),
        (123, 456, 789),
        (8284, 4721, 18592, 42912),
    }
)


def lint_sequence(sequence: tuple[Step, ...], problems: Problems, line: int, key: str) -> None:
    ports = tuple(step.port for step in sequence)
    if ports in WELL_KNOWN_SEQUENCES:
        problems.warn(
            line,
            key,
            f"{','.join(map(str, ports))} is a published example sequence: choose your own",
        )
    if len(sequence) < 3:
        problems.warn(line, key, f"only {len(sequence)} step(s): easy to guess (use 3 or more)")
    elif all(a <= b for a, b in pairwise(ports)) or all(a >= b for a, b in pairwise(ports)):
        problems.warn(
            line,
            key,
            "the ports only go up (or only down): a sequential port scan can complete it "
            "(mix the order)",
        )
