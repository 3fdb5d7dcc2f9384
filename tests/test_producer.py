"""The producer against a real redis-server: what `schedule_expiry` and `cancel_expiry`
leave in Redis, exactly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
import redis

from delayq.errors import InvalidInput, ServiceUnavailable
from delayq.keys import Keys
from delayq.producer import BULK_CHUNK, BULK_PIPELINE_DEPTH, Producer
from delayq.timing import from_ms, to_ms
from tests import harness
from tests.harness import index_members, index_size
from tests.servers import SERVER_KINDS, RedisServer, wait_for

KEYS = Keys(db=0)

# Every test here runs on Redis and on Valkey (the server_kind fixture, tests/conftest.py).
pytestmark = pytest.mark.parametrize("server_kind", SERVER_KINDS)


@pytest.fixture
def client(redis_server: RedisServer) -> redis.Redis:
    return redis_server.client()


@pytest.fixture
def producer(client: redis.Redis) -> Producer:
    return Producer(client, KEYS)


def redis_now_ms(client: redis.Redis) -> int:
    sec, usec = client.time()
    return int(sec) * 1000 + int(usec) // 1000


def index_score(client: redis.Redis, key: str) -> int | None:
    score = harness.index_score(client, key)
    return None if score is None else int(score)


def assert_armed(client: redis.Redis, key: str, due: datetime) -> None:
    """The TTL key and the index entry agree with each other and with `due`, to the ms."""
    due_ms = to_ms(due)
    assert client.pexpiretime(key) == due_ms
    assert index_score(client, key) == due_ms


def test_scheduling_writes_a_ttl_key_and_an_index_entry_with_the_same_due_ms(
    producer: Producer, client: redis.Redis
) -> None:
    before = redis_now_ms(client)
    due = producer.schedule("SN123", "20m")
    after = redis_now_ms(client)

    assert due.tzinfo == UTC
    assert before + 1_200_000 <= to_ms(due) <= after + 1_200_000
    assert client.get("SN123:cancel") is not None
    assert_armed(client, "SN123:cancel", due)
    assert index_members(client) == ["SN123:cancel"]


def test_scheduling_again_moves_the_due_time_last_write_wins(
    producer: Producer, client: redis.Redis
) -> None:
    first = producer.schedule("SN1", "20m")
    earlier = producer.schedule("SN1", "5m")
    assert earlier < first
    assert_armed(client, "SN1:cancel", earlier)

    later = producer.schedule("SN1", timedelta(hours=1))
    assert later > first
    assert_armed(client, "SN1:cancel", later)
    assert index_size(client) == 1


def test_scheduling_at_an_absolute_aware_time_arms_exactly_that_time_in_utc(
    producer: Producer, client: redis.Redis
) -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    at = (datetime.now(UTC) + timedelta(hours=2)).astimezone(india).replace(microsecond=123_456)

    due = producer.schedule("SN1", at=at)

    # Microseconds round up: the timer is never early.
    assert due == from_ms(to_ms(at))
    assert due >= at
    assert due - at < timedelta(milliseconds=1)
    assert due.tzinfo == UTC
    assert_armed(client, "SN1:cancel", due)


def test_scheduling_at_an_iso_string_with_an_offset(
    producer: Producer, client: redis.Redis
) -> None:
    year = datetime.now(UTC).year + 1
    due = producer.schedule("SN1", at=f"{year}-06-01T12:00:00+02:00")
    assert due == datetime(year, 6, 1, 10, 0, tzinfo=UTC)
    assert_armed(client, "SN1:cancel", due)


@pytest.mark.parametrize("delay", [0, 0.0, "0s", timedelta(0)])
def test_a_zero_delay_puts_the_timer_in_the_index_as_due_now_without_a_ttl_key(
    producer: Producer, client: redis.Redis, delay: object
) -> None:
    due = producer.schedule("SN1", delay)  # type: ignore[arg-type]

    assert client.exists("SN1:cancel") == 0
    score = index_score(client, "SN1:cancel")
    assert score == to_ms(due)
    assert score <= redis_now_ms(client)


def test_a_past_due_time_puts_the_timer_in_the_index_as_due_without_a_ttl_key(
    producer: Producer, client: redis.Redis
) -> None:
    at = datetime.now(UTC) - timedelta(hours=1)
    due = producer.schedule("SN1", at=at)

    assert client.exists("SN1:cancel") == 0
    assert index_score(client, "SN1:cancel") == to_ms(at) == to_ms(due)


def test_rescheduling_a_pending_timer_to_now_removes_its_ttl_key(
    producer: Producer, client: redis.Redis
) -> None:
    producer.schedule("SN1", "20m")
    assert client.exists("SN1:cancel") == 1

    due = producer.schedule("SN1", 0)

    # A TTL key left behind would fire the order a second time 20 minutes later.
    assert client.exists("SN1:cancel") == 0
    assert index_score(client, "SN1:cancel") == to_ms(due)


def test_schedule_needs_exactly_one_of_delay_and_at(
    producer: Producer, client: redis.Redis
) -> None:
    with pytest.raises(InvalidInput):
        producer.schedule("SN1")
    with pytest.raises(InvalidInput):
        producer.schedule("SN1", "20m", at=datetime.now(UTC) + timedelta(hours=1))
    assert client.dbsize() == 0


@pytest.mark.parametrize(
    ("order_sn", "delay", "kwargs"),
    [
        ("SN:1", "20m", {}),
        ("SN1", "5x", {}),
        ("SN1", -1, {}),
        ("SN1", "20m", {"action": "Cancel"}),
        ("SN1", None, {"at": "2030-01-01T00:00:00"}),
    ],
)
def test_a_bad_schedule_call_raises_invalid_input_and_writes_nothing(
    producer: Producer, client: redis.Redis, order_sn: str, delay: object, kwargs: dict[str, str]
) -> None:
    with pytest.raises(InvalidInput):
        producer.schedule(order_sn, delay, **kwargs)  # type: ignore[arg-type]
    assert client.dbsize() == 0


def test_cancel_removes_the_ttl_key_and_the_index_entry(
    producer: Producer, client: redis.Redis
) -> None:
    producer.schedule("SN1", "20m")

    assert producer.cancel("SN1") is True

    assert client.exists("SN1:cancel") == 0
    assert index_score(client, "SN1:cancel") is None


def test_cancelling_twice_returns_false_the_second_time(
    producer: Producer, client: redis.Redis
) -> None:
    producer.schedule("SN1", "20m")
    assert producer.cancel("SN1") is True
    assert producer.cancel("SN1") is False
    assert index_size(client) == 0


def test_cancelling_a_never_scheduled_order_returns_false(
    producer: Producer, client: redis.Redis
) -> None:
    producer.schedule("SN2", "20m")

    assert producer.cancel("SN1") is False

    # The other order's timer is untouched.
    assert client.exists("SN2:cancel") == 1
    assert index_size(client) == 1


def test_cancelling_a_due_timer_that_has_no_ttl_key_returns_true(
    producer: Producer, client: redis.Redis
) -> None:
    producer.schedule("SN1", 0)
    assert producer.cancel("SN1") is True
    assert index_score(client, "SN1:cancel") is None


def test_cancelling_a_legacy_setex_timer_deletes_it(
    producer: Producer, client: redis.Redis
) -> None:
    # What existing producers do today: no index entry at all.
    client.execute_command("SETEX", "SN1:cancel", 100, "x")

    assert producer.cancel("SN1") is True

    assert client.exists("SN1:cancel") == 0


def test_actions_are_separate_timers_of_the_same_order(
    producer: Producer, client: redis.Redis
) -> None:
    cancel_due = producer.schedule("SN1", "20m")
    complete_due = producer.schedule("SN1", "7d", action="complete")
    assert_armed(client, "SN1:cancel", cancel_due)
    assert_armed(client, "SN1:complete", complete_due)

    assert producer.cancel("SN1") is True

    assert client.exists("SN1:cancel") == 0
    assert_armed(client, "SN1:complete", complete_due)
    assert producer.cancel("SN1", action="complete") is True
    assert client.dbsize() == 0


def test_schedule_many_writes_twenty_thousand_mixed_timers(
    producer: Producer, client: redis.Redis
) -> None:
    base = datetime.now(UTC) + timedelta(hours=1)
    items: list[tuple[object, ...]] = []
    expected_at: dict[str, int] = {}
    for i in range(20_000):
        sn = f"SN{i:05d}"
        kind = i % 5
        if kind == 0:
            items.append((sn, 600 + i))
        elif kind == 1:
            items.append((sn, "20m", "complete"))
        elif kind == 2:
            at = base + timedelta(milliseconds=i, microseconds=7)
            items.append((sn, at))
            expected_at[f"{sn}:cancel"] = to_ms(at)
        elif kind == 3:
            items.append((sn, timedelta(minutes=30), "remind"))
        else:
            items.append([sn, "1h30m"])

    assert producer.schedule_many(items) == 20_000  # type: ignore[arg-type]

    assert index_size(client) == 20_000
    # Every timer key, each index shard in use, and the shards' heads.
    assert client.dbsize() == 20_000 + client.zcard(KEYS.heads) + 1
    assert client.exists("SN00000:cancel", "SN00001:complete", "SN00003:remind") == 3
    for key, due_ms in list(expected_at.items())[:50]:
        assert index_score(client, key) == due_ms
        assert client.pexpiretime(key) == due_ms


def test_schedule_many_of_a_generator_and_of_nothing(
    producer: Producer, client: redis.Redis
) -> None:
    assert producer.schedule_many([]) == 0
    assert producer.schedule_many((f"G{i}", "1h") for i in range(3)) == 3
    assert index_size(client) == 3


BAD_ITEMS = [
    ("SN:bad", "20m"),
    ("SN bad", "20m"),
    ("", "20m"),
    ("SNbad", "5x"),
    ("SNbad", -1),
    ("SNbad", "20m", "Cancel"),
    ("SNbad", datetime(2030, 1, 1, 10, 0)),
    ("SNbad",),
    ("SNbad", "20m", "cancel", "extra"),
    "SNbad",
    # The usual shape (str, timedelta, action) is checked by a shorter way: its limits.
    ("x" * 65, timedelta(minutes=20)),
    (12345, timedelta(minutes=20)),
    ("SNbad", timedelta(seconds=-1)),
    ("SNbad", timedelta(days=3700)),
    ("SNbad", timedelta(minutes=20), "Cancel"),
    ("SNbad", timedelta(minutes=20), 7),
]


@pytest.mark.parametrize("bad", BAD_ITEMS, ids=repr)
@pytest.mark.parametrize("position", ["first", "last"])
def test_a_bad_item_anywhere_in_schedule_many_writes_nothing(
    producer: Producer, client: redis.Redis, bad: object, position: str
) -> None:
    # More good items than one pipelined round trip holds: validating lazily would
    # already have written the first round trip when the bad item is reached.
    good = [(f"OK{i}", "20m") for i in range(BULK_CHUNK * BULK_PIPELINE_DEPTH + 1)]
    items = [bad, *good] if position == "first" else [*good, bad]

    with pytest.raises(InvalidInput):
        producer.schedule_many(items)  # type: ignore[arg-type]

    assert client.dbsize() == 0


def _subscribed(client: redis.Redis) -> redis.client.PubSub:
    pubsub = client.pubsub()
    pubsub.subscribe(KEYS.wake_channel)
    wait_for(
        lambda: (m := pubsub.get_message(timeout=0.05)) is not None and m["type"] == "subscribe",
        5,
        what="subscription to the wake channel",
    )
    return pubsub


def _next_wake(pubsub: redis.client.PubSub) -> int:
    message = wait_for(
        lambda: pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05),
        5,
        what="a message on the wake channel",
    )
    assert message["channel"] == KEYS.wake_channel
    return int(message["data"])


def test_scheduling_earlier_than_every_pending_timer_wakes_the_listeners(
    producer: Producer, client: redis.Redis
) -> None:
    pubsub = _subscribed(client)
    try:
        first = producer.schedule("SN1", "1h")
        assert _next_wake(pubsub) == to_ms(first)  # the index was empty

        earlier = producer.schedule("SN2", "10m")
        assert _next_wake(pubsub) == to_ms(earlier)
    finally:
        pubsub.close()


def test_scheduling_later_than_the_earliest_timer_does_not_wake_the_listeners(
    producer: Producer, client: redis.Redis
) -> None:
    head = producer.schedule("SN1", "10m")
    pubsub = _subscribed(client)
    try:
        producer.schedule("SN2", "1h")
        producer.schedule_many([("SN3", "2h"), ("SN4", "30m")])
        # A timer that is earlier again is published; it must be the very next message,
        # which proves the later ones published nothing.
        sentinel = producer.schedule("SN5", "1m")
        assert _next_wake(pubsub) == to_ms(sentinel)
        assert to_ms(sentinel) < to_ms(head)
    finally:
        pubsub.close()


def test_schedule_many_wakes_the_listeners_once_with_its_earliest_timer(
    producer: Producer, client: redis.Redis
) -> None:
    producer.schedule("SN0", "1h")
    pubsub = _subscribed(client)
    try:
        at = datetime.now(UTC) + timedelta(minutes=5)
        producer.schedule_many([("SN1", "2h"), ("SN2", at), ("SN3", "50m")])
        assert _next_wake(pubsub) == to_ms(at)
    finally:
        pubsub.close()


def test_a_redis_that_is_down_gives_service_unavailable_naming_the_url(
    redis_server: RedisServer, producer: Producer
) -> None:
    url = redis_server.url()
    redis_server.stop()

    with pytest.raises(ServiceUnavailable) as scheduling:
        producer.schedule("SN1", "20m")
    with pytest.raises(ServiceUnavailable) as cancelling:
        producer.cancel("SN1")
    with pytest.raises(ServiceUnavailable) as bulk:
        producer.schedule_many([("SN1", "20m")])

    for caught in (scheduling, cancelling, bulk):
        assert url in str(caught.value)
        assert "not reachable" in str(caught.value)
