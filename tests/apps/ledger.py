"""A handler that names the table it writes, for `delayq check` to verify."""

from __future__ import annotations

import sqlalchemy as sa

import delayq


@delayq.action("post_ledger", tables=["shop_ledger"])
def post_ledger(ctx: delayq.Context) -> None:
    assert ctx.connection is not None
    ctx.connection.execute(
        sa.text("INSERT INTO shop_ledger (order_sn) VALUES (:sn)"), {"sn": ctx.order_sn}
    )
