"""SPA receipts and dual-stack grants on real packets, with the real daemon.

A topology of its own (server, client, other; IPv4 in 198.18/15, IPv6 in 2001:2::/48),
``knockgate run`` in the server namespace with an SPA door whose ``receipt`` is on.
The client namespace resolves ``kg-receipts-server`` to both of the server's addresses
through ``/etc/netns/<client namespace>/hosts`` (``ip netns exec`` mounts it over
``/etc/hosts`` for that namespace only; removed at the end).

* ``knockgate spa --dual-stack`` lets the client's IPv4 and IPv6 addresses in with one
  command, and shows a receipt for each;
* a receipt is what the client's keys open for the packet it sent;
* forged, replayed, unauthenticated (wrong key, bit flip, garbage) packets get nothing
  from knockgate: a capture (tcpdump) on the client's interface sees no datagram for
  them, while the one valid packet of the same run gets its one receipt; what else the
  server sends is the kernel's ICMP port unreachable, which every datagram to the SPA
  port gets alike (nothing listens there and knockgate's table does not drop it);
* the receipt round trip (send -> receipt decrypted), median of 20, is printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.spa.keyfile import format_keys, generate_keys
from appliance.spa.receipt import open_receipt, receipt_key
from appliance.spa.wire import SpaKeys, new_message, replay_digest, seal
from tests.integration.conftest import require
from tests.integration.daemon import PYTHON, REPO, Knockgate, connect, serve
from tests.integration.netns import Topology, cleanup_stale, ensure_root_tools

pytestmark = pytest.mark.integration

SPA_PORT = 62201
SSH = 22
NAME = "kg-receipts-server"

CONFIG = """\
interfaces: [eth0]
status_socket: @SOCKET@
state_dir: {state_dir}
firewall: {{backend: nftables}}
doors:
  spa:
    spa:
      port: {spa_port}
      receipt: true
      users:
        alice:
          key_base64: {key}
          hmac_key_base64: {hmac}
    open: {{ports: [22/tcp], duration: 30}}
"""

# Run in the client namespace: send each payload from a socket of its own (optionally
# from a given source address), wait for what comes back, print it as JSON.
EXCHANGE = """
import json, selectors, socket, sys, time
server, port, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
items = json.loads(sys.stdin.read())
family = socket.AF_INET6 if ":" in server else socket.AF_INET
socks = []
selector = selectors.DefaultSelector()
for item in items:
    s = socket.socket(family, socket.SOCK_DGRAM)
    if item.get("source"):
        s.bind((item["source"], 0))
    s.connect((server, port))
    s.setblocking(False)
    selector.register(s, selectors.EVENT_READ, len(socks))
    socks.append(s)
got = [[] for _ in items]
sent = [0.0] * len(items)
for index, (s, item) in enumerate(zip(socks, items)):
    sent[index] = time.monotonic()
    s.send(bytes.fromhex(item["payload"]))
    if item.get("spacing"):
        time.sleep(item["spacing"])
deadline = time.monotonic() + wait
while time.monotonic() < deadline:
    for key, _ in selector.select(deadline - time.monotonic()):
        try:
            data = socks[key.data].recv(2048)
        except OSError:
            continue
        got[key.data].append([data.hex(), time.monotonic() - sent[key.data]])
