"""One place that turns Settings into connections, and the operations the CLI offers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import cached_property
from typing import Any

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from delayq import db, migrate
from delayq.actions import Actions, load_actions
from delayq.actions.registry import check_actions
from delayq.errors import InvalidInput
from delayq.figures import redis_figures
from delayq.introspect import timer_info
from delayq.keys import Keys, timer_key
from delayq.layout import (
    index_figures,
    listpack_entries,
    read_layout,
    reshard,
    suggested_shards,
)
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
            lines.append(self._index_line())
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
            if not is_cluster(self.redis):
                figures["index"] = index_figures(self.redis, self.keys, figures["pending"])
        except redis.RedisError as exc:
            raise unreachable(self.redis_url, exc) from None
        return {
            "redis": mask_url(self.redis_url),
            "database": mask_url(self.settings.effective_database_url),
            **figures,
            "outcomes_last_hour": self._recent_outcomes(),
        }

    def _index_line(self) -> str:
        """Whether the due index's shards still fit the compact encoding (delayq.layout)."""
        pending = redis_figures(self.redis, self.keys, dead_limit=0)["pending"]
        index = index_figures(self.redis, self.keys, pending)
        if index["advice"]:
            return f"warning: {index['advice']}"
        return (
            f"due index: {index['shards']:,} shards, {index['timers_per_shard']} timers a "
            f"shard (compact up to {index['zset_max_listpack_entries']})"
        )

    def reshard(
        self, shards: int | None, progress: Callable[[int, int], None] | None = None
    ) -> dict[str, Any]:
        """Grow the due index to `shards` shards (default: what the pending timers need),
        or finish a resize that stopped. {"before", "after", "pending"}: shard counts."""
        if is_cluster(self.redis):
            raise InvalidInput("a Redis Cluster keeps one index shard per slot: nothing to resize")
        try:
            before = read_layout(self.redis, self.keys)
            pending = redis_figures(self.redis, self.keys, dead_limit=0)["pending"]
            if shards is None:
                shards = before.shards
                if before.moved is None:
                    wanted = listpack_entries(self.redis)
                    shards = suggested_shards(before.shards, pending, wanted)
                if shards == before.shards and before.moved is None:
                    return {"before": before.shards, "after": before.shards, "pending": pending}
            after = reshard(self.redis, self.keys, shards, progress=progress)
        except redis.RedisError as exc:
            raise unreachable(self.redis_url, exc) from None
        return {
            "before": before.previous if before.moved is not None else before.shards,
            "after": after.shards,
            "pending": pending,
        }

    def inspect(self, order_sn: str, action: str) -> dict[str, Any]:
        """Everything known about one timer: due time, TTL, claim, dead letter, last outcome."""
        key = timer_key(order_sn, action)
        try:
            t = self.store.timer_state(key)
        except redis.RedisError as exc:
            raise unreachable(self.redis_url, exc) from exc
        info = timer_info(t)
        info["last_outcome"] = db.last_outcome(self.engine, self.settings, order_sn, action)
        return info

    def _recent_outcomes(self) -> dict[str, int]:
        return db.recent_outcomes(self.engine, self.settings)

    def retry_dead(self, names: list[str]) -> int:
        """Re-queue dead-lettered firings (of the timers or firings named; all when none
        are) to fire now."""
        try:
            return self.store.requeue_dead(names)
        except redis.RedisError as exc:
            raise unreachable(self.redis_url, exc) from None
