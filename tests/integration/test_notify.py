"""Notifications from the real daemon after real knocks, to real receivers.

The daemon runs in the server namespace; its receivers run there too, on loopback
(tests/integration/notify_receivers.py): an http.server that verifies the webhook's
HMAC signature, and aiosmtpd's SMTP server for the digest. A receiver that is down does
not slow a knock (the knock->open times with it down and up are printed) and gets the
queued events once it is back; a flood of spoofed first knocks gives one summary, not a
notification per packet. Each test removes its topology, daemon, receivers and rules,
even on failure.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import require, require_root_tools
from tests.integration.daemon import PYTHON, REPO, Knockgate, connect, serve
from tests.integration.netns import Topology, cleanup_stale

pytestmark = pytest.mark.integration

HOOK_PORT = 8765
SMTP_PORT = 8025
SEQUENCE = ("7113", "2231:udp", "9157")
CONFIG = """\
interfaces: [eth0]
status_socket: @SOCKET@
firewall: {{backend: nftables}}
doors:
  ssh:
    knock: {{sequence: [7113, 2231/udp, 9157], seq_timeout: 5, tcpflags: "syn,!ack"}}
    open: {{ports: [22/tcp], duration: 30}}
notify:
{notify}
"""
WEBHOOK = f"""\
  hook:
    webhook: {{url: "http://127.0.0.1:{HOOK_PORT}/knockgate", secret_file: hook.secret}}
    events: [opened, knocks, held-off, refused]
