"""``RemoteRuntime``: the monitor's view of Docker through ``knockgate launcher``.

It implements :class:`~appliance.services.runtime.ContainerRuntime` and the
LabelSource protocol (``labelled``, ``inspect``, ``events``) over the launcher's
socket (:mod:`appliance.services.rpc`). Each call is one connection (so the worker
threads that call it share nothing); a stream keeps its own connection until
``close``. Every failure, the launcher's refusals and Docker's errors it relays
included, is a :class:`ContainerError`: the monitor's fail-closed paths handle it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from appliance.config.schema import Service
from appliance.errors import ContainerError
from appliance.services.discovery import ContainerEvent
from appliance.services.labels import ContainerFacts
from appliance.services.rpc import (
    MAX_REPLY,
    Invalid,
    container_from,
    death_from,
    event_from,
    facts_from,
    request_line,
)
from appliance.services.runtime import Container, Death

T = TypeVar("T")
CALL_TIMEOUT = 120.0  # seconds for one answer (a stop waits for the container's end)
CREATE_TIMEOUT = 900.0  # a create may build the service's image first
CONNECT_WAIT = 5.0  # seconds to wait for a launcher that is (re)starting


def _reply(line: bytes, where: str) -> dict[str, Any]:
    if not line:
        raise ContainerError(f"{where}: the launcher closed the connection")
    if not line.endswith(b"\n"):
        raise ContainerError(f"{where}: the launcher's answer is too long")
    try:
        data = json.loads(line)
    except ValueError:
        raise ContainerError(f"{where}: the launcher's answer is not JSON") from None
    if not isinstance(data, dict):
        raise ContainerError(f"{where}: the launcher's answer is not an object")
    return data


class RemoteStream(Generic[T]):
    """A stream of the launcher's (deaths or events) until :meth:`close` (from any
    thread); the iteration raises ContainerError when the stream breaks."""

    def __init__(
        self, sock: socket.socket, reader: Any, decode: Callable[[object], T], where: str
    ) -> None:
        self.sock = sock
        self.reader = reader  # the one that read the first reply (it may hold more)
        self.decode = decode
        self.where = where
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[T]:
        try:
            with self.reader as reader:
                while True:
                    try:
                        line = reader.readline(MAX_REPLY + 1)
                    except OSError as error:
                        if self._closed.is_set():
                            return
                        raise ContainerError(f"{self.where}: {error}") from None
                    if not line and self._closed.is_set():
                        return
                    data = _reply(line, self.where)
                    if "event" not in data:
                        raise ContainerError(str(data.get("error") or f"{self.where}: ended"))
                    try:
                        yield self.decode(data["event"])
                    except Invalid as error:
                        raise ContainerError(f"{self.where}: bad event: {error}") from None
        finally:
            self.sock.close()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class RemoteRuntime:
    """ContainerRuntime and LabelSource through the launcher at ``path``."""

    def __init__(
        self, path: str, timeout: float = CALL_TIMEOUT, connect_wait: float = CONNECT_WAIT
    ) -> None:
        self.path = path
        self.timeout = timeout
        self.connect_wait = connect_wait

    # ------------------------------------------------------------------ the wire

    def _connect(self, timeout: float | None) -> socket.socket:
        deadline = time.monotonic() + self.connect_wait
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(self.path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as error:
                sock.close()
                if time.monotonic() >= deadline:
                    raise ContainerError(
                        f"launcher {self.path}: not there ({error.strerror}): is "
                        "`knockgate launcher` running?"
                    ) from None
                time.sleep(0.1)
            except OSError as error:
                sock.close()
                raise ContainerError(f"launcher {self.path}: {error.strerror or error}") from None

    def _open(self, verb: str, timeout: float | None, args: dict[str, str]) -> Any:
        """Send one request; (the socket, its reader, the first reply's result)."""
        where = f"launcher {verb}"
        sock = self._connect(timeout)
        reader = sock.makefile("rb")
        try:
            sock.sendall(request_line(verb, **args))
            data = _reply(reader.readline(MAX_REPLY + 1), where)
            if data.get("ok") is not True:
                raise ContainerError(str(data.get("error") or f"{where}: failed"))
        except OSError as error:
            reader.close()
            sock.close()
            raise ContainerError(f"{where}: {error.strerror or error}") from None
        except ContainerError:
            reader.close()
            sock.close()
            raise
        return sock, reader, data.get("result")

    def _call(self, verb: str, timeout: float | None = None, **args: str) -> Any:
        sock, reader, result = self._open(verb, timeout or self.timeout, args)
        reader.close()
        sock.close()
        return result

    def _stream(self, verb: str, decode: Callable[[object], T], **args: str) -> RemoteStream[T]:
        sock, reader, _ = self._open(verb, self.timeout, args)
        sock.settimeout(None)  # events may be hours apart
        return RemoteStream(sock, reader, decode, f"launcher {verb}")

    @staticmethod
    def _decode(decode: Callable[[object], T], value: object, verb: str) -> T:
        try:
            return decode(value)
        except Invalid as error:
            raise ContainerError(f"launcher {verb}: bad answer: {error}") from None

    def _list(self, decode: Callable[[object], T], value: object, verb: str) -> list[T]:
        if not isinstance(value, list):
            raise ContainerError(f"launcher {verb}: bad answer: expected a list")
        return [self._decode(decode, item, verb) for item in value]

    # ------------------------------------------------------------------ ContainerRuntime

    def owned(self, owner: str) -> list[Container]:
        return self._list(container_from, self._call("owned", owner=owner), "owned")

    def create(self, service: Service, owner: str, config_hash: str) -> Container:
        """Only the service's name (and the definition's hash, to be sure both sides
        mean the same one) is sent: the launcher builds it from its own catalogue."""
        result = self._call(
            "create",
            CREATE_TIMEOUT,
            service=service.name,
            owner=owner,
            config_hash=config_hash,
        )
        return self._decode(container_from, result, "create")

    def start(self, container: Container) -> None:
        self._call("start", container=container.id)

    def stop(self, container: Container) -> None:
        self._call("stop", container=container.id)

    def pause(self, container: Container) -> None:
        self._call("pause", container=container.id)

    def unpause(self, container: Container) -> None:
        self._call("unpause", container=container.id)

    def remove(self, container: Container) -> None:
        self._call("remove", container=container.id)

    def refresh(self, container: Container) -> Container:
        result = self._call("refresh", container=container.id)
        if result is None:  # gone, as DockerRuntime.refresh says it
            container.state = "missing"
            return container
        return self._decode(container_from, result, "refresh")

    def deaths(self, owner: str) -> RemoteStream[Death]:
        return self._stream("deaths", death_from, owner=owner)

    # ------------------------------------------------------------------ LabelSource

    def labelled(self) -> tuple[ContainerFacts, ...]:
        return tuple(self._list(facts_from, self._call("labelled"), "labelled"))

    def inspect(self, ident: str) -> ContainerFacts | None:
        result = self._call("inspect", container=ident)
        return None if result is None else self._decode(facts_from, result, "inspect")

    def events(self) -> RemoteStream[ContainerEvent]:
        return self._stream("events", event_from)
