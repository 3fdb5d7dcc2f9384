"""delayq.inspect, delayq.status and delayq.pending from Python, as an order service or a
support script calls them: configured by the environment, against a real Redis (and the
database, for outcomes)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import delayq
from delayq import introspect, producer
from delayq.store import PENDING_PAGE_SHARDS
from tests.harness import clean_env, migrate_cli
from tests.servers import RedisServer


@pytest.fixture
def configured(
    redis_server: RedisServer, sqlite_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[RedisServer]:
    """The process configured by DELAYQ_* variables, its default producer made afresh."""
    env = clean_env(REDIS_URL=redis_server.url(0), DATABASE_URL=sqlite_url)
    migrate_cli({**env, "HOME": str(tmp_path)})
    for name in [n for n in os.environ if n.startswith("DELAYQ_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("DELAYQ_REDIS_URL", redis_server.url(0))
    monkeypatch.setenv("DELAYQ_DATABASE_URL", sqlite_url)
    monkeypatch.chdir(tmp_path)  # no developer's .env
    _forget_defaults()
    yield redis_server
    _forget_defaults()


def _forget_defaults() -> None:
    producer._default = None
    introspect._settings.cache_clear()
    introspect._engine.cache_clear()


def test_inspect_shows_a_pending_timer_with_its_due_time_and_no_outcome(
    configured: RedisServer,
) -> None:
    due = delayq.schedule_expiry("SN-LOOK", "20m")
    info = delayq.inspect("SN-LOOK")
    assert info["timer"] == "SN-LOOK:cancel"
    assert info["state"] == "pending"
    assert datetime.fromisoformat(info["due_at"]) == due
    assert info["last_outcome"] is None
    assert delayq.inspect("SN-NEVER", action="complete")["state"] == "none"


def test_status_counts_pending_timers(configured: RedisServer) -> None:
    delayq.schedule_many([(f"SN-S{i}", "1h") for i in range(25)])
    figures = delayq.status()
    assert figures["pending"] == 25
    assert figures["outcomes_last_hour"] == {}
    assert "redis" in figures


def test_pending_lists_every_timer_once_with_prefix_and_limit(configured: RedisServer) -> None:
    now = datetime.now(UTC)
    delayq.schedule_many(
        [(f"SN-A{i:04}", now + timedelta(minutes=10, seconds=i)) for i in range(600)]
        + [(f"SN-B{i:04}", now + timedelta(hours=1), "complete") for i in range(400)]
    )
    everything = list(delayq.pending())
    assert len(everything) == 1000
    assert len({(t.order_sn, t.action) for t in everything}) == 1000
    only_b = list(delayq.pending(prefix="SN-B"))
    assert len(only_b) == 400
    assert {t.action for t in only_b} == {"complete"}
    first = list(delayq.pending(prefix="SN-A", limit=7))
    assert len(first) == 7
    a5 = next(t for t in everything if t.order_sn == "SN-A0005")
    assert abs(a5.due_at - (now + timedelta(minutes=10, seconds=5))) < timedelta(seconds=1)


def test_pending_reads_a_bounded_slice_of_the_index_per_call(configured: RedisServer) -> None:
    delayq.schedule_many([(f"SN-P{i}", "1h") for i in range(300)])
    store = producer.default_producer().store
    cursor, calls, seen = 0, 0, 0
    while True:
        cursor, found = store.pending_page(cursor)
        calls += 1
        seen += len(found)
        if cursor == 0:
            break
        assert cursor == calls * PENDING_PAGE_SHARDS
    assert seen == 300
    assert calls == -(-store.keys.shards // PENDING_PAGE_SHARDS)


def test_pending_refuses_a_prefix_no_order_id_can_start_with(configured: RedisServer) -> None:
    with pytest.raises(delayq.InvalidInput, match="prefix"):
        next(delayq.pending(prefix="SN 1*"))
