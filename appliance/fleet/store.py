"""Where a fleet's state lives: the :class:`FleetStore` protocol, and an in-memory
store (unit tests, ``simulate``) that several links can share like one Redis."""

from __future__ import annotations

import threading
from typing import Protocol

from appliance.errors import KnockgateError
from appliance.fleet.messages import FleetMessage, Keys, decode, decode_live, encode_live

STREAM_MAX = 10_000  # stream entries kept (approximately): readers only need the tail


class FleetUnreachable(KnockgateError):
    """The store could not be reached or refused the command (why in the message)."""


class FleetStore(Protocol):
    """The commands a link needs. Every method may raise :class:`FleetUnreachable`."""

    def ping(self) -> None: ...

    def last_id(self) -> str:
        """The newest stream entry's id (``0-0`` when there is none)."""
        ...

    def live(self, now: float) -> list[FleetMessage]:
        """The live grants at unix time ``now`` (expired ones are dropped)."""
        ...

    def publish(self, message: FleetMessage, now: float) -> None: ...

    def read(self, after: str, block: float) -> list[tuple[str, FleetMessage | None]]:
        """Stream entries after ``after``, waiting up to ``block`` seconds for one
        (``None``: an entry that does not decode)."""
        ...

    def claim(self, key: str, owner: str, ttl: float) -> bool:
        """Take ``key`` for ``ttl`` seconds unless it exists: ``True`` when taken now."""
        ...

    def close(self) -> None: ...


class MemoryStore:
    """One in-memory "Redis" shared by the links given it (thread-safe); ``down``
    makes every command fail, as an unreachable server would."""

    def __init__(self, name: str) -> None:
        self.keys = Keys(name)
        self.down = False
        self._lock = threading.Condition()
        self._stream: list[tuple[str, dict[str, str]]] = []
        self._grants: dict[str, str] = {}
        self._claims: dict[str, tuple[str, float]] = {}
        self._seq = 0
        self.now = 0.0  # the claims' clock (tests set it)

    def _check(self) -> None:
        if self.down:
            raise FleetUnreachable("connection refused (memory store down)")

    def ping(self) -> None:
        with self._lock:
            self._check()

    def last_id(self) -> str:
        with self._lock:
            self._check()
            return self._stream[-1][0] if self._stream else "0-0"

    def live(self, now: float) -> list[FleetMessage]:
        with self._lock:
            self._check()
            found = [decode_live(field, value) for field, value in self._grants.items()]
        return [m for m in found if m is not None and m.deadline > now]

    def publish(self, message: FleetMessage, now: float) -> None:
        with self._lock:
            self._check()
            if message.kind == "grant":
                self._grants[message.field] = encode_live(message)
            else:
                self._grants.pop(message.field, None)
            self._seq += 1
            self._stream.append((f"{self._seq}-0", message.fields()))
            del self._stream[:-STREAM_MAX]
            self._lock.notify_all()

    def read(self, after: str, block: float) -> list[tuple[str, FleetMessage | None]]:
        number = int(after.split("-")[0])
        with self._lock:
            self._check()
            if not self._newer(number):
                self._lock.wait(block)
                self._check()
            return [(i, decode(f)) for i, f in self._stream if int(i.split("-")[0]) > number]

    def _newer(self, number: int) -> bool:
        return bool(self._stream) and int(self._stream[-1][0].split("-")[0]) > number

    def claim(self, key: str, owner: str, ttl: float) -> bool:
        with self._lock:
            self._check()
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
