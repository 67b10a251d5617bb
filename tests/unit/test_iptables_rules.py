"""Golden tests of what the iptables backend feeds iptables-restore and ipset (no root)."""

from __future__ import annotations

import shlex

import pytest

from appliance.core.model import Step
from appliance.errors import FirewallError
from appliance.firewall import FirewallPlan, GrantEntry, PortRange, ScanPolicy
from appliance.firewall.iptables import (
    IptablesBackend,
    SetHeader,
    Version,
    allow_elements,
    carried_grants,
    chain_rules,
    direct_batch,
    direct_elements,
    forward_anchor,
    grant_batch,
    grant_timeout,
    ipset_setup_batch,
    make_names,
    mark_rule_lines,
    multiport_lists,
    parse_grants,
    parse_set_headers,
    restore_text,
    revoke_batch,
    rule_lines,
    scan_limits,
    set_problems,
    structure_problems,
)

NAMES = make_names("KNOCKGATE")
PLAN = FirewallPlan(
    protected=(Step(8080, "tcp"), Step(22, "tcp"), Step(5353, "udp"), Step(22, "tcp")),
    always_allow=("198.18.50.0/24", "2001:2:0:1::/64"),
    scan=ScanPolicy(ports=10, window=2.0, hold=60.0),
    knock=(
        PortRange("tcp", 7113, 7113),
        PortRange("udp", 2231, 2231),
        PortRange("tcp", 20000, 29999),
        PortRange("tcp", 9157, 9157),
    ),
)
NO_SCAN = FirewallPlan(
    protected=PLAN.protected, always_allow=PLAN.always_allow, scan=None, knock=PLAN.knock
)

RESTORE_V4 = """\
*filter
:KNOCKGATE - [0:0]
:KNOCKGATE-SCAN - [0:0]
:KNOCKGATE-GATE - [0:0]
:KNOCKGATE-FWD - [0:0]
:KNOCKGATE-SVC - [0:0]
-A KNOCKGATE -i lo -j RETURN
-A KNOCKGATE -p tcp -m conntrack --ctstate NEW -j KNOCKGATE-SCAN
-A KNOCKGATE -p udp -m conntrack --ctstate NEW -j KNOCKGATE-SCAN
-A KNOCKGATE -p tcp -m multiport --dports 22,8080 -j KNOCKGATE-GATE
-A KNOCKGATE -p udp -m multiport --dports 5353 -j KNOCKGATE-GATE
-A KNOCKGATE-SCAN -p tcp -m multiport --dports 7113,9157,20000:29999 -j RETURN
-A KNOCKGATE-SCAN -p udp -m multiport --dports 2231 -j RETURN
-A KNOCKGATE-SCAN -m set --match-set knockgate-seen4 src,dst -j RETURN
-A KNOCKGATE-SCAN -j SET --add-set knockgate-seen4 src,dst --exist
-A KNOCKGATE-SCAN -m hashlimit --hashlimit-above 5/sec --hashlimit-burst 10 --hashlimit-mode srcip --hashlimit-name knockgate-scan4-b10r5e2000 --hashlimit-htable-expire 2000 -j SET --add-set knockgate-held4 src
-A KNOCKGATE-GATE -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
-A KNOCKGATE-GATE -m set --match-set knockgate-allow4 src -j RETURN
-A KNOCKGATE-GATE -m set --match-set knockgate-grants4 src,dst -j RETURN
-A KNOCKGATE-GATE -p tcp -j REJECT --reject-with tcp-reset
-A KNOCKGATE-GATE -j DROP
-A KNOCKGATE-FWD -p tcp -m conntrack --ctstate DNAT --ctorigdstport 22 -j KNOCKGATE-SVC
-A KNOCKGATE-FWD -p tcp -m conntrack --ctstate DNAT --ctorigdstport 8080 -j KNOCKGATE-SVC
-A KNOCKGATE-FWD -p udp -m conntrack --ctstate DNAT --ctorigdstport 5353 -j KNOCKGATE-SVC
-A KNOCKGATE-FWD -m set --match-set knockgate-direct4 dst,dst -j KNOCKGATE-SVC
-A KNOCKGATE-SVC -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
-A KNOCKGATE-SVC -m set --match-set knockgate-allow4 src -j RETURN
-A KNOCKGATE-SVC -m connmark --mark 0x4b000000/0x4b000000 -j RETURN
-A KNOCKGATE-SVC -p tcp -j REJECT --reject-with tcp-reset
-A KNOCKGATE-SVC -j DROP
COMMIT
*mangle
:KNOCKGATE-MARK - [0:0]
-A KNOCKGATE-MARK -m conntrack --ctstate NEW -m set --match-set knockgate-grants4 src,dst -j CONNMARK --set-xmark 0x4b000000/0x4b000000
COMMIT
"""

