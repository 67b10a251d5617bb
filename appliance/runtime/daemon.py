"""``knockgate run``: the loop that owns the engine and carries out its commands.

Threads (capture, address watcher, status socket) only put items on one queue;
this loop takes them one at a time, feeds the engine and hands each command to
its adapter: the firewall backend (grants), the command runner (knockd-style
commands), the one-time file (used sequences) and the log.

Fail closed: a grant that the firewall refuses is logged and not retried; the
port stays closed. A source held off by the scan detector gets nothing.
SIGTERM: stop capture, then grants per ``on_shutdown`` (keep: they expire at
their own deadline; revoke), then the pending stop commands, then exit.
SIGHUP: read the config again; a bad one is logged and the old one kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import queue
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.capture.addresses import AddressWatcher
from appliance.capture.bpf import capture_filter
from appliance.capture.sniffer import (
    RETRY_SECONDS,
    InterfaceReader,
    Sniffer,
    default_interfaces,
)
from appliance.capture.spa import SpaReader
from appliance.config import Loaded, load_config
from appliance.config.onetime import mark_line_used
from appliance.core.engine import KnockEngine
from appliance.core.events import (
    Command,
    Grant,
    MarkSequenceUsed,
    Opened,
    Packet,
    Revoke,
    RunCommand,
    SetTimer,
    SpaDigestSeen,
    Tick,
    TotpStepUsed,
)
from appliance.core.model import Config, Door, Step
from appliance.errors import FirewallError, KnockgateError
from appliance.firewall import FirewallBackend, FirewallPlan, PortRange
from appliance.runtime.actions import CommandRunner, run_command
from appliance.runtime.logs import configure, log_command
from appliance.runtime.services import ServiceManager
from appliance.runtime.state import COMPACT_EVERY, Saved, StateStore
from appliance.runtime.status import StatusServer
from appliance.services.launcher import ServiceLauncher

log = logging.getLogger("knockgate")

CHECK_SECONDS = 5.0  # how often the firewall rules are verified (and repaired)
SERVICE_TICK = 1.0  # how often service grants, idle time and lifetime are looked at


def firewall_plan(config: Config) -> FirewallPlan:
    protected: dict[Step, None] = {}
    knock: set[PortRange] = set()
    for door in config.doors:
        if door.open is not None:
            protected.update(dict.fromkeys(door.open.ports))
        steps = set(door.knock.sequence)
        if door.knock.one_time is not None:
            for sequence in door.knock.one_time.sequences:
                steps.update(sequence.steps)
        knock.update(PortRange(step.proto, step.port, step.port) for step in steps)
        totp = door.knock.totp
        if totp is not None:
            knock.add(PortRange(totp.proto, totp.low, totp.high))
        if door.spa is not None:
            knock.add(PortRange("udp", door.spa.port, door.spa.port))
    settings = config.settings.firewall
    return FirewallPlan(
        tuple(protected), settings.always_allow, settings.scan, tuple(sorted(knock))
    )


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    held_off: int = 0
    grant_failures: int = 0
    firewall_repairs: int = 0
    reloads: int = 0
    reload_failures: int = 0


@dataclass(frozen=True)
class Overrides:
    """Settings given on the command line: they win over the file, at start and reload."""

    status_socket: str | None = None
    state_dir: str | None = None

    def apply(self, loaded: Loaded) -> Loaded:
        if self.status_socket is None and self.state_dir is None:
            return loaded
        config = loaded.config
        settings = dataclasses.replace(
            config.settings,
            status_socket=self.status_socket or config.settings.status_socket,
            state_dir=self.state_dir or config.settings.state_dir,
        )
        return dataclasses.replace(loaded, config=dataclasses.replace(config, settings=settings))


class Daemon:
    def __init__(
        self,
        loaded: Loaded,
        backend: FirewallBackend,
        *,
        clock: Callable[[], float] = time.time,
        capture: bool = True,
        launcher: ServiceLauncher | None = None,
        overrides: Overrides | None = None,
    ) -> None:
        self.overrides = overrides or Overrides()
        self.loaded = loaded
        self.config = loaded.config
        self.backend = backend
        self.clock = clock
        self.capture = capture
        # Other threads (status socket, address watcher, service launches, signal
        # handlers) hand items over through this queue and wake the loop with a byte
        # on the pipe; packets never go through it (the loop reads the sockets).
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.state = StateStore(self.config.settings.state_dir)
        self.engine = self._engine(self.config)
        self.engine.restore(*self.state.load(clock()))
        self.spa = SpaReader(self.config.doors)
        self.runner = CommandRunner()
        self.stats = Stats()
        self.wake = math.inf
        self.running = False
        self.addresses: frozenset[str] = frozenset()
        self.sniffer: Sniffer | None = None
        self.watcher: AddressWatcher | None = None
        self.status: StatusServer | None = None
        self.suppressed: set[tuple[str, str, float]] = set()  # stop commands not to run
        self._held: dict[tuple[str, str], bool] = {}
        self.services = ServiceManager(launcher, backend, self.enqueue, clock) if launcher else None

    @staticmethod
    def _engine(config: Config) -> KnockEngine:
        return KnockEngine(config.doors, max_attempts=config.settings.max_attempts)

    # ----------------------------------------------------------------- life cycle

    def enqueue(self, item: Any) -> None:
        """From any thread (or a signal handler): hand ``item`` to the loop and wake it."""
        self.queue.put(item)
        with contextlib.suppress(BlockingIOError):  # a full pipe already wakes the loop
            os.write(self._wake_w, b"\0")

    def start(self) -> None:
        """Firewall first (reconcile: stale rules replaced, live grants kept), then capture."""
        self.backend.setup(firewall_plan(self.config))
        log.info("firewall: %s rules in place", self.backend.name)
        self.status = StatusServer(self.config.settings.status_socket, self.enqueue)
        self.status.start()
        if self.services is not None:
            self.services.start()
        if self.capture:
            self.watcher = AddressWatcher(lambda now: self.enqueue(("addresses", now)))
            self.addresses = self.watcher.current
            interfaces = list(self.config.settings.interfaces) or default_interfaces()
            self.sniffer = Sniffer(
                interfaces, capture_filter(self.config.doors, self.addresses), self.clock
            )
            for reader in self.sniffer.readers:
                reader.open()
            self.watcher.start()
            log.info("starting up, listening on %s", ", ".join(interfaces))
        self.running = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.enqueue(("signal", "TERM")))
        signal.signal(signal.SIGINT, lambda *_: self.enqueue(("signal", "TERM")))
        signal.signal(signal.SIGHUP, lambda *_: self.enqueue(("signal", "HUP")))

    def run(self) -> None:
        """Read packets and queued items until SIGTERM; then shut down in order."""
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        registered: dict[InterfaceReader, socket.socket] = {}
        readers = self.sniffer.readers if self.sniffer is not None else []
        next_check = self.clock() + CHECK_SECONDS
        next_tick = self.clock() + SERVICE_TICK
        handle, commands = self.engine.handle, self._commands
        while self.running:
            for reader in readers:  # (re-)register sockets; re-open closed ones when due
                sock = registered.get(reader)
                if reader.sock is not sock:
                    if sock is not None:
                        selector.unregister(sock)
                        del registered[reader]
                    if reader.sock is not None:
                        selector.register(reader.sock, selectors.EVENT_READ, reader)
                        registered[reader] = reader.sock
                if reader.sock is None and self.clock() >= reader.retry_at:
                    reader.open()
            now = self.clock()
            due = min(self.wake, next_check, next_tick)
            if any(reader.sock is None for reader in readers):
                due = min(due, now + RETRY_SECONDS)
            for key, _ in selector.select(max(0.0, due - now)):
                reader = key.data
                if reader is None:
                    self._drain_queue()
                    continue
                try:
                    packets = reader.read()
                except OSError as error:
                    reader.failed(error)
                    continue
                if self.engine.handle is not handle:  # replaced by a reload
                    handle = self.engine.handle
                route = self.spa.route
                for packet in packets:
                    event = route(packet)
                    if event is not None:
                        out = handle(event)
                        if out:
                            commands(out)
            now = self.clock()
            if now >= self.wake:
                self.wake = math.inf
                self._commands(self.engine.handle(Tick(now)))
            if now >= next_check:
                next_check = now + CHECK_SECONDS
                self._check_firewall()
            if now >= next_tick:
                next_tick = now + SERVICE_TICK
                if self.services is not None:
                    self.services.tick()
        selector.close()
        self.shutdown()

    def _drain_queue(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            self._item(item)

    def _item(self, item: Any) -> None:
        if type(item) is Packet:
            self.packet(item)
        elif item[0] == "signal":
            if item[1] == "TERM":
                log.info("shutting down")
                self.running = False
            else:
                self.reload()
        elif item[0] == "addresses":
            self._addresses(item[1])
        elif item[0] == "status":
            item[1](self.snapshot())
        elif item[0] == "service-ready" and self.services is not None:
            if self.services.ready(item[1], item[2], item[3]):
                log_command(item[1])
        elif item[0] == "services-prepared" and self.services is not None:
            self.services.prepared()
        else:
            raise TypeError(f"unknown queue item {item!r}")

    def packet(self, packet: Packet) -> None:
        """One packet (an SPA packet goes through the SPA reader first)."""
        event = self.spa.route(packet)
        if event is not None:
            self._commands(self.engine.handle(event))

    def shutdown(self) -> None:
        if self.sniffer is not None:
            self.sniffer.close()
        if self.watcher is not None:
            self.watcher.stop()
        if self.config.settings.on_shutdown == "revoke":
            self._revoke_all()
        if self.services is not None:
            self.services.shutdown()
        self.runner.shutdown()  # start commands still running finish before their stops
        for command in self.engine.drain():
            if isinstance(command, RunCommand) and not self._suppressed(command):
                run_command(command)
        if self.status is not None:
            self.status.stop()
        self.state.close()
        log.info("stopped; grants left in place expire at their own deadline")

    # ----------------------------------------------------------------- commands

    def _commands(self, commands: list[Command]) -> None:
        for command in commands:
            if isinstance(command, SetTimer):
                self.wake = min(self.wake, command.at)
            elif isinstance(command, Opened):
                log_command(command)
                self._held[(command.door, command.address)] = self._is_held(command.address)
            elif isinstance(command, Grant):
                self._grant(command)
            elif isinstance(command, Revoke):
                self._revoke(command)
            elif isinstance(command, RunCommand):
                self._run(command)
            elif isinstance(command, MarkSequenceUsed):
                self._mark_used(command)
            elif isinstance(command, SpaDigestSeen):
                self.state.spa_seen(command.digest, command.until)
                self._compact_state()
            elif isinstance(command, TotpStepUsed):
                log_command(command)
                self.state.totp_used(command.door, command.step, command.until)
                self._compact_state()
            else:
                log_command(command)
        self._held.clear()

    def _compact_state(self) -> None:
        if self.state.appended >= COMPACT_EVERY:  # the file holds only what is in force
            self.state.compact(Saved(*self.engine.saved_state()), self.clock())

    def _is_held(self, address: str) -> bool:
        if self.config.settings.firewall.scan is None:
            return False
        try:
            return self.backend.is_held(address)
        except FirewallError as error:
            log.error("scan check failed, treating %s as held: %s", address, error)
            return True  # fail closed

    def _grant(self, grant: Grant) -> None:
        if self._held.get((grant.door, grant.address)):
            self.stats.held_off += 1
            log.warning("%s: %s: held off as a port scanner: no access", grant.address, grant.door)
            return
        door = self._door(grant.door)
        if door is not None and door.service is not None:
            if self.services is None:
                log.error("%s: %s: no container runtime, no access", grant.address, grant.door)
                return
            self.services.request(grant, self.config.service(door.service))
            return
        seconds = grant.seconds_left(self.clock())
        try:
            self.backend.grant(grant.address, grant.ports, seconds)
        except FirewallError as error:
            self.stats.grant_failures += 1
            log.error(
                "%s: %s: grant failed, door stays closed: %s", grant.address, grant.door, error
            )
            return
        log_command(grant)

    def _door(self, name: str) -> Door | None:
        return next((door for door in self.config.doors if door.name == name), None)

    def _revoke(self, revoke: Revoke) -> None:
        door = self._door(revoke.door)
        if door is None or door.open is None:
            return
        try:
            self.backend.revoke(revoke.address, door.open.ports)
        except FirewallError as error:
            log.error("%s: %s: revoke failed: %s", revoke.address, revoke.door, error)
            return
        log_command(revoke)
        if door.service is not None and self.services is not None:
            self.services.revoked(door.service, revoke.address)

    def _run(self, command: RunCommand) -> None:
        if command.phase == "start":
            if self._held.get((command.door, command.address)):
                door = next(d for d in self.config.doors if d.name == command.door)
                due = command.at + door.commands.cmd_timeout
                self.suppressed.add((command.door, command.address, due))
                log.warning(
                    "%s: %s: held off as a port scanner: command not run",
                    command.address,
                    command.door,
                )
                return
        elif self._suppressed(command):
            return
        self.runner.submit(command)

    def _suppressed(self, command: RunCommand) -> bool:
        key = (command.door, command.address, command.at)
        if key in self.suppressed:
            self.suppressed.discard(key)
            return True
        return False

    def _mark_used(self, command: MarkSequenceUsed) -> None:
        try:
            mark_line_used(command.path, command.offset)
        except OSError as error:
            log.error(
                "%s: cannot mark line %d of %s used: %s (the sequence stays unusable "
                "until restart)",
                command.door,
                command.line,
                command.path,
                error,
            )
        log_command(command)

    def _revoke_all(self) -> None:
        try:
            grants = self.backend.grants()
        except FirewallError as error:
            log.error("cannot list grants to revoke them: %s", error)
            return
        for entry in grants:
            try:
                self.backend.revoke(entry.address, (entry.step,))
            except FirewallError as error:
                log.error("revoke %s %s failed: %s", entry.address, entry.step, error)
        log.info("revoked %d grant(s) at shutdown", len(grants))

    # ----------------------------------------------------------------- upkeep

    def _addresses(self, addresses: frozenset[str]) -> None:
        self.addresses = addresses
        if self.sniffer is not None:
            self.sniffer.set_filter(capture_filter(self.config.doors, addresses))
            log.info("host addresses changed: %s", ", ".join(sorted(addresses)))

    def _check_firewall(self) -> None:
        try:
            if self.backend.check():
                return
            log.warning("firewall: knockgate's rules are missing; restoring them")
            self.backend.setup(firewall_plan(self.config))
            self.stats.firewall_repairs += 1
        except FirewallError as error:
            log.error("firewall check failed: %s", error)

    def reload(self) -> None:
        """SIGHUP: validate first; keep the running config when the new one is bad."""
        try:
            loaded = self.overrides.apply(load_config(self.config.path))
        except KnockgateError as error:
            self.stats.reload_failures += 1
            log.error(
                "reload refused, keeping the running configuration: %s",
                str(error).replace("\n", "; "),
            )
            return
        if loaded.config.services != self.config.services:
            self.stats.reload_failures += 1
            log.error(
                "reload refused: the services catalogue changed (restart knockgate to apply it)"
            )
            return
        try:
            self.backend.setup(firewall_plan(loaded.config))
        except FirewallError as error:
            self.stats.reload_failures += 1
            log.error("reload refused, firewall setup failed: %s", error)
            self.backend.setup(firewall_plan(self.config))
            return
        for command in self.engine.drain():  # pending stops of the old doors still run
            if isinstance(command, RunCommand) and not self._suppressed(command):
                self.runner.submit(command)
        saved = self.engine.saved_state()
        if loaded.config.settings.state_dir != self.config.settings.state_dir:
            self.state.close()
            self.state = StateStore(loaded.config.settings.state_dir)
            self.state.compact(Saved(*saved), self.clock())  # one write, not one per entry
        self.loaded, self.config = loaded, loaded.config
        self.engine = self._engine(loaded.config)
        self.engine.restore(*saved)
        self.spa = SpaReader(loaded.config.doors)
        self.wake = math.inf
        configure(loaded.config.settings.log)
        if self.sniffer is not None:
            self.sniffer.set_filter(capture_filter(loaded.config.doors, self.addresses))
        self.stats.reloads += 1
        for warning in loaded.warnings:
            log.warning("%s", warning)
        log.info("configuration reloaded: %d door(s)", len(loaded.config.doors))

    def snapshot(self) -> dict[str, Any]:
        """What ``knockgate status`` prints."""
        try:
            grants = [
                {"address": g.address, "port": str(g.step), "expires_in": round(g.expires_in, 3)}
                for g in self.backend.grants()
            ]
        except FirewallError as error:
            grants = [{"error": str(error)}]
        return {
            "pid": os.getpid(),
            "config": self.config.path,
            "backend": self.backend.name,
            "uptime": round(self.clock() - self.stats.started, 1),
            "doors": [
                {
                    "name": door.name,
                    "knock": _knock_kind(door),
                    "steps": len(self.engine.active_sequence(door.name)),
                    "open": [str(p) for p in door.open.ports] if door.open else [],
                }
                for door in self.config.doors
            ],
            "grants": grants,
            "services": self.services.snapshot() if self.services is not None else [],
            "attempts": self.engine.attempt_count,
            "counters": {
                **self.engine.counters.as_dict(),
                **self.spa.counters.as_dict(),
                "frames": self.sniffer.frames if self.sniffer else 0,
                "frames_dropped": self.sniffer.dropped if self.sniffer else 0,
                "held_off": self.stats.held_off,
                "grant_failures": self.stats.grant_failures,
                "firewall_repairs": self.stats.firewall_repairs,
                "reloads": self.stats.reloads,
                "reload_failures": self.stats.reload_failures,
                "service_launches": self.services.launches if self.services else 0,
                "service_failures": self.services.failures if self.services else 0,
            },
        }


def _knock_kind(door: Door) -> str:
    knock = door.knock
    if door.spa is not None:
        return f"spa udp/{door.spa.port}"
    if knock.totp is not None:
        return "totp"
    return "one-time" if knock.one_time is not None else "sequence"


def ssh_lockout(config: Config, environ: dict[str, str]) -> str | None:
    """A reason to refuse starting when the SSH session we run from would be cut off."""
    import ipaddress

    parts = environ.get("SSH_CONNECTION", "").split()
    if len(parts) != 4:
        return None
    client, server_port = parts[0], int(parts[3]) if parts[3].isdigit() else 0
    plan = firewall_plan(config)
    if server_port not in plan.ports("tcp"):
        return None
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return None
    for network in plan.always_allow:
        if address in ipaddress.ip_network(network):
            return None
    return (
        f"this SSH session ({client} to port {server_port}) would be cut off: port "
        f"{server_port} is protected and {client} is not in firewall.always_allow "
        "(add it there, or start with --i-know)"
    )
