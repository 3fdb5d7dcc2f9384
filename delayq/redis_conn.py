"""Redis connections and delayq's Lua scripts, registered once per client."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.exceptions import NoScriptError, RedisClusterException

from delayq.cluster.url import connect_cluster, is_cluster_url
from delayq.errors import NotReady, ServiceUnavailable
from delayq.keys import Keys, checked_db
from delayq.settings import Settings, mask_url

SCRIPT_NAMES = (
    "schedule",
    "cancel",
    "claim_due",
    "claim_expired",
    "adopt",
    "forget",
    "ack",
    "retry_later",
    "retry_dead",
    "release",
    "renew",
    "heartbeat",
    "record_firings",
)


def unreachable(url: str, exc: BaseException) -> ServiceUnavailable:
    """The one-line error for a Redis that does not answer (password masked)."""
    reason = (str(exc) or type(exc).__name__).splitlines()[0]
    return ServiceUnavailable(f"Redis at {mask_url(url)} is not reachable: {reason}")


def redis_url(settings: Settings) -> str:
    """The Redis URL to use: the configured one, or the embedded server (started if needed)."""
    if not settings.embedded_redis:
        assert settings.redis_url is not None
        return settings.redis_url
    from delayq.embedded import ensure_embedded_redis

    return ensure_embedded_redis(settings)


def connect(settings: Settings, **kwargs: Any) -> redis.Redis:
    """A client for the timer DB that has been checked to answer. For a
    `redis+cluster://` URL it is a RedisCluster (typed as redis.Redis: the commands delayq
    sends to it directly are the single-key ones both have)."""
    url = redis_url(settings)
    opts: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": 5,
        "health_check_interval": 30,
    }
    opts.update(kwargs)
    try:
        if is_cluster_url(url):
            opts.pop("health_check_interval")
            cluster = connect_cluster(url, **opts)
            cluster.ping(target_nodes=cluster.PRIMARIES)
            return cluster  # type: ignore[return-value]
        client: redis.Redis = redis.Redis.from_url(url, **opts)
        client.ping()
    except (redis.RedisError, RedisClusterException) as exc:  # the latter: no seed answers
        raise unreachable(url, exc) from exc
    return client


def is_cluster(client: object) -> bool:
    """Whether `client` talks to a Redis Cluster."""
    return isinstance(client, RedisCluster)


def client_url(client: redis.Redis) -> str:
    """A URL for what `client` talks to (no password: it is for messages)."""
    if isinstance(client, RedisCluster):
        seeds = ",".join(f"{n.host}:{n.port}" for n in client.get_primaries())
        return f"redis+cluster://{seeds}"
    kw = client.connection_pool.connection_kwargs
    db = kw.get("db", 0) or 0
    if "path" in kw:
        return f"unix://{kw['path']}?db={db}"
    pool = client.connection_pool
    scheme = "rediss" if issubclass(pool.connection_class, redis.SSLConnection) else "redis"
    return f"{scheme}://{kw.get('host')}:{kw.get('port')}/{db}"


def server_identity(client: redis.Redis) -> str:
    """Which server `client` talks to, e.g. "Valkey 9.1.2" or "Redis 7.0.15", from INFO server.

    Valkey also reports redis_version (7.2.4, for clients that gate features on it), so its
    own valkey_version is used when server_name says valkey. An ACL may refuse INFO."""
    try:
        info = client.info("server")
    except redis.ResponseError:  # NoPermissionError included
        return "Redis-compatible server (INFO not allowed)"
    name = str(info.get("server_name") or "redis").lower()
    if name == "valkey":
        return f"Valkey {info.get('valkey_version') or info.get('redis_version', '?')}"
    if name == "redis":
        return f"Redis {info.get('redis_version', '?')}"
    return f"{name} (redis_version {info.get('redis_version', '?')})"


def keys_for(client: redis.Redis, settings: Settings) -> Keys:
    if isinstance(client, RedisCluster):
        return Keys(namespace=settings.namespace, db=0)
    db = int(client.connection_pool.connection_kwargs.get("db", 0) or 0)
    return Keys(namespace=settings.namespace, db=checked_db(db))


@dataclass(frozen=True)
class Scripts:
    """The Lua scripts, each small and named for what it does (see delayq/lua/)."""

    schedule: Script
    cancel: Script
    claim_due: Script
    claim_expired: Script
    adopt: Script
    forget: Script
    ack: Script
    retry_later: Script
    retry_dead: Script
    release: Script
    renew: Script
    heartbeat: Script
    record_firings: Script

    @classmethod
    def register(cls, client: redis.Redis, *, clock: str | None = None) -> Scripts:
        """Load the scripts for `client`. `clock` replaces `lua/_clock.lua` (tests move
        time by hand with it); every script reads the time through it."""
        return cls(
            **{
                name: client.register_script(script_source(name, clock=clock))
                for name in SCRIPT_NAMES
            }
        )


def script_source(name: str, *, clock: str | None = None) -> str:
    """The Lua text of script `name` as Redis runs it: the clock and the prelude, then
    the script (delayq/lua/). The blocking and the asyncio clients load the same text."""
    lua = files("delayq") / "lua"
    prelude = (clock or (lua / "_clock.lua").read_text()) + (lua / "_prelude.lua").read_text()
    return prelude + (lua / f"{name}.lua").read_text()


def notify_flags(client: redis.Redis) -> str | None:
    """The server's notify-keyspace-events, or None if CONFIG is not allowed (managed Redis)."""
    try:
        value = client.config_get("notify-keyspace-events").get("notify-keyspace-events")
    except redis.ResponseError:
        return None
    return str(value or "")