RESTORE_V6 = """\
*filter
:KNOCKGATE - [0:0]
:KNOCKGATE-SCAN - [0:0]
:KNOCKGATE-GATE - [0:0]
:KNOCKGATE-FWD - [0:0]
:KNOCKGATE-SVC - [0:0]
-A KNOCKGATE -i lo -j RETURN
-A KNOCKGATE -p tcp -m conntrack --ctstate NEW -j KNOCKGATE-SCAN
-A KNOCKGATE -p udp -m conntrack --ctstate NEW -j KNOCKGATE-SCAN
-A KNOCKGATE -p tcp -m multiport --dports 22,8080 -j KNOCKGATE-GATE
-A KNOCKGATE -p udp -m multiport --dports 5353 -j KNOCKGATE-GATE
-A KNOCKGATE-SCAN -p tcp -m multiport --dports 7113,9157,20000:29999 -j RETURN
-A KNOCKGATE-SCAN -p udp -m multiport --dports 2231 -j RETURN
-A KNOCKGATE-SCAN -m set --match-set knockgate-seen6 src,dst -j RETURN
-A KNOCKGATE-SCAN -j SET --add-set knockgate-seen6 src,dst --exist
-A KNOCKGATE-SCAN -m hashlimit --hashlimit-above 5/sec --hashlimit-burst 10 --hashlimit-mode srcip --hashlimit-name knockgate-scan6-b10r5e2000 --hashlimit-htable-expire 2000 -j SET --add-set knockgate-held6 src
-A KNOCKGATE-GATE -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
-A KNOCKGATE-GATE -m set --match-set knockgate-allow6 src -j RETURN
-A KNOCKGATE-GATE -m set --match-set knockgate-grants6 src,dst -j RETURN
-A KNOCKGATE-GATE -p tcp -j REJECT --reject-with tcp-reset
-A KNOCKGATE-GATE -j DROP
-A KNOCKGATE-FWD -p tcp -m conntrack --ctstate DNAT --ctorigdstport 22 -j KNOCKGATE-SVC
-A KNOCKGATE-FWD -p tcp -m conntrack --ctstate DNAT --ctorigdstport 8080 -j KNOCKGATE-SVC
-A KNOCKGATE-FWD -p udp -m conntrack --ctstate DNAT --ctorigdstport 5353 -j KNOCKGATE-SVC
-A KNOCKGATE-FWD -m set --match-set knockgate-direct6 dst,dst -j KNOCKGATE-SVC
-A KNOCKGATE-SVC -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
-A KNOCKGATE-SVC -m set --match-set knockgate-allow6 src -j RETURN
-A KNOCKGATE-SVC -m connmark --mark 0x4b000000/0x4b000000 -j RETURN
-A KNOCKGATE-SVC -p tcp -j REJECT --reject-with tcp-reset
-A KNOCKGATE-SVC -j DROP
COMMIT
*mangle
:KNOCKGATE-MARK - [0:0]
-A KNOCKGATE-MARK -m conntrack --ctstate NEW -m set --match-set knockgate-grants6 src,dst -j CONNMARK --set-xmark 0x4b000000/0x4b000000
COMMIT
"""

RESTORE_V4_NO_SCAN = """\
*filter
:KNOCKGATE - [0:0]
:KNOCKGATE-SCAN - [0:0]
:KNOCKGATE-GATE - [0:0]
:KNOCKGATE-FWD - [0:0]
:KNOCKGATE-SVC - [0:0]
-A KNOCKGATE -i lo -j RETURN
-A KNOCKGATE -p tcp -m multiport --dports 22,8080 -j KNOCKGATE-GATE
-A KNOCKGATE -p udp -m multiport --dports 5353 -j KNOCKGATE-GATE
-A KNOCKGATE-GATE -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
-A KNOCKGATE-GATE -m set --match-set knockgate-allow4 src -j RETURN
-A KNOCKGATE-GATE -m set --match-set knockgate-grants4 src,dst -j RETURN
-A KNOCKGATE-GATE -p tcp -j REJECT --reject-with tcp-reset
-A KNOCKGATE-GATE -j DROP
-A KNOCKGATE-FWD -p tcp -m conntrack --ctstate DNAT --ctorigdstport 22 -j KNOCKGATE-SVC
-A KNOCKGATE-FWD -p tcp -m conntrack --ctstate DNAT --ctorigdstport 8080 -j KNOCKGATE-SVC
-A KNOCKGATE-FWD -p udp -m conntrack --ctstate DNAT --ctorigdstport 5353 -j KNOCKGATE-SVC
-A KNOCKGATE-FWD -m set --match-set knockgate-direct4 dst,dst -j KNOCKGATE-SVC
-A KNOCKGATE-SVC -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
-A KNOCKGATE-SVC -m set --match-set knockgate-allow4 src -j RETURN
-A KNOCKGATE-SVC -m connmark --mark 0x4b000000/0x4b000000 -j RETURN
-A KNOCKGATE-SVC -p tcp -j REJECT --reject-with tcp-reset
-A KNOCKGATE-SVC -j DROP
COMMIT
*mangle
:KNOCKGATE-MARK - [0:0]
-A KNOCKGATE-MARK -m conntrack --ctstate NEW -m set --match-set knockgate-grants4 src,dst -j CONNMARK --set-xmark 0x4b000000/0x4b000000
COMMIT
"""

