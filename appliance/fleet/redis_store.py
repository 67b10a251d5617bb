"""The fleet's store on Redis (standalone, Sentinel or Cluster) through redis-py.

Key layout (``NAME``: the fleet; the braces make one Cluster hash slot)::

    kg:{NAME}:events             stream: every grant and revocation (MAXLEN ~ 10000)
                                 fields kind, door, address, deadline, origin, id, ports
    kg:{NAME}:grants             hash: DOOR|ADDRESS -> "DEADLINE ORIGIN ID PORTS", live grants
    kg:{NAME}:deadlines          sorted set: DOOR|ADDRESS scored by its deadline (cleanup)
    kg:{NAME}:epoch              a token set once (SET NX GET): new when Redis lost its data
    kg:{NAME}:spa:HEXDIGEST      claims, SET NX PX: an SPA packet used (value: the host)
    kg:{NAME}:totp:DOOR:STEP     a TOTP step used
    kg:{NAME}:onetime:DOOR:LINE  a one-time sequence used

Commands used (for an ACL user): PING, XADD, XREAD, XREVRANGE, HSET, HDEL, HGETALL,
ZADD, ZREM, ZRANGEBYSCORE, SET, MULTI, EXEC (Cluster: CLUSTER SLOTS and COMMAND too).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import redis
import redis.cluster
import redis.exceptions
import redis.sentinel

from appliance.config.schema import FleetSettings
from appliance.fleet.messages import (
    FleetMessage,
    Keys,
    decode_bytes,
    decode_live_bytes,
    encode_live,
)
from appliance.fleet.store import READ_COUNT, STREAM_MAX, FleetUnreachable, stream_id

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
    (short timeouts: a claim must answer fast) and one for the blocking stream read.

    The clients are made on first use, on the link's threads (a Cluster client
    connects in its constructor: an unreachable Cluster never stops the daemon's
    start). Replies are bytes, decoded field by field: an entry that is not UTF-8
    is one malformed entry, never an error of the link."""

    def __init__(self, settings: FleetSettings, block: float) -> None:
        self.settings = settings
        self.keys = Keys(settings.name)
        self.cluster = settings.cluster
        self.block = block
        self._made: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _client(self, which: str) -> Any:
        with self._lock:
            client = self._made.get(which)
            if client is None:
                password = read_password(self.settings.password_file)
                reading = which == "reader"
                timeout = self.block + READ_SLACK if reading else self.settings.claim_timeout
                client = make_client(self.settings, password, timeout)
                self._made[which] = client
            return client

    @property
    def client(self) -> Any:
        return self._client("client")

    @property
    def reader(self) -> Any:
        return self._client("reader")

    def _do(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except (redis.RedisError, redis.exceptions.RedisClusterException) as error:
            raise FleetUnreachable(f"{what}: {type(error).__name__}: {error}") from None
        except OSError as error:
            raise FleetUnreachable(f"{what}: {error}") from None

    def ping(self) -> None:
        self._do("PING", lambda: self.client.ping())

    def epoch(self, token: str) -> str | None:
        def run() -> Any:
            try:
                return self.client.set(self.keys.epoch, token, nx=True, get=True)
            except redis.exceptions.ResponseError:
                return False  # Redis before 7.0 (NX with GET), an ACL without SET, OOM

        found = self._do("SET", run)
        if found is False:
            return None
        return token if found is None else bytes(found).decode("utf-8", "replace")

    def last_id(self) -> str:
        found = self._do("XREVRANGE", lambda: self.client.xrevrange(self.keys.stream, count=1))
        return _ident(found[0][0]) if found else "0-0"

    def trimmed(self, after: str) -> bool:
        """Whether the entry at ``after`` is gone: MAXLEN trims the oldest first, so
        while it is there nothing newer is missing (gone too when Redis came back
        empty). ``0-0`` (the stream was empty and nothing was read since) counts as
        trimmed once the stream holds anything (whether entries went is unknown)."""
        if after == "0-0":
            return self.last_id() != "0-0"
        found = self._do(
            "XREVRANGE",
            lambda: self.client.xrevrange(self.keys.stream, max=after, min=after, count=1),
        )
        return not found

    def live(self, now: float) -> list[FleetMessage | None]:
        self._cleanup(now)
        entries = self._do("HGETALL", lambda: self.client.hgetall(self.keys.grants))
        found = (decode_live_bytes(field, value) for field, value in entries.items())
        return [m for m in found if m is None or m.deadline > now]

    def publish(self, message: FleetMessage, now: float) -> None:
        keys = self.keys

        def run() -> Any:
            pipe = self.client.pipeline(transaction=not self.cluster)
            if message.kind == "grant":
                pipe.hset(keys.grants, message.field, encode_live(message))
                pipe.zadd(keys.deadlines, {message.field: message.deadline})
            else:
                pipe.hdel(keys.grants, message.field)
                pipe.zrem(keys.deadlines, message.field)
            pipe.xadd(keys.stream, message.fields(), maxlen=STREAM_MAX, approximate=True)
            self._expired(pipe, now)  # in the same round trip
            return pipe.execute()[-1]

        self._remove(self._do("publish", run))

    def _expired(self, client: Any, now: float) -> Any:
        """Live grants well past their deadline (the hash has no per-field expiry)."""
        return client.zrangebyscore(
            self.keys.deadlines, "-inf", now - CLEANUP_GRACE, start=0, num=CLEANUP_BATCH
        )

    def _cleanup(self, now: float) -> None:
        self._remove(self._do("ZRANGEBYSCORE", lambda: self._expired(self.client, now)))

    def _remove(self, old: list[bytes]) -> None:
        keys = self.keys
        if old:

            def run() -> None:
                pipe = self.client.pipeline(transaction=not self.cluster)
                pipe.hdel(keys.grants, *old)
                pipe.zrem(keys.deadlines, *old)
                pipe.execute()

            self._do("cleanup", run)

    def read(self, after: str, block: float | None) -> list[tuple[str, FleetMessage | None]]:
        wait = None if block is None else max(1, int(block * 1000))
        found = self._do(
            "XREAD",
            lambda: self.reader.xread({self.keys.stream: after}, count=READ_COUNT, block=wait),
        )
        out: list[tuple[str, FleetMessage | None]] = []
        for _stream, entries in found or ():
            for ident, fields in entries:
                out.append((_ident(ident), decode_bytes(fields)))
        return out

    def claim(self, key: str, owner: str, ttl: float) -> bool:
        taken = self._do(
            "SET NX",
            lambda: self.client.set(key, owner, nx=True, px=max(1, int(ttl * 1000))),
        )
        return bool(taken)

    def close(self) -> None:
        with self._lock:
            made, self._made = list(self._made.values()), {}
        for client in made:
            with contextlib.suppress(Exception):  # closing a broken connection: best effort
                client.close()


def _ident(value: bytes | str) -> str:
    """A stream id as text (ids are ASCII: ``MS-SEQ``)."""
    text = value.decode("ascii") if isinstance(value, bytes) else value
    stream_id(text)  # a ValueError for anything else (a bug of the server)
    return text


def make_client(settings: FleetSettings, password: str | None, timeout: float) -> Any:
    """A redis-py client for ``settings`` (replies as bytes) with ``timeout`` seconds.

    TLS: a ``rediss://`` URL (with or without ``tls:``) for the data connections, and
    for Sentinel also the connections to the sentinels."""
    tls = settings.redis.startswith("rediss://")
    options: dict[str, Any] = {
        "password": password,
        "socket_timeout": timeout,
        "socket_connect_timeout": settings.claim_timeout,
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
        sentinel_options = {
            "password": password,
            "username": username,
            "socket_timeout": settings.claim_timeout,
            "socket_connect_timeout": settings.claim_timeout,
        }
        if tls:
            sentinel_options.update(ssl=True, **_ssl_only(options))
        sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(settings.sentinel.hosts),
            sentinel_kwargs=sentinel_options,
            username=username,
            db=url.get("db", 0),
            ssl=tls,
            **options,
        )
        return sentinel.master_for(settings.sentinel.master)  # type: ignore[no-untyped-call]
    if settings.cluster:
        return redis.cluster.RedisCluster.from_url(settings.redis, **options)
    return redis.Redis.from_url(settings.redis, **options)


def _ssl_only(options: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in options.items() if key.startswith("ssl_")}
