"""The ``fleet:`` settings and the doors' own ``fleet:`` key, read from YAML.

::

    fleet:
      name: prod                  # the group: Redis keys are kg:{prod}:...
      host: web-1                 # this host's name (default: the hostname)
      redis: redis://knockgate@198.18.0.5:6379/0   # rediss:// for TLS; no password here
      password_file: /run/secrets/knockgate-redis  # the ACL user's password
      tls: {ca: FILE, cert: FILE, key: FILE}        # with rediss://
      sentinel: {master: NAME, hosts: [HOST:PORT, ...]}   # or cluster: true
      on_outage: refuse           # refuse | local
      claim_timeout: 1            # seconds a shared claim may take
    doors:
      NAME:
        fleet: false              # this door stays local (default: true)
        fleet: {start_services: true}   # a grant made elsewhere starts the service here
"""

from __future__ import annotations

import os
import re
import socket
import urllib.parse
from typing import Any

from yaml.nodes import MappingNode

from appliance.config.problems import Problems
from appliance.config.schema import FleetSentinel, FleetSettings, FleetTls
from appliance.config.values import NAME, Invalid, parse_bool, parse_seconds, shown
from appliance.config.yaml_nodes import _choice, _line, _list_of, _Map, _string

FLEET_KEYS = (
    "name",
    "host",
    "redis",
    "password_file",
    "tls",
    "sentinel",
    "cluster",
    "on_outage",
    "claim_timeout",
)
TLS_KEYS = ("ca", "cert", "key")
SENTINEL_KEYS = ("master", "hosts")
DOOR_FLEET_KEYS = ("start_services",)
_SCHEMES = ("redis", "rediss", "unix")


def parse_fleet(top: _Map) -> FleetSettings | None:
    """``fleet:`` (``None`` when absent or invalid: the errors are in ``top.problems``)."""
    spec = top.mapping("fleet", FLEET_KEYS)
    if spec is None:
        return None
    problems = spec.problems
    errors = problems.error_count
    name = spec.get("name", _group_name)
    if "name" not in spec.items:
        problems.error(spec.line, spec.key("name"), "missing (expected the fleet's name)")
    host = spec.get("host", _group_name) or _group_name(socket.gethostname().split(".")[0])
    sentinel = _sentinel(spec)
    cluster = bool(spec.get("cluster", parse_bool))
    redis = spec.get("redis", _redis_url)
    if "redis" not in spec.items:
        problems.error(spec.line, spec.key("redis"), "missing (expected redis://USER@HOST:PORT/DB)")
    if sentinel is not None and cluster:
        problems.error(
            spec.line_of("cluster"),
            spec.key("cluster"),
            "a fleet uses Sentinel or Cluster (expected one of them, not both)",
        )
    password_file = _password_file(spec)
    tls = _tls(spec)
    if tls is not None and redis is not None and not redis.startswith("rediss://"):
        problems.error(
            spec.line_of("tls"), spec.key("tls"), "TLS needs a rediss:// URL in fleet.redis"
        )
    on_outage = spec.get("on_outage", _choice("refuse", "local")) or "refuse"
    claim_timeout = spec.get(
        "claim_timeout",
        lambda v: parse_seconds(v, minimum=0.05, maximum=10.0, what="0.05 to 10 seconds"),
    )
    if on_outage == "local":
        problems.warn(
            spec.line_of("on_outage"),
            spec.key("on_outage"),
            "with the shared state unreachable, an SPA packet or TOTP step used on another "
            "host is accepted here (on_outage: local)",
        )
    if problems.error_count != errors or name is None or redis is None:
        return None
    return FleetSettings(
        name=name,
        host=host,
        redis=redis,
        password_file=password_file,
        tls=tls,
        sentinel=sentinel,
        cluster=cluster,
        on_outage="local" if on_outage == "local" else "refuse",
        claim_timeout=1.0 if claim_timeout is None else claim_timeout,
    )


def door_fleet(doors: _Map | None, problems: Problems) -> tuple[frozenset[str], frozenset[str]]:
    """The doors' own ``fleet:`` keys: (doors that stay local, doors whose service a
    fleet grant starts here)."""
    local: set[str] = set()
    start: set[str] = set()
    for name, (node, _) in (doors.items if doors else {}).items():
        if not isinstance(node, MappingNode):
            continue
        for key_node, value in node.value:
            if getattr(key_node, "value", None) != "fleet":
                continue
            where = f"doors.{shown(name, text=True)}.fleet"
            line = _line(key_node)
            if isinstance(value, MappingNode):
                spec = _Map(value, where, DOOR_FLEET_KEYS, problems, line)
                if spec.get("start_services", parse_bool):
                    start.add(name)
                continue
            try:
                if not _door_flag(value):
                    local.add(name)
            except Invalid as problem:
                problems.error(line, where, str(problem))
    return frozenset(local), frozenset(start)


