"""The first-start configuration (``knockgate init``): random, valid, off the ephemeral range."""

from __future__ import annotations

from pathlib import Path

from appliance.config import load_config
from appliance.config.initial import EPHEMERAL, RESERVED, initial_config, random_sequence


def test_generated_knocks_never_use_the_ephemeral_range() -> None:
    # 2000 sequences of 4: with the whole 1024-65535 range about 43% of ports would be in
    # 32768-60999, so a regression shows at once.
    for _ in range(2000):
        steps = random_sequence()
        ports = [port for port, _ in steps]
        assert not [port for port in ports if 32768 <= port <= 60999], steps
        assert not set(ports) & RESERVED
        assert len(set(ports)) == len(ports)
        assert all(1024 <= port <= 65535 for port in ports)
    assert EPHEMERAL.start == 32768 and EPHEMERAL.stop - 1 == 60999


def test_generated_knocks_still_reach_both_sides_of_the_range() -> None:
    ports = {port for _ in range(500) for port, _ in random_sequence()}
    assert min(ports) < 32768 and max(ports) > 60999


def test_initial_configs_are_valid_and_their_knocks_off_the_ephemeral_range(
    tmp_path: Path,
) -> None:
    for index in range(50):
        path = tmp_path / f"k{index}.yaml"
        path.write_text(initial_config(str(tmp_path / "ssh-keys")))
        config = load_config(str(path)).config
        for door in config.doors:
            assert [s.port for s in door.knock.sequence if s.port in EPHEMERAL] == []
