"""The ``knockgate`` command line.

Every user-caused failure is a :class:`KnockgateError`: printed as one line per
problem on stderr, exit status 2 for bad input (configuration, capture file,
arguments) and 1 when sending knocks fails. No traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Literal

from appliance import __version__
from appliance.client import parse_target, resolve_host, send_knocks, sequence_for_door
from appliance.config import load_config
from appliance.config.export import to_yaml
from appliance.core.events import Command
from appliance.core.model import Proto, Step
from appliance.errors import ConfigError, KnockError, KnockgateError
from appliance.logformat import clock, describe, json_line
from appliance.simulate import Summary, packets, replay


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
    knock.add_argument("--door", metavar="NAME", help="take the sequence of this door")
    knock.add_argument("--config", metavar="FILE", help="the configuration holding --door")
    return parser


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
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return 2
    except KnockError as error:
        print(f"knockgate knock: {error}", file=sys.stderr)
        return 1
    except KnockgateError as error:
        print(f"knockgate: {error}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command}")


def _check(path: str, strict: bool) -> int:
    loaded = load_config(path)
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

    def emit(command: Command) -> None:
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
    default_proto: Proto = "tcp"
    if args.door is not None or args.config is not None:
        if args.door is None or args.config is None:
            raise KnockError("--door and --config go together")
        if args.ports:
            raise KnockError("give either ports or --door, not both")
        steps: tuple[Step, ...] = sequence_for_door(load_config(args.config).config, args.door)
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
    family: Literal[4, 6] | None = args.family
    address_family, address = resolve_host(args.host, family)
    verbose = (lambda line: print(line, flush=True)) if args.verbose else None
    send_knocks(address_family, address, steps, args.delay, verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
