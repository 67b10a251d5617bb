"""UDP payloads on an SPA door's port to :class:`~appliance.core.events.SpaKnock`.

The cryptographic half of the edge: for each user of the door whose ``sources``
admit the packet's source, the HMAC is checked (nothing is decrypted before one
verifies); the first user whose keys verify it has the packet decrypted and
parsed. What passes becomes an ``SpaKnock`` for the engine, which applies the
policy (age, replay, allowance). Everything else is counted here and dropped
without a log line: an SPA port under a flood of garbage must not flood the log.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network

from appliance.core.events import Packet, SpaKnock
from appliance.core.model import Door, SpaUser, Step
from appliance.spa.wire import (
    SpaError,
    SpaKeys,
    candidate,
    open_verified,
    parse_access,
    replay_digest,
    verify,
)

log = logging.getLogger("knockgate.spa")


@dataclass(slots=True)
class SpaCounters:
    """SPA packets dropped at the edge, by why (for ``knockgate status``)."""

    spa_packets: int = 0
    spa_unauthenticated: int = 0  # no user's HMAC key verifies it (garbage, wrong key, bit flip)
    spa_undecodable: int = 0  # the HMAC verified but the content is not a valid SPA message

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Key:
    __slots__ = ("keys", "networks", "user")

    def __init__(self, user: SpaUser) -> None:
        self.user = user
        self.keys = SpaKeys(user.key, user.hmac_key)
        self.networks: tuple[IPv4Network | IPv6Network, ...] = tuple(
            ip_network(source, strict=False) for source in user.sources
        )


class SpaReader:
    """The SPA doors of one configuration, by UDP port."""

    def __init__(self, doors: Sequence[Door], local: frozenset[str] | None = None) -> None:
        self.counters = SpaCounters()
        # The host's own addresses: an SPA door without target reads only packets sent
        # to one of them (None: any destination, for a replay without --host).
        self.local = local
        self.by_port: dict[int, list[tuple[Door, list[_Key]]]] = {}
        for door in doors:
            if door.spa is not None:
                keys = [_Key(user) for user in door.spa.users]
                self.by_port.setdefault(door.spa.port, []).append((door, keys))
        self.ports = frozenset(self.by_port)

    def route(self, packet: Packet) -> Packet | SpaKnock | None:
        """What the engine gets for ``packet``: the packet itself, or, on an SPA port,
        its authenticated knock (``None``: nothing, the packet was counted and dropped)."""
        if packet.payload and packet.dport in self.ports:
            return self.read(packet)
        return packet

    def read(self, packet: Packet) -> SpaKnock | None:
        """The authenticated knock in ``packet``, or ``None`` (counted) when there is none."""
        counters = self.counters
        counters.spa_packets += 1
        doors = self.by_port.get(packet.dport)
        if doors is None or packet.proto != "udp":
            counters.spa_unauthenticated += 1
            return None
        text = candidate(packet.payload)  # length, charset...: once, not per user
        if text is None:
            counters.spa_unauthenticated += 1
            return None
        source = None
        verified = False
        for door, keys in doors:
            target = door.knock.target
            if target is not None:
                if packet.dst != target:
                    continue
            elif self.local is not None and packet.dst not in self.local:
                continue
            for key in keys:
                if key.networks:
                    if source is None:
                        source = ip_address(packet.src)
                    if not any(source in network for network in key.networks):
                        continue
                covered = verify(text, key.keys)
                if covered is None:
                    continue
                verified = True
                knock = self._open(packet, text, covered, door, key)
                if knock is not None:
                    return knock
                # Another user may share this HMAC key with another encryption key
                # (fwknopd tries every access.conf stanza the same way).
        if verified:
            counters.spa_undecodable += 1
        else:
            counters.spa_unauthenticated += 1
        return None

    def _open(
        self, packet: Packet, text: bytes, covered: bytes, door: Door, key: _Key
    ) -> SpaKnock | None:
        try:
            message = open_verified(covered, key.keys)
            address, ports = parse_access(message.message)
        except SpaError as error:
            log.warning(
                "%s: %s: SPA verified with user %s's HMAC key but unusable with the "
                "user's encryption key: %s",
                packet.src,
                door.name,
                key.user.name,
                error,
            )
            return None
        return SpaKnock(
            ts=packet.ts,
            src=packet.src,
            door=door.name,
            user=key.user.name,
            username=message.username,
            timestamp=message.timestamp,
            msg_type=message.msg_type,
            address=address,
            ports=tuple(Step(port, "udp" if proto == "udp" else "tcp") for port, proto in ports),
            client_timeout=message.client_timeout,
            digest=replay_digest(text),
            dst=packet.dst,
            sport=packet.sport,
        )
