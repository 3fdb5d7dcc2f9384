"""`delayq reconcile`: orders whose timer was lost are found (and only they), reporting
writes nothing, and --fix has a real `delayq listen` cancel them; on SQLite, MariaDB and
PostgreSQL, and on a Redis Cluster."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from delayq import db
from delayq.cli import main
from delayq.cluster.store import ClusterStore
from delayq.errors import InvalidInput
from delayq.keys import Keys
from delayq.producer import Producer
from delayq.reconcile import Request, reconcile
from delayq.redis_conn import connect, keys_for
from delayq.settings import Settings
from delayq.store import TimerStore
from tests.cluster import ClusterFactory
from tests.harness import (
    DELAYQ,
    ListenerProcess,
    clean_env,
    engine_for,
    index_score,
    migrate_cli,
    run_cli,
    statuses,
)
from tests.servers import RedisServer, wait_for

#: Unpaid for an hour and no timer: never scheduled, or scheduled and then lost.
NEVER = ["LOST-1", "LOST-2"]
LOST_KEYS = "LOST-DELETED"
#: Its only outcome is for another action: the cancel timer is still lost.
OTHER_ACTION = "LOST-OTHER"
LOST = sorted([*NEVER, LOST_KEYS, OTHER_ACTION])
#: Unpaid for an hour, with a timer in some state Redis holds, or staged in the outbox
#: (its listener down: not relayed yet).
PENDING, LEGACY, FLAGGED, CLAIMED, DEAD = "PENDING", "LEGACY", "FLAGGED", "CLAIMED", "DEAD"
STAGED = "STAGED"
HELD = [PENDING, LEGACY, FLAGGED, CLAIMED, DEAD, STAGED]
#: Unpaid, no timer, but its timer fired (an outcome is recorded).
FIRED = "FIRED"
#: Not looked at: paid, too young, or an order key no timer can have.
PAID, YOUNG, BAD_KEY = "PAID", "YOUNG", "BAD:KEY"

ORDERS = sa.table(
    "orders",
    sa.column("order_sn"),
    sa.column("status"),
    sa.column("created_at", db.Timestamp),
)


@pytest.fixture(params=["sqlite", "mariadb", "postgres"])
def any_database_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
def env(redis_server: RedisServer, any_database_url: str, tmp_path: Path) -> dict[str, str]:
    env = clean_env(
        REDIS_URL=redis_server.url(0),
        DATABASE_URL=any_database_url,
        HOME=str(tmp_path / "home"),
        FLAG_ACTIONS="1=cancel",
    )
    migrate_cli(env)
    return env


@pytest.fixture
def engine(env: dict[str, str]) -> Iterator[Engine]:
    engine = engine_for(env["DELAYQ_DATABASE_URL"])
    yield engine
    engine.dispose()


def _utc_ago(**ago: float) -> datetime:
    return datetime.now(UTC).replace(tzinfo=None) - timedelta(**ago)


def insert_orders(engine: Engine, rows: list[tuple[str, str, datetime]]) -> None:
    with engine.begin() as conn:
        conn.execute(
            ORDERS.insert(),
            [{"order_sn": sn, "status": st, "created_at": at} for sn, st, at in rows],
        )


def insert_outcome(engine: Engine, order_sn: str, action: str, outcome: str) -> None:
    at = _utc_ago(minutes=30)
    with engine.begin() as conn:
        conn.execute(
            db.outcomes.insert(),
            [{"order_sn": order_sn, "action": action, "due_at": at, "fired_at": at,
              "outcome": outcome}],
        )  # fmt: skip


def build_scenario(engine: Engine, client: redis.Redis) -> None:
    """Every kind of order reconcile must tell apart, its timers in the state named."""
    hour_ago = _utc_ago(hours=1)
    unpaid = [*LOST, *HELD, FIRED, BAD_KEY]
    insert_orders(
        engine,
        [(sn, "unpaid", hour_ago) for sn in unpaid]
        + [(PAID, "paid", hour_ago), (YOUNG, "unpaid", _utc_ago(minutes=19))],
    )
    store = TimerStore(client, Keys())
    producer = Producer(client, Keys())
    # A firing that failed for good (dead letter) and one being applied (claimed).
    producer.schedule_many([(DEAD, 0), (CLAIMED, 0)])
    claimed = store.claim_due(10, lease_ms=3_600_000).firings
    assert sorted(f.key for f in claimed) == [f"{CLAIMED}:cancel", f"{DEAD}:cancel"]
    dead = [f.id for f in claimed if f.key.startswith(DEAD)]
    store.retry_later(dead, max_attempts=1, backoff_ms=1, backoff_max_ms=1, error="boom")
    producer.schedule_many([(PENDING, "1h"), (LOST_KEYS, "1h")])
    # Lost: a Redis restarted without its data, a key deleted by hand.
    client.delete(f"{LOST_KEYS}:cancel")
    client.zrem(Keys().shard(f"{LOST_KEYS}:cancel"), f"{LOST_KEYS}:cancel")
    # Producers that do not use delayq: a plain TTL key, and one ending in a flag.
    client.set(f"{LEGACY}:cancel", "1", ex=3600)
    client.set(f"{FLAGGED}:1", "1", ex=3600)
    with engine.begin() as conn:
        producer.schedule(STAGED, "1h", connection=conn)
    insert_outcome(engine, FIRED, "cancel", "not_found")
    insert_outcome(engine, OTHER_ACTION, "complete", "applied")


def snapshot(engine: Engine, client: redis.Redis) -> dict[str, Any]:
    """Everything reconcile could write: both tables, and Redis's keys and write count."""
    with engine.connect() as conn:
        orders = sorted(map(tuple, conn.execute(sa.text("SELECT * FROM orders"))))
        outcomes = sorted(map(tuple, conn.execute(sa.text("SELECT * FROM delayq_outcomes"))))
    keys = sorted(client.scan_iter(count=1000))
    return {
        "orders": orders,
        "outcomes": outcomes,
        "redis_keys": keys,
        "redis_dump": {k: client.dump(k) for k in keys if client.type(k) != "string"},
        "redis_writes": client.info("persistence")["rdb_changes_since_last_save"],
    }


