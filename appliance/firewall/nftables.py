"""The nftables backend (default): one table, ``inet knockgate``.

Commands go through libnftables in-process (ctypes; no fork on the grant path,
which is what keeps knock-to-open at a millisecond or two) and fall back to the
``nft`` command when the library is missing or when the backend drives another
network namespace (tests).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import shutil
import subprocess

from appliance.core.model import Proto, Step
from appliance.errors import FirewallError
from appliance.firewall import FirewallPlan, GrantEntry
from appliance.firewall.nft_rules import (
    FAMILY,
    TABLE,
    direct_script,
    grant_script,
    revoke_script,
    setup_script,
    teardown_script,
)

TIMEOUT = 10.0


class _Libnftables:
    """A minimal ctypes binding: one context, output and errors buffered."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.lib = lib
        self.ctx = lib.nft_ctx_new(0)
        if not self.ctx:
            raise OSError("nft_ctx_new failed")
        lib.nft_ctx_buffer_output(self.ctx)
        lib.nft_ctx_buffer_error(self.ctx)

    def run(self, script: str) -> tuple[int, str, str]:
        rc = self.lib.nft_run_cmd_from_buffer(self.ctx, script.encode())
        out = self.lib.nft_ctx_get_output_buffer(self.ctx) or b""
        err = self.lib.nft_ctx_get_error_buffer(self.ctx) or b""
        return rc, out.decode(errors="replace"), err.decode(errors="replace")


def _load_library() -> _Libnftables | None:
    path = ctypes.util.find_library("nftables") or "libnftables.so.1"
    try:
        return _Libnftables(path)
    except (OSError, AttributeError):
        return None


class NftablesBackend:
    """Owns ``inet knockgate``; never reads or writes any other table."""

    name = "nftables"

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._lib = _load_library() if netns is None else None
        if self._lib is None and shutil.which("nft") is None:
            raise FirewallError("nftables: neither libnftables nor the nft command is available")

    # ----------------------------------------------------------------- running

    def _run(self, script: str) -> tuple[int, str, str]:
        if self._lib is not None:
            return self._lib.run(script)
        argv = ["nft", "-f", "-"]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        try:
            done = subprocess.run(
                argv, input=script, capture_output=True, text=True, timeout=TIMEOUT, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise FirewallError(f"nftables: {' '.join(argv)}: {error}") from None
        return done.returncode, done.stdout, done.stderr

    def _apply(self, script: str, what: str) -> str:
        rc, out, err = self._run(script)
        if rc != 0:
            first = script.strip().splitlines()[0] if script.strip() else ""
            raise FirewallError(f"nftables: {what} failed: {err.strip()} (batch: {first} ...)")
        return out

    # ----------------------------------------------------------------- protocol

    def setup(self, plan: FirewallPlan) -> None:
        self._apply(setup_script(plan), "setup")

    def grant(self, address: str, ports: tuple[Step, ...], seconds: float) -> None:
        if ports and seconds > 0:
            self._apply(grant_script(address, ports, seconds), f"grant to {address}")

    def revoke(self, address: str, ports: tuple[Step, ...]) -> None:
        if ports:
            self._apply(revoke_script(address, ports), f"revoke from {address}")

    def is_held(self, address: str) -> bool:
        # `list set` of the (small) held set, not `get element`: nft's `get` fetches the
        # elements of every set in the table first, which costs ~850 ms once the scan
        # detector's own sets hold 60 000 entries under a flood (`list set`: 0.4 ms).
        version = 6 if ":" in address else 4
        rc, out, err = self._run(f"list set {FAMILY} {TABLE} held{version}\n")
        if rc != 0:
            if "No such file or directory" in err:  # no scan detection configured
                return False
            raise FirewallError(f"nftables: held check for {address} failed: {err.strip()}")
        body = out.split("elements = {", 1)
        return len(body) == 2 and address in _TOKENS.split(body[1])

    def grants(self) -> list[GrantEntry]:
        entries: list[GrantEntry] = []
        for name in ("grants4", "grants6"):
            rc, out, err = self._run(f"list set {FAMILY} {TABLE} {name}\n")
            if rc != 0:
                raise FirewallError(f"nftables: list set {name} failed: {err.strip()}")
            entries.extend(_parse_grants(out))
        return entries

    def set_direct(self, entries: tuple[tuple[str, Step], ...]) -> None:
        self._apply(direct_script(entries), "service container addresses")

    def available(self) -> bool:
        """Does nftables answer here at all (``backend: auto``)?"""
        rc, _, _ = self._run("list tables\n")
        return rc == 0

    def check(self) -> bool:
        # Cheap on purpose: `list chain` makes nft fetch every set's elements (a second
        # and more once the scan detector's sets are full); listing a small set of ours
        # proves the table is there (`nft flush ruleset` or a deleted table: repaired).
        rc, out, _ = self._run(f"list set {FAMILY} {TABLE} protected_tcp\n")
        return rc == 0 and "protected_tcp" in out

    def teardown(self) -> None:
        self._apply(teardown_script(), "teardown")


_ELEMENT = re.compile(
    r"(?P<address>[0-9a-fA-F.:]+) \. (?P<proto>tcp|udp) \. (?P<port>\d+)"
    r"(?: timeout \S+)?(?: expires (?P<expires>[0-9dhms]+))?"
)
_TOKENS = re.compile(r"[\s,{}]+")
_DURATION = re.compile(r"(\d+)(d|h|ms|m|s)")
_UNIT = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def _seconds(text: str) -> float:
    return sum(int(n) * _UNIT[unit] for n, unit in _DURATION.findall(text))


def _parse_grants(text: str) -> list[GrantEntry]:
    """Elements of ``nft list set`` output: ``ADDR . tcp . 22 timeout 30s expires 29s480ms``."""
    body = text.split("elements = {", 1)
    if len(body) < 2:
        return []
    entries = []
    for match in _ELEMENT.finditer(body[1]):
        proto: Proto = "udp" if match["proto"] == "udp" else "tcp"
        expires = _seconds(match["expires"]) if match["expires"] else 0.0
        entries.append(GrantEntry(match["address"], Step(int(match["port"]), proto), expires))
    return entries
