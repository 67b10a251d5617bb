"""The state file: what must outlive a restart (SPA replay cache, used TOTP steps)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from appliance.runtime.state import Saved, StateStore


def test_entries_survive_a_restart_until_they_expire(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path / "state"))
    assert store.load(100.0) == ([], [])
    assert not (tmp_path / "state").exists()  # nothing to keep, nothing written
    store.spa_seen(b"\x01\x02", 200.0)
    store.spa_seen(b"\x03", 150.0)
    store.totp_used("otp", 42, 190.0)
    store.close()
    again = StateStore(str(tmp_path / "state"))
    assert again.load(160.0) == ([(b"\x01\x02", 200.0)], [("otp", 42, 190.0)])
    # Compacted: the expired entry is gone from the file too.
    assert (tmp_path / "state" / "replay").read_text().splitlines() == [
        "spa 0102 200.000",
        "totp otp 42 190.000",
    ]


def test_unreadable_lines_are_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "replay").write_text("spa zz 10\nspa 01 500\ngarbage\ntotp d x 1\n")
    with caplog.at_level(logging.WARNING, logger="knockgate.state"):
        saved = StateStore(str(tmp_path)).load(0.0)
    assert saved == ([(b"\x01", 500.0)], [])
    assert len([r for r in caplog.records if "unreadable entry" in r.message]) == 3


def test_a_state_dir_that_cannot_be_written_is_logged_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = StateStore(str(blocker / "state"))  # a directory under a file: cannot exist
    with caplog.at_level(logging.ERROR, logger="knockgate.state"):
        store.spa_seen(b"\x01", 10.0)
        store.spa_seen(b"\x02", 10.0)
    errors = [r for r in caplog.records if "cannot write" in r.message]
    assert len(errors) == 1  # logged once, not per packet


def test_compact_keeps_only_what_is_in_force(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path))
    for i in range(5):
        store.spa_seen(bytes([i]), 100.0 + i)
    assert store.appended == 5
    store.compact(Saved([(b"\x03", 103.0), (b"\x04", 104.0)], [("otp", 7, 90.0)]), 103.0)
    assert store.appended == 0
    store.spa_seen(b"\x09", 200.0)  # appending goes on after a rewrite
    store.close()
    assert (tmp_path / "replay").read_text().splitlines() == ["spa 04 104.000", "spa 09 200.000"]
