"""The daemon's loop itself, driven on a scripted clock: timers, clock steps, faults.

A fake selector stands in for the kernel: ``select(timeout)`` moves the fake clock
forward to the next scripted item (or by the whole timeout) and delivers that
item through the daemon's own queue and wake pipe, so every pass of the real
loop (deadlines, timers, upkeep, shutdown) runs exactly as in production, only
without waiting.
"""

from __future__ import annotations

import selectors
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.config import load_config
from appliance.core.events import Packet
from appliance.core.model import Step
from appliance.errors import FirewallError
from appliance.firewall.memory import MemoryBackend
from appliance.runtime import daemon as daemon_module
from appliance.runtime.daemon import Daemon
from appliance.runtime.items import Signal, StatusRequest

CONFIG = """\
status_socket: {tmp}/status.sock
state_dir: {tmp}/state
on_shutdown: {on_shutdown}
firewall: {{scan: false}}
doors:
  ssh:
    knock: {{sequence: [7113, 2231/udp, 9157], seq_timeout: 5}}
    open: {{ports: [22/tcp], duration: 30}}
  cmd:
    knock: {{sequence: [4001, 4002, 4003], seq_timeout: 5}}
    start_command: echo start %IP% >> {tmp}/marks
    stop_command: echo stop %IP% >> {tmp}/marks
    cmd_timeout: {cmd_timeout}
"""

A, B = "198.18.5.1", "198.18.5.2"
HOST = "198.18.0.1"


class Clocks:
    """The engine's clock (monotonic) and the wall clock, apart, as on a real host."""

    def __init__(self) -> None:
        self.mono = 5000.0
        self.wall_offset = 1_700_000_000.0

    def monotonic(self) -> float:
        return self.mono

    def wall(self) -> float:
        return self.mono + self.wall_offset


Script = list[tuple[float, Any]]  # (monotonic time, queue item or callable)


class FakeSelector:
    """``select`` advances the fake clock instead of sleeping; scripted items arrive
    through the daemon's queue at their time."""

    def __init__(self, clocks: Clocks, script: Script, daemon: Daemon) -> None:
        self.clocks = clocks
        self.script = script
        self.daemon = daemon
        self.keys: dict[Any, selectors.SelectorKey] = {}
        self.passes = 0

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = selectors.SelectorKey(
            fileobj, fileobj if isinstance(fileobj, int) else 0, events, data
        )
        self.keys[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> None:
        self.keys.pop(fileobj)

    def close(self) -> None:
        pass

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self.passes += 1
        if self.passes > 100_000:
            raise AssertionError("the loop spins")
        target = self.clocks.mono + (timeout or 0.0)
        if self.script and self.script[0][0] <= target:
            at, item = self.script.pop(0)
            self.clocks.mono = max(self.clocks.mono, at)
            if callable(item):
                item()
                return []
            self.daemon.enqueue(item)
            wake = next(key for key in self.keys.values() if key.data is None)
            return [(wake, selectors.EVENT_READ)]
        self.clocks.mono = target
        return []


@pytest.fixture
def make(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Daemon]]:
    made: list[Daemon] = []

    def build(
        script: Script,
        on_shutdown: str = "keep",
        cmd_timeout: float = 10.0,
        clocks: Clocks | None = None,
    ) -> Daemon:
        path = tmp_path / "k.yaml"
        path.write_text(
            CONFIG.format(tmp=tmp_path, on_shutdown=on_shutdown, cmd_timeout=cmd_timeout)
        )
        clocks = clocks or Clocks()
        backend = MemoryBackend(clocks.monotonic)
        daemon = Daemon(
            load_config(str(path)),
            backend,
            clock=clocks.monotonic,
            wall=clocks.wall,
            capture=False,
        )
        selector = FakeSelector(clocks, script, daemon)
        monkeypatch.setattr(daemon_module.selectors, "DefaultSelector", lambda: selector)
        daemon.start()
        made.append(daemon)
        return daemon

    yield build
    for daemon in made:
        daemon.shutdown()


