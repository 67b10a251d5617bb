"""Adding, listing and removing provisioned users: the managed file's changes.

Each change holds an exclusive lock on the configuration's directory (two ``user
add`` at once do not lose one another), builds the new managed file under a temporary
name in the same directory (the old file's mode and owner, 0600 for a new one),
checks the whole configuration with it as ``knockgate check`` would, and only then
renames it over the old one: a refused change leaves everything as it was.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from appliance.config import Loaded, load_config
from appliance.config.managed_users import (
    ManagedDoor,
    ManagedUser,
    format_users,
    parse_user_name,
    read_users,
    users_file_for,
)
from appliance.config.schema import Config
from appliance.config.values import Invalid
from appliance.core.model import Door
from appliance.errors import KnockgateError
from appliance.provision.modes import new_file_mode
from appliance.spa.keyfile import generate_keys

__all__ = ["Change", "UserRow", "add_user", "list_users", "remove_user", "write_atomic"]


@dataclass(frozen=True)
class Change:
    """A change made: the user (as she was added or removed) and the configuration now."""

    user: ManagedUser
    loaded: Loaded
    users_file: str


@dataclass(frozen=True)
class UserRow:
    """One line of ``knockgate user list``: never a secret."""

    name: str
    doors: tuple[str, ...]
    created: str  # "-" for a user written in the configuration by hand
    managed: bool


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    try:
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise KnockgateError(f"{directory}: cannot open it: {error.strerror}") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def write_atomic(
    path: str,
    text: str,
    check: Callable[[str], None] | None = None,
    mode: int = 0o600,
    like: str | None = None,
) -> None:
    """Replace ``path`` with ``text``: a temporary file in the same directory with the
    old file's mode and owner (for a new file: ``mode``, or the config group of ``like``
    and 0640 when it has one: :mod:`appliance.provision.modes`), fsync'd,
    ``check(temporary)`` (which may raise: then nothing changes), renamed over ``path``."""
    directory = os.path.dirname(path) or "."
    owner: tuple[int, int] | None = None
    if like is not None:
        mode, group = new_file_mode(like)
        if group is not None:
            owner = (os.geteuid(), group)
    with contextlib.suppress(FileNotFoundError):
        info = os.stat(path)
        mode, owner = stat.S_IMODE(info.st_mode), (info.st_uid, info.st_gid)
    try:
        descriptor, temporary = tempfile.mkstemp(
            prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory
        )
    except OSError as error:
        raise KnockgateError(f"{directory}: cannot write in it: {error.strerror}") from None
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), mode)
            if owner is not None and (os.geteuid() == 0 or owner[0] == os.geteuid()):
                with contextlib.suppress(PermissionError):  # a group it is not in
                    os.fchown(handle.fileno(), *owner)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if check is not None:
            check(temporary)
        os.replace(temporary, path)
    except OSError as error:
        raise KnockgateError(f"{path}: cannot write it: {error.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    with contextlib.suppress(OSError):
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)


def _checked(config_path: str) -> Callable[[str], None]:
    """What the daemon's reload would refuse, refused before the rename."""

    def check(candidate: str) -> None:
        from appliance.runtime.preflight import preflight

        preflight(load_config(config_path, users_file=candidate))

    return check


def _yaml_config(config_path: str) -> Loaded:
    loaded = load_config(config_path)
    if loaded.config.format != "yaml":
        raise KnockgateError(
            f"{config_path} is a knockd.conf: users need SPA or TOTP doors "
            "(convert it with knockgate import-knockd)"
        )
    return loaded


def _door_names(config: Config) -> str:
    return ", ".join(door.name for door in config.doors) or "none"


def _hand_written(config: Config, managed: Sequence[ManagedUser]) -> dict[str, list[str]]:
    """SPA users written in the configuration itself: name -> doors."""
    own = {(user.name, entry.door) for user in managed for entry in user.doors}
    found: dict[str, list[str]] = {}
    for door in config.doors:
        for spa_user in door.spa.users if door.spa is not None else ():
            if (spa_user.name, door.name) not in own:
                found.setdefault(spa_user.name, []).append(door.name)
    return found


