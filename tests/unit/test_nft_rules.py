"""The nftables ruleset is data (libnftables JSON): golden tests of the exact batches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from appliance.config.schema import ScanPolicy
from appliance.core.model import Step
from appliance.firewall import FirewallPlan, GrantEntry, PortRange, grant_seconds
from appliance.firewall.nft_rules import (
    Batch,
    carried_grants,
    drift,
    grant_batch,
    grant_entries,
    holds,
    recreate_reasons,
    revoke_batch,
    set_elements,
    setup_batch,
    shape_problems,
    table_objects,
    teardown_batch,
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
T = {"family": "inet", "table": "knockgate"}


def named(verb: str, kind: str, batch: Batch) -> list[str]:
    """The names (chains for rules) of ``batch``'s ``verb kind`` commands, in order."""
    out = []
    for command in batch:
        spec = command.get(verb, {}).get(kind)
        if spec is not None:
            out.append(spec.get("chain", spec.get("name")) if kind == "rule" else spec["name"])
    return out


def elements(batch: Batch, name: str) -> list[Any]:
    for command in batch:
        spec = command.get("add", {}).get("element")
        if spec is not None and spec["name"] == name:
            return list(spec["elem"])
    return []


def rules(batch: Batch, chain: str) -> list[list[Any]]:
    return [
        c["add"]["rule"]["expr"]
        for c in batch
        if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain
    ]


def test_setup_batch_matches_golden() -> None:
    """The JSON batch, exactly; applied, nft 1.0.6 makes the same kernel bytecode as the
    nft script it replaced (compared with ``nft --debug=netlink list ruleset``)."""
    golden = json.loads((GOLDEN / "nft_setup.json").read_text())
    assert {"nftables": setup_batch(PLAN)} == golden


def test_setup_of_a_new_table_deletes_only_the_chains_it_makes_again() -> None:
    """`add chain` is a no-op on a chain that exists, so the chains are made, emptied,
    deleted and made again whatever was there; sets are deleted only when listed."""
    batch = setup_batch(PLAN)
    assert named("delete", "set", batch) == named("flush", "set", batch) == []
    assert named("delete", "table", batch) == []
    assert named("delete", "chain", batch).count("input") == 1
    assert named("add", "set", batch).count("held4") == 1


def test_long_knock_is_not_counted_as_a_scan() -> None:
    """A door's knock ports return from the scan chain before anything is counted, so
    a sequence of more than scan.ports ports sent fast does not hold its knocker off."""
    batch = setup_batch(PLAN)
    tcp = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}
    dport = {"payload": {"protocol": "tcp", "field": "dport"}}
    assert rules(batch, "scan")[0] == [
        tcp,
        {"match": {"op": "==", "left": dport, "right": "@knock_tcp"}},
        {"return": None},
    ]
    assert elements(batch, "knock_tcp") == [{"range": [7113, 7114]}, {"range": [20000, 29999]}]
    assert elements(batch, "knock_udp") == [2231, 62201]
    without = setup_batch(FirewallPlan(PLAN.protected, PLAN.always_allow, PLAN.scan))
    assert elements(without, "knock_tcp") == []  # an empty set, still there
    assert "knock_tcp" in named("add", "set", without)
    assert len(rules(without, "scan")) == 6


def test_setup_without_scan_detection_has_no_scan_rules() -> None:
    batch = setup_batch(FirewallPlan((Step(22, "tcp"),), (), None, PLAN.knock))
    assert rules(batch, "scan") == []
    assert "scan" not in json.dumps(rules(batch, "input"))
    assert "held4" not in named("add", "set", batch)
    assert "knock_tcp" not in named("add", "set", batch)
    assert elements(batch, "protected_tcp") == [22]
    assert "protected_udp" not in named("add", "element", batch)


def test_scan_rate_rounds_up_burst_is_the_port_count_and_timeouts_are_whole_seconds() -> None:
    batch = setup_batch(FirewallPlan((Step(22, "tcp"),), (), ScanPolicy(7, 3.5, 30.9)))
    limit = rules(batch, "scan")[3][2]["set"]["stmt"][0]
    assert limit == {"limit": {"rate": 2, "burst": 7, "per": "second", "inv": True}}
    sets = {c["add"]["set"]["name"]: c["add"]["set"] for c in batch if "set" in c.get("add", {})}
    assert sets["ports_seen4"]["timeout"] == 3 and sets["held6"]["timeout"] == 30
    assert sets["held4"] == {
        **T,
        "name": "held4",
        "type": "ipv4_addr",
        "flags": ["timeout"],  # nft makes it dynamic itself: a rule adds to it
        "size": 65536,
        "timeout": 30,
    }