def reconcile_cli(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = run_cli("reconcile", "--older-than", "20m", "--json", *args, env=env)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_reconcile_reports_exactly_the_orders_whose_timer_is_lost_and_writes_nothing(
    env: dict[str, str], engine: Engine, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    build_scenario(engine, client)
    before = snapshot(engine, client)

    # A batch of 3: pagination crosses batches, and a batch ends on every kind of order.
    report = reconcile_cli(env, "--batch-size", "3")

    assert sorted(o["order_sn"] for o in report["orders"]) == LOST
    assert report["found"] == len(LOST) and report["fixed"] == 0 and report["complete"]
    assert report["with_timer"] == len(HELD)
    assert report["with_outcome"] == 1
    assert report["invalid_key"] == 1
    assert report["scanned"] == len(LOST) + len(HELD) + 2
    assert all(o["created_at"].endswith("Z") for o in report["orders"])
    assert snapshot(engine, client) == before


def test_reconcile_fix_schedules_lost_timers_and_the_listener_cancels_those_orders(
    env: dict[str, str], engine: Engine, redis_server: RedisServer, tmp_path: Path
) -> None:
    client = redis_server.client()
    build_scenario(engine, client)

    report = reconcile_cli(env, "--fix")

    assert report["found"] == report["fixed"] == len(LOST)
    for sn in LOST:
        assert index_score(client, f"{sn}:cancel") is not None, f"{sn} scheduled"
    listener = ListenerProcess(env, tmp_path / "listener.log").start()
    try:
        wait_for(
            lambda: all(statuses(engine)[sn] == "cancelled" for sn in LOST),
            30,
            what="the lost orders cancelled",
        )
        # Nothing else was touched: their own timers are pending, claimed or dead, or
        # they are paid, too young, or fired already.
        now = statuses(engine)
        assert {sn: now[sn] for sn in [*HELD, FIRED, YOUNG, BAD_KEY]} == dict.fromkeys(
            [*HELD, FIRED, YOUNG, BAD_KEY], "unpaid"
        )
        assert now[PAID] == "paid"
        again = reconcile_cli(env)
        assert again["found"] == 0 and again["orders"] == []
    finally:
        listener.stop()


def test_reconcile_stops_at_limit_with_counts_exact_up_to_the_last_order_reported(
    redis_server: RedisServer, sqlite_url: str
) -> None:
    settings = Settings(redis_url=redis_server.url(0), database_url=sqlite_url)
    engine = db.make_engine(settings)
    env = clean_env(REDIS_URL=redis_server.url(0), DATABASE_URL=sqlite_url)
    migrate_cli(env)
    client = redis_server.client()
    # Keys sort A-0 < A-1 < ... : lost, held, lost, held, ...
    names = [f"A-{i}" for i in range(10)]
    insert_orders(engine, [(sn, "unpaid", _utc_ago(hours=2)) for sn in names])
    producer = Producer(client, Keys())
    producer.schedule_many([(sn, "1h") for sn in names[1::2]])
    request = Request.make(settings, action="cancel", older_than="1h", limit=3, batch_size=4)
    seen: list[int] = []

    report = reconcile(
        settings, engine, producer, request, fix=True, progress=lambda r: seen.append(r.scanned)
    )

    assert [o.order_sn for o in report.orders] == ["A-0", "A-2", "A-4"]
    assert (report.found, report.fixed, report.complete) == (3, 3, False)
    # A-0 .. A-4 read: the 5th order is the 3rd lost one.
    assert (report.scanned, report.with_timer) == (5, 2)
    assert seen == [4, 5]
    assert index_score(client, "A-6:cancel") is None
    engine.dispose()


def test_reconcile_looks_for_a_user_action_in_the_status_it_is_told(
    redis_server: RedisServer, sqlite_url: str
) -> None:
    settings = Settings(redis_url=redis_server.url(0), database_url=sqlite_url)
    engine = db.make_engine(settings)
    migrate_cli(clean_env(REDIS_URL=redis_server.url(0), DATABASE_URL=sqlite_url))
    client = redis_server.client()
    insert_orders(engine, [("P-1", "paid", _utc_ago(days=3)), ("P-2", "paid", _utc_ago(days=3))])
    producer = Producer(client, Keys())
    producer.schedule_many([("P-2", "1d", "remind")])
    with pytest.raises(InvalidInput, match="give --status"):
        Request.make(settings, action="remind", older_than="2d")
    request = Request.make(settings, action="remind", older_than="2d", status="paid")

    report = reconcile(settings, engine, producer, request)
    assert [o.order_sn for o in report.orders] == ["P-1"]
    # `complete` starts from paid: its own timers are looked for, not remind's.
    complete = reconcile(
        settings, engine, producer, Request.make(settings, action="complete", older_than="2d")
    )
    assert [o.order_sn for o in complete.orders] == ["P-1", "P-2"]
    # --fix of an action no listener knows would only record unknown_action.
    with pytest.raises(InvalidInput, match="no listener"):
        reconcile(settings, engine, producer, request, fix=True, known_actions=lambda: ["cancel"])
    assert index_score(client, "P-1:remind") is None
    engine.dispose()


@pytest.fixture
def no_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No DELAYQ_* variable and no .env: the command line alone."""
    for name in list(os.environ):
        if name.startswith("DELAYQ_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--older-than", "nonsense"], "invalid duration 'nonsense'"),
        (["--older-than", "0"], "--older-than must be more than 0"),
        (["--older-than", "20m", "--action", "remind"], "give --status"),
        (["--older-than", "20m", "--action", "Bad!"], "invalid action"),
        (["--older-than", "20m", "--limit", "0"], "--limit must be at least 1"),
        (["--older-than", "20m", "--batch-size", "0"], "--batch-size must be between"),
    ],
)
def test_reconcile_bad_input_is_one_line_and_exit_2_before_connecting(
    no_settings: None, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    # Unreachable servers: refusing the input must not need them.
    url = ["--redis-url", "redis://127.0.0.1:1/0", "--database-url", "sqlite:///x/y.db"]
    with pytest.raises(SystemExit) as exit_:
        main([*url, "reconcile", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_reconcile_without_its_column_says_which_setting_to_set(
    env: dict[str, str], engine: Engine
) -> None:
    done = run_cli(
        "reconcile", "--older-than", "20m", env={**env, "DELAYQ_CREATED_AT_COLUMN": "placed_at"}
    )
    assert done.returncode == 4, done.stderr
    assert done.stderr.count("\n") == 1 and "DELAYQ_*_COLUMN" in done.stderr
    assert "Traceback" not in done.stderr


def test_reconcile_on_a_cluster_finds_lost_timers_in_every_slot_and_fixes_them(
    cluster_factory: ClusterFactory, sqlite_url: str
) -> None:
    cluster = cluster_factory(primaries=3, replicas_per_primary=0)
    settings = Settings(redis_url=cluster.url, database_url=sqlite_url)
    migrate_cli(clean_env(REDIS_URL=cluster.url, DATABASE_URL=sqlite_url))
    engine = db.make_engine(settings)
    client = connect(settings)
    store = ClusterStore(client, keys_for(client, settings))  # type: ignore[arg-type]
    producer = Producer(client, store.keys)
    lost = [f"L-{i}" for i in range(40)]
    pending, claimed, dead, legacy = ([f"{p}-{i}" for i in range(10)] for p in ("P", "C", "D", "T"))
    insert_orders(
        engine,
        [(sn, "unpaid", _utc_ago(hours=1)) for sn in lost + pending + claimed + dead + legacy],
    )
    producer.schedule_many([(sn, "1h") for sn in pending] + [(sn, 0) for sn in claimed + dead])
    firings = store.claim_expired([f"{sn}:cancel" for sn in claimed + dead], 3_600_000)
    dead_ids = [f.id for f in firings if f.key.startswith("D-")]
    store.retry_later(dead_ids, max_attempts=1, backoff_ms=1, backoff_max_ms=1, error="boom")
    for sn in legacy:
        client.set(f"{sn}:cancel", "1", ex=3600)
    request = Request.make(settings, action="cancel", older_than="20m", batch_size=7)

    report = reconcile(settings, engine, producer, request)
    assert sorted(o.order_sn for o in report.orders) == sorted(lost)
    assert report.with_timer == 40

    fixed = reconcile(settings, engine, producer, request, fix=True)
    assert fixed.fixed == len(lost)
    assert all(store.timer_state(f"{sn}:cancel").pending_due_ms for sn in lost)
    assert reconcile(settings, engine, producer, request).found == 0
    client.close()
    engine.dispose()


def test_reconcile_shows_progress_on_a_terminal_and_none_in_a_pipe(
    env: dict[str, str], engine: Engine, redis_server: RedisServer
) -> None:
    insert_orders(engine, [(sn, "unpaid", _utc_ago(hours=1)) for sn in NEVER])

    piped = run_cli("reconcile", "--older-than", "20m", env=env)
    assert piped.returncode == 0 and piped.stderr == ""
    assert "lost timers: 2" in piped.stdout and "LOST-1 created" in piped.stdout

    # stderr on a terminal (a pseudo-terminal), stdout still a pipe: JSON stays clean.
    leader, follower = pty.openpty()
    with subprocess.Popen(
        [DELAYQ, "reconcile", "--older-than", "20m", "--json"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
    ) as proc:
        os.close(follower)
        out, _ = proc.communicate(timeout=60)
        shown = _read_all(leader)
    assert proc.returncode == 0
    assert json.loads(out)["found"] == 2
    assert "2 lost" in shown and "Traceback" not in shown


def _read_all(fd: int) -> str:
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other end is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def test_reconcile_with_redis_down_is_one_line_and_exit_3(
    no_settings: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url = ["--redis-url", "redis://127.0.0.1:1/0", "--database-url", f"sqlite:///{tmp_path}/d.db"]
    with pytest.raises(SystemExit) as exit_:
        main([*url, "reconcile", "--older-than", "20m"])
    assert exit_.value.code == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not reachable" in err and "Traceback" not in err
