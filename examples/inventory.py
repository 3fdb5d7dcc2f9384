"""Worked example: an unpaid order's reserved stock goes back on sale when its timer fires.

A shop reserves stock when an order is placed (inventory.reserved += quantity) and
schedules the order's `cancel` timer. This module replaces the built-in `cancel` with a
handler that, in the listener's transaction, cancels the order if it is still unpaid and
returns its quantities to `available`: the order, the stock and delayq's outcome row commit
together, so stock is returned exactly once, and never for an order paid meanwhile.

    export DELAYQ_DATABASE_URL=postgresql+psycopg://shop@localhost/shop DELAYQ_REDIS_URL=...
    python examples/inventory.py setup         # these tables, some stock and order SN-1001
    delayq migrate                             # delayq's own table (it keeps these orders)
    delayq listen --app examples/inventory.py
    delayq schedule SN-1001 --in 30s           # unpaid in 30 s: cancelled, stock returned
"""

from __future__ import annotations

import sys
from collections import Counter

import sqlalchemy as sa

import delayq

metadata = sa.MetaData()

#: The columns delayq's built-in actions expect too, so `complete` still works.
orders = sa.Table(
    "orders",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("order_sn", sa.String(64), nullable=False, unique=True),
    sa.Column("status", sa.String(32), nullable=False, server_default="unpaid"),
    sa.Column("cancelled_at", sa.DateTime, nullable=True),
    sa.Column("updated_at", sa.DateTime, nullable=True),
)

order_items = sa.Table(
    "order_items",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("order_sn", sa.String(64), nullable=False, index=True),
    sa.Column("sku", sa.String(64), nullable=False),
    sa.Column("quantity", sa.Integer, nullable=False),
)

inventory = sa.Table(
    "inventory",
    metadata,
    sa.Column("sku", sa.String(64), primary_key=True),
    # Never below zero: a bug that returned stock twice would fail loudly, not oversell.
    sa.Column("available", sa.Integer, sa.CheckConstraint("available >= 0"), nullable=False),
    sa.Column("reserved", sa.Integer, sa.CheckConstraint("reserved >= 0"), nullable=False),
)


@delayq.action("cancel", tables=["orders", "order_items", "inventory"])
def cancel(ctx: delayq.Context) -> str | None:
    """Cancel the order if it is still unpaid, and put its reserved stock back on sale.

    Outcomes as the built-in `cancel` records them: None (applied), `not_found`,
    `skipped_not_unpaid`."""
    conn = ctx.connection
    assert conn is not None, "a database action runs in the listener's transaction"
    # Locked until the transaction ends: a payment committing now waits, then finds the
    # order cancelled; or it committed first, and we see `paid` here.
    status = conn.execute(
        sa.select(orders.c.status).where(orders.c.order_sn == ctx.order_sn).with_for_update()
    ).scalar_one_or_none()
    if status is None:
        return "not_found"
    if status != "unpaid":
        return "skipped_not_unpaid"
    quantities: Counter[str] = Counter()
    for sku, quantity in conn.execute(
        sa.select(order_items.c.sku, order_items.c.quantity).where(
            order_items.c.order_sn == ctx.order_sn
        )
    ):
        quantities[sku] += quantity
    # SKUs in one order, so that two listeners cancelling orders of the same SKUs take the
    # row locks in the same order and cannot deadlock.
    for sku in sorted(quantities):
        conn.execute(
            sa.update(inventory)
            .where(inventory.c.sku == sku)
            .values(
                reserved=inventory.c.reserved - quantities[sku],
                available=inventory.c.available + quantities[sku],
            )
        )
    fired_at = ctx.fired_at.replace(tzinfo=None)  # naive UTC, as the columns hold it
    conn.execute(
        sa.update(orders)
        .where(orders.c.order_sn == ctx.order_sn)
        .values(status="cancelled", cancelled_at=fired_at, updated_at=fired_at)
    )
    return None


def place_order(conn: sa.Connection, order_sn: str, items: dict[str, int]) -> None:
    """What the shop does at checkout: an unpaid order whose items are reserved."""
    conn.execute(sa.insert(orders).values(order_sn=order_sn, status="unpaid"))
    for sku, quantity in sorted(items.items()):
        conn.execute(sa.insert(order_items).values(order_sn=order_sn, sku=sku, quantity=quantity))
        reserved = conn.execute(
            sa.update(inventory)
            .where(inventory.c.sku == sku, inventory.c.available >= quantity)
            .values(
                available=inventory.c.available - quantity,
                reserved=inventory.c.reserved + quantity,
            )
        )
        if reserved.rowcount != 1:
            raise ValueError(f"{order_sn}: fewer than {quantity} of {sku} available")


def setup(engine: sa.Engine) -> None:
    """Create the tables (an `orders` table that exists is used as it is) and, in an empty
    shop, some stock and one unpaid order, SN-1001."""
    metadata.create_all(engine)
    with engine.begin() as conn:
        if conn.execute(sa.select(sa.func.count()).select_from(inventory)).scalar_one():
            return
        conn.execute(
            sa.insert(inventory),
            [
                {"sku": "MUG", "available": 20, "reserved": 0},
                {"sku": "TEE", "available": 10, "reserved": 0},
            ],
        )
        place_order(conn, "SN-1001", {"MUG": 2, "TEE": 1})


def main(argv: list[str]) -> int:
    if argv != ["setup"]:
        print("usage: python examples/inventory.py setup", file=sys.stderr)
        return 2
    settings = delayq.Settings.load()
    engine = sa.create_engine(settings.effective_database_url)
    setup(engine)
    print(f"set up orders, order_items and inventory at {engine.url!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
