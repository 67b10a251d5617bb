"""The kernel capture filter, generated from the doors (pure: text in, text out).

Only packets that can matter reach Python: addressed to the host (or to a door's
``target``), to a knock port with its protocol (for a TOTP door, its whole port
range; for an SPA door, its UDP port), and, for IPv4 TCP, with flags that some
door using that port accepts. IPv6 packets whose first header is an
extension header are passed whole: classic BPF cannot walk the chain, the
decoder does. VLAN tags need no clause: on a live interface the kernel strips
the tag before AF_PACKET sees the frame.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from appliance.core.model import TCP_FLAG_BITS, Door, TcpFlags

IPV6_EXTENSION_HEADERS = (0, 43, 44, 51, 60)


def _flag_names(bits: int) -> str:
    return "|".join(f"tcp-{name}" for name, bit in TCP_FLAG_BITS.items() if bits & bit)


def _flag_test(flags: TcpFlags) -> str:
    mask = flags.must_set | flags.must_clear
    value = _flag_names(flags.must_set) if flags.must_set else "0"
    return f"tcp[tcpflags] & ({_flag_names(mask)}) == {value}"


def _tcp_port(port: int, filters: set[TcpFlags]) -> str:
    clause = f"tcp dst port {port}"
    if not filters or any(f.empty for f in filters):
        return clause
    tests = " or ".join(_flag_test(f) for f in sorted(filters, key=str))
    return f"({clause} and (ip6 or {tests}))"


# What can be an fwknop SPA packet (appliance.spa.wire's first cheap checks): at least
# 140 bytes of payload (the UDP length counts its 8-byte header too), the first one
# 8, 9, + or / (the base64 of "Salted__" + salt with its constant prefix cut off).
SPA_MIN_UDP_LENGTH = 8 + 140
SPA_FIRST_BYTES = b"89+/"


def _spa_port(port: int) -> str:
    """An SPA port, with garbage dropped in the kernel: IPv4 by the UDP header, IPv6 at the
    fixed offsets of a packet without extension headers (those are passed whole)."""
    first4 = " or ".join(f"udp[8] == {byte:#x}" for byte in SPA_FIRST_BYTES)
    first6 = " or ".join(f"ip6[48] == {byte:#x}" for byte in SPA_FIRST_BYTES)
    return (
        f"(udp dst port {port} and ("
        f"(ip and udp[4:2] >= {SPA_MIN_UDP_LENGTH} and ({first4})) or "
        f"(ip6 and ip6[44:2] >= {SPA_MIN_UDP_LENGTH} and ({first6}))))"
    )


def capture_filter(doors: Sequence[Door], host_addresses: Iterable[str]) -> str:
    """A pcap filter expression for the doors' knocks to these addresses."""
    tcp: dict[int, set[TcpFlags]] = {}
    udp: set[int] = set()
    destinations = set(host_addresses)
    for door in doors:
        knock = door.knock
        if knock.target is not None:
            destinations.add(knock.target)
        steps = set(knock.sequence)
        if knock.one_time is not None:
            for sequence in knock.one_time.sequences:
                steps.update(sequence.steps)
        for step in steps:
            if step.proto == "udp":
                udp.add(step.port)
            else:
                tcp.setdefault(step.port, set())
                if not knock.tcpflags.empty:
                    tcp[step.port].add(knock.tcpflags)
                else:
                    tcp[step.port].add(TcpFlags())
    clauses = [_tcp_port(port, tcp[port]) for port in sorted(tcp)]
    clauses += [f"udp dst port {port}" for port in sorted(udp)]
    for door in doors:
        totp = door.knock.totp
        if totp is not None:  # every port of the range: the sequence changes with time
            ports = f"{totp.proto} dst portrange {totp.low}-{totp.high}"
            flags = door.knock.tcpflags
            if totp.proto == "tcp" and not flags.empty:
                ports = f"({ports} and (ip6 or {_flag_test(flags)}))"
            clauses.append(ports)
        if door.spa is not None:
            clauses.append(_spa_port(door.spa.port))
    if not clauses:
        return "less 0"  # matches nothing: no door, no packet
    extension = " or ".join(f"ip6[6] == {header}" for header in IPV6_EXTENSION_HEADERS)
    clauses.append(f"(ip6 and ({extension}))")
    ports = " or ".join(clauses)
    if not destinations:
        return ports
    hosts = " or ".join(f"dst host {address}" for address in sorted(destinations))
    return f"({hosts}) and ({ports})"
