"""Bulk scheduling on one Redis: the index's heads when a call touches a shard several
times, the order of overlapping round trips (delayq.bulk), and what it survives: a
script cache flushed, a connection Redis closed, too few replicas."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest
import redis

from delayq.errors import NotReplicated
from delayq.keys import Keys
from delayq.producer import Producer
from delayq.store import BULK_CHUNK, BULK_FIRST_ROUND, BULK_PIPELINE_DEPTH, TimerStore
from delayq.timing import to_ms
from tests.harness import index_score, index_size
from tests.servers import SERVER_KINDS, RedisServer, free_port, wait_for

KEYS = Keys(db=0)

#: On Redis and on Valkey (the server_kind fixture, tests/conftest.py).
on_each_server = pytest.mark.parametrize("server_kind", SERVER_KINDS)

#: Three round trips: a first small one, a full one, and one call of one timer.
THREE_ROUNDS = BULK_CHUNK * (BULK_FIRST_ROUND + BULK_PIPELINE_DEPTH) + 1


@pytest.fixture
def client(redis_server: RedisServer) -> redis.Redis:
    return redis_server.client()


def same_shard_keys(count: int, shards: int) -> list[list[str]]:
    """`shards` groups of `count` timer keys, each group's keys in one index shard."""
    groups: dict[int, list[str]] = defaultdict(list)
    n = 0
    while sum(len(g) >= count for g in groups.values()) < shards:
        key = f"SH{n}:cancel"
        groups[KEYS.shard_id(key)].append(key)
        n += 1
    return [g[:count] for g in groups.values() if len(g) >= count][:shards]


def shard_head(client: redis.Redis, key: str) -> float | None:
    """The due time `heads` holds for `key`'s shard."""
    score: float | None = client.zscore(KEYS.heads, KEYS.shard_id(key))
    return score


@on_each_server
def test_one_call_over_several_shards_with_several_timers_in_one_keeps_every_head_exact(
    client: redis.Redis,
) -> None:
    (a1, a2, a3), (b1, b2, _), (c1, _, _) = same_shard_keys(3, 3)
    store = TimerStore(client, KEYS)
    now = int(client.time()[0]) * 1000
    # a1 is its shard's head, and the call moves it later: the head must follow.
    store.schedule([(a1, "at", now + 600_000), (a2, "at", now + 900_000)])

    due = store.schedule(
        [
            (a1, "at", now + 3_600_000),  # moved later: was the head
            (a3, "at", now + 1_200_000),  # new, not the earliest of its shard
            (b1, "in", 300_000),  # new in an empty shard ...
            (b2, "in", 2_400_000),
            (b1, "in", 3_000_000),  # ... then moved later in the same call
            (c1, "at", now - 5_000),  # in the past: indexed as due, no TTL key
        ]
    )

    assert due[0] == now + 3_600_000 and due[1] == now + 1_200_000 and due[5] == now - 5_000
    assert due[4] - due[2] == 2_700_000
    assert index_size(client) == 6  # heads name exactly the non-empty shards, each its earliest
    assert shard_head(client, a1) == now + 900_000  # a2 now
    assert shard_head(client, b1) == due[3]  # b2: b1's first entry is gone
    assert shard_head(client, c1) == now - 5_000
    assert client.exists(c1) == 0
    for key, ms in [(a1, due[0]), (a3, due[1]), (b1, due[4]), (b2, due[3])]:
        assert index_score(client, key) == ms
        assert client.pexpiretime(key) == ms


@on_each_server
def test_a_call_past_the_slices_of_one_zadd_on_heads_keeps_every_head(
    client: redis.Redis,
) -> None:
    # 1,500 timers in one script call: more new heads than one ZADD is given.
    store = TimerStore(client, KEYS)
    store.schedule([(f"ONE{i}:cancel", "in", 3_600_000 + i) for i in range(1_500)])
    assert index_size(client) == 1_500


@on_each_server
def test_schedule_many_over_three_round_trips_keeps_the_order_the_last_schedule_wins(
    client: redis.Redis,
) -> None:
    base = datetime.now(UTC) + timedelta(hours=1)
    items = [(f"R{i}", base + timedelta(milliseconds=i)) for i in range(THREE_ROUNDS)]
    # The same timers again further on: in the next round trip, and in the very last call.
    items[BULK_CHUNK * BULK_FIRST_ROUND + 7] = ("R0", base + timedelta(hours=2))
    items[-1] = ("R1", base + timedelta(hours=3))

    assert Producer(client, KEYS).schedule_many(items) == THREE_ROUNDS

    assert index_size(client) == THREE_ROUNDS - 2
    for key, due in [
        ("R0:cancel", base + timedelta(hours=2)),
        ("R1:cancel", base + timedelta(hours=3)),
    ]:
        assert index_score(client, key) == to_ms(due)
        assert client.pexpiretime(key) == to_ms(due)


@on_each_server
def test_schedule_many_after_the_script_cache_was_flushed_loads_it_and_writes_everything(
    client: redis.Redis,
) -> None:
    producer = Producer(client, KEYS)
    producer.schedule_many([("FIRST", "1h")])
    client.script_flush()

    assert producer.schedule_many([(f"F{i}", "1h") for i in range(THREE_ROUNDS)]) == THREE_ROUNDS
    assert index_size(client) == THREE_ROUNDS + 1


@on_each_server
def test_schedule_many_on_a_connection_redis_closed_writes_everything_on_a_new_one(
    client: redis.Redis, redis_server: RedisServer
) -> None:
    producer = Producer(client, KEYS)
    producer.schedule_many([("FIRST", "1h")])
    # Redis drops the producer's idle pooled connection (a timeout, a restart of a proxy).
    admin = redis_server.client()
    assert admin.client_kill_filter(_type="normal", skipme=True) >= 1

    assert producer.schedule_many([(f"K{i}", "1h") for i in range(THREE_ROUNDS)]) == THREE_ROUNDS
    assert index_size(client) == THREE_ROUNDS + 1


@on_each_server
def test_schedule_many_wanting_a_replica_that_is_not_there_raises_not_replicated(
    client: redis.Redis,
) -> None:
    producer = Producer(client, KEYS, wait_replicas=1, wait_timeout_ms=20)

    with pytest.raises(NotReplicated, match="only 0 of 1 replicas"):
        producer.schedule_many([(f"W{i}", "1h") for i in range(THREE_ROUNDS)])
    # The first round trip reached the primary; the connection is clean for the next call.
    wait_for(lambda: client.exists("W0:cancel") == 1, 5, what="the first round on the primary")
    assert Producer(client, KEYS).schedule_many([("AFTER", "1h")]) == 1
    assert index_score(client, "AFTER:cancel") is not None


def test_schedule_many_of_nothing_takes_no_connection() -> None:
    nobody = redis.Redis(port=free_port(), socket_connect_timeout=0.2)
    assert Producer(nobody, KEYS).schedule_many([]) == 0
