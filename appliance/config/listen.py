"""The metrics endpoint's ``listen`` setting: a Unix socket or a loopback address.

``unix:/run/knockgate/metrics.sock``, ``127.0.0.1:9464``, ``[::1]:9464`` or
``localhost:9464``. An address that is not loopback is refused unless the
configuration says ``allow_remote: true`` (then the caller warns): a hidden server must
not expose its numbers to the network it hides from.
"""

from __future__ import annotations

import ipaddress

from appliance.config.schema import MetricsSettings
from appliance.config.values import Invalid, shown

UNIX_PATH_MAX = 107  # bytes of an AF_UNIX socket path


def parse_listen(value: object, allow_remote: bool) -> MetricsSettings:
    """The setting, checked; :class:`Invalid` with what was expected otherwise."""
    if not isinstance(value, str) or not value.strip():
        raise Invalid(
            f"{shown(value)} is not a listen address (expected unix:/PATH or "
            "127.0.0.1:PORT, [::1]:PORT)"
        )
    text = value.strip()
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path.startswith("/"):
            raise Invalid(f"{shown(text)}: the socket path must be absolute (unix:/PATH)")
        if len(path.encode()) > UNIX_PATH_MAX:
            raise Invalid(f"{shown(text)}: the socket path is over {UNIX_PATH_MAX} bytes")
        return MetricsSettings(listen=text, unix_path=path, allow_remote=allow_remote)
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise Invalid(f"{shown(text)} has no port (expected HOST:PORT, e.g. 127.0.0.1:9464)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise Invalid(f"{shown(text)}: an IPv6 address goes in brackets ([::1]:9464)")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise Invalid(f"{shown(text)}: the port must be 1 to 65535")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise Invalid(
            f"{shown(text)}: {shown(host)} is not an IP address (expected a loopback "
            "address such as 127.0.0.1 or [::1], or unix:/PATH)"
        ) from None
    if not address.is_loopback and not allow_remote:
        raise Invalid(
            f"{shown(text)} is not a loopback address: the metrics would be reachable from "
            "the network knockgate hides from (expected 127.0.0.1, [::1] or unix:/PATH; "
            "set metrics.allow_remote: true to listen there anyway)"
        )
    return MetricsSettings(
        listen=text, host=str(address), port=int(port_text), allow_remote=allow_remote
    )


def is_remote(settings: MetricsSettings) -> bool:
    """Whether the endpoint is reachable from another host."""
    return settings.unix_path is None and not ipaddress.ip_address(settings.host).is_loopback
