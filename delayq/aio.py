"""The asyncio producer: schedule_expiry, cancel_expiry and schedule_many as coroutines,
for an asyncio service (FastAPI, aiohttp) whose event loop nothing may block.

Same validation, same Lua scripts and same answers as the blocking producer
(delayq.producer), on redis.asyncio: the first call connects, without blocking the loop;
every Redis failure becomes the same delayq exception, redis-py's as its cause; READONLY
is retried once on fresh connections; with DELAYQ_WAIT_REPLICAS each write returns once
that many replicas confirmed it. `connection=` (an SQLAlchemy AsyncConnection or
AsyncSession) stages the request in your transaction instead (docs/outbox.md).

    from delayq import aio

    due = await aio.schedule_expiry("SN123", "30m")
    paid = await aio.cancel_expiry("SN123")
    await aio.aclose()  # at shutdown (FastAPI: the lifespan's end; docs/asyncio.md)

Imports only redis and delayq's light modules: a producer-only install has no SQLAlchemy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from functools import partial
from types import TracebackType
from typing import Any, TypeVar

import redis.asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.commands.core import AsyncScript

from delayq import redis_errors
from delayq.cluster.async_router import AsyncCall, AsyncRouter, per_slot
from delayq.cluster.slots import partition, slot_tags
from delayq.cluster.url import is_cluster_url, parse_cluster_url
from delayq.keys import Keys, checked_db, timer_key
from delayq.producer import (
    DEFAULT_ACTION,
    Item,
    _prepare,
    _timer,
    bulk_rounds,
    producer_settings,
    staged_due,
)
from delayq.redis_conn import script_source
from delayq.settings import Settings
from delayq.store import CANCELLED, Timer, cancel_call, check_replicated, schedule_call
from delayq.timing import Delay, from_ms

T = TypeVar("T")
#: A script call: the script, its keys and its arguments.
Call = tuple[AsyncScript, list[str], list[Any]]
#: A store.*_call builder: a script's keys and arguments for a partition and its items.
Build = Callable[[Keys, Any], tuple[list[str], list[Any]]]


class AsyncProducer:
    """Writes and removes timers from an event loop. Use it from the loop its client was
    made in (redis.asyncio connections belong to one loop); tasks may share it.

    `client` is a redis.asyncio Redis, or a redis.asyncio RedisCluster: then each timer's
    call runs on its slot's primary, with the keys of the slot's partition, as
    ClusterStore does (delayq.cluster.async_router)."""

    def __init__(
        self,
        client: redis.asyncio.Redis | RedisCluster,
        keys: Keys,
        *,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self.client = client
        self.keys = keys
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.url = _url(client)
        # register_script only hashes the text: Redis sees it on first use (EVALSHA, and
        # SCRIPT LOAD once when Redis answers NOSCRIPT).
        self._schedule_script = client.register_script(script_source("schedule"))
        self._cancel_script = client.register_script(script_source("cancel"))
        self._router: AsyncRouter | None = None
        if isinstance(client, RedisCluster):
            self._router = AsyncRouter(
                client, wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms
            )
        #: Whether the cluster's slot tags are known (worked out once, off the loop).
        self._tagged = False

    @classmethod
    async def from_settings(cls, settings: Settings | None = None) -> AsyncProducer:
        """A producer for `settings` (default: the environment and `.env`), refusing an
        unset DELAYQ_REDIS_URL as Producer.from_settings does. Nothing is sent to Redis
        here; `embedded` starts the embedded Redis on a worker thread."""
        settings = producer_settings(settings)
        url = str(settings.redis_url)
        if settings.embedded_redis:
            from delayq.redis_conn import redis_url

            # Starting redis-server waits for it to answer: not on the loop.
            url = await asyncio.to_thread(redis_url, settings)
        client: redis.asyncio.Redis | RedisCluster
        if is_cluster_url(url):
            seeds, opts = parse_cluster_url(url)
            client = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in seeds],
                **{"decode_responses": True, "socket_connect_timeout": 5, **opts},
            )
            db = 0
        else:
            client = redis.asyncio.Redis.from_url(
                url, decode_responses=True, socket_connect_timeout=5, health_check_interval=30
            )
            db = int(client.connection_pool.connection_kwargs.get("db", 0) or 0)
        return cls(
            client,
            Keys(namespace=settings.namespace, db=checked_db(db)),
            wait_replicas=settings.wait_replicas,
            wait_timeout_ms=settings.wait_timeout_ms,
        )

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client's connections (its pool)."""
        await self.client.aclose()

    async def schedule(
        self,
        order_sn: str,
        delay: Delay | None = None,
        *,
        at: datetime | str | None = None,
        action: str = DEFAULT_ACTION,
        connection: object | None = None,
    ) -> datetime:
        """As Producer.schedule: arm or move the timer; its due time in UTC. With
        `connection` (an SQLAlchemy AsyncConnection or AsyncSession in your transaction)
        it is staged in the outbox instead."""
        timer = _timer(order_sn, delay, at, action)
        if connection is not None:
            return await _staged(connection, [timer])
        return await self._arm(timer)

    async def schedule_many(
        self, items: Iterable[Item], *, connection: object | None = None
    ) -> int:
        """As Producer.schedule_many: every item validated first, then pipelined round
        trips (BULK_CHUNK timers per script call). Returns the number scheduled."""
        prepared = [_prepare(item) for item in items]
        if connection is not None:
            return await _staged_many(connection, prepared)
        return await self._schedule_prepared(prepared)

    async def cancel(
        self, order_sn: str, *, action: str = DEFAULT_ACTION, connection: object | None = None
    ) -> bool:
        """As Producer.cancel: True only if no firing of the timer will apply after this
        returns. With `connection`, the cancel is staged in your transaction (True)."""
        key = timer_key(order_sn, action)
        if connection is not None:
            return await _staged_cancel(connection, key)
        return await self._disarm(key)

    async def _arm(self, timer: Timer) -> datetime:
        replies = await self._run(
            partial(self._write, self._schedule_script, schedule_call, [[timer]])
        )
        return from_ms(int(replies[0][0]))

    async def _disarm(self, key: str) -> bool:
        replies = await self._run(partial(self._write, self._cancel_script, cancel_call, [[key]]))
        return int(replies[0][0]) == CANCELLED

    async def _schedule_prepared(self, prepared: list[Timer]) -> int:
        for chunks in bulk_rounds(prepared):
            await self._run(partial(self._write, self._schedule_script, schedule_call, chunks))
        return len(prepared)

    async def _write(
        self, script: AsyncScript, build: Build, chunks: Sequence[Sequence[Timer | str]]
    ) -> list[Any]:
        """`script` on each chunk of timers (schedule) or timer keys (cancel), its keys
        and arguments made by `build` (store.schedule_call, cancel_call): one call per
        chunk on one Redis; on a cluster, one per slot (a chunk's items then need not
        share a slot, and the replies are per slot, not per chunk)."""
        if not isinstance(self.client, RedisCluster):
            calls = [(script, *build(self.keys, c)) for c in chunks]
            return await self._pipelined(self.client, calls)
        assert self._router is not None
        if not self._tagged:  # ~60 ms of CRC16s once per process: not on the loop
            await asyncio.to_thread(slot_tags, self.keys.namespace)
            self._tagged = True
        items = [item for chunk in chunks for item in chunk]
        groups = per_slot([item if isinstance(item, str) else item[0] for item in items])
        per_slot_calls = [
            AsyncCall(
                slot,
                script,
                *build(partition(self.keys.namespace, self.keys.db, slot), [items[n] for n in at]),
            )
            for slot, at in groups.items()
        ]
        return await self._router.run(per_slot_calls)

    async def _pipelined(self, client: redis.asyncio.Redis, calls: Sequence[Call]) -> list[Any]:
        """As TimerStore._write: the calls in one round trip, and WAIT on the same
        connection (a pipeline holds one) when replicas must confirm."""
        if len(calls) == 1 and not self.wait_replicas:
            script, keys, args = calls[0]
            return [await script(keys=keys, args=args)]
        pipe = client.pipeline(transaction=False)
        for script, keys, args in calls:
            await script(keys=keys, args=args, client=pipe)  # queued, not sent
        if not self.wait_replicas:
            return list(await pipe.execute())
        pipe.wait(self.wait_replicas, self.wait_timeout_ms)
        *results, confirmed = await pipe.execute()
        check_replicated(int(confirmed), self.wait_replicas, self.wait_timeout_ms)
        return results

    async def _run(self, call: Callable[[], Awaitable[T]]) -> T:
        """As Producer._run: a Redis failure becomes a delayq exception (its cause kept);
        READONLY is retried once on fresh connections."""
        try:
            return await call()
        except Exception as exc:
            if not redis_errors.is_redis_failure(exc):
                raise
            if not redis_errors.is_readonly(exc):
                raise redis_errors.wrap(self.url, exc) from exc
            first = exc
        await self._fresh_connections()
        try:
            return await call()
        except Exception as exc:
            if not redis_errors.is_redis_failure(exc):
                raise
            raise redis_errors.wrap(self.url, exc) from first

    async def _fresh_connections(self) -> None:
        """Drop the pooled connections; the next call opens new ones (on a cluster, after
        reading the topology again)."""
        if isinstance(self.client, RedisCluster):
            await self.client.aclose()  # it initializes again on its next command
        else:
            await self.client.connection_pool.disconnect()