IPSET_FRESH = """\
create knockgate-grants4 hash:ip,port family inet timeout 0
create knockgate-allow4 hash:net family inet
add knockgate-allow4 198.18.50.0/24
create knockgate-seen4 hash:ip,port family inet timeout 2
create knockgate-held4 hash:ip family inet timeout 60
create knockgate-direct4 hash:ip,port family inet
create knockgate-grants6 hash:ip,port family inet6 timeout 0
create knockgate-allow6 hash:net family inet6
add knockgate-allow6 2001:2:0:1::/64
create knockgate-seen6 hash:ip,port family inet6 timeout 2
create knockgate-held6 hash:ip family inet6 timeout 60
create knockgate-direct6 hash:ip,port family inet6
"""

# ``ipset list -t`` as ipset 7.17 prints it, after a setup with hold=30 and a crash
# that left a temporary set behind.
HEADERS = """\
Name: knockgate-grants4
Type: hash:ip,port
Revision: 7
Header: family inet hashsize 1024 maxelem 65536 timeout 0 bucketsize 12 initval 0xab130b79
Size in memory: 216
References: 1
Number of entries: 2

Name: knockgate-allow4
Type: hash:net
Revision: 7
Header: family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0xeda9a6a7
Size in memory: 504
References: 1
Number of entries: 1

Name: knockgate-allow4-tmp
Type: hash:net
Revision: 7
Header: family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x01020304
Size in memory: 504
References: 0
Number of entries: 0

Name: knockgate-seen4
Type: hash:ip,port
Revision: 7
Header: family inet hashsize 1024 maxelem 65536 timeout 2 bucketsize 12 initval 0xff552e07
Size in memory: 216
References: 2
Number of entries: 0

Name: knockgate-held4
Type: hash:ip
Revision: 6
Header: family inet hashsize 1024 maxelem 65536 timeout 30 bucketsize 12 initval 0x15da9178
Size in memory: 216
References: 1
Number of entries: 0

Name: someone-else
Type: bitmap:port
Revision: 3
Header: range 0-1023
Size in memory: 264
References: 0
Number of entries: 0
"""

IPSET_UPDATE = """\
destroy knockgate-allow4-tmp
create knockgate-allow4-tmp hash:net family inet
add knockgate-allow4-tmp 198.18.50.0/24
swap knockgate-allow4-tmp knockgate-allow4
destroy knockgate-allow4-tmp
create knockgate-held4-tmp hash:ip family inet timeout 60
swap knockgate-held4-tmp knockgate-held4
destroy knockgate-held4-tmp
create knockgate-direct4 hash:ip,port family inet
create knockgate-grants6 hash:ip,port family inet6 timeout 0
create knockgate-allow6 hash:net family inet6
add knockgate-allow6 2001:2:0:1::/64
create knockgate-seen6 hash:ip,port family inet6 timeout 2
create knockgate-held6 hash:ip family inet6 timeout 60
create knockgate-direct6 hash:ip,port family inet6
"""


def test_restore_text_ipv4_with_scan() -> None:
    assert restore_text(NAMES, PLAN, 4) == RESTORE_V4


def test_restore_text_ipv6_with_scan() -> None:
    assert restore_text(NAMES, PLAN, 6) == RESTORE_V6


def test_restore_text_without_scan_declares_but_never_jumps_to_scan_chain() -> None:
    assert restore_text(NAMES, NO_SCAN, 4) == RESTORE_V4_NO_SCAN


