"""delayq: exact, durable delay timers on Redis, applied once in your database.

from delayq import schedule_expiry, cancel_expiry, schedule_many

schedule_expiry("SN123", "20m")   # cancel SN123 in 20 minutes unless it is paid
cancel_expiry("SN123")            # it was paid

@delayq.action("release_stock")   # your own action, run by `delayq listen --app shop.timers`
def release_stock(ctx: delayq.Context) -> None: ...
"""

from delayq.actions.core import Context, GiveUp, Result, Skip
from delayq.actions.registry import action
from delayq.errors import DelayqError, InvalidInput, NotReady, ServiceUnavailable
from delayq.producer import Producer, cancel_expiry, schedule_expiry, schedule_many
from delayq.settings import Settings

__all__ = [
    "Context",
    "DelayqError",
    "GiveUp",
    "InvalidInput",
    "NotReady",
    "Producer",
    "Result",
    "ServiceUnavailable",
    "Settings",
    "Skip",
    "action",
    "cancel_expiry",
    "schedule_expiry",
    "schedule_many",
]
__version__ = "0.1.0"