def test_scan_window_under_a_second_keeps_a_timeout() -> None:
    """nft 1.0.6 reads a JSON timeout of 0 (or 0.5) as none: entries that never expire."""
    batch = setup_batch(FirewallPlan((Step(22, "tcp"),), (), ScanPolicy(10, 0.5, 60.0)))
    sets = {c["add"]["set"]["name"]: c["add"]["set"] for c in batch if "set" in c.get("add", {})}
    assert sets["ports_seen4"]["timeout"] == 1 and sets["scan_rate6"]["timeout"] == 1


def test_grant_refreshes_the_timeout_in_whole_seconds_at_most_the_slack_longer() -> None:
    timed = [
        {"elem": {"val": {"concat": ["198.18.0.2", "tcp", 22]}, "timeout": 29}},
        {"elem": {"val": {"concat": ["198.18.0.2", "udp", 53]}, "timeout": 29}},
    ]
    plain = [{"concat": ["198.18.0.2", "tcp", 22]}, {"concat": ["198.18.0.2", "udp", 53]}]
    assert grant_batch("198.18.0.2", (Step(22, "tcp"), Step(53, "udp")), 29.94) == [
        {"add": {"element": {**T, "name": "grants4", "elem": timed}}},
        {"delete": {"element": {**T, "name": "grants4", "elem": plain}}},
        {"add": {"element": {**T, "name": "grants4", "elem": timed}}},
    ]


def test_grant_of_less_than_a_second_opens_nothing() -> None:
    """A JSON timeout of 0 would be an element that never expires: no batch at all."""
    for seconds in (0.94, 0.0, -5.0):
        assert grant_batch("198.18.0.2", (Step(22, "tcp"),), seconds) == []
    assert grant_batch("198.18.0.2", (), 30.0) == []


@pytest.mark.parametrize(
    ("seconds", "kernel"), [(30.0, 30), (29.999, 30), (29.94, 29), (1.0, 1), (0.999, 1), (0.5, 0)]
)
def test_a_fresh_grant_is_whole_seconds_at_most_50_ms_longer(seconds: float, kernel: int) -> None:
    """Regression: the time left is a millisecond under the grant by the time it reaches
    the kernel, so rounding down cut every grant by a second and made a 1 s SPA grant
    (fwknop -f 1) open nothing."""
    assert grant_seconds(seconds) == kernel


def test_ipv6_grants_go_to_the_ipv6_set() -> None:
    batch = grant_batch("2001:2::7", (Step(22, "tcp"),), 5.0)
    assert batch[0]["add"]["element"]["name"] == "grants6"
    assert batch[0]["add"]["element"]["elem"] == [
        {"elem": {"val": {"concat": ["2001:2::7", "tcp", 22]}, "timeout": 5}}
    ]


def test_revoke_and_teardown_are_idempotent_batches() -> None:
    assert revoke_batch("198.18.0.2", (Step(22, "tcp"),)) == [
        {
            "add": {
                "element": {
                    **T,
                    "name": "grants4",
                    "elem": [
                        {"elem": {"val": {"concat": ["198.18.0.2", "tcp", 22]}, "timeout": 1}}
                    ],
                }
            }
        },
        {
            "delete": {
                "element": {**T, "name": "grants4", "elem": [{"concat": ["198.18.0.2", "tcp", 22]}]}
            }
        },
    ]
    table = {"family": "inet", "name": "knockgate"}
    assert teardown_batch() == [{"add": {"table": table}}, {"delete": {"table": table}}]


# -- tamper repair: the table as nft lists it, drift, and setups that converge ------------

# `nft -j --terse --stateless list ruleset inet` right after setup_batch(PLAN), as nft
# 1.0.6 prints it (with someone else's table first).
LISTING = json.loads((GOLDEN / "nft_listing.json").read_text())["nftables"]
GRANT = GrantEntry("198.18.0.2", Step(22, "tcp"), 12.5)
GRANT6 = GrantEntry("2001:2::9", Step(53, "udp"), 3.0)


def test_table_objects_reads_the_listing_nft_prints() -> None:
    live = table_objects(LISTING)
    assert live["table"] == ""
    assert live["chain input"] == '{"hook":"input","policy":"accept","prio":-10,"type":"filter"}'
    assert live["chain gate"] == ""
    assert live["set grants4"] == (
        '{"flags":["timeout"],"type":["ipv4_addr","inet_proto","inet_service"]}'
    )
    assert live["set held4"] == '{"flags":["timeout"],"size":65536,"timeout":60,"type":"ipv4_addr"}'
    assert json.loads(live["rule gate #7"]) == {"expr": [{"drop": None}]}
    assert "chain c" not in live  # inet other is not ours
    assert shape_problems(setup_batch(PLAN), live) == []
    assert recreate_reasons(live) == []
    assert table_objects([{"table": {"family": "inet", "name": "other", "handle": 1}}]) == {}
    assert table_objects([], "dormant") == {"table": "flags dormant"}


