"""The transactional outbox: a timer exists if and only if the order's transaction commits.

Producers stage schedule and cancel requests as rows of delayq_outbox in their own
transaction (`schedule_expiry(..., connection=conn)`, delayq.outbox.stage); the listener
relays committed rows to Redis and deletes them (delayq.outbox.relay). docs/outbox.md.

Importing this package imports no SQLAlchemy: a producer install has none.
"""

from delayq.outbox.stage import (
    stage_cancel,
    stage_cancel_async,
    stage_schedule,
    stage_schedule_async,
)
from delayq.outbox.table import OUTBOX_TABLE

__all__ = [
    "OUTBOX_TABLE",
    "stage_cancel",
    "stage_cancel_async",
    "stage_schedule",
    "stage_schedule_async",
]
