"""Following the host: which links the sniffer captures (a fake socket opener), and the
host watcher's coalescing, change detection and prompt stop (a fake event source).

Regressions pinned here: "a stock host's administratively down ifb0/ifb1 log 'went
away'/'capturing again' four times a second forever" and "an interface created after
start (a VPN's wg0, a new Docker bridge) is never captured".
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.capture.host import (
    HostState,
    HostWatcher,
    Link,
    NetlinkEvents,
    address_change,
    read_host,
)
from appliance.capture.sniffer import REOPEN_SECONDS, Sniffer
from appliance.config import load_config
from appliance.errors import CaptureError
from appliance.firewall.memory import MemoryBackend
from appliance.runtime.daemon import Daemon
from tests.unit.helpers import FakeChannel

LOOPBACK = Link("lo", 1, True)
ETH0 = Link("eth0", 2, True)
IFB0 = Link("ifb0", 3, False)
DOCKER0 = Link("docker0", 4, True)


# -- the sniffer, with a fake socket opener ----------------------------------------------


class FakeSocket:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        return b"\0" * size  # PACKET_STATISTICS: nothing dropped

    def setsockopt(self, *args: object) -> None:  # a new filter attached
        pass

    def close(self) -> None:
        self.closed = True


class Opener:
    """Hands out fake sockets and records every attempt; names in ``failing`` fail."""

    def __init__(self) -> None:
        self.opened: list[FakeSocket] = []
        self.attempts: list[str] = []
        self.failing: set[str] = set()

    def __call__(self, interface: str, expression: str) -> socket.socket:
        self.attempts.append(interface)
        if interface in self.failing:
            raise OSError(errno.EPERM, "Operation not permitted")
        sock = FakeSocket(interface)
        self.opened.append(sock)
        return sock  # type: ignore[return-value]

    def open_names(self) -> list[str]:
        return [sock.name for sock in self.opened if not sock.closed]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lines(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """The capture log's lines, as the test goes (cleared by the test when it wants)."""
    caplog.set_level(logging.INFO, logger="knockgate.capture")
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Collect(logging.INFO)
    logger = logging.getLogger("knockgate.capture")
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


def sniffer(opener: Opener, *named: str, clock: Clock | None = None) -> Sniffer:
    return Sniffer(named, "tcp", clock or Clock(), opener=opener)


def test_every_up_link_but_lo_is_captured_and_a_down_one_is_not_talked_about(
    lines: list[str],
) -> None:
    opener = Opener()
    capture = sniffer(opener)
    capture.follow((LOOPBACK, ETH0, IFB0, DOCKER0))
    assert capture.capturing == ["eth0", "docker0"]
    assert opener.attempts == ["eth0", "docker0"]
    assert lines == ["eth0: capturing", "docker0: capturing"]
    assert capture.reopen_at is None  # no timer for the down ifb0


def test_a_down_link_is_waited_for_in_silence_then_captured_with_one_line(
    lines: list[str],
) -> None:
    """Regression: ifb0/ifb1 (administratively down on a stock host) logged two lines
    every 0.5 s forever."""
    opener = Opener()
    capture = sniffer(opener)
    capture.follow((LOOPBACK, ETH0, IFB0))
    lines.clear()
    for _ in range(20):  # other changes of the host come and go
        capture.follow((LOOPBACK, ETH0, IFB0))
    assert lines == []
    assert opener.attempts == ["eth0"]  # never tried on the down link
    capture.follow((LOOPBACK, ETH0, Link("ifb0", 3, True)))
    assert lines == ["ifb0: capturing"]
    assert capture.capturing == ["eth0", "ifb0"]


def test_a_link_created_while_running_is_captured(lines: list[str]) -> None:
    """Regression: an interface created after start (wg0) was never captured."""
    opener = Opener()
    capture = sniffer(opener)
    capture.follow((LOOPBACK, ETH0))
    capture.follow((LOOPBACK, ETH0, Link("wg0", 9, True)))
    assert capture.capturing == ["eth0", "wg0"]
    assert lines == ["eth0: capturing", "wg0: capturing"]


