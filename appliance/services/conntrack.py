"""Open connections to the services' host ports, from the kernel's connection tracking.

One netlink dump (pyroute2's ``NFCTSocket``, every address family) per call for
every port asked about: established TCP connections, or any UDP flow, counted by
their *original* destination port (what the client dialled, before Docker's DNAT).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Collection, Iterator

from appliance.core.model import Step

log = logging.getLogger("knockgate.services")

TCP_ESTABLISHED = 3  # nf_conntrack_tcp's TCP_CONNTRACK_ESTABLISHED
PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}

Entry = tuple[str, int, int | None]  # protocol, original destination port, TCP state


def netlink_entries() -> Iterator[Entry]:
    """Every conntrack entry as (protocol, original destination port, TCP state)."""
    from pyroute2.conntrack import NFCTSocket

    with NFCTSocket(nfgen_family=socket.AF_UNSPEC) as nfct:
        for message in nfct.dump():
            orig = message.get_attr("CTA_TUPLE_ORIG")
            proto = orig.get_attr("CTA_TUPLE_PROTO") if orig is not None else None
            if proto is None:
                continue
            name = PROTOCOLS.get(proto.get_attr("CTA_PROTO_NUM"))
            port = proto.get_attr("CTA_PROTO_DST_PORT")
            if name is None or port is None:
                continue
            state = None
            info = message.get_attr("CTA_PROTOINFO")
            tcp = info.get_attr("CTA_PROTOINFO_TCP") if info is not None else None
            if tcp is not None:
                state = tcp.get_attr("CTA_PROTOINFO_TCP_STATE")
            yield name, int(port), state


class ConnectionCounter:
    """``counter(steps)`` -> open connections per step, or ``None`` when conntrack cannot
    be read (the caller then keeps the services up: unknown is not idle). A failure is
    logged once per streak, and its end once."""

    def __init__(self, entries: Callable[[], Iterator[Entry]] = netlink_entries) -> None:
        self.entries = entries
        self.failing = 0

    def __call__(self, steps: Collection[Step]) -> dict[Step, int] | None:
        counts = dict.fromkeys(steps, 0)
        if not counts:
            return counts
        try:
            for proto, port, state in self.entries():
                step = Step(port, proto)  # type: ignore[arg-type]
                if step in counts and (proto != "tcp" or state == TCP_ESTABLISHED):
                    counts[step] += 1
        except Exception as error:  # netlink errors, a missing module, no permission
            if not self.failing:
                log.warning(
                    "conntrack cannot be read (services stay up while it cannot): %s", error
                )
            self.failing += 1
            return None
        if self.failing:
            log.warning("conntrack can be read again (%d failed reads)", self.failing)
            self.failing = 0
        return counts
