"""Carrying out knockd-style commands without blocking the loop."""

from __future__ import annotations

import logging
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor, wait

from appliance.core.events import RunCommand

log = logging.getLogger("knockgate.commands")

COMMAND_TIMEOUT = 60.0


def run_command(command: RunCommand, timeout: float = COMMAND_TIMEOUT) -> int | None:
    """Run one command with ``/bin/sh -c`` (as knockd's ``system()``); log its exit status."""
    log.info("%s: running %s command: %s", command.door, command.phase, command.command)
    try:
        done = subprocess.run(
            ["/bin/sh", "-c", command.command],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        log.error("%s: %s command timed out after %.0f s", command.door, command.phase, timeout)
        return None
    except OSError as error:
        log.error("%s: %s command could not start: %s", command.door, command.phase, error)
        return None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        log.warning(
            "%s: %s command returned non-zero status code (%d)%s",
            command.door,
            command.phase,
            done.returncode,
            f": {detail[-1]}" if detail else "",
        )
    else:
        log.info("%s: %s command exited 0", command.door, command.phase)
    return done.returncode


class CommandRunner:
    """Runs commands on worker threads, in order per (door, address).

    A door's stop command for an address never starts before its start command
    has finished (knockd runs both in one child, one after the other).
    """

    def __init__(self, workers: int = 8) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="command")
        self.last: dict[tuple[str, str], Future[int | None]] = {}

    def submit(self, command: RunCommand) -> None:
        key = (command.door, command.address)
        before = self.last.get(key)

        def task() -> int | None:
            if before is not None:
                wait([before])
            return run_command(command)

        future = self.pool.submit(task)
        self.last[key] = future
        future.add_done_callback(lambda done: self._forget(key, done))

    def _forget(self, key: tuple[str, str], done: Future[int | None]) -> None:
        if self.last.get(key) is done:
            self.last.pop(key, None)

    def shutdown(self) -> None:
        """Wait for every submitted command to finish."""
        self.pool.shutdown(wait=True)
