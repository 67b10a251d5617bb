"""knockgate's nftables ruleset as data: libnftables JSON (the ``nft -j`` schema), built
and read by pure functions.

Every batch is a list of commands (``{"add": {"rule": {...}}}``, ...) that the backend
hands to libnftables as one ``{"nftables": [...]}`` document: one transaction.

One table, ``inet knockgate``; nothing else is ever touched. The setup batch is
idempotent and converges from whatever it finds (:func:`setup_batch` takes the table
as :func:`table_objects` read it):

* the grant and direct sets are only ``add``-ed, so a restart keeps every grant
  still within its deadline (their elements carry kernel timeouts);
* every chain and every other set is deleted and created again, all in the same
  transaction, so a changed rule, hook, priority, policy or set type is undone;
* when that cannot be done in place (the table has flags (dormant) or holds objects
  that are not knockgate's, a grant or direct set was replaced by one of another
  definition) the whole table is deleted and created again, still in the same
  transaction, and the grants that carry a timeout are added back with what is
  left of it (an element without one would never expire: it is dropped).

Input chain at ``priority filter - 10`` (-10), so it runs before Docker's and the
distribution's chains; a reject or drop here is final whatever they accept.

Durations are whole seconds: nft 1.0.6's JSON parser reads ``timeout`` as an integer
number of seconds and takes anything else (0, 1.5, "5s") as *no timeout*, an element
that never expires. So every timeout written here is an ``int`` of at least 1, rounded
down (a grant never lasts longer than asked), and a grant of less than one second
opens nothing.

Drift: :func:`table_objects` turns a JSON listing of the table (terse: no set
elements, stateless: no counter values) into one definition per object, each the
object's JSON without its handle; :func:`drift` compares two of them. The backend
keeps the one read right after its setup.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from appliance.core.model import Proto, Step
from appliance.firewall import FirewallPlan, GrantEntry, ScanPolicy, grant_seconds

JSON = dict[str, Any]
Batch = list[JSON]

TABLE = "knockgate"
FAMILY = "inet"
SET_SIZE = 65536

ADDRESS_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
SADDR = {4: ("ip", "saddr"), 6: ("ip6", "saddr")}
DADDR = {4: ("ip", "daddr"), 6: ("ip6", "daddr")}
GRANT_SETS = {4: "grants4", 6: "grants6"}
# Service containers' own (address . protocol . port): reached directly, past the host port.
DIRECT_SETS = {4: "direct4", 6: "direct6"}
# A connection whose first packet matched a grant, before Docker's DNAT rewrote its port.
GRANTED_MARK = 0x4B000000
# Every chain, in the order they are created; base chains with their hook.
# Priorities: filter = 0, dstnat = -100 (so "filter - 10" is -10, "dstnat - 10" -110).
CHAINS: dict[str, JSON] = {
    "input": {"type": "filter", "hook": "input", "prio": -10, "policy": "accept"},
    "scan": {},
    "gate": {},
    "mark_grants": {"type": "filter", "hook": "prerouting", "prio": -110, "policy": "accept"},
    "forward_gate": {"type": "filter", "hook": "forward", "prio": -10, "policy": "accept"},
    "service_gate": {},
}
# The sets setup keeps (their elements are state): name -> (type, flags).
KEPT_SETS: dict[str, tuple[list[str], list[str]]] = {
    **{
        name: ([ADDRESS_TYPE[v], "inet_proto", "inet_service"], ["timeout"])
        for v, name in GRANT_SETS.items()
    },
    **{
        name: ([ADDRESS_TYPE[v], "inet_proto", "inet_service"], [])
        for v, name in DIRECT_SETS.items()
    },
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
    *DIRECT_SETS.values(),
)


def _family(address: str) -> int:
    return ipaddress.ip_address(address).version


def whole_seconds(seconds: float) -> int:
    """A JSON timeout: whole seconds, rounded down (never longer); 0 when less than one
    second is left (the caller must not write it: nft takes 0 as *no timeout*)."""
    return max(0, math.floor(seconds))


def _set_timeout(seconds: float) -> int:
    """A set's default timeout: never below 1 s (0 would mean entries never expire)."""
    return max(1, whole_seconds(seconds))


