"""Label-gated services: a user's own container, gated by the labels it carries.

Any container on the host (any compose project) with a ``knockgate.door`` label is a
gated service. This module turns one container's labels and Docker facts into a frozen
:class:`GatedContainer`, or a :class:`LabelProblem` whose every line names the
container and the label. Pure: standard library only, never raises on any label
dict (a property test draws hostile ones).

Label schema
============
Modelled on Traefik and Sablier: dotted keys under one prefix, plain string values,
absent means the default; the container's presence under a required key opts it in
(Traefik's ``traefik.enable``, Sablier's ``sablier.enable``; here the door label
itself, since a gated container without a door means nothing). Keys are exact and
case-sensitive; values are taken with surrounding blanks removed.

``knockgate.door=<door>`` (required, except on a door-less group member, below)
    The name of a door in knockgate's configuration. A knock on that door grants the
    knocker this container's gated ports. The door holds the secrets (sequence, SPA
    key); labels never do: anyone who can list containers reads them.
``knockgate.ports=80,8443/tcp`` (default: every published port)
    The gated ports, comma-separated ``PORT[/tcp|/udp]`` (``tcp`` when left out),
    named as the container's own port, as Docker's ``NetworkSettings.Ports`` keys
    and Traefik's ``loadbalancer.server.port`` name them (``80`` in compose's
    ``"8080:80"``). Each must be published; every host binding of it is gated.
    A port published on an ephemeral host port (``"80"`` alone in compose) cannot
    be gated before it exists, so it is a problem; so is a container that publishes
    nothing to gate.
``knockgate.ready=tcp|http|http:/path|banner:TEXT|healthcheck`` (default ``tcp``)
    When a started container answers (see :class:`~appliance.config.schema.Readiness`),
    probed on the first gated port. ``http`` means ``http:/``; the path starts with
    ``/`` and has no blanks; the expected status is 200. ``banner:`` needs non-empty
    printable text (``banner:SSH-``). ``healthcheck`` waits for the image's own
    HEALTHCHECK.
``knockgate.start_on_knock=true|false`` (default ``false``)
    ``true``: a stopped container is started by a knock on its door and stopped when
    idle. ``false``: knockgate only gates it and never starts or stops it (it is the
    user's container). Also accepted: ``1/0``, ``yes/no``, ``on/off`` in any case.
``knockgate.idle_timeout=300`` (default 300)
    Seconds without a connection (and without a grant) before a started container is
    stopped; a number (``300``, ``2.5``), 1 to 604800. Needs ``start_on_knock=true``
    (otherwise knockgate never stops it, and the label would silently do nothing).
``knockgate.max_lifetime=86400`` (default 86400)
    Seconds after a knock start when the container is stopped whatever its use;
    1 to 31536000. Needs ``start_on_knock=true``, like ``idle_timeout``.
``knockgate.group=<name>`` (default: none, the container alone)
    Containers started together on a knock, in dependency order. ``<name>`` is
    1-63 of ``a-z 0-9 _ . -``, starting with a letter or digit, global on the host
    (as Sablier's ``sablier.group``). The order comes from compose's own
    ``com.docker.compose.depends_on`` label among members of one compose project
    (:func:`start_order`; a cycle is a problem of the group; stopped in reverse).
    A gated member needs ``start_on_knock=true``. A member without
    ``knockgate.door`` (a database behind a gated app) is started and stopped with
    its group and never gated: it may carry only ``group`` and ``ready``.

Validation
==========
Every label is checked and every problem reported, one line each:
``container web-1: label knockgate.idle_timeout="5m": expected seconds, a number``.
A key under ``knockgate.`` (in any case) that is not one of the above is a problem
(a typo must not silently leave a port open or a container running), except
``knockgate.service``, ``knockgate.owner`` and ``knockgate.config-hash``, which mark
knockgate's own catalogue containers: such a container is never label-gated, and one
that also carries ``knockgate.door`` or ``knockgate.group`` is a problem. Values are
echoed escaped and cut short. A container with any problem is not a
:class:`GatedContainer`: the caller keeps its ports closed (fail closed) and logs the
lines.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from appliance.config.schema import Readiness
from appliance.core.model import Proto, Step

PREFIX = "knockgate."
DOOR = "knockgate.door"
PORTS = "knockgate.ports"
READY = "knockgate.ready"
START_ON_KNOCK = "knockgate.start_on_knock"
IDLE_TIMEOUT = "knockgate.idle_timeout"
MAX_LIFETIME = "knockgate.max_lifetime"
GROUP = "knockgate.group"
KNOWN = (DOOR, PORTS, READY, START_ON_KNOCK, IDLE_TIMEOUT, MAX_LIFETIME, GROUP)
# knockgate's own catalogue containers carry these (appliance.services.runtime)
OWN = ("knockgate.service", "knockgate.owner", "knockgate.config-hash")
MEMBER_ONLY = (GROUP, READY)  # what a door-less group member may carry

COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"
COMPOSE_DEPENDS_ON = "com.docker.compose.depends_on"

DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_MAX_LIFETIME = 86_400.0
MAX_IDLE_TIMEOUT = 7 * 86_400.0
MAX_MAX_LIFETIME = 365 * 86_400.0
SHOWN = 60  # characters of a value echoed in a message

_SECONDS = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")
_PORT = re.compile(r"([0-9]{1,5})(?:/(tcp|udp))?")
_GROUP = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_PATH = re.compile(r"/[\x21-\x7e]*")
_BOOLS = {"true": True, "1": True, "yes": True, "on": True}
_BOOLS |= {"false": False, "0": False, "no": False, "off": False}


@dataclass(frozen=True, slots=True)
class Binding:
    """One host binding of a published container port (``HostPort`` 0: ephemeral)."""

    host_ip: str
    host_port: int


@dataclass(frozen=True, slots=True)
class Published:
    """A container port and its host bindings (one ``NetworkSettings.Ports`` entry)."""

    port: int
    proto: Proto
    bindings: tuple[Binding, ...]

    @property
    def key(self) -> str:
        return f"{self.port}/{self.proto}"


@dataclass(frozen=True, slots=True)
class ContainerFacts:
    """What Docker says of one container: the parser's whole input besides the doors."""

    id: str
    name: str
    state: str
    labels: tuple[tuple[str, str], ...] = ()
    published: tuple[Published, ...] = ()
    # Its addresses on every network it is on (IPv4 and IPv6), while it has them: each is
    # gated, so no network is a way around the knock.
    addresses: tuple[str, ...] = ()
    started_at: float | None = None  # when it last started (unix time), while it runs

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True, slots=True)
class GatedContainer:
    """A container gated by its labels (``door`` ``None``: a door-less group member,
    started with its group, never gated, ``ports`` empty)."""

    id: str
    name: str
    state: str
    door: str | None
    ports: tuple[Published, ...]
    ready: Readiness = field(default_factory=Readiness)
    start_on_knock: bool = False
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_lifetime: float = DEFAULT_MAX_LIFETIME
    group: str | None = None
    compose_project: str | None = None
    compose_service: str | None = None
    depends_on: tuple[str, ...] = ()  # compose services this one's project starts first


