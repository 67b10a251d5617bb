"""The nftables ruleset is data: golden tests of the exact batches."""

from __future__ import annotations

from pathlib import Path

from appliance.core.model import ScanPolicy, Step
from appliance.firewall import FirewallPlan, PortRange
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
    knock=(
        PortRange("tcp", 7113, 7113),
        PortRange("udp", 2231, 2231),
        PortRange("tcp", 20000, 29999),
        PortRange("tcp", 7114, 7114),
        PortRange("udp", 62201, 62201),
    ),
)


def test_setup_batch_matches_golden() -> None:
    assert setup_script(PLAN) == (GOLDEN / "nft_setup.nft").read_text()


def test_setup_keeps_grant_sets_and_rebuilds_everything_else() -> None:
    lines = setup_script(PLAN).splitlines()
    assert not any("delete set inet knockgate grants" in line for line in lines)
    assert not any(line.startswith("flush set") for line in lines)
    assert lines.count("delete set inet knockgate held4") == 1


def test_long_knock_is_not_counted_as_a_scan() -> None:
    """A door's knock ports return from the scan chain before anything is counted, so
    a sequence of more than scan.ports ports sent fast does not hold its knocker off."""
    lines = setup_script(PLAN).splitlines()
    scan = [line for line in lines if line.startswith("add rule inet knockgate scan ")]
    assert scan[:2] == [
        "add rule inet knockgate scan meta l4proto tcp tcp dport @knock_tcp return",
        "add rule inet knockgate scan meta l4proto udp udp dport @knock_udp return",
    ]
    assert "add element inet knockgate knock_tcp { 7113-7114, 20000-29999 }" in lines
    assert "add element inet knockgate knock_udp { 2231, 62201 }" in lines
    without = setup_script(FirewallPlan(PLAN.protected, PLAN.always_allow, PLAN.scan))
    assert "add element inet knockgate knock_" not in without  # an empty set, still there
    assert "knock_tcp return" in without


def test_setup_without_scan_detection_has_no_scan_rules() -> None:
    script = setup_script(FirewallPlan((Step(22, "tcp"),), (), None, PLAN.knock))
    assert "jump scan" not in script
    assert "held4" not in script
    assert "knock_tcp" not in script
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
