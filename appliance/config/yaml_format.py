"""Reads knockgate's native YAML configuration into the model.

The YAML is composed into nodes (not loaded into plain dicts) so that every
problem can name its line, duplicate keys are caught (PyYAML silently keeps the
last) and unknown keys are reported with what was expected. Schema::

    interfaces: [eth0]            # or a single name
    log: {file: PATH, syslog: false, format: text|json, level: info}
    pid_file: PATH
    max_attempts: 100000
    duplicates: ignore|reset      # default for every door
    doors:
      NAME:
        knock:
          sequence: [7113/tcp, 2231/udp, 9157]   # or one_time_sequences: FILE, or totp:
          seq_timeout: 5          # seconds, fractions allowed
          tcpflags: syn,!ack
          target: 198.18.0.1
          duplicates: ignore|reset
        open: {ports: [22/tcp], duration: 30}
        close: [OTHER_DOOR, ...]
        start_command / start_command_6 / stop_command / stop_command_6: "... %IP% ..."
        cmd_timeout: 10
        service: NAME or {name: NAME, duration: 30}   # a container from services:
        spa: {...}                # instead of knock: single packet authorization
    state_dir: /var/lib/knockgate # the SPA replay cache and used TOTP steps
    notify: {NAME: {webhook|chat|mail: {...}, events: [...]}}   # yaml_notify
    services: {NAME: {image: ..., container_port: 22, host_port: 2222, ...}}
    fleet: {name: prod, redis: redis://USER@HOST:PORT/0, ...}   # yaml_fleet

TOTP and SPA are read by :mod:`appliance.config.yaml_auth`, ``notify:`` by
:mod:`appliance.config.yaml_notify`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

from yaml.nodes import MappingNode, Node

from appliance.config.lint import lint_scan, lint_seq_timeout, lint_sequence
from appliance.config.listen import is_remote, parse_listen
from appliance.config.onetime import read_one_time_file
from appliance.config.problems import Problems
from appliance.config.schema import (
    DEFAULT_STATE_DIR,
    DEFAULT_STATUS_SOCKET,
    Config,
    FirewallSettings,
    LogSettings,
    MetricsSettings,
    Readiness,
    ScanPolicy,
    Service,
    Settings,
)
from appliance.config.values import (
    Invalid,
    listed,
    parse_address,
    parse_bool,
    parse_count,
    parse_door_name,
    parse_interface,
    parse_network,
    parse_port,
    parse_proto,
    parse_seconds,
    parse_sequence,
    parse_tcpflags,
    shown,
    split_flags,
)
from appliance.config.yaml_auth import check_spa_ports, parse_spa, parse_totp
from appliance.config.yaml_fleet import door_fleet, parse_fleet
from appliance.config.yaml_nodes import (
    _choice,
    _line,
    _list_of,
    _Map,
    _string,
    compose,
)
from appliance.config.yaml_notify import parse_notify
from appliance.core.model import (
    DEFAULT_CMD_TIMEOUT,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_OPEN_DURATION,
    DEFAULT_SEQ_TIMEOUT,
    Commands,
    Door,
    DuplicatePolicy,
    Knock,
    OneTimeFile,
    OpenPorts,
    Origin,
    Proto,
    Step,
    TcpFlags,
    Totp,
)

TOP_KEYS = (
    "interfaces",
    "log",
    "pid_file",
    "max_attempts",
    "duplicates",
    "firewall",
    "on_shutdown",
    "status_socket",
    "state_dir",
    "metrics",
    "notify",
    "services",
    "doors",
    "fleet",  # appliance.config.yaml_fleet
)
SERVICE_KEYS = (
    "image",
    "build",
    "container_port",
    "host_port",
    "protocol",
    "environment",
    "volumes",
    "command",
    "ready",
    "idle_timeout",
    "max_lifetime",
    "keep_warm",
    "on_shutdown",
)
READY_KEYS = ("tcp", "banner", "http", "healthcheck", "timeout")
DOOR_SERVICE_KEYS = ("name", "duration")
FIREWALL_KEYS = ("backend", "always_allow", "scan")
SCAN_KEYS = ("ports", "window", "hold")
LOG_KEYS = ("file", "syslog", "format", "level")
METRICS_KEYS = ("listen", "allow_remote")
DOOR_KEYS = (
    "knock",
    "open",
    "close",
    "start_command",
    "start_command_6",
    "stop_command",
    "stop_command_6",
    "cmd_timeout",
    "service",
    "spa",
    "description",
    "fleet",  # appliance.config.yaml_fleet
)
KNOCK_KEYS = (
    "sequence",
    "one_time_sequences",
    "totp",
    "seq_timeout",
    "tcpflags",
    "target",
    "duplicates",
)
OPEN_KEYS = ("ports", "duration")
SECONDS_LIMIT = 86_400.0
MAX_OPEN_DURATION = 7 * 86_400.0


def parse_yaml(text: str, path: str, problems: Problems) -> Config | None:
    root = compose(text, problems)
    if root is None:
        if not problems.error_count:
            problems.error(1, "(top)", "the file is empty (expected a mapping with doors)")
        return None
    if not isinstance(root, MappingNode):
        problems.error(_line(root), "(top)", "expected a mapping with doors at the top level")
        return None
    top = _Map(root, "", TOP_KEYS, problems)
    settings = _settings(top, path)
    default_duplicates: DuplicatePolicy = (
        "reset" if top.get("duplicates", _choice("ignore", "reset")) == "reset" else "ignore"
    )
    services = _services(top, path, problems)
    doors: list[Door] = []
    doors_map = top.mapping("doors", ())
    problems.place("doors", top.line_of("doors"), "doors")
    if doors_map is None:
        if "doors" not in top.items:
            problems.error(top.line, "doors", "missing (expected a mapping of door names to doors)")
    else:
        names = tuple(doors_map.items)
        for name, (node, line) in doors_map.items.items():
            door = _door(name, node, line, default_duplicates, names, services, path, problems)
            if door is not None:
                doors.append(door)
        if not doors_map.items:
            problems.error(doors_map.line, "doors", "no door is defined (expected at least one)")
    if doors_map is not None:
        check_spa_ports(
            doors, {name: line for name, (_, line) in doors_map.items.items()}, problems
        )
    # The fleet (issue 14): the group's settings, then the doors' own fleet keys.
    fleet = parse_fleet(top)
    if fleet is not None:
        local, start = door_fleet(doors_map, problems)
        settings = dataclasses.replace(
            settings,
            fleet=dataclasses.replace(fleet, local_doors=local, start_services=start),
        )
    if problems.error_count:
        return None
    lint_scan(doors, settings.firewall.scan, _open_lines(doors_map), problems)
    return Config(path, "yaml", settings, tuple(doors), tuple(services.values()))


def _open_lines(doors: _Map | None) -> dict[str, int]:
    """The line of each door's ``open:`` (of the door when it has none)."""
    lines: dict[str, int] = {}
    for name, (node, line) in (doors.items if doors else {}).items():
        lines[name] = line
        if isinstance(node, MappingNode):
            for key_node, _ in node.value:
                if getattr(key_node, "value", None) == "open":
                    lines[name] = _line(key_node)
    return lines


