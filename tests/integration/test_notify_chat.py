"""The chat notifier from the real daemon after a real knock, to a real HTTP server.

Two presets as the README writes them: Matrix (PUT to a URL with a fresh transaction id,
the token from a file as a bearer, a JSON body) and ntfy (POST, plain text, a Title
header). The receiver (tests/integration/notify_receivers.py ``chat``) runs on the server
namespace's loopback and records each request as it came; the door's name carries
characters that would break a JSON body or a header if they were not escaped.
"""

from __future__ import annotations

from pathlib import Path

from tests.integration.daemon import Knockgate
from tests.integration.netns import Topology
from tests.integration.test_notify import Receiver, knock_and_time, running, topo

__all__ = ["topo"]  # the fixture, shared

CHAT_PORT = 8766
CONFIG = """\
interfaces: [eth0]
status_socket: @SOCKET@
firewall: {{backend: nftables}}
doors:
  ssh:
    knock: {{sequence: [7113, 2231/udp, 9157], seq_timeout: 5, tcpflags: "syn,!ack"}}
    open: {{ports: [22/tcp], duration: 30}}
notify:
  matrix:
    chat:
      preset: matrix
      token_file: {token}
      url: "http://127.0.0.1:{port}/_matrix/client/v3/rooms/!kg:example.org/send/m.room.message/{{txn}}"
    events: [opened]
  ntfy:
    chat: {{preset: ntfy, url: "http://127.0.0.1:{port}/kg-gate"}}
    events: [opened]
"""


def test_chat_presets_deliver_the_open_as_the_services_expect(
    topo: Topology, tmp_path: Path
) -> None:
    token = tmp_path / "matrix.token"
    token.write_text("syt_kg_test_token\n")
    token.chmod(0o600)
    receiver = Receiver(topo, tmp_path / "chat.jsonl", ["chat", "--port", str(CHAT_PORT)])
    config = CONFIG.format(token=token, port=CHAT_PORT)
    daemon = Knockgate(topo, tmp_path, config)
    with running(receiver.start(), daemon):
        daemon.start()
        server, client = topo.host("server").ipv4, topo.host("client").ipv4
        knock_and_time(topo, "client", server)
        got = receiver.wait_for(lambda lines: len(lines) >= 2, timeout=10)
        matrix = [r for r in got if r["method"] == "PUT"]
        ntfy = [r for r in got if r["method"] == "POST"]
        assert len(matrix) == 1 and len(ntfy) == 1, got
        (m,), (n,) = matrix, ntfy
        prefix = "/_matrix/client/v3/rooms/!kg:example.org/send/m.room.message/"
        assert m["path"].startswith(prefix) and len(m["path"]) > len(prefix)  # a txn id
        assert m["authorization"] == "Bearer syt_kg_test_token"
        assert m["body"]["msgtype"] == "m.text"
        assert "opened door ssh" in m["body"]["body"] and client in m["body"]["body"]
        assert n["path"] == "/kg-gate" and n["content_type"].startswith("text/plain")
        assert "opened door ssh" in n["body"] and client in n["body"]
        assert n["title"] and "\n" not in n["title"]
        assert "syt_kg_test_token" not in daemon.log()
        assert daemon.stop() == 0
