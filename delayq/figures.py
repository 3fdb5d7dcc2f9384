"""The figures operators look at, read from Redis in a few round trips: used by
`delayq status`, `/metrics` and the dashboard alike."""

from __future__ import annotations

import copy
import functools
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from delayq.keys import Keys
from delayq.redis_conn import is_cluster, run_read_only
from delayq.timing import from_ms

#: Overdue timers are counted in at most this many shards (a listener that is down for
#: long has many; the count then says "at least").
OVERDUE_SHARDS = 1000
#: Index shards counted per count_pending.lua call (~0.5 ms of Redis).
COUNT_CHUNK = 1024
#: A listener whose last heartbeat is older than this is not counted as alive.
LISTENER_ALIVE_MS = 10_000
#: Seconds the listener reuses its Redis figures: /metrics scrapes and dashboard refreshes
#: within this long share one read (~20 ms of Redis with 1,000,000 timers pending on one
#: Redis, BENCHMARKS.md). Gauges then lag Redis by up to this long, well under a scrape
#: interval.
FIGURES_CACHE_S = 5.0


def redis_figures(client: redis.Redis, keys: Keys, *, dead_limit: int = 100) -> dict[str, Any]:
    """Pending, next due, overdue, in flight, dead letters (the first `dead_limit`) and
    listeners alive. Raises redis.RedisError if Redis does not answer. On a cluster, the
    same figures and each primary's (delayq.cluster.figures)."""
    if is_cluster(client):
        from delayq.cluster.figures import cluster_figures

        return cluster_figures(client, keys, dead_limit=dead_limit)  # type: ignore[arg-type]
    sec, usec = client.time()
    now_ms = sec * 1000 + usec // 1000
    pipe = client.pipeline(transaction=False)
    pipe.zrange(keys.heads, 0, 0, withscores=True)
    pipe.zrangebyscore(keys.heads, "-inf", now_ms, start=0, num=OVERDUE_SHARDS)
    pipe.zcard(keys.claims)
    pipe.hlen(keys.dead)
    pipe.zrangebyscore(keys.listeners, now_ms - LISTENER_ALIVE_MS, "+inf", withscores=True)
    if dead_limit > 0:  # HSCAN ... COUNT 0 is a syntax error
        pipe.hscan(keys.dead, 0, count=dead_limit)
    head, overdue_shards, inflight, dead_count, alive, *scanned = pipe.execute()
    dead = scanned[0][1] if scanned else {}
    pending = _pending(client, keys) if head else 0
    overdue = 0
    if overdue_shards:
        pipe = client.pipeline(transaction=False)
        for shard_id in overdue_shards:
            pipe.zcount(f"{keys.shard_prefix}{shard_id}", "-inf", now_ms)
        overdue = sum(pipe.execute())
    dead_list = [dead_letter(key, raw) for key, raw in sorted(dead.items())[:dead_limit]]
    return {
        "pending": pending,
        "next_due_at": from_ms(int(head[0][1])).isoformat() if head else None,
        "overdue": overdue,
        "in_flight": inflight,
        "dead_lettered": dead_count,
        "dead_letters": dead_list,
        "listeners": [
            {"id": member, "last_seen_s": round((now_ms - score) / 1000, 1)}
            for member, score in alive
        ],
    }


def _pending(client: redis.Redis, keys: Keys) -> int:
    """The timers in the due index: count_pending.lua over COUNT_CHUNK shards a call, one
    call per round trip (other clients' commands run in between, which one call over all
    16,384 shards would not allow), or, where scripts are refused, a ZCARD per shard."""
    from delayq.layout import read_layout

    names = _shard_keys(keys.shard_prefix, read_layout(client, keys).shards)
    chunks = [names[i : i + COUNT_CHUNK] for i in range(0, len(names), COUNT_CHUNK)]
    try:
        return sum(int(run_read_only(client, "count_pending", [c])[0]) for c in chunks)
    except redis.ResponseError:
        pass
    n = 0
    for chunk in chunks:
        pipe = client.pipeline(transaction=False)
        for name in chunk:
            pipe.zcard(name)
        n += sum(pipe.execute())
    return n


@functools.cache
def _shard_keys(prefix: str, shards: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{n}" for n in range(shards))


def dead_letter(field: str, raw: str) -> dict[str, Any]:
    """One dead letter as shown: `field` of the dead-letter hash and its JSON entry."""
    entry = json.loads(raw)
    return {
        # Fields are firing ids (`KEY@DUE`); before 0.2 they were timer keys.
        "firing": field,
        "timer": entry.get("timer", field),
        "due_at": from_ms(int(entry["due_ms"])).isoformat(),
        "attempts": entry["attempts"],
        "error": entry["error"],
        "dead_at": from_ms(int(entry["dead_ms"])).isoformat(),
    }


class CachedFigures:
    """redis_figures, read at most once per `ttl_s` however many ask (thread-safe: callers
    that arrive while a read is under way wait for it instead of starting another).
    A failed read is not cached: the next caller tries again."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        ttl_s: float = FIGURES_CACHE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.keys = keys
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._read_at = float("-inf")
        self._dead_limit = -1
        self._figures: dict[str, Any] = {}
        #: Reads of Redis made so far (for tests and benchmarks).
        self.reads = 0

    def get(self, *, dead_limit: int = 100) -> dict[str, Any]:
        """The figures, at most `ttl_s` old, with the first `dead_limit` dead letters."""
        with self._lock:
            fresh = self._clock() - self._read_at < self.ttl_s
            if not fresh or dead_limit > self._dead_limit:
                # The most dead letters anyone asked for: one read serves every caller.
                limit = max(dead_limit, self._dead_limit)
                self._figures = redis_figures(self.client, self.keys, dead_limit=limit)
                self._read_at = self._clock()
                self._dead_limit = limit
                self.reads += 1
            figures = copy.deepcopy(self._figures)
        figures["dead_letters"] = figures.get("dead_letters", [])[:dead_limit]
        return figures