def test_restore_text_other_prefix() -> None:
    text = restore_text(make_names("KG2"), PLAN, 4)
    assert ":KG2-GATE - [0:0]" in text
    assert "-A KG2 -p tcp -m multiport --dports 22,8080 -j KG2-GATE" in text
    assert "--match-set kg2-grants4 src,dst" in text
    assert "--hashlimit-name kg2-scan4-b10r5e2000" in text


def test_no_protected_ports_still_builds_the_gate() -> None:
    text = restore_text(NAMES, FirewallPlan(protected=(), scan=None), 4)
    assert "multiport" not in text
    assert "--ctorigdstport" not in text
    assert "-A KNOCKGATE-GATE -j DROP\n" in text
    assert (
        "-A KNOCKGATE-FWD -m set --match-set knockgate-direct4 dst,dst -j KNOCKGATE-SVC\n" in text
    )
    assert "-A KNOCKGATE-SVC -j DROP\nCOMMIT\n*mangle\n" in text


def test_forward_gate_has_one_rule_per_port_past_the_multiport_limit() -> None:
    """--ctorigdstport takes no list: 20 ports are 20 rules (INPUT needs two)."""
    plan = FirewallPlan(protected=tuple(Step(port, "tcp") for port in range(100, 120)), scan=None)
    forward = chain_rules(rule_lines(NAMES, plan, 4), "KNOCKGATE-FWD")
    assert forward[:-1] == [
        f"-A KNOCKGATE-FWD -p tcp -m conntrack --ctstate DNAT --ctorigdstport {port} -j KNOCKGATE-SVC"
        for port in range(100, 120)
    ]


def test_mark_rule_is_the_or_mark_as_iptables_prints_it() -> None:
    assert mark_rule_lines(make_names("KG2"), 6) == [
        "-A KG2-MARK -m conntrack --ctstate NEW -m set --match-set kg2-grants6 src,dst"
        " -j CONNMARK --set-xmark 0x4b000000/0x4b000000"
    ]


def test_the_longest_prefix_fits_iptables_and_ipset_limits() -> None:
    names = make_names("K" * 19)
    assert max(len(chain) for chain in (*names.chains, names.mark_chain)) <= 28
    assert max(len(f"{name}-tmp") for name in names.all_sets()) <= 31


def test_multiport_lists_hold_at_most_15_ports() -> None:
    plan = FirewallPlan(protected=tuple(Step(port, "tcp") for port in range(100, 120)), scan=None)
    gate_jumps = [line for line in rule_lines(NAMES, plan, 4) if "multiport" in line]
    assert gate_jumps == [
        "-A KNOCKGATE -p tcp -m multiport --dports "
        + ",".join(str(port) for port in range(100, 115))
        + " -j KNOCKGATE-GATE",
        "-A KNOCKGATE -p tcp -m multiport --dports 115,116,117,118,119 -j KNOCKGATE-GATE",
    ]


def test_long_knock_is_not_counted_as_a_scan() -> None:
    """The doors' knock ports return from the scan chain before the seen set and the
    rate meter count them: a knock longer than scan.ports, sent fast, is no scan."""
    plan = FirewallPlan(
        protected=(),
        knock=tuple(PortRange("tcp", port, port) for port in range(7000, 7032, 2)),
    )
    scan = chain_rules(rule_lines(NAMES, plan, 4), "KNOCKGATE-SCAN")
    ports = [str(port) for port in range(7000, 7032, 2)]
    assert scan[:2] == [
        f"-A KNOCKGATE-SCAN -p tcp -m multiport --dports {','.join(ports[:15])} -j RETURN",
        f"-A KNOCKGATE-SCAN -p tcp -m multiport --dports {ports[15]} -j RETURN",
    ]
    assert scan[2] == "-A KNOCKGATE-SCAN -m set --match-set knockgate-seen4 src,dst -j RETURN"


def test_multiport_lists_count_a_range_as_two_of_fifteen_slots() -> None:
    singles = [(port, port) for port in range(100, 114)]  # 14 slots
    assert list(multiport_lists([*singles, (200, 299)])) == [
        ",".join(str(port) for port in range(100, 114)),
        "200:299",
    ]
    assert list(multiport_lists([*singles, (150, 150)])) == [
        ",".join(str(port) for port in [*range(100, 114), 150])
    ]
    assert list(multiport_lists([(1, 2)] * 8)) == [",".join(["1:2"] * 7), "1:2"]
    assert list(multiport_lists([])) == []


