"""Finding label-gated containers: a listing, then Docker's events, as typed events.

One thread (:meth:`Discovery.start`) asks a :class:`LabelSource` (Docker in process,
:class:`DockerLabelSource`, or the launcher's client) and hands each finding to a
callback as a frozen event; it shares no mutable state with whoever receives them
(the daemon's loop, which puts them on its queue). It carries :class:`ContainerFacts`,
not parse results: the loop parses them with :func:`appliance.services.labels.parse`
against the doors it holds now, so a reload needs no new listing.

    connect ──> follow events (create/start/die/destroy) ──> list labelled ──> Listed
                     │                                                  (a full snapshot)
                     └─> Changed (re-inspected facts) / Removed ──> deliver(event)

The event stream is opened before the listing, so nothing that happens in between is
lost (it arrives after the snapshot and, being re-inspected, says the current state).
After any failure (Docker down, the stream broken) the whole round is tried again,
backing off from :data:`RETRY` to :data:`RETRY_MAX` seconds; a streak of failures is
logged once when it starts and once when it ends, never per attempt.

Which containers: those with ``knockgate.door`` or ``knockgate.group`` (a door-less
group member). Docker ANDs several label filters, so the listing asks once per label
and the events are filtered on their labels here (Docker filters type and action).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from appliance.errors import ContainerError
from appliance.services.docker_runtime import docker_client, started_at
from appliance.services.labels import DOOR, GROUP, Binding, ContainerFacts, Published

log = logging.getLogger("knockgate.services.discovery")

LABELS = (DOOR, GROUP)  # a container with either is looked at
ACTIONS = ("create", "start", "die", "destroy")
RETRY = 1.0  # seconds before trying Docker again, doubled up to:
RETRY_MAX = 30.0


@dataclass(frozen=True, slots=True)
class Listed:
    """Every labelled container now: at the start and after each reconnect (events
    may have been missed meanwhile). A container not in it is gone."""

    at: float
    containers: tuple[ContainerFacts, ...]


@dataclass(frozen=True, slots=True)
class Changed:
    """A labelled container was created, started or died (``action``); ``container``
    is what Docker says of it right after."""

    at: float
    action: str
    container: ContainerFacts


@dataclass(frozen=True, slots=True)
class Removed:
    """A labelled container was destroyed (or vanished before it could be inspected)."""

    at: float
    id: str
    name: str


DiscoveryEvent = Listed | Changed | Removed


class ContainerEvent(NamedTuple):
    """A Docker container event of a labelled container."""

    action: str  # "create" | "start" | "die" | "destroy"
    id: str
    name: str


class EventStream(Protocol):
    def __iter__(self) -> Iterator[ContainerEvent]: ...

    def close(self) -> None:
        """From another thread: ends the iteration."""


class LabelSource(Protocol):
    """Discovery's view of Docker (in process: :class:`DockerLabelSource`; the
    launcher's client implements it too)."""

    def labelled(self) -> tuple[ContainerFacts, ...]:
        """Every container with knockgate.door or knockgate.group; ContainerError when
        Docker cannot be asked."""

    def inspect(self, ident: str) -> ContainerFacts | None:
        """The container's facts now; ``None``: it is gone."""

    def events(self) -> EventStream:
        """Only labelled containers' create/start/die/destroy; ContainerError (also from
        the iteration when the stream breaks)."""


def _port(text: object) -> int:
    """A ``HostPort``: "" (or anything not a port) is an ephemeral port, 0."""
    value = str(text or "")
    return int(value) if value.isdigit() and 0 < int(value) <= 65535 else 0


