"""The appliance's lifecycle under Compose (the testbed of test_testbed.py).

- ``docker compose run --rm appliance SUBCOMMAND`` runs that knockgate subcommand (the
  entrypoint execs it) instead of a second appliance: ``show-knock`` prints the doors'
  knocks; ``uninstall`` refuses while the appliance runs, and after it stopped removes the
  service containers of this installation (its owner label only), their volumes and the
  nftables table ``inet knockgate``, and nothing else (another owner's container and
  another nftables table stay).
- supervisord starts without a ``CRIT`` line (its control socket has a password) and the
  entrypoint's ``supervisorctl`` still reaches it (a HUP reloads knockgate in place).
- ``docker compose exec appliance knockgate top`` in a real terminal (tmux) shows the live
  dashboard: the doors, a knocker's grant with its time left, the service it started.
- A broken configuration: ``knockgate config apply`` refuses it (the running one stays); a
  restart with a broken file waits (one report, no restart loop) and starts once it is
  fixed and the container gets a SIGHUP.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

from tests.integration.conftest import require
from tests.integration.terminal import Terminal
from tests.testbed.test_appliance_signals import (  # the module-scoped fixtures come along
    Appliance,
    appliance,  # noqa: F401 (a fixture)
)
from tests.testbed.test_testbed import (
    APPLIANCE_CONFIG,
    BASE_IMAGE,
    CLIENT,
    COMPOSE_FILE,
    DOCKER,
    OWNER,
    WEB_KNOCK,
    WEB_PORT,
    Testbed,
    docker,
    nft_table_exists,
    owned_containers,
    run,
    testbed,  # noqa: F401 (a fixture)
)

pytestmark = pytest.mark.testbed

LAUNCHER_SOCKET = "/run/knockgate-launcher/launcher.sock"
DOCKER_SOCKET = "/run/knockgate-docker/docker.sock"
CONNECT = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1]); print('ok')"
# What the monitor keeps after it drops its capabilities: uid 0, NET_ADMIN and NET_RAW.
# The monitor's credentials: user knockgate, its groups, NET_ADMIN, NET_RAW, KILL only.
_CAPS = "-all,+net_admin,+net_raw,+kill"
MONITOR_CAPS = [
    "setpriv", "--reuid=knockgate", "--regid=knockgate", "--init-groups", f"--inh-caps={_CAPS}",
    f"--ambient-caps={_CAPS}", f"--bounding-set={_CAPS}", "--no-new-privs", "--",
]  # fmt: skip
DECOY_TABLE = "kglife_decoy"
DECOY_CONTAINER = "kglife-decoy"


def compose_run(bed: Testbed, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``docker compose run --rm --no-deps appliance ARGV`` in the testbed's project."""
    env = {k: v for k, v in os.environ.items() if k != "KGTB_DOCKER_HOST"}
    compose = ["compose", "-f", str(COMPOSE_FILE), "-p", bed.project]
    return docker(
        *compose, "run", "--rm", "--no-deps", "-T", "appliance", *argv,
        check=False, timeout=timeout, env=env,
    )  # fmt: skip


def test_supervisord_starts_without_crit_and_its_socket_has_a_password(
    appliance: Appliance,  # noqa: F811
) -> None:
    bed = appliance.bed
    logs = bed.logs()
    assert "supervisord started with pid" in logs, bed.log_tail()
    assert [line for line in logs.splitlines() if " CRIT " in line] == []
    conf = "/run/supervisor/knockgate.conf"
    mode = bed.exec("appliance", "stat", "-c", "%a", conf, check=True).stdout.strip()
    assert mode == "600"

    def running() -> bool:
        status = bed.exec("appliance", "supervisorctl", "-c", conf, "status", "knockgate")
        return "RUNNING" in status.stdout

    bed.wait("supervisorctl: knockgate RUNNING", running, 10)
    # Without the password the socket refuses.
    bare = "[supervisorctl]\nserverurl=unix:///run/supervisor.sock\n"
    bed.exec("appliance", "sh", "-c", f"printf '{bare}' > /tmp/kg-bare.conf", check=True)
    refused = bed.exec("appliance", "supervisorctl", "-c", "/tmp/kg-bare.conf", "status")
    assert "RUNNING" not in refused.stdout
    # The entrypoint's supervisorctl still signals knockgate: a HUP is a reload in place.
    pid = appliance.status()["pid"]
    reloads = bed.count_log(r"configuration reloaded")
    appliance.compose("kill", "-s", "HUP", "appliance")
    bed.wait_log(r"configuration reloaded", 10, after=reloads)
    assert appliance.status()["pid"] == pid


