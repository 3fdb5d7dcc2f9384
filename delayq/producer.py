"""Scheduling and cancelling timers: what an order service calls."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache, partial
from itertools import islice
from typing import TypeVar

import redis

from delayq import redis_errors
from delayq.errors import InvalidInput, NotReady
from delayq.keys import Keys, timer_key
from delayq.redis_conn import client_url, connect, is_cluster, keys_for
from delayq.settings import Settings
from delayq.store import BULK_CHUNK, BULK_PIPELINE_DEPTH, CANCELLED, Timer, open_store
from delayq.timing import (
    ACTION_RE,
    MAX_DELAY_S,
    Delay,
    from_ms,
    parse_delay_ms,
    parse_due_at,
    to_ms,
)

DEFAULT_ACTION = "cancel"

T = TypeVar("T")
Item = tuple[str, Delay | datetime] | tuple[str, Delay | datetime, str]


class Producer:
    """Writes and removes timers. Thread-safe: it holds a redis-py connection pool."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self.client = client
        self.keys = keys
        self.store = open_store(
            client, keys, wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms
        )

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Producer:
        """A producer for `settings` (default: the environment and `.env`). Refuses an
        unset DELAYQ_REDIS_URL: a service whose setting is misspelt must not write timers
        into a private Redis that no listener reads. `embedded` asks for that one."""
        settings = producer_settings(settings)
        client = connect(settings)
        return cls(
            client,
            keys_for(client, settings),
            wait_replicas=settings.wait_replicas,
            wait_timeout_ms=settings.wait_timeout_ms,
        )

    def schedule(
        self,
        order_sn: str,
        delay: Delay | None = None,
        *,
        at: datetime | str | None = None,
        action: str = DEFAULT_ACTION,
        connection: object | None = None,
    ) -> datetime:
        """Arm (or move: the last schedule wins) the timer of `order_sn`/`action` to fire
        after `delay` or at `at`. Returns the due time in UTC.

        With `connection` (your database connection or session, inside your transaction)
        the request is written to the delayq_outbox table instead, and the listener sets
        the timer once your transaction commits (docs/outbox.md); the due time returned is
        then counted from now."""
        timer = _timer(order_sn, delay, at, action)
        if connection is not None:
            return _staged(connection, [timer])
        return from_ms(self._run(lambda: self.store.schedule([timer]))[0])

    def schedule_many(self, items: Iterable[Item], *, connection: object | None = None) -> int:
        """Schedule many timers in pipelined round trips. Items are (order_sn, delay) or
        (order_sn, delay, action); a delay may also be an aware datetime. Every item is
        validated before anything is written. Returns the number scheduled. With
        `connection`, they are staged in your transaction (see `schedule`)."""
        batch = list(items)
        if connection is not None:
            return _staged_many(connection, [_prepare(item) for item in batch])
        if all(map(_usual, batch)):
            usual = _chunked(batch)
            self._run(lambda: self.store.schedule_bulk(map(_usual_timers, usual)))
        else:
            self._run(partial(self.store.schedule_bulk, _chunked(list(map(_prepare, batch)))))
        return len(batch)

    def cancel(
        self, order_sn: str, *, action: str = DEFAULT_ACTION, connection: object | None = None
    ) -> bool:
        """Disarm the timer (the order was paid). True only if no firing of the timer will
        apply after this returns: it was pending and is gone. False if nothing was pending,
        or a firing of it is being applied right now (a paid order is still never
        cancelled: the listener re-checks the order's status in the same transaction).

        With `connection`, the cancel is staged in your transaction and applied after it
        commits, in order with the schedules staged before it; it returns True (staged)."""
        key = timer_key(order_sn, action)
        if connection is not None:
            return _staged_cancel(connection, key)
        return self._run(lambda: self.store.cancel(key)) == CANCELLED

    def _run(self, call: Callable[[], T]) -> T:
        """Every Redis failure becomes a delayq exception naming the server (password
        masked), with redis-py's exception as its cause. READONLY is retried once on fresh
        connections: after a failover, a DNS name or proxy in front of Redis points at the
        new primary while pooled connections still talk to the demoted one."""
        try:
            return call()
        except Exception as exc:
            if not redis_errors.is_redis_failure(exc):
                raise
            # A cluster's Router has retried READONLY already, re-reading the topology.
            if not redis_errors.is_readonly(exc) or is_cluster(self.client):
                raise redis_errors.wrap(client_url(self.client), exc) from exc
            first = exc
        self.client.connection_pool.disconnect()
        try:
            return call()
        except Exception as exc:
            if not redis_errors.is_redis_failure(exc):
                raise
            raise redis_errors.wrap(client_url(self.client), exc) from first


def producer_settings(settings: Settings | None) -> Settings:
    """`settings` (default: the environment and `.env`), checked to name a Redis: a
    library call refuses an unset DELAYQ_REDIS_URL (the blocking and asyncio producers)."""
    settings = settings or Settings.load()
    if not settings.redis_url:
        raise NotReady(
            "DELAYQ_REDIS_URL is not set: set it to the Redis your listener uses "
            "(redis://host:6379/1), or to 'embedded' for a private local Redis"
        )
    return settings


def _timer(
    order_sn: str, delay: Delay | None, at: datetime | str | None, action: str
) -> tuple[str, str, int]:
    when: Delay | datetime
    if at is not None and delay is None:
        when = parse_due_at(at)
    elif delay is not None and at is None:
        when = delay
    else:
        raise InvalidInput("give either a delay or an absolute time (at=), not both")
    return (timer_key(order_sn, action), *_spec(when))