def published(attrs: dict[str, Any]) -> tuple[Published, ...]:
    """The container's published ports from its configured bindings
    (``HostConfig.PortBindings``: known while it is stopped too, unlike
    ``NetworkSettings.Ports``, which Docker fills only while it runs, and which shows
    the port Docker picked for an ephemeral binding, not that it is ephemeral)."""
    out: list[Published] = []
    bindings = (attrs.get("HostConfig") or {}).get("PortBindings") or {}
    if not isinstance(bindings, dict):
        return ()
    for key, entries in bindings.items():
        number, _, proto = str(key).partition("/")
        if not number.isdigit() or not 0 < int(number) <= 65535 or proto not in ("tcp", "udp"):
            continue  # sctp, or something Docker would not write
        found = tuple(
            Binding(str(entry.get("HostIp") or ""), _port(entry.get("HostPort")))
            for entry in (entries if isinstance(entries, list) else [])
            if isinstance(entry, dict)
        )
        out.append(Published(int(number), "udp" if proto == "udp" else "tcp", found))
    return tuple(sorted(out, key=lambda p: (p.port, p.proto)))


def _addresses(attrs: dict[str, Any]) -> tuple[str, ...]:
    """The container's addresses on all its networks (IPv4 and IPv6), while it has them."""
    settings = attrs.get("NetworkSettings") or {}
    if not isinstance(settings, dict):
        return ()
    found: dict[str, None] = {}
    places = [settings]
    networks = settings.get("Networks") or {}
    if isinstance(networks, dict):
        places += [network for network in networks.values() if isinstance(network, dict)]
    for place in places:
        for key in ("IPAddress", "GlobalIPv6Address"):
            text = place.get(key)
            if isinstance(text, str) and text:
                try:
                    found[str(ipaddress.ip_address(text))] = None
                except ValueError:
                    continue  # not an address: nothing to gate there
    return tuple(found)


def facts_of(attrs: dict[str, Any]) -> ContainerFacts:
    """One ``docker inspect`` answer as :class:`ContainerFacts`."""
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    return ContainerFacts(
        id=str(attrs.get("Id", "")),
        name=str(attrs.get("Name", "")).lstrip("/"),
        state=str((attrs.get("State") or {}).get("Status", "missing")),
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
        published=published(attrs),
        addresses=_addresses(attrs),
        started_at=started_at(attrs),
    )


def _labelled(labels: object) -> bool:
    return isinstance(labels, dict) and any(label in labels for label in LABELS)


class DockerEvents:
    """Docker's event stream as :class:`ContainerEvent` s of labelled containers."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[ContainerEvent]:
        try:
            for raw in self.stream:
                event = container_event(raw)
                if event is not None:
                    yield event
        except Exception as error:  # requests / urllib3 errors when the engine goes away
            raise ContainerError(f"docker: event stream: {error}") from None

    def close(self) -> None:
        self.stream.close()


def container_event(raw: object) -> ContainerEvent | None:
    """One decoded Docker event, when it is a labelled container's create/start/die/destroy."""
    if not isinstance(raw, dict):
        return None
    action = str(raw.get("Action") or raw.get("status") or "")
    actor = raw.get("Actor") or {}
    attributes = actor.get("Attributes") if isinstance(actor, dict) else None
    ident = str((actor.get("ID") if isinstance(actor, dict) else None) or raw.get("id") or "")
    if action not in ACTIONS or not ident or not _labelled(attributes):
        return None
    assert isinstance(attributes, dict)
    return ContainerEvent(action, ident, str(attributes.get("name", "")))


class DockerLabelSource:
    """:class:`LabelSource` through the Docker SDK, in process (the client is made at
    the first call)."""

    def __init__(self, client: Any = None) -> None:
        self.client = client

    def _docker(self) -> Any:
        if self.client is None:
            self.client = docker_client()
        return self.client

    def labelled(self) -> tuple[ContainerFacts, ...]:
        client = self._docker()
        found: dict[str, ContainerFacts] = {}
        for label in LABELS:
            try:
                raws = client.containers.list(all=True, filters={"label": label})
            except Exception as error:  # docker.errors.*, requests.*, OSError
                raise ContainerError(f"docker: list containers labelled {label}: {error}") from None
            for raw in raws:
                facts = facts_of(raw.attrs)
                found[facts.id] = facts
        return tuple(sorted(found.values(), key=lambda f: (f.name, f.id)))

    def inspect(self, ident: str) -> ContainerFacts | None:
        try:
            return facts_of(self._docker().containers.get(ident).attrs)
        except Exception as error:
            if type(error).__name__ == "NotFound":
                return None
            raise ContainerError(f"docker: inspect {ident[:12]}: {error}") from None

    def events(self) -> DockerEvents:
        filters = {"type": "container", "event": list(ACTIONS)}
        try:
            return DockerEvents(self._docker().events(filters=filters, decode=True))
        except Exception as error:
            raise ContainerError(f"docker: follow events: {error}") from None


