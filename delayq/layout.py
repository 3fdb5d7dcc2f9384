"""How many shards a namespace's due index has, and growing it (`delayq reshard`).

The index is `shards` small sorted sets, a timer's entry in shard `crc32(key) % shards`
(delayq.keys). Small sets stay in Redis's listpack encoding up to
zset-max-listpack-entries (128 by default); past ~2 million pending timers the default
16,384 shards outgrow it and cost ~100 B more a timer (BENCHMARKS.md). The count is a
property of the namespace, kept in Redis (Keys.layout), so it can grow: 131,072 keeps
10 million pending at ~76 a shard.

A resize to N (a power-of-two multiple of the current count P) first records N, so every
write from then on uses it; then moves each old shard's entries to their new shard, one
atomic script call per shard (lua/reshard_move.lua), recording its progress. Scripts read
the layout in the same atomic step as the entry they touch, and look in both candidate
shards (`crc % N`, `crc % P`), so schedule, cancel and claim are right at any instant of a
resize; the claimer reads `heads` and never needs to know. A resize that stops (a crash,
^C) resumes where it was by running it again.

Producers and listeners of delayq 0.2 know nothing of the layout: they always use 16,384.
Every one of them must be upgraded before the count is raised (see `reshard`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from delayq.errors import InvalidInput
from delayq.keys import SHARDS, Keys, Layout, key_hash
from delayq.redis_conn import script_source

#: The largest shard count `reshard` accepts (~10 pending a shard at 10 million).
MAX_SHARDS = 2**20
#: A shard count is suggested once the mean shard holds this share of
#: zset-max-listpack-entries: the fullest shards are ~20% above the mean.
OUTGROWN_SHARE = 0.75
#: Redis's default zset-max-listpack-entries.
LISTPACK_DEFAULT = 128
#: Old shards `delayq status` and `check` read, after a resize, for entries a client of
#: delayq 0.2 wrote (~76 entries each with 10 million pending at 131,072 shards).
STRAY_SAMPLE = 64
#: Entries moved per script call (a shard in the skiplist encoding may hold thousands).
MOVE_CHUNK = 256


def read_layout(client: redis.Redis, keys: Keys) -> Layout:
    """The namespace's layout (one round trip of ZSCOREs: a command every delayq user's
    ACL has, read-only ones included); a cluster partition's is always its one shard."""
    if not keys.layout:
        return Layout(keys.shards, keys.shards)
    pipe = client.pipeline(transaction=False)
    for field in ("shards", "previous", "moved"):
        pipe.zscore(keys.layout, field)
    shards, previous, moved = (None if v is None else int(v) for v in pipe.execute())
    shards = shards or keys.shards
    return Layout(shards, min(previous or shards, shards), moved)


def check_shape(shards: int) -> None:
    """Raise InvalidInput unless `shards` could be a shard count (before asking Redis)."""
    if shards < 1 or shards & (shards - 1) or shards > MAX_SHARDS:
        raise InvalidInput(
            f"--shards must be a power of two up to {MAX_SHARDS:,} (e.g. 131072), not {shards}"
        )


def check_target(current: Layout, shards: int) -> None:
    """Raise InvalidInput unless a resize from `current` to `shards` may start or resume."""
    check_shape(shards)
    if current.moved is not None and shards != current.shards:
        raise InvalidInput(
            f"a resize to {current.shards:,} shards is under way: run "
            f"'delayq reshard --shards {current.shards}' to finish it first"
        )
    if current.moved is not None:
        return
    if shards <= current.shards or shards % current.shards:
        raise InvalidInput(
            f"--shards must be a multiple of the current {current.shards:,} and larger "
            f"(e.g. {current.shards * 8}): the count never shrinks"
        )


def suggested_shards(current: int, pending: int, listpack_entries: int) -> int:
    """The smallest power-of-two multiple of `current` whose mean shard holds at most
    OUTGROWN_SHARE of `listpack_entries` with `pending` timers (at most MAX_SHARDS)."""
    shards = current
    while shards < MAX_SHARDS and pending / shards > OUTGROWN_SHARE * listpack_entries:
        shards *= 2
    return shards


def listpack_entries(client: redis.Redis) -> int:
    """zset-max-listpack-entries of the server (128, Redis's default, where CONFIG is
    refused: managed Redis, a restricted ACL)."""
    try:
        conf = client.config_get("zset-max-listpack-entries")
        return int(conf.get("zset-max-listpack-entries") or LISTPACK_DEFAULT)
    except (redis.ResponseError, ValueError):
        return LISTPACK_DEFAULT