# -- building blocks of the schema ---------------------------------------------------------


def _table() -> JSON:
    return {"family": FAMILY, "name": TABLE}


def _in_table(**fields: Any) -> JSON:
    return {"family": FAMILY, "table": TABLE, **fields}


def _command(verb: str, kind: str, spec: JSON) -> JSON:
    return {verb: {kind: spec}}


def _match(left: Any, right: Any, op: str = "==") -> JSON:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, field: str) -> JSON:
    return {"payload": {"protocol": protocol, "field": field}}


def _meta(key: str) -> JSON:
    return {"meta": {"key": key}}


def _ct(key: str, direction: str | None = None) -> JSON:
    return {"ct": {"key": key, **({"dir": direction} if direction else {})}}


def _concat(*items: Any) -> JSON:
    return {"concat": list(items)}


ACCEPT: JSON = {"accept": None}
DROP: JSON = {"drop": None}
RETURN: JSON = {"return": None}
RESET: JSON = {"reject": {"type": "tcp reset"}}


def _jump(chain: str) -> JSON:
    return {"jump": {"target": chain}}


def _rule(chain: str, *expr: JSON) -> JSON:
    return _command("add", "rule", _in_table(chain=chain, expr=list(expr)))


def _set(name: str, kind: str | list[str], flags: Sequence[str] = (), **extra: Any) -> JSON:
    spec = _in_table(name=name, type=kind)
    if flags:
        spec["flags"] = list(flags)
    return _command("add", "set", {**spec, **extra})


def _add_elements(name: str, items: Sequence[Any]) -> JSON:
    return _command("add", "element", _in_table(name=name, elem=list(items)))


def _element(address: str, proto: str, port: int, timeout: int | None = None) -> Any:
    value = _concat(address, proto, port)
    return value if timeout is None else {"elem": {"val": value, "timeout": timeout}}


def _network(text: str) -> JSON:
    net = ipaddress.ip_network(text, strict=False)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _port_ranges(ranges: tuple[tuple[int, int], ...]) -> list[Any]:
    return [low if low == high else {"range": [low, high]} for low, high in ranges]


# -- the batches ---------------------------------------------------------------------------


def _scan_sets(scan: ScanPolicy) -> Batch:
    window, hold = _set_timeout(scan.window), _set_timeout(scan.hold)
    dynamic = ["timeout"]  # nft makes them dynamic: rules add to them
    return [
        *(
            _set(f"ports_seen{v}", [kind, "inet_service"], dynamic, size=SET_SIZE, timeout=window)
            for v, kind in ADDRESS_TYPE.items()
        ),
        *(
            _set(f"scan_rate{v}", kind, dynamic, size=SET_SIZE, timeout=window)
            for v, kind in ADDRESS_TYPE.items()
        ),
        *(
            _set(f"held{v}", kind, dynamic, size=SET_SIZE, timeout=hold)
            for v, kind in ADDRESS_TYPE.items()
        ),
        # The doors' own knock ports: never counted (a long knock is not a scan).
        _set("knock_tcp", "inet_service", ["interval"]),
        _set("knock_udp", "inet_service", ["interval"]),
    ]


def _scan_rules(scan: ScanPolicy) -> Batch:
    rate = max(1, math.ceil(scan.ports / scan.window))
    rules = [
        _rule(
            "scan",
            _match(_meta("l4proto"), "tcp"),
            _match(_payload("tcp", "dport"), "@knock_tcp"),
            RETURN,
        ),
        _rule(
            "scan",
            _match(_meta("l4proto"), "udp"),
            _match(_payload("udp", "dport"), "@knock_udp"),
            RETURN,
        ),
    ]
    for v in (4, 6):
        saddr = _payload(*SADDR[v])
        seen = _concat(saddr, _payload("th", "dport"))
        limit = {"limit": {"rate": rate, "burst": scan.ports, "per": "second", "inv": True}}
        rules.append(_rule("scan", _match(seen, f"@ports_seen{v}"), RETURN))
        rules.append(
            _rule(
                "scan",
                _match(_meta("nfproto"), f"ipv{v}"),
                {"set": {"op": "add", "elem": seen, "set": f"@ports_seen{v}"}},
                {"set": {"op": "update", "elem": saddr, "set": f"@scan_rate{v}", "stmt": [limit]}},
                {"set": {"op": "add", "elem": saddr, "set": f"@held{v}"}},
            )
        )
    return rules


