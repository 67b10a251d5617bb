"""The webhook's signature: HMAC-SHA256 over ``timestamp + "." + body``.

Headers: ``X-Knockgate-Timestamp: <unix seconds>`` and ``X-Knockgate-Signature:
sha256=<hex>``. The receiver recomputes it with the shared secret, compares in
constant time and refuses a timestamp too far from its own clock (a replay)."""

from __future__ import annotations

import hashlib
import hmac

TOLERANCE = 300.0  # seconds a receiver should accept between the timestamp and its clock


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def signed_headers(secret: bytes, now: float, body: bytes) -> dict[str, str]:
    timestamp = str(int(now))
    return {
        "X-Knockgate-Timestamp": timestamp,
        "X-Knockgate-Signature": signature(secret, timestamp, body),
    }


def verify(
    secret: bytes,
    timestamp: str,
    body: bytes,
    header: str,
    now: float,
    tolerance: float = TOLERANCE,
) -> bool:
    """What a receiver does (the README shows the same in a few lines; the integration
    tests run the README's, this one the unit tests)."""
    try:
        stamp = int(timestamp)
    except ValueError:
        return False
    if abs(now - stamp) > tolerance:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), header)
