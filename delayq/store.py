"""The timer state machine in Redis: every transition is one Lua script (delayq/lua/).

A timer key `ORDER_SN:ACTION` has at most one *pending schedule* (its entry in the due
index) and any number of *firings* (the timer falling due at one time, `KEY@DUE_MS`)
claimed by listeners:

    schedule ──> pending ──claim (due <= now)──> claimed ──ack──> (done)
       ^ again: moves it        │                  │  ^
       │                        cancel             │  └─ lease ran out / handed back /
       │                        v                  │     retry time came: claimed again
       └── legacy SETEX/EXPIRE  (gone)             └─ too many failures ──> dead ──retry-dead─┐
           adopted                                          ^─────────────────────────────────┘

Keying claims by firing is what makes rescheduling safe: a firing already being applied
completes and is acknowledged on its own, while the newer schedule stays pending (or is
claimed as its own firing) and fires too. `cancel` removes the pending schedule; it
reports success only when no claimed firing of the timer can still apply.

Each method is one script call (the sweep: one SCAN and one script); Redis errors
propagate to the caller, which knows whether to retry, report or wait for a lease.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from itertools import chain, islice, repeat, takewhile
from typing import Any

import redis
from redis.commands.core import Script

from delayq.bulk import run_rounds
from delayq.errors import NotReplicated
from delayq.keys import Keys, Layout, firing_id, key_hash, parse_firing_id
from delayq.redis_conn import Scripts
from delayq.timing import from_ms

#: Dead letters re-queued per script call, so that re-queuing 100,000 holds Redis only
#: ~1 ms at a time.
REQUEUE_CHUNK = 500
#: Index shards read per call by `pending_page` (about 60 timers each with 1M pending).
PENDING_PAGE_SHARDS = 64
#: Timers per schedule script call in bulk (each call holds Redis for ~1-2 ms, so a bulk
#: load delays a listener's claim by no more), and calls per pipelined round trip.
BULK_CHUNK = 100
BULK_PIPELINE_DEPTH = 40
BULK_FIRST_ROUND = 4


@dataclass(frozen=True)
class Firing:
    """One claimed firing: a timer key and the due time it fires for."""

    key: str
    due_ms: int
    #: Claimed before (lease ran out, retry, hand-back): its outcome may be committed already.
    reclaimed: bool = False
    #: Which try this is: 1, plus one for each failed attempt Redis has counted.
    attempt: int = 1
    #: Claimed ahead of its due time: the monotonic instant before which it must not be
    #: applied (delayq.due_queue.ready_at); 0 when it was due when claimed.
    ready: float = field(default=0.0, compare=False)

    # Computed once: an applier reads each of these several times per firing.
    @cached_property
    def id(self) -> str:
        return firing_id(self.key, self.due_ms)

    @cached_property
    def due_at(self) -> datetime:
        """The due time, aware UTC."""
        return from_ms(self.due_ms)

    @cached_property
    def naive_due_at(self) -> datetime:
        """The due time as the outcomes table holds it (naive UTC)."""
        return self.due_at.replace(tzinfo=None)

    @classmethod
    def from_id(cls, fid: str, *, reclaimed: bool = False, attempt: int = 1) -> Firing:
        key, due_ms = parse_firing_id(fid)
        return cls(key, due_ms, reclaimed, attempt)


@dataclass(frozen=True)
class Claim:
    """What one claim_due call returns."""

    #: Redis's clock when it claimed, in ms with a fraction (microseconds).
    now_ms: float
    #: The next due time or lease end (ms), or -1 when nothing is pending or claimed.
    next_ms: int
    firings: list[Firing]


@dataclass(frozen=True)
class TimerState:
    """One timer as Redis holds it."""

    key: str
    #: Due time of its pending schedule (ms), if it has one.
    pending_due_ms: int | None
    #: Time to live of its TTL key (ms), if the key exists with a TTL.
    ttl_ms: int | None
    #: (firing, lease deadline ms, failed attempts) of each claimed firing, oldest first.
    claims: list[tuple[Firing, int, int]]
    #: Its dead letters (JSON entries), oldest due first.
    dead: list[dict[str, Any]]


#: cancel()'s answers.
CANCELLED, NOT_PENDING, FIRING_NOW = 1, 0, -1


#: A timer to schedule: (timer key, 'in' | 'at', ms).
Timer = tuple[str, str, int]


class TimerStore:
    """delayq's keys in one Redis (one DB), driven through the scripts. Thread-safe.

    With `wait_replicas`, producers' writes (schedule, cancel) return only once that many
    replicas confirmed them (WAIT), so that a failover cannot lose an acknowledged timer;
    after `wait_timeout_ms` without enough confirmations they raise NotReplicated."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        scripts: Scripts | None = None,
        *,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self.client = client
        self.keys = keys
        self.scripts = scripts or Scripts.register(client)
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms

    # -- producers -----------------------------------------------------------------------

    def schedule(self, timers: Sequence[Timer]) -> list[int]:
        """Arm or move timers. Returns each due time (epoch ms)."""
        keys, args = schedule_call(self.keys, timers)
        return [int(d) for d in self._write([(self.scripts.schedule, keys, args)])[0]]

    def schedule_bulk(self, chunks: Iterable[Sequence[Timer]]) -> None:
        """Schedule chunks of timers, one script call each, in order: BULK_PIPELINE_DEPTH
        calls a round trip, each round sent while Redis runs the one before (delayq.bulk)."""
        calls = (schedule_call(self.keys, c) for c in chunks)
        # The first round small: Redis waits for nothing but it.
        sizes = chain([BULK_FIRST_ROUND], repeat(BULK_PIPELINE_DEPTH))
        run_rounds(
            self.client,
            self.scripts.schedule,
            takewhile(bool, (list(islice(calls, n)) for n in sizes)),
            wait_replicas=self.wait_replicas,
            wait_timeout_ms=self.wait_timeout_ms,
        )

    def cancel(self, key: str) -> int:
        """Disarm a timer: CANCELLED (no firing of it will apply after this returns),
        NOT_PENDING (nothing was pending), or FIRING_NOW (the pending schedule is gone, but
        an earlier firing is being applied)."""
        keys, args = cancel_call(self.keys, [key])
        return int(self._write([(self.scripts.cancel, keys, args)])[0][0])

    def _write(self, calls: Sequence[tuple[Script, list[str], list[Any]]]) -> list[Any]:
        """A producer's script calls, in one round trip, and WAIT on the same connection."""
        if len(calls) == 1 and not self.wait_replicas:
            script, keys, args = calls[0]
            return [script(keys=keys, args=args)]
        pipe = self.client.pipeline(transaction=False)
        for script, keys, args in calls:
            script(keys=keys, args=args, client=pipe)
        if not self.wait_replicas:
            return list(pipe.execute())
        pipe.wait(self.wait_replicas, self.wait_timeout_ms)
        *results, confirmed = pipe.execute()
        check_replicated(int(confirmed), self.wait_replicas, self.wait_timeout_ms)
        return results

    def claim_due(self, limit: int, lease_ms: int, ahead_ms: int = 0) -> Claim:
        """Claim up to `limit` firings: those whose lease ran out first, then those due,
        or due within `ahead_ms` (the caller holds those until they are due)."""
        keys, args = claim_due_call(self.keys, limit, lease_ms, ahead_ms)
        raw = self.scripts.claim_due(keys=keys, args=args)
        reclaimed = int(raw[2])
        ids = [str(fid) for fid in raw[3:]]
        # Only a firing claimed before can have failed before: one more read, for those.
        failed = self._failed_attempts(ids[:reclaimed]) if reclaimed else []
        firings = [
            Firing.from_id(fid, reclaimed=True, attempt=1 + failed[i])
            if i < reclaimed
            else Firing.from_id(fid)
            for i, fid in enumerate(ids)
        ]
        return Claim(int(raw[0]) / 1000, int(raw[1]), firings)

    def _failed_attempts(self, firing_ids: Sequence[str]) -> list[int]:
        # HGETs in one round trip (HGET is a command the listener's ACL has already).
        pipe = self.client.pipeline(transaction=False)
        for fid in firing_ids:
            pipe.hget(self.keys.attempts, fid)
        return [int(n or 0) for n in pipe.execute()]

    def claim_expired(self, timer_keys: Sequence[str], lease_ms: int) -> list[Firing]:
        """Claim what 'expired' events name: a due index entry, or a key with none that no
        listener is firing or fired lately (a legacy timer whose 'expire' event was missed)."""
        keys, args = claim_expired_call(self.keys, timer_keys, lease_ms)
        return [
            Firing.from_id(str(fid)) for fid in self.scripts.claim_expired(keys=keys, args=args)
        ]

    def adopt(self, timer_keys: Sequence[str]) -> int:
        """Index TTL keys that producers outside delayq set, at their expiry time."""
        keys, args = adopt_call(self.keys, timer_keys)
        return int(self.scripts.adopt(keys=keys, args=args))

    def forget(self, timer_keys: Sequence[str]) -> int:
        """Drop the pending schedules of keys deleted before their due time."""
        keys, args = forget_call(self.keys, timer_keys)
        return int(self.scripts.forget(keys=keys, args=args))

    def scan_timers(self, cursor: int, count: int) -> tuple[int, list[str]]:
        """One step of a SCAN over the timer DB: (next cursor, 0 when the pass is complete;
        the string keys found that may be timers). The sweep adopts them."""
        cursor, found = self.client.scan(cursor, count=count, _type="string")
        names = [str(key) for key in found]
        return int(cursor), [key for key in names if ":" in key and not self.keys.is_own(key)]

    # -- listeners: settling -------------------------------------------------------------

    def ack(
        self,
        firing_ids: Sequence[str],
        recent_window_ms: int,
        stats: tuple[list[str], list[Any]] | None = None,
    ) -> None:
        """Forget firings whose outcome is committed; only these firings are touched.
        `stats`: the batch's record_firings call (delayq.firing_stats), made by the same
        script call."""
        ids = list(dict.fromkeys(firing_ids))
        keys, args = ack_call(self.keys, ids, recent_window_ms, stats)
        self.scripts.ack(keys=keys, args=args)

    def retry_later(
        self,
        firing_ids: Sequence[str],
        *,
        max_attempts: int,
        backoff_ms: int,
        backoff_max_ms: int,
        error: str,
    ) -> int:
        """Count a failed attempt of each firing still claimed: retry after a backoff, or
        dead-letter it. Returns how many were dead-lettered."""
        keys, args = retry_later_call(
            self.keys,
            list(dict.fromkeys(firing_ids)),
            max_attempts,
            backoff_ms,
            backoff_max_ms,
            error,
        )
        return int(self.scripts.retry_later(keys=keys, args=args))

    def release(self, firing_ids: Sequence[str]) -> None:
        """Hand claimed firings back: claimable again at once, by any listener."""
        keys, args = release_call(self.keys, firing_ids)
        self.scripts.release(keys=keys, args=args)

    def requeue_dead(self, names: Iterable[str] = ()) -> int:
        """Re-queue dead letters to fire now: the firings named (firing ids, or timer keys
        for every dead firing of those timers), or all of them. In chunks, so a large
        re-queue never holds Redis long."""
        fields = self._dead_fields(list(names))
        n = 0
        while chunk := list(islice(fields, REQUEUE_CHUNK)):
            keys, args = retry_dead_call(self.keys, chunk)
            n += int(self.scripts.retry_dead(keys=keys, args=args))
        return n

    def _dead_fields(self, names: list[str]) -> Iterator[str]:
        if not names:
            for field in self.client.hscan_iter(self.keys.dead, count=REQUEUE_CHUNK):
                yield str(field[0])
            return
        for name in names:
            if "@" in name:
                yield name
            else:
                # The timer's dead firings (and its dead letter from before firing ids).
                yield name
                for field, _ in self.client.hscan_iter(
                    self.keys.dead, match=f"{_glob_escape(name)}@*", count=REQUEUE_CHUNK
                ):
                    yield str(field)

    def timer_state(self, key: str) -> TimerState:
        """Everything Redis holds about one timer (a few reads, none of them scripts)."""
        k = self.keys
        pattern = f"{_glob_escape(key)}@*"
        shards = k.shards_of(key, self.layout())
        pipe = self.client.pipeline(transaction=False)
        for shard in shards:
            pipe.zscore(shard, key)
        pipe.pttl(key)
        pipe.hget(k.dead, key)
        *found, ttl_ms, old_dead = pipe.execute()
        due = next((d for d in found if d is not None), None)
        claims = []
        for fid, lease in self.client.zscan_iter(k.claims, match=pattern, count=1000):
            attempts = self.client.hget(k.attempts, fid)
            claims.append((Firing.from_id(str(fid)), int(lease), int(attempts or 0)))
        dead = [
            json.loads(entry)
            for _, entry in self.client.hscan_iter(k.dead, match=pattern, count=1000)
        ]
        if old_dead:
            dead.append(json.loads(old_dead))
        return TimerState(
            key=key,
            pending_due_ms=None if due is None else int(due),
            ttl_ms=None if ttl_ms < 0 else int(ttl_ms),
            claims=sorted(claims, key=lambda c: c[0].due_ms),
            dead=sorted(dead, key=lambda d: int(d["due_ms"])),
        )

    def pending_page(self, cursor: int) -> tuple[int, list[tuple[str, int]]]:
        """One bounded step over the due index, in shard order: (next cursor, 0 once every
        shard was read; the (timer key, due ms) of PENDING_PAGE_SHARDS shards). Start at 0."""
        shards = self.layout().shards
        end = min(cursor + PENDING_PAGE_SHARDS, shards)
        pipe = self.client.pipeline(transaction=False)
        for n in range(cursor, end):
            pipe.zrange(f"{self.keys.shard_prefix}{n}", 0, -1, withscores=True)
        found = [(str(key), int(due)) for entries in pipe.execute() for key, due in entries]
        return (0 if end >= shards else end), found

    def layout(self) -> Layout:
        """The due index's layout in Redis (delayq.layout): how many shards it has now."""
        from delayq.layout import read_layout

        return read_layout(self.client, self.keys)

    def renew(self, firing_ids: Sequence[str], lease_ms: int) -> int:
        """Extend the leases of claimed firings still being worked on (an external call
        queued or under way); firings no longer claimed are left alone."""
        keys, args = renew_call(self.keys, firing_ids, lease_ms)
        return int(self.scripts.renew(keys=keys, args=args))

    def heartbeat(self, listener_id: str) -> None:
        self.scripts.heartbeat(keys=[self.keys.listeners], args=[listener_id])

    @staticmethod
    def noop_calls_for(keys: Keys, probe_key: str) -> dict[str, tuple[list[str], list[Any]]]:
        """Each script's (keys, args) for a call that changes nothing: what `delayq check`
        runs to test the ACL with exactly the keys the real calls use. (`probe_key` is
        never scheduled, so cancelling or adopting it finds nothing.)"""
        k = keys
        return {
            "schedule": schedule_call(k, []),
            "cancel": cancel_call(k, [probe_key]),
            "claim_due": claim_due_call(k, 0, 1),
            "claim_expired": claim_expired_call(k, [], 1),
            "adopt": adopt_call(k, [probe_key]),
            "forget": forget_call(k, []),
            # A window longer than the epoch: trims no tombstone.
            "ack": ack_call(k, [], 10**15),
            "retry_later": retry_later_call(k, [], 1, 1, 1, "-"),
            "release": release_call(k, []),
            "renew": renew_call(k, [], 1),
            "retry_dead": retry_dead_call(k, []),
        }


