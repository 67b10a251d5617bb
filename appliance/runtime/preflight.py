"""What a configuration needs from the machine it runs on, checked before anything is touched.

``load_config`` checks the file; ``preflight`` checks the places the daemon will
write and the filter the kernel must take, so that ``knockgate check`` refuses
whatever ``knockgate run`` would fail on later, with the same line, and ``run``
(and a SIGHUP reload) refuses it before the firewall is touched:

* ``log.file`` and ``pid_file``: an existing file it may write, or a missing one in
  an existing directory it may write (the log handler and the pid writer create
  no directories);
* ``status_socket``: at most 107 bytes (AF_UNIX), not a directory, in a directory
  that exists or can be created, and that it may write;
* ``state_dir``, when a door is SPA or TOTP (used packets and time steps are
  recorded there): a directory it may write, or one it can create;
* the capture filter, compiled by libpcap as the daemon compiles it, and short
  enough for the kernel (4096 instructions).

Nothing is created or opened for writing: ``os.stat`` and ``os.access`` only
(``access(W_OK)`` reports a read-only file system even to root). Run ``check`` as
the user the daemon runs as: permissions are that user's.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from types import MappingProxyType

from appliance.capture.bpf import capture_filter
from appliance.config import Loaded
from appliance.config.values import PATH_SHOWN, shown
from appliance.errors import ConfigError, KnockgateError

NO_OVERRIDES: Mapping[str, str] = MappingProxyType({})
UNIX_PATH_MAX = 107  # bytes of an AF_UNIX socket path (sun_path holds 108 with the NUL)
BPF_MAXINSNS = 4096  # the kernel's limit for a classic BPF socket filter
MAX_FILTER_PORTS = 1500  # more never fits 4096 instructions; libpcap would take seconds
OPTIONS = {"status_socket": "--status-socket", "state_dir": "--state-dir"}


def command_line(**settings: str | None) -> dict[str, str]:
    """The ``overridden`` argument of :func:`preflight` for the settings given on the
    command line: ``command_line(status_socket="/tmp/s", state_dir=None)`` ->
    ``{"status_socket": "--status-socket"}``."""
    return {name: OPTIONS[name] for name, value in settings.items() if value is not None}


def preflight(loaded: Loaded, *, overridden: Mapping[str, str] = NO_OVERRIDES) -> None:
    """Raise :class:`ConfigError`, one line per problem, when the daemon could not run
    ``loaded`` here. ``overridden`` maps the settings given on the command line
    (``status_socket``, ``state_dir``) to their option: their problems are reported
    as ``command line: --status-socket: ...`` instead of a line of the file."""
    config = loaded.config
    settings = config.settings
    problems: list[str] = []

    def report(setting: str, message: str | None) -> None:
        if message is None:
            return
        if setting in overridden:
            problems.append(f"command line: {overridden[setting]}: {message}")
            return
        place = loaded.places.get(setting)
        if place is None:  # not in the file: its default (line 0, as for the whole file)
            problems.append(f"{config.path}:0: {setting}: {message}")
        else:
            problems.append(f"{config.path}:{place.line}: {place.key}: {message}")

    if settings.log.file:
        report("log.file", _file_problem(settings.log.file, "log file", regular=False))
    if settings.pid_file:
        report("pid_file", _file_problem(settings.pid_file, "pid file", regular=True))
    report("status_socket", _socket_problem(settings.status_socket))
    if any(door.spa is not None or door.knock.totp is not None for door in config.doors):
        report("state_dir", _state_dir_problem(settings.state_dir))
    report("doors", _filter_problem(loaded))
    if problems:
        raise ConfigError(problems)


def _name(path: str) -> str:
    return shown(path, text=True, limit=PATH_SHOWN)


def _why_not_writable(path: str) -> str:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    return "permission denied"


def _writable_directory(directory: str, purpose: str, *, create: bool) -> str | None:
    """None when ``directory`` is a directory we may write in (or, with ``create``, one
    that ``os.makedirs`` can make: its nearest existing ancestor is such a directory)."""
    probe = directory or "."
    while True:
        try:
            info = os.stat(probe)
            break
        except FileNotFoundError:
            if os.path.islink(probe):
                return f"{_name(probe)} is a broken symbolic link (expected {purpose})"
            if not create:
                return f"directory {_name(probe)} does not exist (expected {purpose})"
            parent = os.path.dirname(probe.rstrip("/")) or "."
            if parent == probe:
                return f"cannot create {_name(directory)} (expected {purpose})"
            probe = parent
        except OSError as error:
            return f"cannot use {_name(probe)}: {error.strerror} (expected {purpose})"
    if not stat.S_ISDIR(info.st_mode):
        return f"{_name(probe)} is not a directory (expected {purpose})"
    if not os.access(probe, os.W_OK | os.X_OK):
        verb = "write in" if probe == (directory or ".") else "create directories in"
        return f"cannot {verb} {_name(probe)}: {_why_not_writable(probe)} (expected {purpose})"
    return None


def _file_problem(path: str, what: str, *, regular: bool) -> str | None:
    """A file the daemon opens for writing (creating it when missing)."""
    expected = f"a {what} knockgate can write"
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return _writable_directory(
            os.path.dirname(path),
            f"an existing directory it can write for the {what}",
            create=False,
        )
    except OSError as error:
        return f"cannot use {_name(path)}: {error.strerror} (expected {expected})"
    mode = info.st_mode
    if stat.S_ISDIR(mode):
        return f"{_name(path)} is a directory (expected {expected})"
    if stat.S_ISSOCK(mode) or (regular and not stat.S_ISREG(mode)):
        return f"{_name(path)} is not a regular file (expected {expected})"
    if not os.access(path, os.W_OK):
        return f"cannot write {_name(path)}: {_why_not_writable(path)} (expected {expected})"
    return None


def _socket_problem(path: str) -> str | None:
    """The status socket: StatusServer.start makes its directory, unlinks what is there
    and binds."""
    size = len(os.fsencode(path))
    if size > UNIX_PATH_MAX:
        return (
            f"{_name(path)} is {size} bytes long (expected at most {UNIX_PATH_MAX} bytes: the "
            "limit of a Unix socket's path)"
        )
    try:
        if stat.S_ISDIR(os.stat(path).st_mode):
            return f"{_name(path)} is a directory (expected a path for the status socket)"
    except FileNotFoundError:
        pass
    except OSError as error:
        return f"cannot use {_name(path)}: {error.strerror} (expected a path for the status socket)"
    return _writable_directory(
        os.path.dirname(path), "a directory it can create or write for the socket", create=True
    )


def _state_dir_problem(directory: str) -> str | None:
    """SPA and TOTP doors record used packets and time steps in STATE_DIR/replay."""
    purpose = "a directory it can create or write: SPA and TOTP doors record used packets there"
    problem = _writable_directory(directory, purpose, create=True)
    if problem is not None:
        return problem
    replay = os.path.join(directory, "replay")
    try:
        info = os.stat(replay)
    except FileNotFoundError:
        return None
    except OSError as error:
        return f"cannot use {_name(replay)}: {error.strerror} (expected {purpose})"
    if not stat.S_ISREG(info.st_mode):
        return f"{_name(replay)} is not a regular file (expected the replay cache written there)"
    return None


def _filter_problem(loaded: Loaded) -> str | None:
    """The capture filter as the daemon builds it (its host addresses aside), compiled by
    libpcap as the daemon compiles it; then its length against the kernel's limit."""
    expression = capture_filter(loaded.config.doors, [])
    ports = expression.count("dst port") + expression.count("dst host")
    if ports > MAX_FILTER_PORTS:
        return (
            f"the doors knock on {ports} ports and addresses: the capture filter cannot hold "
            f"them (expected at most about 1000 knock ports in all)"
        )
    from appliance.capture.sniffer import check_filter

    try:
        check_filter(expression)
        from scapy.arch.common import compile_filter

        length = int(compile_filter(expression, iface="lo").bf_len)
    except KnockgateError as error:
        return f"{shown(str(error), text=True, limit=200)} (expected a filter libpcap compiles)"
    except ImportError as error:  # no libpcap: the daemon could not capture either
        return f"cannot compile the capture filter: {error} (expected libpcap installed)"
    if length > BPF_MAXINSNS:
        return (
            f"the capture filter for these doors is {length} instructions (expected at most "
            f"{BPF_MAXINSNS}, the kernel's limit: fewer knock ports)"
        )
    return None
