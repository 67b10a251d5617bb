"""Renewing a grant while a session runs: re-knock before the grant ends.

The server treats a knock on a door already open for an address like any other
completed knock: a new grant with a new deadline, which replaces the old one in
the kernel set at once (nftables: delete and add of the element in one atomic
batch; iptables: ``ipset -exist add`` resets the timeout), so there is no moment
without a grant. A service door's holder takes the later deadline too.

The client's schedule (:class:`Renewal`, pure: times come in): the first renewal
``renew_after(grant)`` after the knock, then the same again after each one sent;
a knock that fails is tried again after ``RETRY`` seconds (a TOTP door whose time
steps are used up waits for the next step the same way). Quiet: one line when a
renewal fails for the first time and one when it works again, nothing per renewal
unless verbose.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.errors import KnockError

RETRY = 1.0  # seconds before a failed renewal is tried again
MARGIN = 30.0  # renew at most this long before the grant ends (and at half a short grant)
MIN_INTERVAL = 0.5


def renew_after(grant: float) -> float:
    """Seconds after a knock to renew: half of a short grant, ``MARGIN`` before a long one's end."""
    return max(MIN_INTERVAL, grant - min(grant / 2, MARGIN))


Knock = Callable[[], str | None]  # sends the knock; None: cannot right now (TOTP)


@dataclass(slots=True)
class Renewal:
    """The relay's :class:`~appliance.knocker.relay.Timer` that keeps a grant alive."""

    knock: Knock
    grant: float
    last: float  # when the grant was last asked for (monotonic)
    say: Callable[[str], None]
    verbose: bool = False
    renewals: int = 0
    failures: int = 0
    failing: bool = False
    next_at: float = field(init=False)
    times: list[float] = field(default_factory=list)  # when each renewal went out

    def __post_init__(self) -> None:
        self.next_at = self.last + renew_after(self.grant)

    def due(self) -> float | None:
        return self.next_at

    def fire(self, now: float) -> None:
        try:
            sent = self.knock()
        except KnockError as error:
            sent, problem = None, str(error)
        else:
            problem = "no unused TOTP time step yet" if sent is None else ""
        if sent is None:
            self.failures += 1
            if not self.failing:
                self.failing = True
                self.say(f"renewal failed, trying again every {RETRY:g} s: {problem}")
            self.next_at = now + RETRY
            return
        if self.failing:
            self.failing = False
            self.say("renewal works again")
        self.renewals += 1
        self.times.append(now)
        self.last = now
        self.next_at = now + renew_after(self.grant)
        if self.verbose:
            self.say(f"renewed the grant ({self.grant:g} s): {sent}")
