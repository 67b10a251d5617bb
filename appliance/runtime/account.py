"""``knockgate run --user NAME``: the monitor stops being root once the packet process runs.

As root it hands NAME what the monitor writes (:func:`hand_over`): the state directory and
its files, the status socket's directory, the log file. Then :func:`become` makes it NAME
(its own groups from /etc/group, e.g. the config group that may read /etc/knockgate) with
only CAP_NET_ADMIN, CAP_NET_RAW and CAP_KILL (:func:`appliance.runtime.caps.become_user`).
From then on it reads the config, key files and the managed users file like any other
user (group read), and can write no root-owned file, nor reach a root-only socket.

A directory is handed over (chowned) only when it is knockgate's own: created here, or
named ``*knockgate*`` (``/var/lib/knockgate``, ``/run/knockgate``); a shared one (``/run``,
``/tmp``) is never chowned, and must already let NAME write in it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
from dataclasses import dataclass

from appliance.config.schema import Settings
from appliance.errors import KnockgateError
from appliance.runtime import caps
from appliance.runtime.state import FILE_NAME

log = logging.getLogger("knockgate")


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary, primary included


def account(name: str) -> Account:
    """NAME's ids (KnockgateError when there is no such user, or it is root)."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise KnockgateError(f"--user {name}: no such user") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise KnockgateError(f"--user {name}: must not be root (uid or gid 0)")
    groups = tuple(sorted(set(os.getgrouplist(name, entry.pw_gid))))
    if 0 in groups:
        raise KnockgateError(f"--user {name}: must not be in group root (gid 0)")
    return Account(name, entry.pw_uid, entry.pw_gid, groups)


def _own_directory(path: str, user: Account, what: str) -> None:
    """Make ``path`` (a directory) NAME's when it is knockgate's own; else it must let
    NAME write in it already."""
    created = not os.path.isdir(path)
    try:
        os.makedirs(path, mode=0o755, exist_ok=True)
        info = os.stat(path)
    except OSError as error:
        raise KnockgateError(f"{what} {path}: {error.strerror}") from None
    if info.st_uid == user.uid:
        return
    if created or "knockgate" in os.path.basename(os.path.normpath(path)):
        os.chown(path, user.uid, user.gid)
        return
    writable = (info.st_mode & 0o003 == 0o003) or (
        info.st_gid in user.groups and info.st_mode & 0o030 == 0o030
    )
    if not writable:
        raise KnockgateError(
            f"{what} {path}: user {user.name} cannot write in it (a shared directory is not "
            f"handed over: give knockgate a directory of its own, e.g. /run/knockgate)"
        )


def hand_over(settings: Settings, user: Account) -> None:
    """As root, before :func:`become`: what the monitor writes becomes NAME's."""
    _own_directory(settings.state_dir, user, "state directory")
    for name in (FILE_NAME, FILE_NAME + ".new"):
        with contextlib.suppress(FileNotFoundError):
            os.chown(os.path.join(settings.state_dir, name), user.uid, user.gid)
    _own_directory(os.path.dirname(settings.status_socket) or ".", user, "status socket directory")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(settings.status_socket)  # root's, from a run without --user
    if settings.log.file:
        with contextlib.suppress(FileNotFoundError):
            os.chown(settings.log.file, user.uid, user.gid)


def become(user: Account, settings: Settings) -> None:
    """Hand over, then become NAME with CAP_NET_ADMIN, CAP_NET_RAW and CAP_KILL only (no
    thread may run yet). A refusal is fatal (CapabilityError)."""
    hand_over(settings, user)
    caps.become_user(user.uid, user.gid, user.groups, caps.MONITOR)
    log.info(
        "monitor runs as %s (uid %d) with CAP_NET_ADMIN, CAP_NET_RAW, CAP_KILL",
        user.name,
        user.uid,
    )
