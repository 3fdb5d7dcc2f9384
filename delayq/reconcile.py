"""`delayq reconcile`: the safety net under every other way a timer can be lost.

An order still in the status an action starts from (`cancel`: unpaid), created longer
ago than the caller says, whose timer is held nowhere (not staged in delayq_outbox, not
in Redis in any state) and whose firing left no outcome, has lost its timer: a producer
crashed between its commit and the schedule, a Redis without persistence restarted, a
key was deleted by hand. `reconcile` lists such orders, and with `fix` schedules their
timers to fire now.

How it reads, so that a table of millions costs bounded memory and short queries:

* the orders in batches, by keyset pagination on the order key (`key > last ORDER BY
  key LIMIT n`: never OFFSET, each query a fresh short transaction holding no lock);
* per batch: one bound-parameter query of the outbox, Redis in one pipelined round trip
  (TTL key, due index, claims), the dead letters of the orders still without a timer,
  then one query for their outcomes.

The order of those reads is what makes it safe while producers and listeners run: a
timer only moves forward (outbox -> TTL key -> due index -> claimed -> dead letter or
outcome), and each place is read after the one before it, so a timer that moves while
a batch is being checked is seen in its new place rather than missed. (Re-queuing dead
letters moves timers backwards: during `delayq retry-dead` an order may be reported
that has a timer.)

Times: `created_at` is compared with a naive UTC cutoff, the convention of delayq's own
tables (docs/reconcile.md).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import IO, Any

import redis
import sqlalchemy as sa
from redis.exceptions import RedisClusterException
from sqlalchemy.engine import Engine

from delayq import db
from delayq.errors import InvalidInput, NotReady
from delayq.keys import Keys, Layout
from delayq.layout import read_layout
from delayq.producer import Producer
from delayq.redis_conn import client_url, unreachable
from delayq.settings import Settings
from delayq.store import TimerStore
from delayq.timing import ORDER_SN_RE, Delay, parse_delay_ms, validate_action

#: Orders read per query (and checked per Redis round trip) unless told otherwise.
DEFAULT_BATCH = 1000
MAX_BATCH = 10_000
#: Found orders listed in a report when no --limit bounds them (the counts stay exact).
LISTED_MAX = 1000
#: Dead letters read per HSCAN step.
_DEAD_SCAN_COUNT = 1000


@dataclass
class LostOrder:
    order_sn: str
    #: ISO 8601, UTC (`Z`).
    created_at: str


@dataclass
class ReconcileReport:
    """What one run found. `scanned == with_timer + with_outcome + invalid_key + found`."""

    action: str
    status: str
    #: Orders created before this (naive UTC, ISO 8601 with `Z`) were looked at.
    cutoff: str
    fix: bool
    #: Orders in `status` created before `cutoff` that were looked at.
    scanned: int = 0
    #: Of those, with a timer: staged in delayq_outbox, or in Redis (TTL key, pending,
    #: being applied or retried, dead letter).
    with_timer: int = 0
    #: With no timer but an outcome recorded for the action (it fired).
    with_outcome: int = 0
    #: Order keys that cannot be a timer's (not 1-64 of A-Za-z0-9_.-).
    invalid_key: int = 0
    #: With neither: their timer is lost.
    found: int = 0
    #: Of those, scheduled to fire now (with `fix`).
    fixed: int = 0
    #: False when the run stopped at `limit` before reading every order.
    complete: bool = True
    #: The first found orders (all of them up to `limit`, else up to LISTED_MAX).
    orders: list[LostOrder] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["orders_listed"] = len(self.orders)
        return out

    def summary(self) -> str:
        """Lines for a terminal."""
        lines = [
            f"{self.action}: {self.scanned} orders {self.status} created before "
            f"{self.cutoff}; {self.with_timer} with a timer, {self.with_outcome} fired, "
            f"{self.invalid_key} with an order key that cannot have a timer",
            f"lost timers: {self.found}"
            + (f", scheduled again to fire now: {self.fixed}" if self.fix else "")
            + ("" if self.complete else " (stopped at --limit: there may be more)"),
        ]
        lines += [f"  {o.order_sn} created {o.created_at}" for o in self.orders]
        if len(self.orders) < self.found:
            lines.append(f"  ... and {self.found - len(self.orders)} more (--json --limit N)")
        if self.found and not self.fix:
            lines.append("run again with --fix to schedule them")
        return "\n".join(lines)


def starting_status(settings: Settings, action: str) -> str | None:
    """The status a built-in action moves orders from (cancel: unpaid, complete: paid),
    as the listener's own handlers have it; None for any other action."""
    from delayq.actions.builtin import StatusChange, builtin_actions

    for spec in builtin_actions(settings):
        if spec.name == action and isinstance(spec.handler, StatusChange):
            return spec.handler.from_status
    return None


