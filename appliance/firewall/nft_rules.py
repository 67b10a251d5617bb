"""knockgate's nftables ruleset, built as data (nft script text) by pure functions.

One table, ``inet knockgate``; nothing else is ever touched. The setup batch is
idempotent and atomic (one ``nft -f`` transaction) and converges from whatever
it finds (:func:`setup_script` takes the table as :func:`table_objects` read it):

* the grant and direct sets are only ``add``-ed, so a restart keeps every grant
  still within its deadline (their elements carry kernel timeouts);
* every chain and every other set is deleted and created again, all in the same
  transaction, so a changed rule, hook, priority, policy or set type is undone;
* when that cannot be done in place (the table is dormant or holds objects that
  are not knockgate's, a grant or direct set was replaced by one of another
  definition) the whole table is deleted and created again, still in the same
  transaction, and the grants that carry a timeout are added back with what is
  left of it (an element without one would never expire: it is dropped).

Input chain at ``priority filter - 10``, so it runs before Docker's and the
distribution's chains; a reject or drop here is final whatever they accept.

Drift: :func:`table_objects` turns ``nft --terse list ruleset inet`` (no set
elements fetched, whatever the sets hold) into one definition per object of the
table, without counter values; :func:`drift` compares two of them. The backend
keeps the one read right after its setup.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Mapping, Sequence

from appliance.core.model import Step
from appliance.firewall import FirewallPlan, GrantEntry, ScanPolicy

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
# Every chain, in the order they are created; base chains with their hook.
CHAINS = {
    "input": "type filter hook input priority filter - 10; policy accept;",
    "scan": "",
    "gate": "",
    "mark_grants": "type filter hook prerouting priority dstnat - 10; policy accept;",
    "forward_gate": "type filter hook forward priority filter - 10; policy accept;",
    "service_gate": "",
}
# The sets setup keeps (their elements are state), with what they are created as.
KEPT_SETS = {
    **{name: (kind, True) for name, kind in GRANT_SETS.values()},
    **{name: (kind, False) for name, kind in DIRECT_SETS.values()},
}
# Every set knockgate may have (the scan sets only with a scan policy).
OUR_SETS = (
    *KEPT_SETS,
    *("protected_tcp", "protected_udp", "allow4", "allow6"),
    *(f"{kind}{version}" for kind in ("ports_seen", "scan_rate", "held") for version in (4, 6)),
    *("knock_tcp", "knock_udp"),
)
# The sets whose elements check() compares (small, and changed only by setup or set_direct);
# the grant and scan sets change all the time and can be large.
CHECKED_SETS = (
    "protected_tcp",
    "protected_udp",
    "allow4",
    "allow6",
    "knock_tcp",
    "knock_udp",
    *(name for name, _ in DIRECT_SETS.values()),
)


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


def setup_script(
    plan: FirewallPlan,
    live: Mapping[str, str] | None = None,
    grants: Sequence[GrantEntry] = (),
    direct: Sequence[tuple[str, Step]] | None = None,
) -> str:
    """The whole table as one transaction, from ``live`` (:func:`table_objects` of the
    table as it is; empty or None: there is none) to ``plan``.

    ``grants`` (what is left of each, see :func:`carried_grants`) are added back only
    when the table has to be re-created (:func:`recreate_reasons`); otherwise the
    grant sets stay as they are. ``direct`` replaces the direct sets' contents; None
    keeps what they hold (a re-created table then has them empty).
    """
    t = f"{FAMILY} {TABLE}"
    live = live or {}
    lines = [f"add table {t}"]
    recreate = bool(recreate_reasons(live))
    if recreate:  # dormant, or holding what cannot be undone in place
        lines += [f"delete table {t}", f"add table {t}"]
        live = {}
    for name, (kind, timeout) in KEPT_SETS.items():
        flags = " flags timeout;" if timeout else ""
        lines.append(f"add set {t} {name} {{ type {kind};{flags} }}")
    # Every chain emptied first (a jump or a set reference would keep the others),
    # then deleted and created again: a changed hook, priority or policy is undone too.
    for chain in CHAINS:
        lines += [f"add chain {t} {chain}", f"flush chain {t} {chain}"]
    for chain, spec in CHAINS.items():
        lines.append(f"delete chain {t} {chain}")
        lines.append(f"add chain {t} {chain}" + (f" {{ {spec} }}" if spec else ""))
    rebuilt: list[tuple[str, str]] = [
        ("protected_tcp", "type inet_service;"),
        ("protected_udp", "type inet_service;"),
        ("allow4", "type ipv4_addr; flags interval;"),
        ("allow6", "type ipv6_addr; flags interval;"),
    ]
    if plan.scan is not None:
        rebuilt += _scan_sets(plan.scan)
    rebuilt_names = {name for name, _ in rebuilt}
    for key in live:  # sets of ours that this plan no longer has (scan turned off)
        kind, _, name = key.partition(" ")
        if kind == "set" and name not in KEPT_SETS and name not in rebuilt_names:
            lines.append(f"delete set {t} {name}")
    for name, spec in rebuilt:
        if f"set {name}" in live:
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
    if direct is not None:
        lines += [f"flush set {t} {name}" for name, _ in DIRECT_SETS.values() if not recreate]
        for version, (name, _) in DIRECT_SETS.items():
            elements.append((name, _direct_items(tuple(dict.fromkeys(direct)), version)))
    if recreate:
        for version, (name, _) in GRANT_SETS.items():
            items = tuple(
                f"{g.address} . {g.step.proto} . {g.step.port} timeout {_timeout(g.expires_in)}"
                for g in grants
                if _family(g.address) == version
            )
            elements.append((name, items))
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


def _direct_items(entries: Sequence[tuple[str, Step]], version: int) -> tuple[str, ...]:
    """The direct set elements of one IP version: ``address . proto . port``."""
    return tuple(
        f"{address} . {step.proto} . {step.port}"
        for address, step in entries
        if _family(address) == version
    )


def direct_script(entries: tuple[tuple[str, Step], ...]) -> str:
    """Replace the service containers' addresses (both families) in one batch."""
    t = f"{FAMILY} {TABLE}"
    lines = [f"flush set {t} {name}" for name, _ in DIRECT_SETS.values()]
    for version, (name, _) in DIRECT_SETS.items():
        items = _direct_items(entries, version)
        if items:
            lines.append(f"add element {t} {name} {_elements(items)}")
    return "\n".join(lines) + "\n"