def test_scan_limits_round_to_what_ipset_and_hashlimit_take() -> None:
    limits = scan_limits(ScanPolicy(ports=10, window=2.0, hold=60.0))
    assert (limits.burst, limits.rate, limits.seen_timeout, limits.hold_timeout) == (10, 5, 2, 60)
    limits = scan_limits(ScanPolicy(ports=5, window=1.5, hold=0.5))
    assert (limits.burst, limits.rate, limits.seen_timeout, limits.hold_timeout) == (5, 4, 1, 1)
    assert limits.expire_ms == 1500
    assert scan_limits(ScanPolicy(ports=3, window=10.0)).rate == 1


def test_hashlimit_name_changes_with_the_policy() -> None:
    """The kernel reuses a hashlimit table by name with its first parameters."""
    one = scan_limits(ScanPolicy(ports=10, window=2.0)).hashlimit_name(NAMES, 4)
    two = scan_limits(ScanPolicy(ports=20, window=2.0)).hashlimit_name(NAMES, 4)
    assert one != two


def test_ipset_batch_on_a_fresh_system() -> None:
    assert ipset_setup_batch(NAMES, PLAN, {}) == IPSET_FRESH


def test_ipset_batch_keeps_grants_and_swaps_what_changed() -> None:
    assert ipset_setup_batch(NAMES, PLAN, parse_set_headers(HEADERS)) == IPSET_UPDATE


def test_ipset_batch_fills_a_new_direct_set_and_keeps_an_existing_one() -> None:
    direct = (("198.18.78.2", Step(22, "tcp")), ("2001:2:0:78::2", Step(53, "udp")))
    fresh = ipset_setup_batch(NAMES, PLAN, {}, direct)
    assert (
        "create knockgate-direct4 hash:ip,port family inet\nadd knockgate-direct4 198.18.78.2,tcp:22\n"
        in fresh
    )
    assert "add knockgate-direct6 2001:2:0:78::2,udp:53\n" in fresh
    existing = parse_set_headers(HEADERS)
    existing["knockgate-direct4"] = SetHeader("hash:ip,port", "inet", None)
    kept = ipset_setup_batch(NAMES, PLAN, existing, direct)
    assert "knockgate-direct4" not in kept
    existing["knockgate-direct4"] = SetHeader("hash:ip", "inet", None)  # another type: made again
    rebuilt = ipset_setup_batch(NAMES, PLAN, existing, direct)
    assert (
        "destroy knockgate-direct4\n"
        "create knockgate-direct4 hash:ip,port family inet\n"
        "add knockgate-direct4 198.18.78.2,tcp:22\n"
    ) in rebuilt


def test_direct_batch_swaps_both_families() -> None:
    entries = (
        ("198.18.78.2", Step(22, "tcp")),
        ("2001:0002:0:78::0002", Step(22, "tcp")),
        ("198.18.78.3", Step(53, "udp")),
        ("198.18.78.2", Step(22, "tcp")),  # twice: one element
    )
    assert direct_batch(NAMES, entries) == (
        "create knockgate-direct4-tmp hash:ip,port family inet\n"
        "flush knockgate-direct4-tmp\n"
        "add knockgate-direct4-tmp 198.18.78.2,tcp:22\n"
        "add knockgate-direct4-tmp 198.18.78.3,udp:53\n"
        "swap knockgate-direct4-tmp knockgate-direct4\n"
        "destroy knockgate-direct4-tmp\n"
        "create knockgate-direct6-tmp hash:ip,port family inet6\n"
        "flush knockgate-direct6-tmp\n"
        "add knockgate-direct6-tmp 2001:2:0:78::2,tcp:22\n"
        "swap knockgate-direct6-tmp knockgate-direct6\n"
        "destroy knockgate-direct6-tmp\n"
    )


def test_direct_batch_empty_empties_both_sets() -> None:
    batch = direct_batch(NAMES, ())
    assert "add " not in batch
    assert batch.count("swap ") == 2


def test_direct_batch_refuses_a_bad_address_before_anything_is_sent() -> None:
    with pytest.raises(FirewallError, match="not an IP address"):
        direct_batch(NAMES, (("198.18.78.2", Step(22, "tcp")), ("container", Step(22, "tcp"))))
    assert direct_elements((("198.18.78.2", Step(22, "tcp")),), 6) == ()


def test_ipset_batch_without_scan_uses_default_timeouts() -> None:
    batch = ipset_setup_batch(NAMES, NO_SCAN, {})
    assert "create knockgate-seen4 hash:ip,port family inet timeout 2\n" in batch
    assert "create knockgate-held6 hash:ip family inet6 timeout 60\n" in batch