def _settings(top: _Map, path: str) -> Settings:
    problems = top.problems
    for key in ("pid_file", "status_socket", "state_dir"):
        if key in top.items:
            problems.place(key, top.line_of(key), key)
    interfaces = top.get("interfaces", _list_of(parse_interface)) or ()
    pid_file = top.get("pid_file", _string)
    max_attempts = top.get("max_attempts", lambda v: parse_count(v, minimum=1, maximum=10_000_000))
    log = LogSettings()
    log_map = top.mapping("log", LOG_KEYS)
    if log_map is not None:
        if "file" in log_map.items:
            problems.place("log.file", log_map.line_of("file"), log_map.key("file"))
        log = LogSettings(
            file=log_map.get("file", _string),
            syslog=bool(log_map.get("syslog", parse_bool)),
            format=log_map.get("format", _choice("text", "json")) or "text",
            level=log_map.get("level", _choice("debug", "info", "warning", "error")) or "info",
        )
    return Settings(
        interfaces=interfaces,
        log=log,
        pid_file=pid_file,
        max_attempts=DEFAULT_MAX_ATTEMPTS if max_attempts is None else max_attempts,
        firewall=_firewall(top),
        on_shutdown="revoke"
        if top.get("on_shutdown", _choice("keep", "revoke")) == "revoke"
        else "keep",
        status_socket=top.get("status_socket", _string) or DEFAULT_STATUS_SOCKET,
        state_dir=top.get("state_dir", _string) or DEFAULT_STATE_DIR,
        metrics=_metrics(top),
        notify=parse_notify(top, path),
    )


