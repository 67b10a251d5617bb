"""Native YAML configuration: every key, every error, and the knockd.conf round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import detect_format, load_config
from appliance.config.export import to_yaml
from appliance.config.schema import Config, FirewallSettings, Readiness, ScanPolicy, Service
from appliance.core.model import Commands, OpenPorts, Step, TcpFlags
from appliance.errors import ConfigError

FULL = """\
interfaces: [eth0, eth1]
log: {file: /var/log/knockgate.log, syslog: true, format: json, level: debug}
pid_file: /run/knockgate.pid
max_attempts: 5000
duplicates: reset
firewall:
  backend: iptables
  always_allow: [198.18.200.0/24, "2001:2::1"]
  scan: {ports: 20, window: 1.5, hold: 120}
on_shutdown: revoke
status_socket: /tmp/kg.sock
doors:
  ssh:
    description: SSH for the admins
    knock:
      sequence: [7113/tcp, "2231:udp", 9157]
      seq_timeout: 2.5
      tcpflags: syn,!ack
      target: 2001:DB8::1
      duplicates: ignore
    open: {ports: [22/tcp, 2222], duration: 45}
    start_command: logger open %IP%
    start_command_6: logger open6 %IP%
    stop_command: logger close %IP%
    stop_command_6: ""
    cmd_timeout: 0.5
  close-ssh:
    knock: {sequence: "9157,2231:udp,7113", tcpflags: [syn]}
    close: ssh
