"""The knock client: knockgate's replacement for knockd's ``knock``.

Plain sockets, no raw packets, no root. On the wire it matches knockd 0.8's
``knock``:

* TCP: a non-blocking ``connect()`` closed at once, so the knock is exactly one
  SYN (a closed port answers RST; an open one completes the handshake and gets
  an immediate FIN, as with ``knock``).
* UDP: one datagram with a single NUL byte of payload (``knock`` calls
  ``sendto(sd, "", 1, ...)``, i.e. the string's terminator).

Where ``knock`` is lax we are strict: a target that is not a port number
1..65535 or a known service name, with an optional ``:tcp``/``:udp``, is an
error, and so is any socket failure. (``knock`` sends ``7000:icmp`` as TCP,
``70000`` to port 4464 and ``0`` to port 0, and ignores send errors.) Every
failure is a :class:`KnockError`.

The CLI (``knockgate knock``) wires its options to these functions: the host
and ``-4``/``-6`` → :func:`resolve_host`; each target with ``-u`` as the default
protocol → :func:`parse_target` (or a door name → :func:`sequence_for_door`);
then ``-d`` and ``-v`` → :func:`send_knocks`.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from typing import Literal

from appliance.config.onetime import mark_line_used, parse_one_time_lines
from appliance.config.schema import Config
from appliance.core.model import Proto, Step
from appliance.core.totp import time_step, totp_sequence
from appliance.errors import KnockError

# The UDP knock's payload: what knockd's ``knock`` sends (one NUL byte).
UDP_PAYLOAD = b"\x00"

MIN_PORT = 1
MAX_PORT = 65535

# What /etc/services names look like (``ssh``, ``http-alt``, ``kerberos-adm``).
_SERVICE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._+*/-]*")

_PROTOS: dict[str, Proto] = {"tcp": "tcp", "udp": "udp"}
_SOCKET_TYPES: dict[str, int] = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}
_FAMILIES: dict[int, int] = {4: socket.AF_INET, 6: socket.AF_INET6}

# What a non-blocking connect() may answer when the SYN went out: still in
# progress, already refused (RST from a closed port), or already connected.
_TCP_SENT = frozenset({0, errno.EINPROGRESS, errno.ECONNREFUSED})

Verbose = Callable[[str], None]


# --- targets -----------------------------------------------------------------


def parse_target(spec: str, default_proto: Proto) -> Step:
    """Parse one knock target, ``PORT`` or ``PORT:PROTO``, as ``knock`` accepts it.

    ``PORT`` is a number 1..65535 or a service name (``ssh``, ``domain``) looked
    up for the target's protocol; ``PROTO`` is ``tcp`` or ``udp`` in any case and
    overrides ``default_proto``.
    """
    port_text, colon, proto_text = spec.partition(":")
    proto = _parse_proto(spec, proto_text) if colon else default_proto
    return Step(_parse_port(spec, port_text, proto), proto)


def _parse_proto(spec: str, text: str) -> Proto:
    proto = _PROTOS.get(text.lower())
    if proto is None:
        raise KnockError(f"knock target {spec!r}: protocol must be tcp or udp")
    return proto


def _parse_port(spec: str, text: str, proto: Proto) -> int:
    if not text:
        raise KnockError(f"knock target {spec!r}: missing port")
    if text.isascii() and text.isdigit():
        digits = text.lstrip("0") or "0"
        port = int(digits) if len(digits) <= len(str(MAX_PORT)) else MAX_PORT + 1
        if not MIN_PORT <= port <= MAX_PORT:
            raise KnockError(f"knock target {spec!r}: port must be {MIN_PORT}..{MAX_PORT}")
        return port
    return _service_port(spec, text, proto)


def _service_port(spec: str, name: str, proto: Proto) -> int:
    if not _SERVICE_NAME.fullmatch(name):
        raise KnockError(
            f"knock target {spec!r}: port must be a number {MIN_PORT}..{MAX_PORT} or a service name"
        )
    try:
        return socket.getservbyname(name, proto)
    except OSError:
        raise KnockError(f"knock target {spec!r}: unknown {proto} service {name!r}") from None


# --- hosts -------------------------------------------------------------------


def resolve_host(host: str, family: Literal[4, 6] | None) -> tuple[int, str]:
    """Resolve ``host`` to ``(address family, numeric address)``.

    ``family`` 4 or 6 forces IPv4 or IPv6 (``knock -4``/``-6``); ``None`` takes
    the resolver's first answer, as ``knock`` 0.8 does (``AF_UNSPEC``).
    """
    wanted = socket.AF_UNSPEC if family is None else _FAMILIES[family]
    try:
        answers = socket.getaddrinfo(host, None, wanted, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise KnockError(f"cannot resolve {host}: {_reason(exc)}") from None
    for found_family, _, _, _, sockaddr in answers:
        if found_family in (socket.AF_INET, socket.AF_INET6):
            return int(found_family), str(sockaddr[0])
    raise KnockError(f"cannot resolve {host}: no IPv4 or IPv6 address")


# --- sending -----------------------------------------------------------------


def send_knocks(
    address_family: int,
    address: str,
    steps: Sequence[Step],
    delay_ms: int,
    verbose: Verbose | None,
) -> None:
    """Send one knock per step to ``address``, ``delay_ms`` apart.

    ``verbose`` receives one line per knock in ``knock -v``'s format
    (``hitting tcp 127.0.0.1:7000``), before the knock is sent. The first
    failure stops the sequence with a :class:`KnockError` naming the step.
    """
    _check_arguments(steps, delay_ms)
    for index, step in enumerate(steps):
        if index and delay_ms:
            time.sleep(delay_ms / 1000)
        if verbose is not None:
            verbose(f"hitting {step.proto} {address}:{step.port}")
        _send_one(address_family, address, step)


def _check_arguments(steps: Sequence[Step], delay_ms: int) -> None:
    if delay_ms < 0:
        raise KnockError(f"delay cannot be negative: {delay_ms} ms")
    for step in steps:
        if step.proto not in _SOCKET_TYPES:
            raise KnockError(f"knock {step}: protocol must be tcp or udp")
        if not MIN_PORT <= step.port <= MAX_PORT:
            raise KnockError(f"knock {step}: port must be {MIN_PORT}..{MAX_PORT}")


def _send_one(address_family: int, address: str, step: Step) -> None:
    try:
        with socket.socket(address_family, _SOCKET_TYPES[step.proto]) as sock:
            if step.proto == "tcp":
                _send_syn(sock, address, step.port)
            else:
                sock.sendto(UDP_PAYLOAD, (address, step.port))
    except OSError as exc:
        raise KnockError(f"cannot knock {step} on {address}: {_reason(exc)}") from None


def _send_syn(sock: socket.socket, address: str, port: int) -> None:
    """Start a connection and leave it: the caller closes the socket at once."""
    sock.setblocking(False)
    code = sock.connect_ex((address, port))
    if code not in _TCP_SENT:
        raise OSError(code, os.strerror(code))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# --- doors -------------------------------------------------------------------


def sequence_for_door(config: Config, door_name: str, now: float) -> tuple[Step, ...]:
    """The knock sequence of ``door_name`` in ``config`` at unix time ``now``.

    A TOTP door's sequence is computed for the current time step. A one-time door
    has no fixed sequence (``--one-time FILE`` sends its next line) and an SPA door
    is opened by ``knockgate spa``: asking for either is an error, as is an
    unknown door.
    """
    door = config.door(door_name)
    if door is None:
        raise KnockError(_unknown_door(config, door_name))
    if door.spa is not None:
        raise KnockError(
            f"door {door_name!r} is opened by single packet authorization: "
            "use knockgate spa (or fwknop)"
        )
    if door.knock.one_time is not None:
        raise KnockError(
            f"door {door_name!r} uses one-time sequences: knock with --one-time FILE "
            f"(a copy of its one-time file {door.knock.one_time.path})"
        )
    totp = door.knock.totp
    if totp is not None:
        return totp_sequence(totp, time_step(totp, now))
    return door.knock.sequence


def next_one_time(path: str) -> tuple[tuple[Step, ...], int, int]:
    """The first unused sequence of a knockd one-time file: (steps, line, byte offset)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise KnockError(f"cannot read {path}: {error.strerror}") from None
    sequences = parse_one_time_lines(data, path, None)
    if not sequences:
        raise KnockError(f"{path} has no unused sequence left")
    first = sequences[0]
    return first.steps, first.line, first.offset


def use_one_time(path: str, offset: int) -> None:
    """Mark a line used (``#`` over its first byte), as the server does, before sending it."""
    try:
        mark_line_used(path, offset)
    except OSError as error:
        raise KnockError(
            f"cannot mark the line used in {path}: {error.strerror} (nothing was sent: "
            "a line is marked before it is sent, so it is never sent twice)"
        ) from None


def _unknown_door(config: Config, door_name: str) -> str:
    known = ", ".join(door.name for door in config.doors)
    if not known:
        return f"unknown door {door_name!r}: {config.path} defines no doors"
    return f"unknown door {door_name!r} in {config.path} (known doors: {known})"