@dataclass(frozen=True, slots=True)
class LabelProblem:
    """A labelled container that cannot be gated: one line per problem, each naming
    the container and the label. Its ports stay closed."""

    id: str
    name: str
    lines: tuple[str, ...]

    @property
    def message(self) -> str:
        return "; ".join(self.lines)


def _escaped(value: str) -> str:
    """``value`` with control and non-ASCII characters escaped, cut short: a hostile
    label never becomes a long or multi-line log line."""
    head = value[:SHOWN].encode("ascii", "backslashreplace").decode("ascii")
    head = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in head)
    more = f"…({len(value)} characters)" if len(value) > SHOWN else ""
    return head + more


def _shown(value: str) -> str:
    return '"' + _escaped(value).replace('"', '\\"') + '"'


class _Problems:
    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[str] = []

    def add(self, key: str, value: str | None, reason: str) -> None:
        label = _escaped(key) if value is None else f"{_escaped(key)}={_shown(value)}"
        self.lines.append(f"container {self.name}: label {label}: {reason}")


def _seconds(text: str, maximum: float) -> float | str:
    if not _SECONDS.fullmatch(text):
        return "expected seconds, a number"
    number = float(text)
    if not (math.isfinite(number) and 1.0 <= number <= maximum):
        return f"expected seconds, 1 to {maximum:g}"
    return number


