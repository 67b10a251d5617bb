"""Sending: HTTP requests (webhook, chat) with urllib, mail with smtplib.

Each sender raises :class:`~appliance.notify.delivery.DeliveryError` when the receiver
cannot take the item now (connection refused, time-out, 5xx, 408, 429: tried again) and
:class:`~appliance.notify.delivery.Rejected` when it refuses it for good (another 4xx, a
redirect, an SMTP 5xx: dropped). Requests go straight to the receiver: no proxy from the
environment, no redirect followed (a signed body is for one receiver).
"""

from __future__ import annotations

import http.client
import json
import smtplib
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
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


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx becomes an HTTPError: refused


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def http_send(method: str, url: str, body: bytes, headers: dict[str, str], timeout: float) -> None:
    request = urllib.request.Request(url, data=body, method=method)
    request.add_header("User-Agent", USER_AGENT)
    for name, value in headers.items():
        request.add_header(name, value)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            response.read(65536)
    except urllib.error.HTTPError as error:
        status = error.code
        error.close()
        if status >= 500 or status in (408, 429):
            raise DeliveryError(f"HTTP {status} from {_where(url)}") from None
        raise Rejected(f"HTTP {status} from {_where(url)}: dropped") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise DeliveryError(f"{_where(url)}: {reason}") from None
    except ValueError as error:  # UnicodeError too: the request cannot be built, ever
        raise Rejected(f"{_where(url)}: cannot build the request ({error}): dropped") from None
    except http.client.HTTPException as error:  # not HTTP (an SSH port), cut short, ...
        raise DeliveryError(
            f"{_where(url)}: not a valid HTTP answer ({type(error).__name__})"
        ) from None


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


def webhook_body(record: EventRecord, host: str) -> bytes:
    data = {**record.as_dict(), "host": host, "version": __version__}
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def webhook_sender(
    settings: Webhook, host: str, wall: Callable[[], float] = time.time
) -> Callable[[EventRecord], None]:
    def send(record: EventRecord) -> None:
        body = webhook_body(record, host)
        headers = {
            "Content-Type": "application/json",
            "X-Knockgate-Event": record.kind,
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


def chat_sender(settings: Chat, host: str) -> Callable[[EventRecord], None]:
    def send(record: EventRecord) -> None:
        url, body, headers = chat_request(settings, record, host)
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


def mail_sender(settings: Mail) -> Callable[[Message], None]:
    def send(message: Message) -> None:
        where = f"{settings.host}:{settings.port}"
        try:
            mail = mail_message(settings, message)
        except (ValueError, UnicodeError) as error:  # e.g. a line break in a header
            raise Rejected(f"{where}: cannot build the mail: {error}: dropped") from None
        try:
            if settings.tls == "tls":
                context = ssl.create_default_context()
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                    settings.host, settings.port, timeout=settings.timeout, context=context
                )
            else:
                smtp = smtplib.SMTP(settings.host, settings.port, timeout=settings.timeout)
            with smtp:
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
            raise DeliveryError(f"{where}: {error}") from None

    return send
