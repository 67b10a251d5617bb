"""A fleet on real namespaces: three knockgate hosts, two clients and a real Redis.

Kept free of pytest so the benchmark (testbed/bench/fleet_bench.py) uses it too::

    <id>s1 server1  knockgate (own nft table), listeners on 22, 2222, 2223
    <id>s2 server2  the same
    <id>s3 server3  the same (on_outage: local; the others refuse)
    <id>c  client   the knocker
    <id>c2 client2  someone else
    <id>o  other    redis-server with an ACL user (no default user), nothing saved

all on one bridge in 198.18.0.0/15. :meth:`FleetLab.close` stops the daemons (SIGTERM:
``on_shutdown: revoke``, then each nft table is deleted), Redis and the topology, each
step guarded.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from types import TracebackType

from appliance.spa.keyfile import generate_keys
from appliance.spa.wire import SpaKeys, new_message, seal
from tests.integration.daemon import PYTHON, REPO, Knockgate, connect, serve
from tests.integration.netns import Topology

SERVERS = ("server1", "server2", "server3")
FLEET = "itest"
PASSWORD = "kg-fleet-test-password"
REDIS_PORT = 6379
SSH, SPA_OPENS, TOTP_OPENS = 22, 2222, 2223
SPA_PORT = 62201
TOTP_SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
ACL = (
    "resetchannels -@all +ping +xadd +xread +xrevrange +hset +hdel +hgetall +zadd +zrem "
    "+zrangebyscore +set +multi +exec +info +memory"
)

CONFIG = """\
interfaces: [eth0]
status_socket: @SOCKET@
firewall: {{backend: nftables, scan: false}}
on_shutdown: revoke
fleet:
  name: {fleet}
  host: {host}
  redis: redis://knockgate@{redis}:{port}/0
  password_file: {password_file}
  on_outage: {on_outage}
doors:
  ssh:
    knock: {{sequence: [7113, 2231/udp, 9157], seq_timeout: 5}}
    open: {{ports: [22/tcp], duration: {duration}}}
  close:
    knock: {{sequence: [9157, 2231/udp, 7113], seq_timeout: 5}}
    close: [ssh]
  spa:
    spa:
      port: {spa_port}
      max_age: 120
      users:
        alice: {{key_base64: {key}, hmac_key_base64: {hmac}}}
    open: {{ports: [{spa_opens}/tcp], duration: {short}}}
  otp:
    knock:
      totp: {{secret: {totp}, steps: 3, period: 30, ports: 20000-20999, protocol: tcp, skew: 1}}
      seq_timeout: 5
    open: {{ports: [{totp_opens}/tcp], duration: {short}}}