def _metrics(top: _Map) -> MetricsSettings | None:
    """``metrics: {listen: unix:/PATH | 127.0.0.1:PORT, allow_remote: false}``."""
    spec = top.mapping("metrics", METRICS_KEYS)
    if spec is None:
        return None
    if "listen" not in spec.items:
        top.problems.error(
            spec.line, spec.key("listen"), "missing (expected unix:/PATH or 127.0.0.1:PORT)"
        )
        return None
    allow_remote = bool(spec.get("allow_remote", parse_bool))
    settings: MetricsSettings | None = spec.get(
        "listen", lambda value: parse_listen(value, allow_remote)
    )
    if settings is not None and is_remote(settings):
        top.problems.warn(
            spec.line_of("listen"),
            spec.key("listen"),
            f"{settings.listen} is not loopback: the metrics are reachable from the network "
            "(allow_remote: true)",
        )
    return settings


def _firewall(top: _Map) -> FirewallSettings:
    spec = top.mapping("firewall", FIREWALL_KEYS)
    if spec is None:
        return FirewallSettings()
    backends: dict[Any, Literal["auto", "nftables", "iptables"]] = {
        "nftables": "nftables",
        "iptables": "iptables",
    }
    backend = backends.get(spec.get("backend", _choice("auto", "nftables", "iptables")), "auto")
    always_allow = spec.get("always_allow", _list_of(parse_network)) or ()
    scan: ScanPolicy | None = ScanPolicy()
    if "scan" in spec.items and not isinstance(spec.items["scan"][0], MappingNode):
        if spec.get("scan", _scan_off) is False:
            scan = None
    else:
        scan_map = spec.mapping("scan", SCAN_KEYS)
        if scan_map is not None:
            ports = scan_map.get("ports", lambda v: parse_count(v, minimum=2, maximum=65535))
            window = scan_map.get(
                "window",
                lambda v: parse_seconds(v, minimum=0.1, maximum=3600.0, what="0.1 to 3600 seconds"),
            )
            hold = scan_map.get(
                "hold",
                lambda v: parse_seconds(v, minimum=1.0, maximum=86400.0, what="1 to 86400 seconds"),
            )
            default = ScanPolicy()
            scan = ScanPolicy(
                ports=default.ports if ports is None else ports,
                window=default.window if window is None else window,
                hold=default.hold if hold is None else hold,
            )
    return FirewallSettings(backend=backend, always_allow=tuple(always_allow), scan=scan)


def _scan_off(value: Any) -> bool:
    if value is not False:
        raise Invalid(
            f"{shown(value)} is not a scan policy (expected {{ports, window, hold}} or false)"
        )
    return False


