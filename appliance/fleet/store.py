"""Where a fleet's state lives: the :class:`FleetStore` protocol, and an in-memory
store (unit tests, ``simulate``) that several links can share like one Redis."""

from __future__ import annotations

import threading
from typing import Protocol

from appliance.errors import KnockgateError
from appliance.fleet.messages import (
    FleetMessage,
    Keys,
    decode_bytes,
    decode_live_bytes,
    encode_live,
)

STREAM_MAX = 10_000  # stream entries kept (approximately): readers only need the tail
READ_COUNT = 100  # stream entries read at most at once


class FleetUnreachable(KnockgateError):
    """The store could not be reached or refused the command (why in the message)."""


class FleetStore(Protocol):
    """The commands a link needs. Every method may raise :class:`FleetUnreachable`.

    What is read back is checked here (:func:`~appliance.fleet.messages.decode`):
    ``None`` stands for an entry that does not decode (counted, skipped)."""

    def ping(self) -> None: ...

    def epoch(self, token: str) -> str | None:
        """The store's epoch: set to ``token`` unless one is set, then the one in
        force. A store that lost its data (restarted without persistence, flushed)
        has a new one. ``None`` when the server cannot tell (before Redis 7.0)."""
        ...

    def last_id(self) -> str:
        """The newest stream entry's id (``0-0`` when there is none)."""
        ...

    def trimmed(self, after: str) -> bool:
        """Whether the entry at ``after`` is gone (then reading on from it could miss
        newer ones). ``0-0`` (the stream was empty when this host connected, and it
        read nothing since) counts as trimmed once the stream holds anything: nothing
        tells whether entries went meanwhile, and a reconcile is cheap."""
        ...

    def live(self, now: float) -> list[FleetMessage | None]:
        """The live grants at unix time ``now`` (expired ones are dropped)."""
        ...

    def publish(self, message: FleetMessage, now: float) -> None: ...

    def read(self, after: str, block: float | None) -> list[tuple[str, FleetMessage | None]]:
        """Stream entries after ``after``, waiting up to ``block`` seconds for one
        (``None``: do not wait)."""
        ...

    def claim(self, key: str, owner: str, ttl: float) -> bool:
        """Take ``key`` for ``ttl`` seconds unless it exists: ``True`` when taken now."""
        ...

    def close(self) -> None: ...


def stream_id(text: str) -> tuple[int, int]:
    """A stream id (``MS-SEQ``) as numbers, for ordering."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class MemoryStore:
    """One in-memory "Redis" shared by the links given it (thread-safe); ``down``
    makes every command fail, as an unreachable server would; ``failing`` names the
    commands that fail alone (a partial failure: an ACL or a full server)."""

    def __init__(self, name: str) -> None:
        self.keys = Keys(name)
        self.down = False
        self.failing: set[str] = set()
        self._lock = threading.Condition()
        self._stream: list[tuple[str, dict[bytes, bytes]]] = []
        self._grants: dict[bytes, bytes] = {}
        self._claims: dict[str, tuple[str, float]] = {}
        self._seq = 0
        self._epoch: str | None = None
        self.now = 0.0  # the claims' clock (tests set it)
        self.calls: dict[str, int] = {}

    def _check(self, command: str) -> None:
        self.calls[command] = self.calls.get(command, 0) + 1
        if self.down:
            raise FleetUnreachable("connection refused (memory store down)")
        if command in self.failing:
            raise FleetUnreachable(f"{command}: NOPERM (memory store)")

    def ping(self) -> None:
        with self._lock:
            self._check("PING")

    def epoch(self, token: str) -> str | None:
        with self._lock:
            self._check("SET")
            if self._epoch is None:
                self._epoch = token
            return self._epoch

    def lose_data(self) -> None:
        """Everything gone, as a Redis restarted without persistence (the ids go on
        growing, as a clock's do)."""
        with self._lock:
            self._stream.clear()
            self._grants.clear()
            self._claims.clear()
            self._epoch = None
            self._lock.notify_all()

    def last_id(self) -> str:
        with self._lock:
            self._check("XREVRANGE")
            return self._stream[-1][0] if self._stream else "0-0"

    def trimmed(self, after: str) -> bool:
        with self._lock:
            self._check("XREVRANGE")
            if after == "0-0":
                return bool(self._stream)
            return all(ident != after for ident, _ in self._stream)

    def live(self, now: float) -> list[FleetMessage | None]:
        with self._lock:
            self._check("HGETALL")
            found = [decode_live_bytes(field, value) for field, value in self._grants.items()]
        return [m for m in found if m is None or m.deadline > now]

    def publish(self, message: FleetMessage, now: float) -> None:
        with self._lock:
            self._check("XADD")
            field = message.field.encode()
            if message.kind == "grant":
                self._grants[field] = encode_live(message).encode()
            else:
                self._grants.pop(field, None)
            self._add({k.encode(): v.encode() for k, v in message.fields().items()})

    def inject(self, fields: dict[bytes, bytes]) -> None:
        """A raw entry on the stream (as any writer of the fleet's keys could add)."""
        with self._lock:
            self._add(fields)

    def inject_live(self, field: bytes, value: bytes) -> None:
        with self._lock:
            self._grants[field] = value

    def trim(self, keep: int) -> None:
        """Keep only the newest ``keep`` entries (as MAXLEN does)."""
        with self._lock:
            self._trim(keep)

    def _trim(self, keep: int) -> None:
        del self._stream[: max(0, len(self._stream) - keep)]

    def _add(self, fields: dict[bytes, bytes]) -> None:
        self._seq += 1
        self._stream.append((f"{self._seq}-0", fields))
        self._trim(STREAM_MAX)
        self._lock.notify_all()

    def read(self, after: str, block: float | None) -> list[tuple[str, FleetMessage | None]]:
        position = stream_id(after)
        with self._lock:
            self._check("XREAD")
            if block is not None and not self._newer(position):
                self._lock.wait(block)
                self._check("XREAD")
            return [(i, decode_bytes(f)) for i, f in self._stream if stream_id(i) > position][
                :READ_COUNT
            ]

    def _newer(self, position: tuple[int, int]) -> bool:
        return bool(self._stream) and stream_id(self._stream[-1][0]) > position

    def claim(self, key: str, owner: str, ttl: float) -> bool:
        with self._lock:
            self._check("SET")
            held = self._claims.get(key)
            if held is not None and held[1] > self.now:
                return False
            self._claims[key] = (owner, self.now + ttl)
            return True

    def close(self) -> None:
        pass

    def wake(self) -> None:
        """Wake readers blocked in :meth:`read` (after ``down`` changed)."""
        with self._lock:
            self._lock.notify_all()
