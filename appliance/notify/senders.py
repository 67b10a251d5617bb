"""Sending: HTTP requests (webhook, chat) with http.client, mail with smtplib.

Each sender raises :class:`~appliance.notify.delivery.DeliveryError` when the receiver
cannot take the item now (connection refused, time-out, 5xx, 408, 429, an answer that
is not HTTP: tried again) and :class:`~appliance.notify.delivery.Rejected` when it
refuses it for good (another 4xx, a redirect, an SMTP 5xx, a request that cannot be
built, an invalid URL: dropped). Requests go straight to the receiver: no proxy from
the environment, no redirect followed (a signed body is for one receiver). A
notifier's ``timeout`` bounds the whole request (resolving, connecting, sending,
reading the answer), not each socket operation: a receiver that trickles its answer is
cut off at it (:class:`_Watchdog`).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import smtplib
import socket
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from appliance import __version__
from appliance.config.schema import Chat, Mail, Webhook
from appliance.notify.delivery import DeliveryError, Rejected
from appliance.notify.sign import signed_headers
from appliance.notify.template import render, values
from appliance.runtime.events_log import EventRecord

USER_AGENT = f"knockgate/{__version__}"


class _Watchdog:
    """One deadline for a whole request: a socket's time-out bounds each operation only
    (a receiver that trickles a byte every half second would hold a send for minutes),
    so at the deadline the watchdog shuts the socket down and the blocked call fails."""

    def __init__(self, seconds: float, sock: Callable[[], socket.socket | None]) -> None:
        self.deadline = time.monotonic() + seconds
        self.fired = False
        self._sock = sock
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True

    def _cut(self) -> None:
        self.fired = True
        sock = self._sock()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


def _resolve(host: str, port: int, deadline: float) -> list[Any]:
    """getaddrinfo has no time-out of its own: it runs on a thread the caller stops
    waiting for at the deadline."""
    result: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as error:
            result.append(error)
        finally:
            done.set()

    threading.Thread(target=run, name="notify-resolve", daemon=True).start()
    if not done.wait(max(0.0, deadline - time.monotonic())):
        raise TimeoutError(f"timed out resolving {host}")
    if isinstance(result[0], OSError):
        raise result[0]
    return list(result[0])


def connect(host: str, port: int, deadline: float) -> socket.socket:
    """A TCP connection to ``host``, resolving and connecting within ``deadline``."""
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in _resolve(host, port, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        sock = socket.socket(family, kind, proto)
        sock.settimeout(remaining)
        try:
            sock.connect(address)
            return sock
        except OSError as failed:
            sock.close()
            error = failed
    raise error


def http_send(method: str, url: str, body: bytes, headers: dict[str, str], timeout: float) -> None:
    """One request straight to the receiver (no proxy, no redirect followed), done or
    given up on within ``timeout`` seconds in all (resolving, connecting, sending and
    reading the answer)."""
    where = _where(url)
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:  # its words may quote a piece of the URL (a password, a token)
        raise Rejected(f"{where}: not a URL: dropped") from None
    https = parts.scheme == "https"
    port = port or (443 if https else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn: http.client.HTTPConnection
    if https:
        context = ssl.create_default_context()
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    watchdog = _Watchdog(timeout, lambda: conn.sock)

    def connected(*_args: object, **_kw: object) -> socket.socket:  # resolving bounded too
        return connect(host, port, watchdog.deadline)

    conn._create_connection = connected  # type: ignore[attr-defined]
    try:
        with watchdog:
            conn.request(method, target, body=body, headers={"User-Agent": USER_AGENT, **headers})
            response = conn.getresponse()
            status = response.status
            response.read(65536)
    except http.client.InvalidURL:  # a control character, a bad host: never sendable
        raise Rejected(f"{where}: not a valid URL: dropped") from None
    # OSError before ValueError: ssl's certificate errors are both (and are retried).
    except (OSError, http.client.HTTPException) as error:
        if watchdog.fired or isinstance(error, TimeoutError):
            raise DeliveryError(f"{where}: timed out after {timeout:g} s") from None
        if isinstance(error, http.client.HTTPException):  # not HTTP (an SSH port), cut short
            name = type(error).__name__
            raise DeliveryError(f"{where}: not a valid HTTP answer ({name})") from None
        raise DeliveryError(f"{where}: {error}") from None
    except ValueError as error:  # UnicodeError too: the request cannot be built, ever
        raise Rejected(f"{where}: cannot build the request ({error}): dropped") from None
    finally:
        conn.close()
    if 200 <= status < 300:
        return
    if status >= 500 or status in (408, 429):
        raise DeliveryError(f"HTTP {status} from {where}")
    raise Rejected(f"HTTP {status} from {where}: dropped")


def _where(url: str) -> str:
    """Only ``scheme://host[:port]`` of the URL: its path and query may hold a token (a
    Telegram bot, a Slack webhook), so they are never logged."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "?"
        port = parts.port
    except ValueError:
        return "the receiver"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """An event record queued for a webhook or a chat, with its delivery id: one per
    event and notifier, the same at every retry (a receiver deduplicates on it)."""

    record: EventRecord
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