def _choose_doors(config: Config, names: Sequence[str], path: str) -> list[Door]:
    if not names:
        doors = [door for door in config.doors if door.spa is not None]
        if not doors:
            raise KnockgateError(
                f"{path} has no SPA door: name the doors with --door (doors: {_door_names(config)})"
            )
        return doors
    chosen: list[Door] = []
    for name in dict.fromkeys(names):
        door = config.door(name)
        if door is None:
            raise KnockgateError(f"unknown door {name!r} in {path} (doors: {_door_names(config)})")
        if door.knock.one_time is not None:
            raise KnockgateError(
                f"door {name!r} uses one-time sequences: each knock uses a line of the "
                "server's file, a client cannot be given them (expected an SPA, TOTP or "
                "sequence door)"
            )
        if door.spa is None and not door.knock.sequence and door.knock.totp is None:
            raise KnockgateError(f"door {name!r} has no knock a client can send")
        chosen.append(door)
    return chosen


def add_user(config_path: str, name: str, door_names: Sequence[str], created: str) -> Change:
    """Provision ``name`` for the doors (default: every SPA door): new SPA keys per
    door, the door's own knock for TOTP and sequence doors."""
    try:
        parse_user_name(name)
    except Invalid as problem:
        raise KnockgateError(f"user name: {problem}") from None
    users_file = users_file_for(config_path)
    with _locked(os.path.dirname(users_file) or "."):
        config = _yaml_config(config_path).config
        users = list(read_users(users_file))
        existing = next((user for user in users if user.name == name), None)
        if existing is not None:
            raise KnockgateError(
                f"user {name!r} exists (added {existing.created}, doors "
                f"{', '.join(entry.door for entry in existing.doors)}): "
                f"`knockgate user remove {name}` first"
            )
        hand_written = _hand_written(config, users).get(name)
        if hand_written:
            raise KnockgateError(
                f"user {name!r} is written in {config_path} (door(s) "
                f"{', '.join(hand_written)}): choose another name"
            )
        entries: list[ManagedDoor] = []
        for door in _choose_doors(config, door_names, config_path):
            if door.spa is None:
                entries.append(ManagedDoor(door.name))
                continue
            key, hmac_key = generate_keys()
            entries.append(
                ManagedDoor(door.name, base64.b64decode(key), base64.b64decode(hmac_key))
            )
        user = ManagedUser(name, created, tuple(entries))
        write_atomic(
            users_file, format_users([*users, user]), _checked(config_path), like=config_path
        )
    return Change(user, load_config(config_path), users_file)


def remove_user(config_path: str, name: str) -> Change:
    """Take ``name`` out of the managed file (her keys are gone with it)."""
    users_file = users_file_for(config_path)
    with _locked(os.path.dirname(users_file) or "."):
        config = _yaml_config(config_path).config
        users = list(read_users(users_file))
        user = next((user for user in users if user.name == name), None)
        if user is None:
            hand_written = _hand_written(config, users).get(name)
            if hand_written:
                raise KnockgateError(
                    f"user {name!r} is written in {config_path} (door(s) "
                    f"{', '.join(hand_written)}), not added by `user add`: remove her there "
                    "(knockgate config apply)"
                )
            known = ", ".join(user.name for user in users) or "none"
            raise KnockgateError(f"no user {name!r} (users added with `user add`: {known})")
        rest = [other for other in users if other.name != name]
        write_atomic(users_file, format_users(rest), _checked(config_path), like=config_path)
    return Change(user, load_config(config_path), users_file)


def list_users(config_path: str) -> list[UserRow]:
    """Managed users first (in the order added), then users written by hand."""
    config = _yaml_config(config_path).config
    users = read_users(users_file_for(config_path))
    rows = [
        UserRow(user.name, tuple(entry.door for entry in user.doors), user.created, True)
        for user in users
    ]
    for name, doors in _hand_written(config, users).items():
        rows.append(UserRow(name, tuple(doors), "-", False))
    return rows
