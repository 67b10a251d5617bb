"""The users ``knockgate user add`` provisions: a managed file next to the configuration.

The hand-written configuration is never rewritten. ``knockgate user add/remove`` keep
their users in ``knockgate-users.yaml`` in the configuration's directory (0600: it holds
keys), and :func:`appliance.config.load_config` merges it into every load (``check``,
``run``, a reload)::

    knockgate.yaml ──parse──► Config ─┐
                                      ├─ merge ─► Config (SPA doors gain the users)
    knockgate-users.yaml ──parse──────┘

Schema::

    users:
      alice:
        created: "2026-12-04T23:10:00Z"
        doors:
          ssh-spa: {key_base64: ..., hmac_key_base64: ...}   # an SPA door: her own keys
          ssh-totp: {}                                        # a TOTP or sequence door:
                                                              # the door's shared knock

A broken file is a :class:`~appliance.errors.ConfigError` naming this file, the line and
the key, like any configuration error (so a reload keeps the running configuration). A
user listed for a door the configuration no longer has is a warning and opens nothing.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

import yaml
from yaml.nodes import MappingNode

from appliance.config.files import CONFIG_LIMIT, line_of_offset, read_bounded
from appliance.config.problems import Problems
from appliance.config.schema import Config
from appliance.config.values import Invalid, shown
from appliance.config.yaml_auth import parse_key
from appliance.config.yaml_nodes import _Map, _string, compose
from appliance.core.model import SpaUser
from appliance.errors import ConfigError

__all__ = [
    "USERS_FILE",
    "ManagedDoor",
    "ManagedUser",
    "format_users",
    "merge_users",
    "parse_user_name",
    "read_users",
    "users_file_for",
]

USERS_FILE = "knockgate-users.yaml"
USER_KEYS = ("created", "doors")
DOOR_KEYS = ("key_base64", "hmac_key_base64")
_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


@dataclass(frozen=True, slots=True)
class ManagedDoor:
    """One door of a managed user: her own SPA keys, or ``None`` for a door with a
    shared knock (TOTP, a sequence)."""

    door: str
    key: bytes | None = dataclasses.field(default=None, repr=False)
    hmac_key: bytes | None = dataclasses.field(default=None, repr=False)
    line: int = 0


@dataclass(frozen=True, slots=True)
class ManagedUser:
    name: str
    created: str
    doors: tuple[ManagedDoor, ...]
    line: int = 0

    def door(self, name: str) -> ManagedDoor | None:
        return next((door for door in self.doors if door.door == name), None)


def users_file_for(config_path: str) -> str:
    """Where the managed users of the configuration at ``config_path`` live."""
    return os.path.join(os.path.dirname(config_path), USERS_FILE)


def parse_user_name(value: object) -> str:
    if not isinstance(value, str) or not _USER_NAME.fullmatch(value):
        raise Invalid(
            f"{shown(value)} is not a user name (expected letters, digits, '_', '.', '-', "
            "starting with a letter or digit, at most 63 characters)"
        )
    return value


def read_users(path: str, shown_as: str | None = None) -> tuple[ManagedUser, ...]:
    """The users in the managed file at ``path`` (none when it does not exist).

    Messages name ``shown_as`` (a candidate is checked under a temporary name but
    reported under the real one). Raises :class:`ConfigError`."""
    name = shown_as or path
    if not os.path.lexists(path):
        return ()
    try:
        data = read_bounded(path, CONFIG_LIMIT)
    except Invalid as problem:
        raise ConfigError([f"{name}:0: (file): {problem}"]) from None
    try:
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as error:
        line = line_of_offset(data, error.start)
        message = f"{name}:{line}: (file): not UTF-8 text (expected a text file)"
        raise ConfigError([message]) from None
    problems = Problems(name)
    users = _parse(text, problems)
    problems.raise_if_any()
    return users


def _parse(text: str, problems: Problems) -> tuple[ManagedUser, ...]:
    root = compose(text, problems)
    if root is None:
        return ()  # an empty file: no users
    if not isinstance(root, MappingNode):
        problems.error(1, "(top)", "expected a mapping with users at the top level")
        return ()
    top = _Map(root, "", ("users",), problems)
    users_map = top.mapping("users", ())
    if users_map is None:
        return ()
    users: list[ManagedUser] = []
    for name, (node, line) in users_map.items.items():
        where = users_map.key(name)
        try:
            parse_user_name(name)
        except Invalid as problem:
            problems.error(line, where, str(problem))
            continue
        if not isinstance(node, MappingNode):
            problems.error(line, where, "expected a mapping with created and doors")
            continue
        spec = _Map(node, where, USER_KEYS, problems, line)
        created = spec.get("created", _string) or ""
        doors_map = spec.mapping("doors", ())
        if doors_map is None:
            if "doors" not in spec.items:
                problems.error(line, spec.key("doors"), "missing (expected door names)")
            continue
        doors: list[ManagedDoor] = []
        for door_name, (door_node, door_line) in doors_map.items.items():
            door_where = doors_map.key(door_name)
            if door_node.tag.endswith(":null"):
                doors.append(ManagedDoor(door_name, line=door_line))
                continue
            if not isinstance(door_node, MappingNode):
                problems.error(
                    door_line, door_where, "expected {} or {key_base64, hmac_key_base64}"
                )
                continue
            keys = _Map(door_node, door_where, DOOR_KEYS, problems, door_line)
            key = keys.get("key_base64", lambda v: parse_key(v, minimum=16, maximum=32))
            hmac_key = keys.get("hmac_key_base64", lambda v: parse_key(v, minimum=16, maximum=128))
            if ("key_base64" in keys.items) != ("hmac_key_base64" in keys.items):
                missing = "hmac_key_base64" if "key_base64" in keys.items else "key_base64"
                problems.error(door_line, keys.key(missing), "missing (expected base64)")
            doors.append(ManagedDoor(door_name, key, hmac_key, door_line))
        users.append(ManagedUser(name, created, tuple(doors), line))
    return tuple(users)


def merge_users(
    config: Config, users: Iterable[ManagedUser], users_path: str, warnings: list[str]
) -> Config:
    """``config`` with each managed user's keys added to her SPA doors.

    Raises :class:`ConfigError` (naming ``users_path``) for a user whose name a
    hand-written user of the same door has, or keys for a door that takes none."""
    problems = Problems(users_path)
    added: dict[str, list[SpaUser]] = {}
    for user in users:
        for entry in user.doors:
            where = f"users.{user.name}.doors.{shown(entry.door, text=True)}"
            door = config.door(entry.door)
            if door is None:
                problems.warn(
                    entry.line,
                    where,
                    f"{config.path} has no door {shown(entry.door, text=True)}: "
                    "this entry opens nothing",
                )
                continue
            if door.spa is None:
                if entry.key is not None:
                    problems.error(
                        entry.line, where, "keys for a door that is not an SPA door (expected {})"
                    )
                continue
            if entry.key is None or entry.hmac_key is None:
                problems.error(
                    entry.line,
                    where,
                    "an SPA door needs keys (expected key_base64 and hmac_key_base64)",
                )
                continue
            if any(spa_user.name == user.name for spa_user in door.spa.users):
                problems.error(
                    entry.line,
                    where,
                    f"door {door.name} in {config.path} has a user {user.name} of its own "
                    "(expected a name the configuration does not use)",
                )
                continue
            added.setdefault(door.name, []).append(
                SpaUser(name=user.name, key=entry.key, hmac_key=entry.hmac_key)
            )
    problems.raise_if_any()
    warnings.extend(problems.warnings)
    doors = []
    for door in config.doors:
        extra = added.get(door.name)
        if door.spa is not None and extra:
            spa = dataclasses.replace(door.spa, users=door.spa.users + tuple(extra))
            door = dataclasses.replace(door, spa=spa)
        doors.append(door)
    return dataclasses.replace(config, doors=tuple(doors))


def format_users(users: Iterable[ManagedUser]) -> str:
    """The managed file's text for ``users`` (reads back with :func:`read_users`)."""
    import base64

    data: dict[str, object] = {}
    for user in users:
        doors: dict[str, object] = {}
        for entry in user.doors:
            if entry.key is None or entry.hmac_key is None:
                doors[entry.door] = {}
            else:
                doors[entry.door] = {
                    "key_base64": base64.b64encode(entry.key).decode(),
                    "hmac_key_base64": base64.b64encode(entry.hmac_key).decode(),
                }
        data[user.name] = {"created": user.created, "doors": doors}
    header = (
        "# Managed by `knockgate user add` and `knockgate user remove`: edit with those.\n"
        "# It holds secret keys (mode 0600). See README: Users and client bundles.\n"
    )
    body = yaml.safe_dump({"users": data}, sort_keys=False, default_flow_style=False, width=200)
    return header + body
