"""The nftables ruleset is data: golden tests of the exact batches."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config.schema import ScanPolicy
from appliance.core.model import Step
from appliance.firewall import FirewallPlan, GrantEntry, PortRange
from appliance.firewall.nft_rules import (
    carried_grants,
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


def test_setup_of_a_new_table_deletes_only_the_chains_it_makes_again() -> None:
    """`add chain` is a no-op on a chain that exists, so the chains are made, emptied,
    deleted and made again whatever was there; sets are deleted only when listed."""
    lines = setup_script(PLAN).splitlines()
    assert not any(line.startswith(("delete set", "flush set", "delete table")) for line in lines)
    assert lines.count("delete chain inet knockgate input") == 1
    assert sum(line.startswith("add set inet knockgate held4 ") for line in lines) == 1


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


# -- tamper repair: the table as nft lists it, drift, and setups that converge ------------

# `nft --terse list ruleset inet` right after setup_script(PLAN), as nft 1.0.6 prints it
# (with someone else's table first).
LISTING = (GOLDEN / "nft_listing.txt").read_text()
GRANT = GrantEntry("198.18.0.2", Step(22, "tcp"), 12.5)
GRANT6 = GrantEntry("2001:2::9", Step(53, "udp"), 3.0)


def test_table_objects_reads_the_listing_nft_prints() -> None:
    live = table_objects(LISTING)
    assert live["table"] == ""
    assert live["chain input"] == "type filter hook input priority filter - 10; policy accept;"
    assert live["chain gate"] == ""
    assert live["set grants4"] == "type ipv4_addr . inet_proto . inet_service; flags timeout"
    assert live["set held4"] == "type ipv4_addr; size 65536; flags dynamic,timeout; timeout 1m"
    assert live["rule scan #1"] == "tcp dport @knock_tcp return"
    assert live["rule gate #7"] == "drop"
    assert "chain c" not in live  # inet other is not ours
    assert shape_problems(setup_script(PLAN), live) == []
    assert recreate_reasons(live) == []
    assert table_objects("table inet other {\n}\n") == {}


def test_table_objects_leaves_counter_values_out() -> None:
    listing = (
        "table inet knockgate {\n\tcounter seen {\n\t\tpackets 7 bytes 420\n\t}\n"
        "\tchain input {\n\t\tcounter packets 3 bytes 180 tcp dport 22 accept\n\t}\n}\n"
    )
    assert table_objects(listing) == {
        "table": "",
        "counter seen": "",
        "chain input": "",
        "rule input #1": "counter tcp dport 22 accept",
    }
    with pytest.raises(ValueError, match="does not end"):
        table_objects("table inet knockgate {\n\tchain input {\n")


def test_set_elements_sorted_across_lines() -> None:
    listing = (
        "table inet knockgate {\n\tset direct4 {\n"
        "\t\ttype ipv4_addr . inet_proto . inet_service\n"
        "\t\telements = { 198.18.78.3 . udp . 53,\n\t\t\t     198.18.78.2 . tcp . 22 }\n\t}\n}\n"
    )
    assert set_elements(listing) == "198.18.78.2 . tcp . 22, 198.18.78.3 . udp . 53"
    assert set_elements("table inet knockgate {\n\tset direct4 {\n\t}\n}\n") == ""


def test_drift_says_what_changed() -> None:
    live = table_objects(LISTING)
    assert drift(live, dict(live)) == []
    assert drift(live, {}) == ["table missing"]
    flushed = {key: value for key, value in live.items() if not key.startswith("rule gate ")}
    assert drift(live, flushed) == ["chain gate: rules 1-7 of 7 missing"]
    inserted = {**live, "rule input #1": "tcp dport 22 accept"}
    inserted.update({f"rule input #{n + 1}": live[f"rule input #{n}"] for n in range(1, 5)})
    assert drift(live, inserted) == ["chain input: rule added at 1: tcp dport 22 accept"]
    without_reject = {key: value for key, value in live.items() if key != "rule gate #7"}
    without_reject["rule gate #6"] = "drop"
    assert drift(live, without_reject) == ["chain gate: rule 6 of 7 missing"]
    dormant = {**live, "table": "flags dormant"}
    assert drift(live, dormant) == ["table changed: flags dormant"]
    moved = {**live, "chain input": "type filter hook input priority 100; policy drop;"}
    assert drift(live, moved) == [
        "chain input changed: type filter hook input priority 100; policy drop;"
    ]
    emptied = {**live, "elements protected_tcp": ""}
    assert drift({**live, "elements protected_tcp": "22, 2222"}, emptied) == [
        "elements protected_tcp changed: (nothing)"
    ]
    assert drift(live, {**live, "chain evil": ""}) == ["chain evil added: (nothing)"]


def test_setup_over_a_live_table_rebuilds_in_place_and_keeps_the_grant_sets() -> None:
    live = table_objects(LISTING)
    lines = setup_script(PLAN, live, grants=[GRANT]).splitlines()
    assert "delete table inet knockgate" not in lines
    assert not any("delete set inet knockgate grants" in line for line in lines)
    assert not any("delete set inet knockgate direct" in line for line in lines)
    assert not any(line.startswith("add element inet knockgate grants") for line in lines)
    assert not any(line.startswith("flush set") for line in lines)  # direct sets as they are
    assert lines.count("delete set inet knockgate held4") == 1  # present: deleted, made again
    assert lines.index("delete chain inet knockgate input") > lines.index(
        "flush chain inet knockgate service_gate"
    )  # every chain emptied before any is deleted
    direct = [("198.18.78.2", Step(22, "tcp")), ("2001:2::5", Step(22, "tcp"))]
    lines = setup_script(PLAN, live, direct=direct).splitlines()
    assert "flush set inet knockgate direct4" in lines
    assert "add element inet knockgate direct4 { 198.18.78.2 . tcp . 22 }" in lines
    assert "add element inet knockgate direct6 { 2001:2::5 . tcp . 22 }" in lines


def test_dormant_table_is_recreated_with_its_grants_carried() -> None:
    """`add table` need not clear dormant; deleting and re-creating the table in the same
    transaction does, and the grants go back with what was left of them."""
    live = {**table_objects(LISTING), "table": "flags dormant"}
    assert recreate_reasons(live) == ["table flags dormant"]
    direct = [("198.18.78.2", Step(22, "tcp"))]
    lines = setup_script(PLAN, live, [GRANT, GRANT6], direct).splitlines()
    assert lines[:3] == [
        "add table inet knockgate",
        "delete table inet knockgate",
        "add table inet knockgate",
    ]
    assert "add element inet knockgate grants4 { 198.18.0.2 . tcp . 22 timeout 12s500ms }" in lines
    assert "add element inet knockgate grants6 { 2001:2::9 . udp . 53 timeout 3s }" in lines
    assert "add element inet knockgate direct4 { 198.18.78.2 . tcp . 22 }" in lines
    assert not any(line.startswith(("flush set", "delete set")) for line in lines)
    assert shape_problems(setup_script(PLAN, live), table_objects(LISTING)) == []


def test_replaced_grant_set_or_foreign_objects_recreate_the_table() -> None:
    live = table_objects(LISTING)
    no_timeout = {**live, "set grants4": "type ipv4_addr . inet_proto . inet_service"}
    assert recreate_reasons(no_timeout) == [
        "set grants4 replaced (type ipv4_addr . inet_proto . inet_service)"
    ]
    other_type = {**live, "set direct6": "type ipv6_addr"}
    assert recreate_reasons(other_type) == ["set direct6 replaced (type ipv6_addr)"]
    foreign = {**live, "chain evil": "", "counter c": "", "map protected_tcp": "type x"}
    assert recreate_reasons(foreign) == [
        "chain evil is not knockgate's",
        "counter c is not knockgate's",
        "map protected_tcp is not knockgate's",
    ]
    # A set of ours with another type is simply made again, in place.
    assert recreate_reasons({**live, "set protected_tcp": "type ipv4_addr"}) == []
    assert "delete table" not in setup_script(PLAN, {**live, "set allow4": "type ipv4_addr"})


def test_scan_turned_off_deletes_the_scan_sets() -> None:
    plan = FirewallPlan(PLAN.protected, PLAN.always_allow, None, PLAN.knock)
    script = setup_script(plan, table_objects(LISTING))
    for name in ("ports_seen4", "scan_rate6", "held4", "knock_tcp"):
        assert f"delete set inet knockgate {name}\n" in script
        assert f"add set inet knockgate {name} " not in script
    scan_sets = ["held4", "held6", "knock_tcp", "knock_udp", "ports_seen4", "ports_seen6"]
    scan_sets += ["scan_rate4", "scan_rate6"]
    assert shape_problems(script, table_objects(LISTING)) == [
        "rule input #4 not made by setup",
        *(f"rule scan #{n} not made by setup" for n in range(1, 7)),
        *(f"set {name} not made by setup" for name in scan_sets),
    ]


def test_carried_grants_drop_what_never_expires_and_never_last_longer() -> None:
    grants = [
        GrantEntry("198.18.0.2", Step(22, "tcp"), 10.0),
        GrantEntry("198.18.0.3", Step(22, "tcp"), 0.0),  # no timeout: would never expire
        GrantEntry("198.18.0.4", Step(22, "tcp"), 0.3004),  # expires during the setup
    ]
    assert carried_grants(grants, 0.3) == [GrantEntry("198.18.0.2", Step(22, "tcp"), 9.7)]
