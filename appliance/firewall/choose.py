"""``backend: auto|nftables|iptables``: pick the backend that works here."""

from __future__ import annotations

import logging

from appliance.errors import FirewallError
from appliance.firewall import FirewallBackend

log = logging.getLogger("knockgate.firewall")


def _nftables() -> FirewallBackend:
    from appliance.firewall.nftables import NftablesBackend

    backend = NftablesBackend()
    if not backend.available():
        raise FirewallError("nftables does not answer (nft list tables failed)")
    return backend


def _iptables() -> FirewallBackend:
    from appliance.firewall.iptables import IptablesBackend

    return IptablesBackend()


def choose_backend(setting: str) -> FirewallBackend:
    """The configured backend; for ``auto`` nftables when it works, else iptables."""
    if setting == "nftables":
        return _nftables()
    if setting == "iptables":
        return _iptables()
    try:
        backend = _nftables()
    except FirewallError as error:
        log.warning("nftables unusable (%s); trying iptables", error)
        backend = _iptables()
    log.info("firewall backend: %s (auto)", backend.name)
    return backend
