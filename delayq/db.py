"""Database engine and delayq's tables (SQLAlchemy Core, SQLite / MariaDB / PostgreSQL)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Engine, make_url

from delayq.errors import InvalidInput, NotReady, ServiceUnavailable
from delayq.settings import Settings, mask_url

#: Microsecond timestamps everywhere (MariaDB's DATETIME defaults to whole seconds). All
#: times are naive UTC: MariaDB's DATETIME has no zone, and one convention beats three.
Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

OUTCOMES_TABLE = "delayq_outcomes"
#: Alembic's version table, named so it never collides with the application's own Alembic.
VERSION_TABLE = "delayq_alembic_version"

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


def orders_table(settings: Settings) -> sa.TableClause:
    """The orders table as configured (names were validated when settings were loaded)."""
    schema, _, name = settings.orders_table.rpartition(".")
    cols = [settings.order_key_column, settings.status_column]
    cols += [c for c in (settings.cancelled_at_column, settings.updated_at_column) if c]
    return sa.table(name, *(sa.column(c) for c in cols), schema=schema or None)


def make_engine(settings: Settings, **kwargs: Any) -> Engine:
    """An engine with a small pool: the listener holds no transaction open between batches."""
    url_text = settings.effective_database_url
    try:
        url = make_url(url_text)
    except Exception:
        raise InvalidInput(
            f"DELAYQ_DATABASE_URL: {mask_url(url_text)} is not a valid URL"
        ) from None
    # No pre-ping: it costs a round trip per transaction. A connection the server dropped
    # fails its batch, which the listener retries at once on a fresh connection.
    opts: dict[str, Any] = {}
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        opts["connect_args"] = {"timeout": 30}
    else:
        opts.update(pool_size=4, max_overflow=4, pool_recycle=1800)
        if url.get_backend_name() in ("mysql", "mariadb") or url.get_backend_name() == "postgresql":
            opts["connect_args"] = {"connect_timeout": 5}
    opts.update(kwargs)
    try:
        engine = sa.create_engine(url, **opts)
    except (ImportError, sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
        raise InvalidInput(f"DELAYQ_DATABASE_URL: cannot use {mask_url(url_text)}: {exc}") from None
    if engine.dialect.name == "sqlite":
        _sqlite_serialised_writes(engine)
    return engine


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