# -- staged in the caller's transaction (delayq.outbox, imported only when used) ------


async def _staged(connection: object, timers: list[Timer]) -> datetime:
    from delayq.outbox import stage_schedule_async

    await stage_schedule_async(connection, timers)
    return staged_due(timers)


async def _staged_many(connection: object, timers: list[Timer]) -> int:
    if timers:
        await _staged(connection, timers)
    return len(timers)


async def _staged_cancel(connection: object, key: str) -> bool:
    from delayq.outbox import stage_cancel_async

    await stage_cancel_async(connection, [key])
    return True


def _url(client: redis.asyncio.Redis | RedisCluster) -> str:
    """What `client` talks to, for messages (no password)."""
    if isinstance(client, RedisCluster):
        seeds = ",".join(node.name for node in client.nodes_manager.startup_nodes.values())
        return f"redis+cluster://{seeds}"
    pool = client.connection_pool
    kw = pool.connection_kwargs
    db = kw.get("db", 0) or 0
    if "path" in kw:
        return f"unix://{kw['path']}?db={db}"
    tls = issubclass(pool.connection_class, redis.asyncio.SSLConnection)
    return f"{'rediss' if tls else 'redis'}://{kw.get('host')}:{kw.get('port')}/{db}"


# -- the default producer -------------------------------------------------------------