def test_ipset_batch_rebuilds_a_replaced_grants_set_with_the_grants_carried() -> None:
    """Swapped for one without timeouts: rebuilt under the temporary name (swap works
    while rules use it) with the carried grants; of another type: destroyed (nothing
    can use it, or it could not have been destroyed) and made again."""
    headers = {spec: SetHeader(*header) for spec, header in FRESH_HEADERS.items()}
    carried = [
        GrantEntry("198.18.1.7", Step(8080, "tcp"), 25.0),
        GrantEntry("2001:2::7", Step(22, "tcp"), 9.0),
    ]
    no_timeout = {**headers, "knockgate-grants4": SetHeader("hash:ip,port", "inet", None)}
    assert ipset_setup_batch(NAMES, PLAN, no_timeout, carried=carried) == (
        "create knockgate-grants4-tmp hash:ip,port family inet timeout 0\n"
        "add knockgate-grants4-tmp 198.18.1.7,tcp:8080 timeout 25\n"
        "swap knockgate-grants4-tmp knockgate-grants4\n"
        "destroy knockgate-grants4-tmp\n"
        "create knockgate-allow4-tmp hash:net family inet\n"
        "add knockgate-allow4-tmp 198.18.50.0/24\n"
        "swap knockgate-allow4-tmp knockgate-allow4\n"
        "destroy knockgate-allow4-tmp\n"
        "create knockgate-allow6-tmp hash:net family inet6\n"
        "add knockgate-allow6-tmp 2001:2:0:1::/64\n"
        "swap knockgate-allow6-tmp knockgate-allow6\n"
        "destroy knockgate-allow6-tmp\n"
    )
    other_type = {**headers, "knockgate-grants6": SetHeader("hash:ip", "inet6", 0)}
    assert (
        "destroy knockgate-grants6\n"
        "create knockgate-grants6 hash:ip,port family inet6 timeout 0\n"
        "add knockgate-grants6 2001:2::7,tcp:22 timeout 9\n"
    ) in ipset_setup_batch(NAMES, PLAN, other_type, carried=carried)


FRESH_HEADERS = {
    "knockgate-grants4": ("hash:ip,port", "inet", 0),
    "knockgate-allow4": ("hash:net", "inet", None),
    "knockgate-seen4": ("hash:ip,port", "inet", 2),
    "knockgate-held4": ("hash:ip", "inet", 60),
    "knockgate-direct4": ("hash:ip,port", "inet", None),
    "knockgate-grants6": ("hash:ip,port", "inet6", 0),
    "knockgate-allow6": ("hash:net", "inet6", None),
    "knockgate-seen6": ("hash:ip,port", "inet6", 2),
    "knockgate-held6": ("hash:ip", "inet6", 60),
    "knockgate-direct6": ("hash:ip,port", "inet6", None),
}


def test_carried_grants_keep_only_what_expires_and_never_longer() -> None:
    save = (
        "create knockgate-grants4 hash:ip,port family inet hashsize 1024 maxelem 65536\n"
        "add knockgate-grants4 198.18.1.7,tcp:8080 timeout 25\n"
        "add knockgate-grants4 198.18.1.8,tcp:8080 timeout 0\n"  # permanent
        "add knockgate-grants4 198.18.1.9,tcp:8080\n"  # a set without timeouts
        "add knockgate-grants4 198.18.1.10,udp:53 timeout 1\n"  # less than a second left
    )
    assert carried_grants(save, 0.02) == [GrantEntry("198.18.1.7", Step(8080, "tcp"), 24.0)]
    other_type = "add knockgate-grants4 198.18.1.0/24,tcp:22 timeout 30\n"  # hash:net,port
    assert carried_grants(other_type, 0.0) == []


def test_set_problems_name_missing_and_replaced_sets() -> None:
    headers = {name: SetHeader(*header) for name, header in FRESH_HEADERS.items()}
    assert set_problems(NAMES, PLAN, headers) == []
    assert set_problems(NAMES, None, headers) == []
    del headers["knockgate-held6"]
    headers["knockgate-grants4"] = SetHeader("hash:ip,port", "inet", None)
    assert set_problems(NAMES, PLAN, headers) == [
        "ipset: knockgate-grants4 is hash:ip,port family inet no timeout,"
        " not hash:ip,port family inet timeout 0",
        "ipset: no set knockgate-held6",
    ]
    assert set_problems(NAMES, None, headers) == ["ipset: no set knockgate-held6"]


def test_parse_set_headers() -> None:
    headers = parse_set_headers(HEADERS)
    assert headers["knockgate-grants4"] == SetHeader("hash:ip,port", "inet", 0)
    assert headers["knockgate-allow4"] == SetHeader("hash:net", "inet", None)
    assert headers["knockgate-held4"] == SetHeader("hash:ip", "inet", 30)
    assert headers["someone-else"] == SetHeader("bitmap:port", "", None)


