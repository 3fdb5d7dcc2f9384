"""Applying a batch of firings in one short database transaction.

Each action's handler is called with the firings of that action (a batch handler once
with all of them, any other once per firing). A handler that raises rolls back only its
own firing: the first pass runs without savepoints (they cost more than a handler's own
UPDATE), and if a handler raises, the transaction is rolled back and the batch applied
again without calling it, every other handler in a savepoint of its own this time. One
outcome row per firing is written in the same transaction, so the handlers' writes and
the record that the firing happened commit together, or not at all.

A firing already recorded (its acknowledgement to Redis was lost and it came round
again) is recognised by its (order_sn, action, due_at) and not applied twice. Firings of
external actions arrive here already done (`Done`): only their outcome is recorded.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from delayq.actions.core import (
    ALREADY_RECORDED,
    FAILED,
    MALFORMED_KEY,
    SKIPPED,
    UNKNOWN_ACTION,
    UNMAPPED_FLAG,
    Done,
    Outcome,
    Result,
    Skip,
    as_batch_results,
    as_result,
    context_for,
    naive_due_at,
    utcnow,
)
from delayq.actions.registry import Actions, ActionSpec, load_actions
from delayq.db import is_transient, outcomes
from delayq.due_queue import sleep_until
from delayq.settings import Settings
from delayq.store import Firing
from delayq.timing import ACTION_RE, ORDER_SN_RE

#: What an applier is given: a claimed firing, or an external action's finished call.
Item = Firing | Done


class Job(NamedTuple):
    item: Item
    order_sn: str
    action: str

    @property
    def firing(self) -> Firing:
        return firing_of(self.item)


class Applier:
    """Applies batches of firings to the database."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        actions: Actions | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.actions = actions if actions is not None else load_actions(settings, app="")
        self.flags = settings.flag_action_map
        self.clock = clock
        self.select_recorded = sa.select(
            outcomes.c.order_sn, outcomes.c.action, outcomes.c.due_at
        ).where(
            outcomes.c.order_sn.in_(sa.bindparam("order_sns", expanding=True)),
            outcomes.c.due_at.in_(sa.bindparam("due_ats", expanding=True)),
        )

    def parse_key(self, key: str) -> tuple[str, str]:
        """(order_sn, action) of a timer key; the action is '?' for a key that is not a
        timer, and the flag itself (say '1') when it names no action and has no mapping."""
        order_sn, sep, flag = key.rpartition(":")
        if not sep or not ORDER_SN_RE.fullmatch(order_sn) or not flag:
            return key[:64], "?"
        return order_sn, self.flags.get(flag, flag)

    def apply(self, items: Sequence[Item], not_before: float = 0.0) -> list[Outcome]:
        """Apply `items` in one transaction; returns one outcome per firing (FAILED for a
        firing whose handler raised: nothing of it is committed). Raises the database's
        exception if the transaction fails (nothing is then applied). The transaction is
        opened at once, and waits for the monotonic instant `not_before` (firings claimed
        ahead of their due time) before anything is applied."""
        # A firing claimed twice by this listener (its lease ran out while it was queued)
        # is applied once.
        unique = {firing_of(i).id: i for i in items}.values()
        jobs = [Job(i, *self.parse_key(firing_of(i).key)) for i in unique]
        try:
            return self._apply(jobs, check_all=False, not_before=not_before)
        except sa.exc.IntegrityError:
            # A fresh claim whose outcome exists after all: the same timer was scheduled
            # again for a due time that has already fired. Look every firing up.
            return self._apply(jobs, check_all=True)

    def _apply(
        self,
        jobs: list[Job],
        *,
        check_all: bool,
        decided: dict[str, Outcome] | None = None,
        not_before: float = 0.0,
    ) -> list[Outcome]:
        try:
            with self.engine.begin() as conn:
                recorded = self._recorded(conn, jobs, check_all=check_all)
                sleep_until(not_before)
                fired_at = self.clock()
                todo = [j for j in jobs if _identity(j) not in recorded]
                results = self._results(conn, todo, fired_at, decided)
        except _Redo as redo:
            # A handler raised (or skipped) where no savepoint could undo just its writes:
            # the transaction is rolled back, and the batch applied again with its verdict
            # known (it is not called again in this attempt).
            return self._apply(
                jobs, check_all=check_all, decided={**(decided or {}), **redo.decided}
            )
        skipped = [
            Outcome(j.firing, j.order_sn, j.action, ALREADY_RECORDED, fired_at)
            for j in jobs
            if _identity(j) in recorded
        ]
        return results + skipped

    def _results(
        self,
        conn: sa.Connection,
        todo: list[Job],
        fired_at: datetime,
        decided: dict[str, Outcome] | None,
    ) -> list[Outcome]:
        results: list[Outcome] = []
        groups: dict[str, list[Job]] = defaultdict(list)
        for job in todo:
            if decided and job.firing.id in decided:
                results.append(decided[job.firing.id])
            elif isinstance(job.item, Done):
                d = job.item
                results.append(
                    Outcome(d.firing, job.order_sn, job.action, d.outcome, d.fired_at, d.detail)
                )
            elif (spec := self.actions.get(job.action)) is None or spec.external:
                results.append(Outcome(job.firing, *job[1:], _unknown(job.action), fired_at))
            else:
                groups[job.action].append(job)
        # First pass: no savepoints (a SAVEPOINT and RELEASE per handler call cost more
        # than the call's own UPDATE). Only once a handler has raised, the batch runs again
        # with each call in a savepoint, wherever there is something else to keep.
        calls = sum(1 if self.actions.specs[a].batch else len(g) for a, g in groups.items())
        isolate = decided is not None and calls + len(results) > 1
        for name in sorted(groups):  # the same order each time: fewer lock waits
            results += self._run(conn, self.actions.specs[name], groups[name], fired_at, isolate)
        rows = [_outcome_row(r) for r in results if r.recorded]
        if rows:
            conn.execute(outcomes.insert(), rows)
        return results

    def _run(
        self,
        conn: sa.Connection,
        spec: ActionSpec,
        jobs: list[Job],
        fired_at: datetime,
        isolate: bool,
    ) -> list[Outcome]:
        """Call the handler of `spec` for `jobs`; one outcome per job. Raises _Redo when a
        call without a savepoint raised."""
        contexts = [
            context_for(j.firing, j.order_sn, j.action, fired_at, connection=conn) for j in jobs
        ]
        calls = (
            [(jobs, contexts)]
            if spec.batch
            else [([j], c) for j, c in zip(jobs, contexts, strict=True)]
        )
        out: list[Outcome] = []
        for called, arg in calls:
            verdicts = self._call(conn, spec, arg, len(called), isolate)
            outcomes_ = [
                Outcome(j.firing, j.order_sn, j.action, r.outcome, fired_at, r.detail, error=e)
                for j, (r, e) in zip(called, verdicts, strict=True)
            ]
            if not isolate and any(o.error is not None for o in outcomes_):
                raise _Redo({o.firing.id: o for o in outcomes_})
            out += outcomes_
        return out

    def _call(
        self, conn: sa.Connection, spec: ActionSpec, arg: Any, n: int, isolate: bool
    ) -> list[tuple[Result, BaseException | None]]:
        """The handler's verdicts; a handler that raises fails (or, with Skip, skips) all
        `n` firings it was given, and what it wrote is rolled back (here, by its
        savepoint; without one, by the caller)."""
        if spec.trusted:  # a built-in: its outcomes hold the configured status names
            return [(r, None) for r in spec.handler(arg)]
        savepoint = conn.begin_nested() if isolate else None
        try:
            returned = spec.handler(arg)
            results = as_batch_results(returned, n) if spec.batch else [as_result(returned)]
        except Skip as skip:
            _roll_back(savepoint)
            return [(Result(SKIPPED, skip.reason[:255] or None), skip)] * n
        except Exception as exc:
            if is_transient(exc):
                raise  # the database, not the handler: the whole batch is retried
            _roll_back(savepoint)
            return [(Result(FAILED, _error_text(exc)), exc)] * n
        if savepoint is not None:
            savepoint.commit()
        return [(r, None) for r in results]

    def warm_up(self, connections: int = 1) -> None:
        """Open `connections` pooled connections and run every statement a built-in batch
        runs on each, rolled back, so that the first timers to fire pay for none of it."""
        probe = Firing("delayq-warm-up:cancel", 0, reclaimed=True)
        spec = self.actions.get("cancel")
        with contextlib.ExitStack() as stack:
            for _ in range(connections):
                conn = stack.enter_context(self.engine.connect())
                with conn.begin() as tx:
                    job = Job(probe, "delayq-warm-up", "cancel")
                    self._recorded(conn, [job], check_all=True)
                    now = self.clock()
                    if spec is not None and spec.trusted:
                        spec.handler([context_for(probe, *job[1:], now, connection=conn)])
                    conn.execute(
                        outcomes.insert(),
                        [_outcome_row(Outcome(probe, "delayq-warm-up", "cancel", "warm_up", now))],
                    )
                    tx.rollback()

    def recorded(self, firings: Sequence[Firing]) -> set[str]:
        """Ids of the firings among `firings` whose outcome is recorded already."""
        jobs = [Job(f, *self.parse_key(f.key)) for f in firings]
        with self.engine.connect() as conn:
            found = self._recorded(conn, jobs, check_all=True)
        return {j.firing.id for j in jobs if _identity(j) in found}

    def _recorded(
        self, conn: sa.Connection, jobs: list[Job], *, check_all: bool
    ) -> set[tuple[str, str, datetime]]:
        # Only a firing claimed before can have an outcome already: a fresh claim is
        # atomic, so the look-up is skipped for the common case.
        jobs = [j for j in jobs if check_all or j.firing.reclaimed]
        order_sns = sorted({j.order_sn for j in jobs})
        if not order_sns:
            return set()
        due_ats = sorted({naive_due_at(j.firing) for j in jobs})
        rows = conn.execute(self.select_recorded, {"order_sns": order_sns, "due_ats": due_ats})
        return {(r.order_sn, r.action, r.due_at) for r in rows}


class _Redo(Exception):
    """Leaves a transaction in which a handler raised without a savepoint, rolling it
    back; `decided` holds the verdicts of the firings that handler was given."""

    def __init__(self, decided: dict[str, Outcome]) -> None:
        super().__init__("apply again")
        self.decided = decided


def firing_of(item: Item) -> Firing:
    """The firing an applier item stands for."""
    return item.firing if isinstance(item, Done) else item


def _unknown(action: str) -> str:
    if action == "?":
        return MALFORMED_KEY
    return UNKNOWN_ACTION if ACTION_RE.fullmatch(action) else UNMAPPED_FLAG


def _roll_back(savepoint: sa.NestedTransaction | None) -> None:
    if savepoint is not None:
        savepoint.rollback()


def _error_text(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:255]


def _outcome_row(r: Outcome) -> dict[str, object]:
    return {
        "order_sn": r.order_sn,
        "action": r.action[:32],
        "due_at": naive_due_at(r.firing),
        "fired_at": r.fired_at,
        "outcome": r.outcome,
        "detail": r.detail,
    }


def _identity(j: Job) -> tuple[str, str, datetime]:
    return (j.order_sn, j.action[:32], naive_due_at(j.firing))
