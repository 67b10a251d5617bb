"""The host's links and addresses, read from netlink and followed while running.

:func:`read_host` is one netlink dump (links, then addresses) turned into a frozen
:class:`HostState`. :class:`HostWatcher` keeps a netlink socket subscribed to link
and address changes (``RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR``) and,
in a thread of its own, blocks on it: no polling, no timer. A burst of events (an
interface coming up brings its link change and its IPv6 link-local address; a VPN
adds several addresses) is gathered for :data:`COALESCE_SECONDS`, then the state is
dumped again and handed to ``changed`` only when it differs from the last one.

The events themselves are not interpreted: the dump that follows them is the truth.
So an overflowing netlink socket (``ENOBUFS``: the kernel dropped events) loses
nothing: it is one more reason to dump. The socket is subscribed before the first
dump, so no change falls between the two.

``Link.up`` is the administrative state (``IFF_UP``), not the carrier: a packet
socket on an interface without carrier works, and starts seeing frames the moment
the carrier comes back, while one on an administratively down interface fails its
reads with ENETDOWN. Following the carrier as well would close and re-open sockets
(and log) on every cable pull, Wi-Fi roam or container leaving a Docker bridge,
for no packet gained.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from appliance.errors import CaptureError

log = logging.getLogger("knockgate.capture")

IFF_UP = 0x1
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
COALESCE_SECONDS = 0.01  # events that follow each other this closely make one change
COALESCE_LIMIT = 0.2  # however long a burst lasts, the state is read again after this
RESUBSCRIBE_FIRST = 1.0  # after the watcher failed: seconds before subscribing again,
RESUBSCRIBE_LAST = 30.0  # doubling up to this
DUMP_ATTEMPTS = 5  # a dump interrupted by a change (NLM_F_DUMP_INTR) is tried again
EVENT_BUFFER = 1 << 20  # the event socket's receive buffer; an overflow only costs a dump


@dataclass(frozen=True)
class Link:
    """One network interface: its name, kernel index and administrative state."""

    name: str
    index: int
    up: bool  # IFF_UP: switched on (carrier or not)


@dataclass(frozen=True)
class HostState:
    """What capture needs to know of the host: its addresses (canonical text, as
    :mod:`ipaddress` prints them) and its links, by index."""

    addresses: frozenset[str]
    links: tuple[Link, ...]


class Netlink(Protocol):
    """What is used of ``pyroute2.IPRoute`` (an in-memory one in unit tests)."""

    def get_links(self) -> Any: ...
    def get_addr(self) -> Any: ...
    def close(self) -> None: ...


class EventSource(Protocol):
    """A socket that turns readable when the host changes."""

    def fileno(self) -> int: ...
    def drain(self) -> None:
        """Take every waiting event (their content does not matter)."""

    def close(self) -> None: ...


def address_change(before: frozenset[str], after: frozenset[str]) -> str | None:
    """The log line for a change of the host's addresses; None when only link-local
    addresses came or went (every interface brought up gets one: noise, not news)."""

    def shown(addresses: frozenset[str]) -> list[str]:
        return sorted(a for a in addresses if not ipaddress.ip_address(a).is_link_local)

    added, removed = shown(after - before), shown(before - after)
    if not added and not removed:
        return None
    parts = [
        f"{what} {', '.join(addresses)}"
        for what, addresses in (("added", added), ("removed", removed))
        if addresses
    ]
    return "host addresses changed: " + "; ".join(parts)


def _iproute() -> Netlink:
    from pyroute2 import IPRoute

    return IPRoute()  # type: ignore[no-any-return]


def read_host(netlink: Netlink | None = None) -> HostState:
    """The host's links and addresses now: one dump of each (OSError on failure)."""
    source = _iproute() if netlink is None else netlink
    try:
        return _dump_again(source)
    finally:
        if netlink is None:
            source.close()


def _dump_again(netlink: Netlink) -> HostState:
    """A dump, again while a change interrupts it (NLM_F_DUMP_INTR)."""
    from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError

    for _ in range(DUMP_ATTEMPTS - 1):
        try:
            return _dump(netlink)
        except NetlinkDumpInterrupted:
            continue
        except NetlinkError as error:
            raise OSError(error.code, f"netlink: {error}") from None
    try:
        return _dump(netlink)
    except NetlinkError as error:  # interrupted again included
        raise OSError(error.code, f"netlink: {error}") from None


