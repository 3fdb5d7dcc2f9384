"""`delayq migrate` beside an application's own tables: an existing orders table is used
as it is, never recreated; a migration the database refuses is named as such, not as an
unreachable database."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from delayq.migrate import current_revision
from delayq.permissions import check_database
from delayq.settings import Settings
from tests.harness import clean_env, create_orders, engine_for, run_cli, statuses

NOT_READY = 4

# The application's own layout: more columns than delayq's, a different status vocabulary.
OWN_ORDERS = """CREATE TABLE {name} (
    order_sn VARCHAR(64) PRIMARY KEY,
    status VARCHAR(16) NOT NULL,
    customer VARCHAR(64) NOT NULL DEFAULT 'someone',
    cancelled_at TIMESTAMP NULL,
    updated_at TIMESTAMP NULL
)"""


def _tables(url: str) -> set[str]:
    engine = engine_for(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _columns(url: str, table: str) -> list[str]:
    engine = engine_for(url)
    try:
        return [c["name"] for c in sa.inspect(engine).get_columns(table)]
    finally:
        engine.dispose()


def _make_own_orders(url: str, name: str) -> None:
    engine = engine_for(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(OWN_ORDERS.format(name=name)))
        if name == "orders":
            create_orders(engine, ["OWN-1"])
    finally:
        engine.dispose()


def test_migrate_leaves_an_existing_orders_table_alone_and_creates_only_its_own(
    database_url: str, tmp_path: Path
) -> None:
    _make_own_orders(database_url, "orders")
    columns = _columns(database_url, "orders")
    env = clean_env(DATABASE_URL=database_url, ORDERS_TABLE="orders", HOME=str(tmp_path))

    done = run_cli("migrate", env=env)

    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "database schema: empty -> 0002"
    assert {"delayq_outcomes", "delayq_alembic_version"} <= _tables(database_url)
    assert _columns(database_url, "orders") == columns
    engine = engine_for(database_url)
    try:
        assert statuses(engine) == {"OWN-1": "unpaid"}
        # And the database check a listener starts with accepts the table as it is.
        settings = Settings(database_url=database_url, orders_table="orders")
        assert check_database(engine, settings)[0] == "database schema at 0002"
    finally:
        engine.dispose()
    # Running it again changes nothing.
    again = run_cli("migrate", env=env)
    assert again.returncode == 0 and again.stdout.strip() == "database schema: 0002 -> 0002"


def test_migrate_with_the_default_settings_keeps_an_existing_orders_table(
    database_url: str, tmp_path: Path
) -> None:
    _make_own_orders(database_url, "orders")
    env = clean_env(DATABASE_URL=database_url, HOME=str(tmp_path))

    done = run_cli("migrate", env=env)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "customer" in _columns(database_url, "orders")


def test_migrate_pointed_at_an_own_table_creates_no_standard_orders_table(
    database_url: str, tmp_path: Path
) -> None:
    _make_own_orders(database_url, "shop_orders")
    env = clean_env(DATABASE_URL=database_url, ORDERS_TABLE="shop_orders", HOME=str(tmp_path))

    done = run_cli("migrate", env=env)

    assert done.returncode == 0, done.stdout + done.stderr
    tables = _tables(database_url)
    assert "orders" not in tables and {"shop_orders", "delayq_outcomes"} <= tables


def test_migrate_of_an_empty_database_creates_the_standard_orders_table(
    database_url: str, tmp_path: Path
) -> None:
    done = run_cli("migrate", env=clean_env(DATABASE_URL=database_url, HOME=str(tmp_path)))

    assert done.returncode == 0, done.stdout + done.stderr
    assert {"orders", "delayq_outcomes", "delayq_alembic_version"} <= _tables(database_url)
    assert "order_sn" in _columns(database_url, "orders")


def test_a_migration_the_database_refuses_is_not_reported_as_unreachable(
    database_url: str, tmp_path: Path
) -> None:
    # A table of delayq's name that delayq did not make: CREATE TABLE fails.
    engine = engine_for(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE delayq_outcomes (id INTEGER PRIMARY KEY)"))
    finally:
        engine.dispose()
    env = clean_env(DATABASE_URL=database_url, HOME=str(tmp_path))

    done = run_cli("migrate", env=env)

    assert done.returncode == NOT_READY, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("delayq: error: database at "), lines[0]
    assert "refused the migration" in lines[0] and "delayq_outcomes" in lines[0], lines[0]
    assert "not reachable" not in lines[0]
    # No revision is recorded, so running it again once the table is out of the way works.
    engine = engine_for(database_url)
    try:
        assert current_revision(engine) is None
    finally:
        engine.dispose()
