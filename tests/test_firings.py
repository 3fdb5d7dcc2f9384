"""Firings, each a timer falling due at one time: the holes found in review, one test each.

Each test names the defect it guards against; they drive the real scripts on a real
redis-server through the listener's own methods (no threads), or `delayq listen` as a
process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from delayq.context import Delayq
from delayq.keys import Keys
from delayq.listener import Listener
from delayq.settings import Settings
from delayq.store import Claim, Firing
from tests.harness import (
    ListenerProcess,
    clean_env,
    create_orders,
    engine_for,
    migrate_cli,
    outcome_rows,
)
from tests.servers import SERVER_KINDS, RedisFactory, RedisServer, wait_for

pytestmark = pytest.mark.parametrize("server_kind", SERVER_KINDS)


@pytest.fixture
def dq(redis_server: RedisServer, sqlite_url: str, tmp_path: Path) -> Delayq:
    dq = Delayq(
        Settings(redis_url=redis_server.url(0), database_url=sqlite_url, home=tmp_path, lease_s=60)
    )
    dq.migrate()
    create_orders(dq.engine, ["SN1", "SN2"])
    return dq


def _at(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def _queued(listener: Listener) -> list[Firing]:
    return listener.queue.items()


def test_a_timer_rescheduled_while_its_firing_is_applied_fires_again_and_is_never_lost(
    dq: Delayq,
) -> None:
    listener = dq.listener()
    dq.producer.schedule("SN1", at=_at(-2))
    (first,) = listener.claim_due().firings
    dq.producer.schedule("SN1", at=_at(-1))  # rescheduled while D1 is being applied
    (second,) = listener.claim_due().firings
    assert first.key == second.key and first.due_ms < second.due_ms
    listener.queue.put(second)
    listener.apply_batch([first])  # D1's acknowledgement must not touch D2
    listener._release_queued()  # SIGTERM with D2 queued
    (again,) = listener.claim_due().firings
    assert again.id == second.id and again.reclaimed
    listener.apply_batch([again])
    due_ats = sorted(r.due_at for r in outcome_rows(dq.engine))
    assert len(due_ats) == 2, "both schedules fired, once each"
    assert not dq.redis.zcard(dq.keys.claims)


def test_cancel_says_false_while_an_earlier_firing_of_the_timer_is_being_applied(
    dq: Delayq,
) -> None:
    listener = dq.listener()
    dq.producer.schedule("SN1", at=_at(-2))
    (first,) = listener.claim_due().firings
    dq.producer.schedule("SN1", 3600)
    assert dq.producer.cancel("SN1") is False, "D1 may still apply after cancel returns"
    listener.apply_batch([first])
    dq.producer.schedule("SN1", 3600)
    assert dq.producer.cancel("SN1") is True
    assert not listener.claim_due().firings


def test_a_failed_firing_acknowledged_by_another_listener_meanwhile_is_not_revived(
    dq: Delayq,
) -> None:
    slow, fast = dq.listener(), dq.listener()
    dq.producer.schedule("SN1", at=_at(-1))
    (firing,) = slow.claim_due().firings
    dq.redis.zadd(dq.keys.claims, {firing.id: 0})  # its lease ran out (a stalled listener)
    (taken,) = fast.claim_due().firings
    fast.apply_batch([taken])
    slow._retry_later([firing], RuntimeError("database went away"))
    assert not dq.redis.zcard(dq.keys.claims), "the acknowledged firing came back"
    assert not dq.redis.hlen(dq.keys.attempts)
    assert len(outcome_rows(dq.engine)) == 1


def test_retry_dead_re_queues_every_dead_letter_in_bounded_calls(dq: Delayq) -> None:
    listener = dq.listener()
    dead = {f"SN{i}:cancel@{1_000 + i}": '{"due_ms": 1}' for i in range(1_234)}
    dq.redis.hset(dq.keys.dead, mapping=dead)
    assert listener.retry_dead(["NONE:cancel@1"]) == 0  # loads the script
    calls = dq.redis.info("commandstats")["cmdstat_evalsha"]["calls"]
    assert listener.retry_dead([]) == 1_234
    after = dq.redis.info("commandstats")["cmdstat_evalsha"]["calls"]
    assert after - calls == 3, "500 per script call"
    assert dq.redis.zcard(dq.keys.claims) == 1_234 and not dq.redis.hlen(dq.keys.dead)


def test_a_firing_claimed_as_sigterm_arrives_is_applied_or_given_back_never_held(
    dq: Delayq,
) -> None:
    listener = dq.listener()
    dq.producer.schedule("SN1", at=_at(-1))
    claim = listener.store.claim_due

    def claim_as_sigterm_arrives(limit: int, lease_ms: int, ahead_ms: int = 0) -> Claim:
        # SIGTERM lands while the claimer is inside its claim: the appliers may already
        # have found the queue empty and returned when the firing is queued.
        listener.stop()
        return claim(limit, lease_ms, ahead_ms)

    listener.store.claim_due = claim_as_sigterm_arrives  # type: ignore[method-assign]
    listener.run()
    assert not listener.queue.qsize()
    if not outcome_rows(dq.engine):
        (again,) = dq.listener().claim_due().firings
        assert again.key == "SN1:cancel" and again.reclaimed, "given back at once"


# -- keyspace events and legacy producers (delayq listen as a process) -------------------


Listen = Callable[..., ListenerProcess]


@pytest.fixture
def listen(sqlite_url: str, tmp_path: Path) -> Iterator[Listen]:
    """listen(server, SETTING=value, ..., start=True): `delayq listen` on `server` and
    SQLite; stopped at the end, even on failure."""
    started: list[ListenerProcess] = []

    def make(server: RedisServer, *, start: bool = True, **settings: str) -> ListenerProcess:
        env = clean_env(
            REDIS_URL=server.url(0), DATABASE_URL=sqlite_url, HOME=str(tmp_path), **settings
        )
        migrate_cli(env)
        proc = ListenerProcess(env, tmp_path / f"listener-{len(started)}.log")
        started.append(proc)
        return proc.start() if start else proc

    yield make
    for proc in started:
        proc.stop()


def _redis_ms(client: redis.Redis) -> int:
    sec, usec = client.time()
    return int(sec) * 1000 + int(usec) // 1000


def test_no_keyspace_event_is_dropped_in_a_burst_of_legacy_expirations(
    redis_factory: RedisFactory, sqlite_url: str, listen: Listen
) -> None:
    # Without 'g' nothing is adopted when set: each legacy timer is known only by its
    # 'expired' event (the sweep is slowed down so it cannot hide a lost event).
    server = redis_factory(notify="Ex")
    listen(server, SWEEP_KEYS_PER_S="100")
    engine = engine_for(sqlite_url)
    sns = [f"LEG{i:05d}" for i in range(3_000)]
    create_orders(engine, sns)
    client = server.client()
    pipe = client.pipeline(transaction=False)
    for sn in sns:
        pipe.set(f"{sn}:cancel", 1, px=300)
    pipe.execute()
    past = _redis_ms(client) + 400
    wait_for(lambda: _redis_ms(client) > past, 5, what="every legacy key past its time")
    # Touch every key once past its time: Redis expires them all at once, a burst of
    # 3,000 'expired' events that the listener reads 1,000 at a time.
    pipe = client.pipeline(transaction=False)
    for sn in sns:
        pipe.exists(f"{sn}:cancel")
    pipe.execute()
    wait_for(lambda: len(outcome_rows(engine)) >= len(sns), 60, what="every legacy timer fired")
    assert sorted(r.order_sn for r in outcome_rows(engine)) == sns


def test_legacy_timers_are_adopted_when_set_and_fire_on_time_among_many_pending(
    redis_server: RedisServer, sqlite_url: str, listen: Listen
) -> None:
    listener = listen(redis_server, start=False, FLAG_ACTIONS="1=cancel")
    engine = engine_for(sqlite_url)
    create_orders(engine, ["LEG1", "LEG2", "LEG3", "LEG4", "SN1700000000T12345678", "GONE"])
    client = redis_server.client()
    # Far-future timers make Redis's own expiry of the legacy keys late (GUIDE.md).
    pipe = client.pipeline(transaction=False)
    for i in range(50_000):
        pipe.set(f"FAR{i}:cancel", 1, ex=86_400)
    pipe.execute()
    listener.start()
    client.execute_command("SETEX", "LEG1:cancel", 1, "x")  # SETEX
    client.psetex("LEG2:cancel", 1200, "x")  # PSETEX
    client.set("LEG3:cancel", "x")
    client.expire("LEG3:cancel", 1)  # EXPIRE on an existing key
    client.set("LEG4:cancel", "x", pxat=_redis_ms(client) + 1500)  # SET PXAT
    client.execute_command(
        "SETEX", "SN1700000000T12345678:1", 1, "redis Delayed task"
    )  # the PHP producer
    client.execute_command("SETEX", "GONE:cancel", 1, "x")
    client.delete("GONE:cancel")  # its producer disarmed it
    wait_for(lambda: len(outcome_rows(engine)) >= 5, 30, what="five legacy timers fired")
    rows = {r.order_sn: r for r in outcome_rows(engine)}
    assert set(rows) == {"LEG1", "LEG2", "LEG3", "LEG4", "SN1700000000T12345678"}
    assert {r.outcome for r in rows.values()} == {"applied"}
    assert rows["SN1700000000T12345678"].action == "cancel"
    late = [r.lateness_ms for r in rows.values()]
    assert min(late) >= 0 and max(late) < 1000, late  # Redis alone: seconds to minutes late

    # Re-armed right after it fired: fires again (no 2-minute tombstone in the way).
    client.execute_command("SETEX", "LEG1:cancel", 1, "x")
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE orders SET status = 'unpaid' WHERE order_sn = 'LEG1'")
    wait_for(
        lambda: sum(r.order_sn == "LEG1" for r in outcome_rows(engine)) == 2,
        30,
        what="the re-armed legacy timer fired again",
    )


def test_a_legacy_timer_set_while_no_listener_ran_is_adopted_at_start_up(
    redis_server: RedisServer, sqlite_url: str, listen: Listen
) -> None:
    listener = listen(redis_server, start=False)
    engine = engine_for(sqlite_url)
    create_orders(engine, ["EARLY1"])
    client = redis_server.client()
    client.set("EARLY1:cancel", "x", ex=4)
    listener.start()
    wait_for(
        lambda: client.zscore(Keys().shard("EARLY1:cancel"), "EARLY1:cancel") is not None,
        10,
        what="adopted by the start-up sweep",
    )
    wait_for(lambda: outcome_rows(engine), 30, what="fired")
    (row,) = outcome_rows(engine)
    assert row.outcome == "applied" and 0 <= row.lateness_ms < 1000


def test_a_numeric_flag_without_a_mapping_names_the_setting(
    redis_server: RedisServer, sqlite_url: str, listen: Listen
) -> None:
    listener = listen(redis_server)
    engine = engine_for(sqlite_url)
    create_orders(engine, ["SN1700000000T12345678"])
    redis_server.client().execute_command(
        "SETEX", "SN1700000000T12345678:1", 1, "redis Delayed task"
    )
    wait_for(lambda: outcome_rows(engine), 30, what="fired")
    (row,) = outcome_rows(engine)
    assert (row.action, row.outcome) == ("1", "unmapped_flag")
    wait_for(lambda: "DELAYQ_FLAG_ACTIONS" in listener.text(), 10, what="log names it")
