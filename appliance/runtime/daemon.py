"""``knockgate run``: the loop that owns the engine and carries out its commands.

Threads (host watcher, status socket, service launches, signal handlers) only
put items on one queue; this loop reads the packet process's records itself, takes
the queued items one at a time, feeds the engine and hands each command to its
adapter: the firewall backend (grants), the command runner (knockd-style
commands), the one-time file and the state file (records), and the log.

Capture is privilege-separated (:mod:`appliance.runtime.privsep`): this process opens
the capture sockets (filters locked) as the host's links come and go and passes them
to the packet process, which reads and decodes the frames, verifies SPA packets and
sends back validated records. When that process dies, the daemon stops (exit status 1)
after its normal shutdown; a supervisor starts both again.

Time: the engine runs on ``time.monotonic()``, so a wall clock stepped back or
forward never stretches a sequence timeout, a grant or a command delay; the
wall clock is handed to the engine (``WallClock``) for TOTP steps, SPA ages and
log stamps, again whenever it jumps. The engine owns its deadlines; the loop
asks it for the next one after every pass.

The loop is a thin interpreter: queue items are typed (:mod:`appliance.runtime.items`,
the host watcher's and the service workers' events) and matched exhaustively, as
are the engine's commands; a log record (a notice) is only logged, a side effect
(grant, revoke, command, vet) is carried out by its adapter.

Fail closed:

* a completion is vetted before the engine acts on it (:class:`Vet`): its records
  (one-time line, TOTP step, SPA digest) are written first and the kernel's scan
  detector is asked about the knocker; the answer goes back to the engine, which
  refuses the whole decision (no grant, no close, no command) when either fails;
* a grant that the firewall refuses is logged and not retried: the port stays
  closed;
* an unexpected exception in one handler is logged (with its traceback, once per
  handler) and counted, and the loop goes on; whatever ends the loop, SIGTERM or
  an exception, the shutdown runs: capture stopped, grants per ``on_shutdown``
  (keep: they expire at their kernel deadline; revoke), services, then every
  pending stop command, each step guarded so one failure does not skip the rest.

SIGHUP: read the config again; a bad one is logged and the old one kept. A good one
goes to the engine as :class:`NewDoors`: unchanged doors keep their attempts, and
pending stop commands run at their own time.

Notifications (:mod:`appliance.notify`) follow the event log on threads of their own; the
loop only starts them, reconfigures them at a reload when their settings changed, gives
them at most 2 s to flush at shutdown, and passes SIGUSR1 on (a mail digest now).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import queue
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, assert_never

from appliance.capture.bpf import capture_filter
from appliance.capture.host import HostState, HostWatcher, address_change
from appliance.capture.records import COUNTER_NAMES
from appliance.capture.sniffer import InterfaceReader, Sniffer
from appliance.capture.spa import SpaReader
from appliance.config import Loaded, load_config
from appliance.config.onetime import mark_line_used
from appliance.config.schema import Config, FleetSettings, Service
from appliance.core.engine import KnockEngine
from appliance.core.events import (
    ClockStepped,
    Command,
    DoorExhausted,
    DoorsReloaded,
    Event,
    Grant,
    LocalAddresses,
    MarkSequenceUsed,
    NewDoors,
    OneTimeAdvanced,
    Opened,
    Packet,
    Record,
    Refused,
    Revoke,
    RunCommand,
    SendReceipt,
    SequenceReset,
    SequenceTimeout,
    SpaAccepted,
    SpaDigestSeen,
    SpaRefused,
    StageReached,
    Tick,
    Vet,
    Vetted,
    WallClock,
)
from appliance.core.lifecycle import (
    RUNNING,
    ContainerDied,
    ContainerFailed,
    ContainerReady,
    ContainerStarted,
    ContainerStopped,
    ServiceEvent,
)
from appliance.core.model import Door, Step
from appliance.errors import FirewallError, KnockgateError
from appliance.firewall import FirewallBackend, FirewallPlan, PortRange
from appliance.fleet.messages import (
    FleetApply,
    FleetClaimed,
    FleetHealth,
    FleetReconcile,
    same_fleet,
)
from appliance.runtime.actions import CommandRunner, run_command
from appliance.runtime.events_log import HELD_OFF, OPENED, UNRECORDED, EventLog, GrantBook
from appliance.runtime.items import Signal, StatusRequest
from appliance.runtime.logs import configure, flush_noise, log_command
from appliance.runtime.metrics import MetricsRequest, MetricsSnapshot, Observations
from appliance.runtime.preflight import command_line, preflight
from appliance.runtime.privsep import PacketChannel, PacketProcessGone, spawn
from appliance.runtime.receipts import ReceiptSender
from appliance.runtime.services import ServiceManager
from appliance.runtime.state import (
    COMPACT_EVERY,
    Saved,
    StateStore,
    load_labelled,
    save_labelled,
)
from appliance.runtime.status import StatusServer
from appliance.services.discovery import Changed, LabelSource, Listed, Removed
from appliance.services.launcher import ServiceLauncher

if TYPE_CHECKING:  # imported when metrics are configured (prometheus_client is heavy)
    from appliance.fleet.store import FleetStore
    from appliance.notify.hub import Notifications
    from appliance.runtime.fleet import FleetHooks  # imported when a fleet is configured
    from appliance.runtime.metrics_server import MetricsServer

log = logging.getLogger("knockgate")

# What other threads put on the loop's queue. Captured packets never go through it (the
# loop reads the sockets); a Packet item is one handed over from elsewhere (a test's
# scripted loop, a replay).
Item = (
    Packet
    | Signal
    | StatusRequest
    | MetricsRequest
    | HostState
    | ServiceEvent
    | Listed
    | Changed
    | Removed
    | FleetApply
    | FleetReconcile
    | FleetClaimed
    | FleetHealth
)

CHECK_SECONDS = 1.0  # how often the firewall rules are verified (and repaired): ~2 ms with nft
SERVICE_TICK = 1.0  # how often service grants, idle time and lifetime are looked at
CLOCK_DRIFT = 0.05  # seconds the wall clock may drift from the engine's before it is told
FLOOD_WINDOW = 60.0  # seconds over which knock noise is summed for the flood summary
FLOOD_NOISE = 6000  # lone first knocks and resets in a window that make it a flood


def firewall_plan(config: Config, labelled: tuple[Step, ...] = ()) -> FirewallPlan:
    """The rules for ``config``; ``labelled``: the host ports of label-gated containers
    (closed like a door's own ports, opened by a knock on their door)."""
    protected: dict[Step, None] = dict.fromkeys(labelled)
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
    started: float = field(default_factory=time.monotonic)
    held_off: int = 0
    refused_unrecorded: int = 0  # completions refused because their record failed
    grant_failures: int = 0
    firewall_repairs: int = 0
    reloads: int = 0
    reload_failures: int = 0
    internal_errors: int = 0
    clock_steps: int = 0
    firewall_check_failures: int = 0  # in the current streak


@dataclass(frozen=True)
class Overrides:
    """Settings given on the command line: they win over the file, at start and reload."""

    status_socket: str | None = None
    state_dir: str | None = None

    def options(self) -> dict[str, str]:
        """The settings given on the command line, by option (for preflight's messages)."""
        return command_line(status_socket=self.status_socket, state_dir=self.state_dir)

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
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        capture: bool = True,
        launcher: ServiceLauncher | None = None,
        launchers: Callable[[tuple[Service, ...]], ServiceLauncher] | None = None,
        overrides: Overrides | None = None,
        labels: LabelSource | None = None,
        packets: Callable[[], PacketChannel] | None = None,
        confine: Callable[[], None] | None = None,
    ) -> None:
        """``launcher``: the services of the configuration at start; ``launchers``: makes
        one when a reload adds services to a configuration that had none. With
        ``capture``: ``packets`` starts the packet process (default: :func:`spawn` with the
        default user), then ``confine`` drops this process's privileges (before any thread
        starts: capabilities belong to threads)."""
        self.overrides = overrides or Overrides()
        self.loaded = loaded
        self.config = loaded.config
        self.backend = backend
        self.clock = clock  # the engine's: only goes forward
        self.wall = wall  # unix time, for TOTP, SPA ages and the state file
        self.capture = capture
        self.packets = packets or functools.partial(spawn, None)
        self.confine = confine
        self.channel: PacketChannel | None = None  # the packet process, once started
        self._passed: dict[InterfaceReader, tuple[socket.socket, int]] = {}  # sockets sent
        self._keys = 0
        self.exit_status = 0
        # Other threads (status socket, host watcher, service launches, signal
        # handlers) hand items over through this queue and wake the loop with a byte
        # on the pipe; packets never go through it (the loop reads the sockets).
        self.queue: queue.SimpleQueue[Item] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.stats = Stats(started=clock())
        self.host: HostState | None = None  # the links and addresses last reported
        self.engine = self._engine(self.config)
        self.state = StateStore(self.config.settings.state_dir)
        started = wall()
        restored = self.state.load(started)
        untrusted = -math.inf
        if restored.problem is not None:
            untrusted = started
            log.warning(
                "state: %s %s: SPA packets made and TOTP steps begun before this start are "
                "refused (what they were used for may be lost)",
                self.state.path,
                restored.problem,
            )
        self.engine.restore(*restored.saved, untrusted_before=untrusted)
        self.spa = SpaReader(self.config.doors)
        self.runner = CommandRunner()
        self.receipts = ReceiptSender()
        self._granted: tuple[str, str] | None = None  # (door, address) of the last grant made
        self.running = False
        self.sniffer: Sniffer | None = None
        self.watcher: HostWatcher | None = None
        self.status: StatusServer | None = None
        # Handlers whose exception was logged in full -> repeats since the last summary.
        self._failing: dict[str, int] = {}
        self._stopped = False
        self._firewall_failing = False
        self._noise = (clock(), 0, 0)  # flood summary: window start, noise and packets then
        self.launchers = launchers
        self.labels = labels  # label-gated containers are followed when given
        self._labelled: tuple[Step, ...] = ()  # their host ports, as the firewall has them
        self._labels_failing = False
        self.services = self._service_manager(launcher) if launcher else None
        # The event stream and the metrics: plain counters and records kept by this loop.
        self.events = EventLog(wall=wall, clock=clock)
        self._tally = self.events.tally.notice  # the hot path's one call per notice
        self.grant_book = GrantBook()
        self.observations = Observations()
        self.metrics: MetricsServer | None = None
        self.fleet: FleetHooks | None = None  # the fleet's link, when fleet: is configured
        self.fleet_store: Callable[[FleetSettings], FleetStore] | None = None  # tests: a fake
        self.notifications: Notifications | None = None  # when notify: is configured

    def _service_manager(self, launcher: ServiceLauncher) -> ServiceManager:
        manager = ServiceManager(
            launcher, self.backend, self.enqueue, self.clock, self.wall, labels=self.labels
        )
        manager.set_doors(_granting(self.config))
        return manager

    def _plan(self, config: Config | None = None) -> FirewallPlan:
        return firewall_plan(config or self.config, self._labelled)

    def _engine(self, config: Config) -> KnockEngine:
        engine = KnockEngine(
            config.doors, max_attempts=config.settings.max_attempts, local=self.addresses
        )
        engine.handle(WallClock(self.clock(), self.wall()))
        return engine

    # ----------------------------------------------------------------- life cycle

    def enqueue(self, item: Item) -> None:
        """From any thread (or a signal handler): hand ``item`` to the loop and wake it."""
        self.queue.put(item)
        with contextlib.suppress(BlockingIOError):  # a full pipe already wakes the loop
            os.write(self._wake_w, b"\0")

    def start(self) -> None:
        """The packet process and the drop of privileges first (no thread runs yet), then
        the firewall (reconcile: stale rules replaced, live grants kept), then capture.
        Labelled containers are listed before the firewall, so a restart does not open their
        ports while discovery catches up."""
        if self.capture:
            self.channel = self.packets()
            self.channel.configure(self.config.doors, None)
            if self.confine is not None:
                self.confine()
        metrics = self.config.settings.metrics
        if metrics is not None:  # a clear error (KnockgateError) before anything is touched
            # Imported here: a daemon without metrics does not carry prometheus_client.
            from appliance.runtime.metrics_server import MetricsHub, MetricsServer

            self.metrics = MetricsServer(metrics, MetricsHub(self.enqueue, self.clock))
            self.metrics.start()
        if self.services is not None and self.labels is not None:
            try:
                found = self.labels.labelled()
            except KnockgateError as error:
                # Fail closed: the ports the last run closed stay closed until a listing.
                self._labelled = self._remembered_labelled()
                log.warning(
                    "labelled containers not listed at start (followed later; the %d host "
                    "port(s) the last run gated stay closed meanwhile): %s",
                    len(self._labelled),
                    error,
                )
            else:
                self.services.discovered(Listed(self.clock(), found))
                self._labelled = self.services.label_protected
                self._remember_labelled()
        self.backend.setup(self._plan())
        log.info("firewall: %s rules in place", self.backend.name)
        self._start_fleet()
        self.status = StatusServer(
            self.config.settings.status_socket, self.enqueue, events=self.events
        )
        self.status.start()
        self._start_notifications()
        if self.services is not None:
            self.services.start()
        if self.capture:
            self.watcher = HostWatcher(self.enqueue)  # each change is a HostState item
            self.host = self.watcher.current
            self._tell_addresses(self.host.addresses)
            self.sniffer = Sniffer(
                self.config.settings.interfaces,
                capture_filter(self.config.doors, self.addresses or ()),
                self.clock,
            )
            self.sniffer.follow(self.host.links)
            self.watcher.start()
            log.info(
                "starting up, listening on %s",
                ", ".join(self.sniffer.capturing) or "no interface yet",
            )
        self.running = True

    def _start_fleet(self) -> None:
        """The fleet's link (its threads), when ``fleet:`` is configured; redis-py is
        imported only then. An unreachable Redis does not stop the start."""
        settings = self.config.settings.fleet
        if settings is None:
            return
        from appliance.runtime.fleet import FleetHooks, redis_store

        store = (self.fleet_store or redis_store)(settings)
        self.fleet = FleetHooks(self, settings, store)
        self.fleet.start()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.enqueue(Signal("stop")))
        signal.signal(signal.SIGINT, lambda *_: self.enqueue(Signal("stop")))
        signal.signal(signal.SIGHUP, lambda *_: self.enqueue(Signal("reload")))
        signal.signal(signal.SIGUSR1, lambda *_: self.enqueue(Signal("digest")))

    def _digest_now(self) -> None:
        """SIGUSR1: the mail notifiers send their digest now."""
        if self.notifications is not None:
            self.notifications.digest_now()
        else:
            log.info("SIGUSR1: no mail notifier configured: no digest to send")

    def _start_notifications(self) -> None:
        """The notifiers of the configuration in force (none: no hub, no thread)."""
        notifiers = self.config.settings.notify
        if not notifiers:
            return
        # Imported here: a daemon without notifiers does not carry urllib and smtplib.
        from appliance.notify.hub import Notifications

        self.notifications = Notifications(notifiers, self.events, wall=self.wall)
        self.notifications.start()

    def _reload_notifications(self) -> None:
        """A reload with other notifier settings: the running hub reconfigures in place
        (each notifier kept by name keeps its queue and digest); with no notifiers left
        it flushes (bounded) and stops on a thread of its own."""
        notifiers, hub = self.config.settings.notify, self.notifications
        if hub is None:
            self._start_notifications()
        elif notifiers == hub.notifiers:
            return
        elif notifiers:
            hub.reconfigure(notifiers)
        else:
            # Its flush (bounded) on a thread of its own: the loop does not wait for it.
            threading.Thread(target=hub.stop, name="notify-stop", daemon=True).start()
            self.notifications = None
            log.info("notify: no notifiers now")

    def run(self) -> None:
        """Read packets and queued items until SIGTERM; then shut down in order.

        The shutdown runs on every way out of the loop, exceptions included.
        """
        try:
            self._loop()
        finally:
            self.shutdown()

    def _loop(self) -> None:
        selector = selectors.DefaultSelector()
        try:
            selector.register(self._wake_r, selectors.EVENT_READ, None)
            channel = self.channel
            if channel is not None:
                selector.register(channel.fileno(), selectors.EVENT_READ, channel)
            sniffer = self.sniffer
            seen = -1  # the sniffer's readers as last registered (its version)
            clock = self.clock
            next_check = clock() + CHECK_SECONDS
            next_tick = clock() + SERVICE_TICK
            while self.running:
                if sniffer is not None and sniffer.version != seen:
                    seen = sniffer.version
                    self._guarded("capture", self._pass_sockets)
                now = clock()
                due = min(next_check, next_tick)
                deadline = self.engine.next_deadline()
                if deadline is not None and deadline < due:
                    due = deadline
                reopen = sniffer.reopen_at if sniffer is not None else None
                if reopen is not None:
                    due = min(due, reopen)
                for key, _ in selector.select(max(0.0, due - now)):
                    if key.data is None:
                        self._drain_queue()
                    elif self.running:
                        self._receive(key.data)
                now = clock()
                self._follow_wall_clock(now)
                deadline = self.engine.next_deadline()
                if deadline is not None and now >= deadline:
                    self._guarded("timer", functools.partial(self._event, Tick(now)))
                if reopen is not None and now >= reopen and sniffer is not None:
                    self._guarded("capture", sniffer.reopen)
                if now >= next_check:
                    next_check = now + CHECK_SECONDS
                    self._guarded("firewall check", self._check_firewall)
                if now >= next_tick:
                    next_tick = now + SERVICE_TICK
                    self._guarded("upkeep", self._upkeep)
        finally:
            selector.close()

    def _pass_sockets(self) -> None:
        """Hand the sniffer's sockets over as they are now: those of readers removed or
        closed are closed in the packet process first, then the new ones are passed. A
        reader's new socket (a new filter) is passed as the successor of its old one: the
        packet process reads the old one dry and closes it first (no frame lost, and a
        frame is read twice only if it reached both in the instant between the new
        socket's bind and that message)."""
        assert self.sniffer is not None and self.channel is not None
        current = {r: r.sock for r in self.sniffer.readers if r.sock is not None}
        replaced: dict[InterfaceReader, int] = {}
        for reader, (sock, key) in list(self._passed.items()):
            if current.get(reader) is not sock:
                del self._passed[reader]
                if reader in current:
                    replaced[reader] = key
                else:
                    self.channel.remove(key)
        for reader, sock in current.items():
            if reader not in self._passed:
                self._keys += 1
                self._passed[reader] = (sock, self._keys)
                self.channel.add(self._keys, reader.interface, sock, replaced.get(reader))

    def _socket_failed(self, key: int, number: int) -> None:
        """The packet process closed the socket ``key``: it failed (not a link going down).
        The sniffer logs it, stops listing it and opens a new one (REOPEN_SECONDS)."""
        for reader, (_sock, passed) in self._passed.items():
            if passed == key and self.sniffer is not None:
                self.sniffer.failed(reader, OSError(number, os.strerror(number)))
                return

    def _receive(self, channel: PacketChannel) -> None:
        """The packet process's records through the engine (the hot path)."""
        try:
            batch = channel.receive(self.clock())
        except PacketProcessGone as error:
            self._packet_process_gone(str(error))
            return
        for line in batch.logs:
            logging.getLogger(line.logger).log(line.level, "%s", line.text)
        for key, number in batch.failed:
            self._guarded("capture", functools.partial(self._socket_failed, key, number))
        handle, commands = self.engine.handle, self._commands
        try:
            for event in batch.events:
                out = handle(event)
                if out:
                    commands(out)
        except Exception:  # a bug: the rest of this batch is lost, not the daemon
            self._internal_error("packet")

    def _packet_process_gone(self, why: str) -> None:
        """The packet process died: without it no knock is seen. It cannot be started
        again (this process gave up the right to change uid): stop, exit status 1."""
        status = None
        if self.channel is not None:
            with contextlib.suppress(Exception):
                self.channel.close()
            status = self.channel.exit_status()
            self.channel = None
        log.error("packet process gone (%s, exit status %s): stopping", why, status)
        self.exit_status = 1
        self.running = False

    def _follow_wall_clock(self, now: float) -> None:
        """Tell the engine when the wall clock has moved against its own (a step)."""
        offset = self.wall() - now
        if abs(offset - self.engine.wall_offset) > CLOCK_DRIFT:
            self._guarded("clock", functools.partial(self._event, WallClock(now, now + offset)))

    def _event(self, event: Event) -> None:
        self._commands(self.engine.handle(event))

    def _guarded(self, what: str, step: Callable[[], object]) -> None:
        """Run one handler; an unexpected exception is logged and counted, not fatal. The
        packet process found gone (it does not read its messages) stops the daemon."""
        try:
            step()
        except PacketProcessGone as error:
            self._packet_process_gone(str(error))
        except Exception:
            self._internal_error(what)

    def _internal_error(self, what: str) -> None:
        """The traceback once per handler; repeats are counted and summed up once a
        minute by the upkeep, so a bug hit by every packet cannot flood the log."""
        self.stats.internal_errors += 1
        if what not in self._failing:
            self._failing[what] = 0
            log.exception("internal error in %s (a bug; the daemon goes on)", what)
        else:
            self._failing[what] += 1

    def _summarise_errors(self) -> None:
        for what, repeats in self._failing.items():
            if repeats:
                log.error(
                    "internal error in %s: %d more in the last %.0f s (%d in all)",
                    what,
                    repeats,
                    FLOOD_WINDOW,
                    self.stats.internal_errors,
                )
                self._failing[what] = 0

    def _drain_queue(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            self._guarded(_item_name(item), functools.partial(self._item, item))

    def _item(self, item: Item) -> None:
        match item:
            case Packet():
                self.packet(item)
            case Signal(action="reload"):
                self.reload()
            case Signal(action="digest"):
                self._digest_now()
            case Signal():  # stop
                log.info("shutting down")
                self.running = False
            case StatusRequest(reply=reply):
                reply(self.snapshot())
            case MetricsRequest(reply=answer):
                answer(self.metrics_snapshot())
            case HostState():
                self._host(item)
            case ServiceEvent():
                if self.services is None:
                    raise TypeError(f"a service event without services: {item!r}")
                self._service_event(item)
                self.services.handle(item)
            case Listed() | Changed() | Removed():
                if self.services is None:
                    raise TypeError(f"a discovery event without services: {item!r}")
                self.services.discovered(item)
                self._sync_labelled()
            case FleetApply() | FleetReconcile() | FleetClaimed() | FleetHealth():
                if self.fleet is None:
                    raise TypeError(f"a fleet item without a fleet: {item!r}")
                self.fleet.item(item)
            case _:
                assert_never(item)

    def packet(self, packet: Packet) -> None:
        """One packet (an SPA packet goes through the SPA reader first)."""
        event = self.spa.route(packet)
        if event is not None:
            self._event(event)

    def shutdown(self) -> None:
        """Stop capture, apply ``on_shutdown``, run every pending stop command, save the
        state file, close the status socket, then the services. Each step is guarded:
        one that fails is logged and the next still runs. Runs once."""
        if self._stopped:
            return
        self._stopped = True
        self.running = False
        steps: list[tuple[str, Callable[[], object]]] = []
        steps.append(("sum up internal errors", self._summarise_errors))
        if self.sniffer is not None:
            steps.append(("stop capture", self.sniffer.close))
        if self.watcher is not None:
            steps.append(("stop the host watcher", self.watcher.stop))
        if self.channel is not None:
            steps.append(("stop the packet process", self.channel.close))
        if self.fleet is not None:
            steps.append(("stop the fleet link", self.fleet.stop))
        if self.config.settings.on_shutdown == "revoke":
            steps.append(("revoke grants", self._revoke_all))
        # Start commands still running finish before their stops; the stops close holes,
        # so they come before the services (whose Docker work may take a while, and a
        # supervisor's SIGKILL may end it).
        steps.append(("wait for commands", self.runner.shutdown))
        steps.append(("run pending stop commands", self._run_pending_stops))
        steps.append(("save the state file", self._save_state))
        if self.notifications is not None:  # bounded: FLUSH_SECONDS at most
            steps.append(("flush notifications", self.notifications.stop))
        if self.status is not None:
            steps.append(("close the status socket", self.status.stop))
        if self.metrics is not None:
            steps.append(("close the metrics endpoint", self.metrics.stop))
        if self.services is not None:
            steps.append(("stop services", self.services.shutdown))
        for what, step in steps:
            try:
                step()
            except Exception:
                log.exception("shutdown: %s failed; going on", what)
        log.info("stopped; grants left in place expire at their own deadline")

    def _run_pending_stops(self) -> None:
        for command in self.engine.drain():
            if isinstance(command, RunCommand):
                try:
                    run_command(command)
                except Exception:
                    log.exception("%s: stop command failed", command.door)

    def _save_state(self) -> None:
        self.state.finish(Saved(*self.engine.saved_state()), self.wall())

    # ----------------------------------------------------------------- commands

    def _commands(self, commands: list[Command]) -> None:
        """Carry out one event's commands in order: effects by their adapter, notices
        to the log."""
        self._granted = None  # a receipt follows its grant in the same list
        for command in commands:
            match command:
                # Notices first, the stages and resets of attempts leading: under a flood
                # of first knocks they are nearly every command (the hot path).
                case (
                    StageReached()
                    | SequenceReset()
                    | SequenceTimeout()
                    | Opened()
                    | OneTimeAdvanced()
                    | DoorExhausted()
                    | SpaAccepted()
                    | Refused()
                    | DoorsReloaded()
                ):
                    self._tally(command)
                    self._log(command)
                case SpaRefused():
                    self._tally(command)
                    self.events.refusal(
                        "refused",
                        door=command.door,
                        address=command.src,
                        detail=f"SPA packet of {command.user}: {command.reason}",
                    )
                    self._log(command)
                case Grant():
                    self._grant(command)
                case Revoke():
                    self.revoke(command)
                case RunCommand():
                    self.runner.submit(command)
                case Vet():
                    self._vet(command)
                case SendReceipt():
                    self._receipt(command)
                case ClockStepped():
                    self.stats.clock_steps += 1
                    self._log(command)
                case _:
                    assert_never(command)

    def _log(self, command: Command | Record) -> None:
        log_command(command, self.engine.wall_offset)

    def _vet(self, vet: Vet) -> None:
        """Write the completion's records down, then ask the scan detector about the
        knocker; the engine gets the answer and acts, or refuses the whole decision.
        In a fleet, records are also claimed fleet-wide first (a deferred vet: the
        fleet's answer finishes it, :meth:`finish_vet`)."""
        refusal = None
        for record in vet.records:
            if not self._record(record):
                refusal = "its use could not be recorded, so no access"
        if refusal is not None:
            self.stats.refused_unrecorded += 1
            self.events.tally.count(vet.door, UNRECORDED)
            self.events.refusal("refused", door=vet.door, address=vet.address, detail=refusal)
        elif self._is_held(vet.address):
            self.stats.held_off += 1
            refusal = "held off as a port scanner"
            self.events.tally.count(vet.door, HELD_OFF)
            self.events.refusal("held-off", door=vet.door, address=vet.address, detail=refusal)
        elif self.fleet is not None and self.fleet.claim(vet):
            return
        self.finish_vet(vet, refusal)

    def finish_vet(self, vet: Vet, refusal: str | None) -> None:
        """The vet's answer to the engine (which grants, closes, runs commands or refuses)."""
        if refusal is None:
            self.events.tally.count(vet.door, OPENED)
            door = self.config.door(vet.door)
            if door is not None and door.open is None and not door.close:
                self.events.event("opened", door=vet.door, address=vet.address, detail="commands")
        self._commands(self.engine.handle(Vetted(vet.at, vet.ticket, refusal)))

    def _record(self, record: Record) -> bool:
        """Write one record down; ``False`` when it cannot be (then nothing opens)."""
        if isinstance(record, MarkSequenceUsed):
            try:
                mark_line_used(record.path, record.offset)
                written = True
            except OSError as error:
                written = False
                log.error(
                    "%s: cannot mark line %d of %s used: %s",
                    record.door,
                    record.line,
                    record.path,
                    error.strerror or error,
                )
            self._log(record)
        elif isinstance(record, SpaDigestSeen):
            written = self.state.spa_seen(record.digest, record.until)
        else:
            self._log(record)
            written = self.state.totp_used(record.door, record.step, record.until)
        if written and self.state.appended >= COMPACT_EVERY:
            # The file holds only what is in force.
            self.state.compact(Saved(*self.engine.saved_state()), self.wall())
        return written

    def _is_held(self, address: str) -> bool:
        if self.config.settings.firewall.scan is None:
            return False
        try:
            return self.backend.is_held(address)
        except FirewallError as error:
            log.error("scan check failed, treating %s as held: %s", address, error)
            return True  # fail closed

    def _grant(self, grant: Grant) -> None:
        self._granted = None
        if self.services is not None:
            self.services.knocked(grant)  # the door's label-gated containers
        door = self.config.door(grant.door)
        if not grant.ports:
            self._granted = (grant.door, grant.address)
            return  # a door that opens only its labelled containers
        if door is not None and door.service is not None:
            service = self.config.service(door.service)
            if self.services is None or service is None:
                log.error("%s: %s: no container runtime, no access", grant.address, grant.door)
                return
            self.services.request(grant, service.name)
            self._granted = (grant.door, grant.address)
            if self.fleet is not None:
                self.fleet.granted(grant, grant.seconds_left(self.clock()))
            self.events.event(
                "opened",
                door=grant.door,
                address=grant.address,
                service=service.name,
                detail=f"{_ports(grant.ports)} once the service answers",
            )
            return
        seconds = grant.seconds_left(self.clock())
        try:
            self.backend.grant(grant.address, grant.ports, seconds)
        except FirewallError as error:
            self.stats.grant_failures += 1
            log.error(
                "%s: %s: grant failed, door stays closed: %s", grant.address, grant.door, error
            )
            self.events.event(
                "grant-failed", door=grant.door, address=grant.address, detail=str(error)
            )
            return
        self._granted = (grant.door, grant.address)
        if self.fleet is not None:
            self.fleet.granted(grant, seconds)
        done = self.clock()
        self.observations.latency(grant.door, max(0.0, done - grant.at))
        self.grant_book.add(grant.door, grant.address, done + seconds)
        self.events.event(
            "opened",
            door=grant.door,
            address=grant.address,
            detail=f"{_ports(grant.ports)} for {seconds:.0f} s",
        )
        self._log(grant)

    def _receipt(self, command: SendReceipt) -> None:
        """The receipt of a grant just made (the engine emits it right after the grant):
        sent only when that grant was carried out. The service's state is as of now:
        ``ready`` when the door has no service or its service answers, else ``starting``."""
        door = self.config.door(command.door)
        if door is None:
            return
        granted, self._granted = self._granted, None
        if door.open is not None and granted != (command.door, command.address):
            return  # the grant failed: no receipt (a door without open ports runs commands)
        state: Literal["starting", "ready"] = "ready"
        if door.service is not None and self.services is not None:
            machine = self.services.machines.machines.get(door.service)
            if machine is None or machine.state not in RUNNING:
                state = "starting"
        self.receipts.send(command, door, state, self.engine.wall_offset)

    def revoke(self, revoke: Revoke, origin: str | None = None) -> None:
        """Close ``revoke.door`` for its address: a close knock here (published to the
        fleet), or one made on fleet host ``origin``."""
        door = self.config.door(revoke.door)
        if door is None or door.open is None:
            return
        if self.services is not None:
            self.services.closed(revoke.door, revoke.address)
        if not door.open.ports:
            return
        try:
            self.backend.revoke(revoke.address, door.open.ports)
        except FirewallError as error:
            log.error("%s: %s: revoke failed: %s", revoke.address, revoke.door, error)
            return
        self.grant_book.remove(revoke.door, revoke.address)
        if origin is None and self.fleet is not None:
            self.fleet.revoked(revoke)
        detail = f"fleet from {origin}" if origin is not None else f"by door {revoke.by}"
        self.events.event("closed", door=revoke.door, address=revoke.address, detail=detail)
        self._log(revoke)
        if door.service is not None and self.services is not None:
            self.services.revoked(door.service, revoke.address)

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

    @property
    def addresses(self) -> frozenset[str] | None:
        """The host's own addresses (``None`` until known, or without capture)."""
        return None if self.host is None else self.host.addresses

    def _tell_addresses(self, addresses: frozenset[str]) -> None:
        """The engine and the SPA reader learn the host's addresses."""
        if not addresses:
            log.error(
                "the host's addresses are unknown: doors without target count no knock "
                "until they are read"
            )
        self.spa.local = addresses
        if self.channel is not None:
            self.channel.configure(self.config.doors, addresses)
        self._commands(self.engine.handle(LocalAddresses(self.clock(), addresses)))

    def _host(self, state: HostState) -> None:
        """The host changed: its addresses (engine, SPA reader, capture filter), then
        which links are captured."""
        before = self.addresses or frozenset()
        self.host = state
        if state.addresses != before:
            self._tell_addresses(state.addresses)
            change = address_change(before, state.addresses)
            if change is not None:
                log.info("%s", change)
            if self.sniffer is not None:
                self.sniffer.set_filter(capture_filter(self.config.doors, state.addresses))
        if self.sniffer is not None:
            self.sniffer.follow(state.links)

    def _upkeep(self) -> None:
        """Once a second: services, the log's noise summary, the flood summary."""
        if self.services is not None:
            self.services.tick()
        if self.fleet is not None:
            self.fleet.tick()
        flush_noise()
        now = self.clock()
        for door, address in self.grant_book.expired(now):
            self.events.event("expired", door=door, address=address)
        self.events.summarise()
        since, noise_before, packets_before = self._noise
        if now - since >= FLOOD_WINDOW:
            self._summarise_errors()
            counters = self.engine.counters
            noise = counters.timeouts + counters.resets + counters.evictions
            if noise - noise_before >= FLOOD_NOISE:
                log.warning(
                    "last %.0f s: %d knock packets, %d attempts that went nowhere (timed "
                    "out, reset or evicted): a flood or a scan",
                    now - since,
                    counters.packets - packets_before,
                    noise - noise_before,
                )
            self._noise = (now, noise, counters.packets)

    def _check_firewall(self) -> None:
        """Verify knockgate's rules; repair any drift. A failure is logged once per streak
        (the check runs every second), and its end once."""
        self._sync_labelled()
        try:
            if not self.backend.check():
                log.warning("firewall: knockgate's rules were changed or removed; restoring them")
                self.backend.setup(self._plan())
                self.stats.firewall_repairs += 1
                self.events.event("repair", detail="knockgate's rules were changed; restored")
        except FirewallError as error:
            self.stats.firewall_check_failures += 1
            if not self._firewall_failing:
                log.error(
                    "firewall check or repair failed (retried every %g s): %s", CHECK_SECONDS, error
                )
            self._firewall_failing = True
            return
        if self._firewall_failing:
            log.warning(
                "firewall: check and repair work again (%d failed in a row)",
                self.stats.firewall_check_failures,
            )
            self._firewall_failing = False
            self.stats.firewall_check_failures = 0

    def _sync_labelled(self) -> None:
        """The label-gated containers' host ports into the firewall, when they changed
        (a failure is logged and tried again at the next firewall check)."""
        if self.services is None or self.services.label_protected == self._labelled:
            return
        if not self.services.listed:
            return  # nothing listed yet: what the last run gated stays closed
        wanted = self.services.label_protected
        try:
            self.backend.setup(firewall_plan(self.config, wanted))
        except FirewallError as error:
            if not self._labels_failing:  # tried again every second: logged once a streak
                log.error("firewall: cannot set the labelled containers' ports: %s", error)
            self._labels_failing = True
            return
        if self._labels_failing:
            log.warning("firewall: the labelled containers' ports are set again")
        self._labels_failing = False
        self._labelled = wanted
        self._remember_labelled()

    def _remember_labelled(self) -> None:
        try:
            save_labelled(self.config.settings.state_dir, self._labelled)
        except OSError as error:
            log.warning("state: cannot remember the labelled containers' ports: %s", error)

    def _remembered_labelled(self) -> tuple[Step, ...]:
        try:
            return load_labelled(self.config.settings.state_dir)
        except OSError as error:
            log.warning("state: cannot read the labelled containers' ports: %s", error)
            return ()

    def reload(self) -> None:
        """SIGHUP: validate first; keep the running config when the new one is bad.

        Whatever goes wrong (a bad file, a firewall that refuses the new rules, even
        a bug), the running configuration stays in force and the daemon goes on.
        """
        try:
            self._reload()
        except Exception as error:
            self.stats.reload_failures += 1
            log.exception(
                "reload refused (internal error: %s); keeping the running configuration", error
            )
            self.events.event("reload-refused", detail=f"internal error: {error}")

    def _reload(self) -> None:
        try:
            loaded = self.overrides.apply(load_config(self.config.path))
            # What `run` would refuse at start (an unwritable log, a filter the kernel
            # cannot take, ...) is refused here too, before anything is touched.
            preflight(loaded, overridden=self.overrides.options())
        except KnockgateError as error:
            self._refuse_reload(str(error).replace("\n", "; "))
            return
        services = self.services
        if services is None and loaded.config.services:
            # The first services of a configuration that had none: a runtime for them.
            if self.launchers is None:
                self._refuse_reload("services were added, and there is no container runtime")
                return
            try:
                launcher = self.launchers(loaded.config.services)
            except KnockgateError as error:
                self._refuse_reload(f"services were added: {error}")
                return
            services = self._service_manager(launcher)
        # Everything that can fail comes before the swap, each undone when a later one fails.
        try:
            configure(loaded.config.settings.log)
        except OSError as error:
            configure(self.config.settings.log)
            self._refuse_reload(f"log: {error}")
            return
        try:
            self.backend.setup(self._plan(loaded.config))
        except FirewallError as error:
            configure(self.config.settings.log)
            self._refuse_reload(f"firewall setup failed: {error}")
            try:
                self.backend.setup(self._plan())
            except FirewallError as again:
                log.error("firewall: restoring the running rules failed too: %s", again)
            return
        if loaded.config.settings.state_dir != self.config.settings.state_dir:
            self.state.close()
            self.state = StateStore(loaded.config.settings.state_dir)
            # One write, not one per entry.
            self.state.compact(Saved(*self.engine.saved_state()), self.wall())
        services_changed = loaded.config.services != self.config.services
        self.loaded, self.config = loaded, loaded.config
        # Swapped: from here on the new configuration is in force. Each step is guarded
        # on its own, so a failure (a bug) in one does not skip the others.
        settings = loaded.config.settings
        self._event(NewDoors(self.clock(), loaded.config.doors, settings.max_attempts))
        self.spa = SpaReader(loaded.config.doors, self.addresses)
        if self.channel is not None:
            self._guarded(
                "reload packet process",
                functools.partial(self.channel.configure, loaded.config.doors, self.addresses),
            )
        if self.sniffer is not None:
            self._guarded("reload capture", self._reload_capture)
        if services is not None and services is not self.services:
            self.services = services
            self._guarded("start services", services.start)
        elif services is not None and services_changed:
            self._guarded(
                "reload services", functools.partial(services.reload, loaded.config.services)
            )
        if services is not None:
            self._guarded("reload labels", self._relabel)
        self.stats.reloads += 1
        self._guarded("reload metrics", self._forget_removed)
        self._guarded("reload fleet", self._fleet_reloaded)
        self._guarded("reload notifications", self._reload_notifications)
        self.events.event("reload", detail=f"{len(loaded.config.doors)} door(s)")
        for warning in loaded.warnings:
            log.warning("%s", warning)
        log.info("configuration reloaded: %d door(s)", len(loaded.config.doors))

    def _relabel(self) -> None:
        """Every label parsed again against the new doors; the firewall follows."""
        assert self.services is not None
        self.services.set_doors(_granting(self.config))
        self._sync_labelled()

    def _reload_capture(self) -> None:
        assert self.sniffer is not None
        self.sniffer.set_filter(capture_filter(self.config.doors, self.addresses or ()))
        if self.host is not None:
            self.sniffer.want(self.config.settings.interfaces, self.host.links)

    def _refuse_reload(self, why: str) -> None:
        self.stats.reload_failures += 1
        log.error("reload refused, keeping the running configuration: %s", why)
        self.events.event("reload-refused", detail=why)

    def _forget_removed(self) -> None:
        """The series (and the counts) of doors and services that are gone go; a change
        of ``metrics`` itself takes effect at the next start."""
        doors = {door.name for door in self.config.doors}
        self.events.keep_doors(doors)
        self.grant_book.keep_doors(doors)
        self.observations.keep(doors, self._service_names())
        metrics = self.config.settings.metrics
        running = self.metrics.settings if self.metrics is not None else None
        if metrics != running:
            log.warning("metrics: the new metrics settings take effect at the next start")

    def _fleet_reloaded(self) -> None:
        """The doors' fleet keys apply at once; the group's own settings at the next start."""
        running = self.fleet.settings if self.fleet is not None else None
        if self.fleet is not None:
            self.fleet.reloaded()
        if not same_fleet(running, self.config.settings.fleet):
            log.warning("fleet: the new fleet settings take effect at the next start")

    def _service_names(self) -> set[str]:
        names = {service.name for service in self.config.services}
        if self.services is not None:
            names.update(self.services.units)
        return names

    # ----------------------------------------------------------------- events, metrics

    def _service_event(self, event: ServiceEvent) -> None:
        """A service's start, readiness, stop or failure: a record, and its metrics."""
        assert self.services is not None
        match event:
            case ContainerStarted(service=name, resumed=resumed):
                self.events.event(
                    "service-started", service=name, detail="unpaused" if resumed else ""
                )
            case ContainerReady(service=name):
                asked = self.services.starts_asked.pop(name, None)
                seconds = None if asked is None else max(0.0, event.ts - asked)
                self.observations.started(name, "ready", seconds)
                detail = "" if seconds is None else f"in {seconds * 1000:.0f} ms"
                self.events.event("service-ready", service=name, detail=detail)
            case ContainerFailed(service=name, reason=reason):
                if self.services.starts_asked.pop(name, None) is not None:
                    self.observations.started(name, "failed")
                self.events.event("service-failed", service=name, detail=reason)
            case ContainerStopped(service=name, paused=paused):
                self.events.event("service-stopped", service=name, detail="paused" * paused)
            case ContainerDied(service=name):
                self.events.event("service-stopped", service=name, detail="the container ended")
            case _:
                pass

    def metrics_snapshot(self) -> MetricsSnapshot:
        """The numbers a scrape shows, copied (the collector reads them on its thread)."""
        counters = {
            **self.engine.counters.as_dict(),
            **self._capture_counters(),
            "grant_failures": self.stats.grant_failures,
            "firewall_repairs": self.stats.firewall_repairs,
            "reloads": self.stats.reloads,
            "reload_failures": self.stats.reload_failures,
            "internal_errors": self.stats.internal_errors,
        }
        running: dict[str, int] = {}
        if self.services is not None:
            for row in self.services.snapshot():
                running[row["name"]] = int(row["state"] in RUNNING)
        tally = self.events.tally
        obs = self.observations
        return MetricsSnapshot(
            taken=self.clock(),
            counters=counters,
            knocks=dict(tally.knocks),
            spa_refused=dict(tally.spa_refused),
            grants_open=self.grant_book.by_door(),
            open_latency={door: b.copy() for door, b in obs.open_latency.items()},
            service_starts=dict(obs.service_starts),
            cold_start={name: b.copy() for name, b in obs.cold_start.items()},
            services_running=running,
            doors=tuple(door.name for door in self.config.doors),
            events_followers_dropped=self.events.followers_dropped,
            fleet=self.fleet.numbers() if self.fleet is not None else None,
            **self._notification_counts(),
        )

    def _notification_counts(self) -> dict[str, Any]:
        if self.notifications is None:
            return {}
        totals, queued = self.notifications.counts()
        return {"notifications": totals, "notifications_queued": queued}

    def snapshot(self) -> dict[str, Any]:
        """What ``knockgate status`` prints."""
        try:
            grants = [
                {
                    "address": g.address,
                    "port": str(g.step),
                    "expires_in": round(g.expires_in, 3),
                    **self._grant_owner(g.address, g.step),
                }
                for g in self.backend.grants()
            ]
        except FirewallError as error:
            grants = [{"error": str(error)}]
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "config": self.config.path,
            "backend": self.backend.name,
            "uptime": round(self.clock() - self.stats.started, 1),
            "doors": [
                {
                    "name": door.name,
                    "knock": _knock_kind(door),
                    "steps": len(self.engine.active_sequence(door.name)),
                    "open": [str(p) for p in door.open.ports] if door.open else [],
                    "closes": list(door.close),  # a close door: the doors it revokes
                }
                for door in self.config.doors
            ],
            "grants": grants,
            "interfaces": self.sniffer.capturing if self.sniffer is not None else [],
            "packet_process": self.channel.describe() if self.channel is not None else None,
            "services": self.services.snapshot() if self.services is not None else [],
            "gated": self.services.gated() if self.services is not None else [],
            "fleet": self.fleet.snapshot() if self.fleet is not None else None,
            "notifications": self.notifications.snapshot() if self.notifications else [],
            "attempts": self.engine.attempt_count,
            "counters": {
                **self.engine.counters.as_dict(),
                # From the packet process: frames, kernel drops, frames the host's own
                # stack would drop (bad checksums, ...: not knocks), SPA packets dropped;
                # plus the SPA packets handed over here (a replay, a test).
                **self._capture_counters(),
                "capture_malformed": self.channel.malformed if self.channel else 0,
                "held_off": self.stats.held_off,
                "refused_unrecorded": self.stats.refused_unrecorded,
                "grant_failures": self.stats.grant_failures,
                "receipts_sent": self.receipts.stats.sent,
                "receipt_failures": self.receipts.stats.failed,
                "firewall_repairs": self.stats.firewall_repairs,
                "reloads": self.stats.reloads,
                "reload_failures": self.stats.reload_failures,
                "internal_errors": self.stats.internal_errors,
                "service_launches": self.services.launches if self.services else 0,
                "service_failures": self.services.failures if self.services else 0,
            },
        }

    def _grant_owner(self, address: str, step: Step) -> dict[str, str | None]:
        """The door a kernel grant belongs to: the one whose grant for ``address`` this
        run made and that opens ``step``, else the only door opening ``step`` (a grant
        left by the previous run, a service door's); ``None`` when that is ambiguous.
        A grant on a service's port also names the service (several doors may lead to
        it: the service knows who holds it, not through which door)."""
        doors = [d for d in self.config.doors if d.open is not None and step in d.open.ports]
        held = [d for d in doors if self.grant_book.holds(d.name, address)]
        owner: dict[str, str | None] = {"door": None}
        if len(held) == 1 or len(doors) == 1:
            owner["door"] = (held or doors)[0].name
        services = {d.service for d in doors}
        if len(services) == 1 and None not in services:
            owner["service"] = services.pop()
        return owner

    def _capture_counters(self) -> dict[str, int]:
        counters = dict.fromkeys(COUNTER_NAMES, 0)
        if self.channel is not None:
            counters.update(self.channel.counters)
        for name, count in self.spa.counters.as_dict().items():
            counters[name] += count
        del counters["undecoded"]
        return counters


def _granting(config: Config) -> dict[str, bool]:
    """Door name -> whether a knock on it grants (labels may name only those)."""
    return {door.name: door.open is not None for door in config.doors}


def _ports(ports: tuple[Step, ...]) -> str:
    return ", ".join(str(port) for port in ports)


def _item_name(item: Item) -> str:
    return f"{type(item).__name__} handler"


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
