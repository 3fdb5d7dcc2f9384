"""The shop's own timer action, loaded by `delayq listen --app shop_timers` (and by the
tests through DELAYQ_APP, the `app` option of delayq.testing)."""

from __future__ import annotations

import sqlalchemy as sa
from shop import orders, reminders

import delayq


@delayq.action("remind", tables=["reminders"])
def remind(ctx: delayq.Context) -> str:
    """Remind the buyer of an order still unpaid. Runs in the listener's transaction: the
    reminder row commits with delayq's record that this firing happened, once."""
    conn = ctx.connection
    assert conn is not None
    status = conn.execute(
        sa.select(orders.c.status).where(orders.c.order_sn == ctx.order_sn)
    ).scalar()
    if status != "unpaid":
        raise delayq.Skip(f"order is {status}")
    conn.execute(
        reminders.insert().values(order_sn=ctx.order_sn, sent_at=ctx.fired_at.replace(tzinfo=None))
    )
    return "reminded"
