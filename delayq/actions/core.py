"""What a handler sees and says: its context, the outcomes it can name, and Skip."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, NamedTuple

import sqlalchemy as sa

from delayq.store import Firing

APPLIED = "applied"
SKIPPED = "skipped"
NOT_FOUND = "not_found"
UNKNOWN_ACTION = "unknown_action"
MALFORMED_KEY = "malformed_key"
#: A key `ORDER_SN:FLAG` whose flag is no action name (the PHP producer's `SN1:1`) and
#: is not mapped to one by DELAYQ_FLAG_ACTIONS.
UNMAPPED_FLAG = "unmapped_flag"
ALREADY_RECORDED = "already_recorded"  # not stored: the earlier outcome stands
#: Not stored either: the handler raised, the firing is retried or dead-lettered.
FAILED = "failed"

#: An outcome a handler may return: a short identifier (it is stored in a 32-character
#: column, and becomes a metric label).
OUTCOME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,31}")


class Skip(Exception):
    """Raise in a handler to record the firing as `skipped`, with the reason as its detail.
    What the handler wrote before raising is rolled back."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


class GiveUp(Exception):
    """Raise in a handler for a failure that retrying cannot mend (a webhook's 4xx): the
    firing goes to the dead letters at once, with this message as its error."""


class Result(NamedTuple):
    """What a handler may return instead of a bare outcome: the outcome and a detail
    stored beside it (up to 255 characters)."""

    outcome: str
    detail: str | None = None


@dataclass(frozen=True)
class Context:
    """One firing, as a handler sees it."""

    order_sn: str
    action: str
    #: When the timer was due, and when it was fired (for a webhook: when the request
    #: was sent), both aware UTC.
    due_at: datetime
    fired_at: datetime
    #: 1 on the first try; each failed try before this one adds 1.
    attempt: int
    #: The timer key and its due time, `SN123:cancel@1767225600000`: the same on every
    #: attempt of this firing, different for the next time the timer is set. Give it to
    #: any service you call, so that it can drop a repeated call.
    idempotency_key: str
    #: The listener's transaction (database handlers): write through it, and your writes
    #: commit with the firing's outcome, exactly once. None for external handlers.
    connection: sa.Connection | None = None
    #: Seconds an external handler's call may take (None for database handlers).
    timeout_s: float | None = None
    #: The timer key, `SN123:cancel` (or the flag form an older producer wrote).
    key: str = field(default="", repr=False)


def context_for(
    firing: Firing,
    order_sn: str,
    action: str,
    fired_at: datetime,
    *,
    connection: sa.Connection | None = None,
    timeout_s: float | None = None,
) -> Context:
    """The context of `firing`; `fired_at` is naive UTC, as the database stores it."""
    return Context(
        order_sn=order_sn,
        action=action,
        due_at=firing.due_at,
        fired_at=fired_at.replace(tzinfo=UTC),
        attempt=firing.attempt,
        idempotency_key=firing.id,
        connection=connection,
        timeout_s=timeout_s,
        key=firing.key,
    )


@dataclass(frozen=True)
class Outcome:
    """What became of one firing. Every outcome but FAILED and ALREADY_RECORDED is stored."""

    firing: Firing
    order_sn: str
    action: str
    outcome: str
    fired_at: datetime
    detail: str | None = None
    #: What the handler raised: FAILED, or Skip for a skip.
    error: BaseException | None = None

    @cached_property
    def lateness_ms(self) -> float:
        return (self.fired_at - naive_due_at(self.firing)).total_seconds() * 1000

    @property
    def recorded(self) -> bool:
        return self.outcome not in (FAILED, ALREADY_RECORDED)

    @property
    def failed(self) -> bool:
        return self.outcome == FAILED

    @property
    def permanent(self) -> bool:
        return isinstance(self.error, GiveUp)


@dataclass(frozen=True)
class Done:
    """An external action's call that has finished: its outcome is to be recorded (and the
    firing acknowledged) by an applier, like any other."""

    firing: Firing
    outcome: str
    detail: str | None
    #: When the call was made (naive UTC).
    fired_at: datetime


def naive_due_at(firing: Firing) -> datetime:
    """A firing's due time as the outcomes table holds it (naive UTC)."""
    return firing.naive_due_at


def utcnow() -> datetime:
    """Naive UTC with microseconds: the form every timestamp column holds."""
    return datetime.now(UTC).replace(tzinfo=None)


def as_result(returned: Any) -> Result:
    """A handler's return value as a Result; raises TypeError for anything else."""
    if returned is None:
        return Result(APPLIED)
    if isinstance(returned, Result):
        outcome, detail = returned
    elif isinstance(returned, str):
        outcome, detail = returned, None
    else:
        raise TypeError(
            f"handler returned {type(returned).__name__}: return None, an outcome name "
            "(up to 32 letters, digits and _ . : -) or delayq.Result"
        )
    if not isinstance(outcome, str) or not OUTCOME_RE.fullmatch(outcome):
        raise TypeError(
            f"handler returned outcome {outcome!r}: use letters, digits and _ . : -, up to 32 "
            "characters, starting with a letter"
        )
    if outcome in (FAILED, ALREADY_RECORDED):
        raise TypeError(f"handler returned outcome {outcome!r}, which delayq keeps for itself")
    return Result(outcome, None if detail is None else str(detail)[:255])


def as_batch_results(returned: Any, n: int) -> list[Result]:
    """A batch handler's return value as one Result per context."""
    if returned is None or isinstance(returned, str | Result):
        return [as_result(returned)] * n
    if isinstance(returned, Sequence) and len(returned) == n:
        return [as_result(r) for r in returned]
    raise TypeError(
        "batch handler must return None, one outcome for all, or a list of one outcome "
        f"per context ({n}); it returned {type(returned).__name__}"
        + (f" of {len(returned)}" if isinstance(returned, Sequence) else "")
    )
