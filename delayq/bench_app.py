"""The handler `delayq bench --action handler` measures: the bench's listener imports this
module (DELAYQ_APP=delayq.bench_app), and each firing of `bench_touch` does one UPDATE of
another table, `bench_stock`, through the listener's transaction, as a shop's "release
the stock of an unpaid order" would. Only the bench's listener imports it, so the action
is registered nowhere else.
"""

from __future__ import annotations

import sqlalchemy as sa

import delayq
from delayq.actions import NOT_FOUND, Context
from delayq.bench_actions import Handler, stock

# Built once, as the built-ins' statements are: building it per call would be measured too.
_touch = (
    sa.update(stock)
    .where(stock.c.sku == sa.bindparam("sku_"))
    .values(touched=stock.c.touched + 1, touched_at=sa.bindparam("at_"))
)


@delayq.action(Handler.action, tables=(stock.name,))
def touch(ctx: Context) -> str | None:
    """One UPDATE of the order's stock row, committed with the firing's outcome."""
    assert ctx.connection is not None, "a database action runs in the transaction"
    done = ctx.connection.execute(
        _touch, {"sku_": ctx.order_sn, "at_": ctx.fired_at.replace(tzinfo=None)}
    )
    return None if done.rowcount == 1 else NOT_FOUND
