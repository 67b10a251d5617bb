"""appliance.runtime.caps: keeping only some capabilities, in a child process (the
test process keeps its own)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from appliance.runtime import caps

KEEP = """
import json, os, threading, sys
from appliance.runtime import caps
keep = frozenset(json.loads(sys.argv[1]))
try:
    caps.keep_only(keep)
except caps.CapabilityError as error:
    print(json.dumps({"error": str(error)})); sys.exit(0)
seen = {}
def look():
    seen.update(caps.capabilities(f"/proc/self/task/{threading.get_native_id()}/status"))
thread = threading.Thread(target=look); thread.start(); thread.join()
print(json.dumps({"main": caps.capabilities(), "thread": seen, "uid": os.getuid()}))
"""


def run(code: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
    )
    return done.stdout


def test_mask_and_the_network_pair() -> None:
    assert caps.mask(caps.NETWORK) == 0x3000
    assert caps.mask(()) == 0


def test_status_reads_this_process() -> None:
    held = caps.capabilities()
    assert set(held) >= {"CapInh", "CapPrm", "CapEff", "CapBnd"}
    assert caps.status()["Pid"] == str(os.getpid())


@pytest.mark.skipif(os.geteuid() != 0, reason="only root has capabilities to give up")
def test_root_keeps_exactly_net_admin_and_net_raw_in_every_thread_it_starts_later() -> None:
    import json

    out = json.loads(run(KEEP, json.dumps(sorted(caps.NETWORK))))
    assert out["uid"] == 0
    for held in (out["main"], out["thread"]):
        assert held["CapEff"] == held["CapPrm"] == held["CapBnd"] == 0x3000, held
        assert held["CapAmb"] == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="only root has capabilities to give up")
def test_root_can_give_up_everything() -> None:
    import json

    out = json.loads(run(KEEP, "[]"))
    assert out["main"]["CapEff"] == out["main"]["CapBnd"] == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root may drop its bounding set")
def test_without_cap_setpcap_the_kernel_refuses_and_it_is_an_error() -> None:
    import json

    out = json.loads(run(KEEP, "[]"))
    assert "PR_CAPBSET_DROP" in out["error"]


def test_a_thread_started_before_the_drop_is_caught() -> None:
    code = """
import threading, time
from appliance.runtime import caps
stop = threading.Event()
threading.Thread(target=stop.wait, daemon=True).start()
try:
    caps.keep_only(caps.NETWORK)
except caps.CapabilityError as error:
    print("refused", error)
else:
    print("kept")
"""
    out = run(code)
    assert out.startswith("refused"), out


def test_no_new_privs_is_set_for_good() -> None:
    code = "from appliance.runtime import caps; caps.no_new_privs(); print(caps.status()['NoNewPrivs'])"
    assert run(code).strip() == "1"


BECOME = """
import json, os, subprocess, sys, threading
from appliance.runtime import caps
uid, gid, groups = json.loads(sys.argv[1])
try:
    caps.become_user(uid, gid, groups, caps.MONITOR)
except caps.CapabilityError as error:
    print(json.dumps({"error": str(error)})); sys.exit(0)
seen = {}
def look():
    seen.update(caps.capabilities(f"/proc/self/task/{threading.get_native_id()}/status"))
thread = threading.Thread(target=look); thread.start(); thread.join()
child = subprocess.run(["cat", "/proc/self/status"], capture_output=True, text=True).stdout
fields = dict(line.split(":", 1) for line in child.splitlines())
print(json.dumps({
    "main": caps.capabilities(), "thread": seen,
    "child": {k: int(fields[k].strip(), 16) for k in ("CapEff", "CapPrm", "CapAmb", "CapBnd")},
    "ids": [os.getresuid(), os.getresgid(), sorted(os.getgroups())],
    "nnp": caps.status()["NoNewPrivs"],
}))
"""
MONITOR_BITS = 0x3020  # NET_ADMIN, NET_RAW, KILL


def test_the_monitor_set_is_net_admin_net_raw_and_kill() -> None:
    assert caps.mask(caps.MONITOR) == MONITOR_BITS


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can become another user")
def test_become_user_keeps_exactly_the_three_caps_in_every_set_and_what_it_runs() -> None:
    import json

    nobody = 65534
    out = json.loads(run(BECOME, json.dumps([nobody, nobody, [nobody]])))
    assert "error" not in out, out
    assert out["ids"] == [[nobody] * 3, [nobody] * 3, [nobody]]
    for held in (out["main"], out["thread"]):
        for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert held[name] == MONITOR_BITS, (name, held)
    # A command it runs (knockd-style start/stop commands) keeps them: ambient.
    assert out["child"] == dict.fromkeys(("CapEff", "CapPrm", "CapAmb", "CapBnd"), MONITOR_BITS)
    assert out["nnp"] == "1"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can become another user")
def test_become_user_refuses_root() -> None:
    import json

    out = json.loads(run(BECOME, json.dumps([0, 0, []])))
    assert "must not be 0" in out["error"]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can become another user")
def test_become_user_after_a_thread_started_is_caught() -> None:
    code = """
import threading
from appliance.runtime import caps
threading.Thread(target=threading.Event().wait, daemon=True).start()
try:
    caps.become_user(65534, 65534, [], caps.MONITOR)
except caps.CapabilityError as error:
    print("refused", error)
else:
    print("became")
"""
    out = run(code)
    assert out.startswith("refused"), out
