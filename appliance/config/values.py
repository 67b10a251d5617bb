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
import reprlib
from collections.abc import Iterable

from appliance.core.model import MAX_STEPS, TCP_FLAG_BITS, Proto, Step, TcpFlags


class Invalid(ValueError):
    """A value that cannot be used; the message says what was expected."""


SHOWN = 60  # characters of user input an error message echoes at most
PATH_SHOWN = 256  # of a path (the file name is the point of the message)
MAX_DIGITS = 20  # digits a whole number may have (int() refuses 4300 and more)
_DIGITS = re.compile(rf"[0-9]{{1,{MAX_DIGITS}}}")
_SECONDS = re.compile(rf"\s*[0-9]{{1,{MAX_DIGITS}}}(\.[0-9]{{1,{MAX_DIGITS}}})?\s*")


class _Repr(reprlib.Repr):
    """reprlib, bounded also for huge integers (whose repr raises ValueError)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxdict = 3, 4, 4, 4
        self.maxset = self.maxfrozenset = 4
        self.maxstring, self.maxother, self.maxlong = SHOWN, SHOWN, SHOWN

    def repr_int(self, x: int, level: int) -> str:
        return _number(x)


_REPR = _Repr()


def _number(x: int) -> str:
    if x.bit_length() > 64:
        return f"<a number of about {int(x.bit_length() * 0.30103) + 1} digits>"
    return repr(x)


def _escaped(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shown(value: object, *, text: bool = False, limit: int = SHOWN) -> str:
    """``value`` as an error message echoes it: its repr (``text``: a string without
    quotes, control characters escaped), cut to about ``limit`` characters.

    Every message that quotes what the user wrote goes through here, so a 1 MiB value,
    an alias bomb or a 5000-digit number never becomes a 1 MiB error line."""
    if isinstance(value, str):
        head = value[:limit]
        out = _escaped(head) if text else repr(head)
        quote = "" if text else out[-1]
        body = out[len(quote) : len(out) - len(quote)]
        if len(value) > limit or len(body) > limit:
            out = f"{quote}{body[:limit]}…{quote} ({len(value)} characters)"
        return out
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return _number(value)
    try:
        out = _REPR.repr(value)
    except Exception:  # a value no repr can show is still an error to report
        out = f"<{type(value).__name__}>"
    return out if len(out) <= limit else out[:limit] + "…"


def listed(names: Iterable[str], most: int = 12) -> str:
    """``a, b, c``: at most ``most`` names (each shortened), then how many more."""
    items = list(names)
    out = ", ".join(shown(name, text=True) for name in items[:most])
    if len(items) > most:
        out += f", … ({len(items)} in all)"
    return out


def _whole(text: str) -> int | None:
    """The number ``text`` spells in decimal digits (at most MAX_DIGITS), else None."""
    stripped = text.strip()
    return int(stripped) if _DIGITS.fullmatch(stripped) else None


_INTERFACE = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # a door's, fleet's or host's


def parse_port(text: object) -> int:
    number = _whole(text) if isinstance(text, str) else None
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif number is not None:
        value = number
    else:
        raise Invalid(f"{shown(text)} is not a port (expected a number from 1 to 65535)")
    if not 1 <= value <= 65535:
        raise Invalid(f"port {_number(value)} is out of range (expected a number from 1 to 65535)")
    return value


def parse_proto(text: str) -> Proto:
    proto = text.strip().lower()
    if proto == "tcp":
        return "tcp"
    if proto == "udp":
        return "udp"
    raise Invalid(f"protocol {shown(text.strip())} is not supported (expected tcp or udp)")


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
            raise Invalid(f"{shown(value)} has an empty step (expected PORT[:tcp|udp],...)")
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
                f"unknown TCP flag {shown(raw.strip())} (expected some of "
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
        raise Invalid(f"{shown(value)} is not a number of seconds (expected {what})")
    if isinstance(value, int | float) or (isinstance(value, str) and _SECONDS.fullmatch(value)):
        try:
            number = float(value)
        except OverflowError:  # an int beyond a float's range
            number = math.inf
    else:
        raise Invalid(f"{shown(value)} is not a number of seconds (expected {what})")
    if not math.isfinite(number) or not minimum <= number <= maximum:
        raise Invalid(f"{shown(value)} is out of range (expected {what})")
    return number


def parse_count(value: object, *, minimum: int, maximum: int) -> int:
    number = _whole(value) if isinstance(value, str) else value
    if isinstance(number, bool) or not isinstance(number, int):
        raise Invalid(f"{shown(value)} is not a whole number (expected {minimum} to {maximum})")
    if not minimum <= number <= maximum:
        raise Invalid(f"{_number(number)} is out of range (expected {minimum} to {maximum})")
    return number


def _no_zone(value: str, what: str) -> None:
    """``fe80::1%eth0``: ipaddress accepts a zone (scope id), the capture filter and the
    firewall do not."""
    if "%" in value:
        raise Invalid(
            f"{shown(value)} has a zone (scope id) after '%' (expected {what} without %zone: "
            "the capture filter and the firewall match addresses, not zones)"
        )


def parse_address(value: object) -> str:
    """An IPv4 or IPv6 address, returned in canonical form (no zone)."""
    if not isinstance(value, str):
        raise Invalid(f"{shown(value)} is not an address (expected an IPv4 or IPv6 address)")
    _no_zone(value, "an address")
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise Invalid(
            f"{shown(value)} is not an address (expected an IPv4 or IPv6 address)"
        ) from None


def parse_interface(value: object) -> str:
    if not isinstance(value, str) or not _INTERFACE.fullmatch(value.strip()):
        raise Invalid(f"{shown(value)} is not an interface name (expected a name like eth0)")
    return value.strip()


def parse_door_name(value: object) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise Invalid(
            f"{shown(value)} is not a door name (expected letters, digits, '_', '.', '-', "
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
    raise Invalid(f"{shown(value)} is not a yes/no value (expected yes or no)")


def parse_network(value: object) -> str:
    """An IPv4 or IPv6 network in CIDR form (an address alone is a /32 or /128)."""
    if not isinstance(value, str):
        raise Invalid(f"{shown(value)} is not a network (expected CIDR like 198.18.0.0/24)")
    _no_zone(value, "a network")
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise Invalid(
            f"{shown(value)} is not a network (expected CIDR like 198.18.0.0/24)"
        ) from None