class Discovery:
    """Follows Docker for labelled containers; ``deliver`` gets each event (called on
    this object's thread)."""

    def __init__(
        self,
        deliver: Callable[[DiscoveryEvent], None],
        source: LabelSource | None = None,
        clock: Callable[[], float] = time.monotonic,
        retry: float = RETRY,
        retry_max: float = RETRY_MAX,
    ) -> None:
        self.deliver = deliver
        self.source: LabelSource = DockerLabelSource() if source is None else source
        self.clock = clock
        self.retry, self.retry_max = retry, retry_max
        self._closing = threading.Event()
        self._stream: EventStream | None = None
        self._thread: threading.Thread | None = None

    def list(self) -> tuple[ContainerFacts, ...]:
        """Every container with a ``knockgate.door`` or ``knockgate.group`` label."""
        return self.source.labelled()

    # ------------------------------------------------------------------ the thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="label-discovery", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop following (from any thread); waits for the thread up to ``timeout``."""
        self._closing.set()
        stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception:  # a stream already broken
                log.debug("closing the event stream failed", exc_info=True)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def run(self) -> None:
        """Until :meth:`close`: list, then follow; after a failure, again, backing off."""
        delay, failures = self.retry, 0
        while not self._closing.is_set():
            try:
                stream = self.source.events()
                self._stream = stream
                if self._closing.is_set():
                    break
                listed = Listed(self.clock(), self.list())
                if failures:
                    log.warning("docker answers again after %d failed attempts", failures)
                    delay, failures = self.retry, 0
                self._give(listed)
                for event in self._changes(stream):
                    self._give(event)
                if self._closing.is_set():
                    break
                raise ContainerError("docker: the event stream ended")
            except ContainerError as error:
                if self._closing.is_set():
                    break
                failures += 1
                if failures == 1:
                    log.warning(
                        "cannot follow labelled containers (tried again, every %g s at most; "
                        "their ports stay as they were): %s",
                        self.retry_max,
                        error,
                    )
            except Exception:
                if self._closing.is_set():
                    break
                failures += 1
                if failures == 1:
                    log.exception("following labelled containers failed")
            finally:
                self._drop_stream()
            self._closing.wait(delay)
            delay = min(self.retry_max, delay * 2)

    def _drop_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except Exception:
                log.debug("closing the event stream failed", exc_info=True)

    def _changes(self, stream: EventStream) -> Iterator[DiscoveryEvent]:
        try:
            for event in stream:
                if self._closing.is_set():
                    return
                if event.action in ACTIONS:
                    yield self._change(event)
        except ContainerError:
            raise
        except Exception as error:  # requests / urllib3 errors when the engine goes away
            if not self._closing.is_set():
                raise ContainerError(f"docker: event stream: {error}") from None

    def _change(self, event: ContainerEvent) -> DiscoveryEvent:
        now = self.clock()
        if event.action == "destroy":
            return Removed(now, event.id, event.name)
        facts = self.source.inspect(event.id)
        if facts is None:
            return Removed(now, event.id, event.name)
        return Changed(now, event.action, facts)

    def _give(self, event: DiscoveryEvent) -> None:
        try:
            self.deliver(event)
        except Exception:  # the receiver's bug: logged, the discovery goes on
            log.exception("delivering %s failed", type(event).__name__)
