"""The knocker's side: waiting for a port, the stdin/stdout relay, grant renewal.

Pure parts (WaitProgress, Renewal, TOTP step choice) are driven with times; the
I/O parts run on loopback sockets and pipes of the test's own (no root, no packet
leaves the machine).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from appliance.cli import main
from appliance.core.engine import KnockEngine
from appliance.core.events import Grant, Opened
from appliance.core.model import Door, Knock, OneTimeFile, OpenPorts, Step, Totp
from appliance.core.totp import time_step, totp_sequence
from appliance.errors import KnockError
from appliance.knocker.door import DoorKnocker
from appliance.knocker.keepalive import Renewal, renew_after
from appliance.knocker.relay import Timer, relay
from appliance.knocker.wait import PortStayedClosed, WaitProgress, wait_open
from tests.unit.helpers import door, play, tcp

A = "198.18.5.1"

# ----------------------------------------------------------------- waiting (pure)


def test_wait_progress_reports_the_first_answer_once_then_the_opening() -> None:
    progress = WaitProgress("198.18.0.1", 22, started=100.0, timeout=30.0)
    assert progress.probed("refused", 100.01) == [
        "198.18.0.1 port 22/tcp answers (reset: still closed to us), waiting for it to open"
    ]
    assert progress.probed("refused", 100.06) == []  # quiet while it stays closed
    assert progress.probed("open", 100.25) == [
        "198.18.0.1 port 22/tcp accepts connections: open after 0.250 s (3 tries)"
    ]
    assert not progress.expired(1000.0)  # open: never expires


def test_wait_progress_silence_is_reported_once() -> None:
    progress = WaitProgress("198.18.0.1", 22, started=0.0, timeout=5.0)
    assert progress.probed("timeout", 1.0) == [
        "198.18.0.1 port 22/tcp: no answer yet, still trying"
    ]
    assert progress.probed("timeout", 2.0) == []


def test_wait_progress_retries_fast_then_slower_and_never_past_the_deadline() -> None:
    progress = WaitProgress("h", 22, started=0.0, timeout=3.0)
    progress.probed("refused", 0.0)
    assert progress.next_try(0.0) == pytest.approx(0.02)
    for _ in range(30):
        progress.probed("refused", 0.1)
    assert progress.next_try(1.0) == pytest.approx(1.25)
    assert progress.next_try(2.9) == 3.0


@pytest.mark.parametrize(
    ("outcome", "hint"),
    [
        ("refused", "the door did not open for this address"),
        ("timeout", "nothing answered"),
        ("unreachable", "cannot be reached"),
    ],
)
def test_a_port_that_never_opens_says_what_to_check(outcome: str, hint: str) -> None:
    progress = WaitProgress("198.18.0.1", 2222, started=0.0, timeout=2.0)
    progress.probed(outcome, 1.0, "No route to host")  # type: ignore[arg-type]
    progress.probed(outcome, 2.0, "No route to host")  # type: ignore[arg-type]
    assert progress.expired(2.0)
    message = progress.failure()
    assert message.startswith("198.18.0.1 port 2222/tcp did not open within 2 s (2 tries: 2 ")
    assert hint in message


# ----------------------------------------------------------------- waiting (loopback)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server
    server.close()


def test_wait_open_returns_the_connected_socket(listener: socket.socket) -> None:
    lines: list[str] = []
    port = listener.getsockname()[1]
    sock, progress = wait_open(socket.AF_INET, "127.0.0.1", port, 2.0, lines.append)
    with sock:
        peer, _ = listener.accept()
        with peer:
            sock.sendall(b"ping")
            assert peer.recv(4) == b"ping"
    assert progress.tries == 1
    assert len(lines) == 1 and "accepts connections" in lines[0]


def test_wait_open_gives_up_at_the_timeout_on_a_closed_port() -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens: every connect is refused
    started = time.monotonic()
    with pytest.raises(PortStayedClosed, match=r"did not open within 0\.4 s") as caught:
        wait_open(socket.AF_INET, "127.0.0.1", port, 0.4, lambda line: None)
    assert 0.35 < time.monotonic() - started < 2.0
    assert "door did not open for this address" in str(caught.value)


# ----------------------------------------------------------------- relay


class Ends:
    """The relay's stdin/stdout (pipes) and the server's end of its socket."""

    def __init__(self) -> None:
        self.client, self.server = socket.socketpair()
        self.stdin_r, self.stdin_w = os.pipe()
        self.stdout_r, self.stdout_w = os.pipe()

    def close(self) -> None:
        for fd in (self.stdin_r, self.stdin_w, self.stdout_r, self.stdout_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.client.close()
        self.server.close()


@pytest.fixture
def ends() -> Iterator[Ends]:
    pair = Ends()
    yield pair
    pair.close()


def run_relay(ends: Ends, timer: Timer | None = None) -> tuple[threading.Thread, list[object]]:
    results: list[object] = []
    thread = threading.Thread(
        target=lambda: results.append(relay(ends.client, ends.stdin_r, ends.stdout_w, timer=timer)),
        daemon=True,
    )
    thread.start()
    return thread, results


def read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return data


def test_relay_carries_both_ways_and_passes_each_half_close_on(ends: Ends) -> None:
    thread, results = run_relay(ends)
    os.write(ends.stdin_w, b"SSH-2.0-client\r\n")
    assert ends.server.recv(100) == b"SSH-2.0-client\r\n"
    ends.server.sendall(b"SSH-2.0-server\r\n")
    assert os.read(ends.stdout_r, 100) == b"SSH-2.0-server\r\n"
    os.close(ends.stdin_w)  # the client is done sending: the server sees EOF...
    assert ends.server.recv(100) == b""
    big = bytes(range(256)) * 4096  # ...and may still answer (1 MiB, past every buffer)

    def answer() -> None:
        ends.server.sendall(big)
        ends.server.close()

    sender = threading.Thread(target=answer)
    sender.start()
    assert read_all(ends.stdout_r) == big  # then stdout ends: ssh sees the connection end
    sender.join(5)
    thread.join(5)
    assert not thread.is_alive()
    (result,) = results
    assert result.error is None  # type: ignore[attr-defined]
    assert (result.sent, result.received) == (16, 16 + len(big))  # type: ignore[attr-defined]


def test_relay_ends_when_the_server_closes_first_and_stdin_then_ends(ends: Ends) -> None:
    thread, results = run_relay(ends)
    ends.server.sendall(b"bye")
    ends.server.close()
    assert read_all(ends.stdout_r) == b"bye"
    assert thread.is_alive()  # stdin still open: what ssh writes could still go out
    os.close(ends.stdin_w)
    thread.join(5)
    assert not thread.is_alive() and results[0].error is None  # type: ignore[attr-defined]


def test_relay_stops_when_the_server_is_gone_mid_stream(ends: Ends) -> None:
    thread, results = run_relay(ends)
    os.write(ends.stdin_w, b"x")
    assert ends.server.recv(1) == b"x"
    ends.server.close()  # gone for good: the next write fails (EPIPE)
    os.write(ends.stdin_w, b"y" * 10)
    thread.join(5)
    assert not thread.is_alive()
    assert results[0].error is not None  # type: ignore[attr-defined]


def test_relay_restores_the_file_flags_it_changed(ends: Ends) -> None:
    import fcntl

    before = fcntl.fcntl(ends.stdin_r, fcntl.F_GETFL)
    thread, _ = run_relay(ends)
    ends.server.close()
    os.close(ends.stdin_w)
    thread.join(5)
    assert fcntl.fcntl(ends.stdin_r, fcntl.F_GETFL) == before


class CountingTimer:
    def __init__(self, every: float) -> None:
        self.every = every
        self.next = time.monotonic() + every
        self.fired: list[float] = []

    def due(self) -> float | None:
        return self.next

    def fire(self, now: float) -> None:
        self.fired.append(now)
        self.next = now + self.every


def test_relay_fires_its_timer_while_idle(ends: Ends) -> None:
    timer = CountingTimer(0.05)
    thread, _ = run_relay(ends, timer)
    time.sleep(0.4)
    ends.server.close()
    os.close(ends.stdin_w)
    thread.join(5)
    assert 5 <= len(timer.fired) <= 9


# ----------------------------------------------------------------- renewal


@pytest.mark.parametrize(
    ("grant", "after"), [(3.0, 1.5), (30.0, 15.0), (60.0, 30.0), (300.0, 270.0), (0.4, 0.5)]
)
def test_renewal_comes_at_half_a_short_grant_and_30_s_before_a_long_ones_end(
    grant: float, after: float
) -> None:
    assert renew_after(grant) == after


def test_renewal_retries_a_failed_knock_and_says_so_once() -> None:
    lines: list[str] = []
    answers: list[str | Exception | None] = ["sent", KnockError("no route"), None, "sent"]

    def knock() -> str | None:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    renewal = Renewal(knock, grant=4.0, last=100.0, say=lines.append)
    assert renewal.due() == 102.0
    renewal.fire(102.0)
    assert (renewal.renewals, renewal.due()) == (1, 104.0)
    renewal.fire(104.0)
    assert renewal.due() == 105.0 and lines == ["renewal failed, trying again every 1 s: no route"]
    renewal.fire(105.0)  # a TOTP door with no step left: the same retry, no new line
    assert renewal.due() == 106.0 and len(lines) == 1
    renewal.fire(106.0)
    assert lines[-1] == "renewal works again" and renewal.due() == 108.0
    assert (renewal.renewals, renewal.failures, renewal.times) == (2, 2, [102.0, 106.0])


def test_totp_renewals_take_the_next_unused_time_step_within_the_skew() -> None:
    totp = Totp(b"0123456789abcdefghij", steps=3, period=30, skew=1)
    knocker = DoorKnocker(
        Door("otp", Knock((), totp=totp), OpenPorts((Step(22, "tcp"),), 10.0)),
        socket.AF_INET,
        "198.18.0.1",
    )
    now = 30.0 * 1000 + 1
    current = time_step(totp, now)
    assert knocker.sequence(now) == totp_sequence(totp, current)
    assert knocker.sequence(now + 5) == totp_sequence(totp, current + 1)
    assert knocker.sequence(now + 10) is None  # c + 2 is past the server's window
    assert knocker.sequence(now + 30) == totp_sequence(totp, current + 2)


def test_door_knocker_refuses_doors_it_cannot_wait_for_or_renew() -> None:
    ssh = OpenPorts((Step(22, "tcp"),))
    with pytest.raises(KnockError, match="opens no port"):
        DoorKnocker(Door("cmd", Knock((Step(1, "tcp"),))), socket.AF_INET, "198.18.0.1")
    one_time = Knock((), one_time=OneTimeFile("/x", ()))
    with pytest.raises(KnockError, match="one-time"):
        DoorKnocker(Door("ot", one_time, ssh), socket.AF_INET, "198.18.0.1")


def test_server_knock_on_a_door_already_open_grants_again_with_a_later_deadline() -> None:
    """What renewal relies on: the engine grants each completed knock; the backends
    replace the element's timeout (golden-tested in test_nft_rules / test_iptables_rules)."""
    engine = KnockEngine([door("ssh", 7113, 9157, duration=3)])
    play(engine, tcp(100.0, A, 7113))
    assert play(engine, tcp(100.1, A, 9157))[-1] == Grant(
        100.1, "ssh", A, (Step(22, "tcp"),), 103.1
    )
    play(engine, tcp(101.6, A, 7113))
    assert play(engine, tcp(101.7, A, 9157)) == [
        Opened(101.7, "ssh", A),
        Grant(101.7, "ssh", A, (Step(22, "tcp"),), 104.7),
    ]