def has_expired_events(flags: str) -> bool:
    return "E" in flags and ("x" in flags or "A" in flags)


def has_generic_events(flags: str) -> bool:
    """`expire` and `del` keyevents: how timers of producers outside delayq are adopted."""
    return "E" in flags and ("g" in flags or "A" in flags)


#: What delayq wants: `expired` events (x) to hear legacy timers expire, and `expire`/`del`
#: events (g) to adopt them the moment they are set and drop them when they are deleted.
WANTED_FLAGS = "Egx"


def check_persistence(client: redis.Redis) -> str:
    """A status line on whether pending timers survive a Redis restart (never fatal:
    a cache-only Redis is a choice, but it should be a conscious one)."""
    try:
        conf = client.config_get("appendonly")
        conf.update(client.config_get("save"))
    except redis.ResponseError:
        return "persistence could not be read (CONFIG not allowed); make sure appendonly is yes"
    if conf.get("appendonly") == "yes":
        return "appendonly is on: pending timers survive a Redis restart"
    if conf.get("save"):
        return (
            "warning: appendonly is off (RDB snapshots only): timers scheduled since the last "
            "snapshot are lost if Redis restarts; set appendonly yes"
        )
    return (
        "warning: Redis keeps nothing on disk (appendonly no, no save points): every pending "
        "timer is lost if Redis restarts; set appendonly yes"
    )


def check_notifications(client: redis.Redis, url: str, *, configure: bool = False) -> str:
    """Make sure Redis publishes the keyevents delayq listens to; returns a one-line status
    (starting 'warning: ' when legacy timers are not adopted the moment they are set).

    Raises NotReady with what to set when `expired` events are off. With `configure`,
    tries CONFIG SET first; a refused CONFIG SET is not fatal when the setting is already
    right."""
    flags = notify_flags(client)
    if flags is None:
        return (
            "notify-keyspace-events could not be read (CONFIG not allowed); assuming "
            f"{WANTED_FLAGS}"
        )
    if has_expired_events(flags) and has_generic_events(flags):
        return f"notify-keyspace-events is {flags!r}"
    if configure:
        wanted = "".join(dict.fromkeys(flags + WANTED_FLAGS))
        try:
            client.config_set("notify-keyspace-events", wanted)
        except redis.ResponseError as exc:
            if has_expired_events(flags):
                return _without_generic(flags, f"CONFIG SET refused: {exc}")
            raise NotReady(
                f"Redis at {mask_url(url)} refused CONFIG SET notify-keyspace-events {wanted} "
                f"({exc}); set it in redis.conf or the parameter group"
            ) from None
        return f"notify-keyspace-events set to {wanted!r}"
    if has_expired_events(flags):
        return _without_generic(flags, "run 'delayq listen --configure-redis' or set it")
    raise NotReady(
        f"Redis at {mask_url(url)} has notify-keyspace-events {flags!r}, without expired "
        f"events: set 'notify-keyspace-events {WANTED_FLAGS}' in redis.conf (or the parameter "
        "group on managed Redis), or run 'delayq listen --configure-redis'"
    )


def _without_generic(flags: str, how: str) -> str:
    return (
        f"warning: notify-keyspace-events is {flags!r}, without 'g': timers set by producers "
        "that do not use delayq (plain SETEX) are adopted only by the sweep, up to a pass "
        f"late, instead of the moment they are set; want {WANTED_FLAGS!r} ({how})"
    )


def run_read_only(client: redis.Redis, name: str, argvs: Sequence[Sequence[Any]]) -> list[Any]:
    """A read-only script of delayq/lua/ whose text starts with its flags line (no
    prelude) once per argument list, pipelined, on one server. By EVALSHA, loading it
    on NOSCRIPT: a pipeline of Script objects would send SCRIPT EXISTS, which the
    listener's ACL does not allow. Raises redis.ResponseError where it is refused."""
    text = (files("delayq") / "lua" / f"{name}.lua").read_text()
    sha = hashlib.sha1(text.encode()).hexdigest()
    for attempt in range(2):
        pipe = client.pipeline(transaction=False)
        for argv in argvs:
            pipe.evalsha(sha, 0, *argv)
        try:
            return list(pipe.execute())
        except NoScriptError:
            if attempt:
                raise
            client.script_load(text)
    raise AssertionError("unreachable")