def knock(at: float, src: str, *ports: str, gap: float = 0.1) -> Script:
    items: Script = []
    for i, spec in enumerate(ports):
        port, _, proto = spec.partition("/")
        ts = at + i * gap
        items.append((ts, Packet(ts, src, HOST, proto or "tcp", int(port), 0x02)))
    return items


def marks(tmp_path: Path) -> list[str]:
    path = tmp_path / "marks"
    return path.read_text().splitlines() if path.exists() else []


def term(at: float) -> Script:
    return [(at, Signal("stop"))]


def wait_commands(daemon: Daemon) -> None:
    daemon.runner.pool.shutdown(wait=True)


# ----------------------------------------------------------------- timers


@pytest.fixture
def submitted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float]]:
    """(phase, engine time) of every command handed to the command runner."""
    seen: list[tuple[str, float]] = []
    real = daemon_module.CommandRunner.submit

    def submit(self: Any, command: Any) -> None:
        seen.append((command.phase, command.at))
        real(self, command)

    monkeypatch.setattr(daemon_module.CommandRunner, "submit", submit)
    return seen


def test_a_tick_and_a_packet_in_one_pass_never_lose_a_deadline(
    make: Callable[..., Daemon], submitted: list[tuple[str, float]]
) -> None:
    """Regression: when a packet and the due tick fell in the same pass of the loop, the
    loop forgot the engine's next deadline while the engine believed it armed: a pending
    stop command then waited for the next knock packet (forever, with no traffic)."""
    # B's attempt on ssh expires at 5005.0; the cmd door's stop is due at 5012.2. A
    # packet arrives exactly at 5005.0, in the same pass as that expiry; nothing after.
    script = knock(5000.0, B, "7113")
    script += knock(5002.0, A, "4001", "4002", "4003")
    script += [(5005.0, Packet(5005.0, B, HOST, "tcp", 9999, 0x02))]
    script += term(5100.0)
    daemon = make(script, cmd_timeout=10.0)
    daemon.run()
    assert submitted == [("start", 5002.2), ("stop", 5012.2)]  # at its time, not at exit
    assert daemon.engine.counters.timeouts == 1


def test_a_stop_command_runs_at_its_time_with_no_traffic_at_all(
    make: Callable[..., Daemon], submitted: list[tuple[str, float]], tmp_path: Path
) -> None:
    daemon = make(knock(5000.0, A, "4001", "4002", "4003") + term(5100.0), cmd_timeout=7.0)
    daemon.run()
    assert submitted == [("start", 5000.2), ("stop", 5007.2)]
    assert marks(tmp_path) == [f"start {A}", f"stop {A}"]


# ----------------------------------------------------------------- clock steps


def test_a_clock_stepped_back_does_not_stretch_a_knock_or_delay_a_stop(
    make: Callable[..., Daemon], submitted: list[tuple[str, float]]
) -> None:
    """Regression: after the wall clock was stepped back an hour, a knockd stop command
    ran 3 610 s late and a knock spread over 600 s opened a door with seq_timeout 5.
    Timeouts and delays now follow the monotonic clock; the step is logged once."""
    clocks = Clocks()
    ran: list[float] = []

    def step_back() -> None:
        clocks.wall_offset -= 3600.0

    def when() -> None:
        ran.append(clocks.mono)

    script: Script = knock(5000.0, A, "4001", "4002", "4003")  # stop due at 5010.2
    script += [(5001.0, step_back)]
    script += knock(5002.0, B, "7113", "2231/udp")  # then 600 s pass before the last step
    script += knock(5602.0, B, "9157")
    script += term(5700.0)
    daemon = make(script, clocks=clocks)
    daemon.run()
    assert submitted == [("start", 5000.2), ("stop", 5010.2)]
    backend = daemon.backend
    assert isinstance(backend, MemoryBackend)
    assert not backend.is_open(B, Step(22, "tcp"))
    assert daemon.engine.counters.opened == 1  # only the cmd door
    assert daemon.stats.clock_steps == 1
    assert daemon.engine.wall_offset == pytest.approx(clocks.wall_offset)


