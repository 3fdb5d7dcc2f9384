"""What a fired timer does: the SQL lives here.

A batch of firings is applied in one short transaction: lock the orders concerned, change
those still in the action's starting status, and record one outcome per firing. A firing
already recorded (its acknowledgement to Redis was lost and it came round again) is
recognised by its (order_sn, action, due_at) and not applied twice.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from delayq.db import orders_table, outcomes
from delayq.settings import Settings
from delayq.store import Firing
from delayq.timing import ACTION_RE, ORDER_SN_RE, from_ms

APPLIED = "applied"
NOT_FOUND = "not_found"
UNKNOWN_ACTION = "unknown_action"
MALFORMED_KEY = "malformed_key"
#: A key `ORDER_SN:FLAG` whose flag is no action name (the PHP producer's `SN1:1`) and
#: is not mapped to one by DELAYQ_FLAG_ACTIONS.
UNMAPPED_FLAG = "unmapped_flag"
ALREADY_RECORDED = "already_recorded"  # not stored: the earlier outcome stands


@dataclass(frozen=True)
class Action:
    """Move an order from one status to another, stamping a column if there is one."""

    name: str
    from_status: str
    to_status: str
    stamp_column: str | None = None

    @property
    def skipped(self) -> str:
        return f"skipped_not_{self.from_status}"[:32]


def actions_from(settings: Settings) -> dict[str, Action]:
    """The actions a timer can name, with the status values from the settings."""
    return {
        "cancel": Action(
            "cancel",
            settings.status_unpaid,
            settings.status_cancelled,
            settings.cancelled_at_column or None,
        ),
        "complete": Action("complete", settings.status_paid, settings.status_completed),
    }


@dataclass(frozen=True)
class Outcome:
    firing: Firing
    order_sn: str
    action: str
    outcome: str
    fired_at: datetime

    @property
    def lateness_ms(self) -> float:
        due = from_ms(self.firing.due_ms).replace(tzinfo=None)
        return (self.fired_at - due).total_seconds() * 1000


def utcnow() -> datetime:
    """Naive UTC with microseconds: the form every timestamp column holds."""
    return datetime.now(UTC).replace(tzinfo=None)


class Applier:
    """Applies batches of firings to the database."""

    def __init__(
        self, engine: Engine, settings: Settings, *, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.actions = actions_from(settings)
        self.flags = settings.flag_action_map
        self.orders = orders_table(settings)
        self.clock = clock
        # Statements are built once: building them per batch was a third of the CPU a
        # listener spent at 1,000 timers a second (py-spy, BENCHMARKS.md). They are public
        # so that `delayq check` probes exactly these for missing privileges.
        key = self.orders.c[settings.order_key_column]
        status = self.orders.c[settings.status_column]
        order_sns: sa.BindParameter[str] = sa.bindparam("order_sns", expanding=True)
        # FOR UPDATE: a payment committing between this read and the UPDATE waits, so the
        # verdict recorded is the one applied. (SQLite: BEGIN IMMEDIATE does the same.)
        self.select_locked = sa.select(key, status).where(key.in_(order_sns)).with_for_update()
        self.updates = {name: self._update_for(a) for name, a in self.actions.items()}
        self.select_recorded = sa.select(
            outcomes.c.order_sn, outcomes.c.action, outcomes.c.due_at
        ).where(
            outcomes.c.order_sn.in_(order_sns),
            outcomes.c.due_at.in_(sa.bindparam("due_ats", expanding=True)),
        )

    def _update_for(self, action: Action) -> sa.Update:
        s = self.settings
        values: dict[str, object] = {s.status_column: action.to_status}
        for column in (action.stamp_column, s.updated_at_column):
            if column:
                values[column] = sa.bindparam("fired_at_")
        key = self.orders.c[s.order_key_column]
        status = self.orders.c[s.status_column]
        return (
            sa.update(self.orders)
            .where(key.in_(sa.bindparam("order_sns", expanding=True)), status == action.from_status)
            .values(values)
        )

    def apply(self, firings: Sequence[Firing]) -> list[Outcome]:
        """Apply `firings` in one transaction; returns one outcome per firing. Raises the
        database's exception if the transaction fails (nothing is then applied)."""
        # A firing claimed twice by this listener (its lease ran out while it was queued)
        # is applied once.
        unique = {f.id: f for f in firings}.values()
        parsed = [(f, *self.parse_key(f.key)) for f in unique]
        try:
            return self._apply(parsed, check_all=False)
        except sa.exc.IntegrityError:
            # A fresh claim whose outcome exists after all: the same timer was scheduled
            # again for a due time that has already fired. Look every firing up.
            return self._apply(parsed, check_all=True)

    def parse_key(self, key: str) -> tuple[str, str]:
        """(order_sn, action) of a timer key; the action is '?' for a key that is not a
        timer, and the flag itself (say '1') when it names no action and has no mapping."""
        order_sn, sep, flag = key.rpartition(":")
        if not sep or not ORDER_SN_RE.fullmatch(order_sn) or not flag:
            return key[:64], "?"
        return order_sn, self.flags.get(flag, flag)

    def _apply(self, parsed: list[tuple[Firing, str, str]], *, check_all: bool) -> list[Outcome]:
        with self.engine.begin() as conn:
            recorded = self._recorded(conn, parsed, check_all=check_all)
            todo = [p for p in parsed if _identity(p) not in recorded]
            statuses = self._lock_orders(conn, {sn for _, sn, a in todo if a in self.actions})
            fired_at = self.clock()
            results: list[Outcome] = []
            to_apply: dict[str, list[str]] = defaultdict(list)
            for firing, order_sn, action in todo:
                verdict = self._verdict(firing, order_sn, action, statuses)
                if verdict == APPLIED:
                    to_apply[action].append(order_sn)
                    # A second firing of the same order in this batch must see the change.
                    statuses[order_sn] = self.actions[action].to_status
                results.append(Outcome(firing, order_sn, action, verdict, fired_at))
            for action, order_sns in to_apply.items():
                self._update(conn, self.actions[action], order_sns, fired_at)
            if results:
                conn.execute(outcomes.insert(), [_outcome_row(r) for r in results])
        skipped = [
            Outcome(f, sn, a, ALREADY_RECORDED, fired_at)
            for (f, sn, a) in parsed
            if _identity((f, sn, a)) in recorded
        ]
        return results + skipped

    def warm_up(self, connections: int = 1) -> None:
        """Open `connections` pooled connections and run every statement of a batch on
        each, rolled back, so that the first timers to fire pay for none of it."""
        probe = Firing("delayq-warm-up:cancel", 0, reclaimed=True)
        with contextlib.ExitStack() as stack:
            for _ in range(connections):
                conn = stack.enter_context(self.engine.connect())
                with conn.begin() as tx:
                    self._recorded(conn, [(probe, "delayq-warm-up", "cancel")], check_all=True)
                    self._lock_orders(conn, {"delayq-warm-up"})
                    now = self.clock()
                    self._update(conn, self.actions["cancel"], ["delayq-warm-up"], now)
                    conn.execute(
                        outcomes.insert(),
                        [_outcome_row(Outcome(probe, "delayq-warm-up", "cancel", "warm_up", now))],
                    )
                    tx.rollback()

    def _verdict(self, firing: Firing, order_sn: str, action: str, statuses: dict[str, str]) -> str:
        if action == "?":
            return MALFORMED_KEY
        spec = self.actions.get(action)
        if spec is None:
            return UNKNOWN_ACTION if ACTION_RE.fullmatch(action) else UNMAPPED_FLAG
        status = statuses.get(order_sn)
        if status is None:
            return NOT_FOUND
        return APPLIED if status == spec.from_status else spec.skipped

    def _recorded(
        self, conn: sa.Connection, parsed: list[tuple[Firing, str, str]], *, check_all: bool
    ) -> set[tuple[str, str, datetime]]:
        # Only a firing claimed before can have an outcome already: a fresh claim is
        # atomic, so the look-up is skipped for the common case.
        parsed = [p for p in parsed if check_all or p[0].reclaimed]
        order_sns = sorted({sn for _, sn, _ in parsed})
        if not order_sns:
            return set()
        due_ats = sorted({_due_at(f) for f, _, _ in parsed})
        rows = conn.execute(self.select_recorded, {"order_sns": order_sns, "due_ats": due_ats})
        return {(r.order_sn, r.action, r.due_at) for r in rows}

    def _lock_orders(self, conn: sa.Connection, order_sns: set[str]) -> dict[str, str]:
        if not order_sns:
            return {}
        rows = conn.execute(self.select_locked, {"order_sns": sorted(order_sns)})
        return {row[0]: row[1] for row in rows}

    def _update(
        self, conn: sa.Connection, action: Action, order_sns: list[str], fired_at: datetime
    ) -> None:
        conn.execute(self.updates[action.name], {"order_sns": order_sns, "fired_at_": fired_at})


def _outcome_row(r: Outcome) -> dict[str, object]:
    return {
        "order_sn": r.order_sn,
        "action": r.action[:32],
        "due_at": _due_at(r.firing),
        "fired_at": r.fired_at,
        "outcome": r.outcome,
        "detail": None,
    }


def _due_at(firing: Firing) -> datetime:
    return from_ms(firing.due_ms).replace(tzinfo=None)


def _identity(p: tuple[Firing, str, str]) -> tuple[str, str, datetime]:
    return (p[1], p[2][:32], _due_at(p[0]))
