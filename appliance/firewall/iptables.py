"""iptables backend: five chains in ``filter``, one in ``mangle``, and ten ipsets.

The same gate as the nftables backend, built from iptables (nf_tables backend)
and ipset, for both IPv4 (``iptables``) and IPv6 (``ip6tables``). Three jumps
are the only rules added to chains knockgate does not own::

    filter INPUT ──(rule 1)──> KNOCKGATE
      KNOCKGATE       -i lo                               RETURN
                      -p tcp|udp, ct state NEW            KNOCKGATE-SCAN   (only with a ScanPolicy)
                      -p tcp, --dports <protected tcp>    KNOCKGATE-GATE   (≤ 15 ports a rule)
                      -p udp, --dports <protected udp>    KNOCKGATE-GATE
      KNOCKGATE-SCAN  -p tcp|udp, --dports <knock ports>  RETURN   (a door's knock is no scan)
                      (src, dport) in seen4               RETURN
                      add (src, dport) to seen4           (entries live <window> s)
                      hashlimit above R/s burst B by src  add src to held4 (lives <hold> s)
      KNOCKGATE-GATE  ct state ESTABLISHED,RELATED        RETURN
                      src in allow4                       RETURN
                      (src, proto:dport) in grants4       RETURN
                      -p tcp                              REJECT tcp-reset   (scanners see "closed")
                                                          DROP

    mangle PREROUTING ──(rule 1)──> KNOCKGATE-MARK        (before any DNAT rewrites the port)
      KNOCKGATE-MARK  ct state NEW, (src, proto:dport) in grants4
                                                          connmark |= 0x4b000000

    filter DOCKER-USER (when Docker made it) or else FORWARD ──(rule 1)──> KNOCKGATE-FWD
      KNOCKGATE-FWD   -p P, ct state NEW, ct original dport D   KNOCKGATE-SVC  (each protected P/D)
                      (dst, proto:dport) in direct4             KNOCKGATE-SVC
      KNOCKGATE-SVC   ct state ESTABLISHED,RELATED        RETURN
                      src in allow4                       RETURN
                      connmark & 0x4b000000               RETURN   (granted before the DNAT)
                      -p tcp                              REJECT tcp-reset
                                                          DROP

The forward path covers Docker-published ports: Docker DNATs them in ``nat
PREROUTING`` and routes them through FORWARD, past INPUT, with the port
rewritten; so the grant is looked up (and remembered in the connection's mark)
in ``mangle PREROUTING``, which runs before NAT, and the forward gate matches
the connection's *original* destination port. The ``direct`` sets hold the
service containers' own (address, proto:port), which a routed peer could reach
without any DNAT (:meth:`IptablesBackend.set_direct`).

Where the forward jump goes: Docker inserts ``-j DOCKER-USER`` at the top of
FORWARD and re-inserts its own accepts above anything else there whenever it
starts, so a FORWARD rule 1 would not stay first; ``DOCKER-USER`` is the chain
Docker leaves to the administrator and runs first. The jump goes into
``DOCKER-USER`` when that chain exists *and* FORWARD jumps to it (a stray
``DOCKER-USER`` that nothing reaches would gate nothing), else into FORWARD at
position 1. :meth:`IptablesBackend.check` is False while the jump is not where
it belongs (Docker started, restarted or re-created its chain), so the daemon's
periodic check re-runs ``setup``, which moves it.

"Let through" is ``RETURN``, not ``ACCEPT``: the nftables backend accepts in a
table of its own, which ends only its own chain, and the host's other rules
(Docker's included) still run; an ``ACCEPT`` here would end the whole built-in
chain and skip them.

Grants live in ``hash:ip,port`` sets whose default timeout is 0 so that every
element carries its own kernel-side deadline; ``setup`` never flushes them, so a
restart keeps the live grants (and the direct sets' contents). The hashlimit
table's name carries the scan parameters: the kernel reuses a hashlimit table by
name *with the parameters it was created with*, so a changed policy under an
unchanged name would keep the old rate.

Everything that turns a :class:`FirewallPlan` into text or commands is a pure
function below, golden-tested without root; :class:`IptablesBackend` only runs
them.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import shlex
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from appliance.core.model import Proto, Step
from appliance.errors import FirewallError
from appliance.firewall import FirewallPlan, GrantEntry, ScanPolicy, grant_seconds

log = logging.getLogger("knockgate.firewall")

Version = Literal[4, 6]
SetKind = Literal["grants", "allow", "seen", "held", "direct"]

VERSIONS: tuple[Version, ...] = (4, 6)
SET_KINDS: tuple[SetKind, ...] = ("grants", "allow", "seen", "held", "direct")
COMMAND_TIMEOUT = 10.0  # seconds, for every subprocess
MULTIPORT_MAX = 15  # ports in one ``-m multiport --dports`` list
IPSET_MAX_TIMEOUT = 2_147_483  # seconds: the largest timeout ipset accepts
PREFIX_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,18}")  # chain ≤ 28, set name ≤ 31
DESTROY_RETRIES = 5  # an ipset whose last rule just went may be busy for a moment
# Grants carried into a rebuilt grants set lose this much more than the time spent
# reading them (the restore runs after their timeouts are written).
CARRY_MARGIN = 0.05  # seconds
# A connection whose first packet matched a grant, before a DNAT rewrote its port
# (the nftables backend's GRANTED_MARK).
GRANTED_MARK = "0x4b000000"
DOCKER_USER = "DOCKER-USER"  # created (and re-created) by dockerd, never by knockgate
DOCKER_USER_JUMP = "-A FORWARD -j DOCKER-USER"  # as dockerd inserts it, as -S prints it


# -- names ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Names:
    """The chain and set names derived from one prefix (``KNOCKGATE``)."""

    prefix: str

    @property
    def chain(self) -> str:
        return self.prefix

    @property
    def scan_chain(self) -> str:
        return f"{self.prefix}-SCAN"

    @property
    def gate_chain(self) -> str:
        return f"{self.prefix}-GATE"

    @property
    def forward_chain(self) -> str:
        return f"{self.prefix}-FWD"

    @property
    def service_chain(self) -> str:
        return f"{self.prefix}-SVC"

    @property
    def mark_chain(self) -> str:
        """In the ``mangle`` table; all the others are in ``filter``."""
        return f"{self.prefix}-MARK"

    @property
    def chains(self) -> tuple[str, str, str, str, str]:
        """knockgate's chains in the ``filter`` table."""
        return (
            self.chain,
            self.scan_chain,
            self.gate_chain,
            self.forward_chain,
            self.service_chain,
        )

    def set(self, kind: SetKind, version: Version) -> str:
        return f"{self.prefix.lower()}-{kind}{version}"

    def all_sets(self) -> tuple[str, ...]:
        return tuple(self.set(kind, version) for version in VERSIONS for kind in SET_KINDS)

    @property
    def jump(self) -> str:
        """The INPUT rule as ``iptables -S`` prints it."""
        return f"-A INPUT -j {self.chain}"

    @property
    def mark_jump(self) -> str:
        """The ``mangle`` PREROUTING rule as ``iptables -t mangle -S`` prints it."""
        return f"-A PREROUTING -j {self.mark_chain}"

    def forward_jump(self, anchor: str) -> str:
        """The jump to the forward gate from ``anchor`` (FORWARD or DOCKER-USER)."""
        return f"-A {anchor} -j {self.forward_chain}"


