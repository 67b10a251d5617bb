"""Reads the ``notify:`` settings of the YAML configuration (webhook, chat, mail).

Schema::

    notify:
      NAME:                       # a label of the notification metrics: [a-z0-9_-]
        webhook: {url: http(s)://..., secret_file: PATH, timeout: 10}
        chat: {preset: ntfy|slack|matrix, url: ... | url_file: PATH, method: POST|PUT,
               content_type: ..., headers: {NAME: VALUE}, body: TEMPLATE,
               token_file: PATH, timeout: 10}
        mail: {host: HOST, port: 25, tls: none|starttls|tls, username: USER,
               password_file: PATH, from: ADDRESS, to: [ADDRESS, ...],
               every: 1h | at: "07:00", quiet: send|skip, subject: TEXT}
        events: [opened, held-off, ...]   # or all; default: a notifier kind's own set
        queue: 1000               # deliveries kept while the receiver is down
        flood_threshold: 100      # knock noise a minute that is summarised on its own
        per_minute: 5             # records one address causes, sent one by one a minute

Secrets (the webhook's HMAC key, a chat token, the SMTP password) are read from files
that only their owner (and group) may read; written inline in the YAML they are refused:
the configuration is shown, exported and backed up, a secret must not travel with it.
The files are read here, when the configuration is loaded (at start and at each reload),
so a missing or unreadable secret is a configuration error, named by file, line and key.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from typing import Any, Literal

from appliance.config.files import read_bounded
from appliance.config.schema import Chat, Mail, Notifier, Webhook
from appliance.config.values import Invalid, parse_count, parse_port, shown
from appliance.config.yaml_nodes import _choice, _list_of, _Map, _string
from appliance.notify.template import TemplateError, check_template
from appliance.runtime.events_log import KINDS

NOTIFIER_KEYS = ("webhook", "chat", "mail", "events", "queue", "flood_threshold", "per_minute")
WEBHOOK_KEYS = ("url", "secret_file", "secret", "timeout")
CHAT_KEYS = (
    "preset",
    "url",
    "url_file",
    "method",
    "content_type",
    "headers",
    "body",
    "token_file",
    "token",
    "timeout",
)
MAIL_KEYS = (
    "host",
    "port",
    "tls",
    "username",
    "password_file",
    "password",
    "from",
    "to",
    "every",
    "at",
    "quiet",
    "subject",
    "timeout",
)
EVENT_KINDS = tuple(kind for kind in KINDS if kind != "dropped")
# What a webhook or a chat gets unless ``events:`` says otherwise: decisions worth a
# look, not the routine (closed, expired, service-ready/stopped, reload).
DEFAULT_EVENTS = (
    "opened",
    "held-off",
    "refused",
    "grant-failed",
    "service-failed",
    "reload-refused",
    "repair",
    "knocks",
)
# Chat presets: method, content type, headers, body. The URL is the operator's.
PRESETS: dict[str, tuple[Literal["POST", "PUT"], str, tuple[tuple[str, str], ...], str]] = {
    "ntfy": ("POST", "text/plain; charset=utf-8", (("Title", "knockgate on {host}"),), "{text}"),
    "slack": ("POST", "application/json", (), '{"text": "{text}"}'),
    "matrix": (
        "PUT",
        "application/json",
        (("Authorization", "Bearer {token}"),),
        '{"msgtype": "m.text", "body": "{text}"}',
    ),
}
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
_DURATION = re.compile(r"\s*([0-9]{1,6}(?:\.[0-9]{1,6})?)\s*([smhd]?)\s*")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_AT = re.compile(r"([01]?[0-9]|2[0-3]):([0-5][0-9])")
_ADDRESS = re.compile(r"[^@\s<>,;]+@[^@\s<>,;]+")
_TLS: dict[Any, Literal["none", "starttls", "tls"]] = {
    "none": "none",
    "starttls": "starttls",
    "tls": "tls",
}
SECRET_MAX = 4096  # bytes of a secret file
MAX_NOTIFIERS = 16


def parse_notify(top: _Map, path: str) -> tuple[Notifier, ...]:
    spec = top.mapping("notify", ())
    if spec is None:
        return ()
    problems = top.problems
    out: list[Notifier] = []
    if len(spec.items) > MAX_NOTIFIERS:
        problems.error(spec.line, spec.path, f"at most {MAX_NOTIFIERS} notifiers")
        return ()
    for name in spec.items:
        where = spec.key(name)
        if not _NAME.fullmatch(name):
            problems.error(
                spec.line_of(name),
                where,
                f"{shown(name)} is not a notifier name (expected lower-case letters, digits, "
                "- and _, at most 40)",
            )
            continue
        entry = spec.mapping(name, NOTIFIER_KEYS)
        if entry is None:
            continue
        notifier = _notifier(name, entry, path)
        if notifier is not None:
            out.append(notifier)
    return tuple(out)


def _notifier(name: str, spec: _Map, path: str) -> Notifier | None:
    problems = spec.problems
    errors = problems.error_count
    given = [kind for kind in ("webhook", "chat", "mail") if kind in spec.items]
    if len(given) != 1:
        problems.error(
            spec.line,
            spec.path,
            "expected exactly one of webhook, chat, mail"
            + (f" (got {', '.join(given)})" if given else ""),
        )
        return None
    kind = given[0]
    target: Webhook | Chat | Mail | None
    if kind == "webhook":
        target = _webhook(spec, path)
    elif kind == "chat":
        target = _chat(spec, path)
    else:
        target = _mail(spec, path)
    default = EVENT_KINDS if kind == "mail" else DEFAULT_EVENTS
    events = spec.get("events", _events)
    queue = spec.get("queue", lambda v: parse_count(v, minimum=1, maximum=100_000))
    threshold = spec.get(
        "flood_threshold", lambda v: parse_count(v, minimum=1, maximum=100_000_000)
    )
    per_minute = spec.get("per_minute", lambda v: parse_count(v, minimum=0, maximum=10_000))
    if target is None or problems.error_count != errors:
        return None
    counts = {"queue": queue, "flood_threshold": threshold, "per_minute": per_minute}
    return Notifier(  # the schema's defaults for what is not given
        name, target, events or default, **{k: n for k, n in counts.items() if n is not None}
    )


def _events(value: Any) -> tuple[str, ...]:
    if value == "all":
        return EVENT_KINDS
    kinds = _list_of(_choice(*EVENT_KINDS))(value)
    if not kinds:
        raise Invalid(f"expected a list of event kinds ({', '.join(EVENT_KINDS)}) or all")
    return tuple(dict.fromkeys(kinds))


def _url(value: Any) -> str:
    text = _string(value)
    return _checked_url(text, shown(text))


def _checked_url(text: str, named: str) -> str:
    """An http(s) URL a sender can use. No error echoes a URL with an ``@`` (a password
    with a ``/``, ``#`` or ``?`` in it ends the host part early: urlsplit then reads a
    piece of the password as the port), nor the parser's own words."""
    if "@" in text:
        named = "the URL (not shown: it holds an '@')"
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        raise Invalid(f"{named} holds a control character")
    try:
        parts = urllib.parse.urlsplit(text)
        userinfo = "@" in parts.netloc
        hostname, port = parts.hostname, parts.port
    except ValueError:
        userinfo, hostname, port = False, None, None
    if userinfo:  # checked first: an error must not echo a password
        raise Invalid(
            "a user name or password in the URL is refused (it would be logged and sent "
            "in the clear): give the credential in a header with {token} and token_file, "
            "or the whole URL in url_file"
        )
    if not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", text):
        raise Invalid(f"{named} is not an http:// or https:// URL")
    if not hostname or port == 0:
        raise Invalid(
            f"{named} has no valid host and port (expected http[s]://HOST[:PORT]/..., a port "
            "from 1 to 65535; a user name or password is refused)"
        )
    return text