def check_replicated(confirmed: int, wanted: int, timeout_ms: int) -> None:
    """Raise NotReplicated when WAIT saw fewer replicas than wanted."""
    if confirmed < wanted:
        raise NotReplicated(
            f"the write reached the Redis primary, but only {confirmed} of "
            f"{wanted} replicas (DELAYQ_WAIT_REPLICAS) confirmed it within {timeout_ms} ms: "
            "it would be lost if the primary failed over now"
        )


def _layout_args(k: Keys) -> list[Any]:
    """What a script needs to read the index's layout (lua/_prelude.lua read_layout)."""
    return [k.shard_prefix, k.layout, k.shards]


def schedule_call(k: Keys, timers: Sequence[Timer]) -> tuple[list[str], list[Any]]:
    """schedule.lua's keys and arguments: four a timer (its key and index shard under the
    default count, declared as keys; its due time, a delay marked '+'; its hash, for a
    resized index: delayq.layout), the fewest Redis and Python handle."""
    keys = [k.heads]
    args: list[Any] = [k.wake_channel, len(k.shard_prefix), k.layout, k.shards]
    for key, mode, value in timers:
        h = key_hash(key)
        keys += (key, f"{k.shard_prefix}{h % k.shards if k.shards > 1 else 0}")
        args += (f"+{value}" if mode == "in" else value, h)
    return keys, args


