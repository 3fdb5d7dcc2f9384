"""One place that turns Settings into connections, and the operations the CLI offers."""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from functools import cached_property
from typing import Any

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from delayq import db, migrate
from delayq.actions import utcnow
from delayq.errors import ServiceUnavailable
from delayq.keys import Keys
from delayq.listener import Listener
from delayq.producer import Producer
from delayq.redis_conn import Scripts, check_notifications, connect, keys_for
from delayq.settings import Settings, mask_url
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
        kw = self.redis.connection_pool.connection_kwargs
        return self.settings.redis_url or f"unix://{kw.get('path')}?db={kw.get('db', 0)}"

    @cached_property
    def keys(self) -> Keys:
        return keys_for(self.redis, self.settings)

    @cached_property
    def scripts(self) -> Scripts:
        return Scripts.register(self.redis)

    @cached_property
    def engine(self) -> Engine:
        return db.make_engine(self.settings)

    @cached_property
    def producer(self) -> Producer:
        return Producer(self.redis, self.keys)

    def listener(self) -> Listener:
        resolved = dataclasses.replace(self.settings, redis_url=self.redis_url)
        return Listener(resolved, self.redis, self.engine, self.keys)

    def migrate(self) -> tuple[str | None, str]:
        try:
            return migrate.upgrade(self.engine, self.settings)
        except sa.exc.OperationalError as exc:
            raise db.unreachable(self.settings, exc) from None

    def check(self, *, configure_redis: bool = False) -> list[str]:
        """Lines saying what is right; raises the first thing that is not."""
        lines = [f"Redis at {mask_url(self.redis_url)} answers"]
        lines.append(check_notifications(self.redis, self.redis_url, configure=configure_redis))
        try:
            lines.append(db.check_schema(self.engine, self.settings))
        except sa.exc.OperationalError as exc:
            raise db.unreachable(self.settings, exc) from None
        return lines

    def status(self) -> dict[str, Any]:
        """Pending, due, in-flight and dead-lettered timers, and recent outcomes."""
        k = self.keys
        try:
            sec, usec = self.redis.time()
            now_ms = sec * 1000 + usec // 1000
            pipe = self.redis.pipeline(transaction=False)
            pipe.zcard(k.due)
            pipe.zrange(k.due, 0, 0, withscores=True)
            pipe.zcount(k.due, "-inf", now_ms)
            pipe.zcard(k.inflight)
            pipe.hgetall(k.dead)
            pending, head, overdue, inflight, dead = pipe.execute()
        except redis.RedisError as exc:
            raise ServiceUnavailable(
                f"Redis at {mask_url(self.redis_url)} is not reachable: {exc}"
            ) from None
        dead_list = []
        for key, raw in sorted(dead.items()):
            entry = json.loads(raw)
            dead_list.append(
                {
                    "timer": key,
                    "due_at": from_ms(int(entry["due_ms"])).isoformat(),
                    "attempts": entry["attempts"],
                    "error": entry["error"],
                }
            )
        return {
            "redis": mask_url(self.redis_url),
            "database": mask_url(self.settings.effective_database_url),
            "pending": pending,
            "next_due_at": from_ms(int(head[0][1])).isoformat() if head else None,
            "overdue": overdue,
            "in_flight": inflight,
            "dead_lettered": len(dead_list),
            "dead_letters": dead_list,
            "outcomes_last_hour": self._recent_outcomes(),
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

    def retry_dead(self, timer_keys: list[str]) -> int:
        """Re-queue dead-lettered timers (all when `timer_keys` is empty) to fire now."""
        return int(
            self.scripts.retry_dead(
                keys=[self.keys.due, self.keys.dead],
                args=[self.keys.wake_channel, *timer_keys],
            )
        )
