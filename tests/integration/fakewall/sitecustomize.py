"""A wall clock the test can step, for a daemon started with this folder on PYTHONPATH.

Python imports ``sitecustomize`` at start-up: this one makes ``time.time()`` add the
number of seconds written in the file named by ``KG_WALL_OFFSET_FILE`` (re-read on
every call; no file or no number: no offset). ``time.monotonic()`` is left alone, as a
real clock step leaves CLOCK_MONOTONIC alone. Only the tests' daemons load it; it is
not part of knockgate. (libfaketime does the same in C, but under it Python's
``time.sleep`` fails with EINVAL once CLOCK_MONOTONIC is left unfaked.)
"""

from __future__ import annotations

import os
import time

_real_time = time.time
_path = os.environ.get("KG_WALL_OFFSET_FILE", "")


def _stepped_time() -> float:
    try:
        with open(_path) as handle:
            offset = float(handle.read().strip() or 0.0)
    except (OSError, ValueError):
        offset = 0.0
    return _real_time() + offset


if _path:
    time.time = _stepped_time
