"""orders (the standard layout, unless you point delayq at your own table) and outcomes

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import context, op

from delayq.db import Timestamp

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _now() -> sa.TextClause:
    # Server-side defaults, so a bare INSERT INTO orders (order_sn, status) works, in UTC
    # with microseconds where the database has them.
    dialect = op.get_bind().dialect.name
    if dialect in ("mysql", "mariadb"):
        return sa.text("CURRENT_TIMESTAMP(6)")
    if dialect == "postgresql":
        return sa.text("(now() AT TIME ZONE 'utc')")
    return sa.text("(strftime('%Y-%m-%d %H:%M:%f', 'now'))")


def _create_orders_table() -> bool:
    # Never over a table of that name: it is the application's own, used as it is.
    wanted = context.config.attributes.get("create_orders_table", True)
    return bool(wanted) and not sa.inspect(op.get_bind()).has_table("orders")


def upgrade() -> None:
    if _create_orders_table():
        op.create_table(
            "orders",
            sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
            sa.Column("order_sn", sa.String(64), nullable=False),
            sa.Column("status", sa.String(32), nullable=False, server_default="unpaid"),
            sa.Column("created_at", Timestamp, nullable=False, server_default=_now()),
            sa.Column("updated_at", Timestamp, nullable=False, server_default=_now()),
            sa.Column("cancelled_at", Timestamp, nullable=True),
            sa.UniqueConstraint("order_sn", name="uq_orders_order_sn"),
            sa.CheckConstraint(
                "status IN ('unpaid', 'paid', 'cancelled', 'completed')", name="ck_orders_status"
            ),
        )
    op.create_table(
        "delayq_outcomes",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("order_sn", sa.String(64), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("due_at", Timestamp, nullable=False),
        sa.Column("fired_at", Timestamp, nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("detail", sa.String(255), nullable=True),
        sa.UniqueConstraint("order_sn", "action", "due_at", name="uq_delayq_outcomes_firing"),
    )
    op.create_index("ix_delayq_outcomes_fired_at", "delayq_outcomes", ["fired_at"])


def downgrade() -> None:
    op.drop_index("ix_delayq_outcomes_fired_at", table_name="delayq_outcomes")
    op.drop_table("delayq_outcomes")
    # The orders table stays: it may be the application's own, and it holds its orders.
