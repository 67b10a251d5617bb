"""Plain ``ssh HOST`` through ``ProxyCommand knockgate connect`` logs in to the ssh service
container that the knock starts (issue 12's check), in the testbed of test_testbed.py.

The appliance runs the testbed config plus one SPA door for the ssh service, ``ssh-spa``
(``users: {}``, a short grant), from a writable copy mounted in place of the repository's
(a Compose override, as in test_appliance_signals.py). The client is set up the way a
user is: ``knockgate user add`` inside the appliance prints the bundle, whose client
configuration, ``~/.fwknoprc`` stanza and ``~/.ssh/config`` entry go into the client
container's home as they are; the user adds only her ssh identity (the key whose public
half is in the ssh service's ``kgtb-ssh-keys:/authorized_keys``). Then, timed inside the
client, ``ssh 198.18.64.1-ssh-spa 'echo kg-ok'``:

1. cold, no container at all (knockgate creates and starts it);
2. warm, the container running but the grant over (the knock only opens the port);
3. cold again after knockgate stopped the idle service (it starts the stopped container);
   the host key is the same (the hostkeys volume), ``accept-new`` would refuse another.

``testbed/bench/ssh_connect_bench.py`` uses the same set-up for its numbers. Run under
``flock /tmp/kg-testbed.lock``. Cleanup: the appliance is recreated as the testbed defines
it (its tmpfs with the users file goes), then the testbed's own teardown.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.testbed.test_testbed import (
    APPLIANCE_CONFIG,
    CLIENT,
    COMPOSE_FILE,
    GATEWAY,
    KEY,
    OTHER,
    REPO,
    SSH_IDLE,
    SSH_PORT,
    Testbed,
    docker,
    grant_for,
    testbed,  # noqa: F401 (a fixture)
)

pytestmark = pytest.mark.testbed

DOOR = "ssh-spa"
SPA_PORT = 62202  # a port of its own (web-spa has fwknop's default)
GRANT = 4  # seconds: short, so the bench's cold runs come quickly (grant + idle_timeout)
USER = "kgtb-ssh-user"
HOST_ALIAS = f"{GATEWAY}-{DOOR}"  # the bundle's `Host` entry: HOST-DOOR
EXTRA_DOOR = f"""\
  {DOOR}:
    description: ssh for the sender of an SPA packet (users from knockgate user add)
    spa: {{port: {SPA_PORT}, users: {{}}}}
    service: {{name: ssh, duration: {GRANT}}}
"""
HOME = "/root"
KNOWN_HOSTS = f"{HOME}/kgtb_known_hosts"
# What the user adds to the bundle's ssh entry herself: who she is and her key.
SSH_DEFAULTS = f"""
Host *
    User root
    IdentityFile {KEY}
    IdentitiesOnly yes
    BatchMode yes
    StrictHostKeyChecking accept-new
    UserKnownHostsFile {KNOWN_HOSTS}
    LogLevel ERROR
"""
# Run in the client: the wall time of one `ssh [OPTIONS] HOST 'echo kg-ok'`, from just
# before the ssh process starts until it has exited (Python's own start is not in it).
TIMED_SSH = """\
import json, subprocess, sys, time
t0 = time.monotonic()
proc = subprocess.run(["ssh", *sys.argv[1:], "echo kg-ok"], capture_output=True, text=True,
                      timeout=60)
took = time.monotonic() - t0
print(json.dumps({"rc": proc.returncode, "seconds": took, "out": proc.stdout,
                  "err": proc.stderr}))
"""


@dataclass(frozen=True)
class Login:
    rc: int
    seconds: float
    out: str
    err: str

    @property
    def ok(self) -> bool:
        return self.rc == 0 and self.out.strip() == "kg-ok"


@dataclass
class SshBed:
    """The testbed with the ``ssh-spa`` door and a client provisioned from its bundle."""

    bed: Testbed
    override: Path
    bundle: str

    def compose(self, *args: str) -> None:
        files = ["-f", str(COMPOSE_FILE), "-f", str(self.override)]
        docker("compose", *files, "-p", self.bed.project, *args, timeout=180)

    def ssh(self, *options: str) -> Login:
        """``ssh [OPTIONS] HOST_ALIAS 'echo kg-ok'`` in the client, timed there."""
        argv = ["python3", "-c", TIMED_SSH, *options, HOST_ALIAS]
        proc = self.bed.exec("client", *argv, timeout=90)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        data = json.loads(proc.stdout)
        return Login(data["rc"], data["seconds"], data["out"], data["err"])

    def container(self) -> str | None:
        """The id of the running ssh service container, if one runs."""
        ids = docker(
            "ps", "-q", "--no-trunc", "--filter", "label=knockgate.service=ssh",
            "--filter", "status=running", check=False,
        ).stdout.split()  # fmt: skip
        assert len(ids) <= 1, ids
        return ids[0] if ids else None

    def wait_grant_over(self) -> None:
        self.bed.wait(
            f"the grant of {CLIENT} on {SSH_PORT} over",
            lambda: grant_for(CLIENT, SSH_PORT) is None,
            GRANT + 5,
            every=0.1,
        )

    def wait_stopped(self) -> None:
        """knockgate stops the service on its own: grant over, then idle_timeout."""
        self.bed.wait(
            "ssh stopped once idle",
            lambda: self.container() is None,
            GRANT + SSH_IDLE + 15,
            every=0.25,
        )


def bundle_sections(text: str) -> dict[int, str]:
    """The numbered sections of a client bundle (``## N. ...`` headers), ``##`` lines cut."""
    parts = re.split(r"^## (\d)\. .*\n", text, flags=re.MULTILINE)
    sections = {}
    for number, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.splitlines() if not line.startswith("##")]
        sections[int(number)] = "\n".join(lines).strip() + "\n"
    return sections


