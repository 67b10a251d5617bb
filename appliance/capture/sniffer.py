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

An interface that goes down or disappears is closed and re-opened later; the
daemon keeps running (knockd exits).
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
from appliance.core.events import Packet
from appliance.errors import KnockgateError

log = logging.getLogger("knockgate.capture")

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
ARPHRD_LOOPBACK = 772  # sll_hatype of a loopback device
SNAPLEN = 2048  # a whole SPA packet (fwknop caps them at 1500 bytes) with its headers
RECEIVE_BUFFER = 4 << 20
BATCH = 256  # frames read per wake-up at most, so other events are not starved
RETRY_SECONDS = 0.5
SOL_PACKET = 263
PACKET_STATISTICS = 6  # struct tpacket_stats {unsigned tp_packets, tp_drops}; reset on read
PACKET_AUXDATA = 8  # a struct tpacket_auxdata with every frame read by recvmsg
# struct tpacket_auxdata: tp_status, tp_len (the frame's real length), tp_snaplen, tp_mac,
# tp_net, tp_vlan_tci, tp_vlan_tpid; only the first two are read per frame.
AUXDATA_SIZE = 20
_AUXDATA_HEAD = struct.Struct("=II").unpack_from
ANCILLARY_SPACE = socket.CMSG_SPACE(AUXDATA_SIZE)
_WHY = {
    BAD_CHECKSUM: "bad checksum",
    NOT_FOR_HOST: "not addressed to this host",
    FRAGMENT: "a fragment",
    MALFORMED: "malformed or cut short",
    MARTIAN: "impossible (martian) address",
}


class CaptureError(KnockgateError):
    """The capture filter could not be compiled or attached."""


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


class InterfaceReader:
    """One interface's socket; opened, read and re-opened by the loop."""

    def __init__(
        self, interface: str, expression: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.interface = interface
        self.expression = expression
        self.clock = clock
        self.sock: socket.socket | None = None
        self.frames = 0
        self.undecoded = 0
        # Decoded frames the host's stack would drop, by reason (checksum.REASONS).
        self.rejected = dict.fromkeys(REASONS, 0)
        self._dropped = 0  # frames the kernel dropped because the socket's buffer was full
        self.retry_at = 0.0
        self._was_open = False
        self._buffer = bytearray(SNAPLEN)
        self._view = memoryview(self._buffer)
        self._buffers = [self._buffer]

    def open(self) -> bool:
        """Try to open the socket; on failure log once and retry after RETRY_SECONDS."""
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            # Filter before bind: no unfiltered packet is ever queued on the socket.
            _attach(sock, self.expression, self.interface)
            sock.bind((self.interface, ETH_P_ALL))
            sock.setblocking(False)
        except (OSError, CaptureError) as error:
            sock.close()
            if self.retry_at == 0.0 or self._was_open:
                log.warning("%s: cannot capture (%s); waiting for it", self.interface, error)
            self._was_open = False
            self.retry_at = self.clock() + RETRY_SECONDS
            return False
        if self.retry_at:
            log.warning("%s: capturing again", self.interface)
        else:
            log.info("%s: capturing", self.interface)
        self.sock, self._was_open, self.retry_at = sock, True, 0.0
        return True

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
        self.expression = expression
        if self.sock is not None:
            _attach(self.sock, expression, self.interface)

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

    def failed(self, error: OSError) -> None:
        """The socket reported an error: close it and come back for it later."""
        if error.errno in (errno.ENETDOWN, errno.ENXIO, errno.ENODEV, errno.EBADF):
            log.warning(
                "%s: interface went away (%s); waiting for it", self.interface, error.strerror
            )
        else:
            log.warning("%s: capture error: %s", self.interface, error)
        self.close()
        self.retry_at = self.clock() + RETRY_SECONDS


class Sniffer:
    """All configured interfaces; the filter can be replaced while running."""

    def __init__(
        self,
        interfaces: Sequence[str],
        expression: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        check_filter(expression)
        self.readers = [InterfaceReader(name, expression, clock) for name in interfaces]

    def set_filter(self, expression: str) -> None:
        check_filter(expression)
        for reader in self.readers:
            try:
                reader.set_filter(expression)
            except CaptureError as error:
                log.error("%s", error)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()

    @property
    def frames(self) -> int:
        return sum(reader.frames for reader in self.readers)

    @property
    def dropped(self) -> int:
        return sum(reader.dropped for reader in self.readers)

    @property
    def rejected(self) -> dict[str, int]:
        """Decoded frames the host's stack would drop, by reason, summed over the
        interfaces: every name of :data:`~appliance.capture.checksum.REASONS`, always."""
        total = dict.fromkeys(REASONS, 0)
        for reader in self.readers:
            for reason, count in reader.rejected.items():
                total[reason] += count
        return total


def default_interfaces() -> list[str]:
    """Every interface but loopback, as the kernel lists them now."""
    return [name for _, name in socket.if_nameindex() if name != "lo"]