def with_shards(k: Keys, timer_keys: Iterable[str]) -> list[str | int]:
    """Each timer key and its hash, from which scripts take its shard (delayq.layout)."""
    out: list[str | int] = []
    for key in timer_keys:
        out += [key, key_hash(key)]
    return out


def _declared(k: Keys, timer_keys: Sequence[str] = ()) -> list[str]:
    """In a cluster, the keys a script reaches through its arguments (the slot's index
    shard, the timer keys it reads) are declared too: while a slot migrates, Redis then
    answers ASK or TRYAGAIN instead of running the script on half of the slot's keys."""
    if k.slot is None:
        return []
    return [f"{k.shard_prefix}0", *timer_keys]


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def cancel_call(k: Keys, timer_keys: Sequence[str]) -> tuple[list[str], list[Any]]:
    keys = [k.heads, k.recent, k.claims_per_key, *timer_keys, *_declared(k)]
    return keys, [*_layout_args(k), *(key_hash(key) for key in timer_keys)]


# -- listeners: claiming -------------------------------------------------------------


def claim_due_call(
    k: Keys, limit: int, lease_ms: int, ahead_ms: int = 0
) -> tuple[list[str], list[Any]]:
    return (
        [k.heads, k.claims, k.claims_per_key, k.inflight, k.inflight_due, *_declared(k)],
        [limit, lease_ms, k.shard_prefix, ahead_ms],
    )


