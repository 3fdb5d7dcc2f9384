"""The partitions of a cluster: one per hash slot, each tagged to live in its slot.

A timer key `SN123:cancel` hashes to slot s; slot s's partition keys carry a hash tag
whose own slot is s (`{delayq:5321}:due:0`), found once per process by trying tags
`NAMESPACE:0`, `NAMESPACE:1`, ... in order, so every producer and listener finds the same
tags. A script thus touches the timer key and its index in one slot: the card's plain
`ORDER_SN:ACTION` keys, written by any producer, stay exactly what they are.
"""

from __future__ import annotations

from binascii import crc_hqx
from functools import cache, lru_cache
from itertools import repeat

from redis.crc import key_slot

from delayq.keys import Keys

SLOTS = 16384
#: Candidate tags hashed per pass.
TAG_BLOCK = 200_000


def slot_of(key: str) -> int:
    """The cluster hash slot of a key (CRC16 of it, or of its {hash tag})."""
    return key_slot(key.encode())


@cache
def slot_tags(namespace: str) -> tuple[str, ...]:
    """For each slot, the first tag `NAMESPACE:n` that hashes to it: ~150,000 CRC16s,
    once per process (~60 ms, in blocks so the work runs in C). The tags hold no
    braces, so their slot is the CRC16 of the whole tag, as Redis computes it."""
    prefix = f"{namespace}:".encode()
    first: list[int] = [-1] * SLOTS
    start = 0
    while -1 in first:
        block = range(start, start + TAG_BLOCK)
        crcs = list(map(crc_hqx, (prefix + b"%d" % n for n in block), repeat(0)))
        # Backwards, so that the smallest n of each slot is written last.
        found = [-1] * SLOTS
        for n in reversed(block):
            found[crcs[n - start] % SLOTS] = n
        first = [old if old != -1 else new for old, new in zip(first, found, strict=True)]
        start += TAG_BLOCK
    return tuple(f"{namespace}:{n}" for n in first)


@lru_cache(maxsize=SLOTS * 2)
def partition(namespace: str, db: int, slot: int) -> Keys:
    """The keys of one slot's partition."""
    return Keys(namespace=namespace, db=db, tag=slot_tags(namespace)[slot], slot=slot, shards=1)


def partition_of(keys: Keys, timer_key: str) -> Keys:
    """The partition that indexes `timer_key`."""
    return partition(keys.namespace, keys.db, slot_of(timer_key))
