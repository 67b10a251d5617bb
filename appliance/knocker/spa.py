"""The SPA client: which addresses to ask for, one packet per address, and receipts.

Dual stack on the wire: one standard fwknop packet per address to let in, each sealed
and authenticated on its own (its own random value, timestamp and digest), all sent to
the server's SPA port over the family the server was reached by. A stock fwknopd reads
each of them as the ordinary request it is (nothing new on the wire), the replay cache
and the server's policy (``sources``) see each address on its own, and each packet
gets its own receipt, bound to its own digest. The cost is a second packet.

Addresses (:func:`allow_addresses`): the ones given (``--allow-ip``, repeated; ``source``
is fwknop's ``-s``, 0.0.0.0; ``resolve`` is the address the packet leaves from, no
outside service is asked), else the address the packet leaves from; with ``dual_stack``,
the client's own address in each family, found as the kernel would choose it: a UDP
socket connected toward the server's address of that family (nothing is sent), read
back with ``getsockname``. The server's other-family address comes from resolving the
host name; a family without an address or a route is reported and left out.

Receipts (:func:`wait_receipts`): each packet leaves from a connected UDP socket of its
own, kept open for a moment; the kernel passes up only datagrams from the server's
SPA port on the address the packet went to, and a datagram counts only when it opens
under the user's keys for that packet's digest (:mod:`appliance.spa.receipt`).
"""

from __future__ import annotations

import getpass
import selectors
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from appliance.errors import KnockError
from appliance.spa.keyfile import ClientProfile
from appliance.spa.receipt import Receipt, ReceiptError, open_receipt, receipt_key
from appliance.spa.wire import SpaError, SpaKeys, new_message, parse_access, replay_digest, seal

DEFAULT_RECEIPT_TIMEOUT = 2.0
_FAMILIES = (socket.AF_INET, socket.AF_INET6)
Warn = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class SpaRequest:
    """What one knock asks for, as ``knockgate spa``/``connect`` build it."""

    profile: ClientProfile
    port: int  # the server's SPA port (UDP)
    access: str  # "tcp/22,udp/53"
    allow_ip: str | None = None  # None: the address the packet leaves from
    source: bool = False  # fwknop -s: "the address the packet comes from" (0.0.0.0)
    fw_timeout: int | None = None
    username: str | None = None
    allow_ips: tuple[str, ...] = ()  # --allow-ip, repeated (wins over allow_ip)
    dual_stack: bool = False  # also the client's address of the other family
    host: str = ""  # the server's name, to find its address of the other family