def temporary(name: str) -> str:
    """The name a set is built under before it is swapped in."""
    return f"{name}-tmp"


def make_names(prefix: str) -> Names:
    if not PREFIX_PATTERN.fullmatch(prefix):
        raise FirewallError(
            f"iptables: bad prefix {prefix!r} (expected a letter, then up to 18 of "
            "letters, digits, '_' and '-')"
        )
    return Names(prefix)


# -- scan parameters -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScanLimits:
    """A :class:`ScanPolicy` in the units iptables and ipset take (whole seconds, ms)."""

    burst: int  # distinct new ports a source may hit at once
    rate: int  # ports per second refilled
    seen_timeout: int  # seconds a (source, port) counts as seen
    hold_timeout: int  # seconds a source is held
    expire_ms: int  # hashlimit entry lifetime, like the nft scan_rate set's timeout

    def hashlimit_name(self, names: Names, version: Version) -> str:
        return f"{names.prefix.lower()}-scan{version}-b{self.burst}r{self.rate}e{self.expire_ms}"


def scan_limits(policy: ScanPolicy) -> ScanLimits:
    """Durations round down like the nft backend's (never longer), to at least 1 unit."""
    return ScanLimits(
        burst=max(1, policy.ports),
        rate=max(1, math.ceil(policy.ports / policy.window)),
        seen_timeout=max(1, math.floor(policy.window)),
        hold_timeout=max(1, math.floor(policy.hold)),
        expire_ms=max(1, math.floor(policy.window * 1000)),
    )


# -- ipsets --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetHeader:
    """What decides whether an existing set can be kept: type, family, default timeout."""

    type: str
    family: str
    timeout: int | None  # None: the set has no timeout support

    def __str__(self) -> str:
        timeout = "no timeout" if self.timeout is None else f"timeout {self.timeout}"
        return f"{self.type} family {self.family or '-'} {timeout}"


