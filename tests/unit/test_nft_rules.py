"""The nftables ruleset is data: golden tests of the exact batches."""

from __future__ import annotations

from pathlib import Path

from appliance.core.model import ScanPolicy, Step
from appliance.firewall import FirewallPlan
from appliance.firewall.nft_rules import (
    grant_script,
    revoke_script,
    setup_script,
    teardown_script,
)

GOLDEN = Path(__file__).parent / "golden"
PLAN = FirewallPlan(
    (Step(22, "tcp"), Step(2222, "tcp"), Step(53, "udp")),
    ("198.18.9.0/24", "2001:2::/64"),
    ScanPolicy(10, 2.0, 60.0),
)


def test_setup_batch_matches_golden() -> None:
    assert setup_script(PLAN) == (GOLDEN / "nft_setup.nft").read_text()


def test_setup_keeps_grant_sets_and_rebuilds_everything_else() -> None:
    lines = setup_script(PLAN).splitlines()
    assert not any("delete set inet knockgate grants" in line for line in lines)
    assert not any(line.startswith("flush set") for line in lines)
    assert lines.count("delete set inet knockgate held4") == 1


def test_setup_without_scan_detection_has_no_scan_rules() -> None:
    script = setup_script(FirewallPlan((Step(22, "tcp"),), (), None))
    assert "jump scan" not in script
    assert "held4" not in script
    assert "add element inet knockgate protected_tcp { 22 }" in script
    assert "protected_udp {" not in script.split("add element", 1)[1]


def test_scan_rate_rounds_up_and_burst_is_the_port_count() -> None:
    script = setup_script(FirewallPlan((Step(22, "tcp"),), (), ScanPolicy(7, 3.0, 30.0)))
    assert "limit rate over 3/second burst 7 packets" in script
    assert "timeout 3s;" in script and "timeout 30s;" in script


def test_grant_refreshes_the_timeout_with_millisecond_precision_never_longer() -> None:
    assert grant_script("198.18.0.2", (Step(22, "tcp"), Step(53, "udp")), 29.9996) == (
        "add element inet knockgate grants4 "
        "{ 198.18.0.2 . tcp . 22 timeout 29s999ms, 198.18.0.2 . udp . 53 timeout 29s999ms }\n"
        "delete element inet knockgate grants4 { 198.18.0.2 . tcp . 22, 198.18.0.2 . udp . 53 }\n"
        "add element inet knockgate grants4 "
        "{ 198.18.0.2 . tcp . 22 timeout 29s999ms, 198.18.0.2 . udp . 53 timeout 29s999ms }\n"
    )


def test_ipv6_grants_go_to_the_ipv6_set() -> None:
    assert "grants6 { 2001:2::7 . tcp . 22 timeout 5s }" in grant_script(
        "2001:2::7", (Step(22, "tcp"),), 5.0
    )


def test_revoke_and_teardown_are_idempotent_batches() -> None:
    assert revoke_script("198.18.0.2", (Step(22, "tcp"),)) == (
        "add element inet knockgate grants4 { 198.18.0.2 . tcp . 22 timeout 1s }\n"
        "delete element inet knockgate grants4 { 198.18.0.2 . tcp . 22 }\n"
    )
    assert teardown_script() == "add table inet knockgate\ndelete table inet knockgate\n"