def claim_expired_call(
    k: Keys, timer_keys: Sequence[str], lease_ms: int
) -> tuple[list[str], list[Any]]:
    return [k.heads, k.claims, k.claims_per_key, k.recent, *_declared(k)], [
        lease_ms,
        *_layout_args(k),
        *with_shards(k, timer_keys),
    ]


def ack_call(
    k: Keys,
    firing_ids: Sequence[str],
    recent_window_ms: int,
    stats: tuple[list[str], list[Any]] | None = None,
) -> tuple[list[str], list[Any]]:
    keys = [k.claims, k.claims_per_key, k.attempts, k.recent]
    args = [recent_window_ms, len(firing_ids), *firing_ids]
    if stats is None:
        return keys, args
    return keys + stats[0], args + stats[1]


def retry_later_call(
    k: Keys,
    firing_ids: Sequence[str],
    max_attempts: int,
    backoff_ms: int,
    backoff_max_ms: int,
    error: str,
) -> tuple[list[str], list[Any]]:
    return [k.claims, k.claims_per_key, k.attempts, k.dead, k.recent, k.dead_index], [
        max_attempts,
        backoff_ms,
        backoff_max_ms,
        error,
        *firing_ids,
    ]


def adopt_call(k: Keys, timer_keys: Sequence[str]) -> tuple[list[str], list[Any]]:
    return [k.heads, *_declared(k, timer_keys)], [
        k.wake_channel,
        *_layout_args(k),
        *with_shards(k, timer_keys),
    ]


