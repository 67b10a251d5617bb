"""The nftables backend (default): one table, ``inet knockgate``.

Commands go through libnftables in-process (ctypes; no fork on the grant path,
which is what keeps knock-to-open at a millisecond or two) and fall back to the
``nft`` command when the library is missing or when the backend drives another
network namespace (tests).

``check`` compares the table with what it was right after ``setup``: one terse
listing of the ``inet`` family (libnftables fetches no set elements for a terse
``list ruleset``, however full the scan sets are; ``list table`` and ``list
chain`` fetch them all, 0.3 s and more with 60 000) and the elements of the few
small sets that only ``setup`` and ``set_direct`` change. Other tables in the
listing are ignored. About 1.2 ms in-process, the same with 60 000 elements in
the scan sets or 20 000 grants.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import re
import shutil
import subprocess
import time
from collections.abc import Iterable

from appliance.core.model import Proto, Step
from appliance.errors import FirewallError
from appliance.firewall import FirewallPlan, GrantEntry
from appliance.firewall.nft_rules import (
    CHECKED_SETS,
    DIRECT_SETS,
    FAMILY,
    GRANT_SETS,
    TABLE,
    carried_grants,
    direct_script,
    drift,
    grant_script,
    recreate_reasons,
    revoke_script,
    set_elements,
    setup_script,
    shape_problems,
    table_objects,
    teardown_script,
)

log = logging.getLogger("knockgate.firewall")

TIMEOUT = 10.0
OUTPUT_TERSE = 1 << 11  # libnftables.h: NFT_CTX_OUTPUT_TERSE (no set elements listed)
# Grants added back to a re-created table lose this much more than the time spent
# reading them: the batch is built, parsed and committed after their timeouts are
# written (measured: 1 ms + 10 us a grant; 20 000 grants, 0.2 s).
CARRY_MARGIN = 0.2  # seconds
CARRY_MARGIN_PER_GRANT = 50e-6  # seconds


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
        lib.nft_ctx_output_set_flags.restype = None
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        self.lib = lib
        self.ctx = lib.nft_ctx_new(0)
        if not self.ctx:
            raise OSError("nft_ctx_new failed")
        lib.nft_ctx_buffer_output(self.ctx)
        lib.nft_ctx_buffer_error(self.ctx)

    def run(self, script: str, flags: int = 0) -> tuple[int, str, str]:
        self.lib.nft_ctx_output_set_flags(self.ctx, flags)
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
    """Owns ``inet knockgate``; never writes any other table (``check`` reads the terse
    listing of the ``inet`` family and looks only at knockgate's table in it)."""

    name = "nftables"

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._lib = _load_library() if netns is None else None
        if self._lib is None and shutil.which("nft") is None:
            raise FirewallError("nftables: neither libnftables nor the nft command is available")
        # The table as read right after setup (and set_direct); None: no setup yet.
        self._expected: dict[str, str] | None = None
        self._direct: tuple[tuple[str, Step], ...] | None = None  # None: never set here

    # ----------------------------------------------------------------- running

    def _run(self, script: str, flags: int = 0) -> tuple[int, str, str]:
        if self._lib is not None:
            return self._lib.run(script, flags)
        argv = ["nft", *(["-t"] if flags & OUTPUT_TERSE else []), "-f", "-"]
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
        """Converge the table to ``plan`` in one transaction (see :mod:`nft_rules`).

        Tried twice: a table changed by someone else between the read and the
        batch makes the batch fail as a whole (nothing is applied), and the
        second try starts from what is there then.
        """
        try:
            self._setup(plan)
        except FirewallError as error:
            log.warning("nftables: setup failed, trying once more: %s", error)
            self._setup(plan)

    def _setup(self, plan: FirewallPlan) -> None:
        self._expected = None
        started = time.monotonic()
        live = self._objects()
        reasons = recreate_reasons(live)
        grants: list[GrantEntry] = []
        direct = self._direct
        if reasons:  # the grant and direct sets go too: their elements are added back
            grants = self._elements(name for name, _ in GRANT_SETS.values())
            if direct is None:
                direct = tuple(
                    (g.address, g.step) for g in self._elements(n for n, _ in DIRECT_SETS.values())
                )
        spent = time.monotonic() - started + CARRY_MARGIN + CARRY_MARGIN_PER_GRANT * len(grants)
        carried = carried_grants(grants, spent)
        script = setup_script(plan, live, carried, direct)
        self._apply(script, "setup")
        expected = self._snapshot()
        problems = shape_problems(script, expected)
        if problems:
            raise FirewallError(f"nftables: setup did not take: {'; '.join(problems[:5])}")
        self._expected = expected
        if reasons:
            log.warning(
                "nftables: table %s %s re-created (%s); %d of %d grant(s) carried over",
                FAMILY,
                TABLE,
                "; ".join(reasons),
                len(carried),
                len(grants),
            )

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
        self._direct = tuple(entries)
        if self._expected is not None:  # what check() compares them with
            for name, _ in DIRECT_SETS.values():
                listing = self._set_listing(name)
                if listing is not None:
                    self._expected[f"elements {name}"] = listing

    def available(self) -> bool:
        """Does nftables answer here at all (``backend: auto``)?"""
        rc, _, _ = self._run("list tables\n")
        return rc == 0

    def check(self) -> bool:
        """True while the table is as setup left it: every chain, rule, hook, priority,
        policy, set definition and table flag, and the elements of the small sets
        (:data:`CHECKED_SETS`). Without a setup in this process: the table is there."""
        actual = self._snapshot()
        if self._expected is None:
            return "table" in actual and not recreate_reasons(actual)
        problems = drift(self._expected, actual)
        if problems:
            log.warning(
                "nftables: table %s %s is not as set up: %s%s",
                FAMILY,
                TABLE,
                "; ".join(problems[:5]),
                f" (and {len(problems) - 5} more)" if len(problems) > 5 else "",
            )
        return not problems

    def _objects(self) -> dict[str, str]:
        """The table's definition (:func:`table_objects`), without fetching any element."""
        rc, out, err = self._run(f"list ruleset {FAMILY}\n", OUTPUT_TERSE)
        if rc != 0:
            raise FirewallError(f"nftables: list ruleset {FAMILY} failed: {err.strip()}")
        try:
            return table_objects(out)
        except ValueError as error:
            raise FirewallError(f"nftables: list ruleset {FAMILY}: {error}") from None

    def _set_listing(self, name: str) -> str | None:
        """The elements of one set (:func:`set_elements`); None when it does not exist."""
        rc, out, err = self._run(f"list set {FAMILY} {TABLE} {name}\n")
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise FirewallError(f"nftables: list set {name} failed: {err.strip()}")
        return set_elements(out)

    def _snapshot(self) -> dict[str, str]:
        """What check() compares: the definitions, then the checked sets' elements."""
        snapshot = self._objects()
        for name in CHECKED_SETS:
            if f"set {name}" in snapshot:  # one set a call: nft refuses two `list set`s
                listing = self._set_listing(name)
                if listing is not None:
                    snapshot[f"elements {name}"] = listing
        return snapshot

    def _elements(self, names: Iterable[str]) -> list[GrantEntry]:
        """The (address . proto . port) elements of sets, with what is left of their
        timeouts (0: none); sets that are missing or of another type give nothing."""
        entries: list[GrantEntry] = []
        for name in names:
            rc, out, _ = self._run(f"list set {FAMILY} {TABLE} {name}\n")
            if rc == 0:
                entries.extend(_parse_grants(out))
        return entries

    def teardown(self) -> None:
        self._expected = None
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
