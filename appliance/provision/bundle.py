"""A user's client bundle: everything a client needs to open her doors. Pure text.

Sections, in order: a knockgate client configuration (the doors as the client needs
them; SPA keys are not in it but in the key file), one ``~/.fwknoprc`` stanza per SPA
door (the stock ``fwknop -n DOOR`` client and ``knockgate connect --key-file`` read
it), an ``~/.ssh/config`` entry per door using ``knockgate connect``, and one
``knockgate://`` URI per door with its QR code for phones.

The URI scheme (version 1)::

    knockgate://HOST/DOOR?v=1&kind=KIND&user=NAME&open=tcp/22,tcp/443&...
      kind=spa       port=UDP_PORT  key=BASE64  hmac=BASE64  [source=1]
      kind=totp      secret=BASE32  steps=N  period=S  ports=LOW-HIGH  proto=tcp|udp
      kind=sequence  seq=tcp/7113,udp/2231,...   (proto/port, as ACCESS and open)

HOST is a name, an IPv4 address or ``[IPv6]``; values are percent-encoded
(``application/x-www-form-urlencoded``), keys are standard base64 as fwknop prints
them. ``source=1``: the server lets in the packet's sender (fwknop ``-s``).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import yaml

from appliance.config.managed_users import ManagedDoor, ManagedUser
from appliance.core.model import Door, Step

__all__ = [
    "CLIENT_CONFIG",
    "KEY_FILE",
    "URI_SCHEME",
    "ClientLink",
    "client_config",
    "door_uri",
    "fwknoprc_stanza",
    "parse_uri",
    "qr_text",
    "render_bundle",
    "ssh_entry",
]

URI_SCHEME = "knockgate"
URI_VERSION = "1"
CLIENT_CONFIG = "~/.config/knockgate/knockgate.yaml"
KEY_FILE = "~/.fwknoprc"


@dataclass(frozen=True)
class ClientLink:
    """A parsed ``knockgate://`` URI."""

    host: str
    door: str
    params: dict[str, str]


class _Flow(list[Any]):
    """A list written in flow style: ``[22/tcp, 443/tcp]``."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(
    _Flow, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, True)
)


def _number(value: float) -> int | float:
    return int(value) if value == int(value) else value


def _steps(steps: Sequence[Step]) -> str:
    return ",".join(f"{step.proto}/{step.port}" for step in steps)


def _kind(door: Door) -> str:
    if door.spa is not None:
        return "spa"
    if door.knock.totp is not None:
        return "totp"
    return "sequence"


def _first_tcp(door: Door) -> int | None:
    ports = door.open.ports if door.open is not None else ()
    return next((step.port for step in ports if step.proto == "tcp"), None)


def client_config(user: str, doors: Sequence[Door]) -> str:
    """The client's copy of the configuration: what ``knockgate knock/connect/spa
    --config`` read (valid knockgate YAML; SPA keys live in the key file)."""
    data: dict[str, Any] = {}
    for door in doors:
        entry: dict[str, Any] = {}
        if door.spa is not None:
            entry["spa"] = {"port": door.spa.port, "users": {}}
        elif door.knock.totp is not None:
            totp = door.knock.totp
            entry["knock"] = {
                "totp": {
                    "secret": base64.b32encode(totp.secret).decode(),
                    "steps": totp.steps,
                    "period": totp.period,
                    "ports": f"{totp.low}-{totp.high}",
                    "protocol": totp.proto,
                    "skew": totp.skew,
                },
                "seq_timeout": _number(door.knock.seq_timeout),
            }
        else:
            entry["knock"] = {
                "sequence": _Flow(str(step) for step in door.knock.sequence),
                "seq_timeout": _number(door.knock.seq_timeout),
            }
        if door.open is not None:
            entry["open"] = {
                "ports": _Flow(str(step) for step in door.open.ports),
                "duration": _number(door.open.duration),
            }
        data[door.name] = entry
    header = f"# knockgate client configuration for {user}: save as {CLIENT_CONFIG}\n"
    body = yaml.dump(
        {"doors": data}, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100
    )
    return header + body


def fwknoprc_stanza(host: str, door: Door, entry: ManagedDoor) -> str:
    """The ``[DOOR]`` stanza of ``~/.fwknoprc`` for an SPA door."""
    assert door.spa is not None and entry.key is not None and entry.hmac_key is not None
    lines = [
        f"[{door.name}]",
        f"SPA_SERVER          {host}",
        f"SPA_SERVER_PORT     {door.spa.port}",
        "SPA_SERVER_PROTO    udp",
    ]
    access = _steps(door.open.ports) if door.open is not None else ""
    if access:
        lines.append(f"ACCESS              {access}")
    if door.spa.require_source_address:
        lines.append("# ALLOW_IP          your address: or fwknop -n DOOR -a ADDRESS")
    else:
        lines.append("ALLOW_IP            source")
    lines += [
        "USE_HMAC            Y",
        "HMAC_DIGEST_TYPE    sha256",
        f"KEY_BASE64          {base64.b64encode(entry.key).decode()}",
        f"HMAC_KEY_BASE64     {base64.b64encode(entry.hmac_key).decode()}",
    ]
    return "\n".join(lines) + "\n"


def ssh_entry(host: str, door: Door) -> str | None:
    """An ``~/.ssh/config`` entry reaching the door's first TCP port through
    ``knockgate connect`` (``None``: the door opens no TCP port)."""
    port = _first_tcp(door)
    if port is None:
        return None
    command = f"knockgate connect %h %p --door {door.name} --config {CLIENT_CONFIG}"
    if door.spa is not None:
        command += f" --key-file {KEY_FILE}"
    return (
        f"Host {host}-{door.name}\n"
        f"    HostName {host}\n"
        f"    Port {port}\n"
        f"    ProxyCommand {command}\n"
    )


def _authority(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def door_uri(host: str, user: str, door: Door, entry: ManagedDoor) -> str:
    """The ``knockgate://`` URI of one door (see the module docstring)."""
    params: dict[str, str] = {"v": URI_VERSION, "kind": _kind(door), "user": user}
    if door.open is not None:
        params["open"] = _steps(door.open.ports)
    if door.spa is not None:
        assert entry.key is not None and entry.hmac_key is not None
        params["port"] = str(door.spa.port)
        params["key"] = base64.b64encode(entry.key).decode()
        params["hmac"] = base64.b64encode(entry.hmac_key).decode()
        if not door.spa.require_source_address:
            params["source"] = "1"
    elif door.knock.totp is not None:
        totp = door.knock.totp
        params["secret"] = base64.b32encode(totp.secret).decode()
        params["steps"] = str(totp.steps)
        params["period"] = str(totp.period)
        params["ports"] = f"{totp.low}-{totp.high}"
        params["proto"] = totp.proto
    else:
        params["seq"] = _steps(door.knock.sequence)
    path = quote(door.name, safe="")
    return f"{URI_SCHEME}://{_authority(host)}/{path}?{urlencode(params, safe='/,')}"