@dataclass(frozen=True, slots=True)
class SetSpec:
    name: str
    header: SetHeader

    def create(self, name: str | None = None) -> str:
        """An ``ipset restore`` create line (for ``name``, default the set's own)."""
        line = f"create {name or self.name} {self.header.type} family {self.header.family}"
        if self.header.timeout is not None:
            line += f" timeout {self.header.timeout}"
        return line


def _family(version: Version) -> str:
    return "inet" if version == 4 else "inet6"


def set_specs(names: Names, plan: FirewallPlan, version: Version) -> tuple[SetSpec, ...]:
    """The five sets of one family, in the order ``SET_KINDS``.

    Without a scan policy the scan sets still exist (``is_held`` reads them) with the
    default policy's timeouts.
    """
    limits = scan_limits(plan.scan or ScanPolicy())
    family = _family(version)
    return (
        SetSpec(names.set("grants", version), SetHeader("hash:ip,port", family, 0)),
        SetSpec(names.set("allow", version), SetHeader("hash:net", family, None)),
        SetSpec(names.set("seen", version), SetHeader("hash:ip,port", family, limits.seen_timeout)),
        SetSpec(names.set("held", version), SetHeader("hash:ip", family, limits.hold_timeout)),
        direct_spec(names, version),
    )


def direct_spec(names: Names, version: Version) -> SetSpec:
    """The service containers' (address, proto:port): no timeout, set_direct replaces them."""
    return SetSpec(names.set("direct", version), SetHeader("hash:ip,port", _family(version), None))


def allow_elements(plan: FirewallPlan, version: Version) -> tuple[str, ...]:
    """The always-allowed networks of one family as hash:net elements.

    hash:net refuses a /0, so "everything" becomes its two halves.
    """
    elements: list[str] = []
    for text in plan.networks(version):
        net = ipaddress.ip_network(text, strict=False)
        parts = net.subnets(prefixlen_diff=1) if net.prefixlen == 0 else (net,)
        elements.extend(str(part) for part in parts)
    return tuple(elements)


def parse_set_headers(text: str) -> dict[str, SetHeader]:
    """Parse ``ipset list -t`` (every set's header) into name -> header."""
    headers: dict[str, SetHeader] = {}
    name = kind = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        value = value.strip()
        if key == "Name":
            name, kind = value, ""
        elif key == "Type":
            kind = value
        elif key == "Header" and name:
            words = value.split()
            options = dict(zip(words[::2], words[1::2], strict=False))
            timeout = options.get("timeout")
            headers[name] = SetHeader(
                kind, options.get("family", ""), int(timeout) if timeout is not None else None
            )
    return headers


def ipset_setup_batch(
    names: Names,
    plan: FirewallPlan,
    existing: Mapping[str, SetHeader],
    direct: Sequence[tuple[str, Step]] = (),
    carried: Sequence[GrantEntry] = (),
) -> str:
    """The ``ipset restore`` input that brings the sets in line with ``plan``.

    Missing sets are created; a set whose timeout differs is rebuilt under a
    temporary name and swapped in (swap works while rules use it, but only
    between sets of one type and family); a set of another type or family is
    destroyed and created again (it cannot be in use: whoever made it had to
    remove knockgate's rules that used the old one to destroy that). The allow
    sets are refilled by a swap, so the swap is their only visible change.
    Grants in a matching grants set are kept, and so are the entries of a
    matching direct set; a grants set that is created or rebuilt gets
    ``carried`` (:func:`carried_grants`), a direct set ``direct`` (what
    :meth:`IptablesBackend.set_direct` last set).
    """
    lines: list[str] = []
    for version in VERSIONS:
        for spec in set_specs(names, plan, version):
            tmp = temporary(spec.name)
            if tmp in existing:  # left over from an interrupted setup
                lines.append(f"destroy {tmp}")
            if spec.name == names.set("allow", version):
                elements = allow_elements(plan, version)
            elif spec.name == names.set("direct", version):
                elements = direct_elements(direct, version)
            elif spec.name == names.set("grants", version):
                elements = tuple(
                    f"{_element(g.address, g.step)} timeout {grant_timeout(g.expires_in)}"
                    for g in carried
                    if _ip(g.address).version == version
                )
            else:
                elements = ()
            current = existing.get(spec.name)
            if current is not None and (current.type, current.family) != (
                spec.header.type,
                spec.header.family,
            ):
                lines.append(f"destroy {spec.name}")
                current = None
            if current is None:
                lines.append(spec.create())
                lines.extend(f"add {spec.name} {element}" for element in elements)
            elif current != spec.header or spec.name == names.set("allow", version):
                lines.append(spec.create(tmp))
                lines.extend(f"add {tmp} {element}" for element in elements)
                lines += [f"swap {tmp} {spec.name}", f"destroy {tmp}"]
    return "".join(line + "\n" for line in lines)


