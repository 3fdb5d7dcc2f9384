"""`delayq check` on a cluster: every primary is checked as one Redis would be.

A promoted replica without `notify-keyspace-events` publishes nothing (a known cause of
lost events: redis/redis-py#3543), so the setting is checked, and with
`--configure-redis` set, on each primary, and persistence too. The ACL is probed on each
primary with the keys of a slot that primary serves.
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.cluster import RedisCluster

from delayq.cluster.slots import partition
from delayq.keys import Keys
from delayq.permissions import check_redis
from delayq.redis_conn import (
    Scripts,
    check_notifications,
    check_persistence,
    server_identity,
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
            for line in check_redis(client, part, scripts, role=role, key_suffixes=key_suffixes):
                lines.append(f"{where}: {line}")
        if role == "producer":
            continue
        url = f"redis://{node.name}"
        lines.append(f"{where}: {check_notifications(client, url, configure=configure)}")
        lines.append(f"{where}: {check_persistence(client)}")
    return lines
