"""The launcher's wire: typed JSON lines between the monitor and ``knockgate launcher``.

One request per line, one object: ``{"verb": VERB, ARG: VALUE, ...}``; the arguments
are exactly those :data:`SHAPES` names for the verb, each a string matching its
pattern (:data:`PATTERNS`). Nothing else is accepted: not an image, a mount nor an
option (``create`` names a service of the launcher's own catalogue).

Replies, one line each: ``{"ok": true, "result": ...}`` or ``{"ok": false, "error":
TEXT}``. A stream verb (:data:`STREAMS`) answers ``{"ok": true}`` once it follows
Docker, then ``{"event": ...}`` lines until the client closes the connection or
Docker fails (a last ``{"ok": false, "error": ...}``).

This module holds only the shapes: parsing a request (:func:`parse_request`, which
raises :class:`Invalid` and nothing else) and turning the runtime's types into JSON
and back (the ``*_from`` decoders raise :class:`Invalid` on anything malformed, so a
broken launcher cannot crash the monitor either).
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from appliance.core.model import Step
from appliance.services.discovery import ContainerEvent
from appliance.services.labels import Binding, ContainerFacts, Published
from appliance.services.runtime import Container, Death, State

MAX_REQUEST = 4096  # bytes of one request line (the longest valid one is ~250)
MAX_REPLY = 16 * 1024 * 1024  # bytes of one reply line (a listing of many containers)
SHOWN = 40  # characters of a bad value echoed in an error

IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # a Docker id (or name)
PATTERNS: dict[str, re.Pattern[str]] = {
    "container": IDENT,
    "owner": re.compile(r"[0-9a-f]{12}"),  # appliance.services.runtime.owner_of
    "service": re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"),
    "config_hash": re.compile(r"[0-9a-f]{16}"),  # appliance.services.launcher.config_hash
}
SHAPES: dict[str, tuple[str, ...]] = {
    # ContainerRuntime
    "owned": ("owner",),
    "create": ("service", "owner", "config_hash"),
    "start": ("container",),
    "stop": ("container",),
    "pause": ("container",),
    "unpause": ("container",),
    "remove": ("container",),
    "refresh": ("container",),
    "deaths": ("owner",),
    # LabelSource
    "labelled": (),
    "inspect": ("container",),
    "events": (),
}
STREAMS = frozenset({"deaths", "events"})
STATES: frozenset[str] = frozenset({"running", "paused", "exited", "created", "missing"})
EVENT_ACTIONS = frozenset({"create", "start", "die", "destroy"})


class Invalid(Exception):
    """Not a request (or not a reply) of this wire; the text says why."""


@dataclass(frozen=True, slots=True)
class Request:
    verb: str
    container: str = ""
    owner: str = ""
    service: str = ""
    config_hash: str = ""


def _shown(value: object) -> str:
    text = json.dumps(value) if isinstance(value, str) else type(value).__name__
    return text if len(text) <= SHOWN else text[: SHOWN - 3] + "..."


def parse_request(line: bytes) -> Request:
    """One request line, checked strictly; :class:`Invalid` for anything else."""
    if len(line) > MAX_REQUEST:
        raise Invalid(f"request too long (at most {MAX_REQUEST} bytes)")
    try:
        data = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Invalid("not a JSON line (expected one object per line)") from None
    if not isinstance(data, dict):
        raise Invalid("expected a JSON object with a verb")
    verb = data.get("verb")
    if not isinstance(verb, str) or verb not in SHAPES:
        raise Invalid(f"unknown verb {_shown(verb)} (expected one of {', '.join(SHAPES)})")
    expected = SHAPES[verb]
    given = sorted(key for key in data if key != "verb")
    if given != sorted(expected):
        wanted = ", ".join(expected) or "no argument"
        raise Invalid(f"{verb}: arguments {', '.join(given) or 'none'} (expected {wanted})")
    args: dict[str, str] = {}
    for key in expected:
        value = data[key]
        if not isinstance(value, str) or PATTERNS[key].fullmatch(value) is None:
            raise Invalid(f"{verb}: {key} {_shown(value)} is not valid")
        args[key] = value
    return Request(verb, **args)


def request_line(verb: str, **args: str) -> bytes:
    return json.dumps({"verb": verb, **args}).encode() + b"\n"


def reply_line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, allow_nan=False).encode() + b"\n"


# ---------------------------------------------------------------- the types, both ways


def container_json(c: Container) -> dict[str, Any]:
    return {
        "id": c.id,
        "name": c.name,
        "service": c.service,
        "state": c.state,
        "address": c.address,
        "labels": dict(c.labels),
        "health": c.health,
        "started_at": c.started_at,
        "inner": None if c.inner is None else [c.inner.port, c.inner.proto],
    }


def _text(data: dict[str, Any], key: str, optional: bool = False) -> Any:
    value = data.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise Invalid(f"{key}: expected a string, got {_shown(value)}")
    return value


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Invalid(f"{what}: expected an object, got {_shown(value)}")
    return value


def _labels(value: object) -> dict[str, str]:
    labels = _object(value, "labels")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise Invalid("labels: expected strings")
    return dict(labels)


def _port(value: object, zero: bool = False) -> int:
    if type(value) is not int or not (0 if zero else 1) <= value <= 65535:
        raise Invalid(f"expected a port, got {_shown(value)}")
    return value


def _proto(value: object) -> Any:
    if value not in ("tcp", "udp"):
        raise Invalid(f"expected tcp or udp, got {_shown(value)}")
    return value


def container_from(value: object) -> Container:
    data = _object(value, "container")
    state = data.get("state")
    if state not in STATES:
        raise Invalid(f"state: {_shown(state)}")
    started = data.get("started_at")
    if started is not None and (
        type(started) not in (int, float) or not math.isfinite(float(started))
    ):
        raise Invalid(f"started_at: {_shown(started)}")
    inner = data.get("inner")
    step = None
    if inner is not None:
        if not isinstance(inner, list) or len(inner) != 2:
            raise Invalid("inner: expected [port, proto]")
        step = Step(_port(inner[0]), _proto(inner[1]))
    the_state: State = state
    return Container(
        id=_text(data, "id"),
        name=_text(data, "name"),
        service=_text(data, "service"),
        state=the_state,
        address=_text(data, "address", optional=True),
        labels=_labels(data.get("labels")),
        health=_text(data, "health", optional=True),
        started_at=None if started is None else float(started),
        inner=step,
    )


def facts_json(f: ContainerFacts) -> dict[str, Any]:
    return {
        "id": f.id,
        "name": f.name,
        "state": f.state,
        "labels": [[k, v] for k, v in f.labels],
        "published": [
            {
                "port": p.port,
                "proto": p.proto,
                "bindings": [[b.host_ip, b.host_port] for b in p.bindings],
            }
            for p in f.published
        ],
        "addresses": list(f.addresses),
        "started_at": f.started_at,
    }


def _address(value: object) -> str:
    """One address exactly as :mod:`ipaddress` prints it (no scope id, no other spelling)."""
    if not isinstance(value, str) or "%" in value:
        raise Invalid(f"address: {_shown(value)}")
    try:
        canonical = str(ipaddress.ip_address(value))
    except ValueError:
        raise Invalid(f"address: {_shown(value)}") from None
    if canonical != value:
        raise Invalid(f"address: {_shown(value)}")
    return value


def _when(value: object, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Invalid(f"{what}: {_shown(value)}")
    return float(value)


def _pairs(value: object, what: str) -> list[list[Any]]:
    if not isinstance(value, list) or not all(isinstance(p, list) and len(p) == 2 for p in value):
        raise Invalid(f"{what}: expected a list of pairs")
    return value


def facts_from(value: object) -> ContainerFacts:
    data = _object(value, "facts")
    labels = _pairs(data.get("labels"), "labels")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels):
        raise Invalid("labels: expected strings")
    published: list[Published] = []
    entries = data.get("published")
    if not isinstance(entries, list):
        raise Invalid("published: expected a list")
    for entry in entries:
        item = _object(entry, "published")
        bindings = _pairs(item.get("bindings"), "bindings")
        if not all(isinstance(ip, str) for ip, _ in bindings):
            raise Invalid("bindings: expected [host_ip, host_port]")
        published.append(
            Published(
                _port(item.get("port")),
                _proto(item.get("proto")),
                tuple(Binding(ip, _port(port, zero=True)) for ip, port in bindings),
            )
        )
    return ContainerFacts(
        id=_text(data, "id"),
        name=_text(data, "name"),
        state=_text(data, "state"),
        labels=tuple((k, v) for k, v in labels),
        published=tuple(published),
        addresses=tuple(_address(a) for a in _list(data.get("addresses", []), "addresses")),
        started_at=_when(data.get("started_at"), "started_at"),
    )


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list) or len(value) > 64:
        raise Invalid(f"{what}: expected a short list")
    return value


def death_json(d: Death) -> dict[str, Any]:
    return {"service": d.service, "container": d.container, "at": d.at}


def death_from(value: object) -> Death:
    data = _object(value, "death")
    at = data.get("at")
    if at is not None and (type(at) not in (int, float) or not math.isfinite(float(at))):
        raise Invalid(f"at: {_shown(at)}")
    return Death(
        _text(data, "service"), _text(data, "container"), None if at is None else float(at)
    )


def event_json(e: ContainerEvent) -> dict[str, Any]:
    return {"action": e.action, "id": e.id, "name": e.name}


def event_from(value: object) -> ContainerEvent:
    data = _object(value, "event")
    action = _text(data, "action")
    if action not in EVENT_ACTIONS:
        raise Invalid(f"action: {_shown(action)}")
    return ContainerEvent(action, _text(data, "id"), _text(data, "name"))
