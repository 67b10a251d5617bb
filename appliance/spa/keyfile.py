"""fwknop client key files: ``~/.fwknoprc`` stanzas and ``fwknop --key-gen`` output.

The syntax follows fwknop's client (``client/config_init.c`` ``is_rc_param``): one
``NAME value`` per line, whitespace separated; a ``:`` ending the name is dropped, so the
``KEY_BASE64: ...`` lines of ``fwknop --key-gen`` read as well; the value is the first word
(it ends at a space, tab, ``;`` or ``#``); lines starting with ``#`` and blank lines are
skipped; ``[name]`` starts a stanza. Names are case-insensitive, like fwknop's.

Stanzas: lines before the first ``[...]`` and the ``[default]`` stanza give defaults; a
named stanza overrides them. ``read_key_file(path, None)`` uses the defaults only. With a
stanza name: if the file has stanzas, that stanza must exist (else an error, as ``fwknop -n``
does); if the file has no stanza at all (e.g. saved ``--key-gen`` output) its values are
used for any name. (fwknop itself ignores lines outside a stanza; this reader accepts them
so the key-gen text works as is.)

Read: ``KEY_BASE64`` (or ``KEY``, a passphrase used as raw bytes), ``HMAC_KEY_BASE64``
(or ``HMAC_KEY``), ``SPA_SERVER_PORT``, ``ACCESS``, ``ALLOW_IP`` (an address, ``source``
or ``resolve``), ``FW_TIMEOUT``, ``SPOOF_USER``. Checked because this implementation only
speaks Rijndael-CBC with an HMAC-SHA256: ``USE_HMAC`` (must not be N), ``USE_GPG`` (must
not be Y), ``HMAC_DIGEST_TYPE`` (sha256), ``ENCRYPTION_MODE`` (cbc), ``DIGEST_TYPE``
(md5..sha512). Other fwknop names (``SPA_SERVER``, ``SPA_SERVER_PROTO``, ...) are
ignored. Errors are :class:`~appliance.errors.ConfigError` lines ``FILE:LINE: NAME: ...``.
"""

from __future__ import annotations

import base64
import ipaddress
import secrets
from dataclasses import dataclass

from appliance.errors import ConfigError
from appliance.spa.wire import SpaError, SpaKeys, parse_access

__all__ = ["DEFAULT_PORT", "ClientProfile", "format_keys", "generate_keys", "read_key_file"]

DEFAULT_PORT = 62201
_DIGEST_TYPES = frozenset(("md5", "sha1", "sha256", "sha384", "sha512"))


@dataclass(frozen=True)
class ClientProfile:
    """What a client needs to send SPA packets for one stanza."""

    keys: SpaKeys
    port: int = DEFAULT_PORT
    access: str | None = None
    allow_ip: str | None = None
    fw_timeout: int | None = None
    username: str | None = None


def generate_keys() -> tuple[str, str]:
    """A new (Rijndael, HMAC) key pair, base64, like ``fwknop --key-gen``: 32 and 64 bytes."""
    return (
        base64.b64encode(secrets.token_bytes(32)).decode(),
        base64.b64encode(secrets.token_bytes(64)).decode(),
    )


def format_keys(key_b64: str, hmac_b64: str) -> str:
    """The text ``fwknop --key-gen`` prints, readable by :func:`read_key_file`."""
    return f"KEY_BASE64: {key_b64}\nHMAC_KEY_BASE64: {hmac_b64}\n"


def _split(line: str) -> tuple[str, str] | None:
    """``NAME value`` as fwknop's ``sscanf("%s %[^ ;\\t\\n\\r#]")`` reads it, else None."""
    parts = line.split(None, 1)
    if len(parts) != 2:
        return None
    name, rest = parts
    value = rest
    for stop in " \t;#\r\n":
        value = value.split(stop, 1)[0]
    if not value:
        return None
    if ":" in name:
        name = name[: name.rindex(":")]
    return name.upper(), value


