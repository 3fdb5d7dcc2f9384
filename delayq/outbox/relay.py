"""The relay: a listener thread that moves committed delayq_outbox rows to Redis.

One pass:

1. a look for any row, without a lock or a transaction of its own (cheap when the table
   is empty: one indexed read; on SQLite it never takes the write lock);
2. in one transaction: the oldest rows, `SELECT ... ORDER BY id LIMIT n FOR UPDATE SKIP
   LOCKED` (MariaDB, PostgreSQL; READ COMMITTED, so no gap lock holds up producers'
   INSERTs) or under BEGIN IMMEDIATE (SQLite: one writer, so one relay, at a time), with
   each row's age by the database clock;
3. a timer with an earlier row this relay did not get (another relay holds it: a plain
   SELECT still sees it) keeps its rows after that one for later: a timer's rows are
   applied in id order, and the relay holding a timer's first row always moves on;
4. each remaining timer's rows collapse to the last one by id (schedule: last write wins;
   cancel), written to Redis in one pipelined round trip (WAIT with DELAYQ_WAIT_REPLICAS);
5. those rows are deleted and the transaction commits.

A crash between 4 and 5 leaves the rows, and the next pass writes them again with the same
result: a schedule replaces the pending one, a cancel finds nothing or the same timer, and
an 'in' delay counts from created_at by the database clock (remaining = ms - age), so the
due time neither moves on a replay nor depends on how the producer's, the database's and
Redis's clocks differ.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy.engine import Engine

from delayq.db import is_transient, outbox
from delayq.errors import DelayqError
from delayq.keys import Keys, parse_timer_key
from delayq.outbox.table import AGE_MS_SQL, CANCEL, OUTBOX_TABLE, SCHEDULE
from delayq.settings import Settings, mask_url
from delayq.store import (
    TimerStore,
    cancel_call,
    check_replicated,
    open_store,
    schedule_call,
)

log = logging.getLogger("delayq.outbox")

#: Timers per schedule script call (as producers' bulk schedules: ~1-2 ms of Redis each).
SCRIPT_CHUNK = 100
#: Seconds between the relay's summary lines (only when it relayed something).
SUMMARY_EVERY_S = 60.0
#: The wait after a pass that found rows (DELAYQ_OUTBOX_POLL_S after one that found none).
BUSY_POLL_S = 0.001
#: How long the relay sleeps between tries for SQLite's write lock.
SQLITE_LOCK_RETRY_S = 0.0002
#: Relay lateness buckets (seconds): commit to timer in Redis is a few ms when healthy.
LATENESS_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)


@dataclass(frozen=True)
class OutboxRow:
    id: int
    key: str
    op: str
    spec: str | None
    ms: int | None
    #: How old the row was, by the database clock, when it was read (ms).
    age_ms: float


@dataclass(frozen=True)
class Plan:
    """What one pass writes to Redis and deletes."""

    schedules: list[tuple[str, str, int]]
    cancels: list[str]
    #: Rows applied (deleted at commit), and rows of timers left for a later pass.
    done: list[OutboxRow]
    deferred: list[OutboxRow]


def plan(rows: Sequence[OutboxRow], held_elsewhere: dict[str, int], elapsed_ms: float) -> Plan:
    """Collapse each timer's rows to its last by id, leaving for later the rows after the
    first one another relay holds (`held_elsewhere`: timer key -> its lowest such id).
    `elapsed_ms`: time since the rows' ages were read (counted into 'in' delays)."""
    last: dict[str, OutboxRow] = {}
    done: list[OutboxRow] = []
    deferred: list[OutboxRow] = []
    for row in sorted(rows, key=lambda r: r.id):
        if row.id > held_elsewhere.get(row.key, row.id):
            deferred.append(row)
            continue
        done.append(row)
        last[row.key] = row
    schedules: list[tuple[str, str, int]] = []
    cancels: list[str] = []
    for key, row in last.items():
        if row.op == CANCEL:
            cancels.append(key)
        elif row.spec == "at":
            schedules.append((key, "at", int(row.ms or 0)))
        else:
            remaining = (row.ms or 0) - row.age_ms - elapsed_ms
            schedules.append((key, "in", max(0, round(remaining))))
    return Plan(schedules, cancels, done, deferred)


