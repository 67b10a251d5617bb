"""Time-based knock sequences: the ports for one time step, from a shared secret.

The derivation, for a door with secret ``K``, ``steps`` ports in ``low..high`` and
time step ``c = floor(unix_time / period)``::

    block b = HMAC-SHA256(K, c as 8 bytes big-endian || b as 4 bytes big-endian)
    each 4-byte big-endian word w of block 0, then block 1, ... gives the candidate
    port low + w mod (high - low + 1); a port already in the sequence is skipped

until ``steps`` ports are found. Every port differs from the others, so a sequence
never depends on the engine's duplicate rules. Anyone holding the secret (the
server, ``knockgate knock --config``) computes the same ports; someone who saw one
sequence learns nothing about the next one. Pure: standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct

from appliance.core.model import Step, Totp

_WORDS = struct.Struct(">8I").unpack


def time_step(totp: Totp, now: float) -> int:
    """The time step that ``now`` (unix seconds) falls in."""
    return math.floor(now / totp.period)


def totp_sequence(totp: Totp, step: int) -> tuple[Step, ...]:
    """The knock sequence of time step ``step``."""
    span = totp.high - totp.low + 1
    if span < totp.steps:
        raise ValueError("the port range is smaller than the number of steps")
    ports: list[int] = []
    block = 0
    while len(ports) < totp.steps:
        message = struct.pack(">qI", step, block)
        words = _WORDS(hmac.digest(totp.secret, message, hashlib.sha256))
        for word in words:
            port = totp.low + word % span
            if port not in ports:
                ports.append(port)
                if len(ports) == totp.steps:
                    break
        block += 1
    return tuple(Step(port, totp.proto) for port in ports)


def window(totp: Totp, now: float) -> range:
    """The time steps accepted at ``now``: the current one and ``skew`` either side."""
    current = time_step(totp, now)
    return range(current - totp.skew, current + totp.skew + 1)
