"""``knockgate launcher``: the only process that reaches Docker.

The monitor (``knockgate run --launcher SOCKET``) asks it over a Unix socket, in the
typed JSON lines of :mod:`appliance.services.rpc`, and never holds the Docker socket.
What it may ask is fixed: list this installation's containers, create one of the
catalogue's services *by name* (the launcher reads the catalogue from the config file
itself, once at its start and again only on its own SIGHUP, so no container spec crosses
the socket and a config rewritten behind its back changes nothing), start, stop, pause,
unpause, remove, inspect, follow deaths and labelled containers' events. A catalogue
service that bind-mounts a host path that would hand out the host (``/``, the Docker
socket, ``/proc``, ``/etc``, ... see :data:`FORBIDDEN_SOURCES`) is never created.

    monitor ──(JSON line)──> LauncherServer ──> Broker.answer ──> Engine (DockerRuntime)
                                 │ peer uid 0 or ours          │ refuses foreign containers
                                 └──<──(JSON line reply / event stream)──┘

Every verb that names a container first inspects it and refuses unless it carries
``knockgate.owner=<this installation's owner>`` or a ``knockgate.door`` /
``knockgate.group`` label; ``remove`` only the owner's own. A refusal is logged once
per container and answered as an error (the client raises ContainerError). A bad
request is an error reply, never a traceback; each connection has its own thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from appliance.config.files import CONFIG_LIMIT, read_bounded
from appliance.config.problems import Problems
from appliance.config.schema import Service
from appliance.errors import ConfigError, ContainerError, KnockgateError
from appliance.services.discovery import DockerLabelSource, EventStream
from appliance.services.docker_runtime import DockerRuntime
from appliance.services.labels import DOOR, GROUP, ContainerFacts
from appliance.services.launcher import config_hash
from appliance.services.rpc import (
    MAX_REQUEST,
    STREAMS,
    Invalid,
    Request,
    container_json,
    death_json,
    event_json,
    facts_json,
    parse_request,
    reply_line,
)
from appliance.services.runtime import LABEL_OWNER, Container, ContainerRuntime

log = logging.getLogger("knockgate.launcher")

MAX_CLIENTS = 32  # connections served at once; more are answered with an error
IDLE = 60.0  # seconds a connection may wait between requests (or block a reply)
REMEMBERED = 4096  # refused containers remembered (to log each once)


class Engine(ContainerRuntime, Protocol):
    """What the launcher asks Docker: the runtime protocol, plus a look at one
    container and the labelled ones."""

    def get(self, ident: str) -> Container | None:
        """The container now (``None``: there is none)."""

    def labelled(self) -> tuple[ContainerFacts, ...]: ...

    def facts(self, ident: str) -> ContainerFacts | None: ...

    def events(self) -> EventStream: ...


class DockerEngine(DockerRuntime):
    """The Docker SDK behind :class:`Engine`: DockerRuntime and DockerLabelSource, as the
    monitor used them in process."""

    def __init__(self, client: Any = None) -> None:
        super().__init__(client)
        self.source = DockerLabelSource(self.client)

    def get(self, ident: str) -> Container | None:
        try:
            raw = self.client.containers.get(ident)
        except Exception as error:
            if type(error).__name__ == "NotFound":
                return None
            raise ContainerError(f"docker: inspect {ident[:12]}: {error}") from None
        return self._wrap(raw)

    def labelled(self) -> tuple[ContainerFacts, ...]:
        return self.source.labelled()

    def facts(self, ident: str) -> ContainerFacts | None:
        return self.source.inspect(ident)

    def events(self) -> EventStream:
        return self.source.events()


# Host paths a catalogue service may not bind-mount: these trees, their ancestors (``/var``
# holds /var/lib/docker), and any path naming a container engine's socket.
FORBIDDEN_SOURCES = (
    "/proc",
    "/sys",
    "/dev",
    "/etc",
    "/run",
    "/var/run",
    "/boot",
    "/root",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/var/lib/docker",
    "/var/lib/containerd",
)
ENGINE_SOCKETS = ("docker.sock", "containerd.sock", "podman.sock")


def forbidden_volume(volume: str) -> str | None:
    """Why ``volume`` ("SOURCE:TARGET[:ro]") hands out the host, or ``None`` (a named
    volume, or a harmless host path)."""
    source = volume.split(":", 1)[0]
    if not source.startswith("/"):
        return None  # a named volume
    path = os.path.normpath(source).replace("//", "/")
    if os.path.basename(path) in ENGINE_SOCKETS:
        return f"{source} is a container engine's socket"
    for tree in FORBIDDEN_SOURCES:
        if path == tree or path.startswith(tree + "/"):
            return f"{source} is under {tree}"
        if tree.startswith(path.rstrip("/") + "/"):
            return f"{source} holds {tree}"
    return None


class Catalogue:
    """The config file's ``services:``, read at the launcher's start and on its SIGHUP
    only; a failed read keeps the previous catalogue."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._services: dict[str, Service] = {}
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, Service]:
        with self._lock:
            return self._services

    def reload(self) -> bool:
        """Read the file again (``False``, logged, previous kept: when it cannot)."""
        try:
            services = read_catalogue(self.path)
        except ConfigError as error:
            log.warning("launcher: catalogue not read (create keeps the previous one): %s", error)
            return False
        for name, service in services.items():
            for volume in service.volumes:
                why = forbidden_volume(volume)
                if why is not None:
                    log.warning("launcher: service %s is never created: volume %s", name, why)
        with self._lock:
            self._services = services
        log.info("launcher: catalogue read from %s: %d service(s)", self.path, len(services))
        return True


