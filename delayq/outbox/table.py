"""The delayq_outbox table: its name, its columns and the SQL that writes it, without
SQLAlchemy (a producer that stages through a plain DB-API connection has none).

One row is one request, in the order it was staged (`id`):

    id          autoincrement: the relay applies a timer's rows in this order
    order_sn    the order (1-64 of A-Za-z0-9_.-)
    action      the action (the timer key is ORDER_SN:ACTION)
    op          'schedule' | 'cancel'
    spec        'in' (ms is a delay) | 'at' (ms is an epoch due time); NULL for cancel
    ms          the delay or due time in ms; NULL for cancel
    created_at  the database server's clock when the row was written (UTC): the relay
                counts an 'in' delay from it with the same clock, so no clock but the
                database's matters, and a replayed row keeps its due time
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from delayq.errors import InvalidInput

OUTBOX_TABLE = "delayq_outbox"
SCHEDULE, CANCEL = "schedule", "cancel"
#: The columns a producer writes (created_at and id are the database's).
STAGED_COLUMNS = ("order_sn", "action", "op", "spec", "ms")
#: Rows per INSERT statement: 5 parameters each stays far below every driver's limit
#: (SQLite's is 32,766 since 3.32; 999 before), and one statement stages a whole batch.
ROWS_PER_INSERT = 150

#: A staged row: (order_sn, action, op, spec, ms).
Row = tuple[str, str, str, str | None, int | None]

#: The database clock as naive UTC, in each dialect: the column's default and what the
#: relay compares created_at with. PostgreSQL's clock_timestamp() is the wall clock (now()
#: is the transaction's start); MariaDB's UTC_TIMESTAMP(6) and SQLite's 'now' are the
#: statement's.
DB_NOW_SQL = {
    "postgresql": "(clock_timestamp() AT TIME ZONE 'utc')",
    "mysql": "UTC_TIMESTAMP(6)",
    "mariadb": "UTC_TIMESTAMP(6)",
    "sqlite": "(strftime('%Y-%m-%d %H:%M:%f', 'now'))",
}

#: How old a row is by the database clock, in ms (with a fraction): the relay's only
#: clock for 'in' delays and for its lateness.
AGE_MS_SQL = {
    "postgresql": (
        "(EXTRACT(EPOCH FROM ((clock_timestamp() AT TIME ZONE 'utc') - created_at)) * 1000)"
    ),
    "mysql": "(TIMESTAMPDIFF(MICROSECOND, created_at, UTC_TIMESTAMP(6)) / 1000.0)",
    "mariadb": "(TIMESTAMPDIFF(MICROSECOND, created_at, UTC_TIMESTAMP(6)) / 1000.0)",
    "sqlite": "((julianday('now') - julianday(created_at)) * 86400000.0)",
}


def schedule_rows(timers: Sequence[tuple[str, str, int]]) -> list[Row]:
    """Rows for validated timers (timer_key, 'in' | 'at', ms)."""
    rows: list[Row] = []
    for key, spec, ms in timers:
        order_sn, action = _split(key)
        if spec not in ("in", "at") or isinstance(ms, bool) or not isinstance(ms, int):
            raise InvalidInput(f"not a timer to stage: {(key, spec, ms)!r}")
        rows.append((order_sn, action, SCHEDULE, spec, ms))
    return rows


def cancel_rows(timer_keys: Sequence[str]) -> list[Row]:
    return [(*_split(key), CANCEL, None, None) for key in timer_keys]


def _split(key: str) -> tuple[str, str]:
    from delayq.keys import parse_timer_key

    return parse_timer_key(key)


def insert_statement(paramstyle: str, rows: Sequence[Row]) -> tuple[str, Any]:
    """`INSERT INTO delayq_outbox (...) VALUES (...), (...)` for `rows` in a DB-API
    driver's `paramstyle`, and its parameters (a tuple, or a dict for 'named')."""
    width = len(STAGED_COLUMNS)
    flat = [value for row in rows for value in row]
    if paramstyle == "qmark":
        marks = ["?"] * len(flat)
    elif paramstyle in ("format", "pyformat"):
        # Every pyformat driver (psycopg, psycopg2, PyMySQL) takes positional %s too.
        marks = ["%s"] * len(flat)
    elif paramstyle == "numeric":
        marks = [f":{i + 1}" for i in range(len(flat))]
    elif paramstyle == "named":
        marks = [f":p{i}" for i in range(len(flat))]
    else:
        raise InvalidInput(f"connection=: DB-API paramstyle {paramstyle!r} is not supported")
    groups = [f"({', '.join(marks[r : r + width])})" for r in range(0, len(marks), width)]
    sql = f"INSERT INTO {OUTBOX_TABLE} ({', '.join(STAGED_COLUMNS)}) VALUES {', '.join(groups)}"
    if paramstyle == "named":
        return sql, {f"p{i}": v for i, v in enumerate(flat)}
    return sql, tuple(flat)


def chunks(rows: Sequence[Row]) -> list[Sequence[Row]]:
    return [rows[i : i + ROWS_PER_INSERT] for i in range(0, len(rows), ROWS_PER_INSERT)]


#: What a row must be (a CHECK constraint: hand-written rows are refused by the database).
OUTBOX_CHECK = (
    "op IN ('schedule', 'cancel') AND "
    "(op = 'cancel' OR (spec IN ('in', 'at') AND ms IS NOT NULL AND ms >= 0))"
)
