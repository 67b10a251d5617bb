"""Single Packet Authorization, wire-compatible with fwknop 2.6.10 (Rijndael + HMAC-SHA256).

:mod:`appliance.spa.wire` builds and opens packets; :mod:`appliance.spa.keyfile` reads
fwknop client key files (``~/.fwknoprc`` format and ``fwknop --key-gen`` output).
This package needs the ``cryptography`` package; ``appliance.core`` never imports it.
"""

from __future__ import annotations

from appliance.spa.wire import (
    SpaError,
    SpaKeys,
    SpaMessage,
    authenticate,
    new_message,
    open_packet,
    parse_access,
    replay_digest,
    seal,
)

__all__ = [
    "SpaError",
    "SpaKeys",
    "SpaMessage",
    "authenticate",
    "new_message",
    "open_packet",
    "parse_access",
    "replay_digest",
    "seal",
]
