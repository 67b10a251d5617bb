"""Reading the files a configuration names, bounded.

Every file the configuration reader opens (the configuration itself, an SPA
``key_file``, a ``one_time_sequences`` file) is read only when it is a regular
file of at most a size limit: ``/dev/zero``, a FIFO or ``/dev/stdin`` would read
forever (or block), a directory cannot be read, and a file of gigabytes would
take the daemon's memory on a reload.
"""

from __future__ import annotations

import os
import stat

from appliance.config.values import PATH_SHOWN, Invalid, shown

KIB = 1024
MIB = 1024 * KIB
CONFIG_LIMIT = 1 * MIB
KEY_FILE_LIMIT = 64 * KIB
ONE_TIME_LIMIT = 1 * MIB


def size_text(limit: int) -> str:
    return f"{limit // MIB} MiB" if limit % MIB == 0 else f"{limit // KIB} KiB"


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_bounded(path: str, limit: int, *, private: bool = False) -> bytes:
    """The bytes of ``path``; :class:`Invalid` when it is not a regular file of at most
    ``limit`` bytes, or cannot be read. ``private`` (a secret): not through a symbolic
    link, and neither readable by others nor writable by its group (0600 or 0640).

    Opened non-blocking (a FIFO without a writer would block the open itself) and
    checked with ``fstat`` on the open descriptor, so what is checked is what is read."""
    name = shown(path, text=True, limit=PATH_SHOWN)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        descriptor = os.open(path, flags | (os.O_NOFOLLOW if private else 0))
    except OSError as error:
        raise Invalid(f"cannot read {name}: {error.strerror} (expected a readable file)") from None
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise Invalid(f"{name} is {_kind(mode)} (expected a regular file)")
        if private and mode & 0o027:
            raise Invalid(
                f"{name} has mode {stat.S_IMODE(mode):04o}: others may read it or its group "
                "may change it (expected 0600 or 0640: chmod 600)"
            )
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(descriptor, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as error:
        raise Invalid(f"cannot read {name}: {error.strerror} (expected a readable file)") from None
    finally:
        os.close(descriptor)
    if size > limit:
        raise Invalid(f"{name} is larger than {size_text(limit)} (expected at most {limit} bytes)")
    return b"".join(chunks)


def line_of_offset(data: bytes, offset: int) -> int:
    """The line (from 1) holding byte ``offset``."""
    return data.count(b"\n", 0, offset) + 1
