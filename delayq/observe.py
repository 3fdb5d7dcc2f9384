"""What a listener counts for its operators: the Prometheus metrics it keeps (Metrics), the
figures it reads from Redis when scraped (RedisFigures), and the database check its
health probe runs. delayq/web.py serves them over HTTP; delayq/dashboard/ shows them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import redis
import sqlalchemy as sa
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from delayq.actions import (
    ALREADY_RECORDED,
    APPLIED,
    FAILED,
    MALFORMED_KEY,
    NOT_FOUND,
    SKIPPED,
    UNKNOWN_ACTION,
    UNMAPPED_FLAG,
    Actions,
)
from delayq.actions.builtin import StatusChange, builtin_actions
from delayq.settings import Settings

if TYPE_CHECKING:
    from delayq.listener import Listener

log = logging.getLogger("delayq.http")

LATENESS_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)
#: The dashboard's lateness percentiles cover this many seconds of firings.
WINDOW_S = 300.0
#: The label that stands for every action or outcome outside the known ones.
OTHER = "other"
#: Scrapes that fail to read Redis are logged at most once per this many seconds.
ERROR_LOG_INTERVAL_S = 60.0


def known_labels(actions: Actions) -> tuple[set[str], set[str]]:
    """The actions a listener knows and the outcomes it can report for certain: the label
    values of delayq_timers_fired. Timer keys are written by anyone, so their action names
    are not: outside these sets they are counted as "other" (outcome unknown_action says
    which timers name an action nobody here knows)."""
    outcomes = {APPLIED, NOT_FOUND, UNKNOWN_ACTION, UNMAPPED_FLAG, MALFORMED_KEY, ALREADY_RECORDED}
    outcomes |= {SKIPPED, FAILED}
    for spec in actions:
        if isinstance(spec.handler, StatusChange):
            outcomes |= spec.handler.outcomes
    return {spec.name for spec in actions}, outcomes


class Metrics:
    """The listener's own counters, and a collector that reads Redis at scrape time.

    Firings are counted by action and outcome among `actions` and `outcomes` (default:
    those of the default settings; `allow` adds more), any other value as "other"."""

    def __init__(
        self, actions: Iterable[str] | None = None, outcomes: Iterable[str] | None = None
    ) -> None:
        builtins = Actions({spec.name: spec for spec in builtin_actions(Settings())})
        default_actions, default_outcomes = known_labels(builtins)
        self.actions = set(default_actions if actions is None else actions)
        self.outcomes = set(default_outcomes if outcomes is None else outcomes)
        self.registry = CollectorRegistry()
        r = self.registry
        self.fired = Counter(
            "delayq_timers_fired",
            "Timers fired, by action and outcome.",
            ["action", "outcome"],
            registry=r,
        )
        self.lateness = Histogram(
            "delayq_lateness_seconds",
            "Due time to applied, for applied firings.",
            buckets=LATENESS_BUCKETS_S,
            registry=r,
        )
        self.batch = Histogram(
            "delayq_db_batch_seconds",
            "Duration of one database transaction applying a batch.",
            registry=r,
        )
        self.batch_size = Histogram(
            "delayq_db_batch_size",
            "Firings per database transaction.",
            buckets=(1, 2, 5, 10, 50, 100, 500, 1000, 5000),
            registry=r,
        )
        self.dead_lettered = Counter("delayq_dead_lettered", "Timers given up on.", registry=r)
        self.redis_reconnects = Counter(
            "delayq_redis_reconnects", "Times Redis came back after an outage.", registry=r
        )
        self.db_outages = Counter("delayq_database_outages", "Database outages.", registry=r)
        self.last_event = time.monotonic()
        Gauge(
            "delayq_last_event_age_seconds",
            "Seconds since the last keyspace event or claim.",
            registry=r,
        ).set_function(lambda: time.monotonic() - self.last_event)
        # For alerts (deploy/prometheus/delayq-rules.yml): the listener points these at its
        # liveness probes (answers from memory) and sets last_batch after each commit.
        self.redis_up = Gauge(
            "delayq_redis_up", "1 if Redis answered the latest probe (each second).", registry=r
        )
        self.database_up = Gauge(
            "delayq_database_up",
            "1 if the database answered the latest probe (each second).",
            registry=r,
        )
        self.last_batch = Gauge(
            "delayq_last_batch_timestamp_seconds",
            "Unix time of the last batch this listener committed (0: none yet).",
            registry=r,
        )
        # (monotonic time, lateness ms or None) of recent firings, for the dashboard.
        self.recent: deque[tuple[float, float | None]] = deque(maxlen=200_000)
        self._lock = threading.Lock()

    def allow(self, *, actions: Iterable[str] = (), outcomes: Iterable[str] = ()) -> None:
        """Count these actions and outcomes under their own labels from now on."""
        self.actions.update(actions)
        self.outcomes.update(outcomes)

    def observe_firing(self, action: str, outcome: str, lateness_ms: float | None) -> None:
        self.fired.labels(
            action if action in self.actions else OTHER,
            outcome if outcome in self.outcomes else OTHER,
        ).inc()
        if lateness_ms is not None:
            self.lateness.observe(max(lateness_ms, 0.0) / 1000)
        with self._lock:
            self.recent.append((time.monotonic(), lateness_ms))

    def window(self) -> dict[str, float | int | None]:
        """Fired in the last minute, and lateness percentiles over the last minutes."""
        now = time.monotonic()
        with self._lock:
            recent = [(t, ms) for t, ms in self.recent if t >= now - WINDOW_S]
        late = sorted(ms for _, ms in recent if ms is not None)

        def pick(q: float) -> float | None:
            return round(late[min(len(late) - 1, int(q * len(late)))], 1) if late else None

        return {
            "fired_last_minute": sum(1 for t, _ in recent if t >= now - 60),
            "lateness_p50_ms": pick(0.5),
            "lateness_p99_ms": pick(0.99),
        }


#: (figure, metric, help) of the gauges read from Redis at scrape time.
_TOTALS = (
    ("pending", "delayq_pending", "Timers waiting for their due time."),
    ("overdue", "delayq_overdue", "Timers past due and not yet claimed."),
    ("in_flight", "delayq_in_flight", "Timers claimed or waiting for a retry."),
    ("dead_lettered", "delayq_dead_letters", "Timers in the dead letters."),
    ("listeners_alive", "delayq_listeners_alive", "Listeners with a recent heartbeat."),
)
#: A cluster: each primary's share, by node ("127.0.0.1:7001"), under names of their own
#: so that sums over the totals count nothing twice.
_PER_PRIMARY = (
    ("pending", "delayq_primary_pending", "Timers waiting, per cluster primary."),
    ("overdue", "delayq_primary_overdue", "Timers past due, per cluster primary."),
    ("in_flight", "delayq_primary_in_flight", "Timers claimed, per cluster primary."),
    ("dead_lettered", "delayq_primary_dead_letters", "Dead letters, per cluster primary."),
    ("used_memory", "delayq_primary_used_memory_bytes", "used_memory of each primary."),
)


class RedisFigures(Collector):
    """Pending, overdue, in-flight, dead-lettered and listeners, read when scraped."""

    def __init__(self, client: redis.Redis, listener: Listener) -> None:
        self.client = client
        self.listener = listener
        self._logged_at: float | None = None

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The names, without reading Redis: what lets `/metrics?name[]=delayq_pending`
        find this collector."""
        for _, name, text in _TOTALS:
            yield GaugeMetricFamily(name, text)
        for _, name, text in _PER_PRIMARY:
            yield GaugeMetricFamily(name, text, labels=["node"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            f = self.listener.figures.get(dead_limit=0)
        except Exception as exc:
            # The series are left out (absent series are what alerting expects, and
            # /healthz says why); the log says so once a minute, not at every scrape.
            now = time.monotonic()
            if self._logged_at is None or now - self._logged_at >= ERROR_LOG_INTERVAL_S:
                self._logged_at = now
                log.warning(
                    "/metrics without the Redis gauges: %s: %s",
                    type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "",
                    exc_info=not isinstance(exc, redis.RedisError),
                )
            return
        totals = {**f, "listeners_alive": len(f["listeners"])}
        for field, name, text in _TOTALS:
            yield GaugeMetricFamily(name, text, value=totals[field])
        primaries = f.get("primaries", [])
        for field, name, text in _PER_PRIMARY:
            rows = [(p["node"], p[field]) for p in primaries if p[field] is not None]
            if rows:
                family = GaugeMetricFamily(name, text, labels=["node"])
                for node, value in rows:
                    family.add_metric([node], value)
                yield family


def database_answers(engine: sa.Engine) -> str | None:
    """None if the database answers, else why not (one line)."""
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as exc:
        return f"database: {str(getattr(exc, 'orig', None) or exc).splitlines()[0]}"
    return None
