"""The chart's data (delayq.firing_stats): firings per minute and lateness percentiles over
the last hour, written by every listener with its acks, on one Redis and a cluster; and the
cached Redis figures that /metrics and the dashboard share."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from delayq import firing_stats
from delayq.cluster.store import ClusterStore
from delayq.figures import CachedFigures
from delayq.firing_stats import BOUNDS, MINUTE_MS, bucket_of, last_hour, percentile
from delayq.keys import Keys
from delayq.producer import Producer
from delayq.store import TimerStore
from tests.cluster import ServerCluster
from tests.harness import (
    ListenerProcess,
    clean_env,
    create_orders,
    engine_for,
    migrate_cli,
    outcome_rows,
)
from tests.servers import RedisServer, wait_for


def test_each_lateness_falls_in_the_bucket_whose_bounds_hold_it() -> None:
    assert bucket_of(-5) == bucket_of(0) == bucket_of(1) == 0
    for i in range(1, len(BOUNDS)):
        assert bucket_of(BOUNDS[i]) == i
        assert bucket_of(BOUNDS[i - 1] * 1.0001) == i
    assert bucket_of(10**9) == len(BOUNDS)


def test_percentiles_from_the_histogram_are_within_the_stated_error() -> None:
    rng = random.Random(7)
    for _ in range(50):
        values = sorted(rng.lognormvariate(1.5, 1.5) for _ in range(rng.randint(1, 3000)))
        histogram = [0] * (len(BOUNDS) + 1)
        for v in values:
            histogram[bucket_of(v)] += 1
        for q in (0.5, 0.99):
            true = values[max(1, -(-int(q * len(values) * 1000) // 1000)) - 1]
            estimate = percentile(histogram, q)
            assert estimate is not None
            # Off by less than its bucket: 1 ms below 1 ms, else 41% of the value.
            assert abs(estimate - true) <= max(1.0, 0.415 * true), (q, true, estimate)
    assert percentile([0] * (len(BOUNDS) + 1), 0.5) is None


def test_batches_acked_by_several_listeners_add_up_per_minute(redis_server: RedisServer) -> None:
    client = redis_server.client()
    keys = Keys()
    store = TimerStore(client, keys)
    now = 1_800_000_000_000
    minute = now // MINUTE_MS
    # Two listeners' batches in the current minute, one batch ten minutes before.
    store.ack([], 1000, firing_stats.record_call(keys, 3, [2.0, 2.5, 900.0], now_ms=now))
    store.ack([], 1000, firing_stats.record_call(keys, 2, [2.2], now_ms=now + 10))
    store.ack([], 1000, firing_stats.record_call(keys, 1, [], now_ms=now - 10 * MINUTE_MS))
    rows = last_hour(client, keys, now_ms=now)
    assert len(rows) == 60
    assert rows[-1]["minute"].startswith("2027-01-15T08:00:00")
    assert rows[-1]["fired"] == 5 and rows[-11]["fired"] == 1
    assert rows[-11]["p50_ms"] is None
    assert 1.41 <= rows[-1]["p50_ms"] <= 2.83 and 640 <= rows[-1]["p99_ms"] <= 1024
    assert sum(r["fired"] for r in rows) == 6
    # Kept two hours, then gone on their own.
    assert 0 < client.pttl(keys.firing_stats(minute)) <= firing_stats.KEEP_MS


def test_a_cluster_counts_the_firings_in_the_same_round_as_the_acks(
    redis_cluster: ServerCluster,
) -> None:
    client: Any = redis_cluster.client()
    keys = Keys()
    store = ClusterStore(client, keys)
    sec, _ = client.time()
    store.schedule([(f"C{i}:cancel", "at", sec * 1000 - 1000) for i in range(20)])
    store.refresh_view()
    ids = [f.id for f in store.claim_due(100, 60_000).firings]
    assert len(ids) == 20
    store.ack(ids, 1000, firing_stats.record_call(keys, 20, [3.0] * 20, now_ms=sec * 1000))
    assert all(client.zcard(store.partition_of(f"C{i}:cancel").claims) == 0 for i in range(20))
    rows = last_hour(client, keys, now_ms=sec * 1000)
    assert rows[-1]["fired"] == 20 and 2.83 <= rows[-1]["p50_ms"] <= 4.0


def test_the_listener_counts_what_it_fires_in_the_chart(
    redis_server: RedisServer, sqlite_url: str, tmp_path: Path
) -> None:
    env = clean_env(REDIS_URL=redis_server.url(0), DATABASE_URL=sqlite_url, HOME=str(tmp_path))
    migrate_cli(env)
    engine = engine_for(sqlite_url)
    create_orders(engine, ["S1", "S2", "S3"])
    listener = ListenerProcess(env, tmp_path / "listener.log", ()).start()
    try:
        client = redis_server.client()
        Producer(client, Keys()).schedule_many([("S1", 0), ("S2", 0), ("S3", 0), ("S4", 0)])
        wait_for(lambda: len(outcome_rows(engine)) == 4, 30, what="four outcomes")
        wait_for(
            lambda: sum(r["fired"] for r in last_hour(client, Keys())) == 4, 10, what="counted"
        )
        rows = last_hour(client, Keys())
        assert [r["p99_ms"] is not None for r in rows].count(True) >= 1
    finally:
        listener.stop()


def test_figures_are_read_once_per_ttl_however_many_ask(redis_server: RedisServer) -> None:
    client = redis_server.client()
    now = [0.0]
    cache = CachedFigures(client, Keys(), ttl_s=5.0, clock=lambda: now[0])
    Producer(client, Keys()).schedule("F1", 3600)
    assert cache.get(dead_limit=0)["pending"] == 1
    Producer(client, Keys()).schedule("F2", 3600)
    assert cache.get(dead_limit=0)["pending"] == 1  # within the TTL: the same read
    assert cache.get(dead_limit=0)["pending"] == 1 and cache.reads == 1
    now[0] = 5.0
    assert cache.get(dead_limit=0)["pending"] == 2 and cache.reads == 2
    # Asking for more dead letters than the read had: read again, and keep the larger.
    cache.get(dead_limit=10)
    cache.get(dead_limit=0)
    assert cache.reads == 3


@pytest.mark.parametrize("limit", [0, 3])
def test_cached_figures_hand_out_copies(redis_server: RedisServer, limit: int) -> None:
    cache = CachedFigures(redis_server.client(), Keys())
    first = cache.get(dead_limit=limit)
    first["listeners"].append("mutated")
    assert "mutated" not in cache.get(dead_limit=limit)["listeners"]