def _ready(text: str) -> Readiness | str:
    kind, colon, rest = text.partition(":")
    if kind == "tcp" and not colon:
        return Readiness(kind="tcp")
    if kind == "healthcheck" and not colon:
        return Readiness(kind="healthcheck")
    if kind == "http":
        path = rest if colon else "/"
        if not _PATH.fullmatch(path):
            return "expected http:/path (a path starting with /, no blanks)"
        return Readiness(kind="http", path=path)
    if kind == "banner" and colon:
        if not rest or not rest.isascii() or not rest.isprintable():
            return "expected banner:TEXT (printable ASCII, not empty)"
        return Readiness(kind="banner", expect=rest)
    return "expected tcp, http, http:/path, banner:TEXT or healthcheck"


def _ports(text: str, published: tuple[Published, ...]) -> tuple[tuple[Published, ...], list[str]]:
    """The published ports a ``knockgate.ports`` value names, and what is wrong with it."""
    by_key = {p.key: p for p in published}
    chosen: list[Published] = []
    reasons: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        match = _PORT.fullmatch(item)
        if match is None or not 1 <= int(match.group(1)) <= 65535:
            reasons.append(f"{_shown(item)}: expected PORT or PORT/tcp or PORT/udp, 1 to 65535")
            continue
        key = f"{int(match.group(1))}/{match.group(2) or 'tcp'}"
        if key in by_key:
            if by_key[key] not in chosen:
                chosen.append(by_key[key])
            continue
        hosts = [
            p.key for p in published if any(f"{b.host_port}/{p.proto}" == key for b in p.bindings)
        ]
        if hosts:
            reasons.append(f"{key} is a host port: name the container's port ({hosts[0]})")
        else:
            shown = ", ".join(p.key for p in published) or "none"
            reasons.append(f"{key} is not a published port of this container (published: {shown})")
    return tuple(chosen), reasons


def _depends_on(text: str) -> tuple[str, ...]:
    """Compose's ``db:service_started:false,cache:service_healthy:true`` (older
    versions leave out the restart part, or write just ``db``): the service names."""
    names = (item.strip().split(":", 1)[0].strip() for item in text.split(","))
    return tuple(dict.fromkeys(name for name in names if name))


