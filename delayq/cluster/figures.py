"""The operators' figures of a cluster (`delayq status`, `/metrics`, the dashboard): the
totals delayq.figures.redis_figures gives for one Redis, and each primary's share.

Each primary is read with a read-only script (lua/cluster_figures.lua) over the
partitions of the slots it serves, their keys passed in ARGV, SCRIPT_CHUNK slots per
call: a few calls per primary instead of four or five commands per slot. A primary that
refuses it (a slot migrating away, a server without script flags, an ACL without
EVALSHA) is read slot by slot in pipelines that follow redirections. Dead letters are
listed from the slots that have any, and only until `dead_limit` are found.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import NoPermissionError

from delayq.cluster.router import read_only_script, slots_by_primary
from delayq.cluster.slots import partition
from delayq.figures import LISTENER_ALIVE_MS, dead_letter
from delayq.keys import Keys
from delayq.timing import from_ms

#: Slots read per cluster_figures.lua call: with 1,000,000 timers pending on 3 primaries
#: a call of 256 slots held its primary ~4 ms, of 1,024 slots 13-23 ms, and of all its
#: 5,461 slots ~65 ms (a timer due meanwhile would wait that long); the total is the same.
SCRIPT_CHUNK = 256
#: Slots read per pipeline when a primary is read slot by slot.
CHUNK = 2048
#: Slots whose dead letters are read per pipeline (most have none or a few).
DEAD_CHUNK = 64

#: Primaries that refused INFO to a client (the shipped listener's ACL does): not asked
#: again, so that every scrape does not add a refusal to ACL LOG.
_info_refused: weakref.WeakKeyDictionary[RedisCluster, set[str]] = weakref.WeakKeyDictionary()


@dataclass
class _Primary:
    node: str
    slots: list[int]
    pending: int = 0
    overdue: int = 0
    in_flight: int = 0
    dead_lettered: int = 0
    next_due_ms: int = -1
    used_memory: int | None = None
    #: Slots with dead letters.
    dead_slots: list[int] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "slots": len(self.slots),
            "pending": self.pending,
            "overdue": self.overdue,
            "in_flight": self.in_flight,
            "dead_lettered": self.dead_lettered,
            "next_due_at": None if self.next_due_ms < 0 else from_ms(self.next_due_ms).isoformat(),
            "used_memory": self.used_memory,
        }


def cluster_figures(cluster: RedisCluster, keys: Keys, *, dead_limit: int = 100) -> dict[str, Any]:
    """What redis_figures gives for one Redis, summed over the primaries, and under
    "primaries" each primary's pending, overdue, in flight, dead-lettered, next due and
    used_memory (None when INFO is refused), by node name. Raises redis.RedisError if a
    primary does not answer."""
    by_node = slots_by_primary(cluster)
    nodes = sorted(by_node, key=lambda n: n.name)
    now_ms = _now_ms(cluster, nodes[0]) if nodes else 0
    primaries: list[_Primary] = []
    for node in nodes:
        p = _Primary(node.name, by_node[node])
        try:
            _read_by_script(cluster, keys, node, p, now_ms)
        except redis.RedisError:
            # Refused (a slot moved, no script flags, the ACL): slot by slot instead,
            # through the cluster client, which follows redirections.
            p = _Primary(node.name, by_node[node])
            _read_by_slot(cluster, keys, p, now_ms)
        p.used_memory = _used_memory(cluster, node)
        primaries.append(p)
    heartbeats: list[tuple[str, float]] = cluster.zrange(  # type: ignore[assignment]
        keys.listeners, 0, -1, withscores=True
    )
    heads = [p.next_due_ms for p in primaries if p.next_due_ms >= 0]
    dead_slots = sorted(s for p in primaries for s in p.dead_slots)
    return {
        "pending": sum(p.pending for p in primaries),
        "next_due_at": from_ms(min(heads)).isoformat() if heads else None,
        "overdue": sum(p.overdue for p in primaries),
        "in_flight": sum(p.in_flight for p in primaries),
        "dead_lettered": sum(p.dead_lettered for p in primaries),
        "dead_letters": _dead_letters(cluster, keys, dead_slots, dead_limit),
        "listeners": [
            {"id": member, "last_seen_s": round((now_ms - score) / 1000, 1)}
            for member, score in heartbeats
            if score >= now_ms - LISTENER_ALIVE_MS
        ],
        "primaries": [p.figures() for p in primaries],
    }


def _now_ms(cluster: RedisCluster, node: ClusterNode) -> int:
    sec, usec = cluster.get_redis_connection(node).time()
    return int(sec) * 1000 + int(usec) // 1000


def _read_by_script(
    cluster: RedisCluster, keys: Keys, node: ClusterNode, p: _Primary, now_ms: int
) -> None:
    """SCRIPT_CHUNK slots per call, as peek_slots is run in chunks: other clients'
    commands (claims) run in between."""
    script = read_only_script(cluster, "cluster_figures")
    client = cluster.get_redis_connection(node)
    for start in range(0, len(p.slots), SCRIPT_CHUNK):
        chunk = p.slots[start : start + SCRIPT_CHUNK]
        args: list[Any] = [now_ms]
        for slot in chunk:
            k = partition(keys.namespace, keys.db, slot)
            args += [f"{k.shard_prefix}0", k.claims, k.dead]
        reply = script(keys=[], args=args, client=client)
        pending, overdue, in_flight, dead, next_due = map(int, reply[:5])
        p.pending += pending
        p.overdue += overdue
        p.in_flight += in_flight
        p.dead_lettered += dead
        if next_due >= 0:
            p.next_due_ms = next_due if p.next_due_ms < 0 else min(p.next_due_ms, next_due)
        p.dead_slots += [chunk[int(i) - 1] for i in reply[5:]]


def _read_by_slot(cluster: RedisCluster, keys: Keys, p: _Primary, now_ms: int) -> None:
    for start in range(0, len(p.slots), CHUNK):
        chunk = p.slots[start : start + CHUNK]
        parts = [partition(keys.namespace, keys.db, slot) for slot in chunk]
        pipe = cluster.pipeline(transaction=False)  # type: ignore[no-untyped-call]
        for k in parts:
            due = f"{k.shard_prefix}0"
            pipe.zcard(due)
            pipe.zrange(due, 0, 0, withscores=True)
            pipe.zcard(k.claims)
            pipe.hlen(k.dead)
        replies = pipe.execute()
        overdue_keys: list[str] = []
        for i, (slot, k) in enumerate(zip(chunk, parts, strict=True)):
            pending, first, in_flight, dead = replies[4 * i : 4 * i + 4]
            p.pending += int(pending)
            p.in_flight += int(in_flight)
            if dead:
                p.dead_lettered += int(dead)
                p.dead_slots.append(slot)
            if first:
                head = int(first[0][1])
                p.next_due_ms = head if p.next_due_ms < 0 else min(p.next_due_ms, head)
                if head <= now_ms:
                    overdue_keys.append(f"{k.shard_prefix}0")
        if overdue_keys:
            pipe = cluster.pipeline(transaction=False)  # type: ignore[no-untyped-call]
            for key in overdue_keys:
                pipe.zcount(key, "-inf", now_ms)
            p.overdue += sum(int(n) for n in pipe.execute())


def _used_memory(cluster: RedisCluster, node: ClusterNode) -> int | None:
    refused = _info_refused.setdefault(cluster, set())
    if node.name in refused:
        return None
    try:
        info = cluster.get_redis_connection(node).info("memory")
    except NoPermissionError:
        refused.add(node.name)
        return None
    return int(info["used_memory"])


def _dead_letters(
    cluster: RedisCluster, keys: Keys, slots: Sequence[int], limit: int
) -> list[dict[str, Any]]:
    """The first `limit` dead letters, from the slots that have any, in slot order."""
    found: dict[str, str] = {}
    for start in range(0, len(slots), DEAD_CHUNK):
        if len(found) >= limit:
            break
        pipe = cluster.pipeline(transaction=False)  # type: ignore[no-untyped-call]
        for slot in slots[start : start + DEAD_CHUNK]:
            pipe.hscan(partition(keys.namespace, keys.db, slot).dead, 0, count=limit)
        for _, entries in pipe.execute():
            found.update(entries)
    return [dead_letter(f, raw) for f, raw in sorted(found.items())[:limit]]