def test_a_clock_stepped_forward_does_not_cut_a_grant_short(make: Callable[..., Daemon]) -> None:
    clocks = Clocks()

    def step_forward() -> None:
        clocks.wall_offset += 7200.0

    script = [*knock(5000.0, A, "7113", "2231/udp", "9157"), (5001.0, step_forward)]
    script += [(5020.0, lambda: None), *term(5025.0)]
    daemon = make(script, clocks=clocks)
    daemon.run()
    backend = daemon.backend
    assert isinstance(backend, MemoryBackend)
    assert backend.is_open(A, Step(22, "tcp"))  # 30 s from 5000.2, whatever the wall says
    clocks.mono = 5030.3
    assert not backend.is_open(A, Step(22, "tcp"))


# ----------------------------------------------------------------- reload


def test_a_sighup_keeps_an_unchanged_doors_attempt_and_its_pending_stop(
    make: Callable[..., Daemon], submitted: list[tuple[str, float]], tmp_path: Path
) -> None:
    """Regression: SIGHUP dropped every attempt in progress and ran pending stop
    commands at once. Now a knock half done before a reload completes after it, and a
    stop runs cmd_timeout after its start."""
    script: Script = knock(5000.0, A, "4001", "4002", "4003")  # stop due at 5010.2
    script += knock(5001.0, B, "7113", "2231/udp")
    script += [(5002.0, Signal("reload"))]
    script += knock(5003.0, B, "9157")
    script += term(5100.0)
    daemon = make(script, cmd_timeout=10.0)
    daemon.run()
    assert submitted == [("start", 5000.2), ("stop", 5010.2)]
    assert daemon.stats.reloads == 1
    assert daemon.engine.counters.opened == 2  # B's knock, begun before the reload, too