def carried_grants(save_text: str, spent: float) -> list[GrantEntry]:
    """The grants of a replaced grants set (``ipset save`` of it) worth keeping: those
    with a timeout, each for the whole seconds left after ``spent`` (never longer; an
    element without a timeout would never expire, so it is dropped: fail closed)."""
    carried = []
    for entry in parse_grants(save_text):
        left = math.floor(entry.expires_in - spent)
        if entry.expires_in > 0 and left >= 1:
            carried.append(GrantEntry(entry.address, entry.step, float(left)))
    return carried


def set_problems(
    names: Names, plan: FirewallPlan | None, headers: Mapping[str, SetHeader]
) -> list[str]:
    """Which of knockgate's sets are missing or (after ``setup``, so with a plan)
    have another type, family or timeout than ``plan`` gives them."""
    problems = []
    for version in VERSIONS:
        specs = set_specs(names, plan or FirewallPlan(protected=()), version)
        for spec in specs:
            header = headers.get(spec.name)
            if header is None:
                problems.append(f"ipset: no set {spec.name}")
            elif plan is not None and header != spec.header:
                problems.append(f"ipset: {spec.name} is {header}, not {spec.header}")
    return problems


def direct_elements(entries: Sequence[tuple[str, Step]], version: Version) -> tuple[str, ...]:
    """The (address, port) pairs of one family as hash:ip,port elements, without repeats."""
    elements: dict[str, None] = {}
    for address, step in entries:
        ip = _ip(address)
        if ip.version == version:
            elements[_element(str(ip), step)] = None
    return tuple(elements)


def direct_batch(names: Names, entries: Sequence[tuple[str, Step]]) -> str:
    """``ipset -exist restore`` input that replaces both direct sets' contents.

    Each set is filled under a temporary name and swapped in, so a packet sees
    the old contents or the new, never a partial set. ``-exist`` plus the flush
    make a temporary set left over by an interrupted call harmless.
    """
    for address, _ in entries:  # every address checked before anything is sent
        _ip(address)
    lines: list[str] = []
    for version in VERSIONS:
        spec = direct_spec(names, version)
        tmp = temporary(spec.name)
        lines += [spec.create(tmp), f"flush {tmp}"]
        lines.extend(f"add {tmp} {element}" for element in direct_elements(entries, version))
        lines += [f"swap {tmp} {spec.name}", f"destroy {tmp}"]
    return "".join(line + "\n" for line in lines)


def grant_timeout(seconds: float) -> int:
    """Whole seconds for ipset: floor (never past the deadline), at least 1 (0 = forever)."""
    if math.isinf(seconds):
        return IPSET_MAX_TIMEOUT
    return min(IPSET_MAX_TIMEOUT, max(1, math.floor(seconds)))


def _element(address: str, step: Step) -> str:
    return f"{address},{step.proto}:{step.port}"


def grant_batch(names: Names, address: str, ports: Sequence[Step], seconds: float) -> str:
    """``ipset -exist restore`` input; re-adding an element resets its timeout."""
    ip = _ip(address)
    name = names.set("grants", _version(ip))
    timeout = min(IPSET_MAX_TIMEOUT, grant_seconds(seconds))
    return "".join(f"add {name} {_element(str(ip), step)} timeout {timeout}\n" for step in ports)


def revoke_batch(names: Names, address: str, ports: Sequence[Step]) -> str:
    """``ipset -exist restore`` input; an absent element is no error."""
    ip = _ip(address)
    name = names.set("grants", _version(ip))
    return "".join(f"del {name} {_element(str(ip), step)}\n" for step in ports)


def parse_grants(save_text: str) -> list[GrantEntry]:
    """Parse ``ipset save SET`` of a grants set."""
    entries: list[GrantEntry] = []
    for line in save_text.splitlines():
        words = line.split()
        if len(words) < 3 or words[0] != "add":
            continue
        address, _, target = words[2].partition(",")
        proto, _, port = target.partition(":")
        options = dict(zip(words[3::2], words[4::2], strict=False))
        if proto not in ("tcp", "udp") or not port.isdigit():
            continue
        try:  # a set of another type (hash:net,port: 198.18.0.0/24) is not ours to read
            ip = ipaddress.ip_address(address)
        except ValueError:
            continue
        step_proto: Proto = "tcp" if proto == "tcp" else "udp"
        entries.append(
            GrantEntry(
                address=str(ip),
                step=Step(int(port), step_proto),
                expires_in=float(options["timeout"])
                if options.get("timeout", "").isdigit()
                else 0.0,
            )
        )
    return entries