def test_a_link_that_goes_down_or_away_is_closed_with_one_line(lines: list[str]) -> None:
    opener = Opener()
    capture = sniffer(opener)
    capture.follow((ETH0, DOCKER0))
    lines.clear()
    capture.follow((Link("eth0", 2, False), DOCKER0))
    assert capture.capturing == ["docker0"]
    assert opener.open_names() == ["docker0"]
    capture.follow((Link("eth0", 2, False), DOCKER0))
    capture.follow((DOCKER0,))  # eth0 deleted while down
    capture.follow(())
    assert capture.capturing == []
    assert capture.readers == []
    assert opener.open_names() == []
    assert lines == [
        "eth0: down; capturing again when it comes up",
        "eth0: gone",
        "docker0: gone",
    ]


def test_a_link_recreated_under_the_same_name_gets_a_new_socket(lines: list[str]) -> None:
    opener = Opener()
    capture = sniffer(opener)
    capture.follow((Link("veth1", 7, True),))
    first = opener.opened[0]
    capture.follow((Link("veth1", 8, True),))  # deleted and created between two reads
    assert first.closed
    assert opener.open_names() == ["veth1"]
    assert capture.readers[0].index == 8


def test_named_interfaces_only_and_one_that_does_not_exist_yet_is_waited_for(
    lines: list[str],
) -> None:
    opener = Opener()
    capture = sniffer(opener, "eth0", "wg0", "br9")
    capture.follow((LOOPBACK, ETH0, DOCKER0, Link("br9", 5, False)))
    assert capture.capturing == ["eth0"]
    assert lines == [
        "eth0: capturing",
        "br9: down; capturing it when it comes up",
        "wg0: not present; capturing it when it appears",
    ]
    lines.clear()
    capture.follow((LOOPBACK, ETH0, DOCKER0, Link("br9", 5, False)))
    assert lines == []
    capture.follow((LOOPBACK, ETH0, DOCKER0, Link("br9", 5, False), Link("wg0", 11, True)))
    assert lines == ["wg0: capturing"]
    capture.follow((LOOPBACK, ETH0, DOCKER0, Link("br9", 5, False)))
    capture.follow((LOOPBACK, ETH0, DOCKER0, Link("br9", 5, False), Link("wg0", 12, True)))
    assert lines == ["wg0: capturing", "wg0: gone", "wg0: capturing"]
    assert capture.capturing == ["eth0", "wg0"]


def test_a_socket_that_cannot_be_opened_is_logged_once_and_tried_on_the_next_change(
    lines: list[str],
) -> None:
    opener = Opener()
    opener.failing.add("eth0")
    capture = sniffer(opener)
    capture.follow((ETH0,))
    capture.follow((ETH0, DOCKER0))
    assert opener.attempts == ["eth0", "eth0", "docker0"]
    assert capture.reopen_at is None  # no timer: the next change of the host tries again
    assert lines == [
        "eth0: cannot capture (Operation not permitted); trying again when its link changes",
        "docker0: capturing",
    ]
    opener.failing.clear()
    capture.follow((ETH0,))
    assert capture.capturing == ["eth0"]
    assert lines[-2:] == ["eth0: capturing", "docker0: gone"]


def test_a_link_going_down_under_a_read_keeps_the_socket_and_says_nothing(
    lines: list[str],
) -> None:
    """ENETDOWN is reported once by the kernel; the socket resumes when the link is up
    again, and netlink says whether it is."""
    opener = Opener()
    capture = sniffer(opener)
    capture.follow((ETH0,))
    lines.clear()
    capture.failed(capture.readers[0], OSError(errno.ENETDOWN, "Network is down"))
    assert capture.capturing == ["eth0"]
    assert capture.reopen_at is None
    assert lines == []


def test_another_read_error_closes_the_socket_and_reopens_it_once(lines: list[str]) -> None:
    clock = Clock()
    opener = Opener()
    capture = sniffer(opener, clock=clock)
    capture.follow((ETH0,))
    lines.clear()
    capture.failed(capture.readers[0], OSError(errno.EIO, "Input/output error"))
    assert capture.capturing == []
    assert capture.reopen_at == clock.now + REOPEN_SECONDS
    capture.reopen()
    assert capture.reopen_at is None
    assert capture.capturing == ["eth0"]
    assert lines == [
        "eth0: capture error (Input/output error); opening it again",
        "eth0: capturing",
    ]


