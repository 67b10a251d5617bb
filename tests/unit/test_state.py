"""The state file: what must outlive a restart (SPA replay cache, used TOTP steps), and
whether it can be trusted to hold every entry."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.runtime.state import HEADER, Saved, StateStore


def _written(store: StateStore) -> StateStore:
    store.spa_seen(b"\x01\x02", 200.0)
    store.spa_seen(b"\x03", 150.0)
    store.totp_used("otp", 42, 190.0)
    return store


def test_entries_survive_a_clean_restart_until_they_expire(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path / "state"))
    assert store.load(100.0) == (([], []), None)  # no file yet: a first start, trusted
    assert not (tmp_path / "state").exists()  # nothing to keep, nothing written
    _written(store)
    store.finish(Saved([(b"\x01\x02", 200.0), (b"\x03", 150.0)], [("otp", 42, 190.0)]), 100.0)
    lines = (tmp_path / "state" / "replay").read_text().splitlines()
    assert lines[0] == HEADER and lines[-1].startswith("end 3 ")
    again = StateStore(str(tmp_path / "state"))
    assert again.load(160.0) == (([(b"\x01\x02", 200.0)], [("otp", 42, 190.0)]), None)
    # Compacted, without the trailer (appends follow): the expired entry is gone.
    assert [
        line.rsplit(" ", 1)[0] for line in (tmp_path / "state" / "replay").read_text().splitlines()
    ] == [
        "knockgate-state",
        "spa 0102 200.000",
        "totp otp 42 190.000",
    ]


def test_a_file_left_by_a_crash_is_not_trusted_but_its_entries_count(tmp_path: Path) -> None:
    """Regression: a run that ended without a clean stop (kill -9, a crash) or a file cut
    short at a line boundary looked whole; now it is reported, entries still loaded."""
    _written(StateStore(str(tmp_path))).close()  # appended, never finished
    saved, problem = StateStore(str(tmp_path)).load(100.0)
    assert saved == ([(b"\x01\x02", 200.0), (b"\x03", 150.0)], [("otp", 42, 190.0)])
    assert problem is not None and "clean stop" in problem


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda text: text[: len(text) - 5], "ends in the middle of line"),  # cut mid-line
        (lambda text: "", "no header"),  # truncated to nothing
        (lambda text: text.replace("spa 0102", "spa 0103"), "line 2 is damaged"),  # a bit flip
        (lambda text: text.replace("200.000", "900.000"), "line 2 is damaged"),
        (lambda text: "\n".join(text.split("\n")[:1] + text.split("\n")[2:]), "trailer says 3"),
        (lambda text: text.replace(HEADER, "knockgate-state 0"), "no header"),
        (lambda text: "spa 0102 200.000\n", "no header"),  # an older knockgate's format
    ],
)
def test_a_damaged_replay_file_is_reported_not_read_as_complete(
    tmp_path: Path, damage: Callable[[str], str], why: str
) -> None:
    """Regression: a truncated or corrupted replay file gave an empty (or short) cache
    that looked complete, so a captured SPA packet was accepted again."""
    store = _written(StateStore(str(tmp_path)))
    store.finish(Saved([(b"\x01\x02", 200.0), (b"\x03", 150.0)], [("otp", 42, 190.0)]), 100.0)
    path = tmp_path / "replay"
    path.write_text(damage(path.read_text()))
    _, problem = StateStore(str(tmp_path)).load(100.0)
    assert problem is not None and why in problem


def test_an_unreadable_replay_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "replay").mkdir()  # reading a directory fails, even as root
    saved, problem = StateStore(str(tmp_path)).load(100.0)
    assert saved == ([], [])
    assert problem is not None and "cannot be read" in problem


def test_a_state_dir_that_cannot_be_written_refuses_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = StateStore(str(blocker / "state"))  # a directory under a file: cannot exist
    with caplog.at_level(logging.ERROR, logger="knockgate.state"):
        assert store.spa_seen(b"\x01", 10.0) is False
        assert store.totp_used("otp", 1, 10.0) is False
    errors = [r for r in caplog.records if "cannot write" in r.message]
    assert len(errors) == 1  # logged once, not per packet


def test_compact_keeps_only_what_is_in_force(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path))
    for i in range(5):
        assert store.spa_seen(bytes([i]), 100.0 + i)
    assert store.appended == 5
    store.compact(Saved([(b"\x03", 103.0), (b"\x04", 104.0)], [("otp", 7, 90.0)]), 103.0)
    assert store.appended == 0
    store.spa_seen(b"\x09", 200.0)  # appending goes on after a rewrite
    store.close()
    entries = (tmp_path / "replay").read_text().splitlines()
    assert [line.rsplit(" ", 1)[0] for line in entries] == [
        "knockgate-state",
        "spa 04 104.000",
        "spa 09 200.000",
    ]


def test_a_clean_stop_without_state_leaves_nothing_behind(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path / "state"))
    store.load(100.0)
    store.finish(Saved([], []), 100.0)  # a config without SPA or TOTP doors
    assert not (tmp_path / "state").exists()