def _door(
    name: str,
    node: Node,
    line: int,
    default_duplicates: DuplicatePolicy,
    names: tuple[str, ...],
    services: dict[str, Service],
    path: str,
    problems: Problems,
) -> Door | None:
    where = f"doors.{shown(name, text=True)}"
    errors_before = problems.error_count
    try:
        parse_door_name(name)
    except Invalid as problem:
        problems.error(line, where, str(problem))
    if not isinstance(node, MappingNode):
        problems.error(line, where, "expected a mapping with knock and an action")
        return None
    door = _Map(node, where, DOOR_KEYS, problems, line)
    service = _door_service(door, services)
    door.get("description", _string)
    if "spa" in door.items:
        knock: Knock | None = Knock(sequence=())
        if "knock" in door.items:
            problems.error(
                door.line_of("spa"),
                door.key("spa"),
                "an SPA door is opened by one packet (expected spa: or knock:, not both)",
            )
    else:
        knock = _knock(door, default_duplicates, path, problems)
    open_ports = _open(door, problems)
    if service is not None:
        served, duration = service
        if open_ports is not None:
            problems.error(
                door.line_of("open"),
                door.key("open"),
                "a service door opens its service's port (expected service: {name, duration})",
            )
        open_ports = OpenPorts((served.step,), duration)
    close = door.get("close", _list_of(_choice(*names))) or ()
    seconds = door.get(
        "cmd_timeout",
        lambda v: parse_seconds(v, minimum=0.0, maximum=SECONDS_LIMIT, what="seconds, 0 or more"),
    )
    commands = Commands(
        start=door.get("start_command", _string),
        start6=door.get("start_command_6", _string),
        stop=door.get("stop_command", _string),
        stop6=door.get("stop_command_6", _string),
        cmd_timeout=DEFAULT_CMD_TIMEOUT if seconds is None else seconds,
    )
    if (commands.stop or commands.stop6) and not (commands.start or commands.start6):
        key = "stop_command" if "stop_command" in door.items else "stop_command_6"
        problems.error(
            door.line_of(key),
            door.key(key),
            "a stop command needs a start command (expected start_command too)",
        )
    spa = parse_spa(door, path, problems, open_ports)
    does_something = open_ports or close or commands.start or commands.start6
    if not does_something:
        problems.warn(door.line, where, "the door has no action: a completed knock is only logged")
    if knock is None or problems.error_count != errors_before:
        return None
    return Door(
        name=name,
        knock=knock,
        open=open_ports,
        close=tuple(close),
        commands=commands,
        origin=Origin(path, line),
        service=service[0].name if service is not None else None,
        spa=spa,
    )


def _knock(
    door: _Map, default_duplicates: DuplicatePolicy, path: str, problems: Problems
) -> Knock | None:
    knock = door.mapping("knock", KNOCK_KEYS)
    if knock is None:
        if "knock" not in door.items:
            problems.error(
                door.line, door.key("knock"), "missing (expected knock: {sequence: ...})"
            )
        return None
    sequence: tuple[Step, ...] | None = None
    one_time: OneTimeFile | None = None
    totp: Totp | None = None
    given = [key for key in ("sequence", "one_time_sequences", "totp") if key in knock.items]
    if len(given) > 1:
        problems.error(
            knock.line_of(given[1]),
            knock.key(given[1]),
            f"cannot be combined with {given[0]} (expected one of sequence, "
            "one_time_sequences, totp)",
        )
    elif "totp" in knock.items:
        totp = parse_totp(knock, problems)
    elif "one_time_sequences" in knock.items:
        file = knock.get("one_time_sequences", _string)
        if file is not None:
            if not os.path.isabs(file):
                file = os.path.join(os.path.dirname(path) or ".", file)
            one_time = read_one_time_file(
                file, problems, knock.key("one_time_sequences"), knock.line_of("one_time_sequences")
            )
    elif "sequence" in knock.items:
        sequence = knock.get("sequence", parse_sequence)
        if sequence is not None:
            lint_sequence(sequence, problems, knock.line_of("sequence"), knock.key("sequence"))
    else:
        problems.error(
            knock.line,
            knock.key("sequence"),
            "missing (expected a list of steps, one_time_sequences or totp)",
        )
    seq_timeout = knock.get(
        "seq_timeout",
        lambda v: parse_seconds(v, minimum=0.0, maximum=SECONDS_LIMIT, what="seconds, 0 or more"),
    )
    if seq_timeout is not None:
        lint_seq_timeout(
            seq_timeout,
            sequence,
            one_time,
            problems,
            knock.line_of("seq_timeout"),
            knock.key("seq_timeout"),
            totp_steps=totp.steps if totp else 0,
        )
    tcpflags = knock.get("tcpflags", lambda v: parse_tcpflags(split_flags(v)))
    target = knock.get("target", parse_address)
    duplicates = knock.get("duplicates", _choice("ignore", "reset"))
    if sequence is None and one_time is None and totp is None:
        return None
    return Knock(
        sequence=sequence or (),
        seq_timeout=DEFAULT_SEQ_TIMEOUT if seq_timeout is None else seq_timeout,
        tcpflags=tcpflags or TcpFlags(),
        target=target,
        duplicates=duplicates or default_duplicates,
        one_time=one_time,
        totp=totp,
    )


