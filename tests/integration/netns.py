"""Throwaway network topologies for integration tests and benchmarks.

A :class:`Topology` is a Linux bridge ``br0`` in a network namespace of its own,
with one namespace per host attached to it by a veth pair::

    <id>s  server    eth0 --+
    <id>c  client    eth0 --+--  <id>b: br0, ports vserver, vclient, vother, vattacker
    <id>o  other     eth0 --+
    <id>a  attacker  eth0 --+

Nothing is created in, routed through or filtered by the root namespace: each
veth end is created directly in its namespace, so a running Docker (FORWARD
policy DROP, ``bridge-nf-call-iptables=1`` in the root namespace) does not matter.

Every host has an untagged network on ``eth0`` and, with ``vlan=True``, a VLAN 100
interface ``eth0.100``; the bridge does no VLAN filtering, so tagged frames cross
it as they are. ``<net>`` (1..250) differs between the topologies of one process,
``<n>`` is the host's position in ``hosts`` plus one::

    eth0      198.18.<net>.<n>/24   2001:2:0:<net>::<n>/64        MAC 02:6b:67:00:<net:x>:<n:x>
    eth0.100  198.19.<net>.<n>/24   2001:2:0:1<net:03>::<n>/64    same MAC (as a kernel VLAN has)

all inside the benchmarking ranges 198.18.0.0/15 and 2001:2::/48 (``<net>`` and
``<n>`` are written in decimal, also inside the IPv6 groups; in hex in the MAC). IPv6
addresses are added with ``nodad`` (usable at once) and ``keep_addr_on_down`` is
set, so that :meth:`Topology.set_link` flaps keep them.

``eth0.100`` is a kernel 802.1Q device where the kernel has one (``vlan_mode ==
"kernel"``). Kernels built without ``CONFIG_VLAN_8021Q`` (the project's VM kernel,
which cannot load modules) get an equivalent in user space (``vlan_mode ==
"tap"``): a TAP device named ``eth0.100`` and a small helper process per host
that tags what the host sends on it and puts it on ``eth0``, and hands the VLAN
100 frames arriving on ``eth0`` to it untagged. Either way the wire (the bridge
ports) carries 802.1Q-tagged frames, ``eth0`` sees them tagged, ``eth0.100``
untagged. The user-space path adds some latency and is no fast path for
benchmarks on the VLAN.

Namespace names are ``kg<pid>t<n>`` plus ``b`` (bridge) or the host's letter
(``s``, ``c``, ``o``, ``a``; numbered hosts such as ``client2`` get ``c2``), so
parallel runs never collide and :func:`cleanup_stale` can tell what a crashed
run left behind. Needs root and iproute2 (:func:`ensure_root_tools`). No pytest
here: benchmark scripts import it too::

    with Topology() as topo:
        server = topo.host("server")
        topo.run("client", ["ping", "-c", "1", "-W", "1", server.ipv4])
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import re
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "DEFAULT_HOSTS",
    "NETNS_DIR",
    "VLAN_ID",
    "Host",
    "NetnsCommandError",
    "Topology",
    "cleanup_stale",
    "ensure_root_tools",
    "list_namespaces",
]

NETNS_DIR = Path("/run/netns")  # where `ip netns add` pins named namespaces
PREFIX = "kg"
DEFAULT_HOSTS = ("server", "client", "other", "attacker")
BRIDGE = "br0"
BRIDGE_HOST = "bridge"  # run() and popen() take it for the bridge's namespace
IFNAME = "eth0"
VLAN_ID = 100
TERM_GRACE = 3.0  # seconds between SIGTERM and SIGKILL when tearing down
HELPER_START = 10.0  # seconds the user-space VLAN helpers may take to start

_LETTERS = {"server": "s", "client": "c", "other": "o", "attacker": "a"}
_HOST_NAME = re.compile(r"(server|client|other|attacker)([1-9][0-9]?)?")
_counter = itertools.count(1)
_kernel_vlan: bool | None = None  # probed once per process

# Host namespaces: IPv6 on, no DAD anywhere (link-local addresses included), and
# addresses kept across link down/up. The bridge namespace needs no IP at all; its
# IPv6 is off so that captures on the bridge ports hold only the hosts' traffic.
_HOST_SYSCTLS = {
    "net.ipv6.conf.all.disable_ipv6": "0",
    "net.ipv6.conf.default.disable_ipv6": "0",
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv6.conf.all.keep_addr_on_down": "1",
    "net.ipv6.conf.default.keep_addr_on_down": "1",
}
_BRIDGE_SYSCTLS = {
    "net.ipv6.conf.all.disable_ipv6": "1",
    "net.ipv6.conf.default.disable_ipv6": "1",
}
# Present only where br_netfilter is built in or loaded. They start at 1 in every
# new namespace, which would send bridged frames through that namespace's iptables.
_BRIDGE_OPTIONAL_SYSCTLS = {
    "net.bridge.bridge-nf-call-iptables": "0",
    "net.bridge.bridge-nf-call-ip6tables": "0",
    "net.bridge.bridge-nf-call-arptables": "0",
}


@dataclass(frozen=True)
class Host:
    """One host of a topology, as seen from inside its namespace."""

    name: str  # logical name: "server", "client", "other", "attacker"
    netns: str  # the namespace name, e.g. "kg1234t1s"
    ifname: str  # its interface towards the bridge: "eth0"
    ipv4: str  # 198.18.<net>.<n>
    ipv6: str  # 2001:2:0:<net>::<n>
    vlan_ifname: str  # "eth0.100" ("" without VLAN, and so are the two below)
    vlan_ipv4: str  # 198.19.<net>.<n>
    vlan_ipv6: str  # 2001:2:0:1<net:03>::<n>
    mac: str  # of eth0 and eth0.100: 02:6b:67:00:<net:02x>:<n:02x>
    bridge_port: str  # the other end of its veth, in the bridge namespace: "v<name>"


class NetnsCommandError(subprocess.CalledProcessError):
    """A command failed; unlike its base class, ``str()`` shows its output."""

    def __str__(self) -> str:
        argv = self.cmd if isinstance(self.cmd, str) else shlex.join(map(str, self.cmd))
        return (
            f"command failed with exit status {self.returncode}: {argv}\n"
            f"--- stdout ---\n{_text(self.stdout)}\n--- stderr ---\n{_text(self.stderr)}"
        )


def _text(data: object) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode(errors="replace").rstrip()
    return str(data).rstrip()


def ensure_root_tools(vlan: bool = True) -> list[str]:
    """What is missing to build a topology here; an empty list when nothing is.

    Each entry reads as a reason (``"needs root ..."``), for a test's ``require``.
    ``vlan``: also what a topology with VLAN needs (``/dev/net/tun`` for the
    user-space VLAN where the kernel has no 802.1Q).
    """
    missing = []
    if os.geteuid() != 0:
        missing.append("needs root (network namespaces)")
    if shutil.which("ip") is None:
        missing.append("needs iproute2's `ip`")
    if shutil.which("sysctl") is None:
        missing.append("needs procps' `sysctl`")
    if not os.path.exists("/proc/self/ns/net"):
        missing.append("kernel without network namespaces")
    if vlan and not os.path.exists("/dev/net/tun") and not os.path.exists("/proc/net/vlan"):
        missing.append("kernel with neither 802.1Q VLANs nor /dev/net/tun")
    return missing


def list_namespaces() -> list[str]:
    """Names of the named network namespaces (what ``ip netns list`` shows)."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _stale_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"{re.escape(prefix)}(\d+)t(\d+)(?:b|[scoa](?:[1-9][0-9]?)?)")


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Delete the namespaces that crashed runs of this module left behind.

    Touches only names ``<prefix><pid>t<n>`` + ``b``/``s``/``c``/``o``/``a`` (or a
    numbered host letter such as ``c2``) whose pid is not a running process (in
    this process's pid namespace); processes still inside them are killed first.
    Returns the names deleted.
    """
    pattern = _stale_pattern(prefix)
    stale = []
    for name in list_namespaces():
        match = pattern.fullmatch(name)
        if match and not pid_alive(int(match[1])):
            stale.append(name)
    if not stale:
        return []
    _kill_all(_pids_in(stale), grace=0.5)
    _delete_namespaces(stale)
    return [name for name in stale if not (NETNS_DIR / name).exists()]


def _ns_inode(name: str) -> tuple[int, int] | None:
    try:
        st = os.stat(NETNS_DIR / name)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _pids_in(namespaces: Iterable[str]) -> set[int]:
    """Processes in any of ``namespaces`` (what ``ip netns pids`` finds)."""
    wanted = {inode for inode in map(_ns_inode, namespaces) if inode is not None}
    if not wanted:
        return set()
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:  # gone, a zombie, or not ours to see
            continue
        if (st.st_dev, st.st_ino) in wanted:
            pids.add(int(entry))
    pids.discard(os.getpid())
    return pids


def _signal_pid(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie that is not our child is someone else's to reap)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _kill_all(pids: Iterable[int], grace: float) -> None:
    """SIGTERM ``pids``, then SIGKILL those still running after ``grace`` seconds."""
    pending = set(pids)
    for pid in pending:
        _signal_pid(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pending and time.monotonic() < deadline:
        time.sleep(0.02)
        pending = {pid for pid in pending if _running(pid)}
    for pid in pending:
        _signal_pid(pid, signal.SIGKILL)


def _delete_namespaces(names: Iterable[str]) -> list[str]:
    """``ip netns del`` each of ``names`` that exists; returns error messages."""
    errors = []
    for name in names:
        if not (NETNS_DIR / name).exists():
            continue
        proc = subprocess.run(
            ["ip", "netns", "del", name], capture_output=True, text=True, check=False, timeout=30
        )
        if proc.returncode != 0 and (NETNS_DIR / name).exists():
            errors.append(f"ip netns del {name}: {proc.stderr.strip()}")
    return errors


def _ip(args: Sequence[str], batch: Sequence[str] | None = None) -> None:
    """Run ``ip args`` (with ``batch`` lines on its stdin); raise NetnsCommandError if it fails."""
    argv = ["ip", *args]
    stdin = None if batch is None else "".join(f"{line}\n" for line in batch)
    proc = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, check=False, timeout=30
    )
    if proc.returncode != 0:
        shown = argv if batch is None else [*argv, "<<", *batch]
        raise NetnsCommandError(proc.returncode, shown, proc.stdout, proc.stderr)


def _sysctl(netns: str, values: dict[str, str], *, ignore_missing: bool = False) -> None:
    argv = ["ip", "netns", "exec", netns, "sysctl", "-q", *(["-e"] if ignore_missing else []), "-w"]
    argv += [f"{key}={value}" for key, value in values.items()]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if proc.returncode != 0:
        raise NetnsCommandError(proc.returncode, argv, proc.stdout, proc.stderr)


def _probe_kernel_vlan(netns: str) -> bool:
    """Whether the kernel makes 802.1Q devices (tried once per process, on ``br0``)."""
    global _kernel_vlan
    if _kernel_vlan is None:
        proc = subprocess.run(
            ["ip", "-n", netns, "-batch", "-"],
            input=f"link add link {BRIDGE} name kgvlanprobe type vlan id {VLAN_ID}\n"
            "link del kgvlanprobe\n",
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        _kernel_vlan = proc.returncode == 0
    return _kernel_vlan


class Topology:
    """A bridge in its own namespace with hosts attached by veth pairs.

    A context manager, to be entered once: ``__enter__`` builds everything (and on
    any failure removes what it built and re-raises); ``__exit__`` stops what
    :meth:`popen` started and any other process left in its namespaces (SIGTERM,
    SIGKILL after 3 s), then deletes every namespace it created, also when the
    with-block raised.

    ``hosts`` are ``server``, ``client``, ``other``, ``attacker``, each optionally
    numbered 1..99 (``client2``). ``run``/``popen`` also take ``"bridge"`` for the
    bridge's namespace.
    """

    def __init__(self, hosts: Sequence[str] = DEFAULT_HOSTS, vlan: bool = True) -> None:
        names = list(hosts)
        if isinstance(hosts, str) or not names:
            raise ValueError("hosts must be a non-empty sequence of host names")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate host names in {names!r}")
        if len(names) > 250:
            raise ValueError("at most 250 hosts")
        for name in names:
            if not _HOST_NAME.fullmatch(name):
                raise ValueError(
                    f"host name {name!r}: must be server, client, other or attacker, "
                    "optionally numbered 1..99 (e.g. client2)"
                )
        self.vlan = vlan
        self.vlan_mode = ""  # "kernel" or "tap" once built with vlan=True
        self.id, self.net = self._allocate()
        self.bridge_netns = f"{self.id}b"
        self._hosts = {name: self._describe(name, i + 1) for i, name in enumerate(names)}
        self._procs: list[tuple[subprocess.Popen[str], bool]] = []
        self._helpers: list[subprocess.Popen[str]] = []
        self._created: list[str] = []
        self._state = "new"  # new -> up -> closed

    # -- names ----------------------------------------------------------------

    @staticmethod
    def _allocate() -> tuple[str, int]:
        """An id none of whose namespace names exist yet, and a network number."""
        pid = os.getpid()
        pattern = _stale_pattern(PREFIX)
        taken = set()
        for name in list_namespaces():
            match = pattern.fullmatch(name)
            if match and int(match[1]) == pid:
                taken.add(int(match[2]))
        while True:
            n = next(_counter)
            if n not in taken:
                return f"{PREFIX}{pid}t{n}", (pid + n) % 250 + 1

    def _describe(self, name: str, n: int) -> Host:
        match = _HOST_NAME.fullmatch(name)
        assert match is not None
        letter = _LETTERS[match[1]] + (match[2] or "")
        net, vlan = self.net, self.vlan
        return Host(
            name=name,
            netns=f"{self.id}{letter}",
            ifname=IFNAME,
            ipv4=f"198.18.{net}.{n}",
            ipv6=f"2001:2:0:{net}::{n}",
            vlan_ifname=f"{IFNAME}.{VLAN_ID}" if vlan else "",
            vlan_ipv4=f"198.19.{net}.{n}" if vlan else "",
            vlan_ipv6=f"2001:2:0:1{net:03d}::{n}" if vlan else "",
            mac=f"02:6b:67:00:{net:02x}:{n:02x}",
            bridge_port=f"v{name}",
        )

    @property
    def hosts(self) -> tuple[Host, ...]:
        return tuple(self._hosts.values())

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace name of this topology, the bridge's first."""
        return (self.bridge_netns, *(h.netns for h in self._hosts.values()))

    def host(self, name: str) -> Host:
        try:
            return self._hosts[name]
        except KeyError:
            raise KeyError(f"no host {name!r} in this topology: {list(self._hosts)}") from None

    def netns_of(self, host: str) -> str:
        """The namespace of ``host``; ``"bridge"`` is the bridge's namespace."""
        if host == BRIDGE_HOST:
            return self.bridge_netns
        return self.host(host).netns

    # -- building -------------------------------------------------------------

    def __enter__(self) -> Topology:
        if self._state != "new":
            raise RuntimeError("a Topology can be entered only once")
        self._state = "up"
        try:
            self._build()
        except BaseException:
            self._teardown()
            raise
        return self

    def _build(self) -> None:
        # No name of ours existed (see _allocate), so every one listed here is ours
        # to delete, even if the batch stops half-way.
        self._created = list(self.namespaces)
        _ip(["-batch", "-"], [f"netns add {name}" for name in self._created])
        _sysctl(self.bridge_netns, _BRIDGE_SYSCTLS)
        _sysctl(self.bridge_netns, _BRIDGE_OPTIONAL_SYSCTLS, ignore_missing=True)
        for h in self._hosts.values():
            _sysctl(h.netns, _HOST_SYSCTLS)
        # The bridge does no VLAN filtering (the default): tagged frames pass as they
        # are. No STP, so ports forward at once; no multicast snooping (no querier).
        batch = [
            f"link add {BRIDGE} type bridge stp_state 0 mcast_snooping 0",
            f"link set {BRIDGE} up",
        ]
        for h in self._hosts.values():
            batch += [
                f"link add {h.bridge_port} type veth peer name {h.ifname} netns {h.netns}",
                f"link set {h.bridge_port} master {BRIDGE} up",
            ]
        _ip(["-n", self.bridge_netns, "-batch", "-"], batch)
        if self.vlan:
            self.vlan_mode = "kernel" if _probe_kernel_vlan(self.bridge_netns) else "tap"
        for h in self._hosts.values():
            batch = [
                "link set lo up",
                f"link set {h.ifname} address {h.mac}",
                f"addr add {h.ipv4}/24 dev {h.ifname}",
                f"addr add {h.ipv6}/64 dev {h.ifname} nodad",
                f"link set {h.ifname} up",
            ]
            if self.vlan_mode == "kernel":
                batch.append(
                    f"link add link {h.ifname} name {h.vlan_ifname} type vlan id {VLAN_ID}"
                )
            elif self.vlan_mode == "tap":
                batch += [
                    f"tuntap add dev {h.vlan_ifname} mode tap",
                    f"link set {h.vlan_ifname} address {h.mac}",
                ]
            if self.vlan:
                batch += [
                    f"addr add {h.vlan_ipv4}/24 dev {h.vlan_ifname}",
                    f"addr add {h.vlan_ipv6}/64 dev {h.vlan_ifname} nodad",
                    f"link set {h.vlan_ifname} up",
                ]
            _ip(["-n", h.netns, "-batch", "-"], batch)
        if self.vlan_mode == "tap":
            self._start_vlan_helpers()

    def _start_vlan_helpers(self) -> None:
        """One user-space VLAN helper per host (see the module's doc); waits until each
        has attached to its TAP device."""
        script = os.path.abspath(__file__)
        for h in self._hosts.values():
            argv = [sys.executable, "-I", "-S", script, "vlan-tap"]
            argv += [h.ifname, h.vlan_ifname, str(VLAN_ID)]
            proc = subprocess.Popen(
                ["ip", "netns", "exec", h.netns, *argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            self._helpers.append(proc)
        deadline = time.monotonic() + HELPER_START
        for h, proc in zip(self._hosts.values(), self._helpers, strict=True):
            assert proc.stdout is not None
            ready = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = proc.stdout.readline() if ready[0] else ""
            if line.strip() != "ready":
                raise RuntimeError(
                    f"VLAN helper for {h.name} ({h.netns}) did not start: "
                    f"exit status {proc.poll()}, said {line!r}"
                )
            proc.stdout.close()

    # -- tearing down ---------------------------------------------------------

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        errors = self._teardown()
        if errors and exc is None:
            raise RuntimeError(f"teardown of topology {self.id} failed:\n" + "\n".join(errors))

    def close(self) -> None:
        """What leaving the with-block does; harmless when already closed."""
        self.__exit__(None, None, None)

    def _teardown(self) -> list[str]:
        if self._state == "closed":
            return []
        self._state = "closed"
        errors: list[str] = []
        try:
            self._stop_processes()
        except Exception as e:  # keep going: the namespaces must go anyway
            errors.append(f"stopping processes: {e!r}")
        try:
            errors += _delete_namespaces(reversed(self._created))
        except Exception as e:
            errors.append(f"deleting namespaces: {e!r}")
        errors += [f"namespace {n} still exists" for n in self._created if (NETNS_DIR / n).exists()]
        return errors

    def _stop_processes(self) -> None:
        """SIGTERM what popen() started, the VLAN helpers and whatever else runs in our
        namespaces; SIGKILL what still runs TERM_GRACE seconds later."""
        procs = [(p, group) for p, group in self._procs if p.poll() is None]
        procs += [(p, True) for p in self._helpers if p.poll() is None]
        strays = _pids_in(self._created) - {p.pid for p, _ in procs}
        for p, group in procs:
            self._signal(p, group, signal.SIGTERM)
        for pid in strays:
            _signal_pid(pid, signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE
        while True:
            procs = [(p, group) for p, group in procs if p.poll() is None]
            strays = {pid for pid in strays | _pids_in(self._created) if _running(pid)}
            strays -= {p.pid for p, _ in procs}
            if (not procs and not strays) or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        for p, group in procs:
            self._signal(p, group, signal.SIGKILL)
        for pid in strays:
            _signal_pid(pid, signal.SIGKILL)
        for p, _ in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=2)

    @staticmethod
    def _signal(p: subprocess.Popen[str], group: bool, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(p.pid, sig)
            else:
                p.send_signal(sig)

    # -- using it -------------------------------------------------------------

    def _require_up(self) -> None:
        if self._state != "up":
            raise RuntimeError(f"topology {self.id} is {self._state}, not up")

    def run(
        self,
        host: str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``host``'s namespace (``ip netns exec``), in text mode.

        Output is captured unless ``stdout`` or ``stderr`` is given. With ``check``
        a non-zero exit raises :class:`NetnsCommandError` (a ``CalledProcessError``)
        whose message holds the command, its stdout and its stderr; ``timeout``
        raises ``subprocess.TimeoutExpired`` after killing the command.
        """
        self._require_up()
        cmd = ["ip", "netns", "exec", self.netns_of(host), *argv]
        if "stdout" not in kwargs and "stderr" not in kwargs:
            kwargs["capture_output"] = True
        proc: subprocess.CompletedProcess[str] = subprocess.run(
            cmd, text=True, timeout=timeout, check=False, **kwargs
        )
        if check and proc.returncode != 0:
            raise NetnsCommandError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """Start ``argv`` in ``host``'s namespace, in text mode; ``__exit__`` stops it.

        It gets a session (and so a process group) of its own unless
        ``start_new_session=False`` is given, so that teardown reaches its children.
        """
        self._require_up()
        kwargs.setdefault("start_new_session", True)
        group = bool(kwargs["start_new_session"])
        cmd = ["ip", "netns", "exec", self.netns_of(host), *argv]
        proc: subprocess.Popen[str] = subprocess.Popen(cmd, text=True, **kwargs)
        self._procs.append((proc, group))
        return proc

    def set_link(self, host: str, up: bool) -> None:
        """``ip link set eth0 up|down`` inside ``host``.

        Its VLAN interface follows, as a kernel VLAN device does (closed with its
        lower device and opened again with it).
        """
        self._require_up()
        h = self.host(host)
        state = "up" if up else "down"
        batch = [f"link set {h.ifname} {state}"]
        if self.vlan_mode == "tap":
            batch.append(f"link set {h.vlan_ifname} {state}")
        _ip(["-n", h.netns, "-batch", "-"], batch)

    def ping(
        self,
        host: str,
        address: str,
        *,
        count: int = 1,
        wait: float = 1.0,
        interface: str | None = None,
    ) -> bool:
        """Whether any of ``count`` echo requests from ``host`` to ``address`` got an
        answer: ``ping -c count -i 0.2 -W wait``.

        Raises FileNotFoundError without iputils' ``ping`` (rather than answering False).
        """
        if shutil.which("ping") is None:
            raise FileNotFoundError("ping not installed (Debian package iputils-ping)")
        argv = ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", f"{wait:g}"]
        if interface:
            argv += ["-I", interface]
        proc = self.run(host, [*argv, address], check=False, timeout=count * 0.2 + wait + 5)
        return proc.returncode == 0


# -- the user-space VLAN helper (vlan_mode "tap") ----------------------------------

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_SOL_PACKET = 263
_PACKET_AUXDATA = 8
_PACKET_IGNORE_OUTGOING = 23
_TP_STATUS_VLAN_VALID = 0x10
_TP_STATUS_VLAN_TPID_VALID = 0x40
_ETH_P_ALL = 0x0003
_ETH_P_8021Q = 0x8100
_AUXDATA = struct.Struct("=IIIHHHH")  # struct tpacket_auxdata


def _untag(frame: bytes, ancdata: list[tuple[int, int, bytes]], vid: int) -> bytes | None:
    """``frame`` without its tag if it belongs to VLAN ``vid``, else None.

    The kernel moves the tag of a received frame out of the data into the packet
    socket's auxiliary data; a tag still in the data counts as well.
    """
    for level, kind, data in ancdata:
        if level == _SOL_PACKET and kind == _PACKET_AUXDATA and len(data) >= _AUXDATA.size:
            status, _len, _snaplen, _mac, _net, tci, tpid = _AUXDATA.unpack_from(data)
            if status & _TP_STATUS_VLAN_VALID:
                if status & _TP_STATUS_VLAN_TPID_VALID and tpid != _ETH_P_8021Q:
                    return None
                return frame if tci & 0x0FFF == vid else None
    tagged = len(frame) >= 18 and int.from_bytes(frame[12:14], "big") == _ETH_P_8021Q
    if tagged and int.from_bytes(frame[14:16], "big") & 0x0FFF == vid:
        return frame[:12] + frame[16:]
    return None


def _vlan_tap_main(ifname: str, tapname: str, vid: int) -> int:
    """Bridge TAP ``tapname`` to VLAN ``vid`` on ``ifname`` until the parent goes away."""
    tap = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(tap, _TUNSETIFF, struct.pack("16sH22x", tapname.encode(), _IFF_TAP | _IFF_NO_PI))
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
    sock.setsockopt(_SOL_PACKET, _PACKET_AUXDATA, 1)
    with contextlib.suppress(OSError):  # kernel >= 4.20; the pkttype check below otherwise
        sock.setsockopt(_SOL_PACKET, _PACKET_IGNORE_OUTGOING, 1)
    sock.bind((ifname, _ETH_P_ALL))
    tag = struct.pack("!HH", _ETH_P_8021Q, vid)
    ancsize = socket.CMSG_SPACE(_AUXDATA.size)
    parent = os.getppid()
    print("ready", flush=True)
    poller = select.poll()
    poller.register(tap, select.POLLIN)
    poller.register(sock, select.POLLIN)
    while os.getppid() == parent:
        for fd, _events in poller.poll(1000):
            try:
                if fd == tap:
                    frame = os.read(tap, 65536)
                    if len(frame) >= 14:
                        sock.send(frame[:12] + tag + frame[12:])
                else:
                    data, ancdata, _flags, address = sock.recvmsg(65536, ancsize)
                    if address[2] == socket.PACKET_OUTGOING:
                        continue
                    untagged = _untag(data, ancdata, vid)
                    if untagged is not None:
                        os.write(tap, untagged)
            except OSError:  # a link down, a full queue: drop the frame, as a wire would
                continue
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "vlan-tap":
        sys.exit(_vlan_tap_main(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    sys.exit(f"usage: {sys.argv[0]} vlan-tap IFNAME TAPNAME VID")
