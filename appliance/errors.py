"""knockgate's exception tree.

``KnockgateError`` is the root; everything the user can cause (a bad config, an
unreachable host, a failing firewall) is one of its subclasses and is reported
as one line, never a traceback. Any other exception is a bug.
"""

from __future__ import annotations


class KnockgateError(Exception):
    """Base of every error knockgate reports to the user."""


class ConfigError(KnockgateError):
    """One or more problems in a configuration file.

    Each problem is a line ``FILE:LINE: key.path: what is wrong (what was expected)``.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class CaptureError(KnockgateError):
    """What packets come from cannot be used: a capture file that cannot be read, a
    filter the kernel refuses, the host's links and addresses that cannot be followed."""


class KnockError(KnockgateError):
    """The knock client could not send its knocks."""


class FirewallError(KnockgateError):
    """A firewall backend failed (argv and stderr in the message)."""


class ContainerError(KnockgateError):
    """The container runtime failed."""
