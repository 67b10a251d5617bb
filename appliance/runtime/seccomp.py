"""The packet process's seccomp filter: what a compromised packet process could still do.

After its setup (capture sockets passed, privileges dropped) the packet process can no
longer ask the kernel for anything that reaches outside: it reads its capture sockets
and writes to its control socket, nothing else. The kernel checks CAP_NET_RAW only when
an AF_PACKET socket is created, so without this filter it could send raw frames on the
sockets it was given, set promiscuous mode, open TCP/UDP connections to the host's own
services or connect to abstract Unix sockets (it lives in the host's network namespace).

Denied with EPERM (:func:`build`):

* new sockets and their use: ``socket``, ``socketpair``, ``connect``, ``bind``, ``listen``,
  ``accept``/``accept4``, ``setsockopt`` (promiscuous mode, a packet ring, a filter);
* sending or writing on any descriptor but the control socket: ``write``, ``writev``,
  ``pwrite64``, ``pwritev``/``pwritev2``, ``sendto``, ``sendmsg``, ``sendmmsg``, and the
  calls that move data between descriptors (``sendfile``, ``splice``, ``tee``,
  ``vmsplice``, ``copy_file_range``);
* swapping another socket in at the control socket's number: ``close`` of it, ``dup2``/
  ``dup3`` onto it, ``close_range``;
* running or reaching other code: ``execve``/``execveat``, ``ptrace``,
  ``process_vm_readv``/``writev``, ``pidfd_getfd``, ``io_uring_*`` (its operations skip
  seccomp), ``bpf``, ``perf_event_open``, ``userfaultfd``, the key ring calls;
* new namespaces (a user namespace would give it capabilities there): ``unshare``,
  ``setns``, ``clone`` with a namespace flag, ``clone3`` (ENOSYS: the C library falls back
  to ``clone``);
* opening a file for writing (``open``/``openat`` with a write or create flag, ``creat``,
  ``openat2``).

Everything else is allowed (a deny list: the packet process is CPython, whose needs are
not ours to enumerate). A system call of another ABI (i386 or x32 on x86_64, arm32 on
aarch64) kills the process: the numbers below are only right for the native one.

Why no library: Debian's python3-seccomp is not installable in the test venv and has no
type information; the filter is about 80 classic-BPF instructions built by a pure function
(:func:`build`, unit-tested by running it in :func:`run`, a BPF interpreter for the
instructions it uses). The kernel caches "always allowed" for the calls whose verdict
does not depend on their arguments (``recvmsg``, ``epoll_wait``...), so the hot path pays
nothing for the calls it makes most; ``sendmsg`` on the control socket runs ~12
instructions.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
from collections.abc import Mapping, Sequence
from typing import NamedTuple

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
X32_SYSCALL_BIT = 0x40000000

# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6]
NR_OFFSET = 0
ARCH_OFFSET = 4
ARGS_OFFSET = 16

# classic BPF
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_JGE_K = 0x35
BPF_JSET_K = 0x45
BPF_RET_K = 0x06

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

# O_WRONLY | O_RDWR | O_CREAT | O_TRUNC | O_APPEND (same values on both architectures)
WRITE_FLAGS = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
NAMESPACE_FLAGS = (
    0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
)

# Every system call named below: (x86_64, aarch64) numbers (x86_64: asm/unistd_64.h;
# aarch64: the generic table, asm-generic/unistd.h); None: the architecture has no such call.
NUMBERS: dict[str, tuple[int, int | None]] = {
    "socket": (41, 198),
    "socketpair": (53, 199),
    "connect": (42, 203),
    "bind": (49, 200),
    "listen": (50, 201),
    "accept": (43, 202),
    "accept4": (288, 242),
    "setsockopt": (54, 208),
    "execve": (59, 221),
    "execveat": (322, 281),
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "pidfd_getfd": (438, 438),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "userfaultfd": (323, 282),
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "unshare": (272, 97),
    "setns": (308, 268),
    "clone": (56, 220),
    "clone3": (435, 435),
    "creat": (85, None),
    "openat2": (437, 437),
    "close_range": (436, 436),
    "write": (1, 64),
    "writev": (20, 66),
    "pwrite64": (18, 68),
    "pwritev": (296, 70),
    "pwritev2": (328, 287),
    "sendto": (44, 206),
    "sendmsg": (46, 211),
    "sendmmsg": (307, 269),
    "sendfile": (40, 71),
    "splice": (275, 76),
    "tee": (276, 77),
    "vmsplice": (278, 75),
    "copy_file_range": (326, 285),
    "close": (3, 57),
    "dup2": (33, None),
    "dup3": (292, 24),
    "open": (2, None),
    "openat": (257, 56),
}


class Arch(NamedTuple):
    audit: int  # AUDIT_ARCH_*
    numbers: Mapping[str, int]  # system call name -> number (missing: no such call)
    x32: bool  # numbers with X32_SYSCALL_BIT are another ABI


ARCHES: dict[str, Arch] = {
    "x86_64": Arch(AUDIT_ARCH_X86_64, {name: x86 for name, (x86, _) in NUMBERS.items()}, True),
    "aarch64": Arch(
        AUDIT_ARCH_AARCH64,
        {name: arm for name, (_, arm) in NUMBERS.items() if arm is not None},
        False,
    ),
}

DENIED = (  # EPERM whatever the arguments
    *("socket", "socketpair", "connect", "bind", "listen", "accept", "accept4", "setsockopt"),
    *("execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd"),
    *("io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "perf_event_open"),
    *("userfaultfd", "keyctl", "add_key", "request_key", "unshare", "setns"),
    *("creat", "openat2", "close_range"),
    *("sendfile", "splice", "tee", "vmsplice", "copy_file_range"),
)
ENOSYS = ("clone3",)  # the C library falls back to clone, whose flags are checked
CONTROL_ONLY = {  # allowed only when this argument is the control socket
    "write": 0,
    "writev": 0,
    "pwrite64": 0,
    "pwritev": 0,
    "pwritev2": 0,
    "sendto": 0,
    "sendmsg": 0,
    "sendmmsg": 0,
}
NOT_CONTROL = {"close": 0, "dup2": 1, "dup3": 1}  # denied when this argument is it
FLAGS = {  # denied when this argument has one of these bits
    "open": (1, WRITE_FLAGS),
    "openat": (2, WRITE_FLAGS),
    "clone": (0, NAMESPACE_FLAGS),
}


class Instruction(NamedTuple):
    code: int
    jt: int
    jf: int
    k: int


def _ld(offset: int) -> Instruction:
    return Instruction(BPF_LD_W_ABS, 0, 0, offset)


def _ret(value: int) -> Instruction:
    return Instruction(BPF_RET_K, 0, 0, value)


def _low(argument: int) -> int:  # the low 32 bits of args[n] (little-endian machines)
    return ARGS_OFFSET + 8 * argument


def build(arch: Arch, control: int) -> list[Instruction]:
    """The filter for ``arch`` with ``control`` the one descriptor that may be written.

    Shape: check the ABI; then per call whose verdict depends on an argument
    ``nr == N ? <load the argument, return a verdict> : next block``; then one comparison
    per call always denied, jumping to the shared returns at the end."""
    deny, enosys = _ret(SECCOMP_RET_ERRNO | errno.EPERM), _ret(SECCOMP_RET_ERRNO | errno.ENOSYS)
    allow, kill = _ret(SECCOMP_RET_ALLOW), _ret(SECCOMP_RET_KILL_PROCESS)
    program = [
        _ld(ARCH_OFFSET),
        Instruction(BPF_JEQ_K, 1, 0, arch.audit),
        kill,
        _ld(NR_OFFSET),
    ]
    if arch.x32:
        program += [Instruction(BPF_JGE_K, 0, 1, X32_SYSCALL_BIT), kill]
    # Simple verdicts first: one comparison each, jumping to the shared returns at the end.
    simple = [(arch.numbers[name], "deny") for name in DENIED if name in arch.numbers]
    simple += [(arch.numbers[name], "enosys") for name in ENOSYS if name in arch.numbers]
    blocks: list[list[Instruction]] = []
    # fd == control: allow, else deny (CONTROL_ONLY); deny, else allow (NOT_CONTROL)
    for table, on_control, otherwise in ((CONTROL_ONLY, allow, deny), (NOT_CONTROL, deny, allow)):
        for name, argument in table.items():
            if name in arch.numbers:
                blocks.append(
                    [
                        Instruction(BPF_JEQ_K, 0, 4, arch.numbers[name]),
                        _ld(_low(argument)),
                        Instruction(BPF_JEQ_K, 0, 1, control),
                        on_control,
                        otherwise,
                    ]
                )
    for name, (argument, bits) in FLAGS.items():  # any of the bits: deny, else allow
        if name in arch.numbers:
            blocks.append(
                [
                    Instruction(BPF_JEQ_K, 0, 4, arch.numbers[name]),
                    _ld(_low(argument)),
                    Instruction(BPF_JSET_K, 0, 1, bits),
                    deny,
                    allow,
                ]
            )
    for block in blocks:
        program += block
    # the simple ones: nr == N -> jump to deny/enosys at the end; else fall through
    tail = len(simple)  # instructions left after the current one, before the returns
    for index, (number, verdict) in enumerate(simple):
        left = tail - index - 1
        target = left + 1 if verdict == "deny" else left + 2  # past the final allow
        program.append(Instruction(BPF_JEQ_K, target, 0, number))
    program += [allow, deny, enosys]
    if len(program) > 255:  # jump offsets are 8 bits
        raise ValueError("seccomp filter too long")
    return program


def run(program: Sequence[Instruction], arch: int, nr: int, args: Sequence[int] = ()) -> int:
    """What ``program`` answers for one system call (the instructions :func:`build` uses)."""
    values = [*args, *([0] * (6 - len(args)))]
    data = (
        nr.to_bytes(4, "little", signed=True)
        + arch.to_bytes(4, "little")
        + bytes(8)
        + b"".join((value & (1 << 64) - 1).to_bytes(8, "little") for value in values)
    )
    accumulator, pc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code == BPF_LD_W_ABS:
            accumulator = int.from_bytes(data[k : k + 4], "little")
        elif code == BPF_RET_K:
            return k
        elif code in (BPF_JEQ_K, BPF_JGE_K, BPF_JSET_K):
            taken = (
                accumulator == k
                if code == BPF_JEQ_K
                else accumulator >= k
                if code == BPF_JGE_K
                else bool(accumulator & k)
            )
            pc += jt if taken else jf
        else:
            raise ValueError(f"instruction {code:#x}")


class _Filter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Filter))]


def native() -> Arch:
    """This machine's architecture (OSError on one the filter does not know)."""
    machine = platform.machine()
    if machine not in ARCHES:
        raise OSError(errno.ENOSYS, f"no seccomp filter for architecture {machine}")
    return ARCHES[machine]


def install(control: int) -> None:
    """Install the filter in this process (no_new_privs must be set; OSError when the
    kernel refuses). Irrevocable; inherited by every later thread."""
    program = build(native(), control)
    filters = (_Filter * len(program))(*(_Filter(*instruction) for instruction in program))
    fprog = _Program(len(program), filters)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    unsigned = ctypes.c_ulong
    result = libc.prctl(
        PR_SET_SECCOMP, unsigned(SECCOMP_MODE_FILTER), ctypes.byref(fprog), unsigned(0), unsigned(0)
    )
    if result != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"seccomp filter: {os.strerror(number)}")
