"""``knockgate show-knock``: each door's knock again, as the commands a client types.

Pure: a :class:`Config` in, text lines out. Secrets (TOTP secrets, SPA keys) are never
printed: a TOTP or SPA door says which client command opens it and what it needs.
"""

from __future__ import annotations

from appliance.config.schema import Config
from appliance.core.model import Door


def show_knocks(config: Config, config_path: str, host: str = "HOST") -> list[str]:
    return [line for door in config.doors for line in show_door(door, config_path, host)]


def _what_it_does(door: Door) -> str:
    if door.close:
        return "closes " + ", ".join(door.close)
    if door.open is not None:
        ports = ", ".join(map(str, door.open.ports))
        opens = f"opens {ports} for {door.open.duration:g} s"
        return opens if door.service is None else f"starts service {door.service} and {opens}"
    return "runs its commands"


def show_door(door: Door, config_path: str, host: str = "HOST") -> list[str]:
    lines = [f"door {door.name}: {_what_it_does(door)}"]
    by_config = f"knockgate knock {host} --door {door.name} --config {config_path}"
    knock = door.knock
    if door.spa is not None:
        lines.append(f"  single packet authorization on {door.spa.port}/udp (fwknop's format):")
        lines.append(
            f"    knockgate spa {host} --door {door.name} --key-file KEYS --config {config_path}"
        )
        users = ", ".join(user.name for user in door.spa.users)
        lines.append(f"    or: fwknop -n {door.name} {host}   (keys of user(s) {users})")
    elif knock.one_time is not None:
        lines.append(f"  one-time sequences from {knock.one_time.path} (each line used once):")
        lines.append(f"    knockgate knock {host} --one-time COPY_OF_THAT_FILE")
    elif knock.totp is not None:
        totp = knock.totp
        lines.append(
            f"  TOTP: {totp.steps} {totp.proto} ports in {totp.low}-{totp.high}, new every "
            f"{totp.period} s (the secret is in the config, never shown):"
        )
        lines.append(f"    {by_config}")
    else:
        steps = " ".join(f"{step.port}:{step.proto}" for step in knock.sequence)
        lines.append(f"  sequence {steps} within {knock.seq_timeout:g} s:")
        lines.append(f"    {by_config}")
        lines.append(f"    or: knock {host} {steps}")
    return lines
