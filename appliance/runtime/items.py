"""What other threads hand to the daemon's loop: typed queue items.

Threads (signal handlers, the status socket, the host watcher, service workers)
never touch the loop's state; they put one of these on its queue, and the loop
matches them exhaustively (an unknown item is a bug, raised loudly). The host
watcher's item is :class:`appliance.capture.host.HostState` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class Signal:
    """SIGTERM/SIGINT (``stop``), SIGHUP (``reload``) or SIGUSR1 (``digest``: the mail
    notifiers' digest now), from a signal handler."""

    action: Literal["stop", "reload", "digest"]


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """The status socket asks for a snapshot; ``reply`` gets it (in the loop)."""

    reply: Callable[[dict[str, Any]], None]
