"""The privilege boundary, proven from inside the running appliance (the testbed of
test_testbed.py).

The packet process (``knockgate packet``, the only code that reads untrusted bytes) must
be unable to change nftables or reach the Docker socket. Its credentials are read from
/proc inside the appliance, then a probe runs with exactly those (``setpriv``: its uid and
gid, no supplementary groups, no capabilities, no_new_privs) and tries both: ``nft add
table inet kgprobe`` and a connect to the Docker socket must fail. The monitor keeps only
CAP_NET_ADMIN, CAP_NET_RAW and CAP_KILL, as the user knockgate (review findings 1, 2,
6): with its credentials nothing root's is writable (the config, supervisord's config and
socket, the code), and a stop of knockgate ends a packet process that does not answer.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.testbed.test_testbed import (  # the module-scoped testbed fixture comes along
    APPLIANCE_CONFIG,
    Testbed,
    docker,
    testbed,  # noqa: F401 (a fixture)
)

pytestmark = pytest.mark.testbed

MONITOR_CAPS = (1 << 12) | (1 << 13) | (1 << 5)  # CAP_NET_ADMIN | CAP_NET_RAW | CAP_KILL
DOCKER_SOCKETS = ("/var/run/docker.sock", "/run/knockgate-docker/docker.sock")
CONNECT = """\
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("denied")
except OSError as error:
    print(f"failed: {error}")
else:
    print("connected")
"""


def proc_status(bed: Testbed, pid: int) -> dict[str, str]:
    text = bed.exec("appliance", "cat", f"/proc/{pid}/status", check=True).stdout
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def docker_sockets(bed: Testbed) -> list[str]:
    """The Docker socket's paths inside the appliance: its mounts, else the known ones."""
    mounts = json.loads(docker("inspect", "--format", "{{json .Mounts}}", bed.appliance).stdout)
    found = [m["Destination"] for m in mounts if m["Destination"].endswith("docker.sock")]
    paths = found or list(DOCKER_SOCKETS)
    present = [p for p in paths if bed.exec("appliance", "test", "-S", p).returncode == 0]
    assert present, f"no Docker socket in the appliance at {paths}"
    return present


def test_the_packet_process_cannot_change_nftables_nor_reach_docker(testbed: Testbed) -> None:  # noqa: F811
    bed = testbed
    as_json = ["knockgate", "status", "--json", "--config", APPLIANCE_CONFIG]
    status: dict[str, Any] = json.loads(bed.exec("appliance", *as_json, check=True).stdout)
    packet = status["packet_process"]
    assert packet["user"] == "knockgate-packet", packet
    seen = proc_status(bed, int(packet["pid"]))
    assert seen["PPid"] == str(status["pid"]), seen
    uid, gid = seen["Uid"].split()[0], seen["Gid"].split()[0]
    assert set(seen["Uid"].split()) == {uid} and uid != "0", seen
    assert set(seen["Gid"].split()) == {gid} and gid != "0", seen
    assert seen["Groups"] == "", seen
    for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(seen[name], 16) == 0, (name, seen)
    assert seen["NoNewPrivs"] == "1", seen
    # Its seccomp filter (no send, no new socket, no execve...), and ids no host gives its
    # docker group: uid 64990, primary group nogroup (and never the Docker socket's group).
    assert seen["Seccomp"] == "2", seen
    assert (uid, gid) == ("64990", "65534"), seen
    for path in docker_sockets(bed):
        socket_gid = bed.exec("appliance", "stat", "-c", "%g", path, check=True).stdout.strip()
        assert socket_gid != gid, (path, socket_gid)
    monitor = proc_status(bed, int(status["pid"]))
    assert monitor["Uid"].split()[0] != "0"
    for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(monitor[name], 16) == MONITOR_CAPS, (name, monitor)

    setpriv = [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ]
    # The probe really runs with the packet process's credentials.
    probe = bed.exec("appliance", *setpriv, "cat", "/proc/self/status", check=True).stdout
    assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" in probe and "CapEff:\t0000000000000000" in probe
    try:
        nft = bed.exec("appliance", *setpriv, "nft", "add", "table", "inet", "kgprobe")
        assert nft.returncode != 0, "the packet process's credentials changed nftables"
        assert "Operation not permitted" in nft.stderr, nft.stderr
    finally:
        listed = bed.exec("appliance", "nft", "list", "table", "inet", "kgprobe")
        if listed.returncode == 0:
            bed.exec("appliance", "nft", "delete", "table", "inet", "kgprobe", check=True)
    for path in docker_sockets(bed):
        connect = bed.exec("appliance", *setpriv, "python3", "-c", CONNECT, path)
        assert connect.stdout.strip() == "denied", (path, connect.stdout, connect.stderr)
        # Control: root in the appliance does reach it (the probe is not simply broken).
        root = bed.exec("appliance", "python3", "-c", CONNECT, path)
        assert root.stdout.strip() == "connected", (path, root.stdout, root.stderr)


