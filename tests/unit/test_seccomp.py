"""The packet process's seccomp filter: the program, run for both architectures by the
BPF interpreter (:func:`appliance.runtime.seccomp.run`), and installed for real in a
child Python process (no root needed: no_new_privs is enough)."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.runtime import seccomp
from appliance.runtime.seccomp import (
    ARCHES,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_ERRNO,
    SECCOMP_RET_KILL_PROCESS,
    build,
    run,
)

CONTROL = 5
EPERM = SECCOMP_RET_ERRNO | errno.EPERM
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(ARCHES))
def test_every_denied_call_is_refused_and_others_allowed(name: str) -> None:
    arch = ARCHES[name]
    program = build(arch, CONTROL)
    n = arch.numbers
    for call in seccomp.DENIED:
        if call in n:
            assert run(program, arch.audit, n[call], [CONTROL]) == EPERM, call
    assert run(program, arch.audit, n["clone3"]) == SECCOMP_RET_ERRNO | errno.ENOSYS
    for call in seccomp.CONTROL_ONLY:
        assert run(program, arch.audit, n[call], [CONTROL]) == SECCOMP_RET_ALLOW, call
        assert run(program, arch.audit, n[call], [CONTROL + 1]) == EPERM, call
        assert run(program, arch.audit, n[call], [1]) == EPERM, call  # stdout too
    assert run(program, arch.audit, n["close"], [CONTROL]) == EPERM
    assert run(program, arch.audit, n["close"], [CONTROL + 1]) == SECCOMP_RET_ALLOW
    assert run(program, arch.audit, n["dup3"], [9, CONTROL, 0]) == EPERM
    assert run(program, arch.audit, n["dup3"], [CONTROL, 9, 0]) == SECCOMP_RET_ALLOW
    assert run(program, arch.audit, n["openat"], [-100, 0, os.O_RDONLY]) == SECCOMP_RET_ALLOW
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_CREAT | os.O_RDONLY, os.O_APPEND):
        assert run(program, arch.audit, n["openat"], [-100, 0, flags]) == EPERM
    thread = 0x3D0F00  # CPython's pthread_create flags
    assert run(program, arch.audit, n["clone"], [thread]) == SECCOMP_RET_ALLOW
    assert run(program, arch.audit, n["clone"], [thread | 0x10000000]) == EPERM  # NEWUSER
    assert run(program, arch.audit, n["clone"], [0x40000000]) == EPERM  # NEWNET
    # what the hot path calls (recvmsg, epoll_pwait on both) passes
    recvmsg, epoll = (47, 281) if name == "x86_64" else (212, 22)
    assert run(program, arch.audit, recvmsg, [CONTROL + 3]) == SECCOMP_RET_ALLOW
    assert run(program, arch.audit, epoll, [3]) == SECCOMP_RET_ALLOW
    # another ABI: killed (its numbers mean other calls)
    assert run(program, 0x40000003, 1, [CONTROL]) == SECCOMP_RET_KILL_PROCESS


def test_x32_calls_are_killed_on_x86_64() -> None:
    arch = ARCHES["x86_64"]
    program = build(arch, CONTROL)
    x32_write = 0x40000000 | 1
    assert run(program, arch.audit, x32_write, [CONTROL]) == SECCOMP_RET_KILL_PROCESS


CHILD = """
import errno, os, socket, sys
from appliance.runtime import caps, seccomp
control = socket.socket(fileno=int(sys.argv[1]))
other, peer = socket.socketpair()
caps.no_new_privs()
seccomp.install(control.fileno())
said = []
def attempt(name, call):
    try:
        call()
        said.append(name + "=ok")
    except OSError as error:
        said.append(name + "=" + errno.errorcode[error.errno])
attempt("other", lambda: other.send(b"x"))
attempt("stdout", lambda: os.write(1, b"x"))
attempt("socket", lambda: socket.socket())
attempt("close", lambda: os.close(control.fileno()))
attempt("dup2", lambda: os.dup2(other.fileno(), control.fileno()))
attempt("read", lambda: open("/proc/self/status").read())
control.send(" ".join(said).encode())
"""


def test_the_filter_installed_for_real_allows_only_the_control_socket() -> None:
    if seccomp.platform.machine() not in ARCHES:
        pytest.skip("no filter for this architecture")
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with parent, child:
        result = subprocess.run(
            [sys.executable, "-c", CHILD, str(child.fileno())],
            pass_fds=(child.fileno(),),
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=30,
        )
        child.close()
        said = parent.recv(1000).decode()
    assert result.stdout == ""  # os.write(1, ...) refused
    assert said.split() == [
        "other=EPERM",
        "stdout=EPERM",
        "socket=EPERM",
        "close=EPERM",
        "dup2=EPERM",
        "read=ok",
    ]
    assert result.returncode == 0  # its exit needs no refused call