def test_table_objects_leaves_counter_values_and_handles_out() -> None:
    listing = [
        {"table": {"family": "inet", "name": "knockgate", "handle": 9}},
        {"counter": {**T, "name": "seen", "handle": 3, "packets": 7, "bytes": 420}},
        {"chain": {**T, "name": "input", "handle": 4}},
        {
            "rule": {
                **T,
                "chain": "input",
                "handle": 5,
                "expr": [{"counter": {"packets": 3, "bytes": 180}}, {"accept": None}],
            }
        },
    ]
    assert table_objects(listing) == {
        "table": "",
        "counter seen": "",
        "chain input": "",
        "rule input #1": '{"expr":[{"counter":null},{"accept":null}]}',
    }


def test_set_elements_grants_and_holds_read_list_set_json() -> None:
    direct = [
        {
            "set": {
                **T,
                "name": "direct4",
                "elem": [
                    {"concat": ["198.18.78.3", "udp", 53]},
                    {"concat": ["198.18.78.2", "tcp", 22]},
                ],
            }
        }
    ]
    assert set_elements(direct, "direct4") == (
        '{"concat":["198.18.78.2","tcp",22]}, {"concat":["198.18.78.3","udp",53]}'
    )
    assert set_elements([{"set": {**T, "name": "direct4"}}], "direct4") == ""
    grants = [
        {
            "set": {
                **T,
                "name": "grants4",
                "elem": [
                    {
                        "elem": {
                            "val": {"concat": ["198.18.0.2", "tcp", 22]},
                            "timeout": 30,
                            "expires": 27,
                        }
                    },
                    {"concat": ["198.18.0.3", "udp", 53]},  # no timeout: never expires
                    {"concat": ["198.18.0.4", "tcp"]},  # not ours
                ],
            }
        }
    ]
    assert grant_entries(grants, "grants4") == [
        GrantEntry("198.18.0.2", Step(22, "tcp"), 27.0),
        GrantEntry("198.18.0.3", Step(53, "udp"), 0.0),
    ]
    held = [
        {
            "set": {
                **T,
                "name": "held6",
                "elem": ["2001:2::7", {"elem": {"val": "2001:2::9", "expires": 5}}],
            }
        }
    ]
    assert holds(held, "held6", "2001:2:0::9") and holds(
        held, "held6", "2001:2::7"
    )  # as nft prints
    assert not holds(held, "held6", "2001:2::8")


def test_drift_says_what_changed() -> None:
    live = table_objects(LISTING)
    assert drift(live, dict(live)) == []
    assert drift(live, {}) == ["table missing"]
    assert drift(live, {"table": "flags dormant"}) == ["table flags dormant"]
    flushed = {key: value for key, value in live.items() if not key.startswith("rule gate ")}
    assert drift(live, flushed) == ["chain gate: rules 1-7 of 7 missing"]
    accept = '{"expr":[{"accept":null}]}'
    inserted = {**live, "rule input #1": accept}
    inserted.update({f"rule input #{n + 1}": live[f"rule input #{n}"] for n in range(1, 5)})
    assert drift(live, inserted) == [f"chain input: rule added at 1: {accept}"]
    without_reject = {key: value for key, value in live.items() if key != "rule gate #7"}
    without_reject["rule gate #6"] = live["rule gate #7"]
    assert drift(live, without_reject) == ["chain gate: rule 6 of 7 missing"]
    commented = {**live, "table": '{"comment":"x"}'}
    assert drift(live, commented) == ['table changed: {"comment":"x"}']
    moved = {**live, "chain input": '{"hook":"input","policy":"drop","prio":100,"type":"filter"}'}
    assert drift(live, moved) == [
        'chain input changed: {"hook":"input","policy":"drop","prio":100,"type":"filter"}'
    ]
    emptied = {**live, "elements protected_tcp": ""}
    assert drift({**live, "elements protected_tcp": "22, 2222"}, emptied) == [
        "elements protected_tcp changed: (nothing)"
    ]
    assert drift(live, {**live, "chain evil": ""}) == ["chain evil added: (nothing)"]


