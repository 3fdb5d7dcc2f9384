"""Looking at timers from Python: `delayq.inspect`, `delayq.status` and `delayq.pending`.

They read Redis through the process's default producer (DELAYQ_REDIS_URL). The last
outcome of a timer and the outcome counts live in the database: they are added when
DELAYQ_DATABASE_URL is set and SQLAlchemy is installed (the listener extra); a
producer-only install gets the Redis side. `delayq inspect` / `delayq status` on the
command line show the same dictionaries."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from functools import cache, partial
from typing import TYPE_CHECKING, Any, NamedTuple

from delayq.keys import parse_timer_key, timer_key
from delayq.producer import DEFAULT_ACTION, Producer, default_producer
from delayq.settings import Settings, mask_url
from delayq.store import TimerState
from delayq.timing import ORDER_SN_RE, from_ms

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine


class PendingTimer(NamedTuple):
    """One timer waiting in the due index."""

    order_sn: str
    action: str
    due_at: datetime


def timer_info(t: TimerState) -> dict[str, Any]:
    """One timer's Redis state as `delayq inspect --json` shows it (without last_outcome)."""
    if t.claims:
        state = "in_flight"
    elif t.pending_due_ms is not None:
        state = "pending"
    elif t.dead:
        state = "dead_lettered"
    elif t.ttl_ms is not None:
        state = "legacy_key"  # a TTL key the listener has not adopted (yet)
    else:
        state = "none"
    return {
        "timer": t.key,
        "state": state,
        "due_at": None if t.pending_due_ms is None else from_ms(t.pending_due_ms).isoformat(),
        "ttl_ms": t.ttl_ms,
        # Firings being applied or waiting for a retry: more than one when the timer was
        # rescheduled while an earlier firing was being applied.
        "claims": [
            {
                "due_at": from_ms(firing.due_ms).isoformat(),
                "lease_until": from_ms(lease).isoformat(),
                "failed_attempts": attempts,
            }
            for firing, lease, attempts in t.claims
        ],
        "dead_letters": t.dead,
    }


def inspect(order_sn: str, action: str = DEFAULT_ACTION) -> dict[str, Any]:
    """Everything known about one timer: state (pending, in_flight, dead_lettered,
    legacy_key or none), due time, TTL, claims, dead letters, and its last outcome when the
    database is configured."""
    key = timer_key(order_sn, action)
    producer = default_producer()
    info = timer_info(producer._run(lambda: producer.store.timer_state(key)))
    engine = _engine()
    if engine is not None:
        from delayq.db import last_outcome

        info["last_outcome"] = last_outcome(engine, _settings(), order_sn, action)
    return info


def status() -> dict[str, Any]:
    """Pending, next due, overdue, in flight, dead letters and listeners alive (and the
    last hour's outcomes when the database is configured): `delayq status --json`."""
    from delayq.figures import redis_figures

    producer = default_producer()
    figures = producer._run(lambda: redis_figures(producer.client, producer.keys))
    out = {"redis": _settings().redis_url and mask_url(_settings().redis_url), **figures}
    engine = _engine()
    if engine is not None:
        from delayq.db import recent_outcomes

        out["outcomes_last_hour"] = recent_outcomes(engine, _settings())
    return out


def pending(
    prefix: str = "", limit: int | None = None, *, producer: Producer | None = None
) -> Iterator[PendingTimer]:
    """Pending timers whose order id starts with `prefix`, at most `limit` of them, in the
    due index's own order (by index shard; sorted by due time within each page). Each
    Redis call reads a bounded slice of the index, so this is safe on millions of timers;
    it is lazy, so stop iterating to stop reading."""
    if prefix and not ORDER_SN_RE.fullmatch(prefix):
        from delayq.errors import InvalidInput

        raise InvalidInput(f"prefix {prefix!r}: order ids are 1-64 of A-Za-z0-9_.-")
    p = producer or default_producer()
    left = limit
    cursor = 0
    while left is None or left > 0:
        cursor, found = p._run(partial(p.store.pending_page, cursor))
        page = sorted((due, key) for key, due in found if key.startswith(prefix))
        for due, key in page[:left]:
            order_sn, action = parse_timer_key(key)
            yield PendingTimer(order_sn, action, from_ms(due))
        if left is not None:
            left -= min(left, len(page))
        if cursor == 0:
            return


@cache
def _settings() -> Settings:
    return Settings.load()


@cache
def _engine() -> Engine | None:
    """The database engine when DELAYQ_DATABASE_URL is set and SQLAlchemy is installed."""
    settings = _settings()
    if not settings.database_url:
        return None
    try:
        from delayq.db import make_engine
    except ImportError:  # a producer-only install
        return None
    return make_engine(settings)