def test_a_reload_that_changes_interfaces_applies_at_once(lines: list[str]) -> None:
    opener = Opener()
    capture = sniffer(opener)
    links = (LOOPBACK, ETH0, DOCKER0)
    capture.follow(links)
    lines.clear()
    capture.want(("docker0", "wg0"), links)
    assert capture.capturing == ["docker0"]
    assert opener.open_names() == ["docker0"]
    assert lines == [
        "eth0: no longer captured (not in interfaces)",
        "wg0: not present; capturing it when it appears",
    ]
    capture.want(("docker0", "wg0"), links)  # the same names: nothing happens
    capture.want((), links)  # unset again: everything but lo
    assert capture.capturing == ["docker0", "eth0"]
    assert lines[2:] == ["eth0: capturing"]


def test_counters_outlive_the_links_they_were_counted_on() -> None:
    capture = sniffer(Opener())
    capture.follow((ETH0, DOCKER0))
    capture.readers[0].frames = 5
    capture.readers[0].rejected["bad_checksums"] = 2
    capture.readers[1].rejected["bad_checksums"] = 3
    capture.follow((DOCKER0,))
    assert capture.frames == 5
    assert capture.rejected["bad_checksums"] == 5
    assert capture.dropped == 0


def test_a_new_reader_takes_the_current_filter() -> None:
    capture = sniffer(Opener())
    capture.set_filter("udp")  # no reader yet: nothing to attach to
    capture.follow((ETH0,))
    assert capture.readers[0].expression == "udp"


# -- reading the host ------------------------------------------------------------------


class Message(dict[str, Any]):
    """A parsed netlink message as pyroute2 hands it over."""

    def __init__(self, attrs: dict[str, Any], **fields: Any) -> None:
        super().__init__(fields)
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


class Netlink:
    def __init__(self, links: list[Message], addresses: list[Message]) -> None:
        self.links, self.addresses = links, addresses
        self.closed = False

    def get_links(self) -> list[Message]:
        return self.links

    def get_addr(self) -> list[Message]:
        return self.addresses

    def close(self) -> None:
        self.closed = True


def test_read_host_turns_one_dump_into_links_and_canonical_addresses() -> None:
    netlink = Netlink(
        [
            Message({"IFLA_IFNAME": "eth0"}, index=2, flags=0x1043),  # UP|BROADCAST|...
            Message({"IFLA_IFNAME": "lo"}, index=1, flags=0x49),
            Message({"IFLA_IFNAME": "ifb0"}, index=3, flags=0x82),  # down
        ],
        [
            Message({"IFA_ADDRESS": "198.18.0.1", "IFA_LOCAL": "198.18.0.1"}),
            # A point-to-point link: IFA_ADDRESS is the peer, IFA_LOCAL our own.
            Message({"IFA_ADDRESS": "198.18.9.2", "IFA_LOCAL": "198.18.9.1"}),
            Message({"IFA_ADDRESS": "2001:0002:0000:0000::0001"}),  # IPv6: no IFA_LOCAL
            Message({"IFA_ADDRESS": "not an address"}),
        ],
    )
    state = read_host(netlink)
    assert state == HostState(
        frozenset({"198.18.0.1", "198.18.9.1", "2001:2::1"}),
        (Link("lo", 1, True), Link("eth0", 2, True), Link("ifb0", 3, False)),
    )
    assert not netlink.closed  # a socket handed in is the caller's


def test_read_host_reads_this_machines_netlink() -> None:
    """No root needed to dump: the loopback is there, up, with its address."""
    state = read_host()
    assert Link("lo", 1, True) in state.links
    assert "127.0.0.1" in state.addresses or "::1" in state.addresses


# -- the watcher, with a fake event source ---------------------------------------------