def test_a_sighup_that_changes_a_door_drops_only_that_doors_attempts(
    make: Callable[..., Daemon], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def edit() -> None:
        path = tmp_path / "k.yaml"
        path.write_text(path.read_text().replace("[4001, 4002, 4003]", "[4001, 4002, 4009]"))

    script: Script = knock(5000.0, A, "4001", "4002")
    script += knock(5000.5, B, "7113", "2231/udp")
    script += [(5001.0, edit), (5001.5, Signal("reload"))]
    script += knock(5002.0, A, "4009")
    script += knock(5002.0, B, "9157")
    script += term(5100.0)
    daemon = make(script)
    daemon.run()
    assert daemon.engine.counters.opened == 1  # B's ssh; A's cmd attempt was dropped
    logged = capsys.readouterr().out
    assert "doors: kept (attempts in progress go on) ssh; changed (attempts dropped) cmd" in logged


# ----------------------------------------------------------------- faults


def test_an_exception_escaping_the_loop_still_runs_the_shutdown_policy(
    make: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Regression: the loop had no try/finally, so an error escaping it skipped the
    shutdown policy and the pending stop commands: a start command's hole stayed open."""

    def explode() -> None:
        raise OSError("the selector failed")

    script = knock(5000.0, A, "7113", "2231/udp", "9157")
    script += [*knock(5001.0, A, "4001", "4002", "4003"), (5002.0, explode)]
    daemon = make(script, on_shutdown="revoke")
    with pytest.raises(OSError, match="the selector failed"):
        daemon.run()
    backend = daemon.backend
    assert isinstance(backend, MemoryBackend)
    assert not backend.is_open(A, Step(22, "tcp"))  # on_shutdown: revoke ran
    assert marks(tmp_path) == [f"start {A}", f"stop {A}"]  # the pending stop ran


@pytest.mark.parametrize(
    "fault", ["grant", "engine", "status", "reload", "reload-rollback", "check", "upkeep"]
)
def test_an_exception_in_a_handler_is_contained_and_the_daemon_keeps_serving(
    make: Callable[..., Daemon], tmp_path: Path, fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception in any handler is logged and counted; a later knock still
    opens, and at the end the shutdown policy and the pending stop still run."""
    box: dict[str, Daemon] = {}
    opened_later: list[bool] = []

    def inject() -> None:
        daemon = box["daemon"]
        backend = daemon.backend
        assert isinstance(backend, MemoryBackend)
        if fault == "grant":
            monkeypatch.setattr(backend, "grant", _once(backend.grant, RuntimeError("bug")))
        elif fault == "engine":
            monkeypatch.setattr(daemon.engine, "handle", _once(daemon.engine.handle, KeyError(1)))
        elif fault == "status":
            daemon.enqueue(StatusRequest(_raise(ValueError("status bug"))))
        elif fault == "reload":
            monkeypatch.setattr(daemon_module, "load_config", _raise(MemoryError("reload bug")))
            daemon.enqueue(Signal("reload"))
        elif fault == "reload-rollback":
            # The new rules fail, and so does putting the running ones back.
            monkeypatch.setattr(backend, "setup", _raise(FirewallError("setup refused")))
            daemon.enqueue(Signal("reload"))
        elif fault == "check":
            monkeypatch.setattr(backend, "check", _raise(RuntimeError("check bug")))
        elif fault == "upkeep":
            monkeypatch.setattr(daemon_module, "flush_noise", _raise(RuntimeError("upkeep bug")))

    def look() -> None:
        backend = box["daemon"].backend
        assert isinstance(backend, MemoryBackend)
        opened_later.append(backend.is_open(A, Step(22, "tcp")))

    script: Script = [(5000.0, inject)]
    script += knock(5001.0, B, "7113", "2231/udp", "9157")  # may be hit by the fault
    script += knock(5010.0, A, "4001", "4002", "4003")
    script += knock(5020.0, A, "7113", "2231/udp", "9157")  # after it: must open
    script += [(5025.0, look), *term(5030.0)]
    daemon = make(script, on_shutdown="revoke", cmd_timeout=100.0)
    box["daemon"] = daemon
    daemon.run()
    backend = daemon.backend
    assert isinstance(backend, MemoryBackend)
    assert opened_later == [True]
    assert daemon.stats.internal_errors + daemon.stats.reload_failures >= 1
    assert marks(tmp_path) == [f"start {A}", f"stop {A}"]  # the stop ran at shutdown
    assert not backend.is_open(A, Step(22, "tcp"))  # revoked at shutdown


def _raise(error: BaseException) -> Callable[..., Any]:
    def fail(*_: Any, **__: Any) -> Any:
        raise error

    return fail


def _once(real: Callable[..., Any], error: BaseException) -> Callable[..., Any]:
    state = {"done": False}

    def maybe(*args: Any, **kwargs: Any) -> Any:
        if not state["done"]:
            state["done"] = True
            raise error
        return real(*args, **kwargs)

    return maybe


def test_a_bug_hit_by_every_packet_logs_one_traceback_and_a_summary_a_minute(
    make: Callable[..., Daemon], caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: each repeat of an internal error wrote a line ("again (N in all)"): a
    bug on the packet path under a flood became a line per packet."""
    box: dict[str, Daemon] = {}

    def inject() -> None:
        daemon = box["daemon"]
        daemon.spa.route = _raise(RuntimeError("route bug"))  # type: ignore[method-assign]

    script: Script = [(5000.0, inject)]
    for i in range(200):  # 200 packets over 100 s, each one hits the bug
        at = 5001.0 + i * 0.5
        script.append((at, Packet(at, B, HOST, "tcp", 7113, 0x02)))
    script += term(5200.0)
    daemon = make(script)
    box["daemon"] = daemon
    with caplog.at_level("INFO", logger="knockgate"):
        daemon.run()
    logged = caplog.text
    assert daemon.stats.internal_errors == 200
    assert logged.count("Traceback") == 1
    summaries = [line for line in logged.splitlines() if "more in the last 60 s" in line]
    assert 2 <= len(summaries) <= 4  # about one a minute, and one at shutdown
    assert sum(int(line.split(": ")[1].split()[0]) for line in summaries) == 199
