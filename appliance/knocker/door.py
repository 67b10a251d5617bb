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

import time

from appliance.client import send_knocks
from appliance.core.model import Door, Step
from appliance.core.totp import time_step, totp_sequence
from appliance.errors import KnockError
from appliance.knocker.spa import SpaRequest, SpaSent, Warn, describe, send_spa, wait_receipts

__all__ = ["DoorKnocker", "SpaRequest"]


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
        warn: Warn | None = None,
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
        self.warn = warn
        self._last_step: int | None = None  # TOTP: the last time step sent
        self._awaiting: list[SpaSent] = []  # the last SPA packets, sockets open for receipts

    @property
    def has_receipts(self) -> bool:
        """Whether the door (in the client's copy of the configuration) sends receipts."""
        return self.spa is not None and self.door.spa is not None and self.door.spa.receipt

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
            self.forget_receipts()
            sent = send_spa(
                self.address_family,
                self.address,
                self.spa,
                now,
                keep=self.has_receipts,
                warn=self.warn,
            )
            self._awaiting = [one for one in sent if one.sock is not None]
            allows = " and ".join(one.allow for one in sent)
            size = "+".join(str(one.size) for one in sent)
            what = "SPA packet" if len(sent) == 1 else f"{len(sent)} SPA packets"
            return (
                f"{what} ({size} bytes) to {self.address} port {self.spa.port}/udp: "
                f"open {self.spa.access} for {allows}"
            )
        steps = self.sequence(now)
        if steps is None:
            return None
        send_knocks(self.address_family, self.address, steps, self.delay_ms, None)
        what = "TOTP sequence" if self.door.knock.totp is not None else "sequence"
        return f"{what} of {len(steps)} knock(s) to {self.address}"

    def receipts(self, timeout: float) -> list[str]:
        """Wait up to ``timeout`` seconds for the last knock's receipts: one line each
        (what it says, or that none came)."""
        awaiting, self._awaiting = self._awaiting, []
        if not awaiting or self.spa is None:
            return []
        found = wait_receipts(awaiting, self.spa.profile.keys, timeout)
        return [
            f"receipt: {describe(receipt)}"
            if receipt is not None
            else f"no receipt for {one.allow} within {timeout:g} s (refused, lost, or the "
            "server does not send receipts: see its log)"
            for one, receipt in zip(awaiting, found, strict=True)
        ]

    def forget_receipts(self) -> None:
        """Close the sockets still waiting for receipts (a renewal does not wait)."""
        for one in self._awaiting:
            one.close()
        self._awaiting = []

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
