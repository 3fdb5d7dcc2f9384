"""What a producer tells its caller when Redis refuses or fails: one delayq exception per
kind of failure, each with one line to act on and the redis-py exception kept as its
cause (`raise ... from exc`).

Shared by the blocking producer (delayq.producer) and the asyncio one (delayq.aio): the
redis.asyncio exceptions are the same classes."""

from __future__ import annotations

import re

import redis
from redis.exceptions import RedisClusterException

from delayq.errors import DelayqError, NotReady, ServiceUnavailable
from delayq.settings import mask_url

_COMMAND_RE = re.compile(r"permissions to run the '([^']+)' command")


class PermissionDenied(NotReady):
    """Redis's ACL refused a command or key to the producer's user (NOPERM)."""


class OutOfMemory(ServiceUnavailable):
    """Redis is at maxmemory with a no-eviction policy and refused the write (OOM)."""


class ReadOnlyReplica(ServiceUnavailable):
    """The server is a replica (READONLY), even after one retry on a fresh connection: the
    URL points at a replica, or a failover has not finished."""


def first_line(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0]


def acl_rule(message: str) -> str:
    """The ACL rule that would allow what a NOPERM `message` refused."""
    command = _COMMAND_RE.search(message)
    if command:
        return f"+{command.group(1).lower()}"
    if "channel" in message:
        return "&<the channel> (delayq's channels are in deploy/redis/users.acl)"
    return "%RW~<the key pattern> (delayq's key patterns are in deploy/redis/users.acl)"


def is_readonly(exc: BaseException) -> bool:
    """Whether `exc` says the server is a read-only replica (worth one retry on a fresh
    connection: after a failover, a DNS name or proxy points at the new primary)."""
    return isinstance(exc, redis.exceptions.ReadOnlyError) or (
        isinstance(exc, redis.ResponseError) and str(exc).startswith("READONLY")
    )


def is_redis_failure(exc: BaseException) -> bool:
    return isinstance(exc, redis.RedisError | RedisClusterException)


def wrap(url: str, exc: BaseException) -> DelayqError:
    """The delayq exception for a redis-py failure talking to `url` (password masked).
    Callers raise it `from exc`, so the redis-py exception stays attached."""
    where = f"Redis at {mask_url(url)}"
    if isinstance(exc, DelayqError):
        return exc
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return PermissionDenied(
            f"{where} refused the producer: {first_line(exc)} (its ACL user needs "
            f"{acl_rule(str(exc))}; the full rules are in deploy/redis/users.acl)"
        )
    if is_readonly(exc):
        return ReadOnlyReplica(
            f"{where} is a read-only replica: point DELAYQ_REDIS_URL at the primary "
            f"({first_line(exc)})"
        )
    if isinstance(exc, redis.exceptions.OutOfMemoryError) or str(exc).startswith("OOM"):
        return OutOfMemory(
            f"{where} is out of memory and refused the timer: {first_line(exc)} (raise "
            "maxmemory, or keep delayq's DB out of eviction: maxmemory-policy noeviction)"
        )
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError | RedisClusterException):
        return ServiceUnavailable(f"{where} is not reachable: {first_line(exc)}")
    return ServiceUnavailable(f"{where} refused the call: {first_line(exc)}")
