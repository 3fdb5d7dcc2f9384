"""One place that turns Settings into connections, and the operations the CLI offers."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from functools import cached_property
from typing import Any

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from delayq import db, migrate
from delayq.actions import Actions, load_actions, utcnow
from delayq.actions.registry import check_actions
from delayq.figures import redis_figures
from delayq.keys import Keys, timer_key
from delayq.listener import Listener
from delayq.permissions import check_database, check_redis
from delayq.producer import Producer
from delayq.redis_conn import (
    Scripts,
    check_notifications,
    check_persistence,
    client_url,
    connect,
    is_cluster,
    keys_for,
    server_identity,
    unreachable,
)
from delayq.settings import Settings, mask_url
from delayq.store import TimerStore, open_store
from delayq.timing import from_ms


class Delayq:
    """Lazily connected Redis, database and producer for one set of settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def redis(self) -> redis.Redis:
        return connect(self.settings)

    @cached_property
    def redis_url(self) -> str:
        return self.settings.redis_url or client_url(self.redis)

    @cached_property
    def keys(self) -> Keys:
        return keys_for(self.redis, self.settings)

    @cached_property
    def scripts(self) -> Scripts:
        return Scripts.register(self.redis)

    @cached_property
    def store(self) -> TimerStore:
        return open_store(self.redis, self.keys, self.scripts)

    @cached_property
    def engine(self) -> Engine:
        return db.make_engine(self.settings)

    @cached_property
    def actions(self) -> Actions:
        """The actions a listener with these settings knows (imports DELAYQ_APP)."""
        return load_actions(self.settings)

    @cached_property
    def producer(self) -> Producer:
        return Producer(
            self.redis,
            self.keys,
            wait_replicas=self.settings.wait_replicas,
            wait_timeout_ms=self.settings.wait_timeout_ms,
        )

    def listener(self) -> Listener:
        resolved = dataclasses.replace(self.settings, redis_url=self.redis_url)
        return Listener(resolved, self.redis, self.engine, self.keys, self.actions)

    def migrate(self) -> tuple[str | None, str]:
        try:
            return migrate.upgrade(self.engine, self.settings)
        except sa.exc.OperationalError as exc:
            raise db.unreachable(self.settings, exc) from None

    def check(self, *, configure_redis: bool = False, role: str = "listener") -> list[str]:
        """Lines saying what is right; raises the first thing that is not, naming a missing
        permission when that is what is wrong. A producer needs neither keyspace events
        nor the database."""
        lines = [f"Redis at {mask_url(self.redis_url)} answers"]
        # Timer keys end in an action name, or in a flag older producers write.
        suffixes = [spec.name for spec in self.actions] + list(self.settings.flag_action_map)
        if is_cluster(self.redis):
            from delayq.cluster.checks import check_cluster

            lines += check_cluster(
                self.redis,  # type: ignore[arg-type]
                self.keys,
                self.scripts,
                role=role,
                key_suffixes=suffixes,
                configure=configure_redis,
            )
            if role == "producer":
                return lines
        else:
            lines.append(f"server: {server_identity(self.redis)}")
            lines += check_redis(
                self.redis, self.keys, self.scripts, role=role, key_suffixes=suffixes
            )
            if role == "producer":
                return lines
            lines.append(check_notifications(self.redis, self.redis_url, configure=configure_redis))
            lines.append(check_persistence(self.redis))
        try:
            lines += check_database(self.engine, self.settings)
            lines += check_actions(self.actions, self.engine)
        except sa.exc.OperationalError as exc:
            raise db.unreachable(self.settings, exc) from None
        return lines

    def status(self) -> dict[str, Any]:
        """Pending, due, in-flight and dead-lettered timers, and recent outcomes."""
        try:
            figures = redis_figures(self.redis, self.keys)
        except redis.RedisError as exc:
            raise unreachable(self.redis_url, exc) from None
        return {
            "redis": mask_url(self.redis_url),
            "database": mask_url(self.settings.effective_database_url),
            **figures,
            "outcomes_last_hour": self._recent_outcomes(),
        }

    def inspect(self, order_sn: str, action: str) -> dict[str, Any]:
        """Everything known about one timer: due time, TTL, claim, dead letter, last outcome."""
        key = timer_key(order_sn, action)
        try:
            t = self.store.timer_state(key)
        except redis.RedisError as exc:
            raise unreachable(self.redis_url, exc) from None
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
        o = db.outcomes
        query = (
            sa.select(o.c.due_at, o.c.fired_at, o.c.outcome, o.c.detail)
            .where(o.c.order_sn == order_sn, o.c.action == action)
            .order_by(o.c.fired_at.desc())
            .limit(1)
        )
        try:
            with self.engine.connect() as conn:
                last = conn.execute(query).first()
        except sa.exc.OperationalError as exc:
            raise db.unreachable(self.settings, exc) from None
        return {
            "timer": key,
            "state": state,
            "due_at": None if t.pending_due_ms is None else from_ms(t.pending_due_ms).isoformat(),
            "ttl_ms": t.ttl_ms,
            # Firings being applied or waiting for a retry: more than one when the timer
            # was rescheduled while an earlier firing was being applied.
            "claims": [
                {
                    "due_at": from_ms(firing.due_ms).isoformat(),
                    "lease_until": from_ms(lease).isoformat(),
                    "failed_attempts": attempts,
                }
                for firing, lease, attempts in t.claims
            ],
            "dead_letters": t.dead,
            "last_outcome": None
            if last is None
            else {
                "due_at": last.due_at.isoformat() + "Z",
                "fired_at": last.fired_at.isoformat() + "Z",
                "outcome": last.outcome,
                "detail": last.detail,
            },
        }

    def _recent_outcomes(self) -> dict[str, int]:
        o = db.outcomes
        since = utcnow() - timedelta(hours=1)
        query = (
            sa.select(o.c.action, o.c.outcome, sa.func.count())
            .where(o.c.fired_at >= since)
            .group_by(o.c.action, o.c.outcome)
        )
        try:
            with self.engine.connect() as conn:
                return {f"{a}:{out}": n for a, out, n in conn.execute(query)}
        except sa.exc.OperationalError as exc:
            raise db.unreachable(self.settings, exc) from None

    def retry_dead(self, names: list[str]) -> int:
        """Re-queue dead-lettered firings (of the timers or firings named; all when none
        are) to fire now."""
        try:
            return self.store.requeue_dead(names)
        except redis.RedisError as exc:
            raise unreachable(self.redis_url, exc) from None
