"""``knockgate top``: frames rendered from snapshots into a recording console, rates from
two snapshots, and the command's behaviour without a daemon."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console, RenderableType

from appliance.cli import main
from appliance.config import load_config
from appliance.console.top import Top, frame, rates, run
from appliance.core.events import Packet
from appliance.firewall.memory import MemoryBackend
from appliance.runtime.daemon import Daemon
from appliance.runtime.items import StatusRequest
from appliance.runtime.status import StatusServer

CONFIG = """\
status_socket: {tmp}/status.sock
state_dir: {tmp}/state
doors:
  ssh:
    knock: {{sequence: [7113, 2231/udp, 9157]}}
    open: {{ports: [22/tcp], duration: 30}}
  admin:
    knock: {{sequence: [4001, 4002]}}
    open: {{ports: [22/tcp, 8443/tcp], duration: 600}}
  ssh-close:
    knock: {{sequence: [9157, 2231/udp, 7113]}}
    close: [ssh]
"""
A, B = "198.18.5.1", "198.18.5.2"


def render(renderable: RenderableType, width: int = 120) -> list[str]:
    """The frame's lines as a terminal shows them, runs of spaces and box lines squeezed."""
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    console.print(renderable)
    text = console.export_text()
    return [re.sub(r"[\s│─╭╮╰╯┃━]+", " ", line).strip() for line in text.splitlines()]