class Events:
    """A socket pair standing in for the netlink socket: a byte is an event."""

    def __init__(self) -> None:
        self.kernel, self.ours = socket.socketpair()
        self.ours.setblocking(False)
        self.drains = 0
        self.closed = False

    def fileno(self) -> int:
        return self.ours.fileno()

    def drain(self) -> None:
        self.drains += 1
        try:
            while self.ours.recv(4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        self.closed = True
        self.ours.close()
        self.kernel.close()

    def event(self) -> None:
        self.kernel.send(b"e")


class Host:
    """The state the fake dump returns; counts the dumps."""

    def __init__(self, state: HostState) -> None:
        self.state = state
        self.reads = 0
        self.failing = False

    def __call__(self) -> HostState:
        self.reads += 1
        if self.failing:
            raise OSError(errno.ENOBUFS, "No buffer space available")
        return self.state


ONE = HostState(frozenset({"198.18.0.1"}), (LOOPBACK, ETH0))
TWO = HostState(frozenset({"198.18.0.1", "198.18.0.2"}), (LOOPBACK, ETH0, Link("wg0", 5, True)))


class Watched:
    def __init__(self) -> None:
        self.states: list[HostState] = []
        self.event = threading.Event()

    def __call__(self, state: HostState) -> None:
        self.states.append(state)
        self.event.set()


def watcher(host: Host, events: Events, changed: Watched, coalesce: float = 0.01) -> HostWatcher:
    return HostWatcher(changed, events=lambda: events, read=host, coalesce=coalesce)


def test_a_burst_of_events_is_one_dump_and_one_change() -> None:
    host, events, changed = Host(ONE), Events(), Watched()
    watch = watcher(host, events, changed, coalesce=0.05)
    assert watch.current == ONE
    watch.start()
    try:
        host.state = TWO
        for _ in range(5):
            events.event()
            time.sleep(0.005)
        assert changed.event.wait(2)
        time.sleep(0.1)
        assert changed.states == [TWO]
        assert host.reads == 2  # the first read, then one for the burst
        assert watch.current == TWO
    finally:
        watch.stop()
    assert events.closed


def test_an_event_that_changes_nothing_calls_nothing() -> None:
    host, events, changed = Host(ONE), Events(), Watched()
    watch = watcher(host, events, changed)
    watch.start()
    try:
        events.event()
        deadline = time.monotonic() + 2
        while host.reads < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert host.reads == 2
        assert changed.states == []
    finally:
        watch.stop()


def test_the_watcher_waits_for_events_without_polling() -> None:
    host, events, changed = Host(ONE), Events(), Watched()
    watch = watcher(host, events, changed)
    watch.start()
    try:
        time.sleep(0.3)
        assert (host.reads, events.drains) == (1, 0)
    finally:
        watch.stop()


def test_stop_returns_at_once_while_the_watcher_waits() -> None:
    events = Events()
    watch = watcher(Host(ONE), events, Watched())
    watch.start()
    time.sleep(0.05)
    began = time.monotonic()
    watch.stop()
    assert time.monotonic() - began < 0.5
    assert events.closed


def test_stop_without_start_closes_the_socket() -> None:
    events = Events()
    watcher(Host(ONE), events, Watched()).stop()
    assert events.closed


def test_a_failed_dump_is_logged_once_and_the_next_event_reads_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="knockgate.capture")
    host, events, changed = Host(ONE), Events(), Watched()
    watch = watcher(host, events, changed)
    watch.start()
    try:
        host.failing = True
        for reads in (2, 3):
            events.event()
            deadline = time.monotonic() + 2
            while host.reads < reads and time.monotonic() < deadline:
                time.sleep(0.01)
        time.sleep(0.05)
        host.failing, host.state = False, TWO
        events.event()
        assert changed.event.wait(2)
    finally:
        watch.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "cannot read the host's links and addresses: [Errno 105] No buffer space available",
        "reading the host's links and addresses works again",
    ]
    assert changed.states == [TWO]


def test_a_host_that_cannot_be_read_at_start_is_a_capture_error() -> None:
    host, events = Host(ONE), Events()
    host.failing = True
    with pytest.raises(CaptureError, match="cannot read the host's links and addresses"):
        watcher(host, events, Watched())
    assert events.closed


