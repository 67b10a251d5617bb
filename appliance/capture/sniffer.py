"""Live capture: AF_PACKET sockets with a kernel BPF filter, read by the daemon's loop.

scapy compiles the pcap filter (through libpcap) and attaches it to our own
AF_PACKET socket; after that no scapy code runs per packet: frames are read in
non-blocking batches with ``recvfrom_into`` and decoded with
:mod:`appliance.capture.decode`.

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

from appliance.capture.decode import decode_ethernet
from appliance.core.events import Packet
from appliance.errors import KnockgateError

log = logging.getLogger("knockgate.capture")

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SNAPLEN = 2048  # a whole SPA packet (fwknop caps them at 1500 bytes) with its headers
RECEIVE_BUFFER = 4 << 20
BATCH = 256  # frames read per wake-up at most, so other events are not starved
RETRY_SECONDS = 0.5
SOL_PACKET = 263
PACKET_STATISTICS = 6  # struct tpacket_stats {unsigned tp_packets, tp_drops}; reset on read


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
        self._dropped = 0  # frames the kernel dropped because the socket's buffer was full
        self.retry_at = 0.0
        self._was_open = False
        self._buffer = bytearray(SNAPLEN)
        self._view = memoryview(self._buffer)

    def open(self) -> bool:
        """Try to open the socket; on failure log once and retry after RETRY_SECONDS."""
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
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
        """Every frame waiting (up to BATCH), decoded; OSError when the interface failed."""
        sock = self.sock
        assert sock is not None
        packets: list[Packet] = []
        buffer, view, now = self._buffer, self._view, self.clock()
        for _ in range(BATCH):
            try:
                size, address = sock.recvfrom_into(buffer, SNAPLEN)
            except BlockingIOError:
                break
            if address[2] == PACKET_OUTGOING:
                continue
            self.frames += 1
            packet = decode_ethernet(bytes(view[:size]), now)
            if packet is None:
                self.undecoded += 1
            else:
                packets.append(packet)
        return packets

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


def default_interfaces() -> list[str]:
    """Every interface but loopback, as the kernel lists them now."""
    return [name for _, name in socket.if_nameindex() if name != "lo"]