"""


class FleetLab:
    def __init__(self, workdir: Path, duration: float = 30, short: float = 2) -> None:
        self.workdir = workdir
        self.duration = duration
        self.short = short
        self.key, self.hmac = generate_keys()
        self.topo = Topology((*SERVERS, "client", "client2", "other"), vlan=False)
        self.daemons: dict[str, Knockgate] = {}
        self.redis: subprocess.Popen[str] | None = None
        self.password_file = workdir / "redis-password"

    # ----------------------------------------------------------------- life cycle

    def __enter__(self) -> FleetLab:
        self.topo.__enter__()
        try:
            self.password_file.write_text(PASSWORD + "\n")
            self.password_file.chmod(0o600)
            self.start_redis()
            for server in SERVERS:
                for port in (SSH, SPA_OPENS, TOTP_OPENS):
                    serve(self.topo, server, port)
                self.start(server)
            self.wait_reachable()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for server, daemon in list(self.daemons.items()):
            with contextlib.suppress(Exception):
                self.cut(server, False)
            with contextlib.suppress(Exception):
                daemon.stop()
            with contextlib.suppress(Exception):
                self.topo.run(server, ["nft", "delete", "table", "inet", "knockgate"], check=False)
        self.stop_redis()
        self.topo.__exit__(None, None, None)

    def start_redis(self, acl: str = ACL) -> None:
        """Start Redis (empty) with the ACL user allowed ``acl``."""
        conf = self.workdir / "redis.conf"
        conf.write_text(
            f'port {REDIS_PORT}\nbind {self.redis_address}\nsave ""\nappendonly no\n'
            f"dir {self.workdir}\nuser default off\n"
            f"user knockgate on >{PASSWORD} ~kg:{{{FLEET}}}:* {acl}\n"
        )
        log = (self.workdir / "redis.log").open("a")
        self.redis = self.topo.popen("other", ["redis-server", str(conf)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.redis_cli("PING").strip() == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError(
            f"redis-server did not come up: {(self.workdir / 'redis.log').read_text()}"
        )

    def stop_redis(self) -> None:
        if self.redis is None or self.redis.poll() is not None:
            return
        self.redis.terminate()
        try:
            self.redis.wait(5)
        except subprocess.TimeoutExpired:
            self.redis.kill()
            self.redis.wait()

    def redis_cli(self, *args: str) -> str:
        argv = ["redis-cli", "-h", self.redis_address, "-p", str(REDIS_PORT)]
        argv += ["--user", "knockgate", "--pass", PASSWORD, "--no-auth-warning", *args]
        return self.topo.run("other", argv, check=False, timeout=10).stdout

    def config(self, server: str) -> str:
        return CONFIG.format(
            fleet=FLEET,
            host=server,
            redis=self.redis_address,
            port=REDIS_PORT,
            password_file=self.password_file,
            on_outage="local" if server == "server3" else "refuse",
            duration=self.duration,
            short=self.short,
            spa_port=SPA_PORT,
            key=self.key,
            hmac=self.hmac,
            totp=TOTP_SECRET,
            spa_opens=SPA_OPENS,
            totp_opens=TOTP_OPENS,
        )

    def start(self, server: str) -> Knockgate:
        workdir = self.workdir / server
        workdir.mkdir(exist_ok=True)
        runs = len(list(workdir.glob("run*")))
        rundir = workdir / f"run{runs}"
        rundir.mkdir()
        daemon = Knockgate(
            self.topo, rundir, self.config(server), host=server, state_dir=workdir / "state"
        ).start()
        self.daemons[server] = daemon
        return daemon

    def restart(self, server: str) -> Knockgate:
        assert self.daemons[server].stop() == 0, self.daemons[server].log()
        daemon = self.start(server)
        self.wait_reachable(server)
        return daemon

    def fleet(self, server: str) -> dict[str, object]:
        block: dict[str, object] = self.daemons[server].status()["fleet"]  # type: ignore[assignment]
        return block

    def wait_reachable(self, *servers: str, reachable: bool = True, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        for server in servers or SERVERS:
            while self.fleet(server)["reachable"] is not reachable:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{server}: fleet {self.fleet(server)}")
                time.sleep(0.05)

    def cut(self, server: str, cut: bool = True) -> None:
        """Cut ``server`` off from Redis (its own nft table ``kgcut`` drops the traffic
        both ways; the other hosts still reach Redis), or undo that."""
        if not cut:
            self.topo.run(server, ["nft", "delete", "table", "inet", "kgcut"], check=False)
            return
        redis = self.redis_address
        rules = (
            "table inet kgcut {\n"
            "  chain out { type filter hook output priority -5; "
            f"ip daddr {redis} tcp dport {REDIS_PORT} drop; }}\n"
            "  chain inbound { type filter hook input priority -5; "
            f"ip saddr {redis} tcp sport {REDIS_PORT} drop; }}\n"
            "}\n"
        )
        self.topo.run(server, ["nft", "-f", "-"], input=rules)

    def redis_raw(self, code: str) -> None:
        """Run ``code`` with ``r``, a redis-py client (replies as bytes) of the ACL user,
        in Redis's namespace: a writer of the fleet's keys."""
        setup = (
            "import redis\n"
            f"r = redis.Redis(host={self.redis_address!r}, port={REDIS_PORT}, "
            f"username='knockgate', password={PASSWORD!r})\n"
        )
        self.topo.run("other", [PYTHON, "-c", setup + code])

    # ----------------------------------------------------------------- addresses, knocks

    @property
    def redis_address(self) -> str:
        return self.topo.host("other").ipv4

    def address(self, host: str) -> str:
        return self.topo.host(host).ipv4

    def knock(self, client: str, server: str, *ports: str) -> None:
        self.cli(client, "knock", self.address(server), *ports)

    def cli(self, host: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.topo.run(
            host,
            [PYTHON, "-m", "appliance.cli", *args],
            cwd=str(REPO),
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    def spa_packet(self, client: str = "client") -> bytes:
        access = f"{self.address(client)},tcp/{SPA_OPENS}"
        return seal(
            new_message("alice", int(time.time()), access), SpaKeys.from_base64(self.key, self.hmac)
        )

    def send_udp(self, client: str, server: str, payload: bytes, port: int = SPA_PORT) -> None:
        code = (
            "import socket\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            f"s.sendto(bytes.fromhex({payload.hex()!r}),({self.address(server)!r},{port}))\n"
        )
        self.topo.run(client, [PYTHON, "-c", code])

    def state(self, client: str, server: str, port: int) -> str:
        return connect(self.topo, client, self.address(server), port, timeout=0.5)

    def wait_state(
        self, client: str, server: str, port: int, wanted: str = "open", timeout: float = 5.0
    ) -> str:
        deadline = time.monotonic() + timeout
        state = self.state(client, server, port)
        while state != wanted and time.monotonic() < deadline:
            time.sleep(0.05)
            state = self.state(client, server, port)
        return state
