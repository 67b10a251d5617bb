"""Files knockgate writes next to its config: 0600 root's, or 0640 with the config group
when the config has one (the monitor as `knockgate` reads them at reload, never writes)."""

from __future__ import annotations

import grp
import os
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.provision.modes import new_file_mode
from appliance.provision.users import write_atomic

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chgrp to another group needs root")


def _group() -> int:
    return grp.getgrnam("nogroup").gr_gid


def test_without_a_config_group_new_files_are_private(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)
    assert new_file_mode(str(tmp_path)) == (0o600, None)
    write_atomic(str(tmp_path / "kg-users.yaml"), "users: {}\n")
    assert (tmp_path / "kg-users.yaml").stat().st_mode & 0o777 == 0o600


@needs_root
def test_init_and_a_new_users_file_take_the_config_group_read_only(tmp_path: Path) -> None:
    directory = tmp_path / "kg-etc"
    directory.mkdir()
    os.chown(directory, 0, _group())
    os.chmod(directory, 0o750)
    config = directory / "knockgate.yaml"
    assert main(["init", "--config", str(config)]) == 0
    info = config.stat()
    assert (info.st_gid, info.st_mode & 0o777) == (_group(), 0o640)
    users = directory / "knockgate-users.yaml"
    write_atomic(str(users), "users: {}\n", like=str(config))
    info = users.stat()
    assert (info.st_gid, info.st_mode & 0o777) == (_group(), 0o640)
    # An existing file keeps its own owner and mode.
    os.chmod(users, 0o600)
    write_atomic(str(users), "users: {}\n", like=str(config))
    assert users.stat().st_mode & 0o777 == 0o600


@needs_root
def test_a_config_without_a_group_falls_back_to_its_directory(tmp_path: Path) -> None:
    directory = tmp_path / "kg-etc"
    directory.mkdir()
    os.chown(directory, 0, _group())
    os.chmod(directory, 0o750)
    config = directory / "knockgate.yaml"
    config.write_text("doors: {}\n")
    config.chmod(0o644)  # root's, readable by all (a read-only bind mount)
    assert new_file_mode(str(config)) == (0o640, _group())
