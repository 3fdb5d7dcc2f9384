"""Alembic environment for delayq. Run through `delayq migrate`, which passes the
connection, the version table and whether to create the standard orders table."""

from alembic import context

from delayq.db import VERSION_TABLE, metadata

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise SystemExit("run migrations with 'delayq migrate', which configures the connection")

context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