print(json.dumps({"got": got, "ports": [s.getsockname()[1] for s in socks]}))
"""


@dataclass
class Lab:
    topo: Topology
    workdir: Path
    daemon: Knockgate
    keys: SpaKeys
    key_file: Path
    config_path: Path

    @property
    def server4(self) -> str:
        return self.topo.host("server").ipv4

    @property
    def server6(self) -> str:
        return self.topo.host("server").ipv6

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.topo.run(
            "client",
            [PYTHON, "-m", "appliance.cli", *args],
            check=check,
            cwd=str(REPO),
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    def packet(self, allow: str, keys: SpaKeys | None = None) -> bytes:
        message = new_message("alice", int(time.time()), f"{allow},tcp/{SSH}")
        return seal(message, keys or self.keys)

    def exchange(
        self, items: list[dict[str, object]], wait: float = 1.0, server: str | None = None
    ) -> dict[str, list[Any]]:
        done = self.topo.run(
            "client",
            [PYTHON, "-c", EXCHANGE, server or self.server4, str(SPA_PORT), str(wait)],
            input=json.dumps(items),
            timeout=wait + 30,
        )
        result: dict[str, list[Any]] = json.loads(done.stdout)
        return result


def prerequisites() -> None:
    missing = ensure_root_tools(vlan=False)
    require(not missing, ", ".join(missing))
    require(shutil.which("nft") is not None, "nft is not installed")
    require(shutil.which("tcpdump") is not None, "tcpdump is not installed")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    prerequisites()
    cleanup_stale()
    key, hmac = generate_keys()
    with Topology(("server", "client", "other"), vlan=False) as topo:
        hosts_dir = Path("/etc/netns") / topo.netns_of("client")
        made_parent = not hosts_dir.parent.exists()
        hosts_dir.mkdir(parents=True, exist_ok=False)
        try:
            server = topo.host("server")
            (hosts_dir / "hosts").write_text(
                f"127.0.0.1 localhost\n{server.ipv4} {NAME}\n{server.ipv6} {NAME}\n"
            )
            serve(topo, "server", SSH)
            config = CONFIG.format(
                state_dir=tmp_path / "state", spa_port=SPA_PORT, key=key, hmac=hmac
            )
            config_path = tmp_path / "knockgate.yaml"
            config_path.write_text(config.replace("@SOCKET@", str(tmp_path / "status.sock")))
            key_file = tmp_path / "alice.keys"
            key_file.write_text(format_keys(key, hmac))
            daemon = Knockgate(
                topo, tmp_path, config, config_path=config_path, state_dir=tmp_path / "state"
            ).start()
            lab = Lab(topo, tmp_path, daemon, SpaKeys.from_base64(key, hmac), key_file, config_path)
            try:
                yield lab
            finally:
                daemon.stop()
        finally:
            shutil.rmtree(hosts_dir, ignore_errors=True)
            if made_parent:
                with contextlib.suppress(OSError):  # another run's entry may be there now
                    hosts_dir.parent.rmdir()


def test_a_dual_stack_knock_lets_both_families_in_with_a_receipt_each(lab: Lab) -> None:
    client = lab.topo.host("client")
    assert connect(lab.topo, "client", lab.server4, SSH) == "refused"
    assert connect(lab.topo, "client", lab.server6, SSH) == "refused"
    done = lab.cli(
        "spa", NAME, "-4", "--door", "spa", "--key-file", str(lab.key_file),
        "--config", str(lab.config_path), "--dual-stack", "-v",
    )  # fmt: skip
    lines = done.stdout.splitlines()
    receipts = [line for line in lines if line.startswith("receipt: ")]
    assert len(receipts) == 2, done.stdout + done.stderr
    assert any(f"receipt: {client.ipv4} let in until" in line for line in receipts)
    assert any(f"receipt: {client.ipv6} let in until" in line for line in receipts)
    assert all("(30 s), service ready" in line for line in receipts)
    assert connect(lab.topo, "client", lab.server4, SSH) == "open"
    assert connect(lab.topo, "client", lab.server6, SSH) == "open"
    # The other host was not let in by either.
    assert connect(lab.topo, "other", lab.server4, SSH) == "refused"
    assert connect(lab.topo, "other", lab.server6, SSH) == "refused"
    counters = lab.daemon.status()["counters"]
    assert isinstance(counters, dict)
    assert (counters["receipts"], counters["receipts_sent"]) == (2, 2)


def test_a_receipt_opens_for_its_own_request_only(lab: Lab) -> None:
    client = lab.topo.host("client")
    first, second = lab.packet(client.ipv4), lab.packet(client.ipv4)
    result = lab.exchange([{"payload": first.hex()}, {"payload": second.hex()}])
    (one,), (two,) = result["got"]
    key = receipt_key(lab.keys)
    receipt = open_receipt(bytes.fromhex(one[0]), key, replay_digest(first))
    assert receipt.address == client.ipv4 and receipt.state == "ready"
    assert abs(receipt.deadline - (time.time() + 30)) < 5 and receipt.seconds == 30
    open_receipt(bytes.fromhex(two[0]), key, replay_digest(second))
    with pytest.raises(Exception, match="does not authenticate"):
        open_receipt(bytes.fromhex(one[0]), key, replay_digest(second))


def test_forged_replayed_and_unauthenticated_packets_get_no_answer(lab: Lab) -> None:
    client = lab.topo.host("client")
    valid = lab.packet(client.ipv4)
    flipped = bytearray(lab.packet(client.ipv4))
    flipped[60] = ord("A") if flipped[60] != ord("A") else ord("B")
    wrong_key = lab.packet(client.ipv4, SpaKeys(os.urandom(32), os.urandom(64)))
    garbage = b"8" + b"A" * 300
    capture = lab.workdir / "client.pcap"
    dump = lab.topo.popen(
        "client",
        ["tcpdump", "-i", "eth0", "-n", "-U", "-w", str(capture),
         f"src host {lab.server4} or src host {lab.server6}"],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert dump.stderr is not None
        assert "listening" in dump.stderr.readline()
        result = lab.exchange(
            [
                {"payload": valid.hex(), "spacing": 0.2},
                {"payload": valid.hex()},  # the same bytes again: a replay
                {"payload": bytes(flipped).hex()},
                {"payload": wrong_key.hex()},
                {"payload": garbage.hex()},
            ],
            wait=1.5,
        )
        time.sleep(0.3)
    finally:
        dump.terminate()
        dump.wait(10)
    got, ports = result["got"], result["ports"]
    assert [len(answers) for answers in got] == [1, 0, 0, 0, 0]
    open_receipt(bytes.fromhex(got[0][0][0]), receipt_key(lab.keys), replay_digest(valid))
    seen = subprocess.run(
        ["tcpdump", "-n", "-r", str(capture), "ip or ip6"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    # knockgate sent one datagram in the whole run: the valid packet's receipt, from the
    # SPA port to the port that packet came from; nothing to the other four.
    datagrams = [line for line in seen if " UDP, " in line]
    assert len(datagrams) == 1, seen
    assert f"{lab.server4}.{SPA_PORT} > {client.ipv4}.{ports[0]}: UDP, length 60" in datagrams[0]
    # The rest is the kernel's answer to any datagram on a UDP port nothing listens on
    # (knockgate's table does not drop the SPA port): "port unreachable", the same for a
    # valid packet, a forged one or any other, so it tells nothing; at most one each.
    rest = [line for line in seen if line not in datagrams]
    assert all(f"udp port {SPA_PORT} unreachable" in line for line in rest), rest
    assert len(rest) <= 5
    counters = lab.daemon.status()["counters"]
    assert isinstance(counters, dict)
    assert counters["receipts_sent"] == 1
    assert counters["spa_refused"] == 1  # the replay
    assert counters["spa_unauthenticated"] == 3  # bit flip, wrong key, garbage


def test_receipt_round_trip(lab: Lab) -> None:
    """Send -> receipt decrypted, median of 20 (20 client addresses: receipts are
    rate-limited per source)."""
    client = lab.topo.host("client")
    prefix = client.ipv4.rsplit(".", 1)[0]
    sources = [f"{prefix}.{100 + i}" for i in range(20)]
    for source in sources:
        lab.topo.run("client", ["ip", "addr", "add", f"{source}/32", "dev", "eth0"])
    lab.topo.run("server", ["ip", "neigh", "flush", "dev", "eth0"])
    code = """
