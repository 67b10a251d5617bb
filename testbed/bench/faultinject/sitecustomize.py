"""Fault injection for testbed/bench/fault_bench.py: never part of knockgate itself.

A daemon started with this folder on PYTHONPATH (Python imports ``sitecustomize`` at
start-up) raises an unexpected exception in one of its handlers on demand: write the
handler's name to the file named by ``KG_FAULT_FILE`` and the next call of that
handler raises ``RuntimeError("injected fault in NAME")`` (the file is then emptied:
one fault per request). Names: ``packet`` (the engine, on the hot path), ``grant``,
``record``, ``status``, ``reload``, ``check``, ``upkeep``, and ``loop`` (an exception
that escapes the loop itself). ``KG_WALL_OFFSET_FILE`` steps the wall clock as
tests/integration/fakewall does (loaded from there: seconds added to ``time.time()``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_fault_file = os.environ.get("KG_FAULT_FILE", "")
# The steppable wall clock is the integration tests' (one sitecustomize runs per process).
_FAKEWALL = Path(__file__).resolve().parents[3] / "tests" / "integration" / "fakewall"
_spec = importlib.util.spec_from_file_location("kg_fakewall", _FAKEWALL / "sitecustomize.py")
if _spec is not None and _spec.loader is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
_checked = [0.0, ""]  # when the fault file was last read, what it said


def _wanted() -> str:
    now = time.monotonic()
    if now - _checked[0] >= 0.05:
        _checked[0] = now
        try:
            with open(_fault_file) as handle:
                _checked[1] = handle.read().strip()
        except OSError:
            _checked[1] = ""
    return str(_checked[1])


def _fire(name: str) -> None:
    if _wanted() == name:
        _checked[1] = ""
        with open(_fault_file, "w"):
            pass
        raise RuntimeError(f"injected fault in {name}")


def _wrap(owner: Any, attribute: str, name: str) -> None:
    real: Callable[..., Any] = getattr(owner, attribute)

    @functools.wraps(real)
    def faulty(*args: Any, **kwargs: Any) -> Any:
        _fire(name)
        return real(*args, **kwargs)

    setattr(owner, attribute, faulty)


if _fault_file:
    from appliance.core.engine import KnockEngine
    from appliance.runtime.daemon import Daemon

    _wrap(KnockEngine, "handle", "packet")
    for _attribute, _name in (
        ("_grant", "grant"),
        ("_record", "record"),
        ("snapshot", "status"),
        ("_reload", "reload"),
        ("_check_firewall", "check"),
        ("_upkeep", "upkeep"),
        ("_follow_wall_clock", "loop"),  # called by the loop itself, unguarded
    ):
        _wrap(Daemon, _attribute, _name)