def _granted(v: int) -> JSON:
    return _match(
        _concat(_payload(*SADDR[v]), _meta("l4proto"), _payload("th", "dport")), f"@grants{v}"
    )


def _gate_rules(plan: FirewallPlan) -> Batch:
    established = _match(_ct("state"), ["established", "related"], "in")
    allowed = [_match(_payload(*SADDR[v]), f"@allow{v}") for v in (4, 6)]
    tcp = _match(_meta("l4proto"), "tcp")
    mark = _ct("mark")
    rules = [_rule("input", _match(_meta("iif"), "lo"), ACCEPT)]
    if plan.scan is not None:
        new = _match(_ct("state"), "new", "in")
        rules.append(
            _rule("input", new, _match(_meta("l4proto"), {"set": ["tcp", "udp"]}), _jump("scan"))
        )
        rules += _scan_rules(plan.scan)
    for proto in ("tcp", "udp"):
        port = _match(_payload(proto, "dport"), f"@protected_{proto}")
        rules.append(_rule("input", _match(_meta("l4proto"), proto), port, _jump("gate")))
    rules += [
        _rule("gate", established, ACCEPT),
        *(_rule("gate", match, ACCEPT) for match in allowed),
        *(_rule("gate", _granted(v), ACCEPT) for v in (4, 6)),
        _rule("gate", tcp, RESET),
        _rule("gate", DROP),
    ]
    # Published container ports: Docker DNATs them in prerouting and routes them
    # through FORWARD, past INPUT. Mark granted connections before the DNAT, then
    # gate forwarded traffic by its original port, and direct traffic to the
    # service containers' own addresses, on that mark.
    rules += [
        _rule(
            "mark_grants",
            _match(_ct("state"), "new", "in"),
            _granted(v),
            {"mangle": {"key": mark, "value": {"|": [mark, GRANTED_MARK]}}},
        )
        for v in (4, 6)
    ]
    # Only rewritten connections (ct status dnat): a container's own outgoing connection
    # to a remote port that happens to be protected here is not ours to gate.
    for proto in ("tcp", "udp"):
        rules.append(
            _rule(
                "forward_gate",
                _match(_meta("l4proto"), proto),
                _match(_ct("status"), "dnat", "in"),
                _match(_ct("proto-dst", "original"), f"@protected_{proto}"),
                _jump("service_gate"),
            )
        )
    for v in (4, 6):
        direct = _concat(_payload(*DADDR[v]), _meta("l4proto"), _payload("th", "dport"))
        rules.append(_rule("forward_gate", _match(direct, f"@direct{v}"), _jump("service_gate")))
    rules += [
        _rule("service_gate", established, ACCEPT),
        *(_rule("service_gate", match, ACCEPT) for match in allowed),
        _rule("service_gate", _match({"&": [mark, GRANTED_MARK]}, GRANTED_MARK), ACCEPT),
        _rule("service_gate", tcp, RESET),
        _rule("service_gate", DROP),
    ]
    return rules


