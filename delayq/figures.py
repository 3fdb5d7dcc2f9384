"""The figures operators look at, read from Redis in one round trip: used by
`delayq status`, `/metrics` and the dashboard alike."""

from __future__ import annotations

import json
from typing import Any

import redis

from delayq.keys import Keys
from delayq.timing import from_ms

#: A listener whose last heartbeat is older than this is not counted as alive.
LISTENER_ALIVE_MS = 10_000


def redis_figures(client: redis.Redis, keys: Keys, *, dead_limit: int = 100) -> dict[str, Any]:
    """Pending, next due, overdue, in flight, dead letters (the first `dead_limit`) and
    listeners alive. Raises redis.RedisError if Redis does not answer."""
    sec, usec = client.time()
    now_ms = sec * 1000 + usec // 1000
    pipe = client.pipeline(transaction=False)
    pipe.zcard(keys.due)
    pipe.zrange(keys.due, 0, 0, withscores=True)
    pipe.zcount(keys.due, "-inf", now_ms)
    pipe.zcard(keys.inflight)
    pipe.hlen(keys.dead)
    pipe.hscan(keys.dead, 0, count=dead_limit)
    pipe.zrangebyscore(keys.listeners, now_ms - LISTENER_ALIVE_MS, "+inf", withscores=True)
    pending, head, overdue, inflight, dead_count, (_, dead), alive = pipe.execute()
    dead_list = []
    for key, raw in sorted(dead.items())[:dead_limit]:
        entry = json.loads(raw)
        dead_list.append(
            {
                "timer": key,
                "due_at": from_ms(int(entry["due_ms"])).isoformat(),
                "attempts": entry["attempts"],
                "error": entry["error"],
                "dead_at": from_ms(int(entry["dead_ms"])).isoformat(),
            }
        )
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
