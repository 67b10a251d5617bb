"""The authenticated knocks of the YAML configuration: TOTP sequences and SPA doors.

Schema::

    doors:
      NAME:
        knock:
          totp: {secret: BASE32, steps: 4, period: 30, ports: 20000-29999,
                 protocol: tcp, skew: 1}
          seq_timeout: 10
        open: {ports: [22/tcp], duration: 30}
      OTHER:
        spa:                      # instead of knock:
          port: 62201             # UDP, sniffed (nothing listens)
          max_age: 120            # seconds either way between the client's clock and ours
          max_time: 3600          # the longest access a client may ask for
          require_source_address: false   # true: refuse fwknop -s (0.0.0.0)
          receipt: true           # answer a granted packet with an encrypted receipt
          users:                  # {} when every user comes from `knockgate user add`
            alice:
              key_base64: ...     # fwknop --key-gen output, or key_file: FILE holding it
              hmac_key_base64: ...
              sources: [198.18.0.0/15]   # where the packet may come from and the
                                         # addresses it may ask for (default any)
              ports: [22/tcp]     # what alice may open (default: every port of the door)
              max_time: 300
        open: {ports: [22/tcp], duration: 30}
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Sequence
from typing import Any

from appliance.config.files import KEY_FILE_LIMIT, line_of_offset, read_bounded
from appliance.config.problems import Problems
from appliance.config.values import (
    PATH_SHOWN,
    Invalid,
    listed,
    parse_bool,
    parse_count,
    parse_network,
    parse_port,
    parse_proto,
    parse_seconds,
    parse_sequence,
    shown,
)
from appliance.config.yaml_nodes import _list_of, _Map, _string
from appliance.core.model import (
    DEFAULT_SPA_MAX_AGE,
    DEFAULT_SPA_PORT,
    MAX_SPA_MAX_AGE,
    MAX_TOTP_SKEW,
    Door,
    OpenPorts,
    Spa,
    SpaUser,
    Totp,
)

TOTP_KEYS = ("secret", "steps", "period", "ports", "protocol", "skew")
SPA_KEYS = ("port", "max_age", "max_time", "require_source_address", "receipt", "users")
USER_KEYS = ("key_base64", "hmac_key_base64", "key_file", "sources", "ports", "max_time")
MIN_SECRET_BYTES = 10  # 80 bits, RFC 4226's minimum
WEAK_TOTP_SEQUENCES = 10**9  # fewer possible sequences than this: a warning
MAX_ACCESS_TIME = 7 * 86_400.0


def parse_base32(value: object) -> bytes:
    if not isinstance(value, str):
        raise Invalid(f"{shown(value)} is not text (expected a base32 secret)")
    text = re.sub(r"[\s-]", "", value).upper()
    try:
        secret = base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        raise Invalid("is not base32 (expected letters A-Z and digits 2-7)") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise Invalid(
            f"is {len(secret)} bytes (expected at least {MIN_SECRET_BYTES}; "
            "`knockgate keygen --totp` makes one)"
        )
    return secret


def parse_port_range(value: object) -> tuple[int, int]:
    text = value if isinstance(value, str) else ""
    low, sep, high = text.partition("-")
    if not sep:
        raise Invalid(f"{shown(value)} is not a range (expected LOW-HIGH, like 20000-40000)")
    first, last = parse_port(low.strip()), parse_port(high.strip())
    if first > last:
        raise Invalid(f"{shown(text)} runs backwards (expected LOW-HIGH with LOW <= HIGH)")
    return first, last


def parse_key(value: object, *, minimum: int, maximum: int) -> bytes:
    if not isinstance(value, str):
        raise Invalid(f"{shown(value)} is not text (expected base64)")
    try:
        key = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise Invalid("is not base64") from None
    if not minimum <= len(key) <= maximum:
        raise Invalid(f"is {len(key)} bytes (expected {minimum} to {maximum})")
    return key


def parse_totp(knock: _Map, problems: Problems) -> Totp | None:
    spec = knock.mapping("totp", TOTP_KEYS)
    if spec is None:
        return None
    secret = spec.get("secret", parse_base32)
    if "secret" not in spec.items:
        problems.error(spec.line, spec.key("secret"), "missing (expected a base32 secret)")
    steps = spec.get("steps", lambda v: parse_count(v, minimum=1, maximum=32))
    period = spec.get("period", lambda v: parse_count(v, minimum=5, maximum=3600))
    ports = spec.get("ports", parse_port_range)
    proto = spec.get("protocol", lambda v: parse_proto(_string(v)))
    skew = spec.get("skew", lambda v: parse_count(v, minimum=0, maximum=MAX_TOTP_SKEW))
    if secret is None:
        return None
    default = Totp(secret)
    low, high = ports or (default.low, default.high)
    totp = Totp(
        secret=secret,
        steps=default.steps if steps is None else steps,
        period=default.period if period is None else period,
        low=low,
        high=high,
        proto=proto or default.proto,
        skew=default.skew if skew is None else skew,
    )
    if high - low + 1 < totp.steps * 4:
        problems.error(
            spec.line_of("ports"),
            spec.key("ports"),
            f"{low}-{high} is too narrow for {totp.steps} steps (expected at least "
            f"{totp.steps * 4} ports)",
        )
        return None
    if totp.steps < 3 or (high - low + 1) ** totp.steps < WEAK_TOTP_SEQUENCES:
        problems.warn(
            spec.line,
            spec.key("steps"),
            f"{totp.steps} step(s) over {high - low + 1} ports can be guessed "
            f"(fewer than {WEAK_TOTP_SEQUENCES:.0e} sequences; expected 3 or more steps "
            "over a wider range)",
        )
    return totp


def check_spa_ports(doors: Sequence[Door], lines: dict[str, int], problems: Problems) -> None:
    """An SPA port takes every UDP packet with a payload on it: no door may knock there
    (a knock would be read as a broken SPA packet and lost). Two SPA doors on one port
    with the same keys: the second is never reached."""
    udp_steps: dict[int, str] = {}
    for door in doors:
        knock = door.knock
        steps = list(knock.sequence)
        if knock.one_time is not None:
            steps += [step for seq in knock.one_time.sequences for step in seq.steps]
        for step in steps:
            if step.proto == "udp":
                udp_steps.setdefault(step.port, door.name)
    keys: dict[tuple[int, bytes], str] = {}
    for door in doors:
        if door.spa is None:
            continue
        port, key = door.spa.port, f"doors.{door.name}.spa.port"
        clash = udp_steps.get(port)
        for other in doors:
            totp = other.knock.totp
            if totp is not None and totp.proto == "udp" and totp.low <= port <= totp.high:
                clash = clash or other.name
        if clash is not None:
            problems.error(
                lines[door.name],
                key,
                f"{port}/udp is also a knock port of door {clash} (expected a port no door "
                "knocks on)",
            )
        for user in door.spa.users:
            first = keys.setdefault((port, user.hmac_key), door.name)
            if first != door.name:
                problems.warn(
                    lines[door.name],
                    f"doors.{door.name}.spa.users.{shown(user.name, text=True)}",
                    f"door {first} on the same port has the same HMAC key: its packets "
                    "always open that door, never this one",
                )


def parse_spa(
    door: _Map, path: str, problems: Problems, open_ports: OpenPorts | None
) -> Spa | None:
    """The ``spa:`` of a door; ``open_ports`` is what the door opens (users' limit)."""
    spec = door.mapping("spa", SPA_KEYS)
    if spec is None:
        return None
    port = spec.get("port", parse_port)
    max_age = spec.get(
        "max_age",
        lambda v: parse_seconds(v, minimum=1.0, maximum=MAX_SPA_MAX_AGE, what="1 to 3600 s"),
    )
    max_time = spec.get(
        "max_time",
        lambda v: parse_seconds(v, minimum=1.0, maximum=MAX_ACCESS_TIME, what="1 to 604800 s"),
    )
    require = spec.get("require_source_address", parse_bool)
    receipt = spec.get("receipt", parse_bool)
    users: list[SpaUser] = []
    users_map = spec.mapping("users", ())
    if users_map is None:
        if "users" not in spec.items:
            problems.error(spec.line, spec.key("users"), "missing (expected users: {NAME: keys})")
    else:
        for name, (node, line) in users_map.items.items():
            user = _user(name, node, line, users_map.key(name), path, problems, open_ports)
            if user is not None:
                users.append(user)
    # ``users: {}`` is a door whose users all come from ``knockgate user add`` (the
    # managed file); with none it opens for nobody (a warning once merged).
    if not users and (users_map is None or users_map.items):
        return None
    default = Spa(users=())
    return Spa(
        users=tuple(users),
        port=DEFAULT_SPA_PORT if port is None else port,
        max_age=DEFAULT_SPA_MAX_AGE if max_age is None else max_age,
        max_time=default.max_time if max_time is None else max_time,
        require_source_address=default.require_source_address if require is None else require,
        receipt=bool(receipt),
    )


def _user(
    name: str,
    node: Any,
    line: int,
    where: str,
    path: str,
    problems: Problems,
    open_ports: OpenPorts | None,
) -> SpaUser | None:
    from yaml.nodes import MappingNode

    if not isinstance(node, MappingNode):
        problems.error(line, where, "expected a mapping with key_base64 and hmac_key_base64")
        return None
    user = _Map(node, where, USER_KEYS, problems, line)
    errors = problems.error_count
    key = user.get("key_base64", lambda v: parse_key(v, minimum=16, maximum=32))
    hmac_key = user.get("hmac_key_base64", lambda v: parse_key(v, minimum=16, maximum=128))
    if "key_file" in user.items:
        if "key_base64" in user.items or "hmac_key_base64" in user.items:
            problems.error(
                user.line_of("key_file"),
                user.key("key_file"),
                "given with key_base64/hmac_key_base64 (expected one or the other)",
            )
        file = user.get("key_file", _string)
        if file is not None:
            if not os.path.isabs(file):
                file = os.path.join(os.path.dirname(path) or ".", file)
            key, hmac_key = _key_file(file, user, problems)
    elif key is None or hmac_key is None:
        for missing in ("key_base64", "hmac_key_base64"):
            if missing not in user.items:
                problems.error(
                    user.line, user.key(missing), "missing (expected base64, or key_file: FILE)"
                )
    if key is not None and key == hmac_key:
        problems.error(
            user.line, where, "the HMAC key equals the encryption key (expected two keys)"
        )
    sources = user.get("sources", _list_of(parse_network))
    ports = user.get("ports", parse_sequence)
    beyond = [str(p) for p in ports or () if open_ports is not None and p not in open_ports.ports]
    if beyond and open_ports is not None:
        problems.error(
            user.line_of("ports"),
            user.key("ports"),
            f"{listed(beyond)} is not a port of the door (expected some of "
            f"{listed(str(p) for p in open_ports.ports)})",
        )
    max_time = user.get(
        "max_time",
        lambda v: parse_seconds(v, minimum=1.0, maximum=MAX_ACCESS_TIME, what="1 to 604800 s"),
    )
    if key is None or hmac_key is None or problems.error_count != errors:
        return None
    return SpaUser(
        name=name,
        key=key,
        hmac_key=hmac_key,
        sources=tuple(sources or ()),
        ports=ports,
        max_time=max_time,
    )


def _key_file(file: str, user: _Map, problems: Problems) -> tuple[bytes | None, bytes | None]:
    """``KEY_BASE64: ...`` and ``HMAC_KEY_BASE64: ...`` lines, as ``fwknop --key-gen`` prints."""
    where = user.key("key_file")
    name = shown(file, text=True, limit=PATH_SHOWN)
    try:
        data = read_bounded(file, KEY_FILE_LIMIT)
        lines = data.decode("utf-8").split("\n")
    except Invalid as problem:
        problems.error(user.line_of("key_file"), where, str(problem))
        return None, None
    except UnicodeDecodeError as error:
        problems.error(
            user.line_of("key_file"),
            where,
            f"{name}:{line_of_offset(data, error.start)}: not UTF-8 text (expected the output "
            "of `knockgate keygen` or `fwknop --key-gen`)",
        )
        return None, None
    found: dict[str, bytes | None] = {}
    for number, text in enumerate(lines, 1):
        words = text.replace(":", " ", 1).split()
        if len(words) != 2 or words[0] not in ("KEY_BASE64", "HMAC_KEY_BASE64"):
            continue
        limit = 32 if words[0] == "KEY_BASE64" else 128
        try:
            found[words[0]] = parse_key(words[1], minimum=16, maximum=limit)
        except Invalid as problem:
            message = f"{name}:{number}: {words[0]} {problem}"
            problems.error(user.line_of("key_file"), where, message)
    for key in ("KEY_BASE64", "HMAC_KEY_BASE64"):
        if key not in found:
            problems.error(
                user.line_of("key_file"),
                where,
                f"{name} has no {key} line (expected "
                "the output of `knockgate keygen` or `fwknop --key-gen`)",
            )
    return found.get("KEY_BASE64"), found.get("HMAC_KEY_BASE64")