class Overflowing:
    """pyroute2's socket after the kernel dropped events: one ENOBUFS, then a message."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.write(self.write_fd, b"xx")
        self.gets = 0

    def fileno(self) -> int:
        return self.read_fd

    def get(self) -> tuple[()]:
        self.gets += 1
        os.read(self.read_fd, 1)
        if self.gets == 1:
            raise OSError(errno.ENOBUFS, "No buffer space available")
        return ()

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


def test_a_netlink_overflow_is_drained_like_any_event() -> None:
    events = NetlinkEvents.__new__(NetlinkEvents)
    overflowing = Overflowing()
    events._netlink = overflowing
    events.drain()
    assert overflowing.gets == 2
    events.close()


def test_the_real_watcher_subscribes_and_stops_at_once() -> None:
    """Real netlink (subscribing needs no root): started, idle, stopped promptly."""
    changed = Watched()
    watch = HostWatcher(changed)
    assert any(link.name == "lo" for link in watch.current.links)
    watch.start()
    time.sleep(0.1)
    began = time.monotonic()
    watch.stop()
    assert time.monotonic() - began < 0.5


def test_an_address_change_is_one_line_and_link_local_ones_are_not_news() -> None:
    before = frozenset({"198.18.0.1", "fe80::1"})
    assert address_change(before, before | {"fe80::2", "169.254.0.7"}) is None
    assert address_change(before, frozenset({"198.18.0.2", "2001:2::1", "fe80::1"})) == (
        "host addresses changed: added 198.18.0.2, 2001:2::1; removed 198.18.0.1"
    )


# -- the daemon's loop on a HostState --------------------------------------------------


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    from tests.unit.test_daemon import CONFIG

    path = tmp_path / "k.yaml"
    path.write_text(CONFIG.format(socket=tmp_path / "status.sock", marks=tmp_path / "marks"))
    clock = Clock()
    running = Daemon(load_config(str(path)), MemoryBackend(clock), clock=clock, capture=False)
    running.start()
    yield running
    running.shutdown()


def test_the_loop_takes_a_host_state_to_the_engine_the_spa_reader_and_the_sniffer(
    daemon: Daemon, lines: list[str]
) -> None:
    opener = Opener()
    daemon.sniffer = Sniffer((), "tcp", daemon.clock, opener=opener)
    state = HostState(frozenset({"198.18.0.1", "fe80::1"}), (LOOPBACK, ETH0, IFB0))
    daemon._drain_queue()
    daemon.enqueue(state)
    daemon._drain_queue()
    assert daemon.addresses == state.addresses
    assert daemon.engine.local == state.addresses
    assert daemon.spa.local == state.addresses
    assert daemon.sniffer.capturing == ["eth0"]
    assert daemon.snapshot()["interfaces"] == ["eth0"]
    assert daemon.stats.internal_errors == 0
    daemon.enqueue(HostState(state.addresses, (LOOPBACK, ETH0, IFB0, Link("wg0", 9, True))))
    daemon._drain_queue()
    assert daemon.sniffer.capturing == ["eth0", "wg0"]
    assert lines == ["eth0: capturing", "wg0: capturing"]


def test_the_loop_passes_the_sockets_to_the_packet_process_as_they_come_and_go(
    daemon: Daemon,
) -> None:
    pairs: list[tuple[socket.socket, socket.socket]] = []

    def opener(interface: str, expression: str) -> socket.socket:
        pairs.append(socket.socketpair())
        return pairs[-1][0]

    channel = FakeChannel()
    daemon.channel = channel
    daemon.sniffer = capture = Sniffer((), "tcp", daemon.clock, opener=opener)
    try:
        capture.follow((ETH0, DOCKER0))
        daemon._pass_sockets()
        assert channel.calls == [("add", 1, "eth0"), ("add", 2, "docker0")]
        version = capture.version
        capture.follow((DOCKER0,))  # eth0's socket closed: its descriptor is free again
        assert capture.version != version  # the loop passes again only when it moved
        capture.follow((DOCKER0, Link("eth0", 12, True)))  # and likely reused right away
        daemon._pass_sockets()
        assert channel.calls[2:] == [("remove", 1), ("add", 3, "eth0")]
        capture.set_filter("udp")  # a new filter: new sockets (the old ones are locked)
        daemon._pass_sockets()
        # each new socket passed as the successor of the old one (read dry, then closed)
        assert channel.calls[4:] == [("add", 4, "docker0", 2), ("add", 5, "eth0", 3)]
        capture.follow(())
        daemon._pass_sockets()
        assert channel.calls[6:] == [("remove", 4), ("remove", 5)]
        assert daemon._passed == {}
    finally:
        daemon.channel = None
        channel.close()
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


class OnePassSelector:
    """Reports, in one pass, the wake pipe and every registered capture socket as ready
    (the wake pipe first), then stops the loop."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.keys: dict[Any, selectors.SelectorKey] = {}
        self.passes = 0

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        self.keys[fileobj] = selectors.SelectorKey(fileobj, fd, events, data)
        return self.keys[fileobj]

    def unregister(self, fileobj: Any) -> None:
        self.keys.pop(fileobj)

    def close(self) -> None:
        pass

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self.passes += 1
        if self.passes > 1:
            self.daemon.running = False
            return []
        keys = sorted(self.keys.values(), key=lambda key: key.data is not None)
        return [(key, selectors.EVENT_READ) for key in keys]


