"""`delayq check` on a cluster: every primary is checked as one Redis would be.

A promoted replica without `notify-keyspace-events` publishes nothing (a known cause of
lost events: redis/redis-py#3543), so the setting is checked, and with
`--configure-redis` set, on each primary, and persistence too. The ACL is probed on each
primary with the keys of a slot that primary serves; for a listener also the read-only
scripts it runs on each primary with the keys of many slots in ARGV (peek_slots,
cluster_figures: the ACL checks every key they touch) and the wake-up pattern it
subscribes to there.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis
from redis.cluster import RedisCluster
from redis.exceptions import NoPermissionError

from delayq.cluster.router import read_only_script
from delayq.cluster.slots import partition
from delayq.errors import NotReady
from delayq.keys import Keys
from delayq.permissions import REDIS_RULES, SUBSCRIBE_TIMEOUT_S, check_redis
from delayq.redis_conn import (
    Scripts,
    check_notifications,
    check_persistence,
    client_url,
    server_identity,
    unreachable,
)


def check_cluster(
    cluster: RedisCluster,
    keys: Keys,
    scripts: Scripts,
    *,
    role: str,
    key_suffixes: Sequence[str] = (),
    configure: bool = False,
) -> list[str]:
    """Lines per primary; raises the first thing that is wrong, naming the primary."""
    lines: list[str] = []
    cluster.nodes_manager.initialize()
    primaries = sorted(cluster.get_primaries(), key=lambda n: n.name)  # type: ignore[no-untyped-call]
    slots_of: dict[str, int] = {}
    for slot, nodes in cluster.nodes_manager.slots_cache.items():
        slots_of.setdefault(nodes[0].name, slot)
    lines.append(
        f"cluster: {len(primaries)} primaries, "
        f"{len(cluster.get_replicas())} replicas, "  # type: ignore[no-untyped-call]
        f"{len(cluster.nodes_manager.slots_cache)} of 16384 slots served"
    )
    for node in primaries:
        client = cluster.get_redis_connection(node)
        where = f"primary {node.name}"
        lines.append(f"{where}: {server_identity(client)}")
        if node.name in slots_of:
            part = partition(keys.namespace, keys.db, slots_of[node.name])
            try:
                probed = check_redis(client, part, scripts, role=role, key_suffixes=key_suffixes)
                if role == "listener":
                    probed.append(_check_cluster_reads(cluster, client, part))
            except NotReady as exc:
                raise NotReady(f"{where}: {exc}{_hint(str(exc), keys, role)}") from None
            lines += [f"{where}: {line}" for line in probed]
        if role == "producer":
            continue
        url = f"redis://{node.name}"
        lines.append(f"{where}: {check_notifications(client, url, configure=configure)}")
        lines.append(f"{where}: {check_persistence(client)}")
    return lines


def _check_cluster_reads(cluster: RedisCluster, client: redis.Redis, part: Keys) -> str:
    """The listener's reads of many slots in one call, with `part`'s keys: peek_slots
    (its due view) and cluster_figures (/metrics, the dashboard), run as the listener
    runs them (EVALSHA with no KEYS, the keys in ARGV), and PSUBSCRIBE to the wake-up
    channels of every slot. Raises NotReady naming what is refused."""
    user = str(client.connection_pool.connection_kwargs.get("username") or "default")
    due = f"{part.shard_prefix}0"
    reads: dict[str, list[str | int]] = {
        "peek_slots": [part.heads, part.claims],
        "cluster_figures": [0, due, part.claims, part.dead],
    }
    for name, args in reads.items():
        try:
            read_only_script(cluster, name)(keys=[], args=args, client=client)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise unreachable(client_url(client), exc) from None
        except redis.ResponseError as exc:
            keys = ", ".join(repr(a) for a in args if isinstance(a, str))
            raise NotReady(
                f"Redis user {user!r} may not run the {name} script (EVALSHA, its keys "
                f"{keys} in ARGV): {_line(exc)}: see {REDIS_RULES}"
            ) from None
    pubsub = client.pubsub()  # type: ignore[no-untyped-call]
    try:
        pubsub.psubscribe(part.wake_pattern)
        deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            msg = pubsub.get_message(timeout=left)
            if msg and msg["type"] == "psubscribe":
                break
        else:
            raise redis.TimeoutError(f"no confirmation of psubscribe {part.wake_pattern}")
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise unreachable(client_url(client), exc) from None
    except NoPermissionError as exc:
        raise NotReady(
            f"Redis user {user!r} lacks permission for 'psubscribe' on channel "
            f"{part.wake_pattern!r} (NOPERM {_line(exc)}): add &{part.wake_pattern}: "
            f"see {REDIS_RULES}"
        ) from None
    finally:
        pubsub.close()
    return (
        f"Redis user {user!r} may run the peek_slots and cluster_figures scripts and "
        f"subscribe to {part.wake_pattern}"
    )


def _hint(message: str, keys: Keys, role: str) -> str:
    """What to add when a cluster's partition keys (`{delayq:N}:...`) are refused."""
    if f"'{{{keys.namespace}:" not in message:
        return ""
    if role == "listener":
        return f" (a cluster's partition keys need the key pattern ~{{{keys.namespace}:*}}:*)"
    return (
        f" (a cluster's partition keys need the ~{{{keys.namespace}:*}}:... key patterns "
        f"of {REDIS_RULES})"
    )


def _line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