def test_compose_run_show_knock_prints_the_knock_not_a_second_appliance(
    appliance: Appliance,  # noqa: F811
) -> None:
    bed = appliance.bed
    spawned = bed.count_log(r"spawned: 'knockgate'")
    shown = compose_run(bed, "show-knock", "--config", APPLIANCE_CONFIG, "--door", "web")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    steps = " ".join(WEB_KNOCK)
    assert shown.stdout.splitlines() == [
        f"door web: starts service web and opens {WEB_PORT}/tcp for 6 s",
        f"  sequence {steps} within 5 s:",
        f"    knockgate knock HOST --door web --config {APPLIANCE_CONFIG}",
        f"    or: knock HOST {steps}",
    ]
    assert "supervisord" not in shown.stdout + shown.stderr
    checked = compose_run(bed, "check", APPLIANCE_CONFIG)
    assert checked.returncode == 0 and "valid yaml configuration" in checked.stdout
    assert bed.count_log(r"spawned: 'knockgate'") == spawned  # the appliance untouched


def test_top_over_compose_exec_shows_the_live_dashboard(appliance: Appliance) -> None:  # noqa: F811
    require(shutil.which("tmux") is not None, "tmux is not installed (apt-get install tmux)")
    bed = appliance.bed
    terminal = Terminal(f"kg-top-tb-{os.getpid()}")
    terminal.kill()
    compose = [
        DOCKER, "compose", "-f", str(COMPOSE_FILE), "-f", str(appliance.override),
        "-p", bed.project, "exec", "appliance", "knockgate", "top", "--config", APPLIANCE_CONFIG,
    ]  # fmt: skip
    # KGTB_DOCKER_HOST as Appliance.compose leaves it; COLUMNS/LINES: the terminal's size.
    command = "env -u KGTB_DOCKER_HOST -u COLUMNS -u LINES " + " ".join(compose)
    try:
        terminal.start(f"{command}; echo kg-top-exited $?; sleep 60")
        first = squeeze(terminal.wait_for(lambda s: "capturing on kgtb0" in s, timeout=30))
        assert "firewall nftables" in first
        assert "ssh 3-step sequence 2222/tcp" in first
        assert re.search(r"ssh serving|ssh ready|ssh cold", first), first
        bed.knock_door("ssh")
        grant = re.compile(rf"ssh {re.escape(CLIENT)} 2222/tcp (\d+) s")
        live = squeeze(terminal.wait_for(lambda s: grant.search(squeeze(s)) is not None, 20))
        assert re.search(r"ssh (serving|ready) up ", live), live
        assert re.search(r"knocks/s \S+ [1-9]", live), live
        terminal.keys("C-c")
        ended = terminal.wait_for(lambda s: "kg-top-exited" in s, timeout=10)
        assert "kg-top-exited 0" in ended and "Traceback" not in ended
    finally:
        terminal.kill()


def squeeze(screen: str) -> str:
    return re.sub(r"[ \t]+", " ", screen)


def test_config_apply_refuses_a_broken_edit_and_keeps_the_running_config(
    appliance: Appliance,  # noqa: F811
) -> None:
    bed = appliance.bed
    before = appliance.status()
    good = appliance.config.read_text()
    broken = good.replace("seq_timeout: 5", "seq_timeout: later", 1)
    assert broken != good
    apply = ["exec", "-i", bed.appliance, "knockgate", "config", "apply", "--config"]
    refused = docker(*apply, APPLIANCE_CONFIG, check=False, stdin=broken)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "seq_timeout" in refused.stderr and "Traceback" not in refused.stderr
    assert appliance.config.read_text() == good

    reloads = bed.count_log(r"configuration reloaded")
    accepted = docker(*apply, APPLIANCE_CONFIG, check=False, stdin=good + "# kg edit\n")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "reload requested" in accepted.stdout
    bed.wait_log(r"configuration reloaded", 10, after=reloads)
    assert appliance.config.read_text().endswith("# kg edit\n")
    assert appliance.status()["pid"] == before["pid"]
    appliance.config.write_text(good)


