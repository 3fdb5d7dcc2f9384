"""delayq: exact, durable delay timers on Redis, applied once in your database.

from delayq import schedule_expiry, cancel_expiry, schedule_many

schedule_expiry("SN123", "20m")   # cancel SN123 in 20 minutes unless it is paid
cancel_expiry("SN123")            # it was paid
schedule_expiry("SN124", "20m", connection=conn)  # only if your transaction commits

@delayq.action("release_stock")   # your own action, run by `delayq listen --app shop.timers`
def release_stock(ctx: delayq.Context) -> None: ...

`import delayq` loads only what scheduling needs (redis-py, python-dotenv): a producer
installs plain `delayq`. The names a listener's handlers use (Context, action, Skip, ...)
come from the `delayq[listener]` extra and are imported on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from delayq.errors import DelayqError, InvalidInput, NotReady, ServiceUnavailable
from delayq.introspect import PendingTimer, inspect, pending, status
from delayq.producer import Producer, cancel_expiry, schedule_expiry, schedule_many
from delayq.settings import Settings

#: The one place the version is written (pyproject.toml reads it: [tool.hatch.version]).
__version__ = "0.2.0"

if TYPE_CHECKING:
    from delayq.actions.core import Context, GiveUp, Result, Skip
    from delayq.actions.registry import action

#: Handler-side names, imported when first used: they need SQLAlchemy (the listener extra).
_LAZY = {
    "Context": "delayq.actions.core",
    "GiveUp": "delayq.actions.core",
    "Result": "delayq.actions.core",
    "Skip": "delayq.actions.core",
    "action": "delayq.actions.registry",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'delayq' has no attribute {name!r}")
    try:
        value = getattr(import_module(module), name)
    except ModuleNotFoundError as exc:
        raise ImportError(
            f"delayq.{name} is for listeners' actions: install 'delayq[listener]' ({exc})"
        ) from exc
    globals()[name] = value
    return value


__all__ = [
    "Context",
    "DelayqError",
    "GiveUp",
    "InvalidInput",
    "NotReady",
    "PendingTimer",
    "Producer",
    "Result",
    "ServiceUnavailable",
    "Settings",
    "Skip",
    "action",
    "cancel_expiry",
    "inspect",
    "pending",
    "schedule_expiry",
    "schedule_many",
    "status",
]