import json, socket, statistics, sys, time
sys.path.insert(0, sys.argv[1])
from appliance.spa.keyfile import read_key_file
from appliance.spa.receipt import open_receipt, receipt_key
from appliance.spa.wire import new_message, replay_digest, seal
keys = read_key_file(sys.argv[2], None).keys
key = receipt_key(keys)
times = []
for source in sys.argv[4:]:
    # Warm the neighbour caches both ways first (not part of the round trip).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as warm:
        warm.bind((source, 0)); warm.sendto(b"x", (sys.argv[3], 9))
    time.sleep(0.05)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0)); s.connect((sys.argv[3], 62201)); s.settimeout(2)
        start = time.perf_counter()
        packet = seal(new_message("alice", int(time.time()), source + ",tcp/22"), keys)
        s.send(packet)
        while True:
            try:
                data = s.recv(2048)
                break
            except ConnectionRefusedError:  # the kernel's port unreachable came first
                continue
        open_receipt(data, key, replay_digest(packet))
        times.append(time.perf_counter() - start)
print(json.dumps(times))
"""
    done = lab.topo.run(
        "client",
        [PYTHON, "-c", code, str(REPO), str(lab.key_file), lab.server4, *sources],
        timeout=60,
    )
    times = json.loads(done.stdout)
    assert len(times) == 20
    median = statistics.median(times)
    print(
        f"\nreceipt round trip (send -> receipt decrypted), median of 20: {median * 1000:.2f} ms"
        f" (min {min(times) * 1000:.2f}, max {max(times) * 1000:.2f})"
    )
    assert median < 0.05


def test_connect_dual_stack_shows_receipts_and_lets_both_families_in(lab: Lab) -> None:
    client = lab.topo.host("client")
    done = lab.topo.run(
        "client",
        [PYTHON, "-m", "appliance.cli", "connect", NAME, str(SSH), "-4", "--door", "spa",
         "--config", str(lab.config_path), "--key-file", str(lab.key_file), "--dual-stack",
         "--no-keepalive", "-v"],
        check=False,
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert f"knockgate: receipt: {client.ipv4} let in until" in done.stderr, done.stderr
    assert f"knockgate: receipt: {client.ipv6} let in until" in done.stderr, done.stderr
    assert connect(lab.topo, "client", lab.server6, SSH) == "open"


def test_knock_wait_on_an_spa_door_shows_the_receipt_then_waits(lab: Lab) -> None:
    client = lab.topo.host("client")
    done = lab.cli(
        "knock", lab.server4, "--door", "spa", "--config", str(lab.config_path),
        "--key-file", str(lab.key_file), "--wait", "--timeout", "5",
    )  # fmt: skip
    assert f"knockgate: receipt: {client.ipv4} let in until" in done.stderr, done.stderr
    assert "service ready" in done.stderr
    assert connect(lab.topo, "client", lab.server4, SSH) == "open"