"""


@pytest.fixture
def topo() -> Iterator[Topology]:
    require_root_tools("nft")
    cleanup_stale()
    with Topology(vlan=False) as topology:
        serve(topology, "server", 22)
        yield topology


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "hook.secret"
    path.write_text("kg-test-secret-7f3a\n")
    path.chmod(0o600)
    return path


class Receiver:
    """A receiver process in the server namespace; ``lines`` what it got so far."""

    def __init__(self, topo: Topology, out: Path, argv: list[str]) -> None:
        self.topo, self.out, self.argv = topo, out, argv
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> Receiver:
        self.process = self.topo.popen(
            "server",
            [
                PYTHON,
                "-m",
                "tests.integration.notify_receivers",
                *self.argv,
                "--out",
                str(self.out),
            ],
            stdout=subprocess.PIPE,
            cwd=str(REPO),
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready"
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None

    def lines(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line]

    def wait_for(
        self, test: Callable[[list[dict[str, Any]]], bool], timeout: float
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.lines()
            if test(got):
                return got
            time.sleep(0.1)
        return self.lines()


@contextlib.contextmanager
def running(*things: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for thing in reversed(things):
            with contextlib.suppress(Exception):
                thing.stop()


def webhook_receiver(topo: Topology, tmp_path: Path, secret: Path) -> Receiver:
    argv = ["webhook", "--port", str(HOOK_PORT), "--secret-file", str(secret)]
    return Receiver(topo, tmp_path / "hook.jsonl", argv)


def knock_and_time(topo: Topology, client: str, address: str, timeout: float = 3.0) -> float:
    """Seconds from sending the knock to the first accepted connect to 22/tcp."""
    topo.run(client, [PYTHON, "-m", "appliance.cli", "knock", address, *SEQUENCE], cwd=str(REPO))
    sent = time.monotonic()
    while connect(topo, client, address, 22, timeout=0.5) != "open":
        if time.monotonic() - sent > timeout:
            raise AssertionError(f"{client}: the knock did not open 22/tcp within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - sent


def opened(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line["event"] for line in lines if line["event"].get("kind") == "opened"]


def test_the_webhook_receiver_verifies_the_signature_of_the_opened_event(
    topo: Topology, tmp_path: Path, secret: Path
) -> None:
    receiver = webhook_receiver(topo, tmp_path, secret).start()
    daemon = Knockgate(topo, tmp_path, CONFIG.format(notify=WEBHOOK))
    with running(receiver, daemon):
        daemon.start()
        server, client = topo.host("server").ipv4, topo.host("client").ipv4
        knock_and_time(topo, "client", server)
        got = receiver.wait_for(lambda lines: bool(opened(lines)), timeout=5)
        (event,) = opened(got)
        assert all(line["verified"] for line in got), got
        assert event["door"] == "ssh" and event["address"] == client
        assert event["host"] and event["version"]
        assert "notify hook" not in daemon.log()  # delivered at once: nothing to log
        assert daemon.stop() == 0
        # One knock is no flood: no "1 first knocks, 2 later steps" summary, even at shutdown.
        assert [line["event"]["kind"] for line in receiver.lines()] == ["opened"]


def test_a_down_receiver_does_not_slow_knocks_and_gets_the_events_when_back(
    topo: Topology, tmp_path: Path, secret: Path
) -> None:
    receiver = webhook_receiver(topo, tmp_path, secret)  # not started: down
    daemon = Knockgate(topo, tmp_path, CONFIG.format(notify=WEBHOOK))
    with running(receiver, daemon):
        daemon.start()
        server = topo.host("server").ipv4
        down = knock_and_time(topo, "client", server)
        assert daemon.wait_log("notify hook: cannot deliver", timeout=5)
        receiver.start()
        got = receiver.wait_for(lambda lines: len(opened(lines)) == 1, timeout=20)
        assert [e["address"] for e in opened(got)] == [topo.host("client").ipv4]
        up = knock_and_time(topo, "other", server)
        got = receiver.wait_for(lambda lines: len(opened(lines)) == 2, timeout=5)
        assert [e["address"] for e in opened(got)][1] == topo.host("other").ipv4
        assert all(line["verified"] for line in got)
        print(f"knock->open with the receiver down: {down * 1000:.0f} ms, up: {up * 1000:.0f} ms")
        log = daemon.log()
        assert log.count("notify hook: cannot deliver") == 1  # once per failure streak
        assert log.count("notify hook: delivering again") == 1


def test_a_receiver_that_never_answers_does_not_slow_knocks_or_hang_the_shutdown(
    topo: Topology, tmp_path: Path, secret: Path
) -> None:
    """A hung receiver (accepts, never answers) holds a delivery thread for its whole
    time-out: knocks still open as fast as with a receiver that answers, and the daemon
    stops within its 2 s flush bound. One daemon per receiver (each starts a fresh flood
    window: 5 opens a minute are sent one by one)."""
    server = topo.host("server").ipv4
    knockers = ("client", "other", "attacker")
    config = (
        CONFIG.format(notify=WEBHOOK)
        .replace("duration: 30", "duration: 2")
        .replace("secret_file: hook.secret", f"secret_file: {secret}")
    )

    def rounds(n: int) -> list[float]:
        times = []
        for i in range(n):
            if i:
                time.sleep(2.5)  # the grants of the round before expire
            times += [knock_and_time(topo, host, server) for host in knockers]
        return times

    results: dict[str, tuple[list[float], float]] = {}
    for name, argv in (
        ("answering", ["webhook", "--port", str(HOOK_PORT), "--secret-file", str(secret)]),
        ("hung", ["blackhole", "--port", str(HOOK_PORT)]),
    ):
        workdir = tmp_path / name
        workdir.mkdir()
        receiver = Receiver(topo, workdir / "receiver.jsonl", argv).start()
        daemon = Knockgate(topo, workdir, config)
        with running(receiver, daemon):
            daemon.start()
            times = rounds(2)
            assert receiver.wait_for(bool, timeout=5), f"{name}: nothing reached the receiver"
            started = time.monotonic()
            assert daemon.stop() == 0
            results[name] = (times, time.monotonic() - started)
            if name == "answering":
                assert len(opened(receiver.lines())) == 5  # the 6th: in the summary
            else:
                assert "not delivered at shutdown" in daemon.log()

    def median(times: list[float]) -> float:
        return sorted(times)[len(times) // 2]

    (up, up_stop), (down, down_stop) = results["answering"], results["hung"]
    print(
        f"knock->open median (max) over {len(up)} knocks: receiver answering "
        f"{median(up) * 1000:.0f} ms ({max(up) * 1000:.0f}), receiver hung "
        f"{median(down) * 1000:.0f} ms ({max(down) * 1000:.0f}); daemon.stop(): "
        f"{up_stop:.2f} s answering, {down_stop:.2f} s hung"
    )
    assert median(down) <= median(up) + 0.05
    assert down_stop < 5.0  # the 2 s flush bound plus the rest of the shutdown


def test_a_flood_of_spoofed_first_knocks_gives_one_summary(
    topo: Topology, tmp_path: Path, secret: Path
) -> None:
    receiver = webhook_receiver(topo, tmp_path, secret).start()
    daemon = Knockgate(topo, tmp_path, CONFIG.format(notify=WEBHOOK))
    with running(receiver, daemon):
        daemon.start()
        server = topo.host("server")
        flood = topo.popen(
            "attacker",
            [
                PYTHON,
                str(REPO / "testbed" / "bench" / "flood.py"),
                "--ifname",
                "eth0",
                "--dst-mac",
                server.mac,
                "--dst-ip",
                server.ipv4,
                "--ports",
                "7113",
                "--rate",
                "5000",
                "--seconds",
                "12",
            ],
            stdout=subprocess.PIPE,
        )
        try:
            out, _ = flood.communicate(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                flood.kill()
        sent = json.loads(out.strip().splitlines()[-1])["sent"]
        assert sent > 30_000
        # The event log's 10 s summaries are held for the minute; the shutdown sends it.
        assert daemon.stop() == 0
        got = receiver.lines()
        assert len(got) == 1, got  # one notification for the whole flood
        (summary,) = [line["event"] for line in got]
        assert summary["kind"] == "knocks"
        assert re.fullmatch(r"[0-9 ]+ first knocks, .* in the last [0-9]+ s", summary["detail"])
        # The summary's count is the flood's: every knock it names was one of ours
        # (first knocks, and resets of an address that knocked again), most of them seen.
        counted = sum(
            int(n.replace(" ", ""))
            for n in re.findall(
                r"([0-9][0-9 ]*) (?:first knocks|later steps|resets|timed out)", summary["detail"]
            )
        )
        by_outcome = summary["counts"]["ssh"]
        assert counted == sum(by_outcome.values())  # the text and the counts agree
        assert 0.5 * sent <= counted <= sent, (counted, sent)
        print(
            f"{sent} spoofed first knocks -> 1 notification counting {counted} "
            f"({counted / sent:.0%}): {summary['detail']}"
        )


def test_a_group_wide_sigusr1_without_a_mail_notifier_is_one_log_line(
    topo: Topology, tmp_path: Path, secret: Path
) -> None:
    """``kill -USR1 -PGID`` reaches the packet process too: it must survive it (and the
    daemon says once that there is no digest to send)."""
    receiver = webhook_receiver(topo, tmp_path, secret).start()
    daemon = Knockgate(topo, tmp_path, CONFIG.format(notify=WEBHOOK))
    with running(receiver, daemon):
        daemon.start()
        assert daemon.process is not None
        os.killpg(daemon.process.pid, signal.SIGUSR1)  # its own session: the daemon's group
        assert daemon.wait_log("no mail notifier", timeout=5), daemon.log()
        time.sleep(0.5)  # a packet process killed by it would be reported meanwhile
        knock_and_time(topo, "client", topo.host("server").ipv4)
        assert daemon.process.poll() is None
        assert daemon.stop() == 0
        log = daemon.log()
        assert log.count("no mail notifier") == 1
        assert "packet process" not in log.split("no mail notifier", 1)[1], log


def test_a_real_smtp_server_receives_the_digest(topo: Topology, tmp_path: Path) -> None:
    require(importlib.util.find_spec("aiosmtpd") is not None, "aiosmtpd is not installed")
    receiver = Receiver(topo, tmp_path / "mail.jsonl", ["smtp", "--port", str(SMTP_PORT)])
    receiver.start()
    notify = f"""\
  daily:
    mail: {{host: 127.0.0.1, port: {SMTP_PORT}, from: knockgate@example.org,
           to: [ops@example.org], every: 1h}}
"""
    daemon = Knockgate(topo, tmp_path, CONFIG.format(notify=notify))
    with running(receiver, daemon):
        daemon.start()
        server, client = topo.host("server").ipv4, topo.host("client").ipv4
        knock_and_time(topo, "client", server)
        time.sleep(0.5)  # the hub takes the opened record
        daemon.signal(signal.SIGUSR1)  # a digest now
        (mail,) = receiver.wait_for(bool, timeout=10)
        assert mail["from"] == "knockgate@example.org" and mail["to"] == ["ops@example.org"]
        data = mail["data"]
        assert "Subject: knockgate digest " in data and ": 1 opens, 0 failures" in data
        assert "Opens: 1 (ssh: 1 from 1 address)" in data
        assert "Failures: 0" in data and "Scanners held off: 0" in data
        assert client not in data.split("\n\n", 1)[0]  # headers: no address
        assert daemon.log().count("notify") == 1  # the start line; quiet since