def webhook_body(record: EventRecord, host: str, delivery: str = "") -> bytes:
    data = {**record.as_dict(), "host": host, "version": __version__, "id": delivery}
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def webhook_sender(
    settings: Webhook, host: str, wall: Callable[[], float] = time.time
) -> Callable[[Outgoing], None]:
    def send(item: Outgoing) -> None:
        body = webhook_body(item.record, host, item.id)
        headers = {
            "Content-Type": "application/json",
            "X-Knockgate-Event": item.record.kind,
            "X-Knockgate-Delivery": item.id,
            **signed_headers(settings.secret, wall(), body),
        }
        http_send("POST", settings.url, body, headers, settings.timeout)

    return send


def chat_request(
    settings: Chat, record: EventRecord, host: str
) -> tuple[str, bytes, dict[str, str]]:
    """(url, body, headers) of the chat message for ``record``."""
    filled = values(record, host, settings.token)
    url = render(settings.url, filled, "url")
    body = render(settings.body, filled, settings.content_type).encode()
    headers = {"Content-Type": settings.content_type}
    for name, value in settings.headers:
        headers[name] = render(value, filled, "header")
    return url, body, headers


def chat_sender(settings: Chat, host: str) -> Callable[[Outgoing], None]:
    def send(item: Outgoing) -> None:
        url, body, headers = chat_request(settings, item.record, host)
        http_send(settings.method, url, body, headers, settings.timeout)

    return send


@dataclass(frozen=True, slots=True)
class Message:
    """A rendered digest."""

    subject: str
    body: str


def mail_message(settings: Mail, message: Message) -> EmailMessage:
    mail = EmailMessage()
    mail["Subject"] = message.subject
    mail["From"] = settings.sender
    mail["To"] = ", ".join(settings.to)
    mail["Date"] = formatdate(localtime=True)
    mail["Message-ID"] = make_msgid("knockgate")
    mail.set_content(message.body)
    return mail


class _SMTP(smtplib.SMTP):
    deadline = 0.0  # resolving and connecting within it

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return connect(host, port, self.deadline)


class _SMTPS(smtplib.SMTP_SSL):
    deadline = 0.0

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return self.context.wrap_socket(connect(host, port, self.deadline), server_hostname=host)


def mail_sender(settings: Mail) -> Callable[[Message], None]:
    def send(message: Message) -> None:
        where = f"{settings.host}:{settings.port}"
        try:
            mail = mail_message(settings, message)
        except (ValueError, UnicodeError) as error:  # e.g. a line break in a header
            raise Rejected(f"{where}: cannot build the mail: {error}: dropped") from None
        smtp: smtplib.SMTP
        if settings.tls == "tls":
            smtp = _SMTPS(timeout=settings.timeout, context=ssl.create_default_context())
        else:
            smtp = _SMTP(timeout=settings.timeout)
        watchdog = _Watchdog(settings.timeout, lambda: getattr(smtp, "sock", None))
        smtp.deadline = watchdog.deadline
        try:
            with watchdog, smtp:
                smtp.connect(settings.host, settings.port)
                if settings.tls == "starttls":
                    smtp.starttls(context=ssl.create_default_context())
                if settings.username is not None:
                    smtp.login(settings.username, settings.password)
                smtp.send_message(mail)
        except smtplib.SMTPResponseException as error:
            text = f"{where}: SMTP {error.smtp_code} {error.smtp_error!r}"
            if 500 <= error.smtp_code < 600:
                raise Rejected(text + ": dropped") from None
            raise DeliveryError(text) from None
        except smtplib.SMTPRecipientsRefused as error:
            raise Rejected(f"{where}: recipients refused: {list(error.recipients)}") from None
        except (smtplib.SMTPException, OSError) as error:
            if watchdog.fired or isinstance(error, TimeoutError):
                raise DeliveryError(f"{where}: timed out after {settings.timeout:g} s") from None
            raise DeliveryError(f"{where}: {error}") from None

    return send