class Relay:
    """Relays delayq_outbox to Redis until `stopping` is set (`run`, in its own thread)."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        client: redis.Redis,
        keys: Keys,
        stopping: threading.Event,
        registry: CollectorRegistry | None = None,
        *,
        scripts: Any = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.stopping = stopping
        self.dialect = engine.dialect.name
        # WAIT as producers do: a row is deleted only once its timer is as safe as a
        # producer's acknowledged schedule.
        self.store = open_store(
            client,
            keys,
            scripts,
            wait_replicas=settings.wait_replicas,
            wait_timeout_ms=settings.wait_timeout_ms,
        )
        self.batch = settings.outbox_batch
        self.poll_s = settings.outbox_poll_s
        self._conn: sa.Connection | None = None
        self._peek_conn: sa.Connection | None = None
        self._outage_since: float | None = None
        self._busy = False
        self._recent: deque[float] = deque(maxlen=200_000)
        self._relayed_since_summary = 0
        self._summary_at = time.monotonic()
        self.lateness: Histogram | None = None
        self.relayed: Counter | None = None
        if registry is not None:
            self.lateness = Histogram(
                "delayq_outbox_relay_lateness_seconds",
                "Outbox row written (database clock) to its timer written to Redis.",
                buckets=LATENESS_BUCKETS_S,
                registry=registry,
            )
            self.relayed = Counter(
                "delayq_outbox_relayed",
                "Outbox rows relayed to Redis, by operation.",
                ["op"],
                registry=registry,
            )

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        """Pass after pass until stopping: at once while a pass was full, else after
        DELAYQ_OUTBOX_POLL_S; after a failure, after a backoff (one line per outage)."""
        if self.poll_s <= 0:
            return  # DELAYQ_OUTBOX_POLL_S=0: the relay is off
        backoff_s = 0.0
        try:
            while not self.stopping.is_set():
                try:
                    n = self.relay_once()
                except (
                    sa.exc.SQLAlchemyError,
                    sqlite3.Error,
                    redis.RedisError,
                    DelayqError,
                ) as exc:
                    self._close()
                    self._failed(exc)
                    backoff_s = min(self.settings.reconnect_backoff_max_s, max(0.1, backoff_s * 2))
                    self.stopping.wait(backoff_s)
                    continue
                backoff_s = 0.0
                self._recovered()
                self._summary()
                if n >= self.batch:
                    continue  # a backlog: the next batch at once
                # Rows keep coming under load: look again almost at once (each pass costs
                # a commit, so not quite at once: a few rows gather meanwhile).
                self.stopping.wait(min(BUSY_POLL_S, self.poll_s) if self._busy else self.poll_s)
        finally:
            self._close()

    def relay_once(self) -> int:
        """One pass; returns the rows applied and deleted."""
        # After a pass that found rows, more are likely: no separate look first.
        if not self._busy and not self._any_row():
            return 0
        self._busy = False
        conn = self._connection()
        try:
            with self._begin(conn):
                rows = self._take(conn)
                if not rows:
                    return 0
                read_at = time.monotonic()
                held = self._held_elsewhere(conn, rows) if self.dialect != "sqlite" else {}
                work = plan(rows, held, (time.monotonic() - read_at) * 1000)
                if work.done:
                    self._write(work)
                    written_ms = (time.monotonic() - read_at) * 1000
                    self._delete(conn, [r.id for r in work.done])
        except sa.exc.DBAPIError as exc:
            if not _lock_conflict(exc):
                raise
            # Rolled back, its rows back in the table: the next pass writes them again,
            # with the same result, before any later row of their timers.
            log.debug("outbox pass rolled back (%s); retrying", _one_line(exc.orig))
            return 0
        self._busy = bool(rows)
        if work.done:
            self._observe(work.done, written_ms)
        return len(work.done)

    # -- the database --------------------------------------------------------------------

    def _connection(self) -> sa.Connection:
        """The relay's own connection, kept between passes (one checkout, one isolation
        level set, instead of one per pass)."""
        if self._conn is None:
            conn = self.engine.connect()
            if self.dialect in ("mysql", "mariadb"):
                # No gap locks: a producer's INSERT never waits for a relay's pass.
                conn = conn.execution_options(isolation_level="READ COMMITTED")
            elif self.dialect == "sqlite":
                # The relay waits for the write lock itself (_begin): SQLite's busy
                # handler sleeps 1, 2, 5 ... 100 ms between looks, and producers that
                # commit every millisecond take the lock back in between each time.
                # (On the driver's connection: through SQLAlchemy it would begin a
                # transaction, and the engine's BEGIN IMMEDIATE would take the lock.)
                raw = conn.connection.dbapi_connection
                assert raw is not None
                raw.execute("PRAGMA busy_timeout = 0").close()
            self._conn = conn
        return self._conn

    def _begin(self, conn: sa.Connection) -> sa.RootTransaction:
        """The pass's transaction; on SQLite, BEGIN IMMEDIATE tried every ~0.2 ms until
        the write lock is free (for at most DELAYQ_DB_TIMEOUT_S)."""
        if self.dialect != "sqlite":
            return conn.begin()
        deadline = time.monotonic() + self.settings.db_timeout_s
        while True:
            try:
                return conn.begin()
            except sa.exc.OperationalError as exc:
                if "locked" not in str(exc.orig) or time.monotonic() > deadline:
                    raise
                time.sleep(SQLITE_LOCK_RETRY_S)

    def _any_row(self) -> bool:
        """Whether the table has a row, read outside any transaction."""
        sql = f"SELECT 1 FROM {OUTBOX_TABLE} LIMIT 1"
        if self.dialect == "sqlite":
            # A plain read in autocommit (the engine's connections have no implicit
            # transaction): never the write lock that the engine's BEGIN IMMEDIATE takes.
            raw = self._connection().connection.dbapi_connection
            assert raw is not None
            # Closed at once: a statement left open keeps its read snapshot, and the
            # connection's next BEGIN IMMEDIATE fails busy until the cursor is collected.
            try:
                cursor = raw.cursor()
                try:
                    return cursor.execute(sql).fetchone() is not None
                finally:
                    cursor.close()
            except sqlite3.Error as exc:  # as SQLAlchemy would have raised it
                raise sa.exc.OperationalError(sql, None, exc) from exc
        if self._peek_conn is None:
            self._peek_conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        return self._peek_conn.exec_driver_sql(sql).first() is not None

    def _take(self, conn: sa.Connection) -> list[OutboxRow]:
        age = sa.literal_column(AGE_MS_SQL[self.dialect], sa.Float).label("age_ms")
        o = outbox.c
        query = sa.select(o.id, o.order_sn, o.action, o.op, o.spec, o.ms, age)
        query = query.order_by(o.id).limit(self.batch)
        if self.dialect != "sqlite":
            query = query.with_for_update(skip_locked=True)
        rows: list[OutboxRow] = []
        bad: list[int] = []
        for r in conn.execute(query):
            key = f"{r.order_sn}:{r.action}"
            try:
                parse_timer_key(key)
            except DelayqError:
                bad.append(r.id)
                continue
            rows.append(OutboxRow(r.id, key, r.op, r.spec, r.ms, float(r.age_ms)))
        if bad:
            # Written by hand, past staging's checks: it can never become a timer.
            log.warning(
                "outbox: dropped %d rows that name no timer (ids %s)",
                len(bad),
                bad[:10],
                extra={"event": "outbox_dropped", "dropped": len(bad)},
            )
            conn.execute(sa.delete(outbox).where(outbox.c.id.in_(bad)))
        return rows

    def _delete(self, conn: sa.Connection, ids: list[int]) -> None:
        o = outbox.c
        # Bounded by this pass's lowest and highest id too: InnoDB may scan a small table
        # whole for `id IN (...)`, waiting on every row another relay holds (two relays
        # doing so deadlock); the range keeps the scan among this pass's own rows.
        conn.execute(sa.delete(outbox).where(o.id >= min(ids), o.id <= max(ids), o.id.in_(ids)))

    @staticmethod
    def _held_elsewhere(conn: sa.Connection, rows: Sequence[OutboxRow]) -> dict[str, int]:
        """Per timer of this pass, the lowest id of its rows this pass did not lock:
        another relay holds it (or it was committed just now, with a higher id)."""
        mine = {r.id for r in rows}
        keys = {r.key for r in rows}
        sns = sorted({r.key.rpartition(":")[0] for r in rows})
        o = outbox.c
        seen = conn.execute(sa.select(o.id, o.order_sn, o.action).where(o.order_sn.in_(sns)))
        held: dict[str, int] = {}
        for id_, sn, action in seen:
            key = f"{sn}:{action}"
            if id_ not in mine and key in keys:
                held[key] = min(id_, held.get(key, id_))
        return held

    # -- Redis ---------------------------------------------------------------------------

    def _write(self, work: Plan) -> None:
        """Each timer's last request in one pipelined round trip (per primary on a
        cluster); every key appears once, so the calls' order does not matter."""
        store = self.store
        chunks = [
            work.schedules[i : i + SCRIPT_CHUNK]
            for i in range(0, len(work.schedules), SCRIPT_CHUNK)
        ]
        if not isinstance(store, TimerStore):  # a ClusterStore routes per slot
            if chunks:
                store.schedule_bulk(chunks)
            for key in work.cancels:
                store.cancel(key)
            return
        pipe = store.client.pipeline(transaction=False)
        for chunk in chunks:
            keys, args = schedule_call(store.keys, chunk)
            store.scripts.schedule(keys=keys, args=args, client=pipe)
        for i in range(0, len(work.cancels), SCRIPT_CHUNK):
            keys, args = cancel_call(store.keys, work.cancels[i : i + SCRIPT_CHUNK])
            store.scripts.cancel(keys=keys, args=args, client=pipe)
        if store.wait_replicas:
            pipe.wait(store.wait_replicas, store.wait_timeout_ms)
        replies = pipe.execute()
        if store.wait_replicas:
            check_replicated(int(replies[-1]), store.wait_replicas, store.wait_timeout_ms)

    # -- reporting -----------------------------------------------------------------------

    def _observe(self, done: Sequence[OutboxRow], written_ms: float) -> None:
        lateness = [r.age_ms + written_ms for r in done]
        self._recent.extend(lateness)
        self._relayed_since_summary += len(done)
        if self.lateness is not None and self.relayed is not None:
            for ms in lateness:
                self.lateness.observe(max(ms, 0.0) / 1000)
            for op in (SCHEDULE, CANCEL):
                n = sum(1 for r in done if r.op == op)
                if n:
                    self.relayed.labels(op).inc(n)

    def _summary(self) -> None:
        now = time.monotonic()
        if now - self._summary_at < SUMMARY_EVERY_S:
            return
        window_s, self._summary_at = now - self._summary_at, now
        if not self._relayed_since_summary:
            return
        late = sorted(self._recent)
        self._recent.clear()
        n, self._relayed_since_summary = self._relayed_since_summary, 0

        def pick(q: float) -> float:
            return late[min(len(late) - 1, int(q * len(late)))]

        log.info(
            "outbox relayed %d in %.0f s; lateness p50 %.1f ms, p99 %.1f ms, max %.1f ms",
            n,
            window_s,
            pick(0.5),
            pick(0.99),
            late[-1],
            extra={
                "event": "outbox_relayed",
                "relayed": n,
                "window_s": round(window_s, 3),
                "lateness_p50_ms": round(pick(0.5), 3),
                "lateness_p99_ms": round(pick(0.99), 3),
                "lateness_max_ms": round(late[-1], 3),
            },
        )

    def _failed(self, exc: BaseException) -> None:
        if self._outage_since is not None:
            return
        self._outage_since = time.monotonic()
        if isinstance(exc, sa.exc.SQLAlchemyError | sqlite3.Error):
            where = f"database at {mask_url(self.settings.effective_database_url)}"
            reason = _one_line(getattr(exc, "orig", None) or exc)
            suspect = not is_transient(exc) or "table" in reason.lower()
            if suspect and self._table_missing():
                reason += f" ({OUTBOX_TABLE} is missing: run 'delayq migrate')"
        else:
            where = f"Redis at {mask_url(self.settings.redis_url)}"
            reason = _one_line(exc)
        log.warning(
            "outbox relay paused, %s: %s; retrying",
            where,
            reason,
            extra={"event": "outbox_paused"},
        )

    def _recovered(self) -> None:
        if self._outage_since is not None:
            took_s = time.monotonic() - self._outage_since
            log.warning(
                "outbox relay running again after %.1f s",
                took_s,
                extra={"event": "outbox_resumed", "outage_s": round(took_s, 3)},
            )
            self._outage_since = None

    def _table_missing(self) -> bool:
        try:
            return not sa.inspect(self.engine).has_table(OUTBOX_TABLE)
        except sa.exc.SQLAlchemyError:
            return False

    def _close(self) -> None:
        for conn in (self._conn, self._peek_conn):
            if conn is not None:
                with contextlib.suppress(sa.exc.SQLAlchemyError):
                    if self.dialect == "sqlite":
                        conn.invalidate()  # its busy_timeout is the relay's own
                    conn.close()
        self._conn = self._peek_conn = None


def _lock_conflict(exc: sa.exc.DBAPIError) -> bool:
    """A deadlock or lock wait the database ended (MariaDB 1213/1205, PostgreSQL 40P01,
    40001, 55P03): the pass is retried, not reported as an outage."""
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in ("40P01", "40001", "55P03"):
        return True
    args: tuple[object, ...] = tuple(getattr(orig, "args", ()))
    return bool(args) and args[0] in (1213, 1205)


def _one_line(exc: object) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
