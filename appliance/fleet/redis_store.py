"""The fleet's store on Redis (standalone, Sentinel or Cluster) through redis-py.

Key layout (``NAME``: the fleet; the braces make one Cluster hash slot)::

    kg:{NAME}:events             stream: every grant and revocation (MAXLEN ~ 10000)
                                 fields kind, door, address, deadline, origin, id, ports
    kg:{NAME}:grants             hash: DOOR|ADDRESS -> "DEADLINE ORIGIN ID PORTS", live grants
    kg:{NAME}:deadlines          sorted set: DOOR|ADDRESS scored by its deadline (cleanup)
    kg:{NAME}:spa:HEXDIGEST      claims, SET NX PX: an SPA packet used (value: the host)
    kg:{NAME}:totp:DOOR:STEP     a TOTP step used
    kg:{NAME}:onetime:DOOR:LINE  a one-time sequence used

Commands used (for an ACL user): PING, XADD, XREAD, XREVRANGE, HSET, HDEL, HGETALL,
ZADD, ZREM, ZRANGEBYSCORE, SET, MULTI, EXEC.
"""

from __future__ import annotations

import contextlib
from typing import Any

import redis
import redis.cluster
import redis.sentinel

from appliance.config.schema import FleetSettings
from appliance.fleet.messages import FleetMessage, Keys, decode, decode_live, encode_live
from appliance.fleet.store import STREAM_MAX, FleetUnreachable

CLEANUP_BATCH = 200  # expired live grants removed per publish
CLEANUP_GRACE = 60.0  # seconds past its deadline before a live grant is removed
READ_SLACK = 3.0  # the reader's socket timeout beyond its XREAD BLOCK


def read_password(path: str | None) -> str | None:
    """The password in ``path`` by the rule the bundled Redis image applies too
    (compose/redis/entrypoint.sh): one line, a final LF or CRLF not part of it; a second
    line or spaces around it are refused (Redis would hash a different password)."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            text = handle.read()
    except OSError as error:
        raise FleetUnreachable(f"fleet.password_file {path}: {error.strerror or error}") from None
    line = text.removesuffix("\n").removesuffix("\r")
    if "\n" in line or "\r" in line:
        raise FleetUnreachable(f"fleet.password_file {path}: more than one line")
    if line != line.strip():
        raise FleetUnreachable(f"fleet.password_file {path}: spaces around the password")
    return line or None


class RedisStore:
    """:class:`~appliance.fleet.store.FleetStore` on redis-py: one client for commands
    (short timeouts: a claim must answer fast) and one for the blocking stream read."""

    def __init__(self, settings: FleetSettings, block: float) -> None:
        self.keys = Keys(settings.name)
        self.cluster = settings.cluster
        password = read_password(settings.password_file)
        self.client = _client(settings, password, settings.claim_timeout)
        self.reader = _client(settings, password, block + READ_SLACK)

    def _do(self, what: str, call: Any) -> Any:
        try:
            return call()
        except redis.RedisError as error:
            raise FleetUnreachable(f"{what}: {type(error).__name__}: {error}") from None
        except OSError as error:
            raise FleetUnreachable(f"{what}: {error}") from None

    def ping(self) -> None:
        self._do("PING", self.client.ping)

    def last_id(self) -> str:
        found = self._do("XREVRANGE", lambda: self.client.xrevrange(self.keys.stream, count=1))
        return str(found[0][0]) if found else "0-0"

    def live(self, now: float) -> list[FleetMessage]:
        self._cleanup(now)
        entries = self._do("HGETALL", lambda: self.client.hgetall(self.keys.grants))
        found = (decode_live(str(field), str(value)) for field, value in entries.items())
        return [m for m in found if m is not None and m.deadline > now]

    def publish(self, message: FleetMessage, now: float) -> None:
        keys = self.keys

        def run() -> None:
            pipe = self.client.pipeline(transaction=not self.cluster)
            if message.kind == "grant":
                pipe.hset(keys.grants, message.field, encode_live(message))
                pipe.zadd(keys.deadlines, {message.field: message.deadline})
            else:
                pipe.hdel(keys.grants, message.field)
                pipe.zrem(keys.deadlines, message.field)
            pipe.xadd(keys.stream, message.fields(), maxlen=STREAM_MAX, approximate=True)
            pipe.execute()

        self._do("publish", run)
        self._cleanup(now)

    def _cleanup(self, now: float) -> None:
        """Drop live grants well past their deadline (the hash has no per-field expiry)."""
        keys = self.keys
        old = self._do(
            "ZRANGEBYSCORE",
            lambda: self.client.zrangebyscore(
                keys.deadlines, "-inf", now - CLEANUP_GRACE, start=0, num=CLEANUP_BATCH
            ),
        )
        if old:

            def run() -> None:
                pipe = self.client.pipeline(transaction=not self.cluster)
                pipe.hdel(keys.grants, *old)
                pipe.zrem(keys.deadlines, *old)
                pipe.execute()

            self._do("cleanup", run)

    def read(self, after: str, block: float) -> list[tuple[str, FleetMessage | None]]:
        found = self._do(
            "XREAD",
            lambda: self.reader.xread(
                {self.keys.stream: after}, count=500, block=max(1, int(block * 1000))
            ),
        )
        out: list[tuple[str, FleetMessage | None]] = []
        for _stream, entries in found or ():
            for ident, fields in entries:
                out.append((str(ident), decode({str(k): str(v) for k, v in fields.items()})))
        return out

    def claim(self, key: str, owner: str, ttl: float) -> bool:
        taken = self._do(
            "SET NX",
            lambda: self.client.set(key, owner, nx=True, px=max(1, int(ttl * 1000))),
        )
        return bool(taken)

    def close(self) -> None:
        for client in (self.client, self.reader):
            with contextlib.suppress(Exception):  # closing a broken connection: best effort
                client.close()


def _client(settings: FleetSettings, password: str | None, timeout: float) -> Any:
    """A redis-py client for ``settings`` (strings decoded) with ``timeout`` seconds."""
    options: dict[str, Any] = {
        "password": password,
        "socket_timeout": timeout,
        "socket_connect_timeout": settings.claim_timeout,
        "decode_responses": True,
    }
    if settings.tls is not None:
        options.update(
            ssl_ca_certs=settings.tls.ca,
            ssl_certfile=settings.tls.cert,
            ssl_keyfile=settings.tls.key,
        )
    if settings.sentinel is not None:
        url = redis.connection.parse_url(settings.redis)  # type: ignore[no-untyped-call]
        username = url.get("username")
        sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(settings.sentinel.hosts),
            sentinel_kwargs={
                "password": password,
                "username": username,
                "socket_timeout": settings.claim_timeout,
            },
            username=username,
            db=url.get("db", 0),
            **options,
        )
        return sentinel.master_for(settings.sentinel.master)  # type: ignore[no-untyped-call]
    if settings.cluster:
        return redis.cluster.RedisCluster.from_url(settings.redis, **options)
    return redis.Redis.from_url(settings.redis, **options)