@dataclass(frozen=True)
class Request:
    """What to look for: orders in `status` created more than `older_than` ago, lost for
    `action`. Build it with `make`, which refuses bad input before anything connects."""

    action: str
    status: str
    older_than: timedelta
    limit: int | None = None
    batch_size: int = DEFAULT_BATCH

    @classmethod
    def make(
        cls,
        settings: Settings,
        *,
        action: str,
        older_than: Delay,
        status: str | None = None,
        limit: int | None = None,
        batch_size: int = DEFAULT_BATCH,
    ) -> Request:
        """`older_than`: seconds, a timedelta or '20m'. `status` defaults to the one a
        built-in action starts from; any other action needs it."""
        validate_action(action)
        if status is None:
            status = starting_status(settings, action)
            if status is None:
                raise InvalidInput(
                    f"action {action!r} is not built in: give --status, the status its "
                    "orders are in until it fires (e.g. --status unpaid)"
                )
        if not 0 < len(status) <= 64:
            raise InvalidInput("--status must be 1-64 characters")
        age = timedelta(milliseconds=parse_delay_ms(older_than))
        if age <= timedelta(0):
            raise InvalidInput("--older-than must be more than 0 (e.g. 20m)")
        if limit is not None and limit < 1:
            raise InvalidInput("--limit must be at least 1")
        if not 1 <= batch_size <= MAX_BATCH:
            raise InvalidInput(f"--batch-size must be between 1 and {MAX_BATCH}")
        if not settings.created_at_column:
            raise InvalidInput(
                "DELAYQ_CREATED_AT_COLUMN is empty: reconcile needs the column holding when "
                "each order was created"
            )
        return cls(action, status, age, limit, batch_size)


def reconcile(
    settings: Settings,
    engine: Engine,
    producer: Producer,
    request: Request,
    *,
    fix: bool = False,
    now: datetime | None = None,
    progress: Callable[[ReconcileReport], None] | None = None,
    known_actions: Callable[[], Collection[str]] | None = None,
) -> ReconcileReport:
    """Find the orders `request` describes whose timer is held nowhere (not staged in the
    outbox, not in Redis in any state) and that have no outcome for its action; with
    `fix`, schedule each to fire now (producer.schedule_many, delay 0). Stops after
    `request.limit` found. Without `fix` it writes nothing, to the database or to Redis.

    `known_actions` (asked only to fix an action that is not built in) lists the actions
    a listener knows: fixing one it does not know would only record unknown_action.
    `progress` is called after each batch with the report so far."""
    action, limit = request.action, request.limit
    builtin = starting_status(settings, action) is not None
    if fix and known_actions is not None and not builtin and action not in known_actions():
        raise InvalidInput(
            f"--fix: no listener with these settings knows action {action!r} (not built "
            "in, not in DELAYQ_APP, no DELAYQ_WEBHOOK_*): its firings would only be "
            "recorded as unknown"
        )
    cutoff = (now or datetime.now(UTC)).astimezone(UTC).replace(tzinfo=None) - request.older_than
    report = ReconcileReport(action=action, status=request.status, cutoff=_iso(cutoff), fix=fix)
    checker = _TimerCheck(producer.store, settings.flag_action_map, action)
    listed_max = limit if limit is not None else LISTED_MAX
    db.check_schema(engine, settings)  # migrated, and the orders table is there
    reader = _OrderReader(engine, settings, request.status, cutoff, request.batch_size)
    reader.probe()
    for rows in reader.batches():
        lost: list[LostOrder] = []
        for row, verdict in zip(
            rows, _verdicts(rows, checker, engine, settings, action), strict=True
        ):
            report.scanned += 1
            setattr(report, verdict, getattr(report, verdict) + 1)
            if verdict == _LOST:
                lost.append(LostOrder(row.order_sn, _iso(row.created_at)))
                if report.found == limit:
                    # Counted exactly up to the last order reported, none after it.
                    report.complete = False
                    break
        report.orders += lost[: max(0, listed_max - len(report.orders))]
        if fix and lost:
            report.fixed += producer.schedule_many([(o.order_sn, 0, action) for o in lost])
        if progress is not None:
            progress(report)
        if not report.complete:
            break
    return report