def setup_batch(
    plan: FirewallPlan,
    live: Mapping[str, str] | None = None,
    grants: Sequence[GrantEntry] = (),
    direct: Sequence[tuple[str, Step]] | None = None,
) -> Batch:
    """The whole table as one transaction, from ``live`` (:func:`table_objects` of the
    table as it is; empty or None: there is none) to ``plan``.

    ``grants`` (what is left of each, see :func:`carried_grants`) are added back only
    when the table has to be re-created (:func:`recreate_reasons`); otherwise the
    grant sets stay as they are. ``direct`` replaces the direct sets' contents; None
    keeps what they hold (a re-created table then has them empty).
    """
    live = live or {}
    batch = [_command("add", "table", _table())]
    recreate = bool(recreate_reasons(live))
    if recreate:  # flags (dormant), or holding what cannot be undone in place
        batch += [_command("delete", "table", _table()), _command("add", "table", _table())]
        live = {}
    for name, (key_type, flags) in KEPT_SETS.items():
        batch.append(_set(name, key_type, flags))
    # Every chain emptied first (a jump or a set reference would keep the others),
    # then deleted and created again: a changed hook, priority or policy is undone too.
    for chain in CHAINS:
        batch.append(_command("add", "chain", _in_table(name=chain)))
        batch.append(_command("flush", "chain", _in_table(name=chain)))
    for chain, spec in CHAINS.items():
        batch.append(_command("delete", "chain", _in_table(name=chain)))
        batch.append(_command("add", "chain", _in_table(name=chain, **spec)))
    rebuilt: Batch = [
        _set("protected_tcp", "inet_service"),
        _set("protected_udp", "inet_service"),
        _set("allow4", "ipv4_addr", ["interval"]),
        _set("allow6", "ipv6_addr", ["interval"]),
    ]
    if plan.scan is not None:
        rebuilt += _scan_sets(plan.scan)
    rebuilt_names = [command["add"]["set"]["name"] for command in rebuilt]
    for key in live:  # sets of ours that this plan no longer has (scan turned off)
        kind, _, name = key.partition(" ")
        if kind == "set" and name not in KEPT_SETS and name not in rebuilt_names:
            batch.append(_command("delete", "set", _in_table(name=name)))
    for name, command in zip(rebuilt_names, rebuilt, strict=True):
        if f"set {name}" in live:
            batch.append(_command("delete", "set", _in_table(name=name)))
        batch.append(command)
    elements: list[tuple[str, list[Any]]] = [
        ("protected_tcp", list(plan.ports("tcp"))),
        ("protected_udp", list(plan.ports("udp"))),
        ("allow4", [_network(net) for net in plan.networks(4)]),
        ("allow6", [_network(net) for net in plan.networks(6)]),
    ]
    if plan.scan is not None:
        elements += [
            ("knock_tcp", _port_ranges(plan.knock_ranges("tcp"))),
            ("knock_udp", _port_ranges(plan.knock_ranges("udp"))),
        ]
    if direct is not None:
        if not recreate:
            batch += [_command("flush", "set", _in_table(name=n)) for n in DIRECT_SETS.values()]
        for v, name in DIRECT_SETS.items():
            elements.append((name, _direct_items(tuple(dict.fromkeys(direct)), v)))
    if recreate:
        for v, name in GRANT_SETS.items():
            items = [
                _element(g.address, g.step.proto, g.step.port, whole_seconds(g.expires_in))
                for g in grants
                if _family(g.address) == v and whole_seconds(g.expires_in) >= 1
            ]
            elements.append((name, items))
    batch += [_add_elements(name, items) for name, items in elements if items]
    return batch + _gate_rules(plan)


def grant_batch(address: str, ports: tuple[Step, ...], seconds: float) -> Batch:
    """Add (or refresh) the grant for ``grant_seconds(seconds)``; deleting first makes a
    re-grant take the new timeout. Empty when that is under one second: nothing opens."""
    timeout = grant_seconds(seconds)
    if not ports or timeout < 1:
        return []
    name = GRANT_SETS[_family(address)]
    timed = [_element(address, step.proto, step.port, timeout) for step in ports]
    plain = [_element(address, step.proto, step.port) for step in ports]
    return [
        _add_elements(name, timed),
        _command("delete", "element", _in_table(name=name, elem=plain)),
        _add_elements(name, timed),
    ]


def revoke_batch(address: str, ports: tuple[Step, ...]) -> Batch:
    """Delete the grant; the leading add makes a missing element not an error."""
    if not ports:
        return []
    name = GRANT_SETS[_family(address)]
    return [
        _add_elements(name, [_element(address, step.proto, step.port, 1) for step in ports]),
        _command(
            "delete",
            "element",
            _in_table(name=name, elem=[_element(address, s.proto, s.port) for s in ports]),
        ),
    ]