def has(lines: list[str], *pattern: str) -> bool:
    wanted = re.compile(r"\s".join(pattern))
    return any(wanted.search(line) for line in lines)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def daemon_snapshots(tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A real daemon's snapshot (in-memory firewall), before and 2 s after two knocks."""
    path = tmp_path / "k.yaml"
    path.write_text(CONFIG.format(tmp=tmp_path))
    clock = Clock()
    daemon = Daemon(
        load_config(str(path)), MemoryBackend(clock), clock=clock, wall=clock, capture=False
    )
    daemon.start()
    try:
        before = daemon.snapshot()
        for src, ports in (
            (A, ("7113/tcp", "2231/udp", "9157/tcp")),
            (B, ("4001/tcp", "4002/tcp")),
        ):
            for step in ports:
                port, proto = step.split("/")
                clock.now += 0.1
                daemon._item(Packet(clock.now, src, "198.18.0.1", proto, int(port), 0x02))
        clock.now = 1002.0
        after = daemon.snapshot()
    finally:
        daemon.shutdown()
    return before, after


def test_a_frame_from_a_real_daemon_has_door_grant_and_rate_rows(tmp_path: Path) -> None:
    before, after = daemon_snapshots(tmp_path)
    lines = render(frame(after, rates(before, after), []))
    assert has(lines, "ssh", "3-step sequence", "22/tcp", "1")
    assert has(lines, "admin", "2-step sequence", "22/tcp, 8443/tcp", "1")
    assert has(lines, "ssh-close", "3-step sequence", "closes ssh", "0")
    # Two doors open 22/tcp: each grant is told apart by who knocked on which.
    assert has(lines, "ssh", A, "22/tcp", "28 s")  # 30 s given at 1000.3, now 1002
    assert has(lines, "admin", B, "22/tcp", "9m58s")
    assert has(lines, "admin", B, "8443/tcp", "9m58s")
    assert has(lines, "packets/s", r"2\.5", "5")  # 5 packets in 2 s
    assert has(lines, "opens/min", r"60\.0", "2")
    assert has(lines, "host", r"\S+", "firewall memory", "up 2 s")


def test_a_frame_shows_services_gated_containers_and_recent_events() -> None:
    snapshot = {
        "pid": 7,
        "host": "kg-host",
        "backend": "nftables",
        "uptime": 3725.0,
        "interfaces": ["eth0", "kgwg0"],
        "packet_process": {"pid": 8, "user": "knockgate-packet"},
        "doors": [{"name": "git", "knock": "spa udp/62201", "steps": 1, "open": ["2222/tcp"]}],
        "grants": [{"error": "nft: cannot list set"}],
        "services": [
            {"name": "git", "state": "ready", "running": True, "uptime": 95.0, "grants": 1},
            {"name": "mail", "state": "cold", "running": False, "uptime": 0.0, "grants": 0},
        ],
        "gated": [
            {
                "name": "kg-web",
                "docker": "running",
                "door": "web",
                "ports": ["8080/tcp"],
                "state": "open",
                "grants": 2,
                "problems": [],
            },
            {"name": "kg-db", "docker": "exited", "state": "not gated", "grants": 0},
        ],
        "attempts": 3,
        "counters": {"packets": 9},
    }
    recent = [
        {"time": 1796000000.0, "kind": "opened", "door": "git", "address": A, "detail": "x"},
        {"time": 1796000001.0, "kind": "service-ready", "service": "git", "detail": "310 ms"},
    ]
    lines = render(frame(snapshot, rates(None, snapshot), recent))
    assert has(lines, "host kg-host", "firewall nftables", "up 1h02m", "pid 7", "attempts 3")
    assert has(lines, "capturing on eth0, kgwg0", "packet process pid 8, user knockgate-packet")
    assert has(lines, "git", "spa udp/62201", "2222/tcp")
    assert has(lines, "cannot list: nft: cannot list set")
    assert has(lines, "git", "ready", "up 1m35s", "1")
    assert has(lines, "mail", "cold", "0")
    assert has(lines, "kg-web", "open", "door web, 8080/tcp", "2")
    assert has(lines, "kg-db", "not gated", "no door, no port,")  # then wrapped: narrow
    assert has(lines, "^exited")
    assert has(lines, "packets/s", "-", "9")  # one snapshot: no rate yet
    assert has(lines, r"\d\d:\d\d:\d\d opened door git for 198\.18\.5\.1: x")
    assert has(lines, r"\d\d:\d\d:\d\d service-ready service git: 310 ms")


def test_rates_are_counter_deltas_over_the_daemons_clock() -> None:
    before = {"uptime": 10.0, "counters": {"packets": 100, "stages": 40, "opened": 1}}
    after = {
        "uptime": 12.0,
        "counters": {
            "packets": 300,
            "stages": 50,
            "spa_accepted": 2,
            "opened": 3,
            "frames_dropped": 4,
            "refused": 1,
            "spa_refused": 1,
        },
    }
    got = {r.name: (r.value, r.total) for r in rates(before, after)}
    assert got == {
        "packets/s": (100.0, 300),
        "knocks/s": (6.5, 53),  # 10 steps, 2 SPA knocks accepted, 1 refused
        "opens/min": (60.0, 3),
        "drops/s": (2.0, 4),
        "refused/s": (1.0, 2),
    }
    assert all(r.value is None for r in rates(None, after))  # the first snapshot
    restarted = {"uptime": 1.0, "counters": {"packets": 2}}
    assert all(r.value is None for r in rates(after, restarted))  # a new daemon
    same_time = {"uptime": 12.0, "counters": after["counters"]}
    assert all(r.value is None for r in rates(after, same_time))


def test_no_daemon_is_a_retrying_frame_not_a_traceback(tmp_path: Path) -> None:
    missing = str(tmp_path / "none.sock")
    lines = render(Top(missing, 1.0).refresh())
    assert has(lines, "daemon not reachable, retrying every 1 s")
    assert has(lines, "no knockgate daemon answers on")


def test_once_without_a_daemon_says_so_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["top", "--socket", str(tmp_path / "none.sock"), "--once"]) == 2
    assert "no knockgate daemon answers on" in capsys.readouterr().err


@pytest.mark.parametrize("interval", ["0", "-1", "nan", "4000"])
def test_a_bad_interval_is_refused(interval: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["top", "--interval", interval, "--once"]) == 2
    assert "top --interval: expected 0.1 to 3600 seconds" in capsys.readouterr().err


def test_once_prints_one_frame_with_rates_from_the_status_socket(tmp_path: Path) -> None:
    answers = iter(
        [
            {"uptime": 5.0, "backend": "nftables", "doors": [], "counters": {"packets": 10}},
            {"uptime": 5.1, "backend": "nftables", "doors": [], "counters": {"packets": 30}},
        ]
    )

    def enqueue(item: object) -> None:  # the loop's side
        assert isinstance(item, StatusRequest)
        threading.Thread(target=item.reply, args=(next(answers),)).start()

    server = StatusServer(str(tmp_path / "s.sock"), enqueue)
    server.start()
    try:
        out = io.StringIO()
        console = Console(file=out, width=120, color_system=None)
        assert run(server.path, 0.1, once=True, console=console) == 0
    finally:
        server.stop()
    lines = [re.sub(r"[\s│─╭╮╰╯]+", " ", line).strip() for line in out.getvalue().splitlines()]
    assert has(lines, "packets/s", r"200\.0", "30")
    assert has(lines, "none yet")  # a daemon without an event log: no events, no error