# ----------------------------------------------------------------- command line


CONFIG = """\
doors:
  ssh:
    knock: {sequence: [7113/tcp, 9157/tcp, 2231/udp]}
    open: {ports: [2222/tcp], duration: 3}
  cmd:
    knock: {sequence: [7114/tcp, 9158/tcp, 2232/udp]}
    start_command: "true"
"""


@pytest.fixture
def config(tmp_path: object) -> str:
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "knockgate.yaml"
    path.write_text(CONFIG)
    return str(path)


def test_knock_wait_needs_a_port_to_wait_for(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["knock", "127.0.0.1", "7000", "--wait"]) == 1
    assert "--wait needs --port PORT" in capsys.readouterr().err


def test_knock_wait_on_a_door_that_opens_nothing_asks_for_port(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["knock", "127.0.0.1", "--door", "cmd", "--config", config, "--wait"]) == 1
    assert "opens no TCP port: give --port PORT" in capsys.readouterr().err


def test_knock_wait_reports_a_port_that_never_opens_with_exit_3(
    capsys: pytest.CaptureFixture[str],
) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    argv = ["knock", "127.0.0.1", "7000:udp", "--wait", "--port", str(port), "--timeout", "0.3"]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "knock sent to 127.0.0.1: 1 knock(s), waiting for port" in err
    assert f"knockgate knock: 127.0.0.1 port {port}/tcp did not open within 0.3 s" in err


