"""The first-start configuration: a fresh random knock sequence, never a shipped one."""

from __future__ import annotations

import secrets
from itertools import pairwise

from appliance.core.model import Proto

FIRST_PORT, LAST_PORT = 1024, 65535
RESERVED = {2222, 2525, 8080}  # the bundled services' host ports
# Linux's default ip_local_port_range: the host's own outgoing connections use these as
# source ports, so replies to them and knocks would share ports. Knocks never use them.
EPHEMERAL = range(32768, 61000)


def random_sequence(steps: int = 4, avoid: set[int] = RESERVED) -> list[tuple[int, Proto]]:
    """Distinct random ports in mixed order (never monotonic), TCP and UDP mixed."""
    while True:
        ports: list[int] = []
        while len(ports) < steps:
            port = FIRST_PORT + secrets.randbelow(LAST_PORT - FIRST_PORT + 1)
            if port not in avoid and port not in EPHEMERAL and port not in ports:
                ports.append(port)
        pairs = list(pairwise(ports))
        if not (all(a < b for a, b in pairs) or all(a > b for a, b in pairs)):
            break
    protos: list[Proto] = ["tcp" if secrets.randbelow(2) else "udp" for _ in ports]
    protos[0] = "tcp"
    return list(zip(ports, protos, strict=True))


def initial_config(ssh_keys_dir: str = "/etc/knockgate/ssh-keys") -> str:
    """knockgate.yaml for the appliance: an ``ssh`` service door with a random knock."""
    steps = random_sequence()
    sequence = ", ".join(f"{port}/{proto}" for port, proto in steps)
    knock_args = " ".join(f"{port}:{proto}" for port, proto in steps)
    close = ", ".join(f"{port}/{proto}" for port, proto in reversed(random_sequence()))
    return f"""\
# knockgate configuration, written at first start with a freshly generated knock.
# Knock with:  knockgate knock HOST --door ssh --config THIS_FILE
# (or knockd's client: knock HOST {knock_args})
log: {{format: text, level: info}}
firewall:
  backend: auto
  scan: {{ports: 10, window: 2, hold: 60}}
services:
  ssh:
    build: /opt/knockgate/services/ssh
    image: knockgate/ssh:local
    container_port: 22
    host_port: 2222
    volumes:
      - knockgate-ssh-keys:/keys:ro          # put authorized_keys in {ssh_keys_dir}
      - knockgate-ssh-hostkeys:/etc/ssh/hostkeys
    ready: {{banner: "SSH-", timeout: 20}}
    idle_timeout: 300
    max_lifetime: 28800
doors:
  ssh:
    knock: {{sequence: [{sequence}], seq_timeout: 10, tcpflags: "syn,!ack"}}
    service: {{name: ssh, duration: 60}}
  ssh-close:
    knock: {{sequence: [{close}], seq_timeout: 10, tcpflags: "syn,!ack"}}
    close: [ssh]
"""