def _open(door: _Map, problems: Problems) -> OpenPorts | None:
    spec = door.mapping("open", OPEN_KEYS)
    if spec is None:
        return None
    # Left out: the door opens only the ports of containers labelled with it.
    ports = spec.get("ports", parse_sequence) if "ports" in spec.items else ()
    duration = spec.get(
        "duration",
        lambda v: parse_seconds(
            v, minimum=1.0, maximum=MAX_OPEN_DURATION, what="seconds, from 1 to 604800"
        ),
    )
    if ports is None:
        return None
    return OpenPorts(ports, DEFAULT_OPEN_DURATION if duration is None else duration)


def _door_service(door: _Map, services: dict[str, Service]) -> tuple[Service, float] | None:
    """``service: NAME`` or ``service: {name: NAME, duration: SECONDS}``."""
    if "service" not in door.items:
        return None
    node, line = door.items["service"]
    key = door.key("service")
    known = listed(services) or "none defined under services:"
    duration = DEFAULT_OPEN_DURATION
    if isinstance(node, MappingNode):
        spec = _Map(node, key, DOOR_SERVICE_KEYS, door.problems, line)
        name = spec.get("name", _string)
        if "name" not in spec.items:
            door.problems.error(line, key + ".name", "missing (expected a service name)")
        seconds = spec.get(
            "duration",
            lambda v: parse_seconds(
                v, minimum=1.0, maximum=MAX_OPEN_DURATION, what="seconds, from 1 to 604800"
            ),
        )
        duration = duration if seconds is None else seconds
    else:
        name = door.get("service", _string)
    if name is None:
        return None
    if name not in services:
        door.problems.error(line, key, f"no service named {shown(name)} (expected one of {known})")
        return None
    return services[name], duration


def parse_services(text: str, path: str, problems: Problems) -> dict[str, Service]:
    """Only the ``services:`` catalogue, checked as :func:`parse_yaml` checks it (the
    launcher's view: no door is parsed, no key or one-time file is read)."""
    root = compose(text, problems)
    if not isinstance(root, MappingNode):
        return {}
    return _services(_Map(root, "", TOP_KEYS, problems), path, problems)


def _services(top: _Map, path: str, problems: Problems) -> dict[str, Service]:
    services: dict[str, Service] = {}
    catalogue = top.mapping("services", ())
    if catalogue is None:
        return services
    for name, (node, line) in catalogue.items.items():
        where = f"services.{shown(name, text=True)}"
        try:
            parse_door_name(name)
        except Invalid as problem:
            problems.error(line, where, str(problem).replace("door name", "service name"))
            continue
        if not isinstance(node, MappingNode):
            problems.error(line, where, "expected a mapping with image and ports")
            continue
        service = _service(name, _Map(node, where, SERVICE_KEYS, problems, line), path)
        if service is not None:
            services[name] = service
    return services


