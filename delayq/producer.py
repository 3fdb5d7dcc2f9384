"""Scheduling and cancelling timers: what an order service calls."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from itertools import islice
from typing import TypeVar

import redis

from delayq.errors import InvalidInput, NotReady, ServiceUnavailable
from delayq.keys import Keys, timer_key
from delayq.redis_conn import client_url, connect, keys_for, unreachable
from delayq.settings import Settings
from delayq.store import CANCELLED, open_store
from delayq.timing import Delay, from_ms, parse_delay_ms, parse_due_at, to_ms

DEFAULT_ACTION = "cancel"
#: Timers per Lua call in schedule_many (each call holds Redis for ~1-2 ms, so a bulk
#: load delays a listener's claim by no more), and Lua calls per pipelined round trip.
BULK_CHUNK = 100
BULK_PIPELINE_DEPTH = 40

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
        settings = settings or Settings.load()
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
    ) -> datetime:
        """Arm (or move: the last schedule wins) the timer of `order_sn`/`action` to fire
        after `delay` or at `at`. Returns the due time in UTC."""
        when: Delay | datetime
        if at is not None and delay is None:
            when = parse_due_at(at)
        elif delay is not None and at is None:
            when = delay
        else:
            raise InvalidInput("give either a delay or an absolute time (at=), not both")
        spec = _spec(when)
        key = timer_key(order_sn, action)
        return from_ms(self._run(lambda: self.store.schedule([(key, *spec)]))[0])

    def schedule_many(self, items: Iterable[Item]) -> int:
        """Schedule many timers in pipelined round trips. Items are (order_sn, delay) or
        (order_sn, delay, action); a delay may also be an aware datetime. Every item is
        validated before anything is written. Returns the number scheduled."""
        prepared = [_prepare(item) for item in items]
        it = iter(prepared)
        while chunks := [
            c for c in (list(islice(it, BULK_CHUNK)) for _ in range(BULK_PIPELINE_DEPTH)) if c
        ]:
            self._run(lambda: self.store.schedule_bulk(chunks))
        return len(prepared)

    def cancel(self, order_sn: str, *, action: str = DEFAULT_ACTION) -> bool:
        """Disarm the timer (the order was paid). True only if no firing of the timer will
        apply after this returns: it was pending and is gone. False if nothing was pending,
        or a firing of it is being applied right now (a paid order is still never
        cancelled: the listener re-checks the order's status in the same transaction)."""
        key = timer_key(order_sn, action)
        return self._run(lambda: self.store.cancel(key)) == CANCELLED

    def _run(self, call: Callable[[], T]) -> T:
        """Every Redis failure becomes one line naming the server (password masked)."""
        url = client_url(self.client)
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise unreachable(url, exc) from exc
        except redis.exceptions.NoPermissionError as exc:
            raise NotReady(
                f"Redis at {url} refused the producer: {_first_line(exc)} "
                "(the producer's ACL user needs the rules in deploy/redis/users.acl)"
            ) from exc
        except redis.exceptions.ReadOnlyError as exc:
            raise ServiceUnavailable(
                f"Redis at {url} is a read-only replica: point DELAYQ_REDIS_URL at the "
                f"primary ({_first_line(exc)})"
            ) from exc
        except redis.exceptions.OutOfMemoryError as exc:
            raise ServiceUnavailable(
                f"Redis at {url} is out of memory and refused the timer: {_first_line(exc)}"
            ) from exc
        except redis.ResponseError as exc:
            raise ServiceUnavailable(
                f"Redis at {url} refused the call: {_first_line(exc)}"
            ) from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0]


def _spec(delay: Delay | datetime) -> tuple[str, int]:
    if isinstance(delay, datetime):
        return "at", to_ms(parse_due_at(delay))
    return "in", parse_delay_ms(delay)


def _prepare(item: Item) -> tuple[str, str, int]:
    if not isinstance(item, tuple | list) or len(item) not in (2, 3):
        raise InvalidInput(f"bad item {item!r}: use (order_sn, delay) or (order_sn, delay, action)")
    action = item[2] if len(item) == 3 else DEFAULT_ACTION
    return (timer_key(item[0], action), *_spec(item[1]))


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
) -> datetime:
    """Fire `action` (default: cancel the order if still unpaid) after `delay` (seconds,
    timedelta or '20m') or at `at`. Scheduling again moves the due time. Returns it (UTC)."""
    return default_producer().schedule(order_sn, delay, at=at, action=action)


def cancel_expiry(order_sn: str, *, action: str = DEFAULT_ACTION) -> bool:
    """The order was paid: the timer must not fire. True if a pending timer was removed."""
    return default_producer().cancel(order_sn, action=action)


def schedule_many(items: Iterable[Item]) -> int:
    """Schedule many timers in few round trips; see Producer.schedule_many."""
    return default_producer().schedule_many(items)
