"""``knockgate top`` in a real terminal (tmux) against the real daemon after a real knock.

The daemon runs in the server namespace; ``top`` runs in a tmux session of a tmux
server of the test's own (``-L``), 120x40, reading the daemon's status socket (a path:
reachable from the root namespace). The test reads the screen with ``capture-pane``
until the rows it expects are there, then presses Ctrl-C. The tmux server and the
daemon are removed even on failure.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import require_root_tools
from tests.integration.daemon import PYTHON, REPO, Knockgate, connect, serve
from tests.integration.netns import Topology, cleanup_stale
from tests.integration.terminal import Terminal

pytestmark = pytest.mark.integration

CONFIG = """\
interfaces: [eth0]
status_socket: @SOCKET@
firewall: {backend: nftables}
doors:
  ssh:
    knock: {sequence: [7113, 2231/udp, 9157], seq_timeout: 5}
    open: {ports: [22/tcp], duration: 30}
"""


@pytest.fixture
def topo() -> Iterator[Topology]:
    require_root_tools("nft", "tmux")
    cleanup_stale()
    with Topology(vlan=False) as topology:
        serve(topology, "server", 22)
        yield topology


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    term = Terminal(f"kg-top-{os.getpid()}")
    term.kill()  # a server left by an earlier run with this pid
    try:
        yield term
    finally:
        term.kill()


def squeeze(screen: str) -> str:
    return re.sub(r"[ \t]+", " ", screen)


def grant_left(screen: str, address: str) -> int | None:
    """The seconds left of ``address``'s 22/tcp grant on the screen, if shown."""
    found = re.search(rf"ssh {re.escape(address)} 22/tcp (\d+) s", squeeze(screen))
    return int(found.group(1)) if found else None


def test_top_shows_the_door_the_grant_counting_down_and_the_rates(
    topo: Topology, terminal: Terminal, tmp_path: Path
) -> None:
    daemon = Knockgate(topo, tmp_path, CONFIG).start()
    server, client = topo.host("server").ipv4, topo.host("client").ipv4
    try:
        topo.run(
            "client",
            [PYTHON, "-m", "appliance.cli", "knock", server, "7113", "2231:udp", "9157"],
            cwd=str(REPO),
        )
        deadline = time.monotonic() + 5
        while connect(topo, "client", server, 22) != "open" and time.monotonic() < deadline:
            time.sleep(0.1)
        # rich takes COLUMNS/LINES over the terminal's size, and the tmux server passes
        # on its starter's environment (80x24 was seen here): the terminal's size wins.
        command = f"env -u COLUMNS -u LINES {PYTHON} -m appliance.cli top --socket {daemon.socket}"
        terminal.start(f"{command}; echo kg-top-exited $?; sleep 60")
        first = terminal.wait_for(lambda s: grant_left(s, client) is not None)
        text = squeeze(first)
        assert "ssh 3-step sequence 22/tcp 1" in text  # the door row, one grant open
        assert re.search(r"packets/s \S+ 3\b", text), first  # the three knocks
        assert re.search(r"opens/min \S+ 1\b", text), first
        assert "firewall nftables" in text and "capturing on eth0" in text
        assert f"opened door ssh for {client}: 22/tcp for 30 s" in text, first  # events
        left = grant_left(first, client)
        assert left is not None and 20 <= left <= 30
        # Live: the time left counts down, the rates turn into numbers.
        later = terminal.wait_for(lambda s: (grant_left(s, client) or 99) <= left - 2)
        assert re.search(r"packets/s 0\.0 3\b", squeeze(later)), later
        # A narrower terminal: the tables go one under the other, nothing cut.
        terminal.tmux("resize-window", "-t", terminal.session, "-x", "80", "-y", "50")
        narrow = terminal.wait_for(lambda s: "rates" in s.splitlines() and "doors" in s)
        assert max(len(line) for line in narrow.splitlines()) <= 80
        assert "ssh 3-step sequence 22/tcp 1" in squeeze(narrow), narrow
        assert grant_left(narrow, client) is not None, narrow
        # The daemon goes away: a retrying frame, no traceback; Ctrl-C ends with 0.
        assert daemon.stop() == 0
        gone = terminal.wait_for(lambda s: "daemon not reachable, retrying" in s)
        assert "Traceback" not in gone
        terminal.keys("C-c")
        ended = terminal.wait_for(lambda s: "kg-top-exited" in s, timeout=5)
        assert "kg-top-exited 0" in ended and "Traceback" not in ended
    finally:
        daemon.stop()
