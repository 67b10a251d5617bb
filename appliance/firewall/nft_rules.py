"""knockgate's nftables ruleset, built as data (nft script text) by pure functions.

One table, ``inet knockgate``; nothing else is ever touched. The setup batch is
idempotent and atomic (one ``nft -f`` transaction):

* the grant sets are only ``add``-ed, so a restart keeps every grant still within
  its deadline (their elements carry kernel timeouts);
* every other set and every chain is rebuilt: ``add`` (a no-op when it exists),
  then ``delete``/``flush``, then re-created, all in the same transaction.

Input chain at ``priority filter - 10``, so it runs before Docker's and the
distribution's chains; a reject or drop here is final whatever they accept.
"""

from __future__ import annotations

import ipaddress
import math

from appliance.core.model import Step
from appliance.firewall import FirewallPlan, ScanPolicy

TABLE = "knockgate"
FAMILY = "inet"
SET_SIZE = 65536

GRANT_SETS = {
    4: ("grants4", "ipv4_addr . inet_proto . inet_service"),
    6: ("grants6", "ipv6_addr . inet_proto . inet_service"),
}
# Service containers' own (address . protocol . port): reached directly, past the host port.
DIRECT_SETS = {
    4: ("direct4", "ipv4_addr . inet_proto . inet_service"),
    6: ("direct6", "ipv6_addr . inet_proto . inet_service"),
}
# A connection whose first packet matched a grant, before Docker's DNAT rewrote its port.
GRANTED_MARK = "0x4b000000"


def _family(address: str) -> int:
    return ipaddress.ip_address(address).version


def _timeout(seconds: float) -> str:
    """An nft duration with millisecond precision, never longer than ``seconds``."""
    ms = max(1, math.floor(seconds * 1000))
    whole, rest = divmod(ms, 1000)
    return f"{whole}s{rest}ms" if rest else f"{whole}s"


def _elements(items: tuple[str, ...] | tuple[int, ...]) -> str:
    return "{ " + ", ".join(str(item) for item in items) + " }"


def _scan_sets(scan: ScanPolicy) -> list[tuple[str, str]]:
    window, hold = _timeout(scan.window), _timeout(scan.hold)
    flags = f"flags dynamic, timeout; size {SET_SIZE};"
    return [
        ("ports_seen4", f"type ipv4_addr . inet_service; {flags} timeout {window};"),
        ("ports_seen6", f"type ipv6_addr . inet_service; {flags} timeout {window};"),
        ("scan_rate4", f"type ipv4_addr; {flags} timeout {window};"),
        ("scan_rate6", f"type ipv6_addr; {flags} timeout {window};"),
        ("held4", f"type ipv4_addr; {flags} timeout {hold};"),
        ("held6", f"type ipv6_addr; {flags} timeout {hold};"),
        # The doors' own knock ports: never counted (a long knock is not a scan).
        ("knock_tcp", "type inet_service; flags interval;"),
        ("knock_udp", "type inet_service; flags interval;"),
    ]


