"""Waiting until a knocked port accepts a TCP connection.

:class:`WaitProgress` is the pure part: it takes each probe's outcome with the time
it came and says which progress line to print (the first answer, the opening) and,
at the deadline, why the port did not open and what to check. :func:`wait_open`
carries it out with plain TCP connects and returns the connected socket, so
``connect`` relays on the very connection that proved the port open.

Outcomes of one probe: ``open`` (accepted), ``refused`` (a reset: the host answers,
the port is still closed to us; knockgate answers a protected port so), ``timeout``
(no answer: the packets are dropped on the way, or the host is down), ``unreachable``
(an ICMP error or no route).
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from appliance.errors import KnockError

Outcome = Literal["open", "refused", "timeout", "unreachable"]

DEFAULT_TIMEOUT = 30.0  # seconds for --wait and connect
PROBE_TIMEOUT = 1.0  # the longest one connect may take before it counts as no answer
FAST_RETRY = 0.02  # between probes at first (a port opens within milliseconds of a knock)
SLOW_RETRY = 0.25  # after FAST_TRIES (a service container may take seconds to start)
FAST_TRIES = 25  # half a second of fast probes (resets from a gate cost nothing)
STATUS_TIMED_OUT = 3  # the exit status of knock --wait / connect when the port stays closed

_UNREACHABLE = frozenset(
    {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN, errno.EADDRNOTAVAIL}
)


class PortStayedClosed(KnockError):
    """The port did not accept a connection within the timeout (exit status 3)."""


@dataclass(slots=True)
class WaitProgress:
    """What waiting for ``port`` on ``host`` has seen so far (pure: times come in)."""

    host: str
    port: int
    started: float
    timeout: float
    tries: int = 0
    counts: dict[Outcome, int] = field(default_factory=dict)
    last_detail: str = ""
    answered: bool = False
    silent_reported: bool = False
    opened_at: float | None = None

    @property
    def deadline(self) -> float:
        return self.started + self.timeout

    def probed(self, outcome: Outcome, now: float, detail: str = "") -> list[str]:
        """Record one probe; the progress lines it is worth (none in a steady state)."""
        self.tries += 1
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        self.last_detail = detail
        where = f"{self.host} port {self.port}/tcp"
        if outcome == "open":
            self.opened_at = now
            return [
                f"{where} accepts connections: open after {now - self.started:.3f} s "
                f"({self.tries} tr{'y' if self.tries == 1 else 'ies'})"
            ]
        lines: list[str] = []
        if outcome == "refused" and not self.answered:
            self.answered = True
            lines.append(f"{where} answers (reset: still closed to us), waiting for it to open")
        elif outcome in ("timeout", "unreachable") and not (self.answered or self.silent_reported):
            self.silent_reported = True
            what = "no answer" if outcome == "timeout" else f"unreachable ({detail})"
            lines.append(f"{where}: {what} yet, still trying")
        return lines

    def next_try(self, now: float) -> float:
        """When to probe next (never past the deadline)."""
        pause = FAST_RETRY if self.tries < FAST_TRIES else SLOW_RETRY
        return min(now + pause, self.deadline)

    def expired(self, now: float) -> bool:
        return self.opened_at is None and now >= self.deadline

    def failure(self) -> str:
        """Why the port did not open, and what to check (the message of exit status 3)."""
        where = f"{self.host} port {self.port}/tcp"
        head = f"{where} did not open within {self.timeout:g} s ({self.tries} tries: "
        head += ", ".join(f"{n} {outcome}" for outcome, n in sorted(self.counts.items())) + ")"
        if self.counts.get("refused"):
            check = (
                "the host answers but the door did not open for this address. Check the "
                "knock (door name, sequence, SPA key, the clock for TOTP/SPA), that the "
                "server sees this client's address (NAT; for SPA use -a/--allow-ip), that "
                "the door opens this port, and the server's log (knockgate status)"
            )
        elif self.counts.get("unreachable"):
            check = (
                f"the host cannot be reached ({self.last_detail}). Check the address and "
                "this machine's network"
            )
        else:
            check = (
                "nothing answered. Check the host and the port, that knockgate runs there, "
                "and that no firewall on the way drops the packets"
            )
        return f"{head}: {check}"


def probe(
    address_family: int, address: str, port: int, timeout: float
) -> tuple[Outcome, socket.socket | None, str]:
    """One TCP connect: its outcome, the connected socket when open, and a detail."""
    sock = socket.socket(address_family, socket.SOCK_STREAM)
    sock.settimeout(max(timeout, 0.001))
    try:
        sock.connect((address, port))
    except ConnectionRefusedError:
        sock.close()
        return "refused", None, "connection refused"
    except TimeoutError:
        sock.close()
        return "timeout", None, "no answer"
    except OSError as error:
        sock.close()
        reason = error.strerror or str(error)
        if error.errno in _UNREACHABLE:
            return "unreachable", None, reason
        raise KnockError(f"cannot connect to {address} port {port}: {reason}") from None
    sock.settimeout(None)
    return "open", sock, ""


Say = Callable[[str], None]


def wait_open(
    address_family: int,
    address: str,
    port: int,
    timeout: float,
    say: Say,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[socket.socket, WaitProgress]:
    """Probe ``port`` until it accepts; the connected socket and what was seen.

    Raises :class:`PortStayedClosed` (with what to check) at ``timeout`` seconds.
    """
    progress = WaitProgress(address, port, clock(), timeout)
    while True:
        now = clock()
        left = progress.deadline - now
        outcome, sock, detail = probe(address_family, address, port, min(PROBE_TIMEOUT, left))
        now = clock()
        for line in progress.probed(outcome, now, detail):
            say(line)
        if sock is not None:
            return sock, progress
        if progress.expired(now):
            raise PortStayedClosed(progress.failure())
        pause = progress.next_try(now) - now
        if pause > 0:
            sleep(pause)
        if progress.expired(clock()):
            raise PortStayedClosed(progress.failure())
