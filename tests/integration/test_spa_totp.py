"""Authenticated knocks on real packets: SPA doors, TOTP sequences, one-time sequences.

Each test builds its own topology (a bridge namespace with server, client and other
hosts), runs ``knockgate run`` in the server namespace with a state directory of its
own, and removes everything, daemon and rules included, even on failure. A door is
open for a host when a TCP connect from that host to a listener in the server
namespace succeeds; before the knock it is refused (knockgate answers with a reset).

SPA packets come from the stock ``fwknop`` client (Debian fwknop-client), from
``knockgate spa``, or are built here with :func:`appliance.spa.wire.seal` and sent as
they are from the client namespace with a plain UDP socket (replays, bit flips, old
timestamps, wrong keys).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.core.model import Step, Totp
from appliance.core.totp import time_step, totp_sequence
from appliance.spa.keyfile import format_keys, generate_keys
from appliance.spa.wire import SpaKeys, new_message, seal
from tests.integration.conftest import require
from tests.integration.daemon import PYTHON, REPO, Knockgate, connect, serve
from tests.integration.netns import Topology, cleanup_stale, ensure_root_tools

pytestmark = pytest.mark.integration

SPA_PORT = 62201
SSH, HTTP = 22, 80  # the SPA door's ports; alice may open 22 only
TOTP_PORT = 2222  # what the TOTP door opens
ONE_TIME_PORT = 2223  # what the one-time door opens
TOTP_SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
ONE_TIME_LINES = (" 31001,31002:udp,31003\n", " 31011,31012:udp,31013\n", " 31021,31022,31023\n")

CONFIG = """\
interfaces: [eth0]
status_socket: @SOCKET@
state_dir: {state_dir}
firewall: {{backend: nftables}}
doors:
  spa:
    spa:
      port: {spa_port}
      max_age: 120
      require_source_address: false   # fwknop -s is tested (the default refuses it)
      users:
        alice:
          key_base64: {alice_key}
          hmac_key_base64: {alice_hmac}
          sources: [198.18.0.0/15]
          ports: [22/tcp]
        bob:
          key_base64: {bob_key}
          hmac_key_base64: {bob_hmac}
        carol:
          key_base64: {carol_key}
          hmac_key_base64: {carol_hmac}
          sources: [{other}/32]
    open: {{ports: [22/tcp, 80/tcp], duration: {duration}}}
  otp:
    knock:
      totp: {{secret: {totp_secret}, steps: 3, period: 30, ports: 20000-20999, protocol: tcp, skew: 1}}
      seq_timeout: 5
    open: {{ports: [{totp_port}/tcp], duration: {duration}}}
  onetime:
    knock: {{one_time_sequences: {one_time}, seq_timeout: 5}}
    open: {{ports: [{one_time_port}/tcp], duration: {duration}}}