def parse(facts: ContainerFacts, doors: Collection[str]) -> GatedContainer | LabelProblem:
    """One container's labels, checked against the configured door names."""
    problems = _Problems(_escaped(facts.name or facts.id[:12]))
    labels: Mapping[str, str] = facts.label_map
    ours = {k: v.strip() for k, v in labels.items() if k.lower().startswith(PREFIX)}

    own = [k for k in OWN if k in ours]
    for key in (DOOR, GROUP):
        if own and key in ours:
            problems.add(
                key, ours[key], f"a knockgate catalogue container ({own[0]}) is never label-gated"
            )
    for key in ours:
        if key not in KNOWN and key not in OWN:
            near = [k for k in KNOWN if k.lower() == key.lower()]
            hint = f" (did you mean {near[0]}?)" if near else f" (known: {', '.join(KNOWN)})"
            problems.add(key, None, f"unknown knockgate label{hint}")

    door = ours.get(DOOR)
    group = ours.get(GROUP)
    if door is None and group is None:
        problems.add(DOOR, None, "missing: name a door of knockgate's configuration")
    elif door is None:
        for key in ours:
            if key in KNOWN and key not in MEMBER_ONLY:
                problems.add(key, ours[key], f"a group member without {DOOR} is never gated")
    elif door not in doors:
        listed = ", ".join(sorted(doors)[:10]) or "none"
        problems.add(DOOR, door, f"no such door in knockgate's configuration (doors: {listed})")

    gated: tuple[Published, ...] = ()
    if door is not None:
        if PORTS in ours:
            gated, reasons = _ports(ours[PORTS], facts.published)
            for reason in reasons:
                problems.add(PORTS, ours[PORTS], reason)
            if not gated and not reasons:
                problems.add(PORTS, ours[PORTS], "expected at least one port")
        else:
            gated = tuple(p for p in facts.published if p.bindings)
            if not gated:
                problems.add(DOOR, door, "the container publishes no port: nothing to gate")
        for port in gated:
            if any(b.host_port == 0 for b in port.bindings):
                problems.add(
                    PORTS if PORTS in ours else DOOR,
                    ours.get(PORTS, door),
                    f"{port.key} is published on an ephemeral host port: publish it on a fixed one",
                )

    ready: Readiness | str = Readiness()
    if READY in ours:
        ready = _ready(ours[READY])
        if isinstance(ready, str):
            problems.add(READY, ours[READY], ready)

    start = False
    if START_ON_KNOCK in ours:
        value = _BOOLS.get(ours[START_ON_KNOCK].lower())
        if value is None:
            problems.add(START_ON_KNOCK, ours[START_ON_KNOCK], "expected true or false")
        start = bool(value)

    timeouts: dict[str, float] = {}
    for key, maximum in ((IDLE_TIMEOUT, MAX_IDLE_TIMEOUT), (MAX_LIFETIME, MAX_MAX_LIFETIME)):
        if key not in ours or door is None:
            continue
        seconds = _seconds(ours[key], maximum)
        if isinstance(seconds, str):
            problems.add(key, ours[key], seconds)
        elif not start:
            problems.add(key, ours[key], f"has no effect without {START_ON_KNOCK}=true")
        else:
            timeouts[key] = seconds

    if group is not None:
        if not _GROUP.fullmatch(group):
            problems.add(
                GROUP, group, "expected 1-63 of a-z 0-9 _ . - starting with a letter or digit"
            )
        elif door is not None and not start:
            problems.add(
                GROUP, group, f"a group is started on a knock: needs {START_ON_KNOCK}=true"
            )

    if problems.lines:
        return LabelProblem(facts.id, facts.name, tuple(problems.lines))
    assert not isinstance(ready, str)
    return GatedContainer(
        id=facts.id,
        name=facts.name,
        state=facts.state,
        door=door,
        ports=gated,
        ready=ready,
        start_on_knock=start or door is None,
        idle_timeout=timeouts.get(IDLE_TIMEOUT, DEFAULT_IDLE_TIMEOUT),
        max_lifetime=timeouts.get(MAX_LIFETIME, DEFAULT_MAX_LIFETIME),
        group=group,
        compose_project=labels.get(COMPOSE_PROJECT) or None,
        compose_service=labels.get(COMPOSE_SERVICE) or None,
        depends_on=_depends_on(labels.get(COMPOSE_DEPENDS_ON, "")),
    )


def start_order(members: Collection[GatedContainer]) -> tuple[GatedContainer, ...] | str:
    """The members of one group in the order to start them (stop in reverse), or why
    there is none. A member comes after those it ``depends_on`` in its own compose
    project (compose's ``depends_on`` names services of the same project; a
    dependency outside the group is not knockgate's to start and is left out of the
    order); ties go by name, so the order is the same on every run."""
    groups = sorted({m.group or "" for m in members})
    if len(groups) > 1:
        return f"members of several groups: {', '.join(groups)}"
    by_service: dict[tuple[str | None, str | None], GatedContainer] = {
        (m.compose_project, m.compose_service): m
        for m in members
        if m.compose_project is not None and m.compose_service is not None
    }
    before: dict[str, set[str]] = {m.id: set() for m in members}
    for m in members:
        for service in m.depends_on:
            dependency = by_service.get((m.compose_project, service))
            if dependency is not None and dependency.id != m.id:
                before[m.id].add(dependency.id)
    order: list[GatedContainer] = []
    waiting = sorted(members, key=lambda m: (m.name, m.id))
    while waiting:
        done = {m.id for m in order}
        ready = [m for m in waiting if before[m.id] <= done]
        if not ready:
            names = ", ".join(m.name for m in waiting)
            return f"group {groups[0]}: a dependency cycle among {names}"
        order.append(ready[0])
        waiting.remove(ready[0])
    return tuple(order)


# --------------------------------------------------------------------------- units


