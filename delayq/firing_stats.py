"""Firings per minute and their lateness over the last hour, shared by every listener: the
data of the dashboard's chart.

Each listener adds each acknowledged batch to its minute's hash in Redis
(`{ns}:stats:MINUTE`, Keys.firing_stats): `n` firings settled, `l` of them applied with
a lateness, and `bI` a histogram of those latenesses. On one Redis the batch's ack script
writes it (ack.lua, best effort); on a cluster, where the hash lives in the namespace's
own slot, a record_firings.lua call in the same round as the acks. The hot path gains no
round trip. The hashes expire after KEEP_MS.

Percentiles come from the histogram: bucket 0 holds 0-1 ms, bucket i (1..40) holds
(2^((i-1)/2), 2^(i/2)] ms, the last bucket everything over 2^20 ms (~17.5 min). A
percentile is interpolated linearly within its bucket, so it is off by less than the
bucket's width: at most 1 ms below 1 ms, else at most 41% of the true value (buckets are
powers of the square root of two), and "at least 17.5 min" beyond the last bound.

Minutes are the listeners' clocks (time.time()): hosts a few ms apart put a batch near a
minute's edge into one minute or the next.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import redis

from delayq.keys import Keys
from delayq.timing import from_ms

MINUTE_MS = 60_000
#: Minutes a hash is kept: the chart shows one hour; the second covers clock skew and a
#: page opened at a minute's edge.
KEEP_MS = 2 * 3600 * 1000
#: Upper bounds (ms) of the histogram's buckets; the last bucket is everything beyond.
BOUNDS = tuple(2 ** (i / 2) for i in range(41))
FIELDS = ("n", "l", *(f"b{i}" for i in range(len(BOUNDS) + 1)))


def bucket_of(lateness_ms: float) -> int:
    """The histogram bucket of a lateness (early counts as 0)."""
    if lateness_ms <= 1:
        return 0
    i = math.ceil(2 * math.log2(lateness_ms))
    # Guard the float edge (log2 of an exact bound rounding up).
    if i > 0 and lateness_ms <= BOUNDS[min(i - 1, len(BOUNDS) - 1)]:
        i -= 1
    return min(i, len(BOUNDS))


def record_call(
    keys: Keys, settled: int, lateness_ms: Sequence[float], now_ms: float | None = None
) -> tuple[list[str], list[Any]]:
    """The record_firings.lua call (keys, args) for one batch: `settled` firings, of which
    those applied had these latenesses."""
    now = time.time() * 1000 if now_ms is None else now_ms
    counts: dict[str, int] = {"n": settled, "l": len(lateness_ms)}
    for ms in lateness_ms:
        field = f"b{bucket_of(ms)}"
        counts[field] = counts.get(field, 0) + 1
    args: list[Any] = [KEEP_MS]
    for field, n in counts.items():
        if n:
            args += [field, n]
    return [keys.firing_stats(int(now // MINUTE_MS))], args


def percentile(histogram: Sequence[int], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) of a histogram of BOUNDS's buckets, interpolated within
    its bucket; None when it is empty."""
    total = sum(histogram)
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for i, n in enumerate(histogram):
        if n and seen + n >= rank:
            if i == len(BOUNDS):
                return BOUNDS[-1]  # beyond the last bound: "at least"
            low = 0.0 if i == 0 else BOUNDS[i - 1]
            return low + (BOUNDS[i] - low) * (rank - seen) / n
        seen += n
    return BOUNDS[-1]


def last_hour(client: redis.Redis, keys: Keys, now_ms: int | None = None) -> list[dict[str, Any]]:
    """The last 60 minutes, the current one last: {"minute": ISO time of its start,
    "fired", "p50_ms", "p99_ms"} (percentiles None for a minute without an applied
    firing; see the module docstring for their error). One pipelined read of 60 HMGETs."""
    now = time.time() * 1000 if now_ms is None else now_ms
    current = int(now // MINUTE_MS)
    minutes = range(current - 59, current + 1)
    pipe = client.pipeline(transaction=False)
    for minute in minutes:
        pipe.hmget(keys.firing_stats(minute), list(FIELDS))
    rows = []
    for minute, values in zip(minutes, pipe.execute(), strict=True):
        counts = [int(v or 0) for v in values]
        histogram = counts[2:]
        p50, p99 = percentile(histogram, 0.5), percentile(histogram, 0.99)
        rows.append(
            {
                "minute": from_ms(minute * MINUTE_MS).isoformat(),
                "fired": counts[0],
                "p50_ms": None if p50 is None else round(p50, 2),
                "p99_ms": None if p99 is None else round(p99, 2),
            }
        )
    return rows
