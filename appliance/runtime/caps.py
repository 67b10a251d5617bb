"""Linux capabilities of this process: read them, keep only some, forbid new ones.

The monitor keeps CAP_NET_ADMIN and CAP_NET_RAW (nftables, conntrack, netlink, new
capture sockets) and gives up every other capability of uid 0: it can no longer change
uid, bypass file permissions or load anything into the kernel. The packet process keeps
none. Both through the kernel's own calls (ctypes ``prctl`` and ``capset``): no library.

Capabilities belong to a thread, not a process: :func:`keep_only` must run before the
process starts any thread, and it checks every thread of the process afterwards.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterable
from pathlib import Path

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
NETWORK = frozenset({CAP_NET_ADMIN, CAP_NET_RAW})

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class CapabilityError(OSError):
    """The kernel refused a capability change (the process must not go on)."""


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        number = ctypes.get_errno()
        raise CapabilityError(number, f"{what}: {os.strerror(number)}")
    return result


def _prctl(option: int, arg: int = 0, what: str = "prctl") -> int:
    value = ctypes.c_ulong
    return _check(_libc.prctl(option, value(arg), value(0), value(0), value(0)), what)


def last_cap() -> int:
    """The highest capability number this kernel knows."""
    return int(Path("/proc/sys/kernel/cap_last_cap").read_text())


def mask(caps: Iterable[int]) -> int:
    bits = 0
    for cap in caps:
        bits |= 1 << cap
    return bits


def status(path: str = "/proc/self/status") -> dict[str, str]:
    """The fields of a ``/proc/PID/status`` (``CapEff``, ``Uid``, ``NoNewPrivs``, ...)."""
    fields: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def capabilities(path: str = "/proc/self/status") -> dict[str, int]:
    """``CapInh``, ``CapPrm``, ``CapEff``, ``CapBnd``, ``CapAmb`` of a task, as masks."""
    fields = status(path)
    names = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
    return {name: int(fields[name], 16) for name in names if name in fields}


def no_new_privs() -> None:
    """No execve of this process or its children can gain privileges (setuid bits,
    file capabilities) from now on."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")


def drop_bounding(keep: frozenset[int]) -> None:
    """Reduce the bounding set to ``keep``: no later execve can gain more (needs
    CAP_SETPCAP; the permitted and effective sets are untouched)."""
    for cap in range(last_cap() + 1):
        if cap not in keep:
            _prctl(PR_CAPBSET_DROP, cap, f"PR_CAPBSET_DROP {cap}")


def keep_only(keep: frozenset[int]) -> None:
    """Reduce this thread's bounding, permitted, effective, inheritable and ambient sets
    to ``keep`` (empty: none), then check every thread of the process (CapabilityError
    when a thread kept more, or the kernel refused)."""
    drop_bounding(keep)
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "PR_CAP_AMBIENT_CLEAR_ALL")
    bits = mask(keep)
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    data[0] = _Data(bits & 0xFFFFFFFF, bits & 0xFFFFFFFF, bits & 0xFFFFFFFF)
    data[1] = _Data(bits >> 32, bits >> 32, bits >> 32)
    _check(_libc.capset(ctypes.byref(header), data), "capset")
    for task in Path("/proc/self/task").iterdir():
        held = capabilities(str(task / "status"))
        if held["CapEff"] & ~bits or held["CapPrm"] & ~bits or held["CapBnd"] & ~bits:
            raise CapabilityError(
                0, f"thread {task.name} still holds capabilities {held['CapEff']:#x}"
            )
