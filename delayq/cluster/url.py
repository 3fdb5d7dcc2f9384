"""`redis+cluster://[user:password@]host:port[,host:port...]` (`rediss+cluster://` for
TLS): seed nodes of a Redis Cluster; redis-py's RedisCluster discovers the rest."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import NoPermissionError, RedisClusterException
from redis.retry import Retry

from delayq.errors import InvalidInput, NotReady
from delayq.settings import mask_url

SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str | None) -> bool:
    return bool(url) and urlsplit(str(url)).scheme in SCHEMES


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """(seed nodes, connection options) of a cluster URL; raises InvalidInput."""
    parts = urlsplit(url)
    scheme = SCHEMES.get(parts.scheme)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    seeds: list[tuple[str, int]] = []
    try:
        for item in hosts.split(","):
            host, sep, port = item.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(item)
            seeds.append((host.strip("[]"), int(port)))
        if scheme is None or not seeds:
            raise ValueError(url)
        # One seed's URL, parsed by redis-py: credentials, TLS options, timeouts.
        first_host, first_port = seeds[0]
        single = f"{scheme}://{userinfo}{at}{first_host}:{first_port}{parts.path}"
        if parts.query:
            single += f"?{parts.query}"
        opts: dict[str, Any] = redis.connection.parse_url(single)  # type: ignore[no-untyped-call]
    except ValueError:
        raise InvalidInput(
            f"DELAYQ_REDIS_URL: {mask_url(url)} is not a valid cluster URL "
            "(redis+cluster://[user:password@]host:port[,host:port...])"
        ) from None
    if int(opts.pop("db", 0) or 0) != 0:
        raise InvalidInput(
            "DELAYQ_REDIS_URL: a Redis Cluster has only DB 0; use DELAYQ_NAMESPACE to keep "
            "delayq's keys apart"
        )
    for name in ("host", "port", "connection_class", "path"):
        opts.pop(name, None)
    if scheme == "rediss":
        opts["ssl"] = True
    return seeds, opts


def connect_cluster(url: str, **kwargs: Any) -> RedisCluster:
    """A RedisCluster client for a cluster URL (not yet checked to answer). Raises
    NotReady when the ACL refuses what the client reads the cluster with (CLUSTER SLOTS,
    COMMAND), RedisClusterException when no seed answers."""
    seeds, opts = parse_cluster_url(url)
    opts.update(kwargs)
    nodes = [ClusterNode(h, p) for h, p in seeds]  # type: ignore[no-untyped-call]
    try:
        return RedisCluster(startup_nodes=nodes, **opts)
    except NoPermissionError as exc:  # COMMAND, read once by the client's key parser
        raise _denied(opts, exc) from None
    except RedisClusterException:
        # redis-py says "Cluster mode is not enabled" when CLUSTER SLOTS is refused.
        denied = _cluster_slots_denied(seeds[0], opts)
        if denied is not None:
            raise denied from None
        raise


def _cluster_slots_denied(seed: tuple[str, int], opts: dict[str, Any]) -> NotReady | None:
    try:
        # No retries: a seed that does not answer has been waited for already.
        once = Retry(NoBackoff(), 0)
        client = redis.Redis(host=seed[0], port=seed[1], **{**opts, "retry": once})
    except (TypeError, ValueError):
        return None
    try:
        client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
    except NoPermissionError as exc:
        return _denied(opts, exc)
    except redis.RedisError:
        return None
    finally:
        client.close()
    return None


def _denied(opts: dict[str, Any], exc: redis.RedisError) -> NotReady:
    user = opts.get("username") or "default"
    reason = (str(exc) or type(exc).__name__).splitlines()[0]
    return NotReady(
        f"Redis user {user!r} may not read the cluster's topology (NOPERM {reason}): a "
        "cluster client needs +cluster|slots and +command: see deploy/redis/users.acl"
    )
