"""Live capture: AF_PACKET sockets with a kernel BPF filter, read by the daemon's loop.

scapy compiles the pcap filter (through libpcap) and attaches it to our own
AF_PACKET socket; after that no scapy code runs per packet: frames are read in
non-blocking batches with ``recvmsg_into`` and decoded with
:mod:`appliance.capture.decode`.

A packet socket sees frames before the host's IP, TCP and UDP code does, including
those that code drops (a bad checksum, another host's MAC, a truncated packet). Such a
frame must not count as a knock: conntrack and the scan detector never see it, so a
sweep with bad checksums would complete a door unnoticed. Each decoded frame therefore
goes through :func:`appliance.capture.checksum.drop_reason`, with the checksum status
and real length the kernel hands over in ``PACKET_AUXDATA``; what it refuses is counted
per reason (:data:`~appliance.capture.checksum.REASONS`, :attr:`Sniffer.rejected`) and
the first of each reason on an interface is logged.

The sockets are read by the loop that owns the engine (a selector), not by
threads: a thread per interface would hand every packet across the GIL, which
costs more than deciding on it. A backlog therefore waits in the kernel's
socket buffer (bounded), never in Python memory.

Which interfaces are captured follows the host (:mod:`appliance.capture.host`):
:meth:`Sniffer.follow` opens a socket on every wanted link that is up, including
links created while running (a VPN's ``wg0``, a new Docker bridge), and closes those
of links that went down or away; the daemon keeps running (knockd exits). A link
that is down is waited for in silence, without a socket or a timer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import struct
import time
from collections.abc import Callable, Sequence

from appliance.capture.checksum import (
    BAD_CHECKSUM,
    FRAGMENT,
    MALFORMED,
    MARTIAN,
    NOT_FOR_HOST,
    REASONS,
    drop_reason,
)
from appliance.capture.decode import decode_ethernet
from appliance.capture.host import Link
from appliance.core.events import Packet
from appliance.errors import CaptureError

log = logging.getLogger("knockgate.capture")

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
ARPHRD_LOOPBACK = 772  # sll_hatype of a loopback device
SNAPLEN = 2048  # a whole SPA packet (fwknop caps them at 1500 bytes) with its headers
RECEIVE_BUFFER = 4 << 20
BATCH = 256  # frames read per wake-up at most, so other events are not starved
REOPEN_SECONDS = 1.0  # after a socket error (not a link going down): one new attempt
SOL_PACKET = 263
SO_LOCK_FILTER = 44  # SOL_SOCKET: the attached filter can no longer be changed or removed
PACKET_STATISTICS = 6  # struct tpacket_stats {unsigned tp_packets, tp_drops}; reset on read
PACKET_AUXDATA = 8  # a struct tpacket_auxdata with every frame read by recvmsg
# struct tpacket_auxdata: tp_status, tp_len (the frame's real length), tp_snaplen, tp_mac,
# tp_net, tp_vlan_tci, tp_vlan_tpid; only the first two are read per frame.
AUXDATA_SIZE = 20
_AUXDATA_HEAD = struct.Struct("=II").unpack_from
ANCILLARY_SPACE = socket.CMSG_SPACE(AUXDATA_SIZE)
NOT_PRESENT = "not present; capturing it when it appears"
DOWN_AT_FIRST = "down; capturing it when it comes up"
DOWN = "down; capturing again when it comes up"
_WHY = {
    BAD_CHECKSUM: "bad checksum",
    NOT_FOR_HOST: "not addressed to this host",
    FRAGMENT: "a fragment",
    MALFORMED: "malformed or cut short",
    MARTIAN: "impossible (martian) address",
}


def _why(error: Exception) -> str:
    return (error.strerror if isinstance(error, OSError) else None) or str(error)


def _attach(sock: socket.socket, expression: str, interface: str) -> None:
    from scapy.arch.linux import attach_filter
    from scapy.error import Scapy_Exception

    try:
        attach_filter(sock, expression, interface)
    except (Scapy_Exception, OSError) as error:
        raise CaptureError(f"cannot attach capture filter on {interface}: {error}") from None


def check_filter(expression: str) -> None:
    """Compile ``expression`` (raises CaptureError when libpcap rejects it)."""
    from scapy.arch.common import compile_filter
    from scapy.error import Scapy_Exception

    try:
        compile_filter(expression, iface="lo")
    except (Scapy_Exception, OSError) as error:
        raise CaptureError(f"capture filter rejected: {error}: {expression}") from None


def open_socket(interface: str, expression: str) -> socket.socket:
    """A non-blocking AF_PACKET socket on ``interface`` with ``expression`` attached and
    locked (OSError or CaptureError when the kernel refuses). Whoever gets the socket
    (the packet process) cannot widen what it sees: a new filter needs a new socket."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        # Filter before bind: no unfiltered packet is ever queued on the socket.
        _attach(sock, expression, interface)
        sock.setsockopt(socket.SOL_SOCKET, SO_LOCK_FILTER, 1)
        sock.bind((interface, ETH_P_ALL))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


