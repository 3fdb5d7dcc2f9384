"""`delayq migrate`: Alembic, driven from code so it works from an installed wheel too."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from delayq.db import VERSION_TABLE
from delayq.errors import NotReady
from delayq.settings import Settings, mask_url


def migrations_dir() -> Path:
    """`migrations/` of a source checkout, or its copy inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "migrations", here / "_migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError("delayq's migrations directory is missing from this installation")


def _config(settings: Settings | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    # The standard orders table is created only for users who did not bring their own.
    config.attributes["create_orders_table"] = (
        settings is None or settings.orders_table == Settings.orders_table
    )
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE}
        ).get_current_revision()


def upgrade(engine: Engine, settings: Settings) -> tuple[str | None, str]:
    """Upgrade to head; returns (revision before, revision after). Safe to run while
    listeners run: each migration is one transaction where the database allows it.

    A database that does not answer raises sqlalchemy's OperationalError (the caller
    reports it as unreachable); one that answers but refuses a statement raises NotReady."""
    before = current_revision(engine)
    config = _config(settings)
    with engine.connect() as conn:
        config.attributes["connection"] = conn
        try:
            with conn.begin():
                command.upgrade(config, "head")
        except sa.exc.DBAPIError as exc:
            if exc.connection_invalidated:  # the server went away mid-way
                raise
            reason = str(exc.orig).splitlines()[0] if str(exc.orig) else type(exc.orig).__name__
            raise NotReady(
                f"database at {mask_url(settings.effective_database_url)} refused the "
                f"migration: {reason}"
            ) from None
    return before, head_revision()
