"""delayq_outbox: schedule and cancel requests staged in producers' transactions

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

from delayq.db import Timestamp
from delayq.outbox.table import DB_NOW_SQL, OUTBOX_CHECK, OUTBOX_TABLE

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _db_now() -> sa.TextClause:
    # The database server's clock, UTC, with microseconds (milliseconds on SQLite): the
    # relay counts an 'in' delay from it with the same clock (delayq/outbox/table.py).
    return sa.text(DB_NOW_SQL[op.get_bind().dialect.name])


def upgrade() -> None:
    op.create_table(
        OUTBOX_TABLE,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("order_sn", sa.String(64), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("op", sa.String(8), nullable=False),
        sa.Column("spec", sa.String(2), nullable=True),
        sa.Column("ms", sa.BigInteger(), nullable=True),
        sa.Column("created_at", Timestamp, nullable=False, server_default=_db_now()),
        sa.CheckConstraint(OUTBOX_CHECK, name="ck_delayq_outbox_request"),
    )
    op.create_index("ix_delayq_outbox_timer", OUTBOX_TABLE, ["order_sn", "action"])


def downgrade() -> None:
    op.drop_index("ix_delayq_outbox_timer", table_name=OUTBOX_TABLE)
    op.drop_table(OUTBOX_TABLE)