def test_the_monitor_runs_as_knockgate_and_reaches_nothing_of_root(testbed: Testbed) -> None:  # noqa: F811
    bed = testbed
    as_json = ["knockgate", "status", "--json", "--config", APPLIANCE_CONFIG]
    status: dict[str, Any] = json.loads(bed.exec("appliance", *as_json, check=True).stdout)
    monitor = proc_status(bed, int(status["pid"]))
    uid = bed.exec("appliance", "id", "-u", "knockgate", check=True).stdout.strip()
    assert set(monitor["Uid"].split()) == {uid}, monitor
    assert "0" not in monitor["Gid"].split() + monitor["Groups"].split(), monitor
    assert monitor["NoNewPrivs"] == "1", monitor
    caps = "-all,+net_admin,+net_raw,+kill"
    setpriv = [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={monitor['Gid'].split()[0]}",
        f"--groups={','.join(monitor['Groups'].split())}",
        f"--inh-caps={caps}",
        f"--ambient-caps={caps}",
        f"--bounding-set={caps}",
        "--no-new-privs",
        "--",
    ]
    # The probe really runs with the monitor's credentials.
    probe = proc_fields(
        bed.exec("appliance", *setpriv, "cat", "/proc/self/status", check=True).stdout
    )
    for name in ("Uid", "Gid", "Groups", "CapEff", "CapPrm", "CapAmb", "CapBnd"):
        assert probe[name] == monitor[name], (name, probe[name], monitor[name])
    # It reads the config (reload), writes none of root's files.
    assert bed.exec("appliance", *setpriv, "test", "-r", APPLIANCE_CONFIG).returncode == 0
    for path in (
        APPLIANCE_CONFIG,
        "/run/supervisor/knockgate.conf",
        "/etc/supervisor/knockgate.conf.in",
        "/opt/knockgate/appliance/cli.py",
    ):
        wrote = bed.exec("appliance", *setpriv, "sh", "-c", f"echo kgprobe >> {path}")
        assert wrote.returncode != 0, f"the monitor's credentials wrote {path}"
    made = bed.exec("appliance", *setpriv, "touch", "/opt/knockgate/appliance/kgprobe")
    assert made.returncode != 0, "the monitor's credentials wrote in /opt/knockgate"
    read = bed.exec("appliance", *setpriv, "cat", "/run/supervisor/knockgate.conf")
    assert read.returncode != 0 and "password" not in read.stdout
    connect = bed.exec("appliance", *setpriv, "python3", "-c", CONNECT, "/run/supervisor.sock")
    assert connect.stdout.strip() == "denied", (connect.stdout, connect.stderr)
    for path in docker_sockets(bed):
        connect = bed.exec("appliance", *setpriv, "python3", "-c", CONNECT, path)
        assert connect.stdout.strip() == "denied", (path, connect.stdout, connect.stderr)
    # The image itself is read-only, even for root.
    root = bed.exec("appliance", "touch", "/opt/knockgate/kgprobe")
    assert root.returncode != 0 and "Read-only file system" in root.stderr, root.stderr


def proc_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def test_a_stop_of_knockgate_ends_a_packet_process_that_does_not_answer(testbed: Testbed) -> None:  # noqa: F811
    """Finding 6: the monitor (not root) kills the packet process (CAP_KILL): a stopped
    (SIGSTOP) one is gone well before supervisord's own SIGKILL (stopwaitsecs 25 s)."""
    bed = testbed
    as_json = ["knockgate", "status", "--json", "--config", APPLIANCE_CONFIG]
    status: dict[str, Any] = json.loads(bed.exec("appliance", *as_json, check=True).stdout)
    child = int(status["packet_process"]["pid"])
    before = bed.count_log(r"kgtb0: capturing")
    supervisorctl = ["supervisorctl", "-c", "/run/supervisor/knockgate.conf"]
    bed.exec("appliance", "sh", "-c", f"kill -STOP {child}", check=True)
    started = time.monotonic()
    try:
        bed.exec("appliance", *supervisorctl, "stop", "knockgate", check=True, timeout=40)
        took = time.monotonic() - started
        gone = bed.exec("appliance", "test", "-e", f"/proc/{child}").returncode != 0
        assert gone, "the packet process outlived the stop of knockgate"
        assert took < 15, f"the stop took {took:.1f} s (supervisord's SIGKILL, not the monitor's)"
    finally:
        bed.exec("appliance", "sh", "-c", f"kill -CONT {child}")
        bed.exec("appliance", *supervisorctl, "start", "knockgate", timeout=40)
    bed.wait_capturing(before)


def test_the_appliance_refuses_a_docker_socket_in_the_packet_users_group(
    testbed: Testbed,  # noqa: F811 (the image is built from this tree)
    tmp_path: Path,
) -> None:
    """Review finding 5: a host whose Docker socket has a gid of the packet process's user
    (nogroup here) would hand it Docker; the entrypoint refuses to start, saying why."""
    path = tmp_path / "docker.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))  # a socket file, never a Docker engine
    os.chown(path, -1, 65534)
    name = "kg-hardening-gid-probe"
    try:
        run = docker(
            "run",
            "--rm",
            "--name",
            name,
            "--network",
            "none",
            "-v",
            f"{path}:/run/knockgate-docker/docker.sock",
            "knockgate:local",
            check=False,
            timeout=60,
        )
        assert run.returncode == 1, run.stdout + run.stderr
        assert "is a group of the packet process's user knockgate-packet" in run.stdout, run
        assert "refusing to start" in run.stdout
    finally:
        docker("rm", "-f", name, check=False)
        listener.close()
