"""Actions: what a fired timer does.

* `core`: what a handler sees (`Context`) and says (an outcome, `Skip`, `GiveUp`).
* `registry`: `@delayq.action`, the app modules a listener imports, and which actions it
  knows (`load_actions`), each with its retry policy.
* `builtin`: `cancel` and `complete`, ordinary batch handlers configured by the settings.
* `apply`: one database transaction per batch: handlers in savepoints, one outcome row
  per firing, a firing already recorded never applied twice.
* `external`: workers that run external actions (webhooks, `external=True` handlers)
  outside any transaction, at least once, without holding up the database actions.
* `webhook`: the action that POSTs a signed JSON body to DELAYQ_WEBHOOK_<ACTION>.
"""

from delayq.actions.apply import Applier
from delayq.actions.core import (
    ALREADY_RECORDED,
    APPLIED,
    FAILED,
    MALFORMED_KEY,
    NOT_FOUND,
    SKIPPED,
    UNKNOWN_ACTION,
    UNMAPPED_FLAG,
    Context,
    Done,
    GiveUp,
    Outcome,
    Result,
    Skip,
    utcnow,
)
from delayq.actions.registry import Actions, ActionSpec, Policy, action, load_actions

__all__ = [
    "ALREADY_RECORDED",
    "APPLIED",
    "FAILED",
    "MALFORMED_KEY",
    "NOT_FOUND",
    "SKIPPED",
    "UNKNOWN_ACTION",
    "UNMAPPED_FLAG",
    "ActionSpec",
    "Actions",
    "Applier",
    "Context",
    "Done",
    "GiveUp",
    "Outcome",
    "Policy",
    "Result",
    "Skip",
    "action",
    "load_actions",
    "utcnow",
]
