"""What the order service sees when Redis fails or refuses: a delayq exception per kind of
failure, one line naming the server (password masked) and, for ACL refusals, the rule to
add; redis-py's exception kept as the cause. Each against a real server set up to fail
that way (a TCP proxy stands in for DNS moving to a new primary)."""

from __future__ import annotations

import pytest
import redis

from delayq.errors import InvalidInput, NotReady, ServiceUnavailable
from delayq.keys import Keys
from delayq.producer import Producer
from delayq.redis_errors import OutOfMemory, PermissionDenied, ReadOnlyReplica
from tests.proxy import FreezableProxy
from tests.servers import RedisFactory, RedisServer, free_port


def _producer(url: str) -> Producer:
    return Producer(redis.Redis.from_url(url, decode_responses=True), Keys())


def test_unreachable_redis_is_service_unavailable_with_the_connection_error_as_cause() -> None:
    producer = _producer(f"redis://:s3cret@127.0.0.1:{free_port()}/0")
    with pytest.raises(ServiceUnavailable, match="is not reachable") as err:
        producer.schedule("SN1", "20m")
    assert isinstance(err.value.__cause__, redis.ConnectionError)
    assert "s3cret" not in str(err.value)


def test_acl_refusal_names_the_rule_to_add_and_keeps_the_cause(redis_server: RedisServer) -> None:
    admin = redis_server.client()
    admin.acl_setuser(
        "shop", enabled=True, passwords=["+pw-shop"], keys=["*"], commands=["+@all", "-evalsha"]
    )
    producer = _producer(f"redis://shop:pw-shop@127.0.0.1:{redis_server.port}/0")
    with pytest.raises(PermissionDenied, match=r"needs \+evalsha") as err:
        producer.schedule("SN1", "20m")
    assert isinstance(err.value, NotReady)
    assert isinstance(err.value.__cause__, redis.exceptions.NoPermissionError)
    assert "pw-shop" not in str(err.value)


def test_out_of_memory_redis_refusing_the_timer_is_out_of_memory(redis_server: RedisServer) -> None:
    admin = redis_server.client()
    producer = _producer(redis_server.url(0))
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1")
    try:
        with pytest.raises(OutOfMemory, match="out of memory") as err:
            producer.schedule("SN1", "20m")
    finally:
        admin.config_set("maxmemory", "0")
    assert isinstance(err.value, ServiceUnavailable)
    assert isinstance(err.value.__cause__, redis.exceptions.OutOfMemoryError)
    assert admin.dbsize() == 0


def test_url_pointing_at_a_replica_is_read_only_replica_after_one_retry(
    redis_factory: RedisFactory,
) -> None:
    primary, replica = redis_factory(), redis_factory()
    replica.client().replicaof("127.0.0.1", primary.port)
    producer = _producer(replica.url(0))
    with pytest.raises(ReadOnlyReplica, match="read-only replica") as err:
        producer.schedule("SN1", "20m")
    assert isinstance(err.value.__cause__, redis.exceptions.ReadOnlyError)
    assert primary.client().dbsize() == 0


def test_failover_behind_a_stable_address_is_retried_once_on_a_fresh_connection(
    redis_factory: RedisFactory,
) -> None:
    """The producer's address (a DNS name, a proxy) moves to the new primary; its pooled
    connections still reach the demoted one, which answers READONLY. One retry on fresh
    connections reaches the new primary: the caller sees success."""
    old, new = redis_factory(), redis_factory()
    with FreezableProxy(("127.0.0.1", old.port)) as proxy:
        producer = _producer(f"redis://127.0.0.1:{proxy.port}/0")
        producer.schedule("SN-BEFORE", "20m")
        # Failover: the old primary becomes a replica of the new one; the address moves.
        old.client().replicaof("127.0.0.1", new.port)
        proxy.upstream = ("127.0.0.1", new.port)
        producer.schedule("SN-AFTER", "20m")
    assert new.client().pttl("SN-AFTER:cancel") > 0
    # The first attempt did reach the demoted primary and was refused there.
    assert "errorstat_READONLY" in old.client().info("errorstats")


def test_invalid_input_is_also_a_value_error() -> None:
    producer = _producer(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(ValueError, match="order"):
        producer.schedule("not an order id!", "20m")
    with pytest.raises(InvalidInput):
        producer.schedule("SN1", "twenty minutes")