def test_restart_with_a_broken_config_waits_then_starts_when_fixed(
    appliance: Appliance,  # noqa: F811
) -> None:
    bed = appliance.bed
    good = appliance.config.read_text()
    appliance.config.write_text(good.replace("seq_timeout: 5", "seq_timeout: later", 1))
    try:
        spawned = bed.count_log(r"spawned: 'knockgate'")
        waiting = bed.count_log(r"knockgate-serve: not starting knockgate")
        appliance.compose("restart", "appliance", timeout=90)
        bed.wait_log(r"knockgate-serve: not starting knockgate", 20, after=waiting)
        time.sleep(6)  # supervisord's startsecs and a few of its retries, were it looping
        assert bed.count_log(r"spawned: 'knockgate'") == spawned + 1, bed.log_tail()
        assert bed.count_log(r"knockgate-serve: not starting knockgate") == waiting + 1
        state = docker("inspect", "-f", "{{.State.Status}} {{.RestartCount}}", bed.appliance)
        assert state.stdout.split()[0] == "running"
    finally:
        appliance.config.write_text(good)
    capturing = bed.count_log(r"kgtb0: capturing")
    appliance.compose("kill", "-s", "HUP", "appliance")
    bed.wait_log(r"knockgate-serve: .* is valid now: starting knockgate", 15)
    bed.wait_capturing(before=capturing)
    assert appliance.status()["config"] == APPLIANCE_CONFIG


def test_only_the_launcher_reaches_docker(appliance: Appliance) -> None:  # noqa: F811
    bed = appliance.bed
    owner = f"owner_of({APPLIANCE_CONFIG!r})"
    listing = (
        "from appliance.services.remote import RemoteRuntime\n"
        "from appliance.services.runtime import owner_of\n"
        f"print(len(RemoteRuntime({LAUNCHER_SOCKET!r}).owned({owner})))"
    )
    bed.wait(
        "the launcher's socket",
        lambda: bed.exec("appliance", "test", "-S", LAUNCHER_SOCKET).returncode == 0,
        15,
    )
    # The launcher runs as its own user (it made the socket) in the Docker socket's group.
    who = bed.exec("appliance", "stat", "-c", "%U %a", LAUNCHER_SOCKET, check=True)
    assert who.stdout.split()[0] == "knockgate-launcher"
    folder = bed.exec("appliance", "stat", "-c", "%U %a", "/run/knockgate-docker", check=True)
    assert folder.stdout.split() == ["knockgate-launcher", "700"]
    # Full root (as `docker compose run` subcommands) reaches Docker; the monitor's user
    # (knockgate) cannot even get to the socket, but the launcher answers it.
    full = bed.exec("appliance", "python3", "-c", CONNECT, DOCKER_SOCKET)
    assert full.stdout.strip() == "ok", full.stderr
    dropped = bed.exec("appliance", *MONITOR_CAPS, "python3", "-c", CONNECT, DOCKER_SOCKET)
    assert dropped.returncode != 0 and "PermissionError" in dropped.stderr, dropped
    answered = bed.exec("appliance", *MONITOR_CAPS, "python3", "-c", listing)
    assert answered.returncode == 0 and answered.stdout.strip().isdigit(), answered
    # Nobody else gets to the launcher (the packet process's kind of user).
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    stranger = bed.exec("appliance", *nobody, "python3", "-c", CONNECT, LAUNCHER_SOCKET)
    assert stranger.returncode != 0 and "PermissionError" in stranger.stderr, stranger
    # The launcher refuses a container that is not knockgate's nor labelled.
    docker("rm", "-f", DECOY_CONTAINER, check=False)
    docker("run", "-d", "--name", DECOY_CONTAINER, BASE_IMAGE, "sleep", "600")
    try:
        ident = docker("inspect", "-f", "{{.Id}}", DECOY_CONTAINER).stdout.strip()
        stop = (
            "from appliance.services.remote import RemoteRuntime\n"
            "from appliance.services.runtime import Container\n"
            f"RemoteRuntime({LAUNCHER_SOCKET!r}).stop(Container({ident!r}, 'x', '', 'running'))"
        )
        refused = bed.exec("appliance", *MONITOR_CAPS, "python3", "-c", stop)
        assert "refused stop of container " + DECOY_CONTAINER in refused.stderr, refused
        state = docker("inspect", "-f", "{{.State.Status}}", DECOY_CONTAINER).stdout.strip()
        assert state == "running"
        assert re.search(rf"launcher: refused stop of container {DECOY_CONTAINER}", bed.logs())
    finally:
        docker("rm", "-f", DECOY_CONTAINER, check=False)


