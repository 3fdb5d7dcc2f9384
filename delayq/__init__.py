"""delayq: exact, durable delay timers on Redis, applied once in your database.

from delayq import schedule_expiry, cancel_expiry, schedule_many

schedule_expiry("SN123", "20m")   # cancel SN123 in 20 minutes unless it is paid
cancel_expiry("SN123")            # it was paid
"""

from delayq.errors import DelayqError, InvalidInput, NotReady, ServiceUnavailable
from delayq.producer import Producer, cancel_expiry, schedule_expiry, schedule_many
from delayq.settings import Settings

__all__ = [
    "DelayqError",
    "InvalidInput",
    "NotReady",
    "Producer",
    "ServiceUnavailable",
    "Settings",
    "cancel_expiry",
    "schedule_expiry",
    "schedule_many",
]
__version__ = "0.1.0"
