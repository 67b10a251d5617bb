"""The ``knockgate`` command line.

Every user-caused failure is a :class:`KnockgateError`: printed as one line per
problem on stderr, exit status 2 for bad input (configuration, capture file,
arguments) and 1 when sending knocks fails. No traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

from appliance import __version__
from appliance.client import (
    next_one_time,
    parse_target,
    resolve_host,
    send_knocks,
    sequence_for_door,
    use_one_time,
)
from appliance.config import load_config
from appliance.config.export import to_yaml
from appliance.config.schema import Config
from appliance.core.events import Command, Record
from appliance.core.model import Door, Proto, Step
from appliance.errors import ConfigError, KnockError, KnockgateError
from appliance.knocker.wait import DEFAULT_TIMEOUT, STATUS_TIMED_OUT, PortStayedClosed
from appliance.logformat import clock, describe, json_line
from appliance.simulate import Summary, packets, replay

if TYPE_CHECKING:
    from appliance.config.schema import Settings
    from appliance.runtime.account import Account


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="knockgate", description="Port knocking, knockd-compatible, fail-closed."
    )
    parser.add_argument("--version", action="version", version=f"knockgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser("check", help="validate a configuration (YAML or knockd.conf)")
    check.add_argument("config", metavar="CONFIG")
    check.add_argument("--strict", action="store_true", help="treat warnings as errors")

    convert = commands.add_parser("import-knockd", help="print a knockd.conf as knockgate YAML")
    convert.add_argument("file", metavar="FILE")

    simulate = commands.add_parser(
        "simulate", help="replay a capture through the engine: what would open, for whom, when"
    )
    simulate.add_argument("--config", required=True, metavar="FILE")
    simulate.add_argument("--pcap", required=True, metavar="CAPTURE", help="pcap or pcapng file")
    simulate.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="ADDR",
        help="an address of the simulated host; packets to others are skipped (repeatable)",
    )
    simulate.add_argument("--json", action="store_true", help="JSON lines instead of text")

    run = commands.add_parser("run", help="the daemon: sniff knocks, open and close ports")
    run.add_argument(
        "--config", required=True, metavar="FILE", help="knockgate.yaml or knockd.conf"
    )
    run.add_argument(
        "--status-socket", metavar="PATH", help="override the status socket path of the config"
    )
    run.add_argument(
        "--state-dir", metavar="DIR", help="override the state directory (SPA replay cache)"
    )
    run.add_argument(
        "--launcher",
        metavar="SOCKET",
        help="reach Docker only through `knockgate launcher` at SOCKET (the appliance's "
        "privilege separation; without it, run uses Docker itself)",
    )
    run.add_argument(
        "--i-know",
        action="store_true",
        help="start even when this SSH session's port is protected and its address not allowed",
    )
    run.add_argument(
        "--packet-user",
        metavar="USER",
        help="the packet process's user (default: knockgate-packet if it exists, else nobody)",
    )
    run.add_argument(
        "--user",
        metavar="NAME",
        help="once the packet process runs, become NAME (not root) keeping only "
        "CAP_NET_ADMIN, CAP_NET_RAW and CAP_KILL (the appliance: knockgate); without it "
        "the daemon stays uid 0 with those capabilities (weaker)",
    )
    # The packet process, started by `run` (privilege separation); not for people.
    packet = commands.add_parser("packet")
    packet.add_argument("--fd", type=int, required=True)
    packet.add_argument("--user")

    launcher = commands.add_parser(
        "launcher",
        help="the only process that reaches Docker: serves the daemon's container requests",
    )
    launcher.add_argument("--config", required=True, metavar="FILE", help="its catalogue")
    launcher.add_argument("--socket", required=True, metavar="PATH", help="the socket to serve")
    launcher.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="USER",
        help="a user allowed to connect besides root and its own (knockgate run --user)",
    )

    status = commands.add_parser("status", help="ask the running daemon for its state")
    status.add_argument("--config", metavar="FILE", help="take the socket path from this config")
    status.add_argument("--socket", metavar="PATH", help="the daemon's status socket")
    status.add_argument("--json", action="store_true", help="print the raw JSON")

    events = commands.add_parser(
        "events", help="the running daemon's recent decisions (opened, closed, refused, ...)"
    )
    events.add_argument("--config", metavar="FILE", help="take the socket path from this config")
    events.add_argument("--socket", metavar="PATH", help="the daemon's status socket")
    events.add_argument("--follow", "-f", action="store_true", help="then print new ones live")
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.add_argument(
        "--last", type=int, default=1000, metavar="N", help="recent events first (default 1000)"
    )

    top = commands.add_parser(
        "top", help="a live dashboard of the running daemon: doors, grants, services, rates"
    )
    top.add_argument("--config", metavar="FILE", help="take the socket path from this config")
    top.add_argument("--socket", metavar="PATH", help="the daemon's status socket")
    top.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="seconds between refreshes (1)"
    )
    top.add_argument(
        "--once", action="store_true", help="print one frame (rates over --interval) and exit"
    )

    init = commands.add_parser(
        "init", help="write a first configuration with a random knock, unless one exists"
    )
    init.add_argument("--config", required=True, metavar="FILE")

    teardown = commands.add_parser(
        "teardown", help="remove knockgate's firewall rules and grants (opens protected ports)"
    )
    teardown.add_argument("--config", required=True, metavar="FILE")

    knock = commands.add_parser(
        "knock",
        help="send a knock sequence (accepts what knockd's knock accepts)",
        description="knockgate knock HOST PORT[:tcp|udp] ... | knockgate knock HOST --door NAME "
        "--config FILE",
    )
    knock.add_argument("host", metavar="HOST")
    knock.add_argument("ports", nargs="*", metavar="PORT[:proto]")
    knock.add_argument("-u", "--udp", action="store_true", help="UDP by default instead of TCP")
    knock.add_argument(
        "-d", "--delay", type=int, default=0, metavar="MS", help="milliseconds between knocks"
    )
    family = knock.add_mutually_exclusive_group()
    family.add_argument("-4", "--ipv4", action="store_const", const=4, dest="family")
    family.add_argument("-6", "--ipv6", action="store_const", const=6, dest="family")
    knock.add_argument("-v", "--verbose", action="store_true")
    knock.add_argument(
        "--door", metavar="NAME", help="take the sequence of this door (TOTP: computed now)"
    )
    knock.add_argument("--config", metavar="FILE", help="the configuration holding --door")
    knock.add_argument(
        "--one-time",
        metavar="FILE",
        help="send the next unused line of this knockd one-time-sequences file and mark it used",
    )
    knock.add_argument(
        "--key-file",
        metavar="FILE",
        help="SPA doors: the key file (its [NAME] stanza); the SPA packet is the knock",
    )
    knock.add_argument(
        "--dual-stack",
        action="store_true",
        help="SPA doors: let in this host's IPv4 and IPv6 addresses (one packet each)",
    )
    knock.add_argument(
        "--wait",
        action="store_true",
        help="then wait until the port accepts a TCP connection (progress on stderr; "
        "exit 3 when it does not open in time)",
    )
    knock.add_argument(
        "--port",
        type=int,
        dest="wait_port",
        metavar="PORT",
        help="the TCP port to wait for (default: the first TCP port the --door opens)",
    )
    knock.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help=f"how long --wait waits (default {DEFAULT_TIMEOUT:g})",
    )

    connect = commands.add_parser(
        "connect",
        help="knock a door, wait until PORT opens, relay stdin/stdout to it (ssh ProxyCommand)",
        description="knockgate connect HOST PORT --door NAME [--config FILE] [--key-file FILE]: "
        "for ~/.ssh/config: ProxyCommand knockgate connect %%h %%p --door ssh --config FILE. "
        "While the connection is open the grant is renewed before it ends. Errors on stderr; "
        "exit 3 when the port does not open in time.",
    )
    connect.add_argument("host", metavar="HOST")
    connect.add_argument("port", type=int, metavar="PORT")
    connect.add_argument("--door", required=True, metavar="NAME", help="the door to knock")
    connect.add_argument(
        "--config",
        default=os.environ.get("KNOCKGATE_CONFIG"),
        metavar="FILE",
        help="the client's copy of the configuration (default: $KNOCKGATE_CONFIG)",
    )
    connect.add_argument(
        "--key-file", metavar="FILE", help="SPA doors: the key file (its [NAME] stanza)"
    )
    connect.add_argument(
        "-f", "--fw-timeout", type=int, metavar="SECONDS", help="SPA doors: the access time"
    )
    connect.add_argument(
        "-d", "--delay", type=int, default=0, metavar="MS", help="milliseconds between knocks"
    )
    connect.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for PORT to open (default {DEFAULT_TIMEOUT:g})",
    )
    connect.add_argument(
        "--no-keepalive", action="store_true", help="do not renew the grant while connected"
    )
    connect.add_argument(
        "--dual-stack",
        action="store_true",
        help="SPA doors: let in this host's IPv4 and IPv6 addresses (one packet each)",
    )
    connect.add_argument(
        "-a",
        "--allow-ip",
        action="append",
        metavar="IP",
        help="SPA doors: an address to let in (repeat for several)",
    )
    connect_family = connect.add_mutually_exclusive_group()
    connect_family.add_argument("-4", "--ipv4", action="store_const", const=4, dest="family")
    connect_family.add_argument("-6", "--ipv6", action="store_const", const=6, dest="family")
    connect.add_argument(
        "-v", "--verbose", action="store_true", help="progress and each renewal on stderr"
    )

    spa = commands.add_parser(
        "spa",
        help="send a single packet authorization (fwknop's format) to open a door",
        description="knockgate spa HOST --door NAME --key-file FILE: the key file is fwknop's "
        "~/.fwknoprc format ([NAME] stanzas with KEY_BASE64, HMAC_KEY_BASE64, ACCESS, "
        "SPA_SERVER_PORT, ALLOW_IP, FW_TIMEOUT) or the output of `knockgate keygen`.",
    )
    spa.add_argument("host", metavar="HOST")
    spa.add_argument("--door", metavar="NAME", help="the key file's stanza (and config's door)")
    spa.add_argument("--key-file", required=True, metavar="FILE")
    spa.add_argument("--config", metavar="FILE", help="take port and ports from this door")
    spa.add_argument("--port", type=int, metavar="PORT", help="UDP port (default 62201)")
    spa.add_argument("-A", "--access", metavar="tcp/22,...", help="the ports to open")
    who = spa.add_mutually_exclusive_group()
    who.add_argument(
        "-a",
        "--allow-ip",
        action="append",
        metavar="IP",
        help="an address to let in (repeat for several: one packet each)",
    )
    who.add_argument(
        "-s", "--source", action="store_true", help="let in the address the packet comes from"
    )
    who.add_argument(
        "--dual-stack",
        action="store_true",
        help="let in this host's IPv4 and IPv6 addresses (one packet each)",
    )
    spa.add_argument(
        "--receipt",
        action="store_true",
        help="wait for the door's receipt and show it (exit 3 when none comes); implied "
        "by --config when the door has spa: {receipt: true}",
    )
    spa.add_argument(
        "--receipt-timeout", type=float, metavar="SECONDS", help="how long (default 2)"
    )
    spa.add_argument("-f", "--fw-timeout", type=int, metavar="SECONDS", help="access time")
    spa.add_argument("-U", "--user", metavar="NAME", help="the name inside the packet")
    spa_family = spa.add_mutually_exclusive_group()
    spa_family.add_argument("-4", "--ipv4", action="store_const", const=4, dest="family")
    spa_family.add_argument("-6", "--ipv6", action="store_const", const=6, dest="family")
    spa.add_argument("-v", "--verbose", action="store_true")

    default_config = os.environ.get("KNOCKGATE_CONFIG")
    config_help = "the configuration (default: $KNOCKGATE_CONFIG, as in the appliance)"

    show_knock = commands.add_parser(
        "show-knock", help="print each door's knock again: the commands a client types"
    )
    show_knock.add_argument("--config", default=default_config, metavar="FILE", help=config_help)
    show_knock.add_argument("--door", metavar="NAME", help="only this door")
    show_knock.add_argument(
        "--host", default="HOST", metavar="HOST", help="the server's name in the commands"
    )

    uninstall = commands.add_parser(
        "uninstall",
        help="remove knockgate's service containers, their volumes and its firewall "
        "(after docker compose down)",
    )
    uninstall.add_argument("--config", default=default_config, metavar="FILE", help=config_help)
    uninstall.add_argument(
        "--keep-volumes", action="store_true", help="keep the service containers' volumes"
    )

    edit = commands.add_parser(
        "config",
        help="show the configuration, or replace it with a checked one and reload",
        description="knockgate config show | knockgate config apply < NEW.yaml: apply checks "
        "the new file as `check` does, refuses it (exit 2, nothing changed) when invalid, "
        "else writes it and reloads the running appliance in place.",
    )
    edit.add_argument("action", choices=["show", "apply"])
    edit.add_argument("--config", default=default_config, metavar="FILE", help=config_help)
    edit.add_argument(
        "--from", dest="source", metavar="FILE", help="apply this file instead of stdin"
    )
    edit.add_argument(
        "--no-reload", action="store_true", help="write it only (reload later with SIGHUP)"
    )

    _user_parser(commands, default_config, config_help)

    keygen = commands.add_parser(
        "keygen", help="new SPA keys (fwknop --key-gen's format) or a TOTP secret"
    )
    keygen.add_argument("--totp", action="store_true", help="a base32 secret for knock: totp:")
    return parser


def _user_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    default_config: str | None,
    config_help: str,
) -> None:
    user = commands.add_parser(
        "user",
        help="provision clients: add (keys, reload, a client bundle), list, remove",
        description="knockgate user add NAME [--door DOOR ...] | user list | user remove NAME: "
        "users live in knockgate-users.yaml next to the configuration (never in the "
        "configuration itself); each change is checked, written atomically and reloads the "
        "running daemon.",
    )
    actions = user.add_subparsers(dest="user_action", required=True, metavar="ACTION")
    add = actions.add_parser(
        "add", help="new keys for NAME, reload, print the client bundle (it holds secrets)"
    )
    add.add_argument("name", metavar="NAME")
    add.add_argument(
        "--door",
        action="append",
        default=[],
        metavar="DOOR",
        help="a door NAME may open (repeatable; default: every SPA door)",
    )
    add.add_argument(
        "--host",
        metavar="HOST",
        help="the server as clients reach it (default: this machine's hostname)",
    )
    add.add_argument(
        "--output", metavar="FILE", help="write the bundle to FILE (mode 0600), not stdout"
    )
    listing = actions.add_parser("list", help="users, their doors and when added (no secrets)")
    remove = actions.add_parser("remove", help="delete NAME's keys and reload: refused at once")
    remove.add_argument("name", metavar="NAME")
    for parser in (add, listing, remove):
        parser.add_argument("--config", default=default_config, metavar="FILE", help=config_help)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            return _check(args.config, args.strict)
        if args.command == "import-knockd":
            return _import_knockd(args.file)
        if args.command == "simulate":
            return _simulate(args.config, args.pcap, args.host, args.json)
        if args.command == "knock":
            return _knock(args)
        if args.command == "connect":
            return _connect(args)
        if args.command == "run":
            return _run(
                args.config,
                args.i_know,
                args.status_socket,
                args.state_dir,
                args.packet_user,
                args.launcher,
                args.user,
            )
        if args.command == "launcher":
            return _launcher(args.config, args.socket, args.peer)
        if args.command == "packet":
            return _packet(args.fd, args.user)
        if args.command == "status":
            return _status(args.config, args.socket, args.json)
        if args.command == "events":
            return _events(args.config, args.socket, args.follow, args.json, args.last)
        if args.command == "top":
            return _top(args.config, args.socket, args.interval, args.once)
        if args.command == "teardown":
            return _teardown(args.config)
        if args.command == "init":
            return _init(args.config)
        if args.command == "spa":
            return _spa(args)
        if args.command == "keygen":
            return _keygen(args.totp)
        if args.command in ("show-knock", "uninstall", "config", "user") and not args.config:
            raise KnockgateError("no configuration: give --config FILE (or set KNOCKGATE_CONFIG)")
        if args.command == "show-knock":
            return _show_knock(args.config, args.door, args.host)
        if args.command == "uninstall":
            return _uninstall(args.config, args.keep_volumes)
        if args.command == "config":
            return _config(args.action, args.config, args.source, not args.no_reload)
        if args.command == "user":
            return _user(args)
    except PortStayedClosed as error:
        print(f"knockgate {args.command}: {error}", file=sys.stderr)
        return STATUS_TIMED_OUT
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return 2
    except KnockError as error:
        print(f"knockgate {args.command}: {error}", file=sys.stderr)
        return 1
    except KnockgateError as error:
        print(f"knockgate: {error}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command}")


def _check(path: str, strict: bool) -> int:
    """What ``run`` would refuse, refused the same way (one line per problem, exit 2)."""
    from appliance.runtime.preflight import preflight

    loaded = load_config(path)
    preflight(loaded)
    for warning in loaded.warnings:
        print(warning, file=sys.stderr)
    if strict and loaded.warnings:
        return 2
    config = loaded.config
    print(f"{path}: valid {config.format} configuration, {len(config.doors)} door(s)")
    return 0


def _import_knockd(path: str) -> int:
    loaded = load_config(path)
    if loaded.config.format != "knockd":
        raise ConfigError(
            [f"{path}:1: (file): this is knockgate YAML already (expected knockd.conf)"]
        )
    sys.stdout.write(to_yaml(loaded.config, loaded.warnings))
    return 0


def _simulate(config_path: str, capture: str, hosts: list[str], as_json: bool) -> int:
    loaded = load_config(config_path)
    for warning in loaded.warnings:
        print(warning, file=sys.stderr)

    def emit(command: Command | Record) -> None:
        if as_json:
            print(json_line(command))
            return
        line = describe(command)
        if line is not None:
            print(f"{clock(command.at)}  {line}")

    summary = Summary()
    replay(
        loaded.config,
        packets(capture, summary),
        emit,
        hosts=frozenset(hosts),
        summary=summary,
    )
    _print_summary(summary, as_json)
    return 0


def _print_summary(summary: Summary, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                {
                    "event": "Summary",
                    "frames": summary.frames,
                    "undecoded": summary.undecoded,
                    "skipped_destination": summary.skipped_destination,
                    "opened": len(summary.opened),
                }
            )
        )
        return
    print(
        f"summary: {summary.frames} frame(s), {summary.undecoded} not TCP/UDP over IP, "
        f"{summary.skipped_destination} to other hosts, {len(summary.opened)} door(s) opened"
    )
    for opened in summary.opened:
        print(f"  {clock(opened.at)}  {opened.door} opened for {opened.address}")


def _knock(args: argparse.Namespace) -> int:
    if (args.key_file is not None or args.dual_stack) and args.door is None:
        raise KnockError("--key-file and --dual-stack go with --door (an SPA door)")
    default_proto: Proto = "tcp"
    one_time: tuple[str, int] | None = None
    door: Door | None = None
    if args.one_time is not None:
        if args.ports or args.door is not None or args.config is not None:
            raise KnockError("--one-time takes the sequence from its file: no ports or --door")
        steps, line, offset = next_one_time(args.one_time)
        one_time = (args.one_time, offset)
        if args.verbose:
            print(f"one-time sequence from line {line} of {args.one_time}", flush=True)
    elif args.door is not None or args.config is not None:
        if args.door is None or args.config is None:
            raise KnockError("--door and --config go together")
        if args.ports:
            raise KnockError("give either ports or --door, not both")
        config = load_config(args.config).config
        door = config.door(args.door)
        if door is not None and door.spa is not None:
            if args.key_file is None:
                raise KnockError(
                    f"door {args.door!r} is opened by single packet authorization: give "
                    "--key-file FILE, or use knockgate spa (or fwknop)"
                )
            return _knock_spa(args, door)
        if args.key_file is not None or args.dual_stack:
            raise KnockError(f"--key-file and --dual-stack are for SPA doors; {args.door!r} is not")
        steps = sequence_for_door(config, args.door, time.time())
    else:
        if not args.ports:
            raise KnockError(
                "no ports given (expected PORT[:tcp|udp] ... or --door NAME --config FILE)"
            )
        steps = tuple(parse_target(spec, default_proto) for spec in args.ports)
    if args.udp:  # knock's -u makes every knock UDP, even PORT:tcp
        steps = tuple(Step(step.port, "udp") for step in steps)
    if args.delay < 0:
        raise KnockError("the delay cannot be negative")
    if not args.wait and (args.wait_port is not None or args.timeout is not None):
        raise KnockError("--port and --timeout go with --wait")
    wait_port = _wait_port(args, door) if args.wait else None
    timeout: float = DEFAULT_TIMEOUT if args.timeout is None else args.timeout
    family: Literal[4, 6] | None = args.family
    address_family, address = resolve_host(args.host, family)
    verbose = (lambda line: print(line, flush=True)) if args.verbose else None
    if one_time is not None:  # used before it is sent: a failed send burns it, never repeats it
        use_one_time(*one_time)
    send_knocks(address_family, address, steps, args.delay, verbose)
    if wait_port is not None:
        from appliance.knocker.wait import wait_open

        _progress(f"knock sent to {address}: {len(steps)} knock(s), waiting for port {wait_port}")
        sock, _ = wait_open(address_family, address, wait_port, timeout, _progress)
        sock.close()
    return 0


def _knock_spa(args: argparse.Namespace, door: Door) -> int:
    """``knock --door SPA-DOOR --key-file FILE``: the SPA packet(s), the door's receipts
    when it sends them, then ``--wait``."""
    from appliance.knocker.door import DoorKnocker, SpaRequest
    from appliance.knocker.spa import DEFAULT_RECEIPT_TIMEOUT
    from appliance.spa.keyfile import read_key_file

    assert door.spa is not None and door.open is not None
    if args.udp or args.one_time is not None:
        raise KnockError("-u and --one-time are not for SPA doors")
    if not args.wait and (args.wait_port is not None or args.timeout is not None):
        raise KnockError("--port and --timeout go with --wait")
    wait_port = _wait_port(args, door) if args.wait else None
    timeout: float = DEFAULT_TIMEOUT if args.timeout is None else args.timeout
    profile = read_key_file(args.key_file, door.name)
    access = ",".join(f"{step.proto}/{step.port}" for step in door.open.ports)
    request = SpaRequest(
        profile,
        door.spa.port,
        access,
        allow_ip=profile.allow_ip,
        fw_timeout=profile.fw_timeout,
        username=profile.username,
        dual_stack=args.dual_stack,
        host=args.host,
    )
    family: Literal[4, 6] | None = args.family
    address_family, address = resolve_host(args.host, family)
    knocker = DoorKnocker(door, address_family, address, spa=request, warn=_warn)
    sent = knocker.knock()
    if args.verbose or wait_port is not None:
        _progress(f"knock sent: {sent}")
    for line in knocker.receipts(DEFAULT_RECEIPT_TIMEOUT):
        _progress(line)
    if wait_port is not None:
        from appliance.knocker.wait import wait_open

        sock, _ = wait_open(address_family, address, wait_port, timeout, _progress)
        sock.close()
    return 0


def _warn(line: str) -> None:
    print(f"knockgate: {line}", file=sys.stderr, flush=True)


def _progress(line: str) -> None:
    print(f"knockgate: {line}", file=sys.stderr, flush=True)


def _wait_port(args: argparse.Namespace, door: Door | None) -> int:
    """The port --wait waits for: --port, else the first TCP port the door opens."""
    if args.timeout is not None and args.timeout <= 0:
        raise KnockError("--timeout must be more than 0 seconds")
    if args.wait_port is not None:
        if not 1 <= args.wait_port <= 65535:
            raise KnockError(f"--port {args.wait_port}: must be 1..65535")
        return int(args.wait_port)
    if door is None:
        raise KnockError("--wait needs --port PORT (or --door NAME --config FILE)")
    tcp = [step.port for step in (door.open.ports if door.open else ()) if step.proto == "tcp"]
    if not tcp:
        raise KnockError(f"door {door.name!r} opens no TCP port: give --port PORT to wait for")
    return tcp[0]


def _connect(args: argparse.Namespace) -> int:
    """Knock, wait until PORT accepts, relay stdin/stdout to it (renewing the grant)."""
    from appliance.knocker.door import DoorKnocker, SpaRequest
    from appliance.knocker.keepalive import Renewal
    from appliance.knocker.relay import relay
    from appliance.knocker.wait import wait_open

    if args.config is None:
        raise KnockError("no configuration: give --config FILE (or set KNOCKGATE_CONFIG)")
    if not 1 <= args.port <= 65535:
        raise KnockError(f"port {args.port}: must be 1..65535")
    if args.timeout <= 0:
        raise KnockError("--timeout must be more than 0 seconds")
    if args.delay < 0:
        raise KnockError("the delay cannot be negative")
    config = load_config(args.config).config
    door = config.door(args.door)
    if door is None:
        names = ", ".join(door.name for door in config.doors) or "none"
        raise KnockError(f"unknown door {args.door!r} in {args.config} (doors: {names})")
    opens = door.open.ports if door.open is not None else ()
    if opens and Step(args.port, "tcp") not in opens:
        listed = ", ".join(str(step) for step in opens)
        raise KnockError(
            f"door {args.door!r} opens {listed}, not {args.port}/tcp "
            "(for ssh: set Port in ~/.ssh/config to the door's port)"
        )
    spa: SpaRequest | None = None
    if door.spa is not None:
        from appliance.spa.keyfile import read_key_file

        if args.key_file is None:
            raise KnockError(f"door {args.door!r} is an SPA door: give --key-file FILE")
        profile = read_key_file(args.key_file, args.door)
        spa = SpaRequest(
            profile,
            door.spa.port,
            f"tcp/{args.port}",
            allow_ip=profile.allow_ip,
            fw_timeout=args.fw_timeout if args.fw_timeout is not None else profile.fw_timeout,
            username=profile.username,
            allow_ips=tuple(args.allow_ip or ()),
            dual_stack=args.dual_stack,
            host=args.host,
        )
    elif args.dual_stack or args.allow_ip:
        raise KnockError(f"--dual-stack and --allow-ip are for SPA doors; {args.door!r} is not")
    family: Literal[4, 6] | None = args.family
    address_family, address = resolve_host(args.host, family)
    knocker = DoorKnocker(
        door, address_family, address, spa=spa, delay_ms=args.delay, warn=_progress
    )
    say = _progress if args.verbose else (lambda line: None)
    sent = knocker.knock()
    knocked = time.monotonic()
    if sent is None:  # a TOTP door knocked a moment ago (another connect) uses its next step
        raise KnockError(f"door {args.door!r}: every TOTP time step is used, try again shortly")
    say(f"knock sent: {sent}")
    if knocker.has_receipts:
        from appliance.knocker.spa import DEFAULT_RECEIPT_TIMEOUT

        for line in knocker.receipts(min(DEFAULT_RECEIPT_TIMEOUT, args.timeout)):
            say(line)
    sock, _ = wait_open(address_family, address, args.port, args.timeout, say)
    renewal = None
    if not args.no_keepalive:
        renewal = Renewal(knocker.knock, knocker.grant, knocked, _progress, verbose=args.verbose)
    try:
        result = relay(sock, sys.stdin.fileno(), sys.stdout.fileno(), timer=renewal)
    finally:
        sock.close()
    if renewal is not None:
        say(f"{renewal.renewals} renewal(s) of a {knocker.grant:g} s grant")
    if result.error is not None:
        _progress(f"connection to {address} port {args.port} ended: {result.error}")
        return 1
    return 0


FRAGMENT_WARNING = 1200  # bytes of SPA payload: more may not fit a 1280-byte IPv6 path


def _spa(args: argparse.Namespace) -> int:
    from appliance.knocker.spa import (
        DEFAULT_RECEIPT_TIMEOUT,
        SpaRequest,
        describe,
        send_spa,
        wait_receipts,
    )
    from appliance.spa.keyfile import read_key_file

    profile = read_key_file(args.key_file, args.door)
    port, access = args.port, args.access
    receipt = args.receipt
    if args.config is not None:
        if args.door is None:
            raise KnockError("--config needs --door")
        config = load_config(args.config).config
        door = next((door for door in config.doors if door.name == args.door), None)
        if door is None or door.spa is None:
            raise KnockError(f"door {args.door!r} in {args.config} is not an SPA door")
        port = port or door.spa.port
        receipt = receipt or door.spa.receipt
        if access is None and door.open is not None:
            access = ",".join(f"{step.proto}/{step.port}" for step in door.open.ports)
    port = port or profile.port
    access = access or profile.access
    if not access:
        raise KnockError(
            "no ports to ask for (expected -A tcp/22, ACCESS in the key file, "
            "or --config with the door)"
        )
    timeout = DEFAULT_RECEIPT_TIMEOUT if args.receipt_timeout is None else args.receipt_timeout
    if not timeout > 0:
        raise KnockError("--receipt-timeout must be more than 0 seconds")
    family: Literal[4, 6] | None = args.family
    address_family, address = resolve_host(args.host, family)
    fw_timeout = args.fw_timeout if args.fw_timeout is not None else profile.fw_timeout
    request = SpaRequest(
        profile,
        port,
        access,
        allow_ip=None if args.allow_ip else profile.allow_ip,
        source=args.source,
        fw_timeout=fw_timeout,
        username=args.user or profile.username,
        allow_ips=tuple(args.allow_ip or ()),
        dual_stack=args.dual_stack,
        host=args.host,
    )
    sent = send_spa(address_family, address, request, time.time(), keep=receipt, warn=_warn)
    for one in sent:
        if one.size > FRAGMENT_WARNING:
            print(
                f"knockgate spa: warning: the packet is {one.size} bytes; on links with a "
                "small MTU it is fragmented and the server cannot read it (ask for fewer "
                "ports)",
                file=sys.stderr,
            )
        if args.verbose:
            print(
                f"SPA to {address} port {port}/udp from {one.sent_from}: open {access} for "
                f"{one.allow}"
                + (f" for {fw_timeout} s" if fw_timeout else "")
                + f" ({one.size} bytes)",
                flush=True,
            )
    if not receipt:
        return 0
    missing = 0
    for one, found in zip(sent, wait_receipts(sent, profile.keys, timeout), strict=True):
        if found is None:
            missing += 1
            print(
                f"knockgate spa: no receipt for {one.allow} within {timeout:g} s: refused, "
                "lost, or the door does not send receipts (see the server's log)",
                file=sys.stderr,
            )
        else:
            print(f"receipt: {describe(found)}", flush=True)
    return STATUS_TIMED_OUT if missing else 0


def _keygen(totp: bool) -> int:
    import base64
    import secrets

    if totp:
        print(base64.b32encode(secrets.token_bytes(20)).decode())
        return 0
    from appliance.spa.keyfile import format_keys, generate_keys

    print(format_keys(*generate_keys()), end="")
    return 0


def _launcher(config: str, socket_path: str, peers: Sequence[str] = ()) -> int:
    import pwd

    from appliance.config.schema import LogSettings
    from appliance.runtime.logs import configure
    from appliance.services.broker import serve

    uids = []
    for name in peers:
        try:
            uids.append(pwd.getpwnam(name).pw_uid)
        except KeyError:
            raise KnockgateError(f"--peer {name}: no such user") from None
    configure(LogSettings())
    return serve(config, socket_path, uids)


def _packet(fd: int, user: str | None) -> int:
    import pwd

    from appliance.capture.worker import main as packet_main

    if user is None:
        return packet_main(fd, None, None)
    entry = pwd.getpwnam(user)
    return packet_main(fd, entry.pw_uid, entry.pw_gid)


def _run(
    path: str,
    i_know: bool,
    status_socket: str | None,
    state_dir: str | None,
    packet_user: str | None = None,
    launcher_socket: str | None = None,
    user: str | None = None,
) -> int:
    import os
    import signal

    # A SIGHUP while starting (Compose's `kill -s HUP` right after `up`) would end the
    # process by default: it is remembered and becomes a reload once the loop runs.
    early_hup: list[int] = []
    signal.signal(signal.SIGHUP, lambda *_: early_hup.append(1))

    from appliance.firewall.choose import choose_backend
    from appliance.runtime.daemon import Daemon, Overrides, ssh_lockout
    from appliance.runtime.items import Signal
    from appliance.runtime.logs import configure
    from appliance.runtime.preflight import command_line, preflight

    overrides = Overrides(status_socket=status_socket, state_dir=state_dir)
    loaded = overrides.apply(load_config(path))
    # Before anything is touched (log, firewall, state, socket): what check refuses.
    preflight(loaded, overridden=command_line(status_socket=status_socket, state_dir=state_dir))
    from appliance.runtime.account import account

    monitor: Account | None = None
    if user is not None:
        if os.geteuid() != 0:
            raise KnockgateError(f"--user {user}: only root can become another user")
        monitor = account(user)  # a clear error now, before anything is touched
    settings = loaded.config.settings
    configure(settings.log)
    log = logging.getLogger("knockgate")
    for warning in loaded.warnings:
        log.warning("%s", warning)
    reason = ssh_lockout(loaded.config, dict(os.environ))
    if reason is not None and not i_know:
        print(f"knockgate run: refusing to start: {reason}", file=sys.stderr)
        return 2
    backend = choose_backend(settings.firewall.backend)
    from appliance.config.schema import Service
    from appliance.services.docker_runtime import DockerRuntime
    from appliance.services.launcher import ServiceLauncher
    from appliance.services.remote import RemoteRuntime
    from appliance.services.runtime import ContainerRuntime, owner_of

    owner = owner_of(path)
    if launcher_socket is not None:
        log.info("containers through the launcher at %s", launcher_socket)

    def launchers(services: tuple[Service, ...]) -> ServiceLauncher:
        runtime: ContainerRuntime = (
            DockerRuntime() if launcher_socket is None else RemoteRuntime(launcher_socket)
        )
        return ServiceLauncher(runtime, services, owner)

    import functools

    from appliance.runtime.privsep import packet_user as find_packet_user
    from appliance.runtime.privsep import spawn
    from appliance.services.discovery import DockerLabelSource, LabelSource
    from appliance.services.docker_runtime import docker_present

    if os.geteuid() == 0:
        find_packet_user(packet_user)  # a clear error now, before anything is touched
    # Label-gated containers are followed wherever Docker runs (its socket is there), or
    # through the launcher.
    labels: LabelSource | None
    if launcher_socket is not None:
        labels = RemoteRuntime(launcher_socket)
    else:
        labels = DockerLabelSource() if docker_present() else None
    wanted = loaded.config.services or labels is not None
    launcher = launchers(loaded.config.services) if wanted else None
    daemon = Daemon(
        loaded,
        backend,
        launcher=launcher,
        launchers=launchers,
        overrides=overrides,
        labels=labels,
        packets=functools.partial(spawn, packet_user),
        confine=_confinement(monitor, settings),
    )
    daemon.install_signal_handlers()
    if early_hup:
        daemon.enqueue(Signal("reload"))
    if settings.pid_file:
        with open(settings.pid_file, "w") as handle:
            handle.write(f"{os.getpid()}\n")
    try:
        daemon.start()
        daemon.run()
    finally:
        if settings.pid_file:
            with contextlib.suppress(OSError):
                os.unlink(settings.pid_file)
    return daemon.exit_status


def _confinement(monitor: Account | None, settings: Settings) -> Callable[[], None] | None:
    """What ``run`` does once the packet process runs: become ``monitor`` (--user) with
    NET_ADMIN, NET_RAW and KILL; as root without it, stay uid 0 with only those."""
    import functools
    import os

    from appliance.runtime import account, caps

    if monitor is not None:
        return functools.partial(account.become, monitor, settings)
    if os.geteuid() == 0:
        return functools.partial(caps.keep_only, caps.MONITOR)
    return None


def _events(
    config: str | None, socket_path: str | None, follow: bool, as_json: bool, last: int
) -> int:
    from appliance.runtime.events_log import EventRecord
    from appliance.runtime.status import events

    if last < 0:
        raise KnockgateError("events --last: expected 0 or more")
    try:
        for record in events(_status_socket(config, socket_path), follow=follow, history=last):
            if as_json:
                print(json.dumps(record), flush=True)
            else:
                print(EventRecord.from_dict(record).text(), flush=True)
            if record.get("kind") == "dropped":
                return 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `knockgate events | head`
        return 0
    return 0


def _status_socket(config: str | None, socket_path: str | None) -> str:
    """The status socket: ``--socket``, else the one ``--config`` names, else the default."""
    from appliance.config.schema import DEFAULT_STATUS_SOCKET

    if socket_path is not None:
        return socket_path
    return load_config(config).config.settings.status_socket if config else DEFAULT_STATUS_SOCKET


def _top(config: str | None, socket_path: str | None, interval: float, once: bool) -> int:
    from appliance.console.top import run  # rich: loaded only for this command

    if not 0.1 <= interval <= 3600:
        raise KnockgateError(f"top --interval: expected 0.1 to 3600 seconds, not {interval:g}")
    return run(_status_socket(config, socket_path), interval, once)


def _status(config: str | None, socket_path: str | None, as_json: bool) -> int:
    from appliance.runtime.status import fleet_lines, notification_lines, query

    data = query(_status_socket(config, socket_path))
    if as_json:
        print(json.dumps(data, indent=2))
        return 0 if "error" not in data else 1
    if "error" in data:
        print(f"knockgate status: {data['error']}", file=sys.stderr)
        return 1
    print(
        f"knockgate pid {data['pid']}, up {data['uptime']} s, {data['config']}, "
        f"firewall {data['backend']}"
    )
    print("capturing on: " + (", ".join(data.get("interfaces", [])) or "(no interface)"))
    packet = data.get("packet_process")
    if isinstance(packet, dict):
        print(f"packet process: pid {packet.get('pid')}, user {packet.get('user')}")
    print("doors:")
    for door in data["doors"]:
        kind = door.get("knock", "sequence")
        how = kind if kind.startswith("spa") else f"{door['steps']}-step {kind}"
        does = [f"opens {', '.join(door['open'])}"] if door["open"] else []
        if door.get("closes"):
            does.append(f"closes {', '.join(door['closes'])} (the knocker's grants)")
        print(f"  {door['name']}: {how}, " + ("; ".join(does) or "opens (commands only)"))
    print(f"open grants: {len(data['grants'])}")
    for grant in data["grants"]:
        print(f"  {grant.get('address')} {grant.get('port')} for {grant.get('expires_in')} s")
    services = data.get("services", [])
    if services:
        print("services:")
    for service in services:
        up = f"up {service.get('uptime')} s, " if service.get("running", True) else ""
        state, grants = service.get("state", "?"), service.get("grants")
        print(f"  {service['name']}: {state}, {up}{grants} grant(s)")
    gated = data.get("gated", [])
    if gated:
        print("label-gated containers:")
    for row in gated:
        ports = ", ".join(row.get("ports") or []) or "no port"
        door = row.get("door") or "(group member, no door)"
        unit = f" [{row['unit']}]" if (row.get("unit") or "").startswith("group ") else ""
        how = ", start on knock" if row.get("start_on_knock") else ""
        print(
            f"  {row['name']}: door {door}, {ports}, {row.get('state')} "
            f"(docker: {row.get('docker')}){how}, {row.get('grants', 0)} grant(s){unit}"
        )
        for problem in row.get("problems") or []:
            print(f"    problem: {problem}")
    for line in fleet_lines(data.get("fleet")) + notification_lines(data.get("notifications")):
        print(line)
    print(f"attempts in progress: {data['attempts']}")
    print("counters: " + ", ".join(f"{k} {v}" for k, v in data["counters"].items()))
    return 0


def _init(path: str) -> int:
    import os

    from appliance.config.initial import initial_config

    if os.path.exists(path):
        load_config(path)  # an existing config must be valid; never overwritten
        print(f"knockgate: using {path}")
        return 0
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    text = initial_config(os.path.join(os.path.dirname(path) or ".", "ssh-keys"))
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    from appliance.provision.modes import share_with_group

    share_with_group(descriptor, os.path.dirname(path) or ".")  # the directory's config group
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    door = load_config(path).config.door("ssh")
    assert door is not None  # the initial configuration has it
    steps = " ".join(f"{s.port}:{s.proto}" for s in door.knock.sequence)
    print(f"knockgate: wrote {path} with a new random knock sequence.")
    print(f"knockgate: knock with:  knockgate knock HOST --door ssh --config {path}")
    print(f"knockgate:          or:  knock HOST {steps}")
    print("knockgate: then:  ssh -p 2222 root@HOST  (keys: ssh-keys/authorized_keys)")
    return 0


def _teardown(path: str) -> int:
    from appliance.firewall.choose import choose_backend

    backend = choose_backend(load_config(path).config.settings.firewall.backend)
    backend.teardown()
    print(f"knockgate: {backend.name} rules and grants removed")
    return 0


def _show_knock(path: str, door_name: str | None, host: str) -> int:
    from appliance.show_knock import show_door, show_knocks

    config = load_config(path).config
    if door_name is None:
        lines = show_knocks(config, path, host)
    else:
        door = config.door(door_name)
        if door is None:
            names = ", ".join(door.name for door in config.doors)
            raise KnockgateError(f"no door {door_name!r} in {path} (doors: {names})")
        lines = show_door(door, path, host)
    print("\n".join(lines))
    return 0


def _uninstall(path: str, keep_volumes: bool) -> int:
    from appliance.uninstall import (
        DockerEngine,
        UninstallError,
        host_firewalls,
        owner_of,
        uninstall,
    )

    try:
        report = uninstall(DockerEngine(), host_firewalls(), owner_of(path), keep_volumes)
    except UninstallError as error:
        print(f"knockgate uninstall: {error}", file=sys.stderr)
        return 1
    for line in report:
        print(f"knockgate: {line}")
    print("knockgate: now `docker compose down -v` removes the appliance and its volumes")
    return 0


def _config(action: str, path: str, source: str | None, reload: bool) -> int:
    from appliance.runtime.preflight import preflight

    if action == "show":
        try:
            with open(path, encoding="utf-8") as handle:
                sys.stdout.write(handle.read())
        except OSError as error:
            raise ConfigError([f"{path}: cannot read it: {error.strerror}"]) from None
        return 0
    if source is None:
        text = sys.stdin.read()
    else:
        try:
            with open(source, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as error:
            raise ConfigError([f"{source}: cannot read it: {error.strerror}"]) from None
    # Checked under a name next to the real one (relative paths resolve alike), then moved
    # over it; a bind-mounted file (rename refused) is rewritten in place.
    candidate = f"{path}.new"
    try:
        descriptor = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as error:
        raise ConfigError([f"{candidate}: cannot write it: {error.strerror}"]) from None
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        loaded = load_config(candidate)
        preflight(loaded)
        for warning in loaded.warnings:
            print(warning, file=sys.stderr)
        # 0600, but a group that is not root's (the appliance's launcher reads its catalogue
        # through it) keeps its group read.
        with contextlib.suppress(OSError):
            current = os.stat(path)
            if current.st_gid != 0 and current.st_mode & 0o040:
                os.chown(candidate, -1, current.st_gid)
                os.chmod(candidate, 0o640)
        try:
            os.replace(candidate, path)
        except OSError:
            try:
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write(text)
            except OSError as error:
                raise ConfigError([f"{path}: cannot write it: {error.strerror}"]) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(candidate)
    doors = len(loaded.config.doors)
    print(f"knockgate: {path} replaced: valid, {doors} door(s)")
    if not reload:
        print("knockgate: reload with: docker compose kill -s HUP knockgate")
        return 0
    from appliance.provision.reload import request_appliance_reload

    if request_appliance_reload():
        print("knockgate: reload requested (docker compose logs knockgate: configuration reloaded)")
    else:
        print("knockgate: no appliance here; reload with: docker compose kill -s HUP knockgate")
    return 0


def _user(args: argparse.Namespace) -> int:
    from appliance.provision.users import list_users, remove_user

    if args.user_action == "add":
        return _user_add(args.config, args.name, args.door, args.host, args.output)
    if args.user_action == "list":
        rows = list_users(args.config)
        if not rows:
            print(f"knockgate: no users (add one: knockgate user add NAME --config {args.config})")
        for row in rows:
            where = "" if row.managed else "  (in the configuration)"
            print(f"{row.name}  doors: {', '.join(row.doors)}  added: {row.created}{where}")
        return 0
    change = remove_user(args.config, args.name)
    print(f"knockgate: user {args.name} removed from {change.users_file}", file=sys.stderr)
    shared = [entry.door for entry in change.user.doors if entry.key is None]
    if shared:
        print(
            f"knockgate: door(s) {', '.join(shared)} use a shared knock (TOTP or sequence) "
            f"that {args.name} still knows: change it to shut {args.name} out there",
            file=sys.stderr,
        )
    return _user_reload(change.loaded.config, removed=args.name)


def _user_reload(config: Config, removed: str | None = None) -> int:
    from appliance.provision.reload import reload_daemon

    result = reload_daemon(config)
    print(f"knockgate: {result.message}", file=sys.stderr)
    if result.outcome not in ("refused", "unconfirmed"):
        return 0
    if removed is not None:
        print(
            f"knockgate: {removed}'s keys work in the running daemon until a reload succeeds",
            file=sys.stderr,
        )
    return 1


def _user_add(path: str, name: str, doors: list[str], host: str | None, output: str | None) -> int:
    import datetime
    import socket

    from appliance.provision.bundle import render_bundle
    from appliance.provision.users import add_user

    named = host is not None
    host = host or socket.gethostname()
    made = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    handle = None
    if output is not None:  # opened first: a bad path changes nothing (nor does a refusal)
        existed = os.path.lexists(output)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC  # emptied on success
            descriptor = os.open(output, flags, 0o600)
            os.fchmod(descriptor, 0o600)
        except OSError as error:
            raise KnockgateError(f"--output {output}: cannot write it: {error.strerror}") from None
        handle = os.fdopen(descriptor, "w", encoding="utf-8")
    try:
        change = add_user(path, name, doors, made)
    except BaseException:
        if handle is not None:
            handle.close()
            if not existed:
                os.unlink(output)  # type: ignore[arg-type]
        raise
    config = change.loaded.config
    chosen = [door for entry in change.user.doors if (door := config.door(entry.door))]
    text = render_bundle(host, change.user, chosen, made)
    listed = ", ".join(entry.door for entry in change.user.doors)
    print(f"knockgate: user {name} added (doors: {listed}) to {change.users_file}", file=sys.stderr)
    status = _user_reload(config)
    if handle is not None:
        with handle:
            handle.truncate(0)
            handle.write(text)
        print(
            f"knockgate: client bundle written to {output} (mode 0600: it holds {name}'s "
            "secrets; hand it over privately, then delete it)",
            file=sys.stderr,
        )
    else:
        sys.stdout.write(text)
        print(f"knockgate: the bundle above holds {name}'s secrets", file=sys.stderr)
    if not named:
        print(f"knockgate: the bundle calls the server {host} (--host NAME)", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