def read_catalogue(path: str) -> dict[str, Service]:
    """The ``services:`` of the config file at ``path`` now (ConfigError if broken);
    a knockd.conf has none. Doors and key files are not read."""
    from appliance.config import detect_format
    from appliance.config.yaml_format import parse_services

    try:
        text = read_bounded(path, CONFIG_LIMIT).decode("utf-8")
    except Exception as error:  # Invalid (too big, unreadable), UnicodeDecodeError
        raise ConfigError([f"{path}:0: (file): {error}"]) from None
    if detect_format(path, text) == "knockd":
        return {}
    problems = Problems(path)
    services = parse_services(text, path, problems)
    problems.raise_if_any()
    return services


Streaming = tuple[Iterable[Any], Callable[[], None], Callable[[Any], dict[str, Any]]]


class Broker:
    """Answers one request line at a time (thread-safe: it keeps only the set of
    refused containers, under a lock). :meth:`answer` never raises."""

    def __init__(
        self, engine: Engine, owner: str, catalogue: Callable[[], dict[str, Service]]
    ) -> None:
        self.engine = engine
        self.owner = owner
        self.catalogue = catalogue
        self._refused: set[str] = set()
        self._lock = threading.Lock()

    def answer(self, line: bytes) -> tuple[dict[str, Any], Streaming | None]:
        """The reply to one request line; for a stream verb also (items, close, encode)."""
        try:
            request = parse_request(line)
        except Invalid as error:
            return {"ok": False, "error": f"launcher: bad request: {error}"}, None
        try:
            if request.verb in STREAMS:
                return {"ok": True}, self._stream(request)
            return {"ok": True, "result": self._call(request)}, None
        except KnockgateError as error:  # ContainerError (Docker, refusals), ConfigError
            return {"ok": False, "error": str(error)}, None
        except Exception:  # a bug: logged, answered, the launcher goes on
            log.exception("launcher: %s failed", request.verb)
            return {"ok": False, "error": f"launcher: {request.verb}: internal error"}, None

    def _call(self, request: Request) -> Any:
        engine, verb = self.engine, request.verb
        match verb:
            case "owned":
                self._check_owner(request.owner)
                return [container_json(c) for c in engine.owned(self.owner)]
            case "create":
                self._check_owner(request.owner)
                return container_json(self._create(request.service, request.config_hash))
            case "labelled":
                return [facts_json(f) for f in engine.labelled()]
            case "inspect":
                facts = engine.facts(request.container)
                if facts is None:
                    return None
                self._authorise(verb, facts.id, facts.name, facts.label_map)
                return facts_json(facts)
            case "refresh":
                found = engine.get(request.container)
                if found is None:
                    return None
                self._authorise(verb, found.id, found.name, found.labels)
                return container_json(found)
        container = engine.get(request.container)
        if container is None:
            raise ContainerError(f"docker: {verb}: no container {request.container[:12]}")
        self._authorise(verb, container.id, container.name, container.labels)
        match verb:
            case "start":
                engine.start(container)
            case "stop":
                engine.stop(container)
            case "pause":
                engine.pause(container)
            case "unpause":
                engine.unpause(container)
            case "remove":
                engine.remove(container)
            case _:
                raise AssertionError(f"unhandled verb {verb}")
        return None

    def _stream(self, request: Request) -> Streaming:
        if request.verb == "deaths":
            self._check_owner(request.owner)
            deaths = self.engine.deaths(self.owner)
            return deaths, deaths.close, death_json
        events = self.engine.events()
        return events, events.close, event_json

    def _create(self, name: str, wanted: str) -> Container:
        service = self.catalogue().get(name)
        if service is None:
            raise ContainerError(f"launcher: create {name}: no such service in the catalogue")
        if config_hash(service) != wanted:
            raise ContainerError(
                f"launcher: create {name}: the service's definition in the config file differs "
                "from the monitor's (reload knockgate: docker compose kill -s HUP knockgate)"
            )
        for volume in service.volumes:
            why = forbidden_volume(volume)
            if why is not None:
                log.warning("launcher: refused create of service %s: volume %s", name, why)
                raise ContainerError(f"launcher: refused create of service {name}: volume {why}")
        return self.engine.create(service, self.owner, wanted)

    def _check_owner(self, owner: str) -> None:
        if owner != self.owner:
            raise ContainerError(
                f"launcher: owner {owner} is not this installation's ({self.owner}): "
                "the monitor and the launcher read different config paths"
            )

    def _authorise(self, verb: str, ident: str, name: str, labels: dict[str, str]) -> None:
        own = labels.get(LABEL_OWNER) == self.owner
        if own or (verb != "remove" and (DOOR in labels or GROUP in labels)):
            return
        why = (
            "only knockgate's own containers are removed"
            if verb == "remove" and (DOOR in labels or GROUP in labels)
            else f"it is neither knockgate's (knockgate.owner={self.owner}) nor labelled "
            "knockgate.door or knockgate.group"
        )
        with self._lock:
            first = ident not in self._refused
            if first and len(self._refused) < REMEMBERED:
                self._refused.add(ident)
        if first:
            log.warning("launcher: refused %s of container %s: %s", verb, name, why)
        raise ContainerError(f"launcher: refused {verb} of container {name}: {why}")


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


