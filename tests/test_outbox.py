"""The transactional outbox: a timer exists if and only if the order's transaction commits.

Staging runs through each connection form a producer passes; the relay runs in-process
against real databases and a real Redis where its own behaviour is checked (replays,
two relays at once, outages), and inside `delayq listen` (a real subprocess) where a timer
must fire: a producer killed with SIGKILL right after its COMMIT still gets its timer."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session

import delayq
from delayq import migrate
from delayq.db import make_engine
from delayq.errors import InvalidInput
from delayq.outbox import stage_cancel, stage_cancel_async, stage_schedule, stage_schedule_async
from delayq.outbox.relay import Plan, Relay
from delayq.redis_conn import connect, keys_for
from delayq.settings import Settings
from tests.harness import (
    ListenerProcess,
    clean_env,
    index_score,
    outcome_rows,
    statuses,
)
from tests.servers import RedisServer, log_tail, wait_for

# A relay thread that dies of an exception fails the test instead of passing unnoticed.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


@pytest.fixture(params=["sqlite", "mariadb", "postgres"])
def any_database_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture(params=["mariadb", "postgres"])
def locking_database_url(request: pytest.FixtureRequest) -> str:
    """The databases with FOR UPDATE SKIP LOCKED, where relays run at once."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


class Rig:
    """A migrated database, a private Redis, and relays made on demand."""

    def __init__(self, redis_server: RedisServer, database_url: str, **settings: Any) -> None:
        self.settings = Settings(
            redis_url=redis_server.url(0), database_url=database_url, **settings
        )
        self.database_url = database_url
        self.engine = make_engine(self.settings)
        migrate.upgrade(self.engine, self.settings)
        self.redis = connect(self.settings)
        self.keys = keys_for(self.redis, self.settings)
        self.stopping = threading.Event()
        self.relays: list[Relay] = []

    def relay(self, **overrides: Any) -> Relay:
        settings = Settings(**{**self.settings.__dict__, **overrides})
        relay = Relay(settings, self.engine, self.redis, self.keys, self.stopping)
        self.relays.append(relay)
        return relay

    def relay_all(self, relay: Relay | None = None) -> int:
        relay = relay or self.relay()
        total = 0
        while n := relay.relay_once():
            total += n
        return total

    def outbox_rows(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT COUNT(*) FROM delayq_outbox")).scalar_one())

    def due_ms(self, order_sn: str, action: str = "cancel") -> float | None:
        return index_score(self.redis, f"{order_sn}:{action}")

    def redis_now_ms(self) -> float:
        seconds, micros = self.redis.time()
        return seconds * 1000 + micros / 1000

    def close(self) -> None:
        self.stopping.set()
        for relay in self.relays:
            relay._close()
        self.engine.dispose()


@pytest.fixture
def rig_factory(redis_server: RedisServer) -> Iterator[Any]:
    made: list[Rig] = []

    def make(database_url: str, **settings: Any) -> Rig:
        made.append(Rig(redis_server, database_url, **settings))
        return made[-1]

    yield make
    for rig in made:
        rig.close()


# -- staging: the caller's transaction decides ----------------------------------------------


def test_a_rolled_back_transaction_leaves_no_row_and_no_timer(
    rig_factory: Any, any_database_url: str
) -> None:
    rig = rig_factory(any_database_url)
    with rig.engine.connect() as conn:
        with conn.begin() as tx:
            conn.execute(sa.text("INSERT INTO orders (order_sn) VALUES ('SN-ROLLED')"))
            delayq.schedule_expiry("SN-ROLLED", "20m", connection=conn)
            delayq.cancel_expiry("SN-OTHER", connection=conn)
            tx.rollback()
        with conn.begin():
            conn.execute(sa.text("INSERT INTO orders (order_sn) VALUES ('SN-KEPT')"))
            delayq.schedule_expiry("SN-KEPT", "20m", connection=conn)
    assert rig.relay_all() == 1
    assert rig.due_ms("SN-ROLLED") is None
    assert rig.due_ms("SN-KEPT") is not None
    assert rig.outbox_rows() == 0
    assert statuses(rig.engine) == {"SN-KEPT": "unpaid"}


def _check_form_commits_and_rolls_back(rig: Rig, stage: Any, commit: Any, rollback: Any) -> None:
    """`stage(sn)` stages a 60 s schedule of `sn`; only the committed one is relayed."""
    stage("SN-RB")
    rollback()
    stage("SN-OK")
    commit()
    before = rig.redis_now_ms()
    assert rig.relay_all() == 1
    due = rig.due_ms("SN-OK")
    assert due is not None and before + 55_000 < due < before + 61_000
    assert rig.due_ms("SN-RB") is None


def test_sqlalchemy_connection_and_session_stage_in_the_callers_transaction(
    rig_factory: Any, database_url: str
) -> None:
    rig = rig_factory(database_url)
    with rig.engine.connect() as conn:
        _check_form_commits_and_rolls_back(
            rig,
            lambda sn: stage_schedule(conn, [(f"{sn}:cancel", "in", 60_000)]),
            conn.commit,
            conn.rollback,
        )
    with Session(rig.engine) as session:
        session.execute(sa.text("INSERT INTO orders (order_sn) VALUES ('SN-S')"))
        delayq.schedule_expiry("SN-S", "1h", action="remind", connection=session)
        delayq.cancel_expiry("SN-OK", connection=session)
        session.commit()
    assert rig.relay_all() == 2
    assert rig.due_ms("SN-OK") is None, "the session's cancel was relayed"
    assert rig.due_ms("SN-S", "remind") is not None


def test_a_sqlite3_connection_stages_with_qmark_placeholders(
    rig_factory: Any, sqlite_url: str
) -> None:
    rig = rig_factory(sqlite_url)
    conn = sqlite3.connect(sa.make_url(sqlite_url).database or "")
    try:
        _check_form_commits_and_rolls_back(
            rig,
            lambda sn: delayq.schedule_expiry(sn, "60s", connection=conn),
            conn.commit,
            conn.rollback,
        )
    finally:
        conn.close()


def test_a_pymysql_connection_stages_with_format_placeholders(
    rig_factory: Any, mariadb_url: str
) -> None:
    rig = rig_factory(mariadb_url)
    url = sa.make_url(mariadb_url)
    conn = pymysql.connect(
        host=url.host, port=url.port or 3306, user=url.username, database=url.database
    )
    try:
        _check_form_commits_and_rolls_back(
            rig,
            lambda sn: delayq.schedule_many([(sn, 60)], connection=conn),
            conn.commit,
            conn.rollback,
        )
    finally:
        conn.close()


def test_a_psycopg_connection_stages_with_pyformat_placeholders(
    rig_factory: Any, postgres_url: str
) -> None:
    import psycopg

    rig = rig_factory(postgres_url)
    url = sa.make_url(postgres_url)
    conn = psycopg.connect(host=url.host, port=url.port, user=url.username, dbname=url.database)
    try:
        _check_form_commits_and_rolls_back(
            rig,
            lambda sn: delayq.schedule_expiry(sn, "60s", connection=conn),
            conn.commit,
            conn.rollback,
        )
    finally:
        conn.close()


def test_a_django_connection_stages_inside_transaction_atomic(
    rig_factory: Any, sqlite_url: str
) -> None:
    # A dev dependency: missing, the test fails (never skips).
    import django
    from django.conf import settings as django_settings

    path = sa.make_url(sqlite_url).database
    if not django_settings.configured:
        django_settings.configure(
            DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": path}},
            USE_TZ=True,
        )
        django.setup()
    from django.db import connection, connections, transaction

    connections["default"].settings_dict["NAME"] = path
    connection.close()
    rig = rig_factory(sqlite_url)

    class Rollback(Exception):
        pass

    with contextlib.suppress(Rollback), transaction.atomic():
        with connection.cursor() as cur:
            cur.execute("INSERT INTO orders (order_sn) VALUES (%s)", ["SN-DJ-RB"])
        delayq.schedule_expiry("SN-DJ-RB", "60s", connection=connection)
        raise Rollback
    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute("INSERT INTO orders (order_sn) VALUES (%s)", ["SN-DJ"])
        delayq.schedule_expiry("SN-DJ", "60s", connection=connection)
        delayq.cancel_expiry("SN-GONE", connection=connections["default"])
    with pytest.raises(InvalidInput, match=r"transaction\.atomic\(\)"):
        delayq.schedule_expiry("SN-DJ-AUTO", "60s", connection=connection)
    connection.close()
    assert rig.relay_all() == 2
    assert rig.due_ms("SN-DJ") is not None
    assert rig.due_ms("SN-DJ-RB") is None and rig.due_ms("SN-DJ-AUTO") is None
    assert statuses(rig.engine) == {"SN-DJ": "unpaid"}


def test_async_connection_and_session_stage_in_the_callers_transaction(
    rig_factory: Any, sqlite_url: str
) -> None:
    # aiosqlite (a dev dependency) is the driver create_async_engine loads below: missing,
    # the test fails (never skips).
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    rig = rig_factory(sqlite_url)
    path = sa.make_url(sqlite_url).database

    async def main() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
        try:
            async with engine.connect() as conn:
                await stage_schedule_async(conn, [("SN-A-RB:cancel", "in", 60_000)])
                await conn.rollback()
                await stage_schedule_async(conn, [("SN-A:cancel", "in", 60_000)])
                await conn.commit()
            async with AsyncSession(engine) as session:
                await stage_schedule_async(session, [("SN-B:cancel", "at", 4_000_000_000_000)])
                await stage_cancel_async(session, ["SN-A:cancel"])
                await session.commit()
            async with AsyncSession(engine) as session:
                with pytest.raises(InvalidInput, match=r"delayq\.aio"):
                    stage_cancel(session, ["SN-B:cancel"])
        finally:
            await engine.dispose()

    asyncio.run(main())
    assert rig.relay_all() == 3
    assert rig.due_ms("SN-A") is None and rig.due_ms("SN-A-RB") is None
    assert rig.due_ms("SN-B") == 4_000_000_000_000


def test_objects_that_are_no_connection_are_refused_in_one_line(sqlite_url: str) -> None:
    for bad in (object(), "sqlite:///x.db", 42):
        with pytest.raises(InvalidInput, match="cannot stage through") as err:
            delayq.schedule_expiry("SN1", "20m", connection=bad)
        assert "\n" not in str(err.value)
    autocommit = sqlite3.connect(":memory:", isolation_level=None)
    with pytest.raises(InvalidInput, match="autocommit"):
        stage_cancel(autocommit, ["SN1:cancel"])
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as plain, pytest.raises(InvalidInput, match="AUTOCOMMIT"):
        conn = plain.execution_options(isolation_level="AUTOCOMMIT")
        delayq.cancel_expiry("SN1", connection=conn)
    engine.dispose()
    with pytest.raises(InvalidInput, match="not a timer key"):
        stage_cancel(sqlite3.connect(":memory:"), ["no colon"])


# -- the relay -------------------------------------------------------------------------------


class CrashAfterRedis(Exception):
    pass


class CrashingRelay(Relay):
    """Dies between its Redis write and its DELETE's commit, as a killed listener would."""

    def _write(self, work: Plan) -> None:
        super()._write(work)
        raise CrashAfterRedis


def test_a_replayed_row_gives_the_same_timer(rig_factory: Any, any_database_url: str) -> None:
    rig = rig_factory(any_database_url)
    with rig.engine.begin() as conn:
        stage_schedule(conn, [("SN-IN:cancel", "in", 30_000), ("SN-AT:cancel", "at", 4 * 10**12)])
        stage_schedule(conn, [("SN-X:cancel", "in", 30_000)])
        stage_cancel(conn, ["SN-X:cancel"])
    settings = rig.settings
    crashing = CrashingRelay(settings, rig.engine, rig.redis, rig.keys, rig.stopping)
    rig.relays.append(crashing)
    with pytest.raises(CrashAfterRedis):
        crashing.relay_once()
    first = {sn: rig.due_ms(sn) for sn in ("SN-IN", "SN-AT", "SN-X")}
    assert rig.outbox_rows() == 4, "the crash left every row for a replay"
    assert first["SN-X"] is None and first["SN-AT"] == 4 * 10**12
    assert first["SN-IN"] is not None
    assert rig.relay_all() == 4
    again = {sn: rig.due_ms(sn) for sn in ("SN-IN", "SN-AT", "SN-X")}
    assert again["SN-AT"] == first["SN-AT"] and again["SN-X"] is None
    # Counted from created_at by the database clock: the replay moved nothing (a few ms
    # of rounding and of the time between the age's read and the Redis write).
    assert again["SN-IN"] is not None
    assert abs(again["SN-IN"] - first["SN-IN"]) < 50, (first, again)
    assert rig.outbox_rows() == 0


def test_a_row_older_than_its_delay_is_due_at_once(rig_factory: Any, any_database_url: str) -> None:
    rig = rig_factory(any_database_url)
    with rig.engine.begin() as conn:
        stage_schedule(conn, [("SN-OLD:cancel", "in", 100)])
    wait_for(lambda: _age_ms(rig) > 300, 10, what="the row is 300 ms old")
    now = rig.redis_now_ms()
    rig.relay_all()
    due = rig.due_ms("SN-OLD")
    assert due is not None and due <= now + 50, (due, now)


def _age_ms(rig: Rig) -> float:
    from delayq.outbox.table import AGE_MS_SQL

    with rig.engine.connect() as conn:
        sql = f"SELECT {AGE_MS_SQL[rig.engine.dialect.name]} FROM delayq_outbox"
        return float(conn.execute(sa.text(sql)).scalar_one())


def test_two_relays_at_once_apply_each_timers_requests_in_staging_order(
    rig_factory: Any, locking_database_url: str
) -> None:
    """Schedules and cancels of the same timers, staged in many transactions, relayed by
    two relays taking small batches at once: each timer ends as its last request says."""
    rig = rig_factory(locking_database_url, outbox_batch=7)
    rnd = random.Random(11)
    sns = [f"SN-ORD-{i}" for i in range(60)]
    expected: dict[str, bool] = {}
    stop = threading.Event()
    errors: list[BaseException] = []

    def relay_loop(relay: Relay) -> None:
        try:
            while not stop.is_set():
                if not relay.relay_once():
                    stop.wait(0.001)
            # Both drain what is left: a pass may leave a timer to the other (0 relayed).
            deadline = time.monotonic() + 60
            while rig.outbox_rows() and time.monotonic() < deadline:
                relay.relay_once()
        except BaseException as exc:
            errors.append(exc)

    relays = [rig.relay(outbox_batch=7) for _ in range(2)]
    threads = [threading.Thread(target=relay_loop, args=(r,)) for r in relays]
    for t in threads:
        t.start()
    try:
        for _ in range(25):
            with rig.engine.begin() as conn:
                for sn in rnd.sample(sns, 20):
                    for _ in range(rnd.randint(1, 3)):
                        if rnd.random() < 0.5:
                            stage_schedule(conn, [(f"{sn}:cancel", "in", 600_000)])
                            expected[sn] = True
                        else:
                            stage_cancel(conn, [f"{sn}:cancel"])
                            expected[sn] = False
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert rig.outbox_rows() == 0
    wrong = {sn: want for sn, want in expected.items() if (rig.due_ms(sn) is not None) != want}
    assert not wrong, f"timers whose last request lost to an earlier one: {wrong}"


def test_a_timer_held_by_another_relay_waits_for_it(
    rig_factory: Any, locking_database_url: str
) -> None:
    """Deterministically: relay A holds the schedule (its transaction open); relay B, which
    gets the cancel that followed, must leave it until A is done."""
    rig = rig_factory(locking_database_url)
    with rig.engine.begin() as conn:
        stage_schedule(conn, [("SN-H:cancel", "in", 600_000)])
    with rig.engine.begin() as conn:
        stage_cancel(conn, ["SN-H:cancel"])
        stage_schedule(conn, [("SN-FREE:cancel", "in", 600_000)])
    o = sa.table("delayq_outbox", sa.column("id"))
    with rig.engine.connect() as holder, holder.begin():
        first = sa.select(o.c.id).order_by(o.c.id).limit(1).with_for_update()
        holder.execute(first).all()  # relay A's lock on the schedule
        relay_b = rig.relay()
        assert relay_b.relay_once() == 1, "B relays only the timer nobody holds"
        assert rig.due_ms("SN-FREE") is not None
        assert rig.outbox_rows() == 2
    # A's lock is gone (its schedule is still there: as if A had crashed before it wrote).
    assert rig.relay_all(relay_b) == 2
    assert rig.due_ms("SN-H") is None, "the cancel came last"


def test_the_relay_thread_outlives_a_database_outage(
    rig_factory: Any, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    import psycopg

    rig = rig_factory(postgres_url, outbox_poll_s=0.01)
    relay = rig.relay()
    thread = threading.Thread(target=relay.run)
    thread.start()
    url = sa.make_url(postgres_url)
    try:
        with rig.engine.begin() as conn:
            stage_schedule(conn, [("SN-BEFORE:cancel", "in", 600_000)])
        wait_for(lambda: rig.due_ms("SN-BEFORE") is not None, 10, what="first row relayed")
        with psycopg.connect(
            host=url.host, port=url.port, user=url.username, dbname="postgres", autocommit=True
        ) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (url.database,),
            )
        with rig.engine.begin() as conn:
            stage_schedule(conn, [("SN-AFTER:cancel", "in", 600_000)])
        wait_for(lambda: rig.due_ms("SN-AFTER") is not None, 20, what="relayed after the outage")
        assert thread.is_alive()
    finally:
        rig.stopping.set()
        thread.join(10)
    paused = [r.getMessage() for r in caplog.records if "outbox relay paused" in r.getMessage()]
    assert len(paused) >= 1 and "database at postgresql" in paused[0], paused
    assert "\n" not in paused[0]


def test_the_relays_lateness_is_a_metric(rig_factory: Any, sqlite_url: str) -> None:
    from prometheus_client import CollectorRegistry

    rig = rig_factory(sqlite_url)
    registry = CollectorRegistry()
    relay = Relay(rig.settings, rig.engine, rig.redis, rig.keys, rig.stopping, registry)
    rig.relays.append(relay)
    with rig.engine.begin() as conn:
        stage_schedule(conn, [(f"SN-M{i}:cancel", "in", 60_000) for i in range(5)])
        stage_cancel(conn, ["SN-M0:cancel"])
    assert rig.relay_all(relay) == 6
    count = registry.get_sample_value("delayq_outbox_relay_lateness_seconds_count")
    assert count == 6
    assert registry.get_sample_value("delayq_outbox_relayed_total", {"op": "cancel"}) == 1


# -- with `delayq listen` --------------------------------------------------------------------

KILLED_AFTER_COMMIT = r"""
import os, signal, sys
import sqlalchemy as sa
import delayq

engine = sa.create_engine(sys.argv[1])
with engine.connect() as conn:
    tx = conn.begin()
    conn.execute(sa.text("INSERT INTO orders (order_sn) VALUES ('SN-ROLLED')"))
    delayq.schedule_expiry("SN-ROLLED", "1s", connection=conn)
    tx.rollback()
    tx = conn.begin()
    conn.execute(sa.text("INSERT INTO orders (order_sn) VALUES ('SN-KILLED')"))
    delayq.schedule_expiry("SN-KILLED", "1s", connection=conn)
    tx.commit()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_producer_killed_right_after_commit_still_gets_its_timer_fired(
    redis_server: RedisServer, any_database_url: str, tmp_path: Path
) -> None:
    env = clean_env(
        REDIS_URL=redis_server.url(0), DATABASE_URL=any_database_url, HOME=str(tmp_path)
    )
    engine = make_engine(Settings(database_url=any_database_url))
    migrate.upgrade(engine, Settings(database_url=any_database_url))
    listener = ListenerProcess(env, tmp_path / "listener.log")
    try:
        listener.start()
        producer = subprocess.run(
            [sys.executable, "-c", KILLED_AFTER_COMMIT, any_database_url],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert producer.returncode == -9, producer.stderr
        wait_for(
            lambda: statuses(engine).get("SN-KILLED") == "cancelled",
            30,
            what=f"SN-KILLED cancelled ({listener.log})",
        )
        assert statuses(engine) == {"SN-KILLED": "cancelled"}, "SN-ROLLED was rolled back"
        (row,) = outcome_rows(engine)
        assert (row.order_sn, row.outcome) == ("SN-KILLED", "applied")
        assert 0 <= row.lateness_ms < 1000, row
        client = redis.Redis.from_url(redis_server.url(0), decode_responses=True)
        assert index_score(client, "SN-ROLLED:cancel") is None
        with engine.connect() as conn:
            left = conn.execute(sa.text("SELECT COUNT(*) FROM delayq_outbox")).scalar_one()
        assert left == 0
    finally:
        listener.stop()
        engine.dispose()
    assert "Traceback" not in log_tail(listener.log)


def test_a_listener_on_a_database_without_the_outbox_says_to_migrate(
    redis_server: RedisServer, sqlite_url: str, tmp_path: Path
) -> None:
    settings = Settings(database_url=sqlite_url)
    engine = make_engine(settings)
    migrate.upgrade(engine, settings)
    with engine.begin() as conn:  # as a database migrated before 0002 looks
        conn.execute(sa.text("DROP TABLE delayq_outbox"))
        conn.execute(sa.text("UPDATE delayq_alembic_version SET version_num = '0001'"))
    engine.dispose()
    env = clean_env(REDIS_URL=redis_server.url(0), DATABASE_URL=sqlite_url, HOME=str(tmp_path))
    listener = ListenerProcess(env, tmp_path / "listener.log")
    listener.start(wait_ready=False)
    assert listener.proc is not None
    listener.proc.wait(60)
    text = listener.text()
    assert listener.proc.returncode == 4, text
    assert "needs 0002: run 'delayq migrate'" in text and "Traceback" not in text


def test_a_relay_without_its_table_says_to_migrate_and_keeps_going(
    redis_server: RedisServer, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(redis_url=redis_server.url(0), database_url=sqlite_url)
    engine = make_engine(settings)
    client = connect(settings)
    stopping = threading.Event()
    relay = Relay(settings, engine, client, keys_for(client, settings), stopping)
    thread = threading.Thread(target=relay.run)
    thread.start()
    try:
        wait_for(lambda: "run 'delayq migrate'" in caplog.text, 10, what="the missing table logged")
        migrate.upgrade(engine, settings)
        with engine.begin() as conn:
            stage_schedule(conn, [("SN-LATE:cancel", "in", 600_000)])
        wait_for(lambda: index_score(client, "SN-LATE:cancel") is not None, 20, what="relayed")
        # Logged right after the pass that wrote it.
        wait_for(lambda: "outbox relay running again" in caplog.text, 10, what="recovery")
    finally:
        stopping.set()
        thread.join(10)
        engine.dispose()
    lines = [r.getMessage() for r in caplog.records if "outbox relay paused" in r.getMessage()]
    assert len(lines) == 1 and "delayq_outbox is missing" in lines[0], lines
