"""Database engine and delayq's tables (SQLAlchemy Core, SQLite / MariaDB / PostgreSQL)."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Engine, make_url

from delayq.errors import InvalidInput, NotReady, ServiceUnavailable
from delayq.outbox.table import OUTBOX_CHECK, OUTBOX_TABLE
from delayq.settings import Settings, mask_url

#: Microsecond timestamps everywhere (MariaDB's DATETIME defaults to whole seconds). All
#: times are naive UTC: MariaDB's DATETIME has no zone, and one convention beats three.
Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

OUTCOMES_TABLE = "delayq_outcomes"
#: Alembic's version table, named so it never collides with the application's own Alembic.
VERSION_TABLE = "delayq_alembic_version"
#: Seconds to establish a connection (TCP, TLS and the server's greeting where the driver
#: bounds that too).
CONNECT_TIMEOUT_S = 5.0

metadata = sa.MetaData()

outcomes = sa.Table(
    OUTCOMES_TABLE,
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("order_sn", sa.String(64), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("due_at", Timestamp, nullable=False),
    sa.Column("fired_at", Timestamp, nullable=False),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("detail", sa.String(255), nullable=True),
    # One outcome per firing: a firing retried after a lost acknowledgement is recognised.
    sa.UniqueConstraint("order_sn", "action", "due_at", name="uq_delayq_outcomes_firing"),
    sa.Index("ix_delayq_outcomes_fired_at", "fired_at"),
)

#: Schedule and cancel requests staged in producers' transactions, relayed to Redis by the
#: listener (delayq/outbox/; migrations/versions/0002_outbox.py gives created_at the
#: database's clock as its default, per dialect).
outbox = sa.Table(
    OUTBOX_TABLE,
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("order_sn", sa.String(64), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("op", sa.String(8), nullable=False),
    sa.Column("spec", sa.String(2), nullable=True),
    sa.Column("ms", sa.BigInteger(), nullable=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.CheckConstraint(OUTBOX_CHECK, name="ck_delayq_outbox_request"),
    # The relay's look for a timer's rows held by another relay (delayq/outbox/relay.py).
    sa.Index("ix_delayq_outbox_timer", "order_sn", "action"),
)


def orders_table(settings: Settings, *extra: sa.ColumnClause[Any]) -> sa.TableClause:
    """The orders table as configured (names were validated when settings were loaded),
    with the `extra` columns a caller reads too."""
    schema, _, name = settings.orders_table.rpartition(".")
    cols = [settings.order_key_column, settings.status_column]
    cols += [c for c in (settings.cancelled_at_column, settings.updated_at_column) if c]
    return sa.table(name, *(sa.column(c) for c in cols), *extra, schema=schema or None)


def make_engine(
    settings: Settings,
    *,
    timeout_s: float | None = None,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    pool_size: int | None = None,
    **kwargs: Any,
) -> Engine:
    """An engine whose every read, write and statement is bounded by `timeout_s`
    (default: DELAYQ_DB_TIMEOUT_S). Its pool holds `pool_size` connections, by default
    enough that the listener's appliers never wait for one (they hold no transaction open
    between batches). `kwargs` go to create_engine."""
    url_text = settings.effective_database_url
    try:
        url = make_url(url_text)
    except Exception:
        raise InvalidInput(
            f"DELAYQ_DATABASE_URL: {mask_url(url_text)} is not a valid URL"
        ) from None
    timeout_s = settings.db_timeout_s if timeout_s is None else timeout_s
    # No pre-ping: it costs a round trip per transaction. A connection the server dropped
    # fails its batch, which the listener retries at once on a fresh connection.
    opts: dict[str, Any] = {}
    backend = url.get_backend_name()
    if backend == "sqlite":
        if url.database and url.database != ":memory:":
            # Private, like the embedded Redis's data beside it (0700).
            Path(url.database).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        opts["connect_args"] = {"timeout": 30}
    else:
        if pool_size is None:
            # One connection per applier and two for warm-up and `delayq check`; the
            # overflow covers fresh ones opened while broken ones are still being closed.
            opts.update(pool_size=settings.appliers + 2, max_overflow=settings.appliers)
        else:
            opts.update(pool_size=pool_size, max_overflow=0)
        opts["pool_recycle"] = 1800
    try:
        # Naming the driver loads the dialect, which may not exist: inside the try.
        if backend != "sqlite":
            opts["connect_args"] = _timeouts(url, timeout_s, connect_timeout_s)
        opts.update(kwargs)
        engine = sa.create_engine(url, **opts)
    except (ImportError, sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
        raise InvalidInput(f"DELAYQ_DATABASE_URL: cannot use {mask_url(url_text)}: {exc}") from None
    _refuse_unknown_driver_arguments(engine, url_text)
    if engine.dialect.name == "sqlite":
        _sqlite_serialised_writes(engine)
    elif backend in ("mysql", "mariadb"):
        _mariadb_idle_transaction_timeout(engine, timeout_s)
    return engine


def _refuse_unknown_driver_arguments(engine: Engine, url_text: str) -> None:
    """A URL query parameter the driver does not take (`?ssl_password=` with PyMySQL) would
    be a TypeError at the first connection: refuse it now, in one line. (psycopg checks
    its own options and names the bad one; SQLite's are few.)"""
    if engine.dialect.driver != "pymysql":
        return
    import inspect

    import pymysql  # type: ignore[import-untyped]

    accepted = set(inspect.signature(pymysql.connections.Connection.__init__).parameters)
    _, params = engine.dialect.create_connect_args(engine.url)
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise InvalidInput(
            f"DELAYQ_DATABASE_URL: {mask_url(url_text)}: PyMySQL does not take {', '.join(unknown)}"
        )


def _timeouts(url: sa.URL, timeout_s: float, connect_timeout_s: float) -> dict[str, Any]:
    """Driver arguments that bound every wait on the server. TCP keepalive and
    tcp_user_timeout catch a host that vanished; they cannot catch a link stalled behind a
    proxy or NAT (its kernel ACKs), so the read timeouts and the listener's batch watch
    (delayq.liveness) are the bounds that always hold. Settings in the URL win."""
    whole_s = max(1, math.ceil(timeout_s))
    args: dict[str, Any] = {}
    backend, driver = url.get_backend_name(), url.get_driver_name()
    if backend in ("mysql", "mariadb", "postgresql"):
        args["connect_timeout"] = max(1, math.ceil(connect_timeout_s))
    if backend in ("mysql", "mariadb") and driver in ("pymysql", "mysqldb"):
        args.update(read_timeout=whole_s, write_timeout=whole_s)
    elif backend == "postgresql" and driver in ("psycopg", "psycopg2"):
        timeout_ms = int(timeout_s * 1000)
        args.update(
            keepalives=1,
            keepalives_idle=whole_s,
            keepalives_interval=max(1, whole_s // 3),
            keepalives_count=3,
            tcp_user_timeout=timeout_ms,
        )
        # Server side: a statement (a lock wait included) ends after timeout_s, and a
        # session whose client vanished mid-transaction gives up its row locks.
        server = (
            f"-c statement_timeout={timeout_ms} -c idle_in_transaction_session_timeout={timeout_ms}"
        )
        given = url.query.get("options")
        args["options"] = f"{given} {server}" if isinstance(given, str) else server
    return {k: v for k, v in args.items() if k == "options" or k not in url.query}


def _mariadb_idle_transaction_timeout(engine: Engine, timeout_s: float) -> None:
    # A client that vanished mid-transaction (its host gone, a link stalled) would hold its
    # row locks until TCP gives up, hours later: MariaDB ends such a transaction itself.
    # MySQL has no such variable, hence the version check rather than an init_command.
    statement = f"SET SESSION idle_transaction_timeout = {max(1, math.ceil(timeout_s))}"

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        server_info = getattr(dbapi_conn, "get_server_info", None)  # PyMySQL, mysqlclient
        if server_info is not None and "mariadb" in str(server_info()).lower():
            with contextlib.closing(dbapi_conn.cursor()) as cursor:
                cursor.execute(statement)


def break_connection(dbapi_conn: Any) -> None:
    """Make whatever blocks on `dbapi_conn` in another thread fail at once: its socket is
    shut down (no RST is needed from the server), so the driver raises a disconnect error
    and the pool discards the connection. SQLite has no socket: it is interrupted."""
    if isinstance(dbapi_conn, sqlite3.Connection):
        dbapi_conn.interrupt()
        return
    sock = getattr(dbapi_conn, "_sock", None)  # PyMySQL
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        return
    fileno = getattr(dbapi_conn, "fileno", None)  # psycopg, psycopg2
    if fileno is None:
        return
    try:
        fd = os.dup(fileno())
    except Exception:  # closed already, or a driver without a usable descriptor
        return
    # A duplicate shares the socket: shutting it down wakes the driver's own descriptor,
    # and closing the duplicate leaves that descriptor to the driver.
    with socket.socket(fileno=fd) as dup, contextlib.suppress(OSError):
        dup.shutdown(socket.SHUT_RDWR)


def _sqlite_serialised_writes(engine: Engine) -> None:
    # pysqlite's deferred BEGIN lets two writers read the same snapshot and then fight over
    # the upgrade; BEGIN IMMEDIATE takes the write lock first, as FOR UPDATE does elsewhere.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.execute("PRAGMA busy_timeout=30000")

    @event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def is_transient(exc: BaseException) -> bool:
    """A failure of the database (a lost connection, a timeout, a deadlock) rather than of
    what was asked of it: worth retrying the whole transaction later."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError | sa.exc.TimeoutError)


def unreachable(settings: Settings, exc: BaseException) -> ServiceUnavailable:
    """The one-line error for a database that does not answer."""
    reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
    return ServiceUnavailable(
        f"database at {mask_url(settings.effective_database_url)} is not reachable: {reason}"
    )


def check_schema(engine: Engine, settings: Settings) -> str:
    """Raise NotReady unless the database is migrated to head; returns a status line."""
    from delayq.migrate import current_revision, head_revision

    try:
        current = current_revision(engine)
    except sa.exc.OperationalError as exc:
        raise unreachable(settings, exc) from None
    head = head_revision()
    if current != head:
        raise NotReady(
            f"database at {mask_url(settings.effective_database_url)} is at schema "
            f"{current or 'none'}, needs {head}: run 'delayq migrate'"
        )
    with engine.connect() as conn:
        try:
            orders = orders_table(settings)
            conn.execute(sa.select(sa.literal(1)).select_from(orders).limit(1)).all()
        except sa.exc.DBAPIError as exc:
            raise NotReady(
                f"orders table {settings.orders_table!r} is not usable: "
                f"{str(exc.orig).splitlines()[0]}"
            ) from None
    return f"database schema at {head}"


def last_outcome(
    engine: Engine, settings: Settings, order_sn: str, action: str
) -> dict[str, Any] | None:
    """The latest outcome recorded for a timer, or None."""
    o = outcomes
    query = (
        sa.select(o.c.due_at, o.c.fired_at, o.c.outcome, o.c.detail)
        .where(o.c.order_sn == order_sn, o.c.action == action)
        .order_by(o.c.fired_at.desc())
        .limit(1)
    )
    try:
        with engine.connect() as conn:
            last = conn.execute(query).first()
    except sa.exc.OperationalError as exc:
        raise unreachable(settings, exc) from exc
    if last is None:
        return None
    return {
        "due_at": last.due_at.isoformat() + "Z",
        "fired_at": last.fired_at.isoformat() + "Z",
        "outcome": last.outcome,
        "detail": last.detail,
    }


def recent_outcomes(engine: Engine, settings: Settings, hours: float = 1) -> dict[str, int]:
    """Outcomes of the last `hours`, counted as {"action:outcome": n}."""
    from datetime import UTC, datetime, timedelta

    o = outcomes
    since = datetime.now(UTC).replace(tzinfo=None) - timedelta(hours=hours)
    query = (
        sa.select(o.c.action, o.c.outcome, sa.func.count())
        .where(o.c.fired_at >= since)
        .group_by(o.c.action, o.c.outcome)
    )
    try:
        with engine.connect() as conn:
            return {f"{a}:{out}": n for a, out, n in conn.execute(query)}
    except sa.exc.OperationalError as exc:
        raise unreachable(settings, exc) from exc


#: Most outcome rows one dashboard page or timer history reads.
OUTCOMES_PAGE_MAX = 200


def _outcome_row(row: sa.Row[Any]) -> dict[str, Any]:
    return {
        "id": row.id,
        "order_sn": row.order_sn,
        "action": row.action,
        "due_at": row.due_at.isoformat() + "Z",
        "fired_at": row.fired_at.isoformat() + "Z",
        "outcome": row.outcome,
        "detail": row.detail,
    }


def outcome_history(
    engine: Engine, settings: Settings, order_sn: str, action: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """The outcomes of one order's timers (of one `action` if given), latest due first, at
    most `limit` (capped at OUTCOMES_PAGE_MAX): an indexed read of the firing key."""
    o = outcomes
    query = sa.select(o).where(o.c.order_sn == order_sn)
    if action is not None:
        query = query.where(o.c.action == action)
    query = query.order_by(o.c.due_at.desc(), o.c.id.desc()).limit(min(limit, OUTCOMES_PAGE_MAX))
    try:
        with engine.connect() as conn:
            return [_outcome_row(row) for row in conn.execute(query)]
    except sa.exc.OperationalError as exc:
        raise unreachable(settings, exc) from exc


def outcomes_page(
    engine: Engine,
    settings: Settings,
    *,
    action: str | None = None,
    outcome: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    after: tuple[datetime, int] | None = None,
    limit: int = 50,
) -> tuple[list[dict[str, Any]], tuple[datetime, int] | None]:
    """One page of outcomes, latest fired first, filtered by action, outcome and fired_at
    in [since, until) (naive UTC); and the (fired_at, id) the next page starts after (None:
    this is the last page). Keyset pagination along the fired_at index: a deep page costs
    what the first one does, and rows written meanwhile never shift a page."""
    o = outcomes
    limit = max(1, min(limit, OUTCOMES_PAGE_MAX))
    query = sa.select(o)
    if action is not None:
        query = query.where(o.c.action == action)
    if outcome is not None:
        query = query.where(o.c.outcome == outcome)
    if since is not None:
        query = query.where(o.c.fired_at >= since)
    if until is not None:
        query = query.where(o.c.fired_at < until)
    if after is not None:
        fired_at, row_id = after
        # The first condition alone is a range on the index; the second breaks ties.
        query = query.where(
            o.c.fired_at <= fired_at, sa.or_(o.c.fired_at < fired_at, o.c.id < row_id)
        )
    # One row more than shown says whether there is a next page.
    query = query.order_by(o.c.fired_at.desc(), o.c.id.desc()).limit(limit + 1)
    try:
        with engine.connect() as conn:
            found = conn.execute(query).all()
    except sa.exc.OperationalError as exc:
        raise unreachable(settings, exc) from exc
    page = found[:limit]
    last = page[-1] if len(found) > limit else None
    following = None if last is None else (last.fired_at, last.id)
    return [_outcome_row(row) for row in page], following