@dataclass(slots=True)
class SpaSent:
    """One packet sent: its size, where it left from, what it asked for, its digest,
    and (when a receipt is awaited) the connected socket it left from."""

    size: int
    sent_from: str
    allow: str
    digest: bytes
    sock: socket.socket | None = field(default=None, repr=False)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def local_address(family: int, address: str, port: int) -> str:
    """The source address the kernel picks to reach ``address`` (nothing is sent)."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((address, port))
            return str(sock.getsockname()[0])
    except OSError as error:
        raise KnockError(f"no route to {address}: {_reason(error)}") from None


def own_addresses(
    family: int, address: str, host: str, port: int, warn: Warn | None = None
) -> list[str]:
    """The client's own address in each family toward the server: first the one of
    ``family`` (toward ``address``), then the other (toward ``host``'s address of that
    family); a family without an address or a route is left out, with a ``warn``."""
    found = [local_address(family, address, port)]
    other = socket.AF_INET6 if family == socket.AF_INET else socket.AF_INET
    name = "IPv6" if other == socket.AF_INET6 else "IPv4"
    try:
        answers = socket.getaddrinfo(host or address, port, other, socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        answers = []
    for _, _, _, _, sockaddr in answers:
        try:
            found.append(local_address(other, str(sockaddr[0]), port))
            break
        except KnockError:
            continue
    else:
        if warn is not None:
            warn(
                f"--dual-stack: {host or address} has no {name} address this host can "
                f"reach; only {found[0]} is asked for (name the other with --allow-ip)"
            )
    return found


def allow_addresses(
    family: int, address: str, request: SpaRequest, warn: Warn | None = None
) -> list[str]:
    """The addresses to let in, one SPA packet each (see the module docstring)."""
    given = list(request.allow_ips) or ([request.allow_ip] if request.allow_ip else [])
    if request.dual_stack and (request.source or request.allow_ips):
        raise KnockError(
            "--dual-stack finds the client's addresses itself: give either it or "
            "--allow-ip (repeated) / --source"
        )
    if request.dual_stack:  # wins over a key file's ALLOW_IP
        return own_addresses(family, address, request.host, request.port, warn)
    if request.source or any(a.lower() == "source" for a in given):
        if len(given) > 1:
            raise KnockError("--source (0.0.0.0) asks for one address: the sender's")
        return ["0.0.0.0"]
    allows: list[str] = []
    for text in given or ["resolve"]:
        resolve = text.lower() == "resolve"  # the address we leave from; nobody is asked
        allow = local_address(family, address, request.port) if resolve else text
        if allow not in allows:
            allows.append(allow)
    return allows


def send_spa(
    family: int,
    address: str,
    request: SpaRequest,
    now: float,
    *,
    keep: bool = False,
    warn: Warn | None = None,
) -> list[SpaSent]:
    """Build and send one SPA packet per address to let in; with ``keep`` each one's
    socket stays open for its receipt (the caller closes them: :func:`wait_receipts`)."""
    username = request.username or getpass.getuser()
    packets: list[tuple[str, bytes]] = []
    for allow in allow_addresses(family, address, request, warn):
        try:
            access = f"{allow},{request.access}"
            parse_access(access)
            message = new_message(username, int(now), access, request.fw_timeout)
            packets.append((allow, seal(message, request.profile.keys)))
        except (ValueError, SpaError) as error:
            raise KnockError(f"cannot build the SPA packet for {allow}: {error}") from None
    sent: list[SpaSent] = []
    try:
        for allow, packet in packets:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            one = SpaSent(len(packet), "", allow, replay_digest(packet), sock)
            sent.append(one)
            sock.connect((address, request.port))
            one.sent_from = str(sock.getsockname()[0])
            sock.send(packet)
            if not keep:
                one.close()
    except OSError as error:
        for one in sent:
            one.close()
        raise KnockError(
            f"cannot send to {address} port {request.port}/udp: {_reason(error)}"
        ) from None
    return sent


def wait_receipts(
    sent: Sequence[SpaSent],
    keys: SpaKeys,
    timeout: float,
    clock: Callable[[], float] = time.monotonic,
) -> list[Receipt | None]:
    """Each packet's receipt (``None``: none came within ``timeout`` seconds). Datagrams
    that do not open for the packet they answer are ignored. Closes the sockets."""
    key = receipt_key(keys)
    found: list[Receipt | None] = [None] * len(sent)
    selector = selectors.DefaultSelector()
    try:
        for index, one in enumerate(sent):
            if one.sock is not None:
                one.sock.setblocking(False)
                selector.register(one.sock, selectors.EVENT_READ, index)
        deadline = clock() + timeout
        while selector.get_map() and (left := deadline - clock()) > 0:
            for selected, _ in selector.select(left):
                index = selected.data
                sock = sent[index].sock
                assert sock is not None
                try:
                    data = sock.recv(2048)
                except OSError:  # ECONNREFUSED (an ICMP error), a spurious wake-up
                    continue
                try:
                    found[index] = open_receipt(data, key, sent[index].digest)
                except ReceiptError:
                    continue
                selector.unregister(sock)
    finally:
        selector.close()
        for one in sent:
            one.close()
    return found


def describe(receipt: Receipt) -> str:
    """``198.18.1.2 let in until 12:03:04 (30 s), service ready`` (local time)."""
    until = time.strftime("%H:%M:%S", time.localtime(receipt.deadline))
    return f"{receipt.address} let in until {until} ({receipt.seconds} s), service {receipt.state}"