@dataclass(frozen=True, slots=True)
class Unit:
    """What one lifecycle machine runs: a gated container alone (``container NAME``) or
    a group (``group NAME``), its members in start order (stopped in reverse)."""

    name: str
    members: tuple[GatedContainer, ...]

    @property
    def gated(self) -> tuple[GatedContainer, ...]:
        return tuple(m for m in self.members if m.door is not None)

    @property
    def doors(self) -> frozenset[str]:
        return frozenset(m.door for m in self.gated if m.door is not None)

    def ports(self, door: str | None = None) -> tuple[Step, ...]:
        """The host ports a knock on ``door`` (any door: ``None``) opens."""
        return tuple(
            dict.fromkeys(
                step
                for m in self.gated
                if door is None or m.door == door
                for step in host_steps(m.ports)
            )
        )

    @property
    def managed(self) -> bool:
        """Started and stopped by knockgate (``start_on_knock``; a group always is)."""
        return all(m.start_on_knock for m in self.gated)

    @property
    def idle_timeout(self) -> float:
        return min((m.idle_timeout for m in self.gated), default=DEFAULT_IDLE_TIMEOUT)

    @property
    def max_lifetime(self) -> float:
        return min((m.max_lifetime for m in self.gated), default=DEFAULT_MAX_LIFETIME)


@dataclass(frozen=True, slots=True)
class LabelPlan:
    """Every labelled container, parsed against the doors: the units to run, the
    problems to report, and what the firewall closes (the host ports of every gated
    and every faulty container, and their own address and port)."""

    units: tuple[Unit, ...] = ()
    problems: tuple[LabelProblem, ...] = ()
    protected: tuple[Step, ...] = ()
    direct: tuple[tuple[str, Step], ...] = ()
    unit_of: tuple[tuple[str, str], ...] = ()  # container id -> unit name

    def unit(self, container: str) -> str | None:
        return dict(self.unit_of).get(container)


def host_steps(ports: Collection[Published]) -> tuple[Step, ...]:
    """The host ports of published ports (an ephemeral binding, 0, is left out: it has
    no port until Docker picks one)."""
    return tuple(
        dict.fromkeys(
            Step(b.host_port, p.proto) for p in ports for b in p.bindings if b.host_port > 0
        )
    )


def plan(facts: Collection[ContainerFacts], doors: Mapping[str, bool]) -> LabelPlan:
    """Every labelled container against ``doors`` (name -> whether a knock on it grants:
    a door without ``open`` never does). Fail closed: a container with a problem has
    every published host port and its own address closed."""
    parsed = [parse(f, doors) for f in sorted(facts, key=lambda f: (f.name, f.id))]
    problems: dict[str, LabelProblem] = {}
    gated: list[GatedContainer] = []
    for result in parsed:
        if isinstance(result, LabelProblem):
            problems[result.id] = result
        elif result.door is not None and not doors.get(result.door, False):
            line = (
                f"container {_escaped(result.name)}: label {DOOR}={_shown(result.door)}: "
                "the door has no open: (a knock on it grants nothing); give it "
                "open: {duration: SECONDS}"
            )
            problems[result.id] = LabelProblem(result.id, result.name, (line,))
        else:
            gated.append(result)
    units: list[Unit] = []
    groups: dict[str, list[GatedContainer]] = {}
    for g in gated:
        if g.group is None:
            if g.door is not None:
                units.append(Unit(f"container {g.name}", (g,)))
        else:
            groups.setdefault(g.group, []).append(g)
    for name, members in sorted(groups.items()):
        order = start_order(members)
        if isinstance(order, str):
            for m in members:
                line = f"container {_escaped(m.name)}: label {GROUP}={_shown(name)}: {order}"
                problems[m.id] = LabelProblem(m.id, m.name, (line,))
            continue
        if any(m.door is not None for m in order):
            units.append(Unit(f"group {name}", order))
    protected: dict[Step, None] = {}
    direct: dict[tuple[str, Step], None] = {}
    for f in facts:
        if f.id in problems:
            protected.update(dict.fromkeys(host_steps(f.published)))
            direct.update(
                dict.fromkeys(
                    (where, Step(p.port, p.proto)) for where in f.addresses for p in f.published
                )
            )
    addresses = {f.id: f.addresses for f in facts}
    for unit in units:
        for m in unit.gated:
            protected.update(dict.fromkeys(host_steps(m.ports)))
            direct.update(
                dict.fromkeys(
                    (where, Step(p.port, p.proto))
                    for where in addresses.get(m.id, ())
                    for p in m.ports
                )
            )
    return LabelPlan(
        units=tuple(units),
        problems=tuple(
            problems[f.id] for f in sorted(facts, key=lambda f: (f.name, f.id)) if f.id in problems
        ),
        protected=tuple(sorted(protected)),
        direct=tuple(sorted(direct)),
        unit_of=tuple((m.id, u.name) for u in units for m in u.members),
    )