def test_setup_over_a_live_table_rebuilds_in_place_and_keeps_the_grant_sets() -> None:
    live = table_objects(LISTING)
    batch = setup_batch(PLAN, live, grants=[GRANT])
    assert named("delete", "table", batch) == []
    assert not [n for n in named("delete", "set", batch) if n.startswith(("grants", "direct"))]
    assert not [n for n in named("add", "element", batch) if n.startswith("grants")]
    assert named("flush", "set", batch) == []  # direct sets as they are
    assert named("delete", "set", batch).count("held4") == 1  # present: deleted, made again
    assert batch.index({"delete": {"chain": {**T, "name": "input"}}}) > batch.index(
        {"flush": {"chain": {**T, "name": "service_gate"}}}
    )  # every chain emptied before any is deleted
    direct = [("198.18.78.2", Step(22, "tcp")), ("2001:2::5", Step(22, "tcp"))]
    batch = setup_batch(PLAN, live, direct=direct)
    assert named("flush", "set", batch) == ["direct4", "direct6"]
    assert elements(batch, "direct4") == [{"concat": ["198.18.78.2", "tcp", 22]}]
    assert elements(batch, "direct6") == [{"concat": ["2001:2::5", "tcp", 22]}]


def test_dormant_table_is_recreated_with_its_grants_carried() -> None:
    """`add table` need not clear dormant; deleting and re-creating the table in the same
    transaction does, and the grants go back with what was left of them."""
    live = table_objects([], "dormant")  # never listed: see libnft
    assert recreate_reasons(live) == ["table flags dormant"]
    direct = [("198.18.78.2", Step(22, "tcp"))]
    batch = setup_batch(PLAN, live, [GRANT, GRANT6], direct)
    table = {"family": "inet", "name": "knockgate"}
    assert batch[:3] == [
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
    ]
    assert elements(batch, "grants4") == [
        {"elem": {"val": {"concat": ["198.18.0.2", "tcp", 22]}, "timeout": 12}}
    ]
    assert elements(batch, "grants6") == [
        {"elem": {"val": {"concat": ["2001:2::9", "udp", 53]}, "timeout": 3}}
    ]
    assert elements(batch, "direct4") == [{"concat": ["198.18.78.2", "tcp", 22]}]
    assert named("flush", "set", batch) == named("delete", "set", batch) == []
    assert shape_problems(setup_batch(PLAN, live), table_objects(LISTING)) == []


def test_replaced_grant_set_or_foreign_objects_recreate_the_table() -> None:
    live = table_objects(LISTING)
    no_timeout = {**live, "set grants4": '{"type":["ipv4_addr","inet_proto","inet_service"]}'}
    assert recreate_reasons(no_timeout) == [
        'set grants4 replaced ({"type":["ipv4_addr","inet_proto","inet_service"]})'
    ]
    other_type = {**live, "set direct6": '{"type":"ipv6_addr"}'}
    assert recreate_reasons(other_type) == ['set direct6 replaced ({"type":"ipv6_addr"})']
    foreign = {**live, "chain evil": "", "counter c": "", "map protected_tcp": "x"}
    assert recreate_reasons(foreign) == [
        "chain evil is not knockgate's",
        "counter c is not knockgate's",
        "map protected_tcp is not knockgate's",
    ]
    # A set of ours with another type is simply made again, in place.
    assert recreate_reasons({**live, "set protected_tcp": '{"type":"ipv4_addr"}'}) == []
    assert named("delete", "table", setup_batch(PLAN, {**live, "set allow4": "x"})) == []


def test_scan_turned_off_deletes_the_scan_sets() -> None:
    plan = FirewallPlan(PLAN.protected, PLAN.always_allow, None, PLAN.knock)
    batch = setup_batch(plan, table_objects(LISTING))
    for name in ("ports_seen4", "scan_rate6", "held4", "knock_tcp"):
        assert name in named("delete", "set", batch)
        assert name not in named("add", "set", batch)
    scan_sets = ["held4", "held6", "knock_tcp", "knock_udp", "ports_seen4", "ports_seen6"]
    scan_sets += ["scan_rate4", "scan_rate6"]
    assert shape_problems(batch, table_objects(LISTING)) == [
        "rule input #4 not made by setup",
        *(f"rule scan #{n} not made by setup" for n in range(1, 7)),
        *(f"set {name} not made by setup" for name in scan_sets),
    ]


def test_carried_grants_drop_what_never_expires_and_never_last_longer() -> None:
    grants = [
        GrantEntry("198.18.0.2", Step(22, "tcp"), 10.0),
        GrantEntry("198.18.0.3", Step(22, "tcp"), 0.0),  # no timeout: would never expire
        GrantEntry("198.18.0.4", Step(22, "tcp"), 1.2),  # under a second left after setup
    ]
    assert carried_grants(grants, 0.3) == [GrantEntry("198.18.0.2", Step(22, "tcp"), 9.0)]
