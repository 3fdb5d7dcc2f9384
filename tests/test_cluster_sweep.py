"""The sweep on a cluster adopts the keys one SCAN step found in one call per primary
(adopt_node.lua), exactly as the per-slot adopt would, and falls back to it slot by slot."""

from __future__ import annotations

import pytest

from delayq.keys import Keys
from delayq.redis_conn import Scripts
from delayq.store import open_store
from tests.cluster import ServerCluster
from tests.servers import SERVER_KINDS

pytestmark = pytest.mark.parametrize("server_kind", SERVER_KINDS)


def test_sweep_adopts_legacy_keys_of_many_slots_per_primary_at_their_expiry(
    redis_cluster: ServerCluster,
) -> None:
    client = redis_cluster.client()
    store = open_store(client, Keys(), Scripts.register(client))  # type: ignore[arg-type]
    keys = [f"LEGACY{i}:cancel" for i in range(300)]
    for key in keys:
        client.set(key, "1", px=3_600_000)
    expiry = {key: int(client.pexpiretime(key)) for key in keys}
    assert {redis_cluster.node_for_key(k).port for k in keys} == {
        p.port for p in redis_cluster.primaries()
    }, "the keys span every primary"

    assert store.adopt_on_node(keys) == len(keys)  # type: ignore[attr-defined]

    for key in keys:
        assert store.timer_state(key).pending_due_ms == expiry[key]
    # Adopted once: a second pass finds every key indexed at its expiry already.
    assert store.adopt_on_node(keys) == 0  # type: ignore[attr-defined]
    # A key re-armed since is moved to its new expiry, as adopt.lua does.
    client.set(keys[0], "1", px=7_200_000)
    assert store.adopt_on_node(keys) == 1  # type: ignore[attr-defined]
    assert store.timer_state(keys[0]).pending_due_ms == int(client.pexpiretime(keys[0]))


def test_sweep_pass_visits_every_primary_in_turn_and_finds_every_key(
    redis_cluster: ServerCluster,
) -> None:
    client = redis_cluster.client()
    store = open_store(client, Keys(), Scripts.register(client))  # type: ignore[arg-type]
    keys = {f"SWEPT{i}:cancel" for i in range(500)}
    for key in keys:
        client.set(key, "1", px=3_600_000)
    found: set[str] = set()
    cursor, steps = 0, 0
    while True:
        cursor, batch = store.scan_timers(cursor, 50)
        found.update(batch)
        steps += 1
        assert steps < 10_000, "the pass never completes"
        if cursor == 0:
            break
    assert found == keys