#: The default producer and the loop it belongs to (connections are bound to one loop).
_default: tuple[asyncio.AbstractEventLoop, AsyncProducer] | None = None
_default_lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None


async def default_producer() -> AsyncProducer:
    """The producer built from the environment and `.env` on first use in this event
    loop. (A new loop, as each asyncio.run makes, gets its own: the old one's connections
    cannot be used from it.)"""
    global _default, _default_lock
    loop = asyncio.get_running_loop()
    if _default is not None and _default[0] is loop:
        return _default[1]
    if _default_lock is None or _default_lock[0] is not loop:
        _default_lock = (loop, asyncio.Lock())
    async with _default_lock[1]:
        if _default is None or _default[0] is not loop:
            _default = (loop, await AsyncProducer.from_settings())
        return _default[1]


async def aclose() -> None:
    """Close the default producer's connections (at shutdown: FastAPI's lifespan end).
    The next call makes a new one."""
    global _default
    current, _default = _default, None
    if current is not None and current[0] is asyncio.get_running_loop():
        await current[1].aclose()


async def schedule_expiry(
    order_sn: str,
    delay: Delay | None = None,
    *,
    at: datetime | str | None = None,
    action: str = DEFAULT_ACTION,
    connection: object | None = None,
) -> datetime:
    """As delayq.schedule_expiry: fire `action` after `delay` ('20m', seconds, timedelta)
    or at `at`; scheduling again moves the due time; returns it (UTC). `connection=`
    stages it in your async SQLAlchemy transaction, without talking to Redis."""
    timer = _timer(order_sn, delay, at, action)  # bad input fails before anything else
    if connection is not None:
        return await _staged(connection, [timer])
    return await (await default_producer())._arm(timer)


async def cancel_expiry(
    order_sn: str, *, action: str = DEFAULT_ACTION, connection: object | None = None
) -> bool:
    """As delayq.cancel_expiry: the order was paid; True if a pending timer was removed
    (with `connection=`: the cancel is staged in your transaction)."""
    key = timer_key(order_sn, action)
    if connection is not None:
        return await _staged_cancel(connection, key)
    return await (await default_producer())._disarm(key)


async def schedule_many(items: Iterable[Item], *, connection: object | None = None) -> int:
    """As delayq.schedule_many; see AsyncProducer.schedule_many."""
    prepared = [_prepare(item) for item in items]
    if connection is not None:
        return await _staged_many(connection, prepared)
    return await (await default_producer())._schedule_prepared(prepared)