# -- what the kernel holds -------------------------------------------------------------------

# What traffic changes inside an object, not part of its definition.
_COUNTER = re.compile(r"\bcounter packets \d+ bytes \d+")
_QUOTA_USED = re.compile(r" used \d+ \w+")
_NAMED_COUNTER = re.compile(r"packets \d+ bytes \d+")
# A chain's own lines, printed before its rules.
_CHAIN_PROPERTY = re.compile(r"(type|policy|comment|devices) ")


def _definition_line(line: str) -> str:
    return _QUOTA_USED.sub("", _COUNTER.sub("counter", line))


def table_objects(listing: str) -> dict[str, str]:
    """knockgate's table in ``nft --terse list ruleset`` text, as key -> definition.

    Keys: ``table`` (its flags and comment), ``chain NAME`` (hook, priority,
    policy), ``rule CHAIN #N`` (N from 1, in order), ``KIND NAME`` for sets and any
    other object. Definitions are nft's own lines without counter values (the
    terse listing has no set elements): what setup decides, not what traffic
    does. Other tables are left out. Empty: no table. Text, not JSON: nft 1.0.6's
    JSON output of a table with one flag (dormant) reads freed memory, which
    in-process corrupts the daemon's heap.
    """
    lines = iter(listing.splitlines())
    if f"table {FAMILY} {TABLE} {{" not in lines:  # (consumes the lines up to it)
        return {}
    objects = {"table": ""}
    properties: list[str] = []
    block: tuple[str, str, list[str]] | None = None
    for line in lines:
        text = _definition_line(line.strip())
        if not text:
            continue
        if line == "}":  # the end of the table
            objects["table"] = "; ".join(properties)
            return objects
        if line.startswith("\t\t"):
            if block is None:
                raise ValueError(f"nft listing: {text!r} outside any block")
            block[2].append(text)
        elif text == "}" and block is not None:
            _add_block(objects, *block)
            block = None
        elif text.endswith(" {") and block is None:
            kind, _, name = text[:-2].rpartition(" ")
            block = (kind, name, [])
        else:
            properties.append(text)
    raise ValueError("nft listing: the table does not end")


def _add_block(objects: dict[str, str], kind: str, name: str, lines: list[str]) -> None:
    if kind != "chain":
        objects[f"{kind} {name}"] = "; ".join(
            line for line in lines if not _NAMED_COUNTER.fullmatch(line)
        )
        return
    count = 0
    while count < len(lines) and _CHAIN_PROPERTY.match(lines[count]):
        count += 1
    objects[f"chain {name}"] = "; ".join(lines[:count])
    for number, rule in enumerate(lines[count:], 1):
        objects[f"rule {name} #{number}"] = rule


def set_elements(listing: str) -> str:
    """The elements of the set in ``nft list set`` text, sorted (empty: none)."""
    body = listing.split("elements = {", 1)
    if len(body) < 2:
        return ""
    items = (item.strip() for item in body[1].split("}", 1)[0].split(","))
    return ", ".join(sorted(item for item in items if item))