def teardown_batch() -> Batch:
    """Idempotent: adding the table first makes the delete succeed when it is absent."""
    return [_command("add", "table", _table()), _command("delete", "table", _table())]


def _direct_items(entries: Sequence[tuple[str, Step]], version: int) -> list[Any]:
    """The direct set elements of one IP version: ``address . proto . port``."""
    return [
        _element(address, step.proto, step.port)
        for address, step in entries
        if _family(address) == version
    ]


def direct_batch(entries: tuple[tuple[str, Step], ...]) -> Batch:
    """Replace the service containers' addresses (both families) in one batch."""
    batch = [_command("flush", "set", _in_table(name=name)) for name in DIRECT_SETS.values()]
    for v, name in DIRECT_SETS.items():
        items = _direct_items(entries, v)
        if items:
            batch.append(_add_elements(name, items))
    return batch


def list_ruleset() -> Batch:
    return [{"list": {"ruleset": {"family": FAMILY}}}]


def list_table() -> Batch:
    return [{"list": {"table": _table()}}]


def list_set(name: str) -> Batch:
    return [{"list": {"set": _in_table(name=name)}}]


def list_sets() -> Batch:
    return [{"list": {"sets": {"family": FAMILY}}}]


# -- what the kernel holds -------------------------------------------------------------------

# Keys of an object's JSON that are not part of its definition: who it is, where it
# sits, and what traffic did to it.
_IDENTITY = {"family", "table", "name", "handle", "chain", "index"}
_STATE = {"packets", "bytes", "used", "elem"}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _definition(spec: JSON) -> str:
    """An object's JSON without identity and state; "" when nothing is left."""
    rest = {k: v for k, v in spec.items() if k not in _IDENTITY and k not in _STATE}
    return _canonical(rest) if rest else ""


def _without_counts(value: Any) -> Any:
    """A rule's expressions without counter values (``{"counter": null}`` when stateless)."""
    if isinstance(value, dict):
        if set(value) == {"counter"} and isinstance(value["counter"], dict):
            return {"counter": None}
        return {k: _without_counts(v) for k, v in value.items() if k not in ("packets", "bytes")}
    if isinstance(value, list):
        return [_without_counts(item) for item in value]
    return value


def table_objects(listing: Sequence[JSON], flags: str = "") -> dict[str, str]:
    """knockgate's table in a JSON listing, as key -> definition.

    Keys: ``table`` (its flags and comment), ``chain NAME`` (hook, priority,
    policy), ``rule CHAIN #N`` (N from 1, in order), ``KIND NAME`` for sets and any
    other object. Definitions are the objects' JSON without handles and counter
    values (the terse listing has no set elements): what setup decides, not what
    traffic does. Other tables are left out. Empty: no table. ``flags``: the table's
    flags as netlink read them, for a table that was not listed (see :mod:`libnft`).
    """
    if flags:
        return {"table": f"flags {flags}"}
    objects: dict[str, str] = {}
    counts: dict[str, int] = {}
    for item in listing:
        for kind, spec in item.items():
            if not isinstance(spec, dict) or spec.get("family") != FAMILY:
                continue
            if kind == "table":
                if spec.get("name") == TABLE:
                    objects["table"] = _definition(spec)
                continue
            if spec.get("table") != TABLE:
                continue
            if kind == "rule":
                chain = str(spec.get("chain"))
                counts[chain] = counts.get(chain, 0) + 1
                rest = {k: v for k, v in spec.items() if k not in _IDENTITY}
                objects[f"rule {chain} #{counts[chain]}"] = _canonical(_without_counts(rest))
            else:
                objects[f"{kind} {spec.get('name')}"] = _definition(spec)
    return objects if "table" in objects else {}


def _elements_of(listing: Sequence[JSON], name: str) -> list[Any]:
    for item in listing:
        spec = item.get("set")
        if isinstance(spec, dict) and spec.get("name") == name:
            elements = spec.get("elem", [])
            return elements if isinstance(elements, list) else []
    return []


def set_elements(listing: Sequence[JSON], name: str) -> str:
    """The elements of set ``name`` in a ``list set`` listing, sorted (empty: none)."""
    return ", ".join(sorted(_canonical(element) for element in _elements_of(listing, name)))


