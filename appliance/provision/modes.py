"""Modes of the files knockgate writes in its configuration directory.

They are root's and 0600, unless the configuration has a *config group*: a group that is
not root's and may read it (the appliance's ``knockgate-config``, which the monitor
running as ``knockgate`` and the launcher belong to). Then a new file (``knockgate init``'s
config, the managed users file) gets that group and 0640: readable by the group, never
writable by it. An existing file keeps its own owner and mode.
"""

from __future__ import annotations

import contextlib
import os
import stat

PRIVATE = 0o600
GROUP_READ = 0o640


def config_group(path: str) -> int | None:
    """The config group shown by ``path`` (a file, or a directory: it needs group
    read and search too): its gid when it is not root's and may read; else ``None``."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    wanted = 0o050 if stat.S_ISDIR(info.st_mode) else 0o040
    if info.st_gid == 0 or info.st_mode & wanted != wanted:
        return None
    return info.st_gid


def new_file_mode(like: str) -> tuple[int, int | None]:
    """(mode, gid or None) for a new file next to ``like`` (the config, or its directory):
    the config's group, else its directory's (a root-owned config readable by all, as a
    read-only bind mount, still lets the managed users file be read by the group)."""
    group = config_group(like)
    if group is None and not os.path.isdir(like):
        group = config_group(os.path.dirname(os.path.abspath(like)))
    return (PRIVATE, None) if group is None else (GROUP_READ, group)


def share_with_group(descriptor: int, like: str) -> None:
    """Give the new file open at ``descriptor`` the config group of ``like`` (and 0640),
    when there is one and this process may (root, or a member)."""
    mode, group = new_file_mode(like)
    if group is None:
        return
    with contextlib.suppress(OSError):
        os.fchown(descriptor, -1, group)
        os.fchmod(descriptor, mode)
