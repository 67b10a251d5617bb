"""Parsers for the values both configuration formats share.

Each parser takes what the user wrote and returns a model value, or raises
:class:`Invalid` with "what is wrong (what was expected)". The format readers add
the file, line and key. knockd turns garbage into numbers (``abc`` -> 0, ``-1`` ->
65535, ``2x`` -> 2); these parsers reject it.
"""

from __future__ import annotations

import ipaddress
import math
import re

from appliance.core.model import MAX_STEPS, TCP_FLAG_BITS, Proto, Step, TcpFlags


class Invalid(ValueError):
    """A value that cannot be used; the message says what was expected."""


_DIGITS = re.compile(r"[0-9]+")
_INTERFACE = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")
_DOOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def parse_port(text: object) -> int:
    if isinstance(text, bool):
        raise Invalid(f"{text!r} is not a port (expected a number from 1 to 65535)")
    if isinstance(text, int):
        value = text
    elif isinstance(text, str) and _DIGITS.fullmatch(text.strip()):
        value = int(text.strip())
    else:
        raise Invalid(f"{text!r} is not a port (expected a number from 1 to 65535)")
    if not 1 <= value <= 65535:
        raise Invalid(f"port {value} is out of range (expected a number from 1 to 65535)")
    return value


def parse_proto(text: str) -> Proto:
    proto = text.strip().lower()
    if proto == "tcp":
        return "tcp"
    if proto == "udp":
        return "udp"
    raise Invalid(f"protocol {text.strip()!r} is not supported (expected tcp or udp)")


def parse_step(item: object, default_proto: Proto = "tcp") -> Step:
    """``7000``, ``"7000"``, ``"7000/udp"`` or ``"7000:udp"`` (knockd's form)."""
    if isinstance(item, str):
        text = item.strip()
        for sep in ("/", ":"):
            if sep in text:
                port, _, proto = text.partition(sep)
                return Step(parse_port(port), parse_proto(proto))
        return Step(parse_port(text), default_proto)
    return Step(parse_port(item), default_proto)


def parse_sequence(value: object) -> tuple[Step, ...]:
    """A list of steps, or knockd's comma-separated ``7000,8000:udp,9000`` string."""
    if isinstance(value, str):
        items: list[object] = [part for part in value.split(",")]
        if any(not str(part).strip() for part in items):
            raise Invalid(f"{value!r} has an empty step (expected PORT[:tcp|udp],...)")
    elif isinstance(value, list):
        items = list(value)
    else:
        raise Invalid("expected a list of steps like 7000/tcp, or a string 7000,8000:udp")
    if not items:
        raise Invalid("the sequence is empty (expected at least one step)")
    if len(items) > MAX_STEPS:
        raise Invalid(f"{len(items)} steps is too many (expected at most {MAX_STEPS})")
    return tuple(parse_step(item) for item in items)


def parse_tcpflags(parts: list[str], base: TcpFlags | None = None) -> TcpFlags:
    """knockd's flag list: ``syn,!ack``; names fin syn rst psh ack urg; ``!`` negates."""
    must_set = base.must_set if base else 0
    must_clear = base.must_clear if base else 0
    for raw in parts:
        token = raw.strip().lower()
        if not token:
            continue
        negate = token.startswith("!")
        name = token[1:].strip() if negate else token
        bit = TCP_FLAG_BITS.get(name)
        if bit is None:
            raise Invalid(
                f"unknown TCP flag {raw.strip()!r} (expected some of "
                f"{', '.join(TCP_FLAG_BITS)}, each optionally preceded by !)"
            )
        if negate:
            must_clear |= bit
        else:
            must_set |= bit
    both = must_set & must_clear
    if both:
        names = [name for name, bit in TCP_FLAG_BITS.items() if bit & both]
        raise Invalid(
            f"flag {names[0]} is both required and forbidden "
            f"(expected each flag at most once, with or without !)"
        )
    return TcpFlags(must_set, must_clear)


def split_flags(value: object) -> list[str]:
    if isinstance(value, str):
        return value.split(",")
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return [str(item) for item in value]
    raise Invalid("expected a flag list like syn,!ack")


def parse_seconds(value: object, *, minimum: float, maximum: float, what: str) -> float:
    """A number of seconds, fractional allowed: ``5``, ``0.5``, ``"2.5"``."""
    if isinstance(value, bool):
        raise Invalid(f"{value!r} is not a number of seconds (expected {what})")
    if isinstance(value, int | float) or (
        isinstance(value, str) and re.fullmatch(r"\s*[0-9]+(\.[0-9]+)?\s*", value)
    ):
        number = float(value)
    else:
        raise Invalid(f"{value!r} is not a number of seconds (expected {what})")
    if not math.isfinite(number) or not minimum <= number <= maximum:
        raise Invalid(f"{value!r} is out of range (expected {what})")
    return number


def parse_count(value: object, *, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise Invalid(f"{value!r} is not a whole number (expected {minimum} to {maximum})")
    if isinstance(value, str):
        if not _DIGITS.fullmatch(value.strip()):
            raise Invalid(f"{value!r} is not a whole number (expected {minimum} to {maximum})")
        value = int(value.strip())
    if not minimum <= value <= maximum:
        raise Invalid(f"{value} is out of range (expected {minimum} to {maximum})")
    return value


def parse_address(value: object) -> str:
    """An IPv4 or IPv6 address, returned in canonical form."""
    if not isinstance(value, str):
        raise Invalid(f"{value!r} is not an address (expected an IPv4 or IPv6 address)")
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise Invalid(f"{value!r} is not an address (expected an IPv4 or IPv6 address)") from None


def parse_interface(value: object) -> str:
    if not isinstance(value, str) or not _INTERFACE.fullmatch(value.strip()):
        raise Invalid(f"{value!r} is not an interface name (expected a name like eth0)")
    return value.strip()


def parse_door_name(value: object) -> str:
    if not isinstance(value, str) or not _DOOR_NAME.fullmatch(value):
        raise Invalid(
            f"{value!r} is not a door name (expected letters, digits, '_', '.', '-', "
            "starting with a letter or digit, at most 63 characters)"
        )
    return value


def parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("yes", "true", "on", "1"):
            return True
        if word in ("no", "false", "off", "0"):
            return False
    raise Invalid(f"{value!r} is not a yes/no value (expected yes or no)")


def parse_network(value: object) -> str:
    """An IPv4 or IPv6 network in CIDR form (an address alone is a /32 or /128)."""
    if not isinstance(value, str):
        raise Invalid(f"{value!r} is not a network (expected CIDR like 198.18.0.0/24)")
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise Invalid(f"{value!r} is not a network (expected CIDR like 198.18.0.0/24)") from None
