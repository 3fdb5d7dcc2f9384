"""Staging: a producer writes its schedule and cancel requests into delayq_outbox in its
own transaction, through the connection it already holds. Nothing is committed here: the
rows become visible (and the listener relays them to Redis) only if the caller commits,
so a timer exists if and only if the order's transaction commits.

Connections understood, each recognised without importing anything it does not need
(a producer install has no SQLAlchemy; Django is never imported):

* SQLAlchemy `Connection`, `Session`, `scoped_session` (sync functions) and
  `AsyncConnection`, `AsyncSession`, `async_scoped_session` (async functions);
* a Django connection (`django.db.connection`, `connections[alias]`), by its `vendor`
  and `cursor()`: its cursors take `%s` whatever the database;
* a PEP 249 DB-API connection (sqlite3, PyMySQL, psycopg, ...), whose placeholders are
  its driver module's `paramstyle`.

A connection that would commit the insert by itself (autocommit, Django outside
`transaction.atomic()`) is refused: the point is to share the caller's transaction.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from delayq.errors import InvalidInput
from delayq.outbox.table import (
    OUTBOX_TABLE,
    STAGED_COLUMNS,
    Row,
    cancel_rows,
    chunks,
    insert_statement,
    schedule_rows,
)

SUPPORTED = (
    "a SQLAlchemy Connection or Session, a Django connection, or a DB-API connection "
    "(sqlite3, PyMySQL, psycopg)"
)
ASYNC_SUPPORTED = "a SQLAlchemy AsyncConnection or AsyncSession"


def stage_schedule(connection: object, timers: Sequence[tuple[str, str, int]]) -> None:
    """Stage validated timers (timer_key, 'in' | 'at', ms) in `connection`'s transaction."""
    _stage(connection, schedule_rows(timers))


def stage_cancel(connection: object, timer_keys: Sequence[str]) -> None:
    """Stage cancels of `timer_keys` in `connection`'s transaction, after what it staged
    before (the relay applies a timer's rows in the order they were staged)."""
    _stage(connection, cancel_rows(timer_keys))


async def stage_schedule_async(connection: object, timers: Sequence[tuple[str, str, int]]) -> None:
    """stage_schedule for an AsyncConnection or AsyncSession (awaited, never blocking the
    loop). A sync connection is used as it is, blocking like everything else done with it."""
    await _stage_async(connection, schedule_rows(timers))


async def stage_cancel_async(connection: object, timer_keys: Sequence[str]) -> None:
    """stage_cancel for an AsyncConnection or AsyncSession; see stage_schedule_async."""
    await _stage_async(connection, cancel_rows(timer_keys))


def _stage(connection: object, rows: list[Row]) -> None:
    if not rows:
        return
    if _sqlalchemy_async(connection):
        raise InvalidInput(
            f"connection=: a {type(connection).__name__} is async: stage with delayq.aio "
            "(await schedule_expiry(..., connection=...))"
        )
    write = _writer(connection)
    for chunk in chunks(rows):
        write(chunk)


async def _stage_async(connection: object, rows: list[Row]) -> None:
    if not rows:
        return
    if not _sqlalchemy_async(connection):
        _stage(connection, rows)
        return
    execute: Callable[[Any], Awaitable[object]] = connection.execute  # type: ignore[attr-defined]
    for chunk in chunks(rows):
        await execute(_sqlalchemy_insert(chunk))


# -- recognising the connection ------------------------------------------------------------


def _writer(connection: object) -> Callable[[Sequence[Row]], None]:
    """How to INSERT rows through `connection`; InvalidInput for anything else."""
    if _sqlalchemy_sync(connection):
        _refuse_sqlalchemy_autocommit(connection)
        execute: Callable[[Any], object] = connection.execute  # type: ignore[attr-defined]

        def write(chunk: Sequence[Row]) -> None:
            execute(_sqlalchemy_insert(chunk))

        return write
    if _django(connection):
        if connection.get_autocommit() and not connection.in_atomic_block:  # type: ignore[attr-defined]
            raise InvalidInput(
                "connection=: this Django connection is in autocommit mode: stage inside "
                "transaction.atomic(), with the writes it belongs to"
            )
        return lambda chunk: _cursor_execute(connection, "format", chunk)
    if _dbapi(connection):
        paramstyle = _paramstyle(connection)
        if _dbapi_autocommitting(connection):
            raise InvalidInput(
                f"connection=: this {type(connection).__module__} connection is in "
                "autocommit mode: stage inside a transaction, with the writes it belongs to"
            )
        return lambda chunk: _cursor_execute(connection, paramstyle, chunk)
    raise InvalidInput(
        f"connection=: cannot stage through a {type(connection).__module__}."
        f"{type(connection).__qualname__}: pass {SUPPORTED}"
    )