def index_figures(client: redis.Redis, keys: Keys, pending: int) -> dict[str, Any]:
    """The index's shard count, timers per shard, a resize under way, and the command to
    run when its shards have outgrown the listpack encoding (else None): for `delayq
    status` and `delayq check`."""
    layout = read_layout(client, keys)
    entries = listpack_entries(client)
    per_shard = pending / layout.shards
    wanted = suggested_shards(layout.shards, pending, entries)
    strays = stray_entries(client, keys, layout)
    advice = None
    if strays:
        advice = (
            f"{strays} timers found in shards that only delayq 0.2 still writes (the "
            f"index has {layout.shards:,} shards): a producer or listener of 0.2 is running; "
            "upgrade it (its cancels miss timers that newer producers wrote)"
        )
    elif layout.moved is not None:
        advice = (
            f"a resize to {layout.shards:,} shards stopped at {layout.moved:,} of "
            f"{layout.previous:,}: run 'delayq reshard --shards {layout.shards}' to finish it"
        )
    elif wanted > layout.shards:
        advice = (
            f"{per_shard:.0f} timers a shard is near or past zset-max-listpack-entries "
            f"({entries}): shards leave the compact encoding (~100 B more a timer); once "
            f"every producer and listener runs delayq 0.3 or later, run 'delayq reshard "
            f"--shards {wanted}'"
        )
    return {
        "shards": layout.shards,
        "timers_per_shard": round(per_shard, 1),
        "zset_max_listpack_entries": entries,
        "resize_moved": None if layout.moved is None else f"{layout.moved}/{layout.previous}",
        "strays_sampled": strays,
        "advice": advice,
    }


def stray_entries(client: redis.Redis, keys: Keys, layout: Layout) -> int:
    """After a resize, entries that sit in a shard other than their own, in STRAY_SAMPLE
    of the old shards: only a client of delayq 0.2 (which always writes `crc % 16384`)
    puts them there. One pipelined read."""
    if layout.moved is not None or layout.previous == layout.shards:
        return 0
    step = max(1, layout.previous // STRAY_SAMPLE)
    sampled = range(0, layout.previous, step)
    pipe = client.pipeline(transaction=False)
    for shard_id in sampled:
        pipe.zrange(f"{keys.shard_prefix}{shard_id}", 0, -1)
    found = pipe.execute()
    return sum(
        1
        for shard_id, members in zip(sampled, found, strict=True)
        for m in members
        if key_hash(str(m)) % layout.shards != shard_id
    )


def reshard(
    client: redis.Redis,
    keys: Keys,
    shards: int,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Layout:
    """Grow the due index to `shards` shards, or finish a resize to it that stopped.
    `progress(moved, total)` is called once the new count is recorded, then after each
    old shard moved. Returns the new layout."""
    if keys.slot is not None or not keys.layout:
        raise InvalidInput("a Redis Cluster keeps one index shard per slot: nothing to resize")
    current = read_layout(client, keys)
    check_target(current, shards)
    if current.moved is None:
        _start(client, keys, current, shards)
        current = read_layout(client, keys)
    move = client.register_script(script_source("reshard_move"))
    start = current.moved or 0
    if progress:
        progress(start, current.previous)
    for shard_id in range(start, current.previous):
        _move_shard(client, keys, move, shard_id, shards)
        client.zadd(keys.layout, {"moved": shard_id + 1}, gt=True)
        if progress:
            progress(shard_id + 1, current.previous)
    client.zrem(keys.layout, "moved")
    return read_layout(client, keys)


def _start(client: redis.Redis, keys: Keys, current: Layout, shards: int) -> None:
    """Record the new count, atomically with a check that nobody changed it meanwhile."""
    with client.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(keys.layout)  # type: ignore[no-untyped-call]
            if read_layout(pipe, keys) != current:
                raise InvalidInput("the layout changed while the resize started: run it again")
            pipe.multi()
            pipe.zadd(keys.layout, {"shards": shards, "previous": current.shards, "moved": 0})
            pipe.execute()
        except redis.WatchError:
            raise InvalidInput(
                "the layout changed while the resize started: run it again"
            ) from None


def _move_shard(
    client: redis.Redis, keys: Keys, move: redis.commands.core.Script, shard_id: int, shards: int
) -> None:
    """Move the entries of old shard `shard_id` that belong elsewhere, until a read of it
    finds none (a producer of 0.2 still running would keep adding some: see `reshard`)."""
    name = f"{keys.shard_prefix}{shard_id}"
    for _ in range(3):
        members = [str(m) for m in client.zrange(name, 0, -1)]
        away = [(m, h) for m in members if (h := key_hash(m)) % shards != shard_id]
        if not away:
            return
        for i in range(0, len(away), MOVE_CHUNK):
            args: list[str | int] = [keys.shard_prefix, shard_id, shards]
            for member, h in away[i : i + MOVE_CHUNK]:
                args += [member, h]
            move(keys=[keys.heads, keys.layout], args=args)


__all__ = [
    "MAX_SHARDS",
    "SHARDS",
    "check_shape",
    "check_target",
    "index_figures",
    "read_layout",
    "reshard",
    "suggested_shards",
]