"""


def write(tmp_path: Path, text: str, name: str = "knockgate.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_every_key_is_read(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, FULL))
    config = loaded.config
    assert config.format == "yaml"
    settings = config.settings
    assert settings.interfaces == ("eth0", "eth1")
    assert (settings.log.file, settings.log.syslog) == ("/var/log/knockgate.log", True)
    assert (settings.log.format, settings.log.level) == ("json", "debug")
    assert settings.pid_file == "/run/knockgate.pid"
    assert settings.max_attempts == 5000
    assert settings.firewall == FirewallSettings(
        backend="iptables",
        always_allow=("198.18.200.0/24", "2001:2::1/128"),
        scan=ScanPolicy(ports=20, window=1.5, hold=120.0),
    )
    assert settings.on_shutdown == "revoke"
    assert settings.status_socket == "/tmp/kg.sock"
    ssh, close = config.doors
    assert ssh.knock.sequence == (Step(7113, "tcp"), Step(2231, "udp"), Step(9157, "tcp"))
    assert ssh.knock.seq_timeout == 2.5
    assert ssh.knock.tcpflags == TcpFlags(0x02, 0x10)
    assert ssh.knock.target == "2001:db8::1"  # canonical form
    assert ssh.knock.duplicates == "ignore"
    assert ssh.open == OpenPorts((Step(22, "tcp"), Step(2222, "tcp")), 45.0)
    assert ssh.commands == Commands(
        start="logger open %IP%",
        start6="logger open6 %IP%",
        stop="logger close %IP%",
        stop6="",
        cmd_timeout=0.5,
    )
    assert close.close == ("ssh",)
    assert close.knock.duplicates == "reset"  # the top-level default
    assert close.open is None
    assert loaded.warnings == ()


@pytest.mark.parametrize(
    ("body", "line", "key", "message"),
    [
        (
            "doors:\n  d:\n    knock: {sequence: [7113, abc]}\n    open: {ports: [22]}\n",
            3,
            "doors.d.knock.sequence",
            "'abc' is not a port",
        ),
        (
            "doors:\n  d:\n    knock: {sequence: [7113, 99999]}\n    open: {ports: [22]}\n",
            3,
            "doors.d.knock.sequence",
            "port 99999 is out of range",
        ),
        (
            "doors:\n  d:\n    knock: {sequence: [1/icmp]}\n    open: {ports: [22]}\n",
            3,
            "doors.d.knock.sequence",
            "expected tcp or udp",
        ),
        (
            "doors:\n  d:\n    knock: {sequence: []}\n    open: {ports: [22]}\n",
            3,
            "doors.d.knock.sequence",
            "the sequence is empty",
        ),
        (
            "doors:\n  d:\n    knock: {sequence: [1], seq_timeout: -1}\n    open: {ports: [22]}\n",
            3,
            "doors.d.knock.seq_timeout",
            "out of range",
        ),
        (
            "doors:\n  d:\n    knock: {sequence: [1], seq_timeout: soon}\n    open: {ports: [22]}\n",
            3,
            "doors.d.knock.seq_timeout",
            "not a number of seconds",
        ),
        (
            'doors:\n  d:\n    knock: {sequence: [1], tcpflags: "syn,bogus"}\n    open: {ports: [22]}\n',
            3,
            "doors.d.knock.tcpflags",
            "unknown TCP flag 'bogus'",
        ),
        (
            "doors:\n  d:\n    knock: {sequence: [1], target: nowhere}\n    open: {ports: [22]}\n",
            3,
            "doors.d.knock.target",
            "not an address",
        ),
        (
            "doors:\n  d:\n    knock: {sequence: [1], duplicates: maybe}\n    open: {ports: [22]}\n",
            3,
            "doors.d.knock.duplicates",
            "expected one of ignore, reset",
        ),
        (
            "doors:\n  d:\n    knock: {sequence: [1], speed: 3}\n    open: {ports: [22]}\n",
            3,
            "doors.d.knock.speed",
            "unknown key",
        ),
        (
            "doors:\n  d:\n    knock: {seq_timeout: 3}\n    open: {ports: [22]}\n",
            3,
            "doors.d.knock.sequence",
            "missing",
        ),
        ("doors:\n  d:\n    open: {ports: [22]}\n", 2, "doors.d.knock", "missing"),
        (
            "doors:\n  d:\n    knock: {sequence: [1]}\n    open: {ports: [22], duration: 0}\n",
            4,
            "doors.d.open.duration",
            "out of range",
        ),
        (
            "doors:\n  d:\n    knock: {sequence: [1]}\n    close: nobody\n",
            4,
            "doors.d.close",
            "expected one of d",
        ),
        (
            "doors:\n  d:\n    knock: {sequence: [1]}\n    stop_command: x\n",
            4,
            "doors.d.stop_command",
            "needs a start command",
        ),
        (
            "doors:\n  d:\n    knock: {sequence: [1]}\n    start_command: [a]\n",
            4,
            "doors.d.start_command",
            "expected a string",
        ),
        (
            "doors:\n  d:\n    knock: {sequence: [1]}\n    service: ssh\n",
            4,
            "doors.d.service",
            "no service named 'ssh'",
        ),
        (
            "doors:\n  d:\n    knock: {sequence: [1]}\n    open: {ports: [22]}\n    open: {}\n",
            5,
            "doors.d.open",
            "given twice (first on line 4",
        ),
        (
            "doors:\n  'bad name':\n    knock: {sequence: [1]}\n    open: {ports: [22]}\n",
            2,
            "doors.bad name",
            "not a door name",
        ),
        ("doors:\n  d: [1, 2]\n", 2, "doors.d", "expected a mapping"),
        ("doors: {}\n", 1, "doors", "no door is defined"),
        ("interfaces: [eth0]\n", 1, "doors", "missing"),
        ("max_attempts: 0\ndoors: {}\n", 1, "max_attempts", "out of range"),
        ("interfaces: ['eth 0']\ndoors: {}\n", 1, "interfaces", "not an interface name"),
        ("log: {format: xml}\ndoors: {}\n", 1, "log.format", "expected one of text, json"),
        ("log: {colour: red}\ndoors: {}\n", 1, "log.colour", "unknown key"),
        ("dors: {}\n", 1, "dors", "unknown key (expected one of interfaces"),
        (
            "firewall: {backend: pf}\ndoors: {}\n",
            1,
            "firewall.backend",
            "expected one of auto, nftables, iptables",
        ),
        (
            "firewall: {always_allow: [300.0.0.0/8]}\ndoors: {}\n",
            1,
            "firewall.always_allow",
            "not a network",
        ),
        ("firewall: {scan: {ports: 1}}\ndoors: {}\n", 1, "firewall.scan.ports", "out of range"),
        ("firewall: {scan: {speed: 1}}\ndoors: {}\n", 1, "firewall.scan.speed", "unknown key"),
        ("on_shutdown: later\ndoors: {}\n", 1, "on_shutdown", "expected one of keep, revoke"),
        ("- a\n- b\n", 1, "(top)", "expected a mapping"),
        ("", 1, "(top)", "the file is empty"),
        ("doors: {d: [\n", 2, "(yaml)", "not valid YAML"),
    ],
)
def test_errors_name_file_line_key_and_expectation(
    tmp_path: Path, body: str, line: int, key: str, message: str
) -> None:
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = caught.value.problems
    assert any(p.startswith(f"{path}:{line}: {key}: ") and message in p for p in problems), problems


def test_door_without_action_only_warns(tmp_path: Path) -> None:
    loaded = load_config(
        write(tmp_path, "doors:\n  d:\n    knock: {sequence: [7113, 2231, 9157]}\n")
    )
    assert loaded.warnings == (
        f"{tmp_path}/knockgate.yaml:2: doors.d: warning: the door has no action: "
        "a completed knock is only logged",
    )


def test_weak_sequences_warn_with_their_line(tmp_path: Path) -> None:
    text = "doors:\n  d:\n    open: {ports: [22]}\n    knock:\n      sequence: [7000, 8000, 9000]\n"
    warnings = load_config(write(tmp_path, text)).warnings
    assert (
        f"{tmp_path}/knockgate.yaml:5: doors.d.knock.sequence: warning: 7000,8000,9000 is a "
        "published example sequence: choose your own" in warnings
    )
    assert any("only go up" in w for w in warnings)


def test_format_is_detected_by_extension_then_content() -> None:
    assert detect_format("x.yaml", "[d]\n") == "yaml"
    assert detect_format("x.conf", "doors: {}") == "knockd"
    assert detect_format("knockd", "# c\n[options]\n") == "knockd"
    assert detect_format("config", "doors:\n  a: {}\n") == "yaml"


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "absent.yaml"))


KNOCKD = """\
[options]
    UseSyslog
    Interface = eth0
