"""Chat templates: ``{text}``, ``{kind}``, ``{door}``, ... substituted into a URL, a
header or a body, each value escaped for where it goes, so that a door name, an address
or a detail can never break the request: inside a JSON body a value is a JSON string's
content, in a URL a percent-encoded part, in a form body form-encoded, in a header one
line without control characters (an RFC 2047 encoded word beyond ASCII).
Braces that are not a placeholder (``{"text": ...}``) are left alone."""

from __future__ import annotations

import base64
import itertools
import json
import re
import time
from collections.abc import Callable, Mapping
from urllib.parse import quote, quote_plus

from appliance.runtime.events_log import EventRecord

PLACEHOLDERS = (
    "text",
    "title",
    "kind",
    "door",
    "address",
    "service",
    "detail",
    "host",
    "time",
    "token",
    "txn",
)
_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Values that would break an unescaped body: the check renders a template with them.
_HOSTILE = 'a "quoted" \\ back\nslash & a=b {text} </x> \u2028 \x00'


class TemplateError(ValueError):
    """A template that cannot be rendered safely (the message says why)."""


def escaper(kind: str) -> Callable[[str], str]:
    """How a value is escaped for ``kind``: ``url``, ``header`` or a content type."""
    lowered = kind.lower()
    if kind == "url":
        return lambda value: quote(value, safe="")
    if kind == "header":
        return header_value
    if "json" in lowered:
        return lambda value: json.dumps(value)[1:-1]
    if "x-www-form-urlencoded" in lowered:
        return quote_plus
    return lambda value: value


def header_value(value: str) -> str:
    """One line without control characters; beyond ASCII an RFC 2047 encoded word
    (``=?utf-8?b?...?=``, which ntfy and mail-minded receivers decode): HTTP sends
    headers as Latin-1 and a curly apostrophe must not make a request unbuildable."""
    text = " ".join("".join(c for c in value if c.isspace() or c.isprintable()).split())
    if text.isascii():
        return text
    return "=?utf-8?b?" + base64.b64encode(text.encode()).decode("ascii") + "?="


def render(template: str, values: Mapping[str, str], kind: str) -> str:
    escape = escaper(kind)

    def field(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in PLACEHOLDERS:
            return match.group(0)
        return escape(values.get(name, ""))

    return _FIELD.sub(field, template)


def check_template(template: str, kind: str) -> None:
    """Refuse an unknown placeholder, and a JSON body that is not JSON once filled in
    (even with hostile values: a placeholder outside a JSON string)."""
    for match in _FIELD.finditer(template):
        if match.group(1) not in PLACEHOLDERS:
            raise TemplateError(
                f"unknown placeholder {{{match.group(1)}}} (expected one of "
                + ", ".join("{" + name + "}" for name in PLACEHOLDERS)
                + ")"
            )
    if "json" in kind.lower():
        sample = dict.fromkeys(PLACEHOLDERS, _HOSTILE)
        try:
            json.loads(render(template, sample, kind))
        except ValueError:
            raise TemplateError(
                "the body is not valid JSON once filled in (each placeholder goes inside "
                'a JSON string, e.g. {"text": "{text}"})'
            ) from None


def describe(record: EventRecord) -> str:
    """The record as one line without its time stamp (chat messages carry their own)."""
    if record.kind == "knocks":  # the aggregator's summary: its detail says it all
        return f"knock noise: {record.detail}"
    return record.text().split(" ", 2)[2]


_txn = itertools.count(1)  # Matrix's transaction ids: unique within this run


def values(record: EventRecord, host: str, token: str = "") -> dict[str, str]:
    """The placeholders' values for ``record``."""
    return {
        "text": f"{host}: {describe(record)}",
        "title": f"knockgate {record.kind} on {host}",
        "kind": record.kind,
        "door": record.door,
        "address": record.address,
        "service": record.service,
        "detail": record.detail,
        "host": host,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(record.time)),
        "token": token,
        "txn": f"kg{time.time_ns()}-{next(_txn)}",
    }
