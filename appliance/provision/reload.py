"""Make the running daemon reload after the managed users changed (no restart).

Tried in order:

1. the daemon answering on the configuration's status socket: SIGHUP to the pid it
   reports, then its ``reloads`` / ``reload_failures`` counters say how it went;
2. the appliance container (PID 1 is ``knockgate-entrypoint``): SIGHUP to PID 1, as
   ``knockgate config apply`` does (the wrapper passes it to knockgate);
3. ``pid_file`` naming a live process: SIGHUP to it.

Otherwise nothing runs here and the next start reads the files.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from typing import Literal

from appliance.config.schema import Config
from appliance.errors import KnockgateError

__all__ = ["ReloadResult", "appliance_pid_1", "reload_daemon", "request_appliance_reload"]

CONFIRM_TIMEOUT = 10.0

Outcome = Literal["reloaded", "refused", "unconfirmed", "requested", "none"]


@dataclass(frozen=True)
class ReloadResult:
    outcome: Outcome
    message: str


def _counters(socket_path: str) -> tuple[int, int, int] | None:
    """(pid, reloads, reload_failures) of the daemon on ``socket_path``, if one answers."""
    from appliance.runtime.status import query

    if not os.path.exists(socket_path):
        return None
    try:
        data = query(socket_path, timeout=2.0)
        counters = data["counters"]
        return int(data["pid"]), int(counters["reloads"]), int(counters["reload_failures"])
    except (KnockgateError, KeyError, TypeError, ValueError):
        return None


def appliance_pid_1() -> bool:
    """Whether this runs inside the appliance container (PID 1 is its entrypoint)."""
    try:
        with open("/proc/1/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        return False
    return any(arg.endswith(b"knockgate-entrypoint") for arg in argv)


def request_appliance_reload() -> bool:
    """Inside the appliance (not as PID 1 itself): SIGHUP to PID 1, which the entrypoint
    turns into knockgate's reload. ``False`` when this is not the appliance."""
    if os.getpid() == 1 or not appliance_pid_1():
        return False
    os.kill(1, signal.SIGHUP)
    return True


def _pid_from_file(path: str | None) -> int | None:
    if not path:
        return None
    try:
        with open(path, encoding="ascii") as handle:
            pid = int(handle.read().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def reload_daemon(config: Config, timeout: float = CONFIRM_TIMEOUT) -> ReloadResult:
    """SIGHUP the daemon running ``config`` and, where it can be asked, wait for the
    reload to be done (or refused)."""
    before = _counters(config.settings.status_socket)
    if before is not None:
        pid, reloads, failures = before
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError:
            before = None  # another pid namespace (a socket on a shared volume)
        else:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                time.sleep(0.05)
                now = _counters(config.settings.status_socket)
                if now is None:
                    continue
                if now[2] > failures:
                    return ReloadResult(
                        "refused",
                        f"knockgate (pid {pid}) refused the reload and keeps its running "
                        "configuration: see its log",
                    )
                if now[1] > reloads:
                    return ReloadResult("reloaded", f"knockgate (pid {pid}) reloaded")
            return ReloadResult(
                "unconfirmed", f"SIGHUP sent to knockgate (pid {pid}); no reload seen yet"
            )
    if request_appliance_reload():
        return ReloadResult(
            "requested", "reload requested (docker compose logs knockgate: configuration reloaded)"
        )
    pid_file_pid = _pid_from_file(config.settings.pid_file)
    if pid_file_pid is not None:
        with contextlib.suppress(OSError):
            os.kill(pid_file_pid, signal.SIGHUP)
            return ReloadResult("requested", f"SIGHUP sent to pid {pid_file_pid} (pid_file)")
    return ReloadResult(
        "none",
        "no running knockgate found (status socket, appliance, pid_file): "
        "the next start reads the users",
    )