# -- iptables rules ------------------------------------------------------------------------


def _chunks(ports: tuple[int, ...]) -> Iterable[tuple[int, ...]]:
    for start in range(0, len(ports), MULTIPORT_MAX):
        yield ports[start : start + MULTIPORT_MAX]


def multiport_lists(ranges: Iterable[tuple[int, int]]) -> Iterable[str]:
    """``--dports`` lists of at most 15 slots, as ``iptables -S`` prints them: a port
    takes one slot, a range ``low:high`` two."""
    items: list[str] = []
    used = 0
    for low, high in ranges:
        item, cost = (str(low), 1) if low == high else (f"{low}:{high}", 2)
        if used + cost > MULTIPORT_MAX:
            yield ",".join(items)
            items, used = [], 0
        items.append(item)
        used += cost
    if items:
        yield ",".join(items)


def rule_lines(names: Names, plan: FirewallPlan, version: Version) -> list[str]:
    """The ``-A`` rules of the ``filter`` chains, exactly as ``iptables -S`` prints them."""
    chain, scan, gate, forward, service = names.chains
    allow = names.set("allow", version)
    rules = [f"-A {chain} -i lo -j RETURN"]
    if plan.scan is not None:
        rules += [f"-A {chain} -p {p} -m conntrack --ctstate NEW -j {scan}" for p in ("tcp", "udp")]
    for proto in ("tcp", "udp"):
        for chunk in _chunks(plan.ports(proto)):
            dports = ",".join(str(port) for port in chunk)
            rules.append(f"-A {chain} -p {proto} -m multiport --dports {dports} -j {gate}")
    if plan.scan is not None:
        # The doors' own knock ports first: a long knock is not a scan.
        for proto in ("tcp", "udp"):
            rules += [
                f"-A {scan} -p {proto} -m multiport --dports {dports} -j RETURN"
                for dports in multiport_lists(plan.knock_ranges(proto))
            ]
        limits = scan_limits(plan.scan)
        seen, held = names.set("seen", version), names.set("held", version)
        rules += [
            f"-A {scan} -m set --match-set {seen} src,dst -j RETURN",
            f"-A {scan} -j SET --add-set {seen} src,dst --exist",
            f"-A {scan} -m hashlimit --hashlimit-above {limits.rate}/sec"
            f" --hashlimit-burst {limits.burst} --hashlimit-mode srcip"
            f" --hashlimit-name {limits.hashlimit_name(names, version)}"
            f" --hashlimit-htable-expire {limits.expire_ms}"
            # No --exist: like nft's "add @held4", a hold is not extended while it lasts.
            f" -j SET --add-set {held} src",
        ]
    rules += [
        f"-A {gate} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        f"-A {gate} -m set --match-set {allow} src -j RETURN",
        f"-A {gate} -m set --match-set {names.set('grants', version)} src,dst -j RETURN",
        f"-A {gate} -p tcp -j REJECT --reject-with tcp-reset",
        f"-A {gate} -j DROP",
    ]
    # Forwarded (Docker-published) ports: by the port the client asked for, before the
    # DNAT. --ctorigdstport takes one port (or a range), not a list: one rule a port.
    # Only connections that were rewritten (ctstate DNAT): a container's own outgoing
    # connection to some remote port 443 must not be gated because 443 is protected here.
    # (Established ones return first in the service chain, so NEW is implied.)
    for proto in ("tcp", "udp"):
        rules += [
            f"-A {forward} -p {proto} -m conntrack --ctstate DNAT --ctorigdstport {port}"
            f" -j {service}"
            for port in plan.ports(proto)
        ]
    rules += [
        # dst,dst: the destination's address and the destination's port.
        f"-A {forward} -m set --match-set {names.set('direct', version)} dst,dst -j {service}",
        f"-A {service} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        f"-A {service} -m set --match-set {allow} src -j RETURN",
        f"-A {service} -m connmark --mark {GRANTED_MARK}/{GRANTED_MARK} -j RETURN",
        f"-A {service} -p tcp -j REJECT --reject-with tcp-reset",
        f"-A {service} -j DROP",
    ]
    return rules