def _door_flag(node: Any) -> bool:
    try:
        return parse_bool(node.value)
    except (Invalid, AttributeError):
        raise Invalid(
            f"{shown(getattr(node, 'value', node))} is not allowed (expected true, false or "
            "{start_services: true})"
        ) from None


def _group_name(value: Any) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise Invalid(
            f"{shown(value)} is not a fleet or host name (expected letters, digits, '_', "
            "'.', '-', at most 63 characters)"
        )
    return value


def _redis_url(value: Any) -> str:
    """A Redis URL without a password; no message ever shows a password given (an
    error shows the URL with everything from ``://`` to its last ``@`` replaced, and
    never the parser's own words, which can quote a piece of it)."""
    text = _string(value)
    seen = shown(redacted(text))
    head, at, _ = text.rpartition("@")
    userinfo = head.partition("://")[2] if at else ""
    if ":" in userinfo or "password=" in text.lower():
        raise Invalid(
            "the URL holds a password, or an '@' after its host (expected the password in "
            "fleet.password_file, never inline)"
        )
    try:
        url = urllib.parse.urlsplit(text)
        url.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise Invalid(f"{seen} is not a Redis URL (a bad host or port)") from None
    if at and url.netloc.rpartition("@")[0] != userinfo:
        raise Invalid(f"{seen} is not a Redis URL (an '@' after its host)")
    if url.scheme not in _SCHEMES or not (url.hostname or url.path):
        raise Invalid(
            f"{seen} is not a Redis URL (expected redis://USER@HOST:PORT/DB, "
            "rediss://... or unix:///PATH)"
        )
    return text


_QUERY_PASSWORD = re.compile(r"(password=)[^&#]*", re.IGNORECASE)


def redacted(url: str) -> str:
    """``url`` with everything from ``://`` to its last ``@`` (a user name, and any
    password, however it is spelt) replaced by ``***``, and any ``password=``."""
    head, at, tail = url.rpartition("@")
    if at:
        scheme, sep, _ = head.partition("://")
        url = f"{scheme}{sep}***@{tail}" if sep else f"***@{tail}"
    return _QUERY_PASSWORD.sub(r"\1***", url)


def _password_file(spec: _Map) -> str | None:
    path: str | None = spec.get("password_file", _readable_file)
    # Group-readable is how the shipped deployments hand it over (0640 / 0440 with the
    # appliance's group): only a file every user can read is warned about.
    if path is not None and os.stat(path).st_mode & 0o004:
        spec.problems.warn(
            spec.line_of("password_file"),
            spec.key("password_file"),
            f"{shown(path, text=True)} is readable by every user "
            "(expected mode 0600, or 0640 with knockgate's group: it holds the fleet's "
            "Redis password)",
        )
    return path


def _readable_file(value: Any) -> str:
    path = _string(value)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise Invalid(f"{shown(path, text=True)} is not a readable file")
    return path


def _tls(spec: _Map) -> FleetTls | None:
    tls = spec.mapping("tls", TLS_KEYS)
    if tls is None:
        return None
    if ("cert" in tls.items) != ("key" in tls.items):
        tls.problems.error(tls.line, tls.path, "a client certificate needs both cert and key")
    return FleetTls(
        ca=tls.get("ca", _readable_file),
        cert=tls.get("cert", _readable_file),
        key=tls.get("key", _readable_file),
    )


def _sentinel(spec: _Map) -> FleetSentinel | None:
    sentinel = spec.mapping("sentinel", SENTINEL_KEYS)
    if sentinel is None:
        return None
    master = sentinel.get("master", _group_name)
    hosts = sentinel.get("hosts", _list_of(_host_port)) or ()
    if master is None or not hosts:
        sentinel.problems.error(
            sentinel.line, sentinel.path, "expected {master: NAME, hosts: [HOST:PORT, ...]}"
        )
        return None
    return FleetSentinel(master, tuple(hosts))


def _host_port(value: Any) -> tuple[str, int]:
    text = _string(value)
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise Invalid(f"{shown(text)} is not HOST:PORT")
    return host.strip("[]"), int(port)