[openSSH]
    sequence    = 7113,2231:udp,9157
    seq_timeout = 5.5
    command     = /sbin/iptables -A INPUT -s %IP% -p tcp --dport 22 -j ACCEPT
    command_6   =
    tcpflags    = syn,!ack
    stop_command = /sbin/iptables -D INPUT -s %IP% -p tcp --dport 22 -j ACCEPT
    cmd_timeout = 20
    target = 198.18.0.9
[closeSSH]
    sequence    = 9157,2231:udp,7113
    command     = /sbin/iptables -D INPUT -s %IP% -p tcp --dport 22 -j ACCEPT
"""


def behaviour(config: Config) -> list[tuple[object, ...]]:
    """What a door does, without where it was written."""
    return [(d.name, d.knock, d.open, d.close, d.commands) for d in config.doors]


def test_import_knockd_round_trips_to_the_same_doors(tmp_path: Path) -> None:
    original = load_config(write(tmp_path, KNOCKD, "knockd.conf")).config
    text = to_yaml(original)
    assert "sequence: [7113/tcp, 2231/udp, 9157/tcp]" in text
    converted = load_config(write(tmp_path, text, "converted.yaml")).config
    assert behaviour(converted) == behaviour(original)
    assert converted.settings == original.settings


def test_scan_detection_can_be_turned_off_and_defaults_apply(tmp_path: Path) -> None:
    base = "doors:\n  d:\n    knock: {sequence: [7113, 2231, 9157]}\n    open: {ports: [22]}\n"
    off = load_config(write(tmp_path, "firewall: {scan: false}\n" + base)).config
    assert off.settings.firewall.scan is None
    default = load_config(write(tmp_path, base)).config.settings
    assert default.firewall == FirewallSettings()
    assert default.firewall.scan == ScanPolicy(10, 2.0, 60.0)
    assert (default.on_shutdown, default.status_socket) == ("keep", "/run/knockgate/status.sock")


SERVICES = """\
services:
  ssh:
    build: services/ssh
    container_port: 22
    host_port: 2222
    environment: {AUTHORIZED_KEYS: /keys, DEBUG: true}
    volumes: [knockgate-ssh-hostkeys:/etc/ssh/keys, /srv/keys:/keys:ro]
    ready: {banner: "SSH-", timeout: 5}
    idle_timeout: 120
    max_lifetime: 3600
    keep_warm: true
  web:
    image: nginx:local
    container_port: 80
    host_port: 8080
    command: nginx -g 'daemon off;'
    ready: {http: {path: /health, status: 204}}
doors:
  ssh:
    knock: {sequence: [7113, 2231/udp, 9157]}
    service: {name: ssh, duration: 45}
  web:
    knock: {sequence: [4001, 4003, 4002]}
    service: web
