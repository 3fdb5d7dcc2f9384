"""The ServerCluster test fixture (tests/cluster.py) on Redis and on Valkey: it comes up
whole, routes keys to their slot owners, and fails over, loses a primary, reshards and
grows as the cluster tests of delayq rely on."""

from __future__ import annotations

import time

import pytest

from tests.cluster import SLOTS, ClusterFactory, ServerCluster, keys_in_slots
from tests.servers import SERVER_KINDS, RedisServer

pytestmark = pytest.mark.parametrize("server_kind", SERVER_KINDS)


def owned_slots(cluster: ServerCluster) -> dict[int, int]:
    """Number of slots each live primary owns, by port."""
    return {node.port: len(cluster.slots_of(node)) for node in cluster.primaries()}


def keys_on(cluster: ServerCluster, primary: RedisServer, count: int) -> list[str]:
    """`count` keys in distinct slots, spread over those `primary` owns now."""
    slots = sorted(cluster.slots_of(primary))
    assert len(slots) >= count
    step = len(slots) // count
    return list(keys_in_slots(slots[::step][:count]).values())


def test_cluster_comes_up_with_three_primaries_a_replica_each_and_all_slots_covered(
    redis_cluster: ServerCluster, server_kind: str
) -> None:
    primaries = redis_cluster.primaries()
    replicas = redis_cluster.replicas()
    assert len(primaries) == 3 and len(replicas) == 3
    assert {node.kind for node in redis_cluster.nodes} == {server_kind}
    assert redis_cluster.url == "redis+cluster://" + ",".join(
        f"127.0.0.1:{node.port}" for node in primaries
    )
    assert sum(owned_slots(redis_cluster).values()) == SLOTS
    assert redis_cluster.node_for_slot(0) is primaries[0]
    assert redis_cluster.node_for_slot(SLOTS - 1) is primaries[-1]
    for primary in primaries:
        assert len(redis_cluster.replicas(primary)) == 1
    for node in redis_cluster.nodes:
        client = node.client()
        info = client.cluster("info")
        assert info["cluster_state"] == "ok"
        assert int(info["cluster_slots_assigned"]) == SLOTS
        assert int(info["cluster_known_nodes"]) == 6
        # Every node, so a replica promoted later publishes keyspace events too.
        events = client.config_get("notify-keyspace-events")["notify-keyspace-events"]
        assert set(events) == set("Egx")
    for replica in replicas:
        replication = replica.client().info("replication")
        assert replication["role"] == "slave"
        assert replication["master_link_status"] == "up"


def test_keys_written_through_the_cluster_client_land_on_their_slot_owners(
    redis_cluster: ServerCluster,
) -> None:
    client = redis_cluster.client()
    keys = [f"key:{index}" for index in range(30)]
    for key in keys:
        client.set(key, key)
    holders = set()
    for key in keys:
        owner = redis_cluster.node_for_key(key)
        holders.add(owner.port)
        assert owner.client().get(key) == key
        for other in redis_cluster.primaries():
            if other is not owner:
                # KEYS, not EXISTS: a node answers MOVED for a key of another's slot.
                assert key not in other.client().keys("*")
    assert len(holders) == 3
    # A hash tag keeps keys together on one slot.
    assert redis_cluster.slot_of("{order:7}:a") == redis_cluster.slot_of("{order:7}:b")


def test_failover_promotes_the_replica_and_demotes_the_primary_keeping_data(
    redis_cluster: ServerCluster,
) -> None:
    old = redis_cluster.primaries()[0]
    (replica,) = redis_cluster.replicas(old)
    key = keys_on(redis_cluster, old, 1)[0]
    client = redis_cluster.client()
    client.set(key, "before")
    old.client().wait(1, 5000)

    new = redis_cluster.failover()

    assert new is replica
    assert redis_cluster.node_for_slot(0) is new
    assert redis_cluster.replicas(new) == [old]
    assert new.client().info("replication")["role"] == "master"
    assert client.get(key) == "before"
    client.set(key, "after")
    assert new.client().get(key) == "after"