def read_key_file(path: str, stanza: str | None) -> ClientProfile:
    """Read ``path`` (fwknoprc or key-gen format) for ``stanza`` (None: defaults only)."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as problem:
        raise ConfigError([f"{path}:0: file: cannot read ({problem})"]) from None

    errors: list[str] = []
    defaults: dict[str, tuple[int, str]] = {}
    stanzas: dict[str, dict[str, tuple[int, str]]] = {}
    current = defaults
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            end = line.find("]")
            name = line[1:end].strip() if end > 0 else ""
            if not name:
                errors.append(f"{path}:{number}: stanza: bad stanza line {line!r} (want [name])")
                current = {}
                continue
            current = defaults if name.lower() == "default" else stanzas.setdefault(name, {})
            continue
        pair = _split(line)
        if pair is None:
            errors.append(f"{path}:{number}: {line.split()[0]}: no value (want NAME value)")
            continue
        current[pair[0]] = (number, pair[1])

    values = dict(defaults)
    if stanza is not None and stanza.lower() != "default":
        if stanza in stanzas:
            values.update(stanzas[stanza])
        elif stanzas:
            known = ", ".join(sorted(stanzas))
            errors.append(f"{path}:0: stanza: no stanza [{stanza}] (the file has: {known})")
    if errors:
        raise ConfigError(errors)
    return _profile(path, values)


def _profile(path: str, values: dict[str, tuple[int, str]]) -> ClientProfile:
    errors: list[str] = []

    def error(name: str, message: str) -> None:
        line = values[name][0] if name in values else 0
        errors.append(f"{path}:{line}: {name}: {message}")

    def get(name: str) -> str | None:
        return values[name][1] if name in values else None

    def number(name: str, low: int, high: int) -> int | None:
        text = get(name)
        if text is None:
            return None
        if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
            error(name, f"{text!r} is not a number from {low} to {high}")
            return None
        return int(text)

    key: bytes | None = None
    hmac_key: bytes | None = None
    for name, alias in (("KEY_BASE64", "KEY"), ("HMAC_KEY_BASE64", "HMAC_KEY")):
        text = get(name)
        raw: bytes | None = None
        if text is not None:
            try:
                bare = text.rstrip("=")
                raw = base64.b64decode(bare + "=" * (-len(bare) % 4), validate=True)
            except ValueError:
                error(name, "not valid base64")
        elif get(alias) is not None:
            raw = str(get(alias)).encode()
        else:
            error(name, f"missing (want {name} from fwknop --key-gen)")
        if name == "KEY_BASE64":
            key = raw
        else:
            hmac_key = raw

    if (get("USE_HMAC") or "Y").upper().startswith("N"):
        error("USE_HMAC", "must be Y: only HMAC-authenticated packets are supported")
    if (get("USE_GPG") or "N").upper().startswith("Y"):
        error("USE_GPG", "GnuPG is not supported (want Rijndael keys)")
    if (get("HMAC_DIGEST_TYPE") or "sha256").lower() != "sha256":
        error("HMAC_DIGEST_TYPE", "only sha256 is supported")
    if (get("ENCRYPTION_MODE") or "cbc").lower() != "cbc":
        error("ENCRYPTION_MODE", "only cbc is supported")
    if (get("DIGEST_TYPE") or "sha256").lower() not in _DIGEST_TYPES:
        error("DIGEST_TYPE", f"want one of {', '.join(sorted(_DIGEST_TYPES))}")

    port = number("SPA_SERVER_PORT", 1, 65535)
    fw_timeout = number("FW_TIMEOUT", 0, 2 << 15)

    access = get("ACCESS")
    if access is not None:
        try:
            parse_access("0.0.0.0," + access)
        except SpaError:
            error("ACCESS", f"{access!r} is not proto/port[,proto/port...] (tcp or udp)")
    allow_ip = get("ALLOW_IP")
    if allow_ip is not None and allow_ip.lower() not in ("source", "resolve"):
        try:
            ipaddress.ip_address(allow_ip)
        except ValueError:
            error("ALLOW_IP", f"{allow_ip!r} is not an IP address, 'source' or 'resolve'")
    username = get("SPOOF_USER")

    keys: SpaKeys | None = None
    if key is not None and hmac_key is not None:
        try:
            keys = SpaKeys(key, hmac_key)
        except ValueError as problem:
            error("KEY_BASE64" if "Rijndael" in str(problem) else "HMAC_KEY_BASE64", str(problem))
    if errors or keys is None:
        raise ConfigError(errors)
    return ClientProfile(
        keys=keys,
        port=DEFAULT_PORT if port is None else port,
        access=access,
        allow_ip=allow_ip,
        fw_timeout=fw_timeout,
        username=username,
    )