"""


def test_services_and_service_doors(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, SERVICES)).config
    ssh, web = config.services
    assert ssh == Service(
        name="ssh",
        image="knockgate-service-ssh:local",
        container_port=22,
        host_port=2222,
        build=str(tmp_path / "services" / "ssh"),
        environment=(("AUTHORIZED_KEYS", "/keys"), ("DEBUG", "true")),
        volumes=("knockgate-ssh-hostkeys:/etc/ssh/keys", "/srv/keys:/keys:ro"),
        ready=Readiness("banner", expect="SSH-", timeout=5.0),
        idle_timeout=120.0,
        max_lifetime=3600.0,
        keep_warm=True,
    )
    assert web.command == ("/bin/sh", "-c", "nginx -g 'daemon off;'")
    assert web.ready == Readiness("http", path="/health", status=204)
    door_ssh, door_web = config.doors
    assert (door_ssh.service, door_ssh.open) == ("ssh", OpenPorts((Step(2222, "tcp"),), 45.0))
    assert (door_web.service, door_web.open) == ("web", OpenPorts((Step(8080, "tcp"),), 30.0))


@pytest.mark.parametrize(
    ("old", "new", "key", "message"),
    [
        ("    host_port: 2222\n", "", "services.ssh.host_port", "missing"),
        ("container_port: 22", "container_port: 0", "services.ssh.container_port", "out of range"),
        ("/srv/keys:/keys:ro", "/srv/keys", "services.ssh.volumes", "not a volume"),
        (
            '{banner: "SSH-", timeout: 5}',
            "{banner: x, tcp: true}",
            "services.ssh.ready.tcp",
            "exactly one",
        ),
        ("keep_warm: true", "keep_warm: sometimes", "services.ssh.keep_warm", "yes or no"),
        (
            "    service: web\n",
            "    service: mail\n",
            "doors.web.service",
            "no service named 'mail'",
        ),
        (
            "{name: ssh, duration: 45}",
            "{name: ssh, duration: 0}",
            "doors.ssh.service.duration",
            "out of range",
        ),
    ],
)
def test_service_errors(tmp_path: Path, old: str, new: str, key: str, message: str) -> None:
    assert old in SERVICES
    path = write(tmp_path, SERVICES.replace(old, new))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert any(f": {key}: " in p and message in p for p in caught.value.problems), (
        caught.value.problems
    )


SCAN_DOOR = """\
firewall: {scan: {ports: 4, window: 3, hold: 90}}
doors:
  web:
    knock: {sequence: [7113, 2231, 9157]}
    open:
      ports: [80, 443, 8080, 8443, 9000/udp, 9000/tcp]
"""


def test_a_door_opening_more_ports_than_the_scan_detector_allows_warns(tmp_path: Path) -> None:
    path = write(tmp_path, SCAN_DOOR)
    assert load_config(path).warnings == (
        f"{path}:5: doors.web.open: warning: opens 5 ports, more than firewall.scan.ports (4): "
        "a client that connects to all of them within 3 s (firewall.scan.window) is held off "
        "as a port scanner for 90 s (firewall.scan.hold) and its next knock is refused "
        "(expected at most 4 ports, or a larger firewall.scan.ports)",
    )


def test_a_door_opening_as_many_ports_as_the_scan_detector_allows_warns(tmp_path: Path) -> None:
    path = write(tmp_path, SCAN_DOOR.replace("8443, ", ""))
    assert load_config(path).warnings == (
        f"{path}:5: doors.web.open: warning: opens 4 ports, as many as firewall.scan.ports (4): "
        "a client that connects to all of them and to one more new port of this host within "
        "3 s (firewall.scan.window) is held off as a port scanner for 90 s (firewall.scan.hold) "
        "and its next knock is refused (expected fewer than 4 ports, or a larger "
        "firewall.scan.ports)",
    )


@pytest.mark.parametrize(
    "change",
    [
        ("{scan: {ports: 4, window: 3, hold: 90}}", "{scan: false}"),  # no detector
        ("ports: 4,", "ports: 6,"),  # room for one more
        ("ports: [80, 443, 8080, 8443, 9000/udp, 9000/tcp]", "ports: [80, 443, 8080]"),
    ],
)
def test_doors_within_the_scan_detector_do_not_warn(
    tmp_path: Path, change: tuple[str, str]
) -> None:
    assert change[0] in SCAN_DOOR
    assert load_config(write(tmp_path, SCAN_DOOR.replace(*change))).warnings == ()


def test_the_default_scan_policy_is_what_the_warning_names(tmp_path: Path) -> None:
    ports = ", ".join(str(port) for port in range(8000, 8011))
    body = SCAN_DOOR.split("\n", 1)[1]  # no firewall: the defaults
    path = write(tmp_path, body.replace("80, 443, 8080, 8443, 9000/udp, 9000/tcp", ports))
    (warning,) = load_config(path).warnings
    assert warning.startswith(
        f"{path}:4: doors.web.open: warning: opens 11 ports, more than firewall.scan.ports "
        "(10): a client that connects to all of them within 2 s (firewall.scan.window) is held "
        "off as a port scanner for 60 s (firewall.scan.hold)"
    )


def test_a_service_door_is_not_counted_by_the_scan_detector(tmp_path: Path) -> None:
    """Docker forwards a published port past the input chain the detector counts in."""
    body = SERVICES.replace("doors:\n", "firewall: {scan: {ports: 2}}\ndoors:\n")
    assert not any("firewall.scan" in w for w in load_config(write(tmp_path, body)).warnings)


def test_a_door_without_open_ports_opens_only_its_labelled_containers(tmp_path: Path) -> None:
    path = write(
        tmp_path, "doors:\n  d:\n    knock: {sequence: [1, 2, 3]}\n    open: {duration: 5}\n"
    )
    door = load_config(str(path)).config.doors[0]
    assert door.open is not None and door.open.ports == () and door.open.duration == 5