Opener = Callable[[str, str], socket.socket]


class InterfaceReader:
    """One interface's socket, read by the loop; opened and closed by :class:`Sniffer`."""

    def __init__(
        self,
        interface: str,
        expression: str,
        clock: Callable[[], float] = time.time,
        index: int = 0,
        opener: Opener = open_socket,
    ) -> None:
        self.interface = interface
        self.index = index  # the kernel's index of the link it was opened on
        self.expression = expression
        self.clock = clock
        self.opener = opener
        self.sock: socket.socket | None = None
        self.frames = 0
        self.undecoded = 0
        # Decoded frames the host's stack would drop, by reason (checksum.REASONS).
        self.rejected = dict.fromkeys(REASONS, 0)
        self._dropped = 0  # frames the kernel dropped because the socket's buffer was full
        self._buffer = bytearray(SNAPLEN)
        self._view = memoryview(self._buffer)
        self._buffers = [self._buffer]

    def open(self) -> None:
        """Open the socket (OSError or CaptureError when the kernel refuses)."""
        if self.sock is None:
            self.sock = self.opener(self.interface, self.expression)

    def close(self) -> None:
        if self.sock is not None:
            self.dropped  # noqa: B018 (collect the socket's last drop count)
            self.sock.close()
            self.sock = None

    @property
    def dropped(self) -> int:
        """Frames the kernel dropped for this interface since it was opened (all openings)."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                stats = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
                self._dropped += struct.unpack("II", stats)[1]
        return self._dropped

    def set_filter(self, expression: str) -> None:
        """A new socket with ``expression`` in place of the open one (its filter is locked)."""
        self.expression = expression
        if self.sock is not None:
            self.close()
            self.open()

    def read(self) -> list[Packet]:
        """Every frame waiting (up to BATCH), decoded, without those the host's stack
        would drop; OSError when the interface failed."""
        sock = self.sock
        assert sock is not None
        packets: list[Packet] = []
        buffers, view, now = self._buffers, self._view, self.clock()
        receive = sock.recvmsg_into
        for _ in range(BATCH):
            try:
                size, ancillary, _flags, address = receive(buffers, ANCILLARY_SPACE)
            except BlockingIOError:
                break
            pkttype = address[2]
            if pkttype == PACKET_OUTGOING:
                continue
            self.frames += 1
            frame = bytes(view[:size])
            packet = decode_ethernet(frame, now)
            if packet is None:
                self.undecoded += 1
                continue
            # Without auxiliary data (never on Linux >= 2.6.27) every checksum is
            # verified in software and the captured size stands for the real one.
            status, length = _AUXDATA_HEAD(ancillary[0][2]) if ancillary else (0, size)
            reason = drop_reason(frame, length, status, pkttype, address[3] == ARPHRD_LOOPBACK)
            if reason is None:
                packets.append(packet)
            else:
                self._reject(reason, packet)
        return packets

    def _reject(self, reason: str, packet: Packet) -> None:
        count = self.rejected[reason]
        self.rejected[reason] = count + 1
        if count == 0:  # once per reason and interface; then only the counter moves
            log.info(
                "%s: ignored %s -> %s %s/%s: %s; the host's stack drops it "
                "(further ones are only counted as %s)",
                self.interface,
                packet.src,
                packet.dst,
                packet.dport,
                packet.proto,
                _WHY[reason],
                reason,
            )


class Sniffer:
    """The capture sockets, following the host's links (:meth:`follow`).

    ``interfaces``: the names to capture (``settings.interfaces``); empty means every
    link but ``lo``. A named interface that does not exist yet, or is down, is waited
    for; with no names, a link that appears is captured as soon as it is up. Links
    that are down are waited for in silence: no socket, no timer, no log line until
    netlink says they changed. The filter can be replaced while running.

    Log lines tell changes only: ``eth0: capturing``, ``eth0: down; ...``, ``eth0: gone``,
    and once when a socket fails.
    """

    def __init__(
        self,
        interfaces: Sequence[str],
        expression: str,
        clock: Callable[[], float] = time.time,
        opener: Opener = open_socket,
    ) -> None:
        check_filter(expression)
        self.named = tuple(interfaces)
        self.expression = expression
        self.clock = clock
        self.opener = opener
        self.readers: list[InterfaceReader] = []  # one per link captured (or failing)
        self.reopen_at: float | None = None  # one re-open attempt after a failed socket
        self.version = 0  # moves whenever a reader or its socket may have changed
        self._links: dict[str, Link] = {}
        self._said: dict[str, str] = {}  # what was last logged per interface (changes only)
        self._retired = InterfaceReader("", expression)  # counters of readers removed

    def wants(self, name: str) -> bool:
        return name in self.named if self.named else name != "lo"

    def want(self, interfaces: Sequence[str], links: Sequence[Link]) -> None:
        """Capture these interfaces from now on (a reload changed ``interfaces``)."""
        if tuple(interfaces) != self.named:
            self.named = tuple(interfaces)
            self._said = {name: said for name, said in self._said.items() if self.wants(name)}
            self.follow(links)

    def follow(self, links: Sequence[Link]) -> None:
        """Capture exactly the wanted links that are up: open what is new or came up,
        close what is down or gone (or came back under another index)."""
        self.version += 1
        self._links = {link.name: link for link in links}
        kept: list[InterfaceReader] = []
        for reader in self.readers:
            link = self._links.get(reader.interface)
            if link is not None and link.up and link.index == reader.index:
                if self.wants(link.name):
                    kept.append(reader)
                    continue
                self._said.pop(link.name, None)
                log.info("%s: no longer captured (not in interfaces)", link.name)
            self._retire(reader)
        self.readers = kept
        current = {reader.interface for reader in kept}
        for link in links:
            if link.up and link.name not in current and self.wants(link.name):
                reader = InterfaceReader(
                    link.name, self.expression, self.clock, link.index, self.opener
                )
                self.readers.append(reader)
        self._open_closed()
        self._tell()

    def failed(self, reader: InterfaceReader, error: OSError) -> None:
        """A read on ``reader`` failed.

        ENETDOWN is the kernel telling once that the link went down (or away): the
        socket is kept, as it resumes by itself when the link comes back up, and
        netlink says whether it did. Any other error closes the socket; it is opened
        again once after REOPEN_SECONDS, or on the next change of the host.
        """
        if error.errno == errno.ENETDOWN:
            return
        self.version += 1
        reader.close()
        self._say(reader.interface, "failed", f"capture error ({_why(error)}); opening it again")
        self.reopen_at = self.clock() + REOPEN_SECONDS

    def reopen(self) -> None:
        """The one re-open attempt after a failure (the loop calls it at ``reopen_at``)."""
        self.reopen_at = None
        self.version += 1
        self._open_closed()
        self._tell()

    def _open_closed(self) -> None:
        for reader in self.readers:
            if reader.sock is None:
                try:
                    reader.open()
                except (OSError, CaptureError) as error:
                    self._say(
                        reader.interface,
                        "failed",
                        f"cannot capture ({_why(error)}); trying again when its link changes",
                    )

    def _retire(self, reader: InterfaceReader) -> None:
        reader.close()
        retired = self._retired
        retired.frames += reader.frames
        retired.undecoded += reader.undecoded
        retired._dropped += reader.dropped
        for reason, count in reader.rejected.items():
            retired.rejected[reason] += count

    def _tell(self) -> None:
        """Log what changed since the last call, once per interface and change. A link
        never captured and not named in ``interfaces`` is not talked about."""
        for reader in self.readers:
            if reader.sock is not None:
                self._say(reader.interface, "capturing", "capturing")
        captured = {reader.interface for reader in self.readers}
        for name in sorted((set(self._said) | set(self.named)) - captured):
            link = self._links.get(name)
            known = name in self._said
            if link is None:
                self._say(name, "gone", "gone" if known else NOT_PRESENT)
                if name not in self.named:
                    del self._said[name]  # forgotten: it may come back as a new link
            elif not link.up:
                self._say(name, "down", DOWN if known else DOWN_AT_FIRST)

    def _say(self, name: str, state: str, text: str) -> None:
        if self._said.get(name) == state:
            return
        self._said[name] = state
        level = logging.WARNING if state == "failed" else logging.INFO
        log.log(level, "%s: %s", name, text)

    @property
    def capturing(self) -> list[str]:
        """The interfaces with an open socket, in the order they were opened."""
        return [reader.interface for reader in self.readers if reader.sock is not None]

    def set_filter(self, expression: str) -> None:
        """Replace the open sockets by new ones with ``expression`` (their filter is locked);
        a socket that cannot be opened again is logged and tried on the next change."""
        check_filter(expression)
        if expression == self.expression:
            return
        self.expression = expression
        self.version += 1
        for reader in self.readers:
            reader.expression = expression
            try:
                reader.set_filter(expression)
            except (OSError, CaptureError) as error:
                self._say(reader.interface, "failed", f"cannot capture ({_why(error)})")

    def close(self) -> None:
        self.version += 1
        for reader in self.readers:
            reader.close()

    @property
    def frames(self) -> int:
        return sum(reader.frames for reader in self.readers) + self._retired.frames

    @property
    def dropped(self) -> int:
        return sum(reader.dropped for reader in self.readers) + self._retired.dropped

    @property
    def rejected(self) -> dict[str, int]:
        """Decoded frames the host's stack would drop, by reason, summed over the
        interfaces (those no longer captured included): every name of
        :data:`~appliance.capture.checksum.REASONS`, always."""
        total = dict(self._retired.rejected)
        for reader in self.readers:
            for reason, count in reader.rejected.items():
                total[reason] += count
        return total
