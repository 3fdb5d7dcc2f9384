"""The built-in actions, `cancel` and `complete`: an order's status moves on, if it is
still in the status the action starts from. They are ordinary batch handlers; the names
of the table, columns and statuses come from the settings.

All firings of one action in a transaction are one SELECT ... FOR UPDATE and one UPDATE:
a payment committing between the two waits for the lock, so the verdict recorded is the
one applied. (SQLite: BEGIN IMMEDIATE does the same.)
"""

from __future__ import annotations

import sqlalchemy as sa

from delayq.actions.core import APPLIED, NOT_FOUND, Context, Result
from delayq.actions.registry import ActionSpec
from delayq.db import orders_table
from delayq.settings import Settings


class StatusChange:
    """Move orders from one status to another, stamping a column if there is one."""

    def __init__(
        self, settings: Settings, from_status: str, to_status: str, stamp_column: str | None
    ) -> None:
        self.from_status, self.to_status = from_status, to_status
        self.skipped = f"skipped_not_{from_status}"[:32]
        orders = orders_table(settings)
        key = orders.c[settings.order_key_column]
        status = orders.c[settings.status_column]
        order_sns: sa.BindParameter[str] = sa.bindparam("order_sns", expanding=True)
        # Built once: building statements per batch was a third of the CPU a listener spent
        # at 1,000 timers a second (BENCHMARKS.md). Public: `delayq check` probes them.
        self.select_locked = sa.select(key, status).where(key.in_(order_sns)).with_for_update()
        values: dict[str, object] = {settings.status_column: to_status}
        for column in (stamp_column, settings.updated_at_column):
            if column:
                values[column] = sa.bindparam("fired_at_")
        self.update = (
            sa.update(orders)
            .where(key.in_(sa.bindparam("order_sns", expanding=True)), status == from_status)
            .values(values)
        )
        self.table = settings.orders_table

    def __call__(self, contexts: list[Context]) -> list[Result]:
        conn = contexts[0].connection
        assert conn is not None, "a database action runs in a transaction"
        wanted = sorted({c.order_sn for c in contexts})
        statuses = {
            row[0]: row[1] for row in conn.execute(self.select_locked, {"order_sns": wanted})
        }
        results: list[Result] = []
        to_apply: list[str] = []
        for c in contexts:
            status = statuses.get(c.order_sn)
            if status is None:
                results.append(Result(NOT_FOUND))
            elif status == self.from_status:
                results.append(Result(APPLIED))
                to_apply.append(c.order_sn)
                # A second firing of the same order in this batch must see the change.
                statuses[c.order_sn] = self.to_status
            else:
                results.append(Result(self.skipped))
        if to_apply:
            fired_at = contexts[0].fired_at.replace(tzinfo=None)
            conn.execute(self.update, {"order_sns": to_apply, "fired_at_": fired_at})
        return results

    @property
    def outcomes(self) -> set[str]:
        return {APPLIED, NOT_FOUND, self.skipped}


def builtin_actions(settings: Settings) -> list[ActionSpec]:
    """`cancel` (unpaid -> cancelled, stamping cancelled_at) and `complete` (paid ->
    completed), with the statuses and columns of `settings`."""
    s = settings
    changes = {
        "cancel": StatusChange(
            s, s.status_unpaid, s.status_cancelled, s.cancelled_at_column or None
        ),
        "complete": StatusChange(s, s.status_paid, s.status_completed, None),
    }
    return [
        ActionSpec(
            name=name,
            handler=change,
            batch=True,
            tables=(s.orders_table,),
            source="built-in",
            summary=f"{s.orders_table}.{s.status_column} {change.from_status} -> "
            f"{change.to_status}",
            trusted=True,
        )
        for name, change in changes.items()
    ]