def mark_rule_lines(names: Names, version: Version) -> list[str]:
    """The ``mangle`` chain's rule, as ``iptables -t mangle -S`` prints it.

    ``-j CONNMARK --or-mark M`` is stored, and printed, as its equivalent
    ``--set-xmark M/M`` (clear the bits of M, then xor M: set them).
    """
    grants = names.set("grants", version)
    return [
        f"-A {names.mark_chain} -m conntrack --ctstate NEW -m set --match-set {grants} src,dst"
        f" -j CONNMARK --set-xmark {GRANTED_MARK}/{GRANTED_MARK}"
    ]


def restore_text(names: Names, plan: FirewallPlan, version: Version) -> str:
    """One ``iptables-restore --noflush`` input: declaring a chain flushes it."""
    lines = ["*filter"]
    lines += [f":{chain} - [0:0]" for chain in names.chains]
    lines += rule_lines(names, plan, version)
    lines += ["COMMIT", "*mangle", f":{names.mark_chain} - [0:0]"]
    lines += mark_rule_lines(names, version)
    lines.append("COMMIT")
    return "".join(line + "\n" for line in lines)


def forward_anchor(listing: Iterable[str]) -> str:
    """Where the forward jump belongs, from an ``iptables -S`` listing of ``filter``.

    ``DOCKER-USER`` when dockerd made it and FORWARD jumps to it, else FORWARD.
    """
    lines = set(listing)
    if f"-N {DOCKER_USER}" in lines and DOCKER_USER_JUMP in lines:
        return DOCKER_USER
    return "FORWARD"


def structure_problems(
    names: Names,
    plan: FirewallPlan | None,
    version: Version,
    filter_listing: Sequence[str],
    mangle_listing: Sequence[str],
) -> list[str]:
    """What is not in place in one family's tables (empty: all is).

    Without a plan (a process that did not run ``setup``) only the chains and
    jumps are checked, not the rules in the chains.
    """
    problems: list[str] = []
    anchor = forward_anchor(filter_listing)
    jumps = [
        (filter_listing, "filter", names.jump),
        (filter_listing, "filter", names.forward_jump(anchor)),
        (mangle_listing, "mangle", names.mark_jump),
    ]
    for listing, table, jump in jumps:
        if jump not in listing:
            problems.append(f"{table}: no {jump!r}")
    for other in ("FORWARD", DOCKER_USER):
        if other != anchor and names.forward_jump(other) in filter_listing:
            problems.append(f"filter: {names.forward_jump(other)!r} instead of in {anchor}")
    chains = [(filter_listing, "filter", chain) for chain in names.chains]
    chains.append((mangle_listing, "mangle", names.mark_chain))
    for listing, table, chain in chains:
        if f"-N {chain}" not in listing:
            problems.append(f"{table}: no chain {chain}")
    if plan is not None:
        expected = rule_lines(names, plan, version)
        for chain in names.chains:
            if chain_rules(filter_listing, chain) != chain_rules(expected, chain):
                problems.append(f"filter: chain {chain} differs")
        if chain_rules(mangle_listing, names.mark_chain) != mark_rule_lines(names, version):
            problems.append(f"mangle: chain {names.mark_chain} differs")
    return problems


def chain_rules(listing: Iterable[str], chain: str) -> list[str]:
    """The ``-A CHAIN`` lines of an ``iptables -S`` listing."""
    return [line for line in listing if line.startswith(f"-A {chain} ")]


# -- helpers -------------------------------------------------------------------------------


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        raise FirewallError(f"iptables: not an IP address: {address!r}") from None