def oneoff_containers(bed: Testbed) -> list[str]:
    """Containers left by ``docker compose run`` in the testbed's project."""
    listing = docker(
        "ps", "-aq", "--filter", f"label=com.docker.compose.project={bed.project}",
        "--filter", "label=com.docker.compose.oneoff=True",
    )  # fmt: skip
    return listing.stdout.split()


def test_compose_run_teardown_removes_the_firewall_and_leaves_no_container(
    appliance: Appliance,  # noqa: F811
) -> None:
    bed = appliance.bed
    assert nft_table_exists()
    appliance.compose("stop", "appliance", timeout=90)
    try:
        done = compose_run(bed, "teardown", "--config", APPLIANCE_CONFIG)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        assert not nft_table_exists()
        assert oneoff_containers(bed) == []
    finally:
        capturing = bed.count_log(r"kgtb0: capturing")
        appliance.compose("start", "appliance", timeout=90)
        bed.wait_capturing(before=capturing)
    assert nft_table_exists()  # the appliance puts its rules back at start


def test_uninstall_leaves_nothing_of_knockgate_and_touches_nothing_else(
    appliance: Appliance,  # noqa: F811
) -> None:
    bed = appliance.bed
    # A service container of ours, running.
    bed.knockd_knock(*WEB_KNOCK)
    bed.wait("web started", lambda: bed.running("web"), 30)
    assert f"containers through the launcher at {LAUNCHER_SOCKET}" in bed.logs()
    assert nft_table_exists()
    # Someone else's: a container with another knockgate owner, and an nftables table.
    docker("rm", "-f", DECOY_CONTAINER, check=False)
    docker(
        "run", "-d", "--name", DECOY_CONTAINER, "--label", "knockgate.owner=kgother0000",
        "--label", "knockgate.service=decoy", BASE_IMAGE, "sleep", "600",
    )  # fmt: skip
    run(["nft", "add", "table", "inet", DECOY_TABLE])
    try:
        refused = compose_run(bed, "uninstall", "--config", APPLIANCE_CONFIG)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "stop it first" in refused.stderr
        assert nft_table_exists() and owned_containers()  # nothing was touched

        appliance.compose("stop", "appliance", timeout=90)
        done = compose_run(bed, "uninstall", "--config", APPLIANCE_CONFIG)
        assert done.returncode == 0, done.stdout + done.stderr
        assert re.search(r"removed container knockgate-web \(service web\)", done.stdout)
        assert "removed nftables table inet knockgate" in done.stdout
        assert not nft_table_exists()
        assert owned_containers() == []
        listing = docker("ps", "-aq", "--filter", f"label=knockgate.owner={OWNER}")
        assert listing.stdout.strip() == ""
        # Nothing else: the other owner's container runs on, the other table stays.
        decoy = docker("inspect", "-f", "{{.State.Status}}", DECOY_CONTAINER)
        assert decoy.stdout.strip() == "running"
        assert run(["nft", "list", "table", "inet", DECOY_TABLE], check=False).returncode == 0
        # Again: idempotent.
        again = compose_run(bed, "uninstall", "--config", APPLIANCE_CONFIG)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "no nftables table inet knockgate" in again.stdout
    finally:
        docker("rm", "-f", DECOY_CONTAINER, check=False)
        run(["nft", "delete", "table", "inet", DECOY_TABLE], check=False)