def test_top_without_a_terminal_asks_for_once(tmp_path: Path) -> None:
    console = Console(file=io.StringIO())
    with pytest.raises(Exception, match="not a terminal"):
        run(str(tmp_path / "none.sock"), 1.0, once=False, console=console)


def test_the_daemon_does_not_load_rich() -> None:
    code = "import sys, appliance.cli, appliance.runtime.daemon; print('rich' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_a_grant_on_a_service_port_names_the_service_when_doors_share_it(
    tmp_path: Path,
) -> None:
    """Two doors lead to service git: its grant's door is not known (the service holds
    it, not a door), so the snapshot names the service and the frame shows that."""
    from appliance.core.model import Step

    path = tmp_path / "k.yaml"
    path.write_text(
        f"status_socket: {tmp_path}/status.sock\nstate_dir: {tmp_path}/state\n"
        "services:\n  git:\n    image: git:test\n"
        "    container_port: 22\n    host_port: 2222\n"
        "doors:\n"
        "  git:\n    knock: {sequence: [5001, 5002]}\n    service: git\n"
        "  git-too:\n    knock: {sequence: [5003, 5004]}\n    service: git\n"
        "  ssh:\n    knock: {sequence: [5005, 5006]}\n    open: {ports: [22/tcp]}\n"
    )
    clock = Clock()
    daemon = Daemon(
        load_config(str(path)), MemoryBackend(clock), clock=clock, wall=clock, capture=False
    )
    assert daemon._grant_owner(A, Step(2222, "tcp")) == {"door": None, "service": "git"}
    assert daemon._grant_owner(A, Step(22, "tcp")) == {"door": "ssh"}
    assert daemon._grant_owner(A, Step(9999, "tcp")) == {"door": None}
    snapshot = {
        "grants": [
            {"address": A, "port": "2222/tcp", "expires_in": 5.0, "door": None, "service": "git"}
        ]
    }
    assert has(render(frame(snapshot)), "service git", A, "2222/tcp", "5 s")


def test_a_flood_of_grants_is_cut_to_the_first_to_end_and_counted() -> None:
    grants = [
        {"address": f"198.18.7.{i}", "port": "22/tcp", "expires_in": 100.0 - i, "door": "ssh"}
        for i in range(25)
    ]
    lines = render(frame({"grants": grants}))
    assert has(lines, "ssh", r"198\.18\.7\.24", "22/tcp", "1m16s")  # the soonest first
    assert not has(lines, r"198\.18\.7\.4 ")  # the 21st to end and later: counted
    assert has(lines, r"\.\.\. 5 more")


def test_text_from_the_daemon_is_shown_as_it_is_never_read_as_markup() -> None:
    """An event's detail, a door or a container name with rich markup in it (an error
    text from Redis, a label) is printed literally, not parsed (``[/x]`` would raise)."""
    snapshot = {
        "pid": 7,
        "host": "kg-[bold]host",
        "backend": "nftables",
        "uptime": 5.0,
        "doors": [{"name": "d[/x]", "knock": "sequence", "steps": 3, "open": ["22/tcp"]}],
        "grants": [],
        "services": [],
        "gated": [{"name": "kg-[red]web", "docker": "running", "state": "open", "grants": 0}],
        "counters": {},
    }
    recent = [{"time": 1796000000.0, "kind": "repair", "detail": "redis said [/x] [link=y]"}]
    lines = render(frame(snapshot, rates(None, snapshot), recent))
    assert has(lines, r"host kg-\[bold\]host")
    assert has(lines, r"d\[/x\]", "3-step sequence", "22/tcp")
    assert has(lines, r"kg-\[red\]web", "open")
    assert has(lines, r"repair: redis said \[/x\] \[link=y\]")


def test_an_answer_of_another_shape_is_a_retrying_frame_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon of another version whose snapshot has other types: the frame says so."""
    top = Top(str(tmp_path / "status.sock"), 1.0)
    odd = {"pid": 7, "uptime": "soon", "doors": 5, "counters": []}
    monkeypatch.setattr("appliance.console.top.query", lambda path: odd)
    lines = render(top.refresh())
    assert has(lines, "daemon not reachable, retrying")
    assert any("cannot be shown" in line for line in lines)