def _dump(netlink: Netlink) -> HostState:
    links = tuple(
        sorted(
            (
                Link(
                    str(msg.get_attr("IFLA_IFNAME")), int(msg["index"]), bool(msg["flags"] & IFF_UP)
                )
                for msg in netlink.get_links()
            ),
            key=lambda link: link.index,
        )
    )
    addresses: set[str] = set()
    for msg in netlink.get_addr():
        # IFA_LOCAL is the interface's own address on a point-to-point link (where
        # IFA_ADDRESS is the peer); IPv6 has only IFA_ADDRESS. `ip addr` reads the same.
        text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if text:
            with contextlib.suppress(ValueError):
                addresses.add(str(ipaddress.ip_address(text)))
    return HostState(frozenset(addresses), links)


class NetlinkEvents:
    """A ``pyroute2.IPRoute`` subscribed to link and address changes."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute

        self._netlink = IPRoute(rcvbuf=EVENT_BUFFER)
        try:
            self._netlink.bind(groups=GROUPS)
        except BaseException:
            self._netlink.close()
            raise

    def fileno(self) -> int:
        return int(self._netlink.fileno())

    def drain(self) -> None:
        fd = self.fileno()
        while select.select([fd], [], [], 0)[0]:
            try:
                self._netlink.get()
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    raise
                # The kernel dropped events: the dump that follows covers them.
                log.debug("netlink: events lost (ENOBUFS); reading the host again")

    def close(self) -> None:
        self._netlink.close()


class HostWatcher:
    """Follows the host's links and addresses; ``changed(state)`` runs in the
    watcher's thread on every change (it should only hand the state over)."""

    def __init__(
        self,
        changed: Callable[[HostState], None],
        *,
        events: Callable[[], EventSource] = NetlinkEvents,
        read: Callable[[], HostState] = read_host,
        coalesce: float = COALESCE_SECONDS,
    ) -> None:
        self.changed = changed
        self.read = read
        self.coalesce = coalesce
        try:
            self._events = events()  # subscribed first: no change slips in before the dump
        except OSError as error:
            raise CaptureError(f"cannot follow the host's links and addresses: {error}") from None
        try:
            self.current = read()
        except OSError as error:
            self._events.close()
            raise CaptureError(f"cannot read the host's links and addresses: {error}") from None
        self._new_events = events
        self._failing = False
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="host-watcher", daemon=True)
        self._started = False

    def start(self) -> None:
        self._started = True
        self._thread.start()

    def stop(self) -> None:
        """Wake the thread, wait for it (briefly) and close the sockets."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")
        if self._started:
            self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._close()

    def _close(self) -> None:
        self._events.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        """Follow events; when that fails (a bug, a netlink socket gone bad), log it once,
        subscribe again after a growing pause and read the host again: a watcher that
        died would leave new interfaces uncaptured for good."""
        pause = RESUBSCRIBE_FIRST
        while not self._stopping.is_set():
            try:
                self._follow()
                return
            except Exception:
                if not self._failing:
                    log.exception("host watcher failed; subscribing again in %g s", pause)
                self._failing = True
            if self._stopping.wait(pause):
                return
            pause = min(pause * 2, RESUBSCRIBE_LAST)
            try:
                fresh = self._new_events()
            except Exception:
                continue
            with contextlib.suppress(Exception):
                self._events.close()
            self._events = fresh
            with contextlib.suppress(Exception):  # a failure here shows in _follow again
                self._reread()  # what changed meanwhile; logs that it works again

    def _follow(self) -> None:
        events = self._events.fileno()
        while not self._stopping.is_set():
            ready = select.select([events, self._wake_r], [], [])[0]
            if self._wake_r in ready:
                return
            self._gather(events)
            if self._stopping.is_set():
                return
            self._reread()

    def _gather(self, events: int) -> None:
        """Drain events until none came for ``coalesce`` seconds (at most COALESCE_LIMIT)."""
        until = time.monotonic() + COALESCE_LIMIT
        while True:
            self._events.drain()
            if time.monotonic() >= until:
                return
            ready = select.select([events, self._wake_r], [], [], self.coalesce)[0]
            if not ready or self._wake_r in ready:
                return

    def _reread(self) -> None:
        try:
            state = self.read()
        except OSError as error:
            if not self._failing:
                log.warning("cannot read the host's links and addresses: %s", error)
            self._failing = True
            return
        if self._failing:
            log.info("reading the host's links and addresses works again")
            self._failing = False
        if state != self.current:
            self.current = state
            self.changed(state)
