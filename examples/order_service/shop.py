"""A small order service of the kind delayq is for: an order not paid within 20 minutes is
cancelled, and its buyer is reminded after 15. `create_order` and `pay` are what its web
views would call. Its tests (test_orders.py, test_orders_unittest.py) run it against
delayq.testing: a real Redis, the real listener's firings, its own database; no mocks.

In production, `delayq listen --app shop_timers` fires the timers (docs/testing.md).
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

import delayq

PAYMENT_WINDOW = "20m"
REMINDER_AFTER = "15m"

metadata = sa.MetaData()

#: delayq's built-in `cancel` moves an order from unpaid to cancelled in this table.
orders = sa.Table(
    "orders",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("order_sn", sa.String(64), nullable=False, unique=True),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("cancelled_at", sa.DateTime, nullable=True),
    sa.Column("updated_at", sa.DateTime, nullable=True),
)

#: Written by the shop's own action, `remind` (shop_timers.py).
reminders = sa.Table(
    "reminders",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("order_sn", sa.String(64), nullable=False),
    sa.Column("sent_at", sa.DateTime, nullable=False),
)


def create_order(engine: Engine, order_sn: str) -> None:
    """Place an unpaid order: cancelled in PAYMENT_WINDOW unless paid, reminded before."""
    with engine.begin() as conn:
        conn.execute(orders.insert().values(order_sn=order_sn, status="unpaid"))
    delayq.schedule_expiry(order_sn, PAYMENT_WINDOW)
    delayq.schedule_expiry(order_sn, REMINDER_AFTER, action="remind")


def pay(engine: Engine, order_sn: str) -> bool:
    """Mark the order paid; False if it is not unpaid any more (cancelled meanwhile)."""
    with engine.begin() as conn:
        paid = conn.execute(
            orders.update()
            .where(orders.c.order_sn == order_sn, orders.c.status == "unpaid")
            .values(status="paid", updated_at=datetime.now(UTC).replace(tzinfo=None))
        ).rowcount
    if paid:
        delayq.cancel_expiry(order_sn)
        delayq.cancel_expiry(order_sn, action="remind")
    return bool(paid)


def status(engine: Engine, order_sn: str) -> str | None:
    with engine.connect() as conn:
        found: str | None = conn.execute(
            sa.select(orders.c.status).where(orders.c.order_sn == order_sn)
        ).scalar()
        return found


def reminders_sent(engine: Engine, order_sn: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count()).where(reminders.c.order_sn == order_sn)
            ).scalar_one()
        )
