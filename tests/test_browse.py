"""The dashboard's lists (delayq.browse): pending timers, in-flight firings and dead letters
page by page in a stable order, each page a bounded number of Redis reads, on one Redis
and on a cluster; the dead-letter index, its backfill, and deleting dead letters."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import pytest
import redis

from delayq import browse
from delayq.cluster.store import ClusterStore
from delayq.errors import InvalidInput
from delayq.keys import Keys
from delayq.store import TimerStore
from tests.cluster import ServerCluster
from tests.servers import RedisServer

LIMIT = 25
#: Few index shards, so that "bounded by the shard count" is a small number to check.
SHARDS = 64

Pager = Callable[..., browse.Page]


def redis_now_ms(client: Any) -> int:
    sec, usec = client.time()
    return int(sec) * 1000 + int(usec) // 1000


def walk(
    pager: Pager, client: Any, keys: Keys, limit: int = LIMIT
) -> tuple[list[dict[str, Any]], list[int]]:
    """Every row of a list, page by page, and the reads each page took."""
    rows: list[dict[str, Any]] = []
    reads: list[int] = []
    after = None
    while True:
        page = pager(client, keys, after=after, limit=limit)
        rows += page.rows
        reads.append(page.reads)
        if page.next is None:
            return rows, reads
        assert len(page.rows) == limit
        after = page.next


def spread(n: int, now: int, prefix: str) -> list[tuple[str, str, int]]:
    """n timers an hour ahead, over 40 ms: many share a due time (ties to step over)."""
    rng = random.Random(n)
    return [(f"{prefix}{i}:cancel", "at", now + 3_600_000 + rng.randint(0, 40)) for i in range(n)]


def test_pending_pages_list_every_timer_once_in_due_order_with_reads_bounded_by_the_shards(
    any_redis: RedisServer,
) -> None:
    client = any_redis.client()
    keys = Keys(namespace="pg", shards=SHARDS)
    store = TimerStore(client, keys)
    now = redis_now_ms(client)
    for n in (300, 1500):
        client.flushall()
        timers = spread(n, now, f"N{n}-")
        store.schedule_bulk([timers[i : i + 500] for i in range(0, n, 500)])
        rows, reads = walk(browse.pending_page, client, keys)
        assert [(r["due_ms"], r["timer"]) for r in rows] == sorted((d, k) for k, _, d in timers)
        assert rows[0]["order_sn"] == rows[0]["timer"].split(":")[0]
        assert rows[0]["action"] == "cancel"
        # The first page: the heads, then the LIMIT + 1 first shards (and ties).
        assert reads[0] <= 2 * (LIMIT + 1) + 3
        # A deeper page: one more read per shard, however many timers there are (a
        # second for shards whose entries tie with the cursor's due time, ~8 per ms here).
        assert max(reads) <= 2 * SHARDS + 2 * (LIMIT + 1) + 10, reads


def test_a_page_cursor_from_another_list_or_made_up_is_refused(redis_server: RedisServer) -> None:
    client = redis_server.client()
    keys = Keys(namespace="cur", shards=SHARDS)
    timers = spread(50, redis_now_ms(client), "C")
    TimerStore(client, keys).schedule(timers)
    # Opening the list at a due time: the first timer due then or later comes first.
    dues = sorted(d for _, _, d in timers)
    opened = browse.pending_page(client, keys, after=browse.pending_cursor(dues[20]), limit=5)
    assert opened.rows[0]["due_ms"] == dues[20] == min(d for d in dues if d >= dues[20])
    page = browse.pending_page(client, keys, limit=2)
    assert page.next is not None
    for bad in ("nonsense", "", page.next[:-3] + "!!!"):
        if bad:
            with pytest.raises(InvalidInput, match="invalid page cursor"):
                browse.pending_page(client, keys, after=bad)
    with pytest.raises(InvalidInput, match="invalid page cursor"):
        browse.dead_page(client, keys, after=page.next)
    with pytest.raises(InvalidInput, match="page size"):
        browse.pending_page(client, keys, limit=0)


def make_dead_and_in_flight(store: Any, client: Any, n_dead: int, n_retrying: int) -> list[str]:
    """Timers due already, claimed; the first n_dead dead-lettered, the rest waiting for
    a retry (in flight). Returns the dead firing ids."""
    now = redis_now_ms(client)
    n = n_dead + n_retrying
    store.schedule([(f"D{i}:cancel", "at", now - 10_000 + i) for i in range(n)])
    if isinstance(store, ClusterStore):
        store.refresh_view()
    ids: list[str] = []
    while len(ids) < n:
        ids += [f.id for f in store.claim_due(1000, 60_000).firings]
    ids.sort(key=lambda fid: int(fid.rpartition("@")[2]))
    retry = {"backoff_ms": 5_000, "backoff_max_ms": 5_000, "error": "database said no"}
    assert store.retry_later(ids[:n_dead], max_attempts=1, **retry) == n_dead
    store.retry_later(ids[n_dead:], max_attempts=9, **retry)
    return ids[:n_dead]


def check_dead_and_in_flight(client: Any, keys: Keys, dead: list[str], n_retrying: int) -> None:
    rows, _ = walk(browse.dead_page, client, keys, limit=7)
    assert [r["firing"] for r in rows] == dead  # by due time
    assert rows[0]["error"] == "database said no" and rows[0]["attempts"] == 1
    assert rows[0]["due_ms"] == int(dead[0].rpartition("@")[2])
    flying, _ = walk(browse.in_flight_page, client, keys, limit=7)
    assert len(flying) == n_retrying == len({r["firing"] for r in flying})
    assert [(r["lease_ms"], r["firing"]) for r in flying] == sorted(
        (r["lease_ms"], r["firing"]) for r in flying
    )
    assert {r["attempts"] for r in flying} == {1}


def test_dead_letters_and_in_flight_firings_page_in_a_stable_order(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    keys = Keys(namespace="dl", shards=SHARDS)
    store = TimerStore(client, keys)
    dead = make_dead_and_in_flight(store, client, 30, 12)
    check_dead_and_in_flight(client, keys, dead, 12)
    # Re-queued and deleted dead letters leave the index with the hash.
    assert store.requeue_dead([dead[0]]) == 1
    assert browse.delete_dead(client, keys, [dead[1], dead[2].rpartition("@")[0]]) == 2
    rows, _ = walk(browse.dead_page, client, keys)
    assert [r["firing"] for r in rows] == dead[3:]
    assert client.zcard(keys.dead_index) == client.hlen(keys.dead) == 27
    assert browse.delete_dead(client, keys, []) == 27
    assert client.zcard(keys.dead_index) == client.hlen(keys.dead) == 0
    assert browse.dead_page(client, keys).rows == []


def test_dead_letters_written_before_the_index_are_indexed_by_the_first_page(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    keys = Keys(namespace="old", shards=SHARDS)
    store = TimerStore(client, keys)
    dead = make_dead_and_in_flight(store, client, 3, 0)
    # As a listener of 0.3 wrote them: the hash only, one from before firing ids.
    client.hset(
        keys.dead,
        "OLD1:cancel",
        json.dumps({"due_ms": 5, "attempts": 3, "error": "x", "dead_ms": 9}),
    )
    client.hset(
        keys.dead,
        "OLD2:cancel@7",
        json.dumps(
            {"timer": "OLD2:cancel", "due_ms": 7, "attempts": 3, "error": "x", "dead_ms": 9}
        ),
    )
    # ... and an index entry whose dead letter an old listener re-queued.
    client.zadd(keys.dead_index, {"GONE:cancel@6": 6})
    rows, _ = walk(browse.dead_page, client, keys)
    assert [r["firing"] for r in rows] == ["OLD1:cancel", "OLD2:cancel@7", *dead]
    assert client.zcard(keys.dead_index) == client.hlen(keys.dead) == 5
    assert browse.timers_of_order(client, keys, "OLD1", ["cancel", "complete"]) == ["OLD1:cancel"]
    assert browse.sync_dead_index(client, keys) == 0


def test_timers_of_an_order_are_found_pending_in_flight_dead_or_as_a_plain_ttl_key(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    keys = Keys(namespace="find", shards=SHARDS)
    store = TimerStore(client, keys)
    dead = make_dead_and_in_flight(store, client, 1, 1)  # D0 dead, D1 in flight
    store.schedule([("D0:complete", "in", 60_000)])
    client.set("P9:cancel", "x", px=60_000)  # a legacy producer's SETEX
    assert browse.timers_of_order(client, keys, "D0", ["cancel", "complete", "refund"]) == [
        dead[0].rpartition("@")[0],
        "D0:complete",
    ]
    assert browse.timers_of_order(client, keys, "D1", ["cancel"]) == ["D1:cancel"]
    assert browse.timers_of_order(client, keys, "P9", ["cancel"]) == ["P9:cancel"]
    assert browse.timers_of_order(client, keys, "NOPE", ["cancel"]) == []
    with pytest.raises(InvalidInput):
        browse.timers_of_order(client, keys, "bad sn", ["cancel"])


def test_cluster_lists_page_over_every_slot_in_order(redis_cluster: ServerCluster) -> None:
    client: Any = redis_cluster.client()
    keys = Keys()
    store = ClusterStore(client, keys)
    timers = spread(400, redis_now_ms(client), "K")
    store.schedule_bulk([timers])
    rows, reads = walk(browse.pending_page, client, keys, limit=40)
    assert [(r["due_ms"], r["timer"]) for r in rows] == sorted((d, k) for k, _, d in timers)
    # One read per slot, then one per chosen slot (and ties): never more than that.
    assert max(reads) <= 16384 + 2 * 41 + 10, reads
    dead = make_dead_and_in_flight(store, client, 9, 5)
    check_dead_and_in_flight(client, keys, dead, 5)
    assert browse.delete_dead(client, keys, dead[:2]) == 2
    assert browse.timers_of_order(client, keys, "D3", ["cancel"]) == ["D3:cancel"]
    assert browse.delete_dead(client, keys, []) == 7
    assert browse.dead_page(client, keys).rows == []


def test_bad_input_is_one_line(redis_server: RedisServer) -> None:
    client: redis.Redis = redis_server.client()
    with pytest.raises(InvalidInput, match="invalid action"):
        browse.timers_of_order(client, Keys(), "SN1", ["no:colons"])


def test_pages_are_the_same_where_the_acl_refuses_scripts(redis_server: RedisServer) -> None:
    """peek_after.lua refused (no EVALSHA): one command per shard instead, same rows."""
    admin = redis_server.client()
    keys = Keys(namespace="acl", shards=SHARDS)
    TimerStore(admin, keys).schedule(spread(300, redis_now_ms(admin), "A"))
    admin.acl_setuser("reader", enabled=True, nopass=True, keys=["*"], commands=["+@read"])
    reader = redis.Redis(port=redis_server.port, username="reader", decode_responses=True)
    assert walk(browse.pending_page, reader, keys)[0] == walk(browse.pending_page, admin, keys)[0]
    evalsha = admin.info("commandstats")["cmdstat_evalsha"]
    assert evalsha["calls"] >= 1 and evalsha["rejected_calls"] >= 1, evalsha


@pytest.mark.slow
def test_with_a_million_pending_every_first_page_is_a_few_dozen_commands(
    redis_server: RedisServer,
) -> None:
    """The 1,000,000-timer case of benchmarks/dashboard_load.py, as a check: the first
    pages read what a page needs, a deep page one read per shard, and the figures that
    /metrics and the dashboard share come from one read per FIGURES_CACHE_S."""
    from datetime import timedelta

    from delayq.figures import CachedFigures
    from delayq.producer import Producer

    client = redis_server.client()
    keys = Keys()
    producer = Producer(client, keys)
    for start in range(0, 1_000_000, 20_000):
        producer.schedule_many(
            [
                (f"M{j:09d}", timedelta(days=1, milliseconds=100 * j))
                for j in range(start, start + 20_000)
            ]
        )
    first = browse.pending_page(client, keys)
    assert first.reads <= 2 * (LIMIT * 2 + 1) + 3
    assert [r["timer"] for r in first.rows] == [f"M{j:09d}:cancel" for j in range(50)]
    opened_at = first.rows[0]["due_ms"] + 50_000_000  # about the 500,000th timer
    deep = browse.pending_page(client, keys, after=browse.pending_cursor(opened_at))
    j = int(deep.rows[0]["order_sn"][1:])
    assert [r["timer"] for r in deep.rows] == [f"M{i:09d}:cancel" for i in range(j, j + 50)]
    before = f"M{j - 1:09d}:cancel"
    assert deep.rows[0]["due_ms"] >= opened_at > client.zscore(keys.shard(before), before)
    assert deep.reads <= 16_384 + 2 * 51 + 10
    cache = CachedFigures(client, keys)
    assert cache.get()["pending"] == cache.get(dead_limit=0)["pending"] == 1_000_000
    assert cache.reads == 1
