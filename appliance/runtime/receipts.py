"""Sending SPA receipts (the monitor's side of :class:`~appliance.core.events.SendReceipt`).

The engine decides who gets a receipt (granted packets only, rate-limited per source);
this module seals it (:mod:`appliance.spa.receipt`) and sends it: one UDP datagram from
the address the SPA packet was sent to and the door's SPA port, to the packet's source
address and port. Replying from the very (address, port) pair the client sent to is
what lets the receipt through the client's connected UDP socket and through NATs and
stateful firewalls on the way, which let in only the reply to what went out.

The socket lives for one datagram: ``SO_REUSEADDR`` (nothing is bound to the SPA port,
SPA is sniffed; this never takes it from anyone) and ``IP_FREEBIND`` (an address that
went away a moment ago fails at send time, not bind time), non-blocking, closed at once.
It needs no privilege: the SPA port is above 1023 by default, and a lower one is fine
for the monitor (uid 0). Nothing is ever received on it: the host's firewall drops
inbound traffic to the SPA port before any socket sees it.

Failures (no route, an address gone) are counted and logged once per streak.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from appliance.core.events import SendReceipt
from appliance.core.model import Door
from appliance.spa.receipt import Receipt, State, receipt_key, seal_receipt
from appliance.spa.wire import SpaKeys

log = logging.getLogger("knockgate.spa")

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # linux/in.h; also applies to AF_INET6


@dataclass
class ReceiptStats:
    sent: int = 0
    failed: int = 0


class ReceiptSender:
    """Seals and sends receipts; keys are derived once per user and kept."""

    def __init__(self) -> None:
        self.stats = ReceiptStats()
        self._keys: dict[tuple[bytes, bytes], bytes] = {}
        self._failing = False

    def send(self, command: SendReceipt, door: Door, state: State, wall_offset: float) -> bool:
        """Seal ``command`` for its user of ``door`` and send it; ``False`` if it was not."""
        spa = door.spa
        user = None if spa is None else next((u for u in spa.users if u.name == command.user), None)
        if spa is None or user is None:
            return False  # reloaded away between the grant and now: nothing to seal with
        key = self._keys.get((user.key, user.hmac_key))
        if key is None:
            if len(self._keys) > 1024:
                self._keys.clear()
            key = self._keys[(user.key, user.hmac_key)] = receipt_key(
                SpaKeys(user.key, user.hmac_key)
            )
        receipt = Receipt(
            state,
            command.address,
            command.until + wall_offset,
            max(0, round(command.until - command.at)),
        )
        datagram = seal_receipt(receipt, key, command.digest)
        family = socket.AF_INET6 if ":" in command.to else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
                sock.bind((command.via, spa.port))
                sock.sendto(datagram, (command.to, command.port))
        except OSError as error:
            self.stats.failed += 1
            if not self._failing:
                self._failing = True
                log.warning(
                    "%s: %s: receipt to port %d not sent: %s (further failures are counted)",
                    command.to,
                    command.door,
                    command.port,
                    error.strerror or error,
                )
            return False
        self._failing = False
        self.stats.sent += 1
        return True