def kept_set_definition(name: str) -> str:
    """A grant or direct set as :func:`table_objects` shows it when setup made it."""
    kind, timeout = KEPT_SETS[name]
    return f"type {kind}; flags timeout" if timeout else f"type {kind}"


def recreate_reasons(live: Mapping[str, str]) -> list[str]:
    """Why the table cannot be set right in place (empty: it can).

    Table flags (dormant: ``add table`` need not clear it), objects that are not
    knockgate's (deleting them one by one would need each kind's syntax), a grant
    or direct set of another definition (it must go, and its elements with it).
    """
    if "table" not in live:
        return []
    reasons = []
    if live["table"]:
        reasons.append(f"table {live['table']}")
    for key in live:
        kind, _, name = key.partition(" ")
        if kind in ("table", "rule", "elements") or (kind == "chain" and name in CHAINS):
            continue
        if kind == "set" and name in KEPT_SETS:
            if live[key] != kept_set_definition(name):
                reasons.append(f"set {name} replaced ({live[key]})")
        elif not (kind == "set" and name in OUR_SETS):
            reasons.append(f"{key} is not knockgate's")
    return reasons


def carried_grants(grants: Sequence[GrantEntry], spent: float) -> list[GrantEntry]:
    """The grants to add back to a re-created table: those with a kernel deadline, each
    for what was left of it when it was read minus ``spent`` (never longer); an element
    without a timeout would never expire, so it is dropped (fail closed)."""
    carried = []
    for grant in grants:
        left = grant.expires_in - spent
        if left >= 0.001:
            carried.append(GrantEntry(grant.address, grant.step, left))
    return carried


def drift(expected: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """What differs between two :func:`table_objects` (plus elements), one line each;
    a chain's rules are compared as a sequence, so one inserted rule is one line."""
    if "table" in expected and "table" not in actual:
        return ["table missing"]
    problems = []
    for key, value in expected.items():
        if key.startswith("rule "):
            continue
        if key not in actual:
            problems.append(f"{key} missing")
        elif actual[key] != value:
            problems.append(f"{key} changed: {_short(actual[key])}")
    problems += [
        f"{key} added: {_short(actual[key])}"
        for key in actual
        if key not in expected and not key.startswith("rule ")
    ]
    want, have = _rules(expected), _rules(actual)
    for chain in dict.fromkeys([*want, *have]):
        old, new = want.get(chain, []), have.get(chain, [])
        matcher = difflib.SequenceMatcher(a=old, b=new, autojunk=False)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag in ("replace", "delete"):
                span = f"rule {i1 + 1}" if i2 - i1 == 1 else f"rules {i1 + 1}-{i2}"
                problems.append(f"chain {chain}: {span} of {len(old)} missing")
            if tag in ("replace", "insert"):
                problems += [
                    f"chain {chain}: rule added at {j + 1}: {_short(new[j])}" for j in range(j1, j2)
                ]
    return problems


def _rules(objects: Mapping[str, str]) -> dict[str, list[str]]:
    """Each chain's rules in order, from the ``rule CHAIN #N`` keys."""
    chains: dict[str, list[str]] = {}
    for key, value in objects.items():
        if key.startswith("rule "):
            chain = key[len("rule ") :].rsplit(" #", 1)[0]
            chains.setdefault(chain, []).append(value)
    return chains


def _short(text: str, limit: int = 160) -> str:
    if not text:
        return "(nothing)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shape_problems(script: str, live: Mapping[str, str]) -> list[str]:
    """Whether ``live`` has what ``script`` (:func:`setup_script`) makes: the table without
    flags, the chains with as many rules each, the sets, nothing else (elements aside)."""
    prefix = f"add rule {FAMILY} {TABLE} "
    counts = dict.fromkeys(CHAINS, 0)
    for line in script.splitlines():
        if line.startswith(prefix):
            chain = line[len(prefix) :].split(" ", 1)[0]
            counts[chain] = counts.get(chain, 0) + 1
    final_sets: set[str] = set()
    for line in script.splitlines():
        words = line.split()
        if words[:2] == ["delete", "table"]:
            final_sets.clear()
        elif words[:2] == ["add", "set"]:
            final_sets.add(words[4])
        elif words[:2] == ["delete", "set"]:
            final_sets.discard(words[4])
    wanted = {"table"} | {f"chain {chain}" for chain in counts} | {f"set {s}" for s in final_sets}
    wanted |= {f"rule {chain} #{n}" for chain, count in counts.items() for n in range(1, count + 1)}
    made = {key for key in live if not key.startswith("elements ")}
    problems = [f"{key} missing" for key in sorted(wanted - made)]
    problems += [f"{key} not made by setup" for key in sorted(made - wanted)]
    if live.get("table"):
        problems.append(f"table {live['table']}")
    return problems