def grant_entries(listing: Sequence[JSON], name: str) -> list[GrantEntry]:
    """The ``address . proto . port`` elements of set ``name``, with what is left of their
    timeouts in whole seconds (nft's JSON has no finer; 0: none). Elements of any other
    shape are skipped."""
    entries = []
    for element in _elements_of(listing, name):
        expires = 0.0
        if isinstance(element, dict) and isinstance(element.get("elem"), dict):
            expires = float(element["elem"].get("expires", 0))
            element = element["elem"].get("val")
        if not isinstance(element, dict):
            continue
        parts = element.get("concat")
        if not (isinstance(parts, list) and len(parts) == 3):
            continue
        address, proto, port = parts
        if not (isinstance(address, str) and proto in ("tcp", "udp") and isinstance(port, int)):
            continue
        step_proto: Proto = "udp" if proto == "udp" else "tcp"
        entries.append(GrantEntry(address, Step(port, step_proto), expires))
    return entries


def holds(listing: Sequence[JSON], name: str, address: str) -> bool:
    """Whether set ``name`` (an address set) holds ``address``."""
    wanted = str(ipaddress.ip_address(address))  # as nft prints it (inet_ntop)
    for element in _elements_of(listing, name):  # (60 000 of them under a flood)
        if isinstance(element, dict) and isinstance(element.get("elem"), dict):
            element = element["elem"].get("val")
        if element == wanted:
            return True
    return False


def has_set(listing: Sequence[JSON], name: str) -> bool:
    """Whether a ``list sets`` listing has knockgate's set ``name``."""
    return any(
        isinstance(spec := item.get("set"), dict)
        and spec.get("table") == TABLE
        and spec.get("family") == FAMILY
        and spec.get("name") == name
        for item in listing
    )


def kept_set_definition(name: str) -> str:
    """A grant or direct set as :func:`table_objects` shows it when setup made it."""
    kind, flags = KEPT_SETS[name]
    return _definition({"type": kind, **({"flags": flags} if flags else {})})


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
    for what was left of it when it was read minus ``spent``, in whole seconds (never
    longer); an element without a timeout would never expire, so it is dropped (fail
    closed), and so is one with less than a second left."""
    carried = []
    for grant in grants:
        left = whole_seconds(grant.expires_in - spent)
        if left >= 1:
            carried.append(GrantEntry(grant.address, grant.step, float(left)))
    return carried


def drift(expected: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """What differs between two :func:`table_objects` (plus elements), one line each;
    a chain's rules are compared as a sequence, so one inserted rule is one line."""
    if "table" in expected and "table" not in actual:
        return ["table missing"]
    if actual.get("table", "").startswith("flags ") and len(actual) == 1:
        return [f"table {actual['table']}"]  # not listed (see table_objects)
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


def shape_problems(batch: Batch, live: Mapping[str, str]) -> list[str]:
    """Whether ``live`` has what ``batch`` (:func:`setup_batch`) makes: the table without
    flags, the chains with as many rules each, the sets, nothing else (elements aside)."""
    counts = dict.fromkeys(CHAINS, 0)
    final_sets: set[str] = set()
    for command in batch:
        ((verb, body),) = command.items()
        ((kind, spec),) = body.items()
        if kind == "rule" and verb == "add":
            counts[spec["chain"]] = counts.get(spec["chain"], 0) + 1
        elif kind == "table" and verb == "delete":
            final_sets.clear()
        elif kind == "set" and verb == "add":
            final_sets.add(spec["name"])
        elif kind == "set" and verb == "delete":
            final_sets.discard(spec["name"])
    wanted = {"table"} | {f"chain {chain}" for chain in counts} | {f"set {s}" for s in final_sets}
    wanted |= {f"rule {chain} #{n}" for chain, count in counts.items() for n in range(1, count + 1)}
    made = {key for key in live if not key.startswith("elements ")}
    problems = [f"{key} missing" for key in sorted(wanted - made)]
    problems += [f"{key} not made by setup" for key in sorted(made - wanted)]
    if live.get("table"):
        problems.append(f"table {live['table']}")
    return problems
