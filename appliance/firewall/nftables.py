"""The nftables backend (default): one table, ``inet knockgate``.

Every change is a JSON batch (:mod:`nft_rules`) run through libnftables in-process
(:mod:`libnft`, ctypes; no fork on the grant path, which is what keeps knock-to-open
at a millisecond or two), and every read is a JSON listing compared or parsed as
data. There is no ``nft`` command fallback: ``nft`` is itself a front end of
libnftables.so.1, so a host with the command has the library. In another network
namespace (``netns``, for tests) the library's socket is opened inside it.

``check`` compares the table with what it was right after ``setup``: one terse,
stateless JSON listing of the ``inet`` family (libnftables fetches no set elements
for a terse ``list ruleset``, however full the scan sets are; ``list table`` and
``list chain`` fetch them all, 0.15 s and more with 60 000) and the elements of the
few small sets that only ``setup`` and ``set_direct`` change. Other tables in the
listing are ignored. The table flags come from netlink first (see :mod:`libnft`: nft
1.0.6 cannot list a table with one flag as JSON safely): knockgate's table with flags
is not listed at all, and while another ``inet`` table has flags only knockgate's
own table is listed (``list table``, elements included: slower, but safe).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from appliance.core.model import Step
from appliance.errors import FirewallError
from appliance.firewall import FirewallPlan, GrantEntry
from appliance.firewall.libnft import (
    JSON,
    OUTPUT_STATELESS,
    OUTPUT_TERSE,
    Libnftables,
    NftError,
    flag_names,
)
from appliance.firewall.nft_rules import (
    CHECKED_SETS,
    DIRECT_SETS,
    FAMILY,
    GRANT_SETS,
    TABLE,
    Batch,
    carried_grants,
    direct_batch,
    drift,
    grant_batch,
    grant_entries,
    has_set,
    holds,
    list_ruleset,
    list_set,
    list_sets,
    list_table,
    recreate_reasons,
    revoke_batch,
    set_elements,
    setup_batch,
    shape_problems,
    table_objects,
    teardown_batch,
)

log = logging.getLogger("knockgate.firewall")

# Grants added back to a re-created table lose this much more than the time spent
# reading them: the batch is built, parsed and committed after their timeouts are
# written (measured: 1 ms + 10 us a grant; 20 000 grants, 0.2 s).
CARRY_MARGIN = 0.2  # seconds
CARRY_MARGIN_PER_GRANT = 50e-6  # seconds


class NftablesBackend:
    """Owns ``inet knockgate``; never writes any other table (``check`` reads the terse
    listing of the ``inet`` family and looks only at knockgate's table in it)."""

    name = "nftables"

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._nft = Libnftables(netns)
        # The table as read right after setup (and set_direct); None: no setup yet.
        self._expected: dict[str, str] | None = None
        self._direct: tuple[tuple[str, Step], ...] | None = None  # None: never set here

    # ----------------------------------------------------------------- running

    def _apply(self, batch: Batch, what: str) -> None:
        if not batch:
            return
        try:
            self._nft.run(batch)
        except NftError as error:
            ((verb, body),) = batch[0].items()
            first = f"{verb} {next(iter(body), '')}"
            raise FirewallError(
                f"nftables: {what} failed: {error.error} (batch of {len(batch)}: {first} ...)"
            ) from None

    def _list(self, command: Batch, what: str, flags: int = 0) -> list[JSON]:
        try:
            return self._nft.run(command, flags)
        except NftError as error:
            raise FirewallError(f"nftables: {what} failed: {error.error}") from None

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
            grants = self._elements(GRANT_SETS.values())
            if direct is None:
                direct = tuple((g.address, g.step) for g in self._elements(DIRECT_SETS.values()))
        spent = time.monotonic() - started + CARRY_MARGIN + CARRY_MARGIN_PER_GRANT * len(grants)
        carried = carried_grants(grants, spent)
        batch = setup_batch(plan, live, carried, direct)
        self._apply(batch, "setup")
        expected = self._snapshot()
        problems = shape_problems(batch, expected)
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
        """One batch for ``floor(seconds)`` kernel seconds; under one second: nothing."""
        self._apply(grant_batch(address, ports, seconds), f"grant to {address}")

    def revoke(self, address: str, ports: tuple[Step, ...]) -> None:
        self._apply(revoke_batch(address, ports), f"revoke from {address}")

    def is_held(self, address: str) -> bool:
        # `list set` of the (small) held set, not `get element`: nft's `get` fetches the
        # elements of every set in the table first, which costs ~850 ms once the scan
        # detector's own sets hold 60 000 entries under a flood (`list set`: 0.1 ms).
        name = f"held{6 if ':' in address else 4}"
        try:
            return holds(self._nft.run(list_set(name)), name, address)
        except NftError as error:
            if not has_set(self._list(list_sets(), "list sets", OUTPUT_TERSE), name):
                return False  # no scan detection configured
            raise FirewallError(f"nftables: held check for {address} failed: {error}") from None

    def grants(self) -> list[GrantEntry]:
        entries: list[GrantEntry] = []
        for name in GRANT_SETS.values():
            entries += grant_entries(self._list(list_set(name), f"list set {name}"), name)
        return entries

    def set_direct(self, entries: tuple[tuple[str, Step], ...]) -> None:
        self._apply(direct_batch(entries), "service container addresses")
        self._direct = tuple(entries)
        if self._expected is not None:  # what check() compares them with
            for name in DIRECT_SETS.values():
                elements = self._set_elements(name)
                if elements is not None:
                    self._expected[f"elements {name}"] = elements

    def available(self) -> bool:
        """Does nftables answer here at all (``backend: auto``)?"""
        try:  # `list chains`, not `list tables`: it prints no table (see libnft)
            self._nft.table_flags()
            self._nft.run([{"list": {"chains": {"family": FAMILY}}}], OUTPUT_TERSE)
        except FirewallError:
            return False
        return True

    def installed(self) -> bool:
        """Whether knockgate's table is there (one netlink read, nothing listed)."""
        return TABLE in self._nft.table_flags()

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
        """The table's definition (:func:`table_objects`), without fetching any element
        while no ``inet`` table has flags."""
        flags = self._nft.table_flags()
        if TABLE not in flags:
            return {}
        if flags[TABLE]:  # not listed: nft 1.0.6 would print freed memory (libnft)
            return table_objects([], flag_names(flags[TABLE]))
        quiet = OUTPUT_TERSE | OUTPUT_STATELESS
        if any(flags.values()):  # someone else's table with flags: list only ours
            return table_objects(self._list(list_table(), f"list table {TABLE}", quiet))
        return table_objects(self._list(list_ruleset(), f"list ruleset {FAMILY}", quiet))

    def _set_elements(self, name: str) -> str | None:
        """The elements of one set (:func:`set_elements`); None when it cannot be listed."""
        try:
            return set_elements(self._nft.run(list_set(name)), name)
        except NftError:
            return None

    def _snapshot(self) -> dict[str, str]:
        """What check() compares: the definitions, then the checked sets' elements."""
        snapshot = self._objects()
        for name in CHECKED_SETS:
            if f"set {name}" in snapshot:  # one set a call: nft refuses two `list set`s
                elements = self._set_elements(name)
                if elements is not None:
                    snapshot[f"elements {name}"] = elements
        return snapshot

    def _elements(self, names: Iterable[str]) -> list[GrantEntry]:
        """The (address . proto . port) elements of sets, with what is left of their
        timeouts (0: none); sets that are missing or of another type give nothing."""
        entries: list[GrantEntry] = []
        for name in names:
            try:
                entries += grant_entries(self._nft.run(list_set(name)), name)
            except NftError:
                continue
        return entries

    def teardown(self) -> None:
        self._expected = None
        self._apply(teardown_batch(), "teardown")