def _classes(module: str, *names: str) -> tuple[type, ...]:
    """Classes of a module only if it is imported already: an object of a class the
    process never imported cannot be one of them."""
    loaded = sys.modules.get(module)
    return tuple(getattr(loaded, n) for n in names if hasattr(loaded, n)) if loaded else ()


def _sqlalchemy_sync(connection: object) -> bool:
    classes = _classes("sqlalchemy.engine", "Connection") + _classes(
        "sqlalchemy.orm", "Session", "scoped_session"
    )
    return isinstance(connection, classes)


def _sqlalchemy_async(connection: object) -> bool:
    classes = _classes(
        "sqlalchemy.ext.asyncio", "AsyncConnection", "AsyncSession", "async_scoped_session"
    )
    return isinstance(connection, classes)


def _django(connection: object) -> bool:
    # django.db.connection (a proxy) and connections[alias] both answer these.
    return (
        isinstance(getattr(connection, "vendor", None), str)
        and callable(getattr(connection, "cursor", None))
        and callable(getattr(connection, "get_autocommit", None))
        and hasattr(connection, "in_atomic_block")
    )


def _dbapi(connection: object) -> bool:
    return all(callable(getattr(connection, m, None)) for m in ("cursor", "commit", "rollback"))


def _paramstyle(connection: object) -> str:
    root = type(connection).__module__.split(".")[0]
    paramstyle = getattr(sys.modules.get(root), "paramstyle", None)
    if not isinstance(paramstyle, str):
        raise InvalidInput(
            f"connection=: the {root} module has no DB-API paramstyle: pass {SUPPORTED}"
        )
    return paramstyle


def _refuse_sqlalchemy_autocommit(connection: Any) -> None:
    options = getattr(connection, "get_execution_options", None)
    if callable(options) and options().get("isolation_level") == "AUTOCOMMIT":
        raise InvalidInput(
            "connection=: this SQLAlchemy connection is in AUTOCOMMIT mode: stage inside "
            "a transaction, with the writes it belongs to"
        )


def _dbapi_autocommitting(connection: Any) -> bool:
    """True only where the driver says for sure that an INSERT now would commit alone."""
    if type(connection).__module__ == "sqlite3":
        autocommit = getattr(connection, "autocommit", None)  # Python 3.12+
        if autocommit is True:
            return True
        return connection.isolation_level is None and not connection.in_transaction
    info = getattr(connection, "info", None)
    status = getattr(info, "transaction_status", None)  # psycopg 3
    if getattr(connection, "autocommit", None) is True and status is not None:
        return int(status) == 0  # IDLE: no transaction open
    get_autocommit = getattr(connection, "get_autocommit", None)  # PyMySQL, mysqlclient
    server_status = getattr(connection, "server_status", None)
    if callable(get_autocommit) and isinstance(server_status, int):
        return bool(get_autocommit()) and not server_status & 1  # SERVER_STATUS_IN_TRANS
    return False


# -- writing -------------------------------------------------------------------------------


def _cursor_execute(connection: Any, paramstyle: str, rows: Sequence[Row]) -> None:
    sql, params = insert_statement(paramstyle, rows)
    cursor = connection.cursor()
    try:
        cursor.execute(sql, params)
    finally:
        cursor.close()


def _sqlalchemy_insert(rows: Sequence[Row]) -> Any:
    """One multi-row INSERT (SQLAlchemy is there: the caller passed one of its objects)."""
    import sqlalchemy as sa

    table = sa.table(OUTBOX_TABLE, *(sa.column(c) for c in STAGED_COLUMNS))
    return sa.insert(table).values([dict(zip(STAGED_COLUMNS, row, strict=True)) for row in rows])
