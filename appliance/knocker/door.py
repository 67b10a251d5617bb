"""Knocking one door, as often as needed: its sequence, its TOTP sequence or an SPA packet.

A :class:`DoorKnocker` is made once from the client's copy of the configuration
and knocks on each :meth:`DoorKnocker.knock`. What the door opens and for how long
(the grant the server will give) come from the same configuration: ``open.ports``
and ``open.duration``, for SPA the client's ``--fw-timeout`` capped by the door's
``max_time``.

TOTP: the server accepts each time step once (``skew`` either side of its own), so
a renewal within the same step uses the next one; when every step up to
``now + skew`` is used, :meth:`DoorKnocker.knock` returns ``None`` (try later).
"""

from __future__ import annotations

import getpass
import time
from dataclasses import dataclass

from appliance.client import local_address_for, send_datagram, send_knocks
from appliance.core.model import Door, Step
from appliance.core.totp import time_step, totp_sequence
from appliance.errors import KnockError
from appliance.spa.keyfile import ClientProfile
from appliance.spa.wire import SpaError, new_message, parse_access, seal


@dataclass(frozen=True, slots=True)
class SpaRequest:
    """What one SPA packet asks for, as ``knockgate spa`` builds it."""

    profile: ClientProfile
    port: int  # the server's SPA port (UDP)
    access: str  # "tcp/22,udp/53"
    allow_ip: str | None = None  # None: the address the packet leaves from
    source: bool = False  # fwknop -s: "the address the packet comes from" (0.0.0.0)
    fw_timeout: int | None = None
    username: str | None = None


@dataclass(frozen=True, slots=True)
class SpaSent:
    size: int  # bytes of UDP payload
    sent_from: str
    allow: str


def send_spa(address_family: int, address: str, request: SpaRequest, now: float) -> SpaSent:
    """Build and send one SPA packet for ``request`` to ``address``."""
    given = request.allow_ip
    if given is not None and given.lower() == "resolve":
        given = None  # no outside service is asked: the address we leave from is used
    if request.source or (given is not None and given.lower() == "source"):
        allow = "0.0.0.0"
    else:
        allow = given or local_address_for(address_family, address, request.port)
    username = request.username or getpass.getuser()
    try:
        access = f"{allow},{request.access}"
        parse_access(access)
        message = new_message(username, int(now), access, request.fw_timeout)
        packet = seal(message, request.profile.keys)
    except (ValueError, SpaError) as error:
        raise KnockError(f"cannot build the SPA packet: {error}") from None
    sent_from = send_datagram(address_family, address, request.port, packet)
    return SpaSent(len(packet), sent_from, allow)


class DoorKnocker:
    """Knocks ``door`` on ``address``; ``knock`` may be called again to renew the grant."""

    def __init__(
        self,
        door: Door,
        address_family: int,
        address: str,
        *,
        spa: SpaRequest | None = None,
        delay_ms: int = 0,
    ) -> None:
        if door.open is None or not door.open.ports:
            raise KnockError(f"door {door.name!r} opens no port: nothing to wait for")
        if door.knock.one_time is not None:
            raise KnockError(
                f"door {door.name!r} uses one-time sequences: knock it with "
                "knockgate knock --one-time FILE (one line per knock, no renewal)"
            )
        if door.spa is not None and spa is None:
            raise KnockError(f"door {door.name!r} is an SPA door: give --key-file FILE")
        self.door = door
        self.address_family = address_family
        self.address = address
        self.spa = spa
        self.delay_ms = delay_ms
        self._last_step: int | None = None  # TOTP: the last time step sent

    @property
    def ports(self) -> tuple[Step, ...]:
        assert self.door.open is not None
        return self.door.open.ports

    @property
    def grant(self) -> float:
        """How long the server's grant lasts, in seconds, as far as the client knows."""
        assert self.door.open is not None
        spa = self.door.spa
        if spa is None:
            return self.door.open.duration
        assert self.spa is not None
        asked = self.spa.fw_timeout
        return min(float(asked) if asked else self.door.open.duration, spa.max_time)

    def knock(self, now: float | None = None) -> str | None:
        """Send the knock; return what was sent (for progress lines), or ``None`` when a
        TOTP door has no unused time step left until the clock moves on."""
        now = time.time() if now is None else now
        if self.spa is not None:
            sent = send_spa(self.address_family, self.address, self.spa, now)
            return (
                f"SPA packet ({sent.size} bytes) to {self.address} port {self.spa.port}/udp: "
                f"open {self.spa.access} for {sent.allow}"
            )
        steps = self.sequence(now)
        if steps is None:
            return None
        send_knocks(self.address_family, self.address, steps, self.delay_ms, None)
        what = "TOTP sequence" if self.door.knock.totp is not None else "sequence"
        return f"{what} of {len(steps)} knock(s) to {self.address}"

    def sequence(self, now: float) -> tuple[Step, ...] | None:
        """The steps to send at unix time ``now`` (``None``: TOTP steps used up for now)."""
        totp = self.door.knock.totp
        if totp is None:
            return self.door.knock.sequence
        current = time_step(totp, now)
        step = current if self._last_step is None else max(current, self._last_step + 1)
        if step > current + totp.skew:
            return None
        self._last_step = step
        return totp_sequence(totp, step)