def _version(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Version:
    return 4 if ip.version == 4 else 6


def _iptables(version: Version) -> str:
    return "iptables" if version == 4 else "ip6tables"


def _one_line(text: str) -> str:
    """A tool's message as one line, without its "Try `iptables -h'" advice."""
    lines = (line.strip() for line in text.splitlines())
    return "; ".join(line for line in lines if line and not line.startswith("Try `"))


def _culprit(stderr: str, stdin: str | None) -> str:
    """The input line a restore tool complains about ("Error occurred at line: 8",
    "Error in line 3:"), quoted for the message."""
    match = re.search(r"line:? (\d+)", stderr)
    if stdin is None or match is None:
        return ""
    lines = stdin.splitlines()
    number = int(match.group(1))
    return f" (input line {number}: {lines[number - 1]!r})" if 0 < number <= len(lines) else ""


# -- the backend ---------------------------------------------------------------------------


class IptablesBackend:
    """knockgate's gate with iptables (nf_tables backend) and ipset."""

    name = "iptables"

    def __init__(self, netns: str | None = None, prefix: str = "KNOCKGATE") -> None:
        self.netns = netns
        self.names = make_names(prefix)
        self._plan: FirewallPlan | None = None
        self._direct: tuple[tuple[str, Step], ...] = ()  # refilled if setup recreates the set

    # running commands

    def _run(
        self, argv: Sequence[str], stdin: str | None = None, ok: tuple[int, ...] = (0,)
    ) -> subprocess.CompletedProcess[str]:
        full = [*(("ip", "netns", "exec", self.netns) if self.netns else ()), *argv]
        shown = shlex.join(full)
        try:
            proc = subprocess.run(
                full,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise FirewallError(f"{shown}: no answer within {COMMAND_TIMEOUT:g} s") from None
        except OSError as exc:
            raise FirewallError(f"{shown}: {exc}") from None
        if proc.returncode not in ok:
            detail = _one_line(proc.stderr) or _one_line(proc.stdout) or "no output"
            raise FirewallError(
                f"{shown}: exit status {proc.returncode}: {detail}{_culprit(proc.stderr, stdin)}"
            )
        return proc

    def _listing(self, version: Version, table: str = "filter") -> list[str]:
        return self._run([_iptables(version), "-w", "-t", table, "-S"]).stdout.splitlines()

    # the protocol

    def setup(self, plan: FirewallPlan) -> None:
        started = time.monotonic()
        existing = parse_set_headers(self._run(["ipset", "list", "-t"]).stdout)
        saved = []  # the elements of grants sets that must be rebuilt
        for version in VERSIONS:
            spec = set_specs(self.names, plan, version)[SET_KINDS.index("grants")]
            if spec.name in existing and existing[spec.name] != spec.header:
                saved.append(self._run(["ipset", "save", spec.name]).stdout)
        spent = time.monotonic() - started + CARRY_MARGIN
        carried = [grant for text in saved for grant in carried_grants(text, spent)]
        batch = ipset_setup_batch(self.names, plan, existing, self._direct, carried)
        self._run(["ipset", "restore"], stdin=batch)
        for version in VERSIONS:
            self._run(
                [f"{_iptables(version)}-restore", "-w", "--noflush"],
                stdin=restore_text(self.names, plan, version),
            )
        for version in VERSIONS:
            self._ensure_jumps(version)
        self._plan = plan

    def _ensure_jumps(self, version: Version) -> None:
        """Exactly one jump to each entry chain, at rule 1 of where it belongs.

        A missing jump is inserted at the top; extra ones are dropped, and so is a
        forward jump left in the chain that is no longer the anchor (Docker started
        or stopped managing FORWARD) — after the new one is in, so no packet slips
        through between the two.
        """
        command = _iptables(version)
        filter_listing = self._listing(version)
        mangle_listing = self._listing(version, "mangle")
        anchor = forward_anchor(filter_listing)
        names = self.names
        wanted = (
            ("filter", "INPUT", names.chain, filter_listing),
            ("mangle", "PREROUTING", names.mark_chain, mangle_listing),
            ("filter", anchor, names.forward_chain, filter_listing),
        )
        for table, chain, target, listing in wanted:
            count = listing.count(f"-A {chain} -j {target}")
            if count == 0:
                self._run([command, "-w", "-t", table, "-I", chain, "1", "-j", target])
            for _ in range(count - 1):
                self._run([command, "-w", "-t", table, "-D", chain, "-j", target])
        for other in ("FORWARD", DOCKER_USER):
            if other != anchor:
                for _ in range(filter_listing.count(names.forward_jump(other))):
                    self._run([command, "-w", "-D", other, "-j", names.forward_chain])

    def grant(self, address: str, ports: tuple[Step, ...], seconds: float) -> None:
        """Grant for ``grant_seconds(seconds)`` kernel seconds; under one second: nothing
        (as with nftables)."""
        if grant_seconds(seconds) < 1:
            return
        if ports:
            batch = grant_batch(self.names, address, ports, seconds)
            self._run(["ipset", "-exist", "restore"], stdin=batch)

    def revoke(self, address: str, ports: tuple[Step, ...]) -> None:
        if ports:
            batch = revoke_batch(self.names, address, ports)
            self._run(["ipset", "-exist", "restore"], stdin=batch)

    def is_held(self, address: str) -> bool:
        ip = _ip(address)
        name = self.names.set("held", _version(ip))
        proc = self._run(["ipset", "test", name, str(ip)], ok=(0, 1))
        if proc.returncode == 0:
            return True
        if "is NOT in set" in proc.stderr:
            return False
        argv = shlex.join(["ipset", "test", name, str(ip)])
        raise FirewallError(f"{argv}: exit status 1: {proc.stderr.strip()}")

    def grants(self) -> list[GrantEntry]:
        entries: list[GrantEntry] = []
        for version in VERSIONS:
            save = self._run(["ipset", "save", self.names.set("grants", version)]).stdout
            entries.extend(parse_grants(save))
        return entries

    def set_direct(self, entries: tuple[tuple[str, Step], ...]) -> None:
        """Replace both direct sets' contents, each in one swap.

        On failure (no ``setup`` yet, a set someone else changed) the temporary
        sets are removed and the old contents stay in force.
        """
        batch = direct_batch(self.names, entries)  # a bad address: nothing is sent
        self._direct = tuple(entries)
        try:
            self._run(["ipset", "-exist", "restore"], stdin=batch)
        except FirewallError:
            for version in VERSIONS:
                tmp = temporary(self.names.set("direct", version))
                self._run(["ipset", "destroy", tmp], ok=(0, 1))
            raise

    def check(self) -> bool:
        """All sets, chains and jumps in place (and, after ``setup``, the rules and the
        sets' type, family and timeout: a set destroyed or replaced is noticed).

        False also while the forward jump is not where :func:`forward_anchor` says
        (Docker started or re-created ``DOCKER-USER``): ``setup`` moves it.
        """
        headers = parse_set_headers(self._run(["ipset", "list", "-t"]).stdout)
        problems = set_problems(self.names, self._plan, headers)
        for version in VERSIONS:
            filter_listing = self._listing(version)
            mangle_listing = self._listing(version, "mangle")
            problems += [
                f"IPv{version} {problem}"
                for problem in structure_problems(
                    self.names, self._plan, version, filter_listing, mangle_listing
                )
            ]
        if problems and self._plan is not None:  # (without a setup: nothing to compare)
            log.warning("iptables: knockgate's rules are not as set up: %s", "; ".join(problems))
        return not problems

    def teardown(self) -> None:
        """Undo everything, one guarded step at a time; report what failed at the end.

        Jumps go first, then knockgate's chains (flushed, then deleted: the forward
        chain refers to the service chain), then the sets, which only then are
        unreferenced. ``DOCKER-USER`` itself is Docker's and stays.
        """
        errors: list[str] = []

        def attempt(argv: Sequence[str]) -> subprocess.CompletedProcess[str] | None:
            try:
                return self._run(argv)
            except FirewallError as exc:
                errors.append(str(exc))
                return None

        names = self.names
        # table: (the (chain, target) jumps into knockgate's chains, knockgate's chains)
        layout: dict[str, tuple[tuple[tuple[str, str], ...], tuple[str, ...]]] = {
            "filter": (
                (
                    ("INPUT", names.chain),
                    ("FORWARD", names.forward_chain),
                    (DOCKER_USER, names.forward_chain),
                ),
                names.chains,
            ),
            "mangle": ((("PREROUTING", names.mark_chain),), (names.mark_chain,)),
        }
        for version in VERSIONS:
            command = _iptables(version)
            tables: list[tuple[str, list[str], tuple[tuple[str, str], ...], tuple[str, ...]]] = []
            for table, (jumps, chains) in layout.items():
                listed = attempt([command, "-w", "-t", table, "-S"])
                if listed is not None:
                    tables.append((table, listed.stdout.splitlines(), jumps, chains))
            for table, listing, jumps, _ in tables:
                for chain, target in jumps:
                    for _ in range(listing.count(f"-A {chain} -j {target}")):
                        attempt([command, "-w", "-t", table, "-D", chain, "-j", target])
            for table, listing, _, chains in tables:
                present = [chain for chain in chains if f"-N {chain}" in listing]
                for chain in present:
                    attempt([command, "-w", "-t", table, "-F", chain])
                for chain in present:
                    attempt([command, "-w", "-t", table, "-X", chain])

        listed = attempt(["ipset", "list", "-n"])
        if listed is not None:
            present_sets = set(listed.stdout.split())
            ours = names.all_sets()
            for name in (*ours, *(temporary(name) for name in ours)):
                if name in present_sets:
                    error = self._destroy_set(name)
                    if error:
                        errors.append(error)
        self._plan = None
        if errors:
            raise FirewallError("iptables teardown incomplete: " + "; ".join(errors))

    def _destroy_set(self, name: str) -> str | None:
        """Destroy one set, waiting briefly while the kernel still holds the last reference."""
        for attempt in range(DESTROY_RETRIES):
            try:
                self._run(["ipset", "destroy", name])
                return None
            except FirewallError as exc:
                if "in use" not in str(exc) or attempt == DESTROY_RETRIES - 1:
                    return str(exc)
                time.sleep(0.1 * (attempt + 1))
        return None