def test_allow_elements_split_the_whole_internet() -> None:
    plan = FirewallPlan(protected=(), always_allow=("0.0.0.0/0", "::/0", "198.18.0.0/15"))
    assert allow_elements(plan, 4) == ("0.0.0.0/1", "128.0.0.0/1", "198.18.0.0/15")
    assert allow_elements(plan, 6) == ("::/1", "8000::/1")


@pytest.mark.parametrize(
    ("seconds", "timeout"),
    [
        (2.0, 2),
        (2.9, 2),
        (0.3, 1),
        (1.0, 1),
        (30.0, 30),
        (1e12, 2_147_483),
        (float("inf"), 2_147_483),
    ],
)
def test_grant_timeout_is_whole_seconds_never_zero(seconds: float, timeout: int) -> None:
    assert grant_timeout(seconds) == timeout


def test_grant_batch_ipv4() -> None:
    batch = grant_batch(NAMES, "198.18.1.7", (Step(22, "tcp"), Step(5353, "udp")), 30.5)
    assert batch == (
        "add knockgate-grants4 198.18.1.7,tcp:22 timeout 30\n"
        "add knockgate-grants4 198.18.1.7,udp:5353 timeout 30\n"
    )


def test_grant_batch_ipv6_is_normalised() -> None:
    batch = grant_batch(NAMES, "2001:0002:0000::0007", (Step(22, "tcp"),), 2)
    assert batch == "add knockgate-grants6 2001:2::7,tcp:22 timeout 2\n"


def test_revoke_batch() -> None:
    assert revoke_batch(NAMES, "198.18.1.7", (Step(22, "tcp"), Step(53, "udp"))) == (
        "del knockgate-grants4 198.18.1.7,tcp:22\ndel knockgate-grants4 198.18.1.7,udp:53\n"
    )


def test_bad_address_is_a_firewall_error() -> None:
    with pytest.raises(FirewallError, match="not an IP address"):
        grant_batch(NAMES, "198.18.1.300", (Step(22, "tcp"),), 2)


def test_parse_grants() -> None:
    save = (
        "create knockgate-grants6 hash:ip,port family inet6 hashsize 1024 maxelem 65536 timeout 0\n"
        "add knockgate-grants6 2001:2::1,tcp:22 timeout 6\n"
        "add knockgate-grants6 2001:2::1,udp:53 timeout 0\n"
        "add knockgate-grants6 2001:2::9,icmpv6:128/0 timeout 3\n"
    )
    assert parse_grants(save) == [
        GrantEntry("2001:2::1", Step(22, "tcp"), 6.0),
        GrantEntry("2001:2::1", Step(53, "udp"), 0.0),
    ]


def test_chain_rules_picks_one_chain() -> None:
    lines = rule_lines(NAMES, PLAN, 4)
    assert chain_rules(lines, "KNOCKGATE-GATE")[-1] == "-A KNOCKGATE-GATE -j DROP"
    assert all(line.startswith("-A KNOCKGATE ") for line in chain_rules(lines, "KNOCKGATE"))


FORWARD_CHAINS = ["-P INPUT ACCEPT", "-P FORWARD ACCEPT", "-P OUTPUT ACCEPT"]
DOCKER = ["-N DOCKER-USER", "-A FORWARD -j DOCKER-USER", "-A DOCKER-USER -j RETURN"]


def listings(
    version: Version = 4, extra: list[str] | None = None, forward_from: str = "FORWARD"
) -> tuple[list[str], list[str]]:
    """``-S`` of filter and mangle as they are right after a setup."""
    filter_listing = [*FORWARD_CHAINS, *(f"-N {chain}" for chain in NAMES.chains)]
    filter_listing += [*(extra or []), "-A INPUT -j KNOCKGATE"]
    filter_listing.append(f"-A {forward_from} -j KNOCKGATE-FWD")
    filter_listing += rule_lines(NAMES, PLAN, version)
    mangle_listing = [
        "-P PREROUTING ACCEPT",
        "-N KNOCKGATE-MARK",
        "-A PREROUTING -j KNOCKGATE-MARK",
    ]
    return filter_listing, mangle_listing + mark_rule_lines(NAMES, version)


def test_forward_anchor() -> None:
    assert forward_anchor(FORWARD_CHAINS) == "FORWARD"
    assert forward_anchor([*FORWARD_CHAINS, *DOCKER]) == "DOCKER-USER"
    # A DOCKER-USER that FORWARD does not reach would gate nothing.
    assert forward_anchor([*FORWARD_CHAINS, "-N DOCKER-USER"]) == "FORWARD"
    assert (
        forward_anchor([*FORWARD_CHAINS, "-N DOCKER-USER", "-A FORWARD -i br0 -j DOCKER-USER"])
        == "FORWARD"
    )


