"""Property: a SIGHUP reload of any mutated configuration never kills or freezes the daemon.

The daemon (in-memory firewall, no capture) is started on a valid configuration;
its file is then replaced by a mutation of it (tests/unit/test_config_fuzz.py's
mutations: tags, aliases and alias bombs, deep nesting, huge numbers, control bytes,
flips, line shuffles, truncation) and reloaded. Whatever the file, ``reload()``
returns within the deadline and bounded memory, the daemon runs either the old
configuration (the reload was refused and counted) or the new one, its firewall plan
matches the configuration it runs, and a knock on the running door still opens.
"""

from __future__ import annotations

import shutil
import tempfile
import tracemalloc
from datetime import timedelta
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.config import load_config
from appliance.core.events import Packet
from appliance.core.model import Step
from appliance.firewall.memory import MemoryBackend
from appliance.runtime.daemon import Daemon, firewall_plan
from tests.unit.test_config_fuzz import MUTATION, mutate

SEED = """\
log: {{level: error}}
status_socket: {tmp}/status.sock
state_dir: {tmp}/state
firewall: {{scan: {{ports: 20, window: 1.5, hold: 120}}, always_allow: [198.18.200.0/24]}}
doors:
  ssh:
    knock: {{sequence: [7113/tcp, "2231:udp", 9157], seq_timeout: 2.5}}
    open: {{ports: [22/tcp], duration: 45}}
  close-ssh:
    knock: {{sequence: "9157,2231:udp,7113"}}
    close: ssh
  otp:
    knock:
      totp: {{secret: GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ, steps: 4, period: 30}}
    open: {{ports: [2222/tcp], duration: 20}}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def knock_opens(daemon: Daemon, backend: MemoryBackend, clock: Clock, src: str) -> bool:
    door = daemon.config.doors[0]
    steps = daemon.engine.active_sequence(door.name)
    for step in steps:
        clock.now += 0.01
        daemon._item(Packet(clock.now, src, "198.18.0.1", step.proto, step.port, 0x02))
    assert door.open is not None
    return all(backend.is_open(src, port) for port in door.open.ports)


@settings(
    max_examples=150,
    deadline=timedelta(seconds=3),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3))
def test_a_reload_of_any_mutated_file_keeps_the_daemon_serving(
    mutations: list[tuple[str, int, int, int]],
) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="knockgate-reload-fuzz-"))
    try:
        path = tmp / "knockgate.yaml"
        seed = SEED.format(tmp=tmp).encode()
        path.write_bytes(seed)
        clock = Clock()
        backend = MemoryBackend(clock)
        daemon = Daemon(load_config(str(path)), backend, clock=clock, wall=clock, capture=False)
        daemon.start()
        try:
            data = seed
            for mutation in mutations:
                data = mutate(data, *mutation)
            path.write_bytes(data)
            before = daemon.config
            tracemalloc.start()
            try:
                daemon.reload()
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak < 64 << 20, peak
            refused = daemon.stats.reload_failures == 1
            assert refused != (daemon.stats.reloads == 1)
            if refused:
                assert daemon.config is before
            assert backend.plan == firewall_plan(daemon.config)
            if daemon.config.doors[0].open is not None and daemon.config.doors[0].knock.sequence:
                assert knock_opens(daemon, backend, clock, "198.18.5.1")
            assert daemon.stats.internal_errors == 0
        finally:
            daemon.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_the_seed_knock_opens() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="knockgate-reload-fuzz-"))
    try:
        path = tmp / "knockgate.yaml"
        path.write_text(SEED.format(tmp=tmp))
        clock = Clock()
        backend = MemoryBackend(clock)
        daemon = Daemon(load_config(str(path)), backend, clock=clock, wall=clock, capture=False)
        daemon.start()
        try:
            assert knock_opens(daemon, backend, clock, "198.18.5.1")
            assert backend.is_open("198.18.5.1", Step(22, "tcp"))
        finally:
            daemon.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