def _staged(connection: object, timers: list[tuple[str, str, int]]) -> datetime:
    """Write `timers` to the outbox in the caller's transaction; the first one's due time
    (a delay counted from now)."""
    from delayq.outbox import stage_schedule

    stage_schedule(connection, timers)
    return staged_due(timers)


def _staged_many(connection: object, timers: list[tuple[str, str, int]]) -> int:
    if timers:
        _staged(connection, timers)
    return len(timers)


def _staged_cancel(connection: object, key: str) -> bool:
    """Stage a cancel in the caller's transaction: True (it applies once that commits)."""
    from delayq.outbox import stage_cancel

    stage_cancel(connection, [key])
    return True


def staged_due(timers: list[tuple[str, str, int]]) -> datetime:
    """The due time a staged request answers with: the first timer's (a delay is counted
    from now; the listener counts it from when it relays the row)."""
    _, spec, ms = timers[0]
    return from_ms(ms if spec == "at" else to_ms(datetime.now(UTC)) + ms)


def bulk_rounds(prepared: list[tuple[str, str, int]]) -> Iterator[list[list[tuple[str, str, int]]]]:
    """schedule_many's round trips: up to BULK_PIPELINE_DEPTH chunks of BULK_CHUNK timers."""
    it = iter(prepared)
    while chunks := [
        c for c in (list(islice(it, BULK_CHUNK)) for _ in range(BULK_PIPELINE_DEPTH)) if c
    ]:
        yield chunks


def _chunked(items: list[T]) -> list[list[T]]:
    """schedule_many's script calls: BULK_CHUNK timers each."""
    return [items[i : i + BULK_CHUNK] for i in range(0, len(items), BULK_CHUNK)]


def _spec(delay: Delay | datetime) -> tuple[str, int]:
    if isinstance(delay, datetime):
        return "at", to_ms(parse_due_at(delay))
    return "in", parse_delay_ms(delay)


def _prepare(item: Item) -> Timer:
    if not isinstance(item, tuple | list) or len(item) not in (2, 3):
        raise InvalidInput(f"bad item {item!r}: use (order_sn, delay) or (order_sn, delay, action)")
    action = item[2] if len(item) == 3 else DEFAULT_ACTION
    return (timer_key(item[0], action), *_spec(item[1]))


#: ORDER_SN_RE's characters; its bound on the length is checked apart (faster).
_ORDER_SN_CHARS = re.compile(r"[A-Za-z0-9_.-]+").fullmatch
_NO_DELAY, _MAX_DELAY = timedelta(0), timedelta(seconds=MAX_DELAY_S)


@lru_cache(maxsize=256)
def _is_action(action: str) -> bool:
    """ACTION_RE, remembered: a bulk load names few actions."""
    return ACTION_RE.fullmatch(action) is not None


def _usual(item: object) -> bool:
    """Whether `item` is a valid schedule_many item of the usual shape: (order id,
    timedelta) or (order id, timedelta, action). Such items are only checked before
    anything is written; each is made a timer (_usual_timers) when its round trip is
    packed, while Redis runs the one before. Other items take _prepare, which says what
    is wrong with a bad one."""
    if type(item) is not tuple or not 2 <= len(item) <= 3:
        return False
    order_sn, when, action = item if len(item) == 3 else (*item, DEFAULT_ACTION)
    return (
        type(order_sn) is str
        and len(order_sn) <= 64
        and _ORDER_SN_CHARS(order_sn) is not None
        and type(action) is str
        and _is_action(action)
        and type(when) is timedelta
        and _NO_DELAY <= when <= _MAX_DELAY
    )


def _usual_timers(items: Sequence[Item]) -> list[Timer]:
    """The timers of items _usual accepted: what _prepare makes of them."""
    timers: list[Timer] = []
    for item in items:
        order_sn, when, action = item if len(item) == 3 else (*item, DEFAULT_ACTION)
        assert isinstance(when, timedelta)
        timers.append((f"{order_sn}:{action}", "in", parse_delay_ms(when)))  # as timer_key
    return timers


_default: Producer | None = None
_default_lock = threading.Lock()


def default_producer() -> Producer:
    """The process-wide producer built from the environment and `.env`, made on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Producer.from_settings()
        return _default


def schedule_expiry(
    order_sn: str,
    delay: Delay | None = None,
    *,
    at: datetime | str | None = None,
    action: str = DEFAULT_ACTION,
    connection: object | None = None,
) -> datetime:
    """Fire `action` (default: cancel the order if still unpaid) after `delay` (seconds,
    timedelta or '20m') or at `at`. Scheduling again moves the due time. Returns it (UTC).

    `connection=` (a SQLAlchemy connection or session, a Django or DB-API connection)
    stages it in your transaction: the timer exists if and only if that commits, and
    nothing talks to Redis here (docs/outbox.md)."""
    if connection is not None:
        return _staged(connection, [_timer(order_sn, delay, at, action)])
    return default_producer().schedule(order_sn, delay, at=at, action=action)


def cancel_expiry(
    order_sn: str, *, action: str = DEFAULT_ACTION, connection: object | None = None
) -> bool:
    """The order was paid: the timer must not fire. True if a pending timer was removed
    (with `connection=`: the cancel is staged in your transaction)."""
    if connection is not None:
        return _staged_cancel(connection, timer_key(order_sn, action))
    return default_producer().cancel(order_sn, action=action)


def schedule_many(items: Iterable[Item], *, connection: object | None = None) -> int:
    """Schedule many timers in few round trips; see Producer.schedule_many."""
    if connection is not None:
        return _staged_many(connection, [_prepare(item) for item in items])
    return default_producer().schedule_many(items)
