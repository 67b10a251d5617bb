"""Shared helpers for integration tests (root, real peers, real packets).

Integration tests skip where their prerequisites are missing, except on CI
(``CI=true``), where a missing prerequisite is a broken runner and must fail.
"""

from __future__ import annotations

import os

import pytest


def on_ci() -> bool:
    return os.environ.get("CI") == "true"


def require(condition: bool, why: str) -> None:
    """Skip the test unless ``condition`` holds; on CI, fail it instead.

    ``why`` says what is missing, e.g. ``"needs root"`` or ``"knock not installed"``.
    """
    if condition:
        return
    if on_ci():
        pytest.fail(f"integration prerequisite missing on CI (CI=true): {why}", pytrace=False)
    pytest.skip(why)


def require_root_tools(*tools: str, vlan: bool = False) -> None:
    """Root, iproute2 and what a topology needs (tests/integration/netns.py), plus
    ``tools`` on PATH: skipped without them, failed on CI."""
    import shutil

    from tests.integration.netns import ensure_root_tools

    missing = ensure_root_tools(vlan=vlan)
    require(not missing, ", ".join(missing))
    for tool in tools:
        require(shutil.which(tool) is not None, f"{tool} is not installed")