"""


@dataclass(frozen=True)
class User:
    key: str  # base64, as `knockgate keygen` prints it
    hmac: str

    @property
    def keys(self) -> SpaKeys:
        return SpaKeys.from_base64(self.key, self.hmac)


def new_user() -> User:
    return User(*generate_keys())


class Gate(Knockgate):
    """The shared daemon wrapper, with the counters of ``knockgate status``."""

    def counters(self) -> dict[str, int]:
        counters: dict[str, int] = self.status()["counters"]  # type: ignore[assignment]
        return counters


@dataclass
class Lab:
    """One topology with the daemon running in ``server``, and what the test needs."""

    topo: Topology
    workdir: Path
    daemon: Gate
    alice: User
    bob: User
    carol: User
    one_time_server: Path  # the server's one-time file (the daemon marks it)
    one_time_client: Path  # the client's copy (knockgate knock --one-time marks it)

    @property
    def server(self) -> str:
        return self.topo.host("server").ipv4

    @property
    def client(self) -> str:
        return self.topo.host("client").ipv4

    @property
    def other(self) -> str:
        return self.topo.host("other").ipv4

    def restart(self) -> Gate:
        """Stop the daemon (SIGTERM) and start a new one on the same config and state."""
        assert self.daemon.stop() == 0, self.daemon.log()
        workdir = self.workdir / f"run{len(list(self.workdir.glob('run*'))) + 1}"
        workdir.mkdir()
        self.daemon = Gate(
            self.topo,
            workdir,
            "",
            config_path=self.daemon.config_path,
            state_dir=self.daemon.state_dir,
        ).start()
        return self.daemon

    def totp(self) -> Totp:
        totp = load_config(str(self.daemon.config_path)).config.door("otp").knock.totp
        assert totp is not None
        return totp

    def cli(self, host: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``knockgate ARGS`` in ``host``'s namespace."""
        return self.topo.run(
            host,
            [PYTHON, "-m", "appliance.cli", *args],
            check=check,
            cwd=str(REPO),
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    def send_udp(self, host: str, payload: bytes, port: int = SPA_PORT) -> None:
        """Send ``payload`` as one UDP datagram from ``host`` to the server, byte for byte."""
        code = (
            "import socket,sys\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            f"s.sendto(bytes.fromhex({payload.hex()!r}),({self.server!r},{port}))\n"
        )
        self.topo.run(host, [PYTHON, "-c", code])

    def spa_packet(
        self,
        user: User,
        access: str,
        *,
        timestamp: float | None = None,
        client_timeout: int | None = None,
    ) -> bytes:
        """What ``fwknop -A ACCESS -a ADDRESS`` would send, built with the test's keys."""
        stamp = int(time.time() if timestamp is None else timestamp)
        return seal(new_message("root", stamp, access, client_timeout), user.keys)


def prerequisites() -> None:
    missing = ensure_root_tools(vlan=False)
    require(not missing, ", ".join(missing))
    require(shutil.which("nft") is not None, "nft is not installed")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    prerequisites()
    cleanup_stale()
    alice, bob, carol = new_user(), new_user(), new_user()
    one_time_server = tmp_path / "one-time.server"
    one_time_client = tmp_path / "one-time.client"
    for path in (one_time_server, one_time_client):
        path.write_text("".join(ONE_TIME_LINES))
    with Topology(("server", "client", "other"), vlan=False) as topo:
        for port in (SSH, HTTP, TOTP_PORT, ONE_TIME_PORT):
            serve(topo, "server", port)
        config = CONFIG.format(
            state_dir=tmp_path / "state",
            spa_port=SPA_PORT,
            alice_key=alice.key,
            alice_hmac=alice.hmac,
            bob_key=bob.key,
            bob_hmac=bob.hmac,
            carol_key=carol.key,
            carol_hmac=carol.hmac,
            other=topo.host("other").ipv4,
            duration=2,
            totp_secret=TOTP_SECRET,
            totp_port=TOTP_PORT,
            one_time=one_time_server,
            one_time_port=ONE_TIME_PORT,
        )
        config_path = tmp_path / "knockgate.yaml"
        config_path.write_text(config.replace("@SOCKET@", str(tmp_path / "status.sock")))
        daemon = Gate(
            topo, tmp_path, config, config_path=config_path, state_dir=tmp_path / "state"
        ).start()
        lab = Lab(topo, tmp_path, daemon, alice, bob, carol, one_time_server, one_time_client)
        try:
            yield lab
        finally:
            lab.daemon.stop()


def wait_state(lab: Lab, host: str, port: int, wanted: str = "open", timeout: float = 1.5) -> str:
    """Poll a TCP connect from ``host`` to the server until it is ``wanted`` or time is up."""
    deadline = time.monotonic() + timeout
    state = connect(lab.topo, host, lab.server, port, timeout=0.5)
    while state != wanted and time.monotonic() < deadline:
        time.sleep(0.1)
        state = connect(lab.topo, host, lab.server, port, timeout=0.5)
    return state


def settle() -> None:
    """Time for the daemon to see a packet that should have no effect."""
    time.sleep(0.5)


def wait_closed(lab: Lab, host: str, port: int) -> None:
    """Wait for a grant (2 s) to reach its deadline."""
    assert wait_state(lab, host, port, "refused", timeout=4) == "refused"


def grants(lab: Lab) -> list[tuple[str, str]]:
    """The open grants ``knockgate status --json`` lists: (address, port)."""
    listed: list[dict[str, str]] = lab.daemon.status()["grants"]  # type: ignore[assignment]
    return [(grant["address"], grant["port"]) for grant in listed]


def wait_counter(lab: Lab, name: str, value: int, timeout: float = 3.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    counters = lab.daemon.counters()
    while counters.get(name, 0) < value and time.monotonic() < deadline:
        time.sleep(0.1)
        counters = lab.daemon.counters()
    return counters


def fwknop(lab: Lab, host: str, user: User, *options: str) -> subprocess.CompletedProcess[str]:
    """The stock fwknop client in ``host``: no rc file, no saved arguments, nothing resolved."""
    binary = shutil.which("fwknop")
    require(binary is not None, "fwknop is not installed (apt-get install fwknop-client)")
    assert binary is not None
    home = lab.workdir / f"home-{host}"
    home.mkdir(exist_ok=True)
    argv = [binary, "--no-rc-file", "--no-save-args", "-D", lab.server, "--use-hmac"]
    argv += ["--key-base64-rijndael", user.key, "--key-base64-hmac", user.hmac, *options]
    return lab.topo.run(host, argv, env={**os.environ, "HOME": str(home)})


# --------------------------------------------------------------------------- SPA


def test_fwknop_client_opens_for_the_address_in_the_packet(lab: Lab) -> None:
    assert connect(lab.topo, "client", lab.server, SSH) == "refused"
    assert connect(lab.topo, "other", lab.server, SSH) == "refused"
    # Sent from the client, for the other host's address (-a): only "other" gets in.
    fwknop(lab, "client", lab.bob, "-A", "tcp/22", "-a", lab.other)
    assert wait_state(lab, "other", SSH) == "open"
    assert connect(lab.topo, "client", lab.server, SSH) == "refused"
    assert connect(lab.topo, "other", lab.server, HTTP) == "refused"  # not asked for
    assert grants(lab) == [(lab.other, "22/tcp")]
    assert f"{lab.other}: spa: SPA from user bob accepted (SPA from {lab.client})" in (
        lab.daemon.log()
    )
    # -s: "the address the packet comes from".
    fwknop(lab, "client", lab.bob, "-A", "tcp/22", "-s")
    assert wait_state(lab, "client", SSH) == "open"
    counters = lab.daemon.counters()
    assert counters["spa_accepted"] == 2
    assert counters["spa_refused"] == counters["spa_unauthenticated"] == 0


def test_knockgate_spa_client_opens(lab: Lab) -> None:
    key_file = lab.workdir / "bob.key"
    key_file.write_text(format_keys(lab.bob.key, lab.bob.hmac))
    assert connect(lab.topo, "client", lab.server, SSH) == "refused"
    assert connect(lab.topo, "client", lab.server, HTTP) == "refused"
    # --config: the door's UDP port and its ports (22 and 80); the address we leave from.
    done = lab.cli(
        "client",
        "spa",
        lab.server,
        "--door",
        "spa",
        "--key-file",
        str(key_file),
        "--config",
        str(lab.daemon.config_path),
        "-v",
    )
    assert f"SPA to {lab.server} port {SPA_PORT}/udp" in done.stdout
    assert wait_state(lab, "client", SSH) == "open"
    assert connect(lab.topo, "client", lab.server, HTTP) == "open"
    assert connect(lab.topo, "other", lab.server, SSH) == "refused"
    # A fwknoprc stanza, -A, -a for another host and -f.
    rc = lab.workdir / "fwknoprc"
    rc.write_text(f"[spa]\nKEY_BASE64 {lab.bob.key}\nHMAC_KEY_BASE64 {lab.bob.hmac}\n")
    lab.cli("client", "spa", lab.server, "--door", "spa", "--key-file", str(rc), "-A", "tcp/80")
    lab.cli(
        "client",
        "spa",
        lab.server,
        "--door",
        "spa",
        "--key-file",
        str(rc),
        "-A",
        "tcp/22",
        "-a",
        lab.other,
        "-f",
        "1",
    )
    assert wait_state(lab, "other", SSH) == "open"
    assert connect(lab.topo, "other", lab.server, HTTP) == "refused"
    assert lab.daemon.counters()["spa_accepted"] == 3


def test_replayed_packet_is_refused_also_after_a_restart(lab: Lab) -> None:
    packet = lab.spa_packet(lab.bob, f"{lab.client},tcp/22", client_timeout=1)
    lab.send_udp("client", packet)
    assert wait_state(lab, "client", SSH) == "open"
    wait_closed(lab, "client", SSH)  # the 1 s grant ran out

    lab.send_udp("client", packet)  # the very same bytes
    assert lab.daemon.wait_log("refused: replay", timeout=3), lab.daemon.log()
    settle()
    assert connect(lab.topo, "client", lab.server, SSH) == "refused"
    counters = lab.daemon.counters()
    assert (counters["spa_accepted"], counters["spa_refused"]) == (1, 1)
    assert grants(lab) == []

    replay_file = lab.daemon.state_dir / "replay"
    assert replay_file.read_text().splitlines()[1].startswith("spa "), replay_file.read_text()
    again = lab.restart()
    lab.send_udp("client", packet)
    assert again.wait_log("refused: replay", timeout=3), again.log()
    settle()
    assert connect(lab.topo, "client", lab.server, SSH) == "refused"
    assert (again.counters()["spa_accepted"], again.counters()["spa_refused"]) == (0, 1)
    # The restarted daemon does open for a fresh packet: the refusal above was the replay.
    lab.send_udp("client", lab.spa_packet(lab.bob, f"{lab.client},tcp/22"))
    assert wait_state(lab, "client", SSH) == "open"


def test_flipped_bit_is_unauthenticated(lab: Lab) -> None:
    packet = lab.spa_packet(lab.bob, f"{lab.client},tcp/22")
    # Flip the lowest bit of a character in the middle that stays base64 ('A' <-> 'B', ...),
    # so the packet fails on its HMAC, not on its charset.
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    middle = len(packet) // 2
    index = next(i for i in range(middle, len(packet)) if packet[i] ^ 1 in alphabet)
    flipped = bytearray(packet)
    flipped[index] ^= 1
    lab.send_udp("client", bytes(flipped))
    counters = wait_counter(lab, "spa_unauthenticated", 1)
    assert counters["spa_unauthenticated"] == 1
    assert counters["spa_accepted"] == counters["spa_refused"] == 0
    settle()
    assert connect(lab.topo, "client", lab.server, SSH) == "refused"
    # The untouched packet opens: only the flipped bit was wrong.
    lab.send_udp("client", packet)
    assert wait_state(lab, "client", SSH) == "open"


def test_old_timestamp_is_refused_as_stale(lab: Lab) -> None:
    packet = lab.spa_packet(lab.bob, f"{lab.client},tcp/22", timestamp=time.time() - 300)
    lab.send_udp("client", packet)
    assert lab.daemon.wait_log("SPA from user bob refused: stale", timeout=3), lab.daemon.log()
    settle()
    assert connect(lab.topo, "client", lab.server, SSH) == "refused"
    counters = lab.daemon.counters()
    assert (counters["spa_accepted"], counters["spa_refused"]) == (0, 1)
    # A timestamp as far in the future is refused too.
    future = lab.spa_packet(lab.bob, f"{lab.client},tcp/22", timestamp=time.time() + 300)
    lab.send_udp("client", future)
    assert lab.daemon.wait_log("SPA from user bob refused: future", timeout=3), lab.daemon.log()
    settle()
    assert connect(lab.topo, "client", lab.server, SSH) == "refused"


def test_wrong_keys_are_rejected(lab: Lab) -> None:
    access = f"{lab.client},tcp/22"
    # Keys nobody configured: no HMAC verifies.
    lab.send_udp("client", lab.spa_packet(new_user(), access))
    # bob's HMAC key with another Rijndael key: authentic, but it does not decrypt.
    mixed = User(new_user().key, lab.bob.hmac)
    lab.send_udp("client", lab.spa_packet(mixed, access))
    # carol's right keys, but from an address outside her sources (only "other").
    lab.send_udp("client", lab.spa_packet(lab.carol, access))
    # The stock client with a wrong key.
    fwknop(lab, "client", new_user(), "-A", "tcp/22", "-a", lab.client)
    counters = wait_counter(lab, "spa_packets", 4)
    settle()
    counters = lab.daemon.counters()
    assert counters["spa_packets"] == 4
    assert counters["spa_unauthenticated"] == 3
    assert counters["spa_undecodable"] == 1
    assert counters["spa_accepted"] == counters["spa_refused"] == 0
    assert connect(lab.topo, "client", lab.server, SSH) == "refused"
    assert grants(lab) == []
    # carol's packet from where she may send opens.
    lab.send_udp("other", lab.spa_packet(lab.carol, f"{lab.other},tcp/22"))
    assert wait_state(lab, "other", SSH) == "open"


def test_user_cannot_open_a_port_outside_her_allowance(lab: Lab) -> None:
    key_file = lab.workdir / "alice.key"
    key_file.write_text(format_keys(lab.alice.key, lab.alice.hmac))
    spa = ["spa", lab.server, "--door", "spa", "--key-file", str(key_file), "-a", lab.client]
    lab.cli("client", *spa, "-A", "tcp/80")
    assert lab.daemon.wait_log("SPA from user alice refused: ports", timeout=3), lab.daemon.log()
    # Asking for an allowed and a forbidden port refuses the whole request, as fwknopd does.
    lab.cli("client", *spa, "-A", "tcp/22,tcp/80")
    assert wait_counter(lab, "spa_refused", 2)["spa_refused"] == 2
    settle()
    assert connect(lab.topo, "client", lab.server, HTTP) == "refused"
    assert connect(lab.topo, "client", lab.server, SSH) == "refused"
    # What she may open, she opens; port 80 stays closed to her.
    lab.cli("client", *spa, "-A", "tcp/22")
    assert wait_state(lab, "client", SSH) == "open"
    assert connect(lab.topo, "client", lab.server, HTTP) == "refused"
    counters = lab.daemon.counters()
    assert (counters["spa_accepted"], counters["spa_refused"]) == (1, 2)


# --------------------------------------------------------------------------- TOTP


def knock_ports(lab: Lab, host: str, steps: tuple[Step, ...]) -> None:
    """Send an explicit sequence with ``knockgate knock HOST PORT:PROTO...``."""
    ports = [f"{s.port}:{s.proto}" for s in steps]
    lab.cli(host, "knock", lab.server, *ports)


def used_step(lab: Lab, timeout: float = 3.0) -> int:
    """The time step the daemon logged as used."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.findall(r"otp: time step (-?\d+) used", lab.daemon.log())
        if found:
            return int(found[-1])
        time.sleep(0.05)
    raise AssertionError(f"no TOTP time step used:\n{lab.daemon.log()}")


def test_totp_sequence_opens_once(lab: Lab) -> None:
    config = str(lab.daemon.config_path)
    totp = lab.totp()
    before = time_step(totp, time.time())
    assert connect(lab.topo, "client", lab.server, TOTP_PORT) == "refused"
    lab.cli("client", "knock", lab.server, "--door", "otp", "--config", config)
    assert wait_state(lab, "client", TOTP_PORT) == "open"
    step = used_step(lab)
    assert step in (before, before + 1)  # the client's step (a boundary may pass meanwhile)
    wait_closed(lab, "client", TOTP_PORT)

    # The used sequence again, from the client and from another host: refused.
    replayed = totp_sequence(totp, step)
    knock_ports(lab, "client", replayed)
    knock_ports(lab, "other", replayed)
    settle()
    assert connect(lab.topo, "client", lab.server, TOTP_PORT) == "refused"
    assert connect(lab.topo, "other", lab.server, TOTP_PORT) == "refused"
    # A sequence from outside the window (three steps back): refused as well.
    knock_ports(lab, "other", totp_sequence(totp, time_step(totp, time.time()) - 3))
    settle()
    assert connect(lab.topo, "other", lab.server, TOTP_PORT) == "refused"
    assert lab.daemon.log().count("otp: OPEN SESAME") == 1

    # The used step stays used across a restart (same state directory).
    again = lab.restart()
    knock_ports(lab, "client", replayed)
    settle()
    assert connect(lab.topo, "client", lab.server, TOTP_PORT) == "refused"
    assert "OPEN SESAME" not in again.log()
    # The next step's sequence (within skew) is still good, once.
    knock_ports(lab, "other", totp_sequence(totp, step + 1))
    assert wait_state(lab, "other", TOTP_PORT) == "open"


# --------------------------------------------------------------------------- one-time


def test_one_time_knocks_use_the_next_line_each(lab: Lab) -> None:
    client_copy = str(lab.one_time_client)
    assert connect(lab.topo, "client", lab.server, ONE_TIME_PORT) == "refused"
    lab.cli("client", "knock", lab.server, "--one-time", client_copy)
    assert wait_state(lab, "client", ONE_TIME_PORT) == "open"
    lines = lab.one_time_client.read_text().splitlines(keepends=True)
    assert lines == ["#" + ONE_TIME_LINES[0][1:], *ONE_TIME_LINES[1:]]
    wait_closed(lab, "client", ONE_TIME_PORT)

    # The used line again (knockd's client, as someone who saw it would): refused.
    lab.cli("client", "knock", lab.server, *ONE_TIME_LINES[0].strip().split(","))
    settle()
    assert connect(lab.topo, "client", lab.server, ONE_TIME_PORT) == "refused"

    lab.cli("client", "knock", lab.server, "--one-time", client_copy)
    assert wait_state(lab, "client", ONE_TIME_PORT) == "open"
    lines = lab.one_time_client.read_text().splitlines(keepends=True)
    assert lines == [
        "#" + ONE_TIME_LINES[0][1:],
        "#" + ONE_TIME_LINES[1][1:],
        ONE_TIME_LINES[2],
    ]
    # The server marked the same two lines in its own file.
    assert lab.one_time_server.read_text() == lab.one_time_client.read_text()
    assert lab.daemon.log().count("onetime: OPEN SESAME") == 2, lab.daemon.log()
