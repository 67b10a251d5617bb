"""The deployment schema: the services catalogue and the daemon's settings.

What the configuration says beyond the doors themselves: which containers a
service door starts and how, how the daemon logs, which firewall it drives, where
it keeps its state. The engines in ``appliance.core`` never read any of this; the
runtime does. Pure data: standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from appliance.core.model import DEFAULT_MAX_ATTEMPTS, Door, Proto, Step


@dataclass(frozen=True, slots=True)
class Readiness:
    """How to tell that a started service answers.

    ``tcp``: a connection is accepted; ``banner``: the first bytes it sends start
    with ``expect``; ``http``: ``GET path`` answers ``status``; ``healthcheck``: the
    image's own HEALTHCHECK reports healthy. A paused container still completes
    TCP handshakes, so only an application-level answer proves readiness.
    """

    kind: Literal["tcp", "banner", "http", "healthcheck"] = "tcp"
    expect: str = ""
    path: str = "/"
    status: int = 200
    timeout: float = 20.0


@dataclass(frozen=True, slots=True)
class Service:
    """A container started on demand by a knock (the ``services:`` catalogue)."""

    name: str
    image: str
    container_port: int
    host_port: int
    proto: Proto = "tcp"
    build: str | None = None  # a build context directory; ``image`` is then its tag
    environment: tuple[tuple[str, str], ...] = ()
    volumes: tuple[str, ...] = ()  # "SOURCE:TARGET[:ro]"; SOURCE a path or a volume name
    command: tuple[str, ...] | None = None
    ready: Readiness = field(default_factory=Readiness)
    idle_timeout: float = 300.0
    max_lifetime: float = 86_400.0
    keep_warm: bool = False
    # When knockgate stops: keep the container running (its sessions go on; the next
    # start adopts it) or stop it.
    on_shutdown: Literal["keep", "stop"] = "keep"

    @property
    def step(self) -> Step:
        return Step(self.host_port, self.proto)


@dataclass(frozen=True, slots=True)
class LogSettings:
    file: str | None = None
    syslog: bool = False
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True, slots=True)
class ScanPolicy:
    """A source hitting more than ``ports`` distinct new ports within ``window``
    seconds is held off (cannot complete a knock) for ``hold`` seconds."""

    ports: int = 10
    window: float = 2.0
    hold: float = 60.0


@dataclass(frozen=True, slots=True)
class FirewallSettings:
    backend: Literal["auto", "nftables", "iptables"] = "auto"
    always_allow: tuple[str, ...] = ()  # networks (CIDR) never locked out
    scan: ScanPolicy | None = field(default_factory=ScanPolicy)  # None: no scan detection


DEFAULT_STATUS_SOCKET = "/run/knockgate/status.sock"
DEFAULT_STATE_DIR = "/var/lib/knockgate"


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """Where the Prometheus endpoint listens: ``unix_path`` (a Unix socket) or
    ``host``:``port``; ``listen`` is the setting as written. Off when absent."""

    listen: str
    unix_path: str | None = None
    host: str = ""
    port: int = 0
    allow_remote: bool = False  # a non-loopback address was accepted explicitly


# --- fleet (issue 14): several hosts sharing grants and security state through Redis


@dataclass(frozen=True, slots=True)
class FleetTls:
    """Client TLS for Redis (``rediss://``): the CA to trust, a client certificate."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True, slots=True)
class FleetSentinel:
    """Find the Redis master ``master`` through these Sentinels (``host``, ``port``)."""

    master: str
    hosts: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class FleetSettings:
    """``fleet:``: this host is ``host`` in the group ``name``, sharing ``redis``.

    ``on_outage``: what SPA, TOTP and one-time doors do when the shared state cannot be
    reached: ``refuse`` (fail closed) or ``local`` (the local caches only, loudly).
    Per door (a door's own ``fleet:`` key): ``local_doors`` neither publish nor apply
    fleet grants and claim nothing shared; ``start_services`` doors start their service
    here on a grant made on another host (otherwise a fleet grant opens ports only)."""

    name: str
    host: str
    redis: str  # redis:// or rediss:// URL, with the ACL user and without a password
    password_file: str | None = None
    tls: FleetTls | None = None
    sentinel: FleetSentinel | None = None
    cluster: bool = False
    on_outage: Literal["refuse", "local"] = "refuse"
    claim_timeout: float = 1.0  # seconds a shared claim (SPA, TOTP, one-time) may take
    local_doors: frozenset[str] = frozenset()
    start_services: frozenset[str] = frozenset()

    def shares(self, door: str) -> bool:
        """Whether ``door`` takes part in the fleet."""
        return door not in self.local_doors


@dataclass(frozen=True, slots=True)
class Webhook:
    """POST each event as JSON, signed with HMAC-SHA256 over ``timestamp.body`` with
    the secret read from ``secret_file`` (never written in the YAML itself)."""

    url: str
    secret_file: str
    secret: bytes = field(repr=False, default=b"")
    timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class Chat:
    """A templated HTTP request per event (ntfy, Slack, Matrix, ...): ``{text}``,
    ``{kind}``, ``{door}``, ... in ``url``, ``headers`` and ``body``, escaped for the
    ``content_type`` (JSON strings, URL parts). ``token_file``'s content is ``{token}``;
    ``url_file``, when given, is where ``url`` was read from (the URL is the credential)."""

    url: str = field(repr=False)
    body: str = "{text}"
    method: Literal["POST", "PUT"] = "POST"
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()
    token_file: str | None = None
    token: str = field(repr=False, default="")
    timeout: float = 10.0
    url_file: str | None = None


@dataclass(frozen=True, slots=True)
class Mail:
    """A digest through an SMTP server: every ``every`` seconds, or daily at ``at``
    (local time, HH:MM) when ``every`` is not given."""

    host: str
    sender: str
    to: tuple[str, ...]
    port: int = 25
    tls: Literal["none", "starttls", "tls"] = "none"
    username: str | None = None
    password_file: str | None = None
    password: str = field(repr=False, default="")
    every: float | None = None
    at: tuple[int, int] = (7, 0)
    quiet: Literal["send", "skip"] = "send"  # a period with nothing to report
    subject: str = "knockgate digest"
    timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class Notifier:
    """One ``notify:`` entry: its name (a metrics label), what it does, which event
    kinds it gets and how many deliveries may wait while its receiver is down."""

    name: str
    target: Webhook | Chat | Mail
    events: tuple[str, ...]
    queue: int = 1000
    flood_threshold: int = 100  # knock noise a minute that gets a summary of its own
    per_minute: int = 5  # records one address causes, sent one by one a minute (the rest summed)

    @property
    def kind(self) -> str:
        return {Webhook: "webhook", Chat: "chat", Mail: "mail"}[type(self.target)]


@dataclass(frozen=True, slots=True)
class Settings:
    interfaces: tuple[str, ...] = ()
    log: LogSettings = field(default_factory=LogSettings)
    pid_file: str | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    firewall: FirewallSettings = field(default_factory=FirewallSettings)
    on_shutdown: Literal["keep", "revoke"] = "keep"
    status_socket: str = DEFAULT_STATUS_SOCKET
    state_dir: str = DEFAULT_STATE_DIR  # the SPA replay cache and used TOTP steps
    metrics: MetricsSettings | None = None  # the Prometheus endpoint (off when None)
    fleet: FleetSettings | None = None  # grants and security state shared (off when None)
    notify: tuple[Notifier, ...] = ()  # notifications (none when empty)


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    format: Literal["yaml", "knockd"]
    settings: Settings
    doors: tuple[Door, ...]
    services: tuple[Service, ...] = ()

    _doors: dict[str, Door] = field(init=False, repr=False, compare=False)
    _services: dict[str, Service] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_doors", {door.name: door for door in self.doors})
        object.__setattr__(self, "_services", {s.name: s for s in self.services})

    def door(self, name: str) -> Door | None:
        """The door called ``name`` (``None``: no such door), the one lookup by name."""
        return self._doors.get(name)

    def service(self, name: str) -> Service | None:
        return self._services.get(name)
