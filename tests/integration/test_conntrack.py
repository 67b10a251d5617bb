"""The services' connection count from the kernel's conntrack table, read over netlink
(pyroute2), in a namespace of its own: one established connection to a port counts, a
closed one no longer does."""

from __future__ import annotations

import subprocess
import sys
import uuid

from tests.integration.conftest import require_root_tools

# Run inside the namespace: a listener, one connection to it, a count, then closed.
SCRIPT = """\
import socket, sys, time
from appliance.core.model import Step
from appliance.services.conntrack import ConnectionCounter
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
port = server.getsockname()[1]
counter = ConnectionCounter()
other = Step(port + 1 if port < 65535 else port - 1, "tcp")
before = counter({Step(port, "tcp"), other})
client = socket.create_connection(("127.0.0.1", port))
peer, _ = server.accept()
time.sleep(0.1)
during = counter({Step(port, "tcp"), other})
client.close()
peer.close()
time.sleep(0.1)
after = counter({Step(port, "tcp")})
print(before[Step(port, "tcp")], during[Step(port, "tcp")], during[other], after[Step(port, "tcp")])
"""


def test_established_connections_are_counted_over_netlink() -> None:
    require_root_tools("nft")
    netns = f"kgct{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        inside = ["ip", "netns", "exec", netns]
        subprocess.run([*inside, "ip", "link", "set", "lo", "up"], check=True)
        # A rule that uses conntrack, so the namespace tracks connections.
        ruleset = (
            "add table inet kgct; add chain inet kgct out "
            "{ type filter hook output priority 0; ct state established accept; }"
        )
        subprocess.run([*inside, "nft", ruleset], check=True)
        done = subprocess.run(
            [*inside, sys.executable, "-c", SCRIPT],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        before, during, other, after = map(int, done.stdout.split())
        assert (before, during, other, after) == (0, 1, 0, 0), done.stdout
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