def write_in_client(bed: Testbed, path: str, text: str, mode: str = "0644") -> None:
    script = f"mkdir -p \"$(dirname '{path}')\" && cat > '{path}' && chmod {mode} '{path}'"
    docker("exec", "-i", f"{bed.project}-client-1", "sh", "-c", script, stdin=text)


def provision(bed: Testbed, workdir: Path) -> SshBed:
    """Run the appliance with the extra door, add the user, install her bundle in the
    client. The caller recreates the appliance as the testbed defines it afterwards."""
    config = workdir / "knockgate.yaml"
    text = (REPO / "testbed" / "config" / "knockgate.yaml").read_text()
    assert text.rstrip().splitlines()[-1].startswith("    "), "doors: is not the last section"
    config.write_text(text.rstrip("\n") + "\n" + EXTRA_DOOR)
    config.chmod(0o644)
    override = workdir / "compose.override.yaml"
    # Compose merges volumes by target: this mount replaces the read-only one.
    override.write_text(
        f"services:\n  appliance:\n    volumes:\n      - {config}:{APPLIANCE_CONFIG}\n"
    )
    ssh_bed = SshBed(bed, override, "")
    ssh_bed.compose("up", "-d", "--no-build", "--no-deps", "appliance")
    bed.wait_capturing(before=0)  # a new container: its log starts empty

    add = ["knockgate", "user", "add", USER, "--door", DOOR, "--host", GATEWAY]
    added = bed.exec("appliance", *add, "--config", APPLIANCE_CONFIG)
    assert added.returncode == 0, added.stdout + added.stderr + bed.log_tail()
    assert "reloaded" in added.stderr, added.stderr
    ssh_bed.bundle = added.stdout
    sections = bundle_sections(added.stdout)
    assert f"Host {HOST_ALIAS}\n" in sections[3], sections[3]
    assert f"--door {DOOR}" in sections[3] and "--key-file ~/.fwknoprc" in sections[3]
    write_in_client(bed, f"{HOME}/.config/knockgate/knockgate.yaml", sections[1])
    write_in_client(bed, f"{HOME}/.fwknoprc", sections[2], mode="0600")
    write_in_client(bed, f"{HOME}/.ssh/config", sections[3] + SSH_DEFAULTS, mode="0600")
    bed.exec("client", "rm", "-f", KNOWN_HOSTS, check=True)
    return ssh_bed


def restore(bed: Testbed) -> None:
    """The appliance as the testbed defines it (a new container: its log starts empty)."""
    bed.compose("up", "-d", "--no-build", "--no-deps", "appliance")
    bed.wait_capturing(before=0)


@pytest.fixture(scope="module")
def ssh_bed(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshBed]:  # noqa: F811
    try:
        yield provision(testbed, tmp_path_factory.mktemp("kg-sshbed"))
    finally:
        restore(testbed)


def test_ssh_through_connect_logs_in_to_the_service_the_knock_starts(ssh_bed: SshBed) -> None:
    bed = ssh_bed.bed
    assert "ssh" not in bed.states(), "an ssh service container exists before the first knock"
    assert grant_for(CLIENT, SSH_PORT) is None

    # 1. Cold: no container; the SPA knock of `connect` makes knockgate create and start it.
    cold = ssh_bed.ssh()
    assert cold.ok, f"{cold}\n{bed.log_tail()}"
    accepted = rf"{re.escape(CLIENT)}: {DOOR}: SPA from user {USER} accepted"
    assert bed.count_log(accepted) >= 1, bed.log_tail()
    first = ssh_bed.container()
    assert first is not None
    assert bed.connect("other", SSH_PORT) == "refused"  # a grant for the knocker only
    assert grant_for(OTHER, SSH_PORT) is None

    # 2. Warm: the same container still runs, the grant is over (port closed to us again).
    ssh_bed.wait_grant_over()
    assert ssh_bed.container() == first, "the service stopped before its idle_timeout"
    assert bed.connect("client", SSH_PORT) == "refused"
    warm = ssh_bed.ssh()
    assert warm.ok, f"{warm}\n{bed.log_tail()}"
    assert ssh_bed.container() == first, "the warm login restarted the service"
    assert bed.count_log(accepted) >= 2

    # 3. Cold again, from the container knockgate stopped when it went idle.
    ssh_bed.wait_stopped()
    assert bed.count_log(r"ssh: stopped \(idle for 5 s\)") >= 1
    again = ssh_bed.ssh()
    assert again.ok, f"{again}\n{bed.log_tail()}"
    assert ssh_bed.container() == first, "the stopped container was not started again"
    known = bed.exec("client", "cat", KNOWN_HOSTS, check=True).stdout.splitlines()
    assert len(known) == 1, known  # one host key, accepted once and the same ever since
    print(
        f"ssh {HOST_ALIAS} 'echo kg-ok': cold (new container) {cold.seconds * 1000:.0f} ms, "
        f"warm {warm.seconds * 1000:.0f} ms, cold (stopped container) "
        f"{again.seconds * 1000:.0f} ms"
    )
