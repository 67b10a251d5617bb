"""An in-memory firewall for unit tests: the same protocol, a dict for a kernel."""

from __future__ import annotations

from collections.abc import Callable

from appliance.core.model import Step
from appliance.firewall import FirewallPlan, GrantEntry


class MemoryBackend:
    """Grants expire against ``clock``; ``held`` is set by the test."""

    name = "memory"

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.plan: FirewallPlan | None = None
        self.table: dict[tuple[str, Step], float] = {}  # (address, step) -> deadline
        self.held: set[str] = set()
        self.calls: list[str] = []
        self.direct: tuple[tuple[str, Step], ...] = ()
        self.fail: str | None = None  # name of a method that raises FirewallError

    def _call(self, name: str) -> None:
        from appliance.errors import FirewallError

        self.calls.append(name)
        if self.fail == name:
            raise FirewallError(f"memory: {name} failed (as the test asked)")

    def setup(self, plan: FirewallPlan) -> None:
        self._call("setup")
        self.plan = plan

    def grant(self, address: str, ports: tuple[Step, ...], seconds: float) -> None:
        self._call("grant")
        for step in ports:
            self.table[(address, step)] = self.clock() + seconds

    def revoke(self, address: str, ports: tuple[Step, ...]) -> None:
        self._call("revoke")
        for step in ports:
            self.table.pop((address, step), None)

    def is_held(self, address: str) -> bool:
        self._call("is_held")
        return address in self.held

    def grants(self) -> list[GrantEntry]:
        now = self.clock()
        return [
            GrantEntry(address, step, deadline - now)
            for (address, step), deadline in self.table.items()
            if deadline > now
        ]

    def is_open(self, address: str, step: Step) -> bool:
        return self.table.get((address, step), 0.0) > self.clock()

    def set_direct(self, entries: tuple[tuple[str, Step], ...]) -> None:
        self._call("set_direct")
        self.direct = entries

    def check(self) -> bool:
        return self.plan is not None

    def teardown(self) -> None:
        self._call("teardown")
        self.plan = None
        self.table.clear()
