"""Redis memory per pending timer as the due index grows (issue 13).

A private redis-server (a free port, a temporary directory, stock settings but for
`--notify-keyspace-events Egx --save "" --appendonly no`; stopped at the end) is loaded
with --pending far-future timers exactly as `delayq bench` preloads them
(Producer.schedule_many; 29-character keys `FAR%026d:cancel`, due a day ahead and then
100 ms apart). Reported: `used_memory` per timer (after minus before, over the timers),
the index's shard count and how full its shards are, and the encoding mix of a sample of
shards (`OBJECT ENCODING`: listpack up to zset-max-listpack-entries, 128 by default;
skiplist past it, ~100 B more a timer).

--fixed-cost also measures what one shard costs by itself (its key, its `heads` entry):
timers are written one to a shard into as many shards, then a second one into each of the
same shards; the difference between the two rounds, per shard, is the shard's own cost.

    python benchmarks/memory_scale.py --pending 1000000
    python benchmarks/memory_scale.py --pending 10000000 --json-file mem-10m.json
    python benchmarks/memory_scale.py --pending 10000000 --shards 131072
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis

from delayq import bench
from delayq.keys import Keys, shard_of
from delayq.layout import listpack_entries, read_layout, reshard
from delayq.producer import Producer

#: Timers per schedule_many call while loading.
LOAD_CHUNK = 50_000
#: Shards whose encoding is asked (OBJECT ENCODING), chosen at random.
ENCODING_SAMPLE = 2_000
#: Shards measured for the fixed cost of a shard.
FIXED_SHARDS = 4_096
#: ZCARDs per pipeline when reading every shard's size.
ZCARD_CHUNK = 10_000


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def load(client: redis.Redis, keys: Keys, pending: int) -> float:
    """The far-future timers `delayq bench` preloads; returns the seconds it took."""
    producer = Producer(client, keys)
    started = time.perf_counter()
    for start in range(0, pending, LOAD_CHUNK):
        n = min(LOAD_CHUNK, pending - start)
        producer.schedule_many(bench.far_timers(start, n))
        if start and start % 1_000_000 == 0:
            print(f"  {start:,} loaded", flush=True)
    return time.perf_counter() - started


def shard_sizes(client: redis.Redis, keys: Keys, shards: int) -> list[int]:
    """ZCARD of every shard of the index."""
    sizes: list[int] = []
    for start in range(0, shards, ZCARD_CHUNK):
        pipe = client.pipeline(transaction=False)
        for n in range(start, min(start + ZCARD_CHUNK, shards)):
            pipe.zcard(f"{keys.shard_prefix}{n}")
        sizes += [int(s) for s in pipe.execute()]
    return sizes


def encodings(client: redis.Redis, keys: Keys, sizes: list[int]) -> dict[str, int]:
    """OBJECT ENCODING of a random sample of the non-empty shards."""
    used = [n for n, size in enumerate(sizes) if size]
    sample = random.Random(13).sample(used, min(ENCODING_SAMPLE, len(used)))
    pipe = client.pipeline(transaction=False)
    for n in sample:
        pipe.object("encoding", f"{keys.shard_prefix}{n}")
    return dict(Counter(str(e) for e in pipe.execute()))


def fixed_cost(client: redis.Redis, keys: Keys) -> dict[str, float]:
    """Bytes of one shard by itself (key, heads entry), and of a second timer in it: in a
    namespace of its own, whose shards are all empty to begin with."""
    first: dict[int, str] = {}
    second: dict[int, str] = {}
    j = 0
    while len(second) < FIXED_SHARDS:
        key = f"FIX{j:026d}:cancel"
        j += 1
        n = shard_of(key, keys.shards)
        if n not in first:
            first[n] = key
        elif n not in second:
            second[n] = key
    shards = list(second)
    rounds = []
    for picked in (first, second):
        before = used_memory(client)
        Producer(client, keys).schedule_many(
            [(picked[n].split(":")[0], timedelta(days=2)) for n in shards]
        )
        rounds.append((used_memory(client) - before) / len(shards))
    return {
        "first_timer_in_a_shard_b": round(rounds[0], 1),
        "second_timer_in_a_shard_b": round(rounds[1], 1),
        "shard_own_cost_b": round(rounds[0] - rounds[1], 1),
    }


def measure(pending: int, *, fixed: bool, shards: int | None) -> dict[str, Any]:
    with bench.scratch_redis(None) as url:
        client = redis.Redis.from_url(url, decode_responses=True)
        keys = Keys()
        entries = listpack_entries(client)
        before = used_memory(client)
        if shards:
            # As `delayq bench --shards` does: grown while empty, counted in the figure.
            reshard(client, keys, shards)
        layout = read_layout(client, keys)
        load_s = load(client, keys, pending)
        after = used_memory(client)
        sizes = shard_sizes(client, keys, layout.shards)
        used = [s for s in sizes if s]
        report: dict[str, Any] = {
            "pending": pending,
            "redis_version": client.info("server")["redis_version"],
            "zset_max_listpack_entries": entries,
            "shards": layout.shards,
            "load_s": round(load_s, 1),
            "schedule_rate_per_s": round(pending / load_s) if load_s else None,
            "used_memory_mb": round(after / 2**20),
            "bytes_per_timer": round((after - before) / pending, 1) if pending else None,
            "shard_size": {
                "mean": round(sum(used) / len(sizes), 1),
                "max": max(used, default=0),
                "over_listpack": sum(1 for s in used if s > entries),
            },
            "encoding_sample": encodings(client, keys, sizes),
        }
        if fixed:
            report["fixed_cost"] = fixed_cost(client, Keys(namespace="fixed-cost"))
        client.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pending", type=int, default=1_000_000)
    parser.add_argument("--fixed-cost", action="store_true", help="measure a shard's own cost")
    parser.add_argument("--shards", type=int, help="grow the index to this many shards first")
    parser.add_argument("--json-file", type=Path)
    args = parser.parse_args()
    report = {
        "machine": bench.machine_info(),
        **measure(args.pending, fixed=args.fixed_cost, shards=args.shards),
    }
    print(json.dumps(report, indent=2), flush=True)
    if args.json_file:
        args.json_file.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