def _ranges(ranges: tuple[tuple[int, int], ...]) -> tuple[str, ...]:
    return tuple(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


def setup_script(plan: FirewallPlan) -> str:
    """The whole table as one transaction; grants survive, the rest is rebuilt."""
    t = f"{FAMILY} {TABLE}"
    lines = [f"add table {t}"]
    for name, kind in GRANT_SETS.values():
        lines.append(f"add set {t} {name} {{ type {kind}; flags timeout; }}")
    for name, kind in DIRECT_SETS.values():
        lines.append(f"add set {t} {name} {{ type {kind}; }}")
    # Chains first emptied, so the sets their rules use can be replaced below.
    hooks = {
        "input": " { type filter hook input priority filter - 10; policy accept; }",
        "mark_grants": " { type filter hook prerouting priority dstnat - 10; policy accept; }",
        "forward_gate": " { type filter hook forward priority filter - 10; policy accept; }",
    }
    for chain in ("input", "scan", "gate", "mark_grants", "forward_gate", "service_gate"):
        spec = hooks.get(chain, "")
        lines.append(f"add chain {t} {chain}{spec}")
        lines.append(f"flush chain {t} {chain}")
    rebuilt: list[tuple[str, str]] = [
        ("protected_tcp", "type inet_service;"),
        ("protected_udp", "type inet_service;"),
        ("allow4", "type ipv4_addr; flags interval;"),
        ("allow6", "type ipv6_addr; flags interval;"),
    ]
    if plan.scan is not None:
        rebuilt += _scan_sets(plan.scan)
    for name, spec in rebuilt:
        lines.append(f"add set {t} {name} {{ {spec} }}")
        lines.append(f"delete set {t} {name}")
        lines.append(f"add set {t} {name} {{ {spec} }}")
    elements: list[tuple[str, tuple[str, ...]]] = [
        ("protected_tcp", tuple(map(str, plan.ports("tcp")))),
        ("protected_udp", tuple(map(str, plan.ports("udp")))),
        ("allow4", plan.networks(4)),
        ("allow6", plan.networks(6)),
    ]
    if plan.scan is not None:
        elements += [
            ("knock_tcp", _ranges(plan.knock_ranges("tcp"))),
            ("knock_udp", _ranges(plan.knock_ranges("udp"))),
        ]
    for name, items in elements:
        if items:
            lines.append(f"add element {t} {name} {_elements(items)}")
    lines.append(f'add rule {t} input iif "lo" accept')
    if plan.scan is not None:
        lines.append(f"add rule {t} input ct state new meta l4proto {{ tcp, udp }} jump scan")
        lines.append(f"add rule {t} scan meta l4proto tcp tcp dport @knock_tcp return")
        lines.append(f"add rule {t} scan meta l4proto udp udp dport @knock_udp return")
        burst = plan.scan.ports
        rate = max(1, math.ceil(plan.scan.ports / plan.scan.window))
        for version, saddr in ((4, "ip saddr"), (6, "ip6 saddr")):
            lines.append(f"add rule {t} scan {saddr} . th dport @ports_seen{version} return")
            lines.append(
                f"add rule {t} scan meta nfproto ipv{version} "
                f"add @ports_seen{version} {{ {saddr} . th dport }} "
                f"update @scan_rate{version} {{ {saddr} limit rate over {rate}/second "
                f"burst {burst} packets }} add @held{version} {{ {saddr} }}"
            )
    lines.append(f"add rule {t} input meta l4proto tcp tcp dport @protected_tcp jump gate")
    lines.append(f"add rule {t} input meta l4proto udp udp dport @protected_udp jump gate")
    lines += [
        f"add rule {t} gate ct state established,related accept",
        f"add rule {t} gate ip saddr @allow4 accept",
        f"add rule {t} gate ip6 saddr @allow6 accept",
        f"add rule {t} gate ip saddr . meta l4proto . th dport @grants4 accept",
        f"add rule {t} gate ip6 saddr . meta l4proto . th dport @grants6 accept",
        f"add rule {t} gate meta l4proto tcp reject with tcp reset",
        f"add rule {t} gate drop",
        # Published container ports: Docker DNATs them in prerouting and routes them
        # through FORWARD, past INPUT. Mark granted connections before the DNAT, then
        # gate forwarded traffic by its original port, and direct traffic to the
        # service containers' own addresses, on that mark.
        f"add rule {t} mark_grants ct state new ip saddr . meta l4proto . th dport @grants4 "
        f"ct mark set ct mark | {GRANTED_MARK}",
        f"add rule {t} mark_grants ct state new ip6 saddr . meta l4proto . th dport @grants6 "
        f"ct mark set ct mark | {GRANTED_MARK}",
        # Only rewritten connections (ct status dnat): a container's own outgoing connection
        # to a remote port that happens to be protected here is not ours to gate.
        f"add rule {t} forward_gate meta l4proto tcp ct status dnat "
        "ct original proto-dst @protected_tcp jump service_gate",
        f"add rule {t} forward_gate meta l4proto udp ct status dnat "
        "ct original proto-dst @protected_udp jump service_gate",
        f"add rule {t} forward_gate ip daddr . meta l4proto . th dport @direct4 jump service_gate",
        f"add rule {t} forward_gate ip6 daddr . meta l4proto . th dport @direct6 jump service_gate",
        f"add rule {t} service_gate ct state established,related accept",
        f"add rule {t} service_gate ip saddr @allow4 accept",
        f"add rule {t} service_gate ip6 saddr @allow6 accept",
        f"add rule {t} service_gate ct mark & {GRANTED_MARK} == {GRANTED_MARK} accept",
        f"add rule {t} service_gate meta l4proto tcp reject with tcp reset",
        f"add rule {t} service_gate drop",
    ]
    return "\n".join(lines) + "\n"


def _grant_elements(address: str, ports: tuple[Step, ...], seconds: float | None) -> str:
    timeout = "" if seconds is None else f" timeout {_timeout(seconds)}"
    return _elements(tuple(f"{address} . {step.proto} . {step.port}{timeout}" for step in ports))


def grant_script(address: str, ports: tuple[Step, ...], seconds: float) -> str:
    """Add (or refresh) the grant; deleting first makes a re-grant take the new timeout."""
    name = GRANT_SETS[_family(address)][0]
    t = f"{FAMILY} {TABLE}"
    return (
        f"add element {t} {name} {_grant_elements(address, ports, seconds)}\n"
        f"delete element {t} {name} {_grant_elements(address, ports, None)}\n"
        f"add element {t} {name} {_grant_elements(address, ports, seconds)}\n"
    )


def revoke_script(address: str, ports: tuple[Step, ...]) -> str:
    """Delete the grant; the leading add makes a missing element not an error."""
    name = GRANT_SETS[_family(address)][0]
    t = f"{FAMILY} {TABLE}"
    return (
        f"add element {t} {name} {_grant_elements(address, ports, 1.0)}\n"
        f"delete element {t} {name} {_grant_elements(address, ports, None)}\n"
    )


def teardown_script() -> str:
    """Idempotent: adding the table first makes the delete succeed when it is absent."""
    return f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"


def direct_script(entries: tuple[tuple[str, Step], ...]) -> str:
    """Replace the service containers' addresses (both families) in one batch."""
    t = f"{FAMILY} {TABLE}"
    lines = [f"flush set {t} {name}" for name, _ in DIRECT_SETS.values()]
    for version, (name, _) in DIRECT_SETS.items():
        items = tuple(
            f"{address} . {step.proto} . {step.port}"
            for address, step in entries
            if _family(address) == version
        )
        if items:
            lines.append(f"add element {t} {name} {_elements(items)}")
    return "\n".join(lines) + "\n"
