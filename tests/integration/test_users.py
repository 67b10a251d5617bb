"""Provisioning on real packets: ``knockgate user add`` gives the stock ``fwknop``
client what it needs to open its door; ``user remove`` revokes at once.

The daemon runs in the server namespace (nftables) on a configuration whose SPA door
has no user of its own (``users: {}``): every user comes from ``knockgate user add``,
which writes ``knockgate-users.yaml`` next to it and reloads the running daemon
(SIGHUP to the pid its status socket reports, confirmed by its reload counter). The
``[ssh]`` stanza of the printed bundle becomes the client's ``~/.fwknoprc``; Debian's
``fwknop`` sends from the client namespace with nothing but ``-n ssh -a ADDRESS``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import require
from tests.integration.daemon import PYTHON, REPO, Knockgate, connect, serve
from tests.integration.netns import Topology, cleanup_stale, ensure_root_tools

pytestmark = pytest.mark.integration

SSH = 22

CONFIG = """\
interfaces: [eth0]
status_socket: @SOCKET@
state_dir: {state_dir}
firewall: {{backend: nftables}}
doors:
  ssh:
    spa:
      port: 62201
      users: {{}}
    open: {{ports: [22/tcp], duration: 30}}
"""


@dataclass
class Lab:
    topo: Topology
    workdir: Path
    daemon: Knockgate

    def ip(self, host: str) -> str:
        return self.topo.host(host).ipv4

    def user(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``knockgate user ARGS --config CONFIG`` on the server."""
        return self.daemon.cli("user", *args, "--config", str(self.daemon.config_path))

    def counters(self) -> dict[str, int]:
        counters: dict[str, int] = self.daemon.status()["counters"]  # type: ignore[assignment]
        return counters


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    missing = ensure_root_tools(vlan=False)
    require(not missing, ", ".join(missing))
    require(shutil.which("nft") is not None, "nft is not installed")
    require(shutil.which("fwknop") is not None, "fwknop is not installed (fwknop-client)")
    cleanup_stale()
    with Topology(("server", "client", "other"), vlan=False) as topo:
        serve(topo, "server", SSH)
        daemon = Knockgate(topo, tmp_path, CONFIG.format(state_dir=tmp_path / "state")).start()
        try:
            yield Lab(topo, tmp_path, daemon)
        finally:
            daemon.stop()


def add_user(lab: Lab, name: str) -> Path:
    """``user add NAME --output FILE``; the bundle's ``[ssh]`` stanza as NAME's
    ``~/.fwknoprc`` (0600, as fwknop wants it), in a home of her own."""
    bundle = lab.workdir / f"{name}.bundle"
    done = lab.user(
        "add", name, "--door", "ssh", "--host", lab.ip("server"), "--output", str(bundle)
    )
    assert f"knockgate: user {name} added (doors: ssh)" in done.stderr
    assert "reloaded" in done.stderr, done.stderr
    assert oct(bundle.stat().st_mode & 0o777) == "0o600"
    text = bundle.read_text()
    stanza = text[text.index("[ssh]\n") :].split("\n\n", 1)[0] + "\n"
    home = lab.workdir / f"home-{name}"
    home.mkdir()
    rc = home / ".fwknoprc"
    rc.write_text(stanza)
    rc.chmod(0o600)
    return home


def fwknop(lab: Lab, host: str, home: Path) -> None:
    """The stock client, from ``host``, for ``host``'s own address: only the rc file
    (written from the bundle) says where to send and with which keys."""
    lab.topo.run(
        host,
        ["fwknop", "-n", "ssh", "-a", lab.ip(host), "--no-save-args"],
        env={**os.environ, "HOME": str(home)},
    )


def wait_state(lab: Lab, host: str, wanted: str, timeout: float = 2.0) -> str:
    deadline = time.monotonic() + timeout
    state = connect(lab.topo, host, lab.ip("server"), SSH, timeout=0.5)
    while state != wanted and time.monotonic() < deadline:
        time.sleep(0.1)
        state = connect(lab.topo, host, lab.ip("server"), SSH, timeout=0.5)
    return state


def test_provisioned_fwknop_client_opens_and_a_removed_user_is_refused(lab: Lab) -> None:
    assert connect(lab.topo, "client", lab.ip("server"), SSH) == "refused"
    alice = add_user(lab, "alice")
    fwknop(lab, "client", alice)
    assert wait_state(lab, "client", "open") == "open"
    assert f"{lab.ip('client')}: ssh: SPA from user alice accepted" in lab.daemon.log()

    bob = add_user(lab, "bob")
    listed = lab.user("list").stdout
    assert "alice  doors: ssh" in listed and "bob  doors: ssh" in listed

    started = time.monotonic()
    done = lab.user("remove", "alice")
    print(f"user remove, reload confirmed: {time.monotonic() - started:.3f} s")
    assert "knockgate: user alice removed" in done.stderr
    assert "reloaded" in done.stderr, done.stderr
    assert lab.counters()["reloads"] == 3
    before = lab.counters()["spa_unauthenticated"]

    # Alice's next packet (from a host she never opened for): refused, not even read.
    assert connect(lab.topo, "other", lab.ip("server"), SSH) == "refused"
    fwknop(lab, "other", alice)
    deadline = time.monotonic() + 3
    while lab.counters()["spa_unauthenticated"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lab.counters()["spa_unauthenticated"] == before + 1
    assert connect(lab.topo, "other", lab.ip("server"), SSH) == "refused"

    # Bob's keys still work, from the same host.
    fwknop(lab, "other", bob)
    assert wait_state(lab, "other", "open") == "open"
    assert lab.daemon.process is not None and lab.daemon.process.poll() is None  # no restart
    assert "alice" not in lab.user("list").stdout


def test_bundle_client_config_and_key_file_serve_knockgate_connect(lab: Lab) -> None:
    """The ssh entry's command, with the bundle's client config and key file."""
    home = add_user(lab, "carol")
    text = (lab.workdir / "carol.bundle").read_text()
    start = text.index("# knockgate client configuration for carol")
    client_config = home / "knockgate.yaml"
    client_config.write_text(text[start : text.index("## 2.")])
    assert "--door ssh --config ~/.config/knockgate/knockgate.yaml --key-file ~/.fwknoprc" in text
    done = lab.topo.run(
        "client",
        [
            *(PYTHON, "-m", "appliance.cli", "connect", lab.ip("server"), str(SSH)),
            *("--door", "ssh"),
            *("--config", str(client_config), "--key-file", str(home / ".fwknoprc")),
            *("--no-keepalive", "--timeout", "5"),
        ],
        check=False,
        stdin=subprocess.DEVNULL,
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    assert f"{lab.ip('client')}: ssh: SPA from user carol accepted" in lab.daemon.log()