def test_a_reader_closed_by_an_item_of_the_same_pass_is_not_read(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a HostState without a link (or a reload dropping it from interfaces:)
    handled from the wake pipe closed that link's reader, and the same pass then read
    the closed reader: an AssertionError left the loop and the daemon shut down."""
    from appliance.runtime import daemon as daemon_module

    pairs: list[tuple[socket.socket, socket.socket]] = []

    def opener(interface: str, expression: str) -> socket.socket:
        pairs.append(socket.socketpair())
        pairs[-1][1].send(b"x" * 60)  # a frame waits: the socket is ready
        return pairs[-1][0]

    channel = FakeChannel()
    daemon.channel = channel
    daemon.sniffer = Sniffer((), "tcp", daemon.clock, opener=opener)
    daemon.sniffer.follow((ETH0,))
    daemon._drain_queue()
    daemon.enqueue(HostState(frozenset({"198.18.0.1"}), (LOOPBACK,)))  # eth0 is gone
    monkeypatch.setattr(daemon_module.selectors, "DefaultSelector", lambda: OnePassSelector(daemon))
    daemon.running = True
    try:
        daemon._loop()
    finally:
        daemon.channel = None
        channel.close()
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
    assert daemon.sniffer.capturing == []
    assert daemon.stats.internal_errors == 0


class Breaking(Events):
    """An event source whose drain raises once (a bug, a socket gone bad)."""

    def drain(self) -> None:
        raise RuntimeError("netlink went bad")


def test_a_watcher_that_fails_subscribes_again_and_catches_up(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: any unexpected exception ended the watcher thread for good, and an
    interface that appeared afterwards was never captured."""
    from appliance.capture import host as host_module

    monkeypatch.setattr(host_module, "RESUBSCRIBE_FIRST", 0.05)
    host, changed = Host(ONE), Watched()
    sources = [Breaking(), Events()]
    made = list(sources)
    watch = HostWatcher(changed, events=lambda: made.pop(0), read=host, coalesce=0.01)
    watch.start()
    try:
        with caplog.at_level(logging.INFO, logger="knockgate"):
            sources[0].event()  # the first source breaks on its first event
            host.state = TWO  # meanwhile wg0 appears
            assert changed.event.wait(5)  # caught up after subscribing again
            assert changed.states == [TWO]
            changed.event.clear()
            host.state = ONE
            sources[1].event()  # the new source is followed
            assert changed.event.wait(5)
            assert changed.states == [TWO, ONE]
    finally:
        watch.stop()
    assert sources[0].closed
    failures = [r for r in caplog.records if "host watcher failed" in r.getMessage()]
    assert len(failures) == 1