@dataclass(frozen=True)
class _Row:
    order_sn: str
    created_at: datetime | None


class _OrderReader:
    """The orders in `status` created before `cutoff`, in batches by keyset pagination."""

    def __init__(
        self, engine: Engine, settings: Settings, status: str, cutoff: datetime, batch_size: int
    ) -> None:
        self.engine, self.settings = engine, settings
        self.params: dict[str, Any] = {"status": status, "cutoff": cutoff}
        self.batch_size = batch_size
        # Typed, so the cutoff is bound as a timestamp (on SQLite: the text form
        # 'YYYY-MM-DD HH:MM:SS.ffffff' that compares with the stored text).
        orders = db.orders_table(settings, sa.column(settings.created_at_column, db.Timestamp))
        self.key = orders.c[settings.order_key_column]
        created = orders.c[settings.created_at_column]
        first = (
            sa.select(self.key, created)
            .where(
                orders.c[settings.status_column] == sa.bindparam("status"),
                created < sa.bindparam("cutoff"),
            )
            .order_by(self.key)
            .limit(batch_size)
        )
        self.first = first
        # The key's own type is bound (an integer key compares as an integer).
        self.next = first.where(self.key > sa.bindparam("after"))
        self._probe = first.where(sa.false())

    def probe(self) -> None:
        """Raise NotReady, naming the settings, if the columns are not there: a query
        that reads no row (every later failure is the database's, not the table's)."""
        try:
            with self.engine.connect() as conn:
                conn.execute(self._probe, self.params).all()
        except sa.exc.DBAPIError as exc:
            if exc.connection_invalidated or isinstance(exc, sa.exc.InterfaceError):
                raise db.unreachable(self.settings, exc) from exc
            s = self.settings
            raise NotReady(
                f"orders table {s.orders_table!r} cannot be read for reconcile (columns "
                f"{s.order_key_column}, {s.status_column}, {s.created_at_column}: see "
                f"DELAYQ_*_COLUMN): {str(exc.orig or exc).splitlines()[0]}"
            ) from exc

    def batches(self) -> Iterator[list[_Row]]:
        after: Any = None
        while True:
            query = self.first if after is None else self.next
            params = self.params if after is None else {**self.params, "after": after}
            found = _read(self.engine, self.settings, query, params)
            if not found:
                return
            after = found[-1][0]
            yield [_Row(str(row[0]), _naive_utc(row[1])) for row in found]
            if len(found) < self.batch_size:
                return


def _read(
    engine: Engine, settings: Settings, query: sa.Select[Any], params: dict[str, Any]
) -> list[tuple[Any, ...]]:
    """One query in a transaction of its own: each sees what is committed now (MariaDB's
    REPEATABLE READ would otherwise keep the first query's snapshot), and none holds a
    snapshot or a lock between batches."""
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(query, params)]
    except sa.exc.DBAPIError as exc:
        raise db.unreachable(settings, exc) from exc


#: What a batch's check says of each order: the report field it is counted in.
_INVALID, _HELD, _FIRED, _LOST = "invalid_key", "with_timer", "with_outcome", "found"


def _verdicts(
    rows: list[_Row], checker: _TimerCheck, engine: Engine, settings: Settings, action: str
) -> list[str]:
    """One verdict per row, each place a timer can be read after the one it comes from:
    the outbox (one query), Redis (every key of the batch in one round trip), then the
    outcomes of the orders held nowhere (one query)."""
    valid = [r.order_sn for r in rows if ORDER_SN_RE.fullmatch(r.order_sn)]
    staged = _having(engine, settings, db.outbox, action, valid)
    held = staged | checker.held([sn for sn in valid if sn not in staged])
    fired = _having(engine, settings, db.outcomes, action, [sn for sn in valid if sn not in held])
    return [
        _INVALID
        if not ORDER_SN_RE.fullmatch(r.order_sn)
        else _HELD
        if r.order_sn in held
        else _FIRED
        if r.order_sn in fired
        else _LOST
        for r in rows
    ]


def _having(
    engine: Engine, settings: Settings, table: sa.Table, action: str, order_sns: list[str]
) -> set[str]:
    """Which of `order_sns` have a row for `action` in `table` (delayq_outbox: a request
    staged and not relayed yet; delayq_outcomes: a firing recorded). One query with bound
    parameters, served by each table's index on (order_sn, action, ...)."""
    if not order_sns:
        return set()
    query = (
        sa.select(table.c.order_sn)
        .distinct()
        .where(table.c.action == action, table.c.order_sn.in_(sa.bindparam("sns", expanding=True)))
    )
    return {str(sn) for (sn,) in _read(engine, settings, query, {"sns": order_sns})}