def _timeout(value: Any) -> float:
    seconds = parse_duration(value)
    if not 0.5 <= seconds <= 120:
        raise Invalid(f"{shown(value)} is out of range (expected 0.5 to 120 seconds)")
    return seconds


def parse_duration(value: Any) -> float:
    """Seconds: ``90``, ``2.5``, ``"90s"``, ``"15m"``, ``"1h"``, ``"1d"``."""
    if isinstance(value, bool):
        raise Invalid(f"{shown(value)} is not a duration (expected seconds, or 15m, 1h, 1d)")
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise Invalid(f"{shown(value)} is not a duration (expected seconds, or 15m, 1h, 1d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _inline_secret(spec: _Map, key: str, instead: str) -> None:
    if key in spec.items:
        spec.problems.error(
            spec.line_of(key),
            spec.key(key),
            f"a secret is not written in the configuration (it is shown and copied with it): "
            f"put it in a file readable only by its owner and give {instead}: PATH",
        )


def read_secret(spec: _Map, key: str, path: str) -> tuple[str, str] | None:
    """``(file, content)`` of the text secret file named by ``key`` (UTF-8; one
    trailing line break is not part of the secret); see :func:`read_secret_bytes`."""
    secret = read_secret_bytes(spec, key, path)
    if secret is None:
        return None
    file, data = secret
    try:
        text = data.decode("utf-8").removesuffix("\r")
    except UnicodeDecodeError:
        spec.problems.error(
            spec.line_of(key), spec.key(key), f"{file} is not UTF-8 text (expected the secret)"
        )
        return None
    return file, text


def read_secret_bytes(spec: _Map, key: str, path: str) -> tuple[str, bytes] | None:
    """``(file, content)`` of the secret file named by ``key``: absolute or relative to
    the configuration's directory, a regular file, not readable or writable by others
    (0600 or 0640), not empty; its bytes as they are, minus one trailing ``\n``."""
    name = spec.get(key, _string)
    if name is None:
        return None
    file = _beside(name, path)
    line, where = spec.line_of(key), spec.key(key)
    try:
        data = read_bounded(file, SECRET_MAX, private=True).removesuffix(b"\n")
    except Invalid as problem:
        spec.problems.error(line, where, str(problem))
        return None
    if not data.strip():
        spec.problems.error(line, where, f"{file} is empty (expected the secret)")
        return None
    return file, data


def _webhook(top: _Map, path: str) -> Webhook | None:
    spec = top.mapping("webhook", WEBHOOK_KEYS)
    if spec is None:
        return None
    _inline_secret(spec, "secret", "secret_file")
    for key in ("url", "secret_file"):
        if key not in spec.items:
            spec.problems.error(spec.line, spec.key(key), "missing")
    url = spec.get("url", _url)
    secret = read_secret_bytes(spec, "secret_file", path)  # the HMAC key: any bytes
    timeout = spec.get("timeout", _timeout)
    if url is None or secret is None:
        return None
    return Webhook(url, secret[0], secret[1], timeout or 10.0)


def _headers(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise Invalid("expected a mapping of header names to values")
    out = []
    for key, item in value.items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9-]{1,64}", key):
            raise Invalid(f"{shown(key)} is not a header name")
        if not isinstance(item, str | int) or isinstance(item, bool):
            raise Invalid(f"{shown(key, text=True)}: expected text")
        text = str(item)
        if "\r" in text or "\n" in text:
            raise Invalid(f"{shown(key, text=True)}: a header value is one line")
        if not text.isascii() or not text.isprintable():
            raise Invalid(f"{shown(key, text=True)}: a header value is printable ASCII")
        out.append((key, text))
    return tuple(out)


def _beside(name: str, path: str) -> str:
    """File ``name`` as given when absolute, else in the configuration's directory."""
    return name if os.path.isabs(name) else os.path.join(os.path.dirname(path) or ".", name)


def _url_file(spec: _Map, path: str) -> str | None:
    """The chat URL from ``url_file`` (a Slack or Telegram URL is the credential): a
    private file like the other secrets; never echoed in an error."""
    secret = read_secret(spec, "url_file", path)
    if secret is None:
        return None
    try:
        return _checked_url(secret[1].strip(), f"the content of {secret[0]}")
    except Invalid as error:
        spec.problems.error(spec.line_of("url_file"), spec.key("url_file"), str(error))
        return None


def _chat(top: _Map, path: str) -> Chat | None:
    spec = top.mapping("chat", CHAT_KEYS)
    if spec is None:
        return None
    problems = spec.problems
    errors = problems.error_count
    _inline_secret(spec, "token", "token_file")
    if ("url" in spec.items) == ("url_file" in spec.items):
        problems.error(spec.line, spec.key("url"), "expected exactly one of url, url_file")
    preset = spec.get("preset", _choice(*PRESETS))
    method, content_type, headers, body = PRESETS.get(
        preset or "", ("POST", "text/plain; charset=utf-8", (), "{text}")
    )
    url = spec.get("url", _url) if "url" in spec.items else _url_file(spec, path)
    given_method = spec.get("method", _choice("POST", "PUT"))
    method = "PUT" if (given_method or method) == "PUT" else "POST"
    content_type = spec.get("content_type", _string) or content_type
    if "headers" in spec.items:
        extra = spec.get("headers", _headers) or ()
        names = {name.lower() for name, _ in extra}
        headers = tuple(h for h in headers if h[0].lower() not in names) + tuple(extra)
    body = spec.get("body", _string) if "body" in spec.items else body
    token = read_secret(spec, "token_file", path)
    timeout = spec.get("timeout", _timeout)
    if url is None or body is None or problems.error_count != errors:
        return None
    for key, template, kind in (
        ("url", url, "url"),
        ("body", body, content_type),
        *(("headers", value, "header") for _, value in headers),
    ):
        try:
            check_template(template, kind)
        except TemplateError as error:
            problems.error(spec.line_of(key), spec.key(key), str(error))
    uses_token = any("{token}" in value for value in (url, body, *(v for _, v in headers)))
    if uses_token and token is None:
        problems.error(
            spec.line, spec.key("token_file"), "missing ({token} is used: expected token_file)"
        )
    if problems.error_count != errors:
        return None
    return Chat(
        url=url,
        body=body,
        method=method,
        content_type=content_type,
        headers=headers,
        token_file=token[0] if token else None,
        token=token[1] if token else "",
        timeout=timeout or 10.0,
        url_file=_beside(str(spec.items["url_file"]), path) if "url_file" in spec.items else None,
    )


def _address(value: Any) -> str:
    text = _string(value).strip()
    if not _ADDRESS.fullmatch(text):
        raise Invalid(f"{shown(text)} is not a mail address (expected NAME@DOMAIN)")
    return text


def _at(value: Any) -> tuple[int, int]:
    match = _AT.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise Invalid(f'{shown(value)} is not a time of day (expected "HH:MM", quoted)')
    return int(match.group(1)), int(match.group(2))


def _every(value: Any) -> float:
    seconds = parse_duration(value)
    if not 1.0 <= seconds <= 7 * 86400.0:
        raise Invalid(f"{shown(value)} is out of range (expected 1 s to 7 days)")
    return seconds


def _one_line(value: Any) -> str:
    text = _string(value)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise Invalid(
            f"{shown(text)}: expected one line of text (no line breaks or control characters)"
        )
    return text


def _mail(top: _Map, path: str) -> Mail | None:
    spec = top.mapping("mail", MAIL_KEYS)
    if spec is None:
        return None
    problems = spec.problems
    errors = problems.error_count
    _inline_secret(spec, "password", "password_file")
    for key in ("host", "from", "to"):
        if key not in spec.items:
            problems.error(spec.line, spec.key(key), "missing")
    host = spec.get("host", _string)
    tls = _TLS.get(spec.get("tls", _choice(*_TLS)), "none")
    port = spec.get("port", parse_port) or {"none": 25, "starttls": 587, "tls": 465}[tls]
    username = spec.get("username", _string)
    password = read_secret(spec, "password_file", path)
    if (username is None) != (password is None) and problems.error_count == errors:
        problems.error(spec.line, spec.path, "username and password_file go together")
    if password is not None and tls == "none":
        problems.warn(
            spec.line_of("password_file"),
            spec.key("password_file"),
            "the SMTP password is sent without TLS (tls: starttls or tls)",
        )
    sender = spec.get("from", _address)
    to = spec.get("to", lambda v: (_address(v),) if isinstance(v, str) else _list_of(_address)(v))
    if "every" in spec.items and "at" in spec.items:
        problems.error(spec.line_of("at"), spec.key("at"), "cannot be combined with every")
    every = spec.get("every", _every)
    at = spec.get("at", _at) or (7, 0)
    quiet = spec.get("quiet", _choice("send", "skip")) or "send"
    subject = spec.get("subject", _one_line) or "knockgate digest"
    timeout = spec.get("timeout", _timeout)
    if host is None or sender is None or not to or problems.error_count != errors:
        if "to" in spec.items and to == () and problems.error_count == errors:
            problems.error(spec.line_of("to"), spec.key("to"), "expected at least one address")
        return None
    return Mail(
        host=host,
        sender=sender,
        to=tuple(to),
        port=port,
        tls=tls,
        username=username,
        password_file=password[0] if password else None,
        password=password[1] if password else "",
        every=every,
        at=at,
        quiet="skip" if quiet == "skip" else "send",
        subject=subject,
        timeout=timeout or 30.0,
    )