def parse_uri(uri: str) -> ClientLink:
    """A ``knockgate://`` URI's host, door and parameters (ValueError when it is none)."""
    parts = urlsplit(uri)
    if parts.scheme != URI_SCHEME:
        raise ValueError(f"not a {URI_SCHEME}:// URI")
    host = parts.hostname
    door = unquote(parts.path.lstrip("/"))
    if not host or not door:
        raise ValueError("expected knockgate://HOST/DOOR?...")
    params = {key: values[-1] for key, values in parse_qs(parts.query, strict_parsing=True).items()}
    if params.get("v") != URI_VERSION:
        raise ValueError(f"version {params.get('v')!r} (expected {URI_VERSION})")
    return ClientLink(host, door, params)


def qr_text(data: str) -> str | None:
    """``data`` as a QR code in text (light modules drawn, for a dark terminal);
    ``None`` when the ``qrcode`` package is missing."""
    try:
        import qrcode
        from qrcode.constants import ERROR_CORRECT_L
    except ImportError:
        return None
    code = qrcode.QRCode(border=2, error_correction=ERROR_CORRECT_L)
    code.add_data(data)
    code.make(fit=True)
    out = io.StringIO()
    code.print_ascii(out=out, invert=True)
    return out.getvalue()


def render_bundle(host: str, user: ManagedUser, doors: Sequence[Door], made: str) -> str:
    """The whole bundle for ``user``'s ``doors`` (each in ``user.doors``)."""
    entries = [(door, user.door(door.name)) for door in doors]
    shared = [door.name for door in doors if door.spa is None]
    out = [
        f"# knockgate client bundle for {user.name} on {host} ({made})",
        "# It holds secrets (keys, TOTP secrets, knock sequences): keep it private,",
        "# delete it once installed.",
    ]
    if shared:
        out.append(
            f"# Door(s) {', '.join(shared)}: the door's own knock, shared by all its users "
            "(not revoked per user)."
        )
    out += ["", f"## 1. knockgate client configuration: {CLIENT_CONFIG}", ""]
    out.append(client_config(user.name, doors))
    stanzas = [
        fwknoprc_stanza(host, door, entry)
        for door, entry in entries
        if door.spa is not None and entry is not None
    ]
    if stanzas:
        out += [
            f"## 2. {KEY_FILE} (chmod 600): stock fwknop: fwknop -n DOOR [-a YOUR_ADDRESS];",
            f"##    knockgate spa {host} --door DOOR --key-file {KEY_FILE}",
            "",
            "\n".join(stanzas),
        ]
    ssh = [text for text in (ssh_entry(host, door) for door in doors) if text is not None]
    if ssh:
        out += ["## 3. ~/.ssh/config: then `ssh HOST-DOOR` knocks, waits and logs in", ""]
        out.append("\n".join(ssh))
    out += ["## 4. Phones: one knockgate:// URI per door (README: the URI scheme)", ""]
    for door, entry in entries:
        assert entry is not None
        uri = door_uri(host, user.name, door, entry)
        out += [f"{door.name}: {uri}", ""]
        code = qr_text(uri)
        out.append(code if code is not None else "(no QR code: python3-qrcode is not installed)\n")
    return "\n".join(out)