class _TimerCheck:
    """Which orders have a timer of one action in Redis, in any state, batch by batch."""

    def __init__(self, store: TimerStore, flags: dict[str, str], action: str) -> None:
        self.store = store
        # Older producers' keys end in a flag mapped to the action (`SN1:1`).
        self.suffixes = [action, *(f for f, a in flags.items() if a == action)]
        partition_of = getattr(store, "partition_of", None)  # a ClusterStore: per slot
        self.partition: Callable[[str], Keys] = partition_of or (lambda _key: store.keys)
        self.one_redis = partition_of is None

    def held(self, order_sns: list[str]) -> set[str]:
        """The orders among `order_sns` whose timer Redis holds in any state."""
        try:
            return self._held(order_sns)
        except (redis.RedisError, RedisClusterException) as exc:
            raise unreachable(client_url(self.store.client), exc) from exc

    def _held(self, order_sns: list[str]) -> set[str]:
        if not order_sns:
            return set()
        owner: dict[str, str] = {
            f"{sn}:{suffix}": sn for sn in order_sns for suffix in self.suffixes
        }
        # Each timer's states in the order it passes through them: TTL key, due index,
        # claims (and the claims of listeners before firing ids).
        # Its entry may be in either shard while the index is resized (delayq.layout).
        layout = read_layout(self.store.client, self.store.keys) if self.one_redis else Layout()
        shard = {key: self.partition(key).shards_of(key, layout) for key in owner}
        pipe = self.store.client.pipeline(transaction=False)
        for key in owner:
            k = self.partition(key)
            pipe.pttl(key)
            for name in shard[key]:
                pipe.zscore(name, key)
            pipe.hget(k.claims_per_key, key)
            pipe.zscore(k.inflight, key)
        replies = iter(pipe.execute())
        held: set[str] = set()
        for key in owner:
            ttl_ms = next(replies)
            due = [d for d in [next(replies) for _ in shard[key]] if d is not None]
            claims, inflight = next(replies), next(replies)
            if int(ttl_ms) >= 0 or due or int(claims or 0) > 0 or inflight is not None:
                held.add(owner[key])
        without = {key: sn for key, sn in owner.items() if sn not in held}
        return held | self._dead({key: owner[key] for key in without})

    def _dead(self, owner: dict[str, str]) -> set[str]:
        """Orders among `owner`'s whose timer has a dead letter. Read last, and only for
        orders nothing else holds: the dead-letter hash (one per partition) is read whole,
        field names only kept, where it holds anything."""
        if not owner:
            return set()
        by_hash: dict[str, set[str]] = {}
        for key in owner:
            by_hash.setdefault(self.partition(key).dead, set()).add(key)
        names = list(by_hash)
        pipe = self.store.client.pipeline(transaction=False)
        for name in names:
            pipe.hlen(name)
        found: set[str] = set()
        for name, size in zip(names, pipe.execute(), strict=True):
            if not int(size):
                continue
            wanted = by_hash[name]
            for fieldname, _ in self.store.client.hscan_iter(name, count=_DEAD_SCAN_COUNT):
                # Fields are firing ids (`KEY@DUE_MS`), or timer keys from before them.
                key = str(fieldname).rpartition("@")[0] or str(fieldname)
                if key in wanted:
                    found.add(owner[key])
        return found


def _naive_utc(value: Any) -> datetime | None:
    if isinstance(value, str):  # a driver or column type that hands back text
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime) and value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value if isinstance(value, datetime) else None


def _iso(value: datetime | None) -> str:
    return "" if value is None else value.isoformat(timespec="milliseconds") + "Z"


@contextlib.contextmanager
def terminal_progress(
    stream: IO[str] | None = None,
) -> Iterator[Callable[[ReconcileReport], None] | None]:
    """A progress line on `stream` (stderr) while reconcile runs, when it is a terminal;
    None (no display at all) when it is not, as under cron or in a pipe."""
    stream = stream or sys.stderr
    if not stream.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),  # no total is known (counting would be a scan of its own): it pulses
        TimeElapsedColumn(),
        console=Console(file=stream),
        transient=True,
    ) as bar:
        task = bar.add_task("reading orders", total=None)

        def update(report: ReconcileReport) -> None:
            fixed = f", {report.fixed} fixed" if report.fix else ""
            bar.update(
                task, description=f"{report.scanned} orders read, {report.found} lost{fixed}"
            )

        yield update