def _service(name: str, spec: _Map, path: str) -> Service | None:
    problems = spec.problems
    errors_before = problems.error_count
    image = spec.get("image", _string)
    build = spec.get("build", _string)
    if build is not None and not os.path.isabs(build):
        build = os.path.normpath(os.path.join(os.path.dirname(path) or ".", build))
    if image is None and build is None and "image" not in spec.items:
        problems.error(spec.line, spec.key("image"), "missing (expected image or build)")
    for key in ("container_port", "host_port"):
        if key not in spec.items:
            problems.error(spec.line, spec.key(key), "missing (expected a port number)")
    container_port = spec.get("container_port", parse_port)
    host_port = spec.get("host_port", parse_port)
    proto: Proto = (
        "udp" if spec.get("protocol", lambda v: parse_proto(_string(v))) == "udp" else "tcp"
    )
    environment = spec.get("environment", _environment) or ()
    volumes = spec.get("volumes", _list_of(_volume)) or ()
    command = spec.get("command", _command)
    ready = _ready(spec)
    idle = spec.get(
        "idle_timeout",
        lambda v: parse_seconds(
            v, minimum=1.0, maximum=SECONDS_LIMIT * 7, what="seconds, 1 or more"
        ),
    )
    lifetime = spec.get(
        "max_lifetime",
        lambda v: parse_seconds(
            v, minimum=1.0, maximum=SECONDS_LIMIT * 365, what="seconds, 1 or more"
        ),
    )
    keep_warm = spec.get("keep_warm", parse_bool)
    on_shutdown = spec.get("on_shutdown", _choice("keep", "stop"))
    if problems.error_count != errors_before or container_port is None or host_port is None:
        return None
    default = Service(name, "", 1, 1)
    return Service(
        name=name,
        image=image or f"knockgate-service-{name}:local",
        container_port=container_port,
        host_port=host_port,
        proto=proto,
        build=build,
        environment=environment,
        volumes=tuple(volumes),
        command=command,
        ready=ready or Readiness(),
        idle_timeout=default.idle_timeout if idle is None else idle,
        max_lifetime=default.max_lifetime if lifetime is None else lifetime,
        keep_warm=bool(keep_warm),
        on_shutdown="stop" if on_shutdown == "stop" else "keep",
    )


def _environment(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise Invalid("expected a mapping of NAME: value")
    out = []
    for key, item in value.items():
        if not isinstance(key, str) or not key or "=" in key:
            raise Invalid(f"{shown(key)} is not a variable name (expected NAME: value)")
        if isinstance(item, bool | int | float | str):
            out.append((key, str(item).lower() if isinstance(item, bool) else str(item)))
        else:
            raise Invalid(
                f"{shown(key, text=True)}: {shown(item)} is not a plain value (expected text "
                "or a number)"
            )
    return tuple(out)


def _volume(value: Any) -> str:
    if not isinstance(value, str) or value.count(":") not in (1, 2):
        raise Invalid(
            f"{shown(value)} is not a volume (expected SOURCE:TARGET or SOURCE:TARGET:ro)"
        )
    source, target, *mode = value.split(":")
    if not source or not target.startswith("/") or mode not in ([], ["ro"], ["rw"]):
        raise Invalid(f"{shown(value)} is not a volume (expected SOURCE:/TARGET[:ro|rw])")
    return value


def _command(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return ("/bin/sh", "-c", value)
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise Invalid("expected a list of arguments or a shell command string")


def _ready(spec: _Map) -> Readiness | None:
    ready = spec.mapping("ready", READY_KEYS)
    if ready is None:
        return None
    timeout = ready.get(
        "timeout", lambda v: parse_seconds(v, minimum=0.1, maximum=600.0, what="0.1 to 600 seconds")
    )
    kinds = [kind for kind in ("tcp", "banner", "http", "healthcheck") if kind in ready.items]
    if len(kinds) != 1:
        spec.problems.error(
            ready.line, ready.key("tcp"), "expected exactly one of tcp, banner, http, healthcheck"
        )
        return None
    kind = kinds[0]
    base = Readiness(timeout=Readiness().timeout if timeout is None else timeout)
    if kind == "banner":
        expect = ready.get("banner", _string) or ""
        return Readiness("banner", expect=expect, timeout=base.timeout)
    if kind == "http":
        node, line = ready.items["http"]
        http = (
            _Map(node, ready.key("http"), ("path", "status"), spec.problems, line)
            if isinstance(node, MappingNode)
            else None
        )
        if http is None:
            spec.problems.error(line, ready.key("http"), "expected {path: /, status: 200}")
            return None
        path = http.get("path", _string) or "/"
        status = http.get("status", lambda v: parse_count(v, minimum=100, maximum=599))
        return Readiness("http", path=path, status=status or 200, timeout=base.timeout)
    if kind == "healthcheck":
        return Readiness("healthcheck", timeout=base.timeout)
    return Readiness("tcp", timeout=base.timeout)
