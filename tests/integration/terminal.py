"""A real terminal for tests: a tmux session on a tmux server of the test's own.

``tmux -L NAME`` keeps the test away from anyone else's tmux; :meth:`Terminal.kill`
removes the server, its processes and its socket file. Kept free of pytest.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.integration.daemon import REPO


class Terminal:
    """One tmux session on a tmux server of its own."""

    def __init__(self, name: str) -> None:
        self.server = name
        self.session = name

    def tmux(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.server, *args], capture_output=True, text=True, timeout=10
        )
        if done.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def start(self, command: str, width: int = 120, height: int = 40) -> None:
        self.tmux(
            "-f", "/dev/null", "new-session", "-d", "-s", self.session,
            "-x", str(width), "-y", str(height), "-c", str(REPO), command,
        )  # fmt: skip

    def keys(self, *keys: str) -> None:
        """Type ``keys`` (tmux names: ``C-c``, ``Enter``)."""
        self.tmux("send-keys", "-t", self.session, *keys)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.session)

    def wait_for(self, found: Callable[[str], bool], timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if found(screen):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"not on the screen within {timeout} s:\n{screen}")

    def kill(self) -> None:
        """The tmux server, its processes and its socket (kill-server leaves the file)."""
        subprocess.run(["tmux", "-L", self.server, "kill-server"], capture_output=True, timeout=10)
        directory = Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.getuid()}"
        (directory / self.server).unlink(missing_ok=True)