def test_structure_after_setup_has_no_problems() -> None:
    for version in (4, 6):
        assert structure_problems(NAMES, PLAN, version, *listings(version)) == []
    assert structure_problems(NAMES, PLAN, 4, *listings(4, DOCKER, "DOCKER-USER")) == []
    assert structure_problems(NAMES, None, 4, *listings(4)) == []


def test_structure_notices_docker_arriving_and_leaving() -> None:
    """Docker started after setup: the jump must move to DOCKER-USER (and back)."""
    assert structure_problems(NAMES, PLAN, 4, *listings(4, DOCKER)) == [
        "filter: no '-A DOCKER-USER -j KNOCKGATE-FWD'",
        "filter: '-A FORWARD -j KNOCKGATE-FWD' instead of in DOCKER-USER",
    ]
    dead = ["-N DOCKER-USER"]  # FORWARD no longer jumps to it
    assert structure_problems(NAMES, PLAN, 4, *listings(4, dead, "DOCKER-USER")) == [
        "filter: no '-A FORWARD -j KNOCKGATE-FWD'",
        "filter: '-A DOCKER-USER -j KNOCKGATE-FWD' instead of in FORWARD",
    ]


def test_structure_notices_missing_jumps_chains_and_rules() -> None:
    filter_listing, mangle_listing = listings(4)
    no_mark = [line for line in mangle_listing if "PREROUTING -j" not in line]
    assert structure_problems(NAMES, PLAN, 4, filter_listing, no_mark) == [
        "mangle: no '-A PREROUTING -j KNOCKGATE-MARK'"
    ]
    flushed = [line for line in filter_listing if not line.startswith("-A KNOCKGATE-SVC ")]
    assert structure_problems(NAMES, PLAN, 4, flushed, mangle_listing) == [
        "filter: chain KNOCKGATE-SVC differs"
    ]
    assert structure_problems(NAMES, None, 4, flushed, mangle_listing) == []
    other_plan = FirewallPlan(protected=(Step(22, "tcp"),), scan=None)
    assert "filter: chain KNOCKGATE-FWD differs" in structure_problems(
        NAMES, other_plan, 4, filter_listing, mangle_listing
    )
    assert structure_problems(NAMES, None, 4, FORWARD_CHAINS, ["-P PREROUTING ACCEPT"]) == [
        "filter: no '-A INPUT -j KNOCKGATE'",
        "filter: no '-A FORWARD -j KNOCKGATE-FWD'",
        "mangle: no '-A PREROUTING -j KNOCKGATE-MARK'",
        "filter: no chain KNOCKGATE",
        "filter: no chain KNOCKGATE-SCAN",
        "filter: no chain KNOCKGATE-GATE",
        "filter: no chain KNOCKGATE-FWD",
        "filter: no chain KNOCKGATE-SVC",
        "mangle: no chain KNOCKGATE-MARK",
    ]


@pytest.mark.parametrize("prefix", ["", "1KG", "KG GATE", "K" * 20, "KG;rm"])
def test_bad_prefix(prefix: str) -> None:
    with pytest.raises(FirewallError, match="bad prefix"):
        IptablesBackend(prefix=prefix)


def test_backend_name() -> None:
    assert IptablesBackend().name == "iptables"


def test_a_hanging_tool_is_a_firewall_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("appliance.firewall.iptables.COMMAND_TIMEOUT", 0.2)
    with pytest.raises(FirewallError, match=r"^sleep 5: no answer within 0.2 s$"):
        IptablesBackend()._run(["sleep", "5"])


def test_a_missing_tool_is_a_firewall_error() -> None:
    with pytest.raises(FirewallError, match=r"^knockgate-no-such-tool -S: "):
        IptablesBackend()._run(["knockgate-no-such-tool", "-S"])


def test_a_failing_tool_keeps_argv_stderr_and_the_culprit_line() -> None:
    script = "echo 'iptables-restore: oops' >&2; echo 'Error occurred at line: 2' >&2; echo \"Try \\`iptables-restore -h'\" >&2; exit 2"
    with pytest.raises(FirewallError) as caught:
        IptablesBackend()._run(["sh", "-c", script], stdin="*filter\n-A BAD\nCOMMIT\n")
    assert str(caught.value) == (
        f"sh -c {shlex.quote(script)}: exit status 2: iptables-restore: oops; "
        "Error occurred at line: 2 (input line 2: '-A BAD')"
    )
