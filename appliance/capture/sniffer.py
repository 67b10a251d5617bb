"""Live capture: AF_PACKET sockets with a kernel BPF filter, one thread per interface.

scapy compiles the pcap filter (through libpcap) and attaches it to our own
AF_PACKET socket; after that, no scapy code runs per packet: frames are read
with ``recvfrom_into`` and decoded with :mod:`appliance.capture.decode`. A
thread only hands decoded packets to ``deliver`` (the daemon's queue).

An interface that goes down or disappears is waited for and re-opened; the
daemon keeps running (knockd exits).
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence

from appliance.capture.decode import decode_ethernet
from appliance.core.events import Packet
from appliance.errors import KnockgateError

log = logging.getLogger("knockgate.capture")

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SNAPLEN = 256  # headers only: Ethernet + VLAN + IPv6 with extension headers + TCP
RETRY_SECONDS = 0.5
POLL_SECONDS = 0.25


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
    """Reads one interface until stopped; re-opens it after it goes away."""

    def __init__(
        self,
        interface: str,
        expression: str,
        deliver: Callable[[Packet], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.interface = interface
        self.expression = expression
        self.deliver = deliver
        self.clock = clock
        self.stopping = threading.Event()
        self.sock: socket.socket | None = None
        self.frames = 0
        self.undecoded = 0
        self.reopened = 0
        self.thread = threading.Thread(target=self._run, name=f"capture-{interface}", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)

    def set_filter(self, expression: str) -> None:
        with self._lock:
            self.expression = expression
            if self.sock is not None:
                _attach(self.sock, expression, self.interface)

    def _open(self) -> socket.socket:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            # Filter before bind: no unfiltered packet is ever queued on the socket.
            _attach(sock, self.expression, self.interface)
            sock.bind((self.interface, ETH_P_ALL))
            sock.settimeout(POLL_SECONDS)
        except BaseException:
            sock.close()
            raise
        return sock

    def _run(self) -> None:
        waiting_logged = False
        while not self.stopping.is_set():
            try:
                with self._lock:
                    self.sock = self._open()
            except OSError as error:
                if not waiting_logged:
                    log.warning("%s: cannot capture (%s); waiting for it", self.interface, error)
                    waiting_logged = True
                self.stopping.wait(RETRY_SECONDS)
                continue
            except CaptureError as error:
                log.error("%s", error)
                self.stopping.wait(RETRY_SECONDS * 4)
                continue
            if waiting_logged:
                log.warning("%s: capturing again", self.interface)
                self.reopened += 1
            waiting_logged = False
            log.info("%s: capturing", self.interface)
            try:
                self._read(self.sock)
            except OSError as error:
                if error.errno not in (errno.ENETDOWN, errno.ENXIO, errno.ENODEV, errno.EBADF):
                    log.warning("%s: capture error: %s", self.interface, error)
                else:
                    log.warning(
                        "%s: interface went away (%s); waiting for it",
                        self.interface,
                        error.strerror,
                    )
                waiting_logged = True
            finally:
                with self._lock:
                    sock, self.sock = self.sock, None
                if sock is not None:
                    sock.close()

    def _read(self, sock: socket.socket) -> None:
        buffer = bytearray(SNAPLEN)
        view = memoryview(buffer)
        deliver = self.deliver
        clock = self.clock
        stopping = self.stopping
        while not stopping.is_set():
            try:
                size, address = sock.recvfrom_into(buffer, SNAPLEN)
            except TimeoutError:
                continue
            if address[2] == PACKET_OUTGOING:
                continue
            self.frames += 1
            packet = decode_ethernet(bytes(view[:size]), clock())
            if packet is None:
                self.undecoded += 1
            else:
                deliver(packet)


class Sniffer:
    """All configured interfaces; the filter can be replaced while running."""

    def __init__(
        self, interfaces: Sequence[str], expression: str, deliver: Callable[[Packet], None]
    ) -> None:
        check_filter(expression)
        self.readers = [InterfaceReader(name, expression, deliver) for name in interfaces]

    def start(self) -> None:
        for reader in self.readers:
            reader.start()

    def set_filter(self, expression: str) -> None:
        check_filter(expression)
        for reader in self.readers:
            try:
                reader.set_filter(expression)
            except CaptureError as error:
                log.error("%s", error)

    def stop(self) -> None:
        for reader in self.readers:
            reader.stopping.set()
        for reader in self.readers:
            reader.stop()

    @property
    def frames(self) -> int:
        return sum(reader.frames for reader in self.readers)


def default_interfaces() -> list[str]:
    """Every interface but loopback, as the kernel lists them now."""
    return [name for _, name in socket.if_nameindex() if name != "lo"]
