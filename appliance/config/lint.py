"""Warnings about weak choices: the config is valid, but easy to guess (short, monotonic
or published sequences), impossible to complete (``seq_timeout`` 0 with several steps)
or at odds with the kernel's scan detector."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise

from appliance.config.problems import Problems
from appliance.config.schema import ScanPolicy
from appliance.config.values import shown
from appliance.core.model import Door, OneTimeFile, Step

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


def lint_seq_timeout(
    seq_timeout: float,
    sequence: tuple[Step, ...] | None,
    one_time: OneTimeFile | None,
    problems: Problems,
    line: int,
    key: str,
    totp_steps: int = 0,
) -> None:
    """``seq_timeout`` 0 (knockd's ``Seq_Timeout = 0``) ends an attempt at the knocker's
    next packet (knockd drops an attempt when ``now - start >= seq_timeout``): a one-step
    sequence still opens on its one packet, a longer one never does (for a one-time file,
    its longest unused line counts)."""
    if seq_timeout != 0:
        return
    lengths = [len(sequence or ()), totp_steps]
    if one_time is not None:
        lengths.extend(len(unused.steps) for unused in one_time.sequences)
    steps = max(lengths)
    if steps > 1:
        problems.warn(
            line,
            key,
            f"0 with a {steps}-step sequence: the knock can never complete (an attempt "
            "times out at its next packet, as in knockd; expected more than 0, or 0 only "
            "for a one-step sequence)",
        )


def lint_scan(
    doors: Sequence[Door], scan: ScanPolicy | None, lines: Mapping[str, int], problems: Problems
) -> None:
    """Doors whose legitimate use looks like a port scan to ``firewall.scan``.

    The detector counts, per source address, the distinct ports (by number: 22/tcp and
    22/udp are one) of new inbound connections, knock ports excepted; more than
    ``scan.ports`` within ``scan.window`` and the source is held off for ``scan.hold``:
    the daemon then refuses its knocks. A door that opens more ports than that makes
    its own users scanners when they connect to all of them; one that opens exactly as
    many leaves no room for one other new port. A service door's port is not counted
    (Docker forwards it past the input chain). ``lines`` maps a door to the line of its
    ``open:``."""
    if scan is None:
        return
    window, hold = f"{scan.window:g}", f"{scan.hold:g}"
    for door in doors:
        if door.open is None or door.service is not None:
            continue
        ports = len({step.port for step in door.open.ports})
        key = f"doors.{shown(door.name, text=True)}.open"
        line = lines.get(door.name, door.origin.line if door.origin else 0)
        if ports > scan.ports:
            problems.warn(
                line,
                key,
                f"opens {ports} ports, more than firewall.scan.ports ({scan.ports}): a client "
                f"that connects to all of them within {window} s (firewall.scan.window) is "
                f"held off as a port scanner for {hold} s (firewall.scan.hold) and its next "
                f"knock is refused (expected at most {scan.ports} ports, or a larger "
                "firewall.scan.ports)",
            )
        elif ports == scan.ports:
            problems.warn(
                line,
                key,
                f"opens {ports} ports, as many as firewall.scan.ports ({scan.ports}): a client "
                "that connects to all of them and to one more new port of this host within "
                f"{window} s (firewall.scan.window) is held off as a port scanner for {hold} s "
                f"(firewall.scan.hold) and its next knock is refused (expected fewer than "
                f"{scan.ports} ports, or a larger firewall.scan.ports)",
            )