def test_knock_wait_returns_once_the_port_accepts(
    listener: socket.socket, capsys: pytest.CaptureFixture[str]
) -> None:
    port = listener.getsockname()[1]
    assert main(["knock", "127.0.0.1", "7000:udp", "--wait", "--port", str(port)]) == 0
    assert "accepts connections: open after" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--door", "nope"], "unknown door 'nope'"),
        (["--door", "cmd"], "opens no port"),
    ],
)
def test_connect_refuses_bad_doors(
    config: str, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["connect", "127.0.0.1", "2222", "--config", config, *argv]) == 1
    assert message in capsys.readouterr().err


def test_connect_refuses_a_port_the_door_does_not_open(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["connect", "127.0.0.1", "22", "--door", "ssh", "--config", config]) == 1
    err = capsys.readouterr().err
    assert "door 'ssh' opens 2222/tcp, not 22/tcp" in err
    assert capsys.readouterr().out == ""


def test_knock_port_and_timeout_without_wait_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["knock", "127.0.0.1", "7000", "--port", "22"]) == 1
    assert "--port and --timeout go with --wait" in capsys.readouterr().err


def test_connect_to_a_port_that_never_opens_exits_3_with_nothing_on_stdout(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    import pathlib

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    path = pathlib.Path(str(tmp_path)) / "knockgate.yaml"
    path.write_text(CONFIG.replace("2222/tcp", f"{port}/tcp"))
    argv = ["connect", "127.0.0.1", str(port), "--door", "ssh", "--config", str(path)]
    assert main([*argv, "--timeout", "0.3"]) == 3
    out, err = capsys.readouterr()
    assert out == ""
    assert f"knockgate connect: 127.0.0.1 port {port}/tcp did not open within 0.3 s" in err
