"""Linux capabilities of this process: read them, keep only some, forbid new ones.

The monitor keeps CAP_NET_ADMIN and CAP_NET_RAW (nftables, conntrack, netlink, new
capture sockets) and CAP_KILL (to end the packet process, another uid) and gives up
every other capability of uid 0. With ``knockgate run --user NAME`` it also stops being
root (:func:`become_user`): it keeps those three as NAME, in every set including the
ambient one (so the knockd-style commands it runs keep them too), and no file on the
host is its to write unless NAME owns it. The packet process keeps none. All through the
kernel's own calls (ctypes ``prctl`` and ``capset``): no library.

Capabilities belong to a thread, not a process: :func:`keep_only` and :func:`become_user`
must run before the process starts any thread, and they check every thread afterwards.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterable
from pathlib import Path

CAP_KILL = 5
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
NETWORK = frozenset({CAP_NET_ADMIN, CAP_NET_RAW})
MONITOR = NETWORK | {CAP_KILL}  # what `knockgate run` keeps once the packet process runs

PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
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


def _prctl(option: int, arg: int = 0, what: str = "prctl", arg3: int = 0) -> int:
    value = ctypes.c_ulong
    return _check(_libc.prctl(option, value(arg), value(arg3), value(0), value(0)), what)


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


def _capset(bits: int) -> None:
    """This thread's effective, permitted and inheritable sets := ``bits``."""
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    low, high = bits & 0xFFFFFFFF, bits >> 32
    data[0] = _Data(low, low, low)
    data[1] = _Data(high, high, high)
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def _check_threads(bits: int, ambient: bool, uid: int | None = None) -> None:
    """Every thread holds exactly ``bits`` (none more), in the ambient set too when
    ``ambient``, and runs as ``uid`` (real, effective, saved, fs) when given."""
    for task in Path("/proc/self/task").iterdir():
        path = str(task / "status")
        held = capabilities(path)
        sets = ("CapEff", "CapPrm", "CapBnd") + (("CapInh", "CapAmb") if ambient else ())
        wrong = {name: held[name] for name in sets if held[name] != bits}
        if wrong:
            shown = ", ".join(f"{name} {value:#x}" for name, value in sorted(wrong.items()))
            raise CapabilityError(0, f"thread {task.name} holds {shown}, expected {bits:#x}")
        if uid is not None:
            uids = {int(value) for value in status(path)["Uid"].split()}
            if uids != {uid}:
                raise CapabilityError(0, f"thread {task.name} still runs as uids {sorted(uids)}")


def keep_only(keep: frozenset[int]) -> None:
    """Reduce this thread's bounding, permitted, effective, inheritable and ambient sets
    to ``keep`` (empty: none), then check every thread of the process (CapabilityError
    when a thread kept more, or the kernel refused)."""
    drop_bounding(keep)
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "PR_CAP_AMBIENT_CLEAR_ALL")
    bits = mask(keep)
    _capset(bits)
    for task in Path("/proc/self/task").iterdir():
        held = capabilities(str(task / "status"))
        if held["CapEff"] & ~bits or held["CapPrm"] & ~bits or held["CapBnd"] & ~bits:
            raise CapabilityError(
                0, f"thread {task.name} still holds capabilities {held['CapEff']:#x}"
            )


def become_user(uid: int, gid: int, groups: Iterable[int], keep: frozenset[int]) -> None:
    """Stop being root: become ``uid``/``gid`` with exactly the supplementary ``groups``
    and keep only ``keep`` (bounding, permitted, effective, inheritable and ambient sets),
    with no new privileges for this process or what it runs; then check every thread
    (CapabilityError when one kept more or another uid, or the kernel refused).

    The order matters: the bounding set is reduced while CAP_SETPCAP is still effective;
    PR_SET_KEEPCAPS keeps the permitted set across setresuid (which clears the effective
    one); capset then reduces it to ``keep``, and the ambient raise (needs each cap in the
    permitted and inheritable sets) makes the capabilities survive an execve."""
    if uid == 0 or gid == 0:
        raise CapabilityError(0, "become_user: uid and gid must not be 0")
    drop_bounding(keep)
    _prctl(PR_SET_KEEPCAPS, 1, "PR_SET_KEEPCAPS")
    try:
        os.setgroups(sorted(set(groups)))
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as error:
        raise CapabilityError(error.errno or 0, f"becoming uid {uid}: {error.strerror}") from None
    bits = mask(keep)
    _capset(bits)
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "PR_CAP_AMBIENT_CLEAR_ALL")
    for cap in sorted(keep):
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, f"PR_CAP_AMBIENT_RAISE {cap}", cap)
    _prctl(PR_SET_KEEPCAPS, 0, "PR_SET_KEEPCAPS")
    no_new_privs()
    _check_threads(bits, ambient=True, uid=uid)