def test_kill_primary_promotes_its_replica_while_other_primaries_keep_serving(
    redis_cluster: ServerCluster,
) -> None:
    victim = redis_cluster.primaries()[0]
    (replica,) = redis_cluster.replicas(victim)
    survivor = redis_cluster.primaries()[1]
    client = redis_cluster.client()
    lost_key = keys_on(redis_cluster, victim, 1)[0]
    client.set(lost_key, "replicated")
    victim.client().wait(1, 5000)
    other_key = keys_on(redis_cluster, survivor, 1)[0]

    killed, promoted = redis_cluster.kill_primary()

    assert killed is victim and not victim.alive
    assert promoted is replica
    assert redis_cluster.node_for_slot(0) is promoted
    assert len(redis_cluster.primaries()) == 3
    assert victim not in redis_cluster.primaries() + redis_cluster.replicas()
    # The cluster client finds the new owner; the promoted node has the data.
    assert client.get(lost_key) == "replicated"
    client.set(other_key, "still served")
    assert survivor.client().get(other_key) == "still served"
    events = promoted.client().config_get("notify-keyspace-events")["notify-keyspace-events"]
    assert set(events) == set("Egx")

    # Restarted, the killed node comes back as the promoted node's replica.
    victim.restart()
    redis_cluster.wait_ok()
    assert redis_cluster.replicas(promoted) == [victim]


def test_reshard_moves_the_given_number_of_slots_and_their_keys(
    redis_cluster: ServerCluster,
) -> None:
    source, target = redis_cluster.primaries()[:2]
    source_slots = redis_cluster.slots_of(source)
    target_slots = redis_cluster.slots_of(target)
    client = redis_cluster.client()
    # A key in every slot of the source, so whichever slots move carry data.
    keys = keys_in_slots(source_slots)
    with client.pipeline(transaction=False) as pipe:
        for key in keys.values():
            pipe.set(key, key)
        pipe.execute()

    redis_cluster.reshard(100, source, target)

    moved = source_slots - redis_cluster.slots_of(source)
    assert len(moved) == 100
    assert redis_cluster.slots_of(target) == target_slots | moved
    target_keys = set(target.client().keys("*"))
    source_keys = set(source.client().keys("*"))
    for slot in moved:
        assert keys[slot] in target_keys and keys[slot] not in source_keys
    assert len(source_keys) == len(source_slots) - 100
    sample = list(keys.values())[::50]
    assert [client.get(key) for key in sample] == sample


def test_reshard_in_the_background_while_a_client_keeps_writing(
    redis_cluster: ServerCluster,
) -> None:
    source, target = redis_cluster.primaries()[:2]
    before = owned_slots(redis_cluster)
    client = redis_cluster.client()
    # Keys in the source's lowest slots (those redis-cli moves) and spread over the rest.
    lowest = sorted(redis_cluster.slots_of(source))[:60]
    keys = list(keys_in_slots(lowest).values()) + keys_on(redis_cluster, source, 60)
    values: dict[str, str] = {}

    proc = redis_cluster.reshard_async(50, source, target, pipeline=5)
    rounds = 0
    deadline = time.monotonic() + 60
    try:
        # The client follows MOVED and ASK while slots move under it.
        while (proc.poll() is None or rounds == 0) and time.monotonic() < deadline:
            rounds += 1
            for key in keys:
                values[key] = f"{key}@{rounds}"
                client.set(key, values[key])
    finally:
        redis_cluster.wait_reshard(proc)

    assert owned_slots(redis_cluster)[target.port] == before[target.port] + 50
    assert {key: client.get(key) for key in keys} == values


def test_add_primary_joins_a_fourth_primary_that_owns_slots_and_serves_keys(
    redis_cluster: ServerCluster,
) -> None:
    new = redis_cluster.add_primary(slots=200)

    primaries = redis_cluster.primaries()
    assert len(primaries) == 4 and new in primaries
    slots = owned_slots(redis_cluster)
    assert slots[new.port] == 200
    assert sum(slots.values()) == SLOTS
    client = redis_cluster.client()
    key = keys_on(redis_cluster, new, 1)[0]
    client.set(key, "on the new primary")
    assert new.client().get(key) == "on the new primary"
    assert int(new.client().cluster("info")["cluster_known_nodes"]) == 7
    per_primary = redis_cluster.info_per_primary("keyspace")
    assert set(per_primary) == {node.address for node in primaries}


def test_stop_stops_every_node_even_with_some_already_dead(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(primaries=1, replicas_per_primary=1)
    replica = cluster.replicas()[0]
    replica.kill()
    cluster.stop()
    assert not any(node.alive for node in cluster.nodes)
    cluster.stop()