class LauncherServer:
    """The Unix socket: one thread per connection, at most :data:`MAX_CLIENTS`; a peer
    must be uid 0 (the monitor) or the launcher's own uid."""

    def __init__(
        self, broker: Broker, path: str, mode: int = 0o666, peers: Iterable[int] = ()
    ) -> None:
        self.broker = broker
        self.path = path
        self.mode = mode
        self.allowed = frozenset({0, os.getuid(), *peers})
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._closing = threading.Event()
        self._sock: socket.socket | None = None
        self._strangers: set[int] = set()

    def bind(self) -> None:
        """Listen at :attr:`path` (a stale socket there is replaced; anything else is an
        error). ``mode`` 0666: the directory decides who gets in (see README)."""
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise KnockgateError(f"launcher socket {self.path}: {error.strerror}") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            os.chmod(self.path, self.mode)
            sock.listen(64)
        except OSError as error:
            sock.close()
            raise KnockgateError(f"launcher socket {self.path}: {error.strerror}") from None
        self._sock = sock

    def serve(self) -> None:
        """Until :meth:`close`."""
        assert self._sock is not None, "bind() first"
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closing.is_set():
                    return
                continue
            if not self._slots.acquire(blocking=False):
                self._refuse(conn, "launcher: too many connections")
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self._closing.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except OSError:
            pass

    @staticmethod
    def _refuse(conn: socket.socket, why: str) -> None:
        try:
            conn.settimeout(1.0)
            conn.sendall(reply_line({"ok": False, "error": why}))
        except OSError:
            pass
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            uid = _peer_uid(conn)
            if uid not in self.allowed:
                if uid not in self._strangers:
                    self._strangers.add(uid)
                    log.warning("launcher: refused a connection from uid %d", uid)
                self._refuse(conn, "launcher: not allowed")
                return
            conn.settimeout(IDLE)
            self._requests(conn)
        except OSError:  # the client went away, or idled out
            pass
        except Exception:  # a bug: logged, this connection closed, the others go on
            log.exception("launcher: a connection failed")
        finally:
            conn.close()
            self._slots.release()

    def _requests(self, conn: socket.socket) -> None:
        with conn.makefile("rb") as reader:
            while True:
                line = reader.readline(MAX_REQUEST + 1)
                if not line:
                    return
                if not line.endswith(b"\n"):
                    conn.sendall(
                        reply_line(
                            {
                                "ok": False,
                                "error": "launcher: bad request: "
                                f"too long (at most {MAX_REQUEST} bytes)",
                            }
                        )
                    )
                    return  # fmt: skip
                reply, stream = self.broker.answer(line)
                conn.sendall(reply_line(reply))
                if stream is not None:
                    self._follow(conn, *stream)
                    return

    def _follow(
        self,
        conn: socket.socket,
        items: Iterable[Any],
        close: Callable[[], None],
        encode: Callable[[Any], dict[str, Any]],
    ) -> None:
        """Send each item until the stream ends or the client hangs up (a watcher
        thread sees the hang-up and closes the stream, which ends the iteration)."""
        gone = threading.Event()

        def watch() -> None:
            while not gone.is_set():
                try:
                    if not conn.recv(256):
                        break  # the client closed: also any byte it sends is ignored
                except TimeoutError:
                    continue
                except OSError:
                    break
            gone.set()
            _quietly(close)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            for item in items:
                conn.sendall(reply_line({"event": encode(item)}))
            if not gone.is_set():
                conn.sendall(reply_line({"ok": False, "error": "docker: the event stream ended"}))
        except ContainerError as error:
            if not gone.is_set():
                conn.sendall(reply_line({"ok": False, "error": str(error)}))
        finally:
            gone.set()
            _quietly(close)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            watcher.join(IDLE + 1)


def _quietly(action: Callable[[], None]) -> None:
    try:
        action()
    except Exception:
        log.debug("closing a stream failed", exc_info=True)


def serve(config_path: str, socket_path: str, peers: Iterable[int] = ()) -> int:
    """``knockgate launcher``: serve until SIGTERM/SIGINT; SIGHUP reads the catalogue
    again. ``peers``: uids allowed besides 0 and its own (the monitor's, with --user)."""
    import signal

    from appliance.services.runtime import owner_of

    owner = owner_of(config_path)
    catalogue = Catalogue(config_path)
    catalogue.reload()  # a config it cannot read is reported now, not only at a knock
    broker = Broker(DockerEngine(), owner, catalogue)
    server = LauncherServer(broker, socket_path, peers=peers)
    server.bind()

    def stop(*_: object) -> None:
        threading.Thread(target=server.close, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, lambda *_: catalogue.reload())
    log.info("launcher: serving %s for owner %s (%s)", socket_path, owner, config_path)
    try:
        server.serve()
    finally:
        server.close()
    log.info("launcher: stopped")
    return 0