def forget_call(k: Keys, timer_keys: Sequence[str]) -> tuple[list[str], list[Any]]:
    return [k.heads, *_declared(k, timer_keys)], [
        *_layout_args(k),
        *with_shards(k, timer_keys),
    ]


def release_call(k: Keys, firing_ids: Sequence[str]) -> tuple[list[str], list[Any]]:
    return [k.claims], list(firing_ids)


def renew_call(k: Keys, firing_ids: Sequence[str], lease_ms: int) -> tuple[list[str], list[Any]]:
    return [k.claims], [lease_ms, *firing_ids]


def retry_dead_call(k: Keys, fields: Sequence[str]) -> tuple[list[str], list[Any]]:
    return [k.claims, k.claims_per_key, k.dead, k.attempts, k.dead_index], [
        k.wake_channel,
        *fields,
    ]


def open_store(
    client: redis.Redis,
    keys: Keys,
    scripts: Scripts | None = None,
    *,
    wait_replicas: int = 0,
    wait_timeout_ms: int = 1000,
) -> TimerStore:
    """The store for `client`: a TimerStore on one Redis, a ClusterStore (same methods)
    on a Redis Cluster."""
    from redis.cluster import RedisCluster

    if isinstance(client, RedisCluster):
        from delayq.cluster.store import ClusterStore

        return ClusterStore(
            client, keys, scripts, wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms
        )
    return TimerStore(
        client, keys, scripts, wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms
    )
