"""Every Redis key and channel name delayq uses, built in one place.

Timer keys are the card's contract: `ORDER_SN:ACTION` with a TTL, no prefix, so that
existing producers' `SETEX SN123:cancel 1200 x` keys are understood. delayq's own keys
carry the namespace in braces (`{delayq}:due`): braces can never appear in an order id,
so they never look like timers, and in Redis Cluster they share one hash slot.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from delayq.errors import InvalidInput
from delayq.timing import ACTION_RE, ORDER_SN_RE, validate_action, validate_order_sn


def timer_key(order_sn: str, action: str) -> str:
    """The TTL key of one timer: `ORDER_SN:ACTION`."""
    return f"{validate_order_sn(order_sn)}:{validate_action(action)}"


#: The due index is split into this many small sorted sets, by a hash of the timer key.
#: Small sets stay in Redis's compact listpack encoding (up to zset-max-listpack-entries,
#: 128 by default, so up to ~2M pending timers): ~45 bytes a timer instead of ~150 in one
#: big sorted set. Every producer and listener must agree on it: it is not a setting.
SHARDS = 16384


def shard_of(key: str) -> int:
    """The index shard of a timer key: a pure function of the key, so cancelling or moving
    a timer finds its entry without knowing its due time."""
    return zlib.crc32(key.encode()) % SHARDS


def parse_timer_key(key: str) -> tuple[str, str]:
    """Split a timer key into (order_sn, action); raises InvalidInput if it is not one."""
    order_sn, sep, action = key.rpartition(":")
    if not sep or not ORDER_SN_RE.fullmatch(order_sn) or not ACTION_RE.fullmatch(action):
        raise InvalidInput(f"not a timer key: {key!r}")
    return order_sn, action


@dataclass(frozen=True)
class Keys:
    """delayq's own keys in one namespace, and the keyspace channel of the timer DB."""

    namespace: str = "delayq"
    db: int = 0

    def _k(self, name: str) -> str:
        return f"{{{self.namespace}}}:{name}"

    @property
    def shard_prefix(self) -> str:
        """Shard n of the due index is `{shard_prefix}n`: a ZSET timer key -> due time (ms).
        Together the shards hold every pending timer: the source of truth."""
        return self._k("due:")

    def shard(self, key: str) -> str:
        return f"{self.shard_prefix}{shard_of(key)}"

    @property
    def heads(self) -> str:
        """ZSET shard number -> earliest due time in that shard: the global order."""
        return self._k("heads")

    @property
    def inflight(self) -> str:
        """ZSET timer key -> lease deadline (ms): claimed, or waiting for a retry."""
        return self._k("inflight")

    @property
    def inflight_due(self) -> str:
        """HASH timer key -> due time (ms) of the firing in flight."""
        return self._k("inflight:due")

    @property
    def attempts(self) -> str:
        """HASH timer key -> failed attempts of the firing in flight."""
        return self._k("attempts")

    @property
    def dead(self) -> str:
        """HASH timer key -> JSON {due_ms, attempts, error, dead_ms}: given up on, kept
        for `delayq retry-dead`."""
        return self._k("dead")

    @property
    def recent(self) -> str:
        """ZSET timer key -> ms: fired or cancelled lately, so a late keyspace event for it
        is not mistaken for a legacy timer and fired twice."""
        return self._k("recent")

    @property
    def listeners(self) -> str:
        """ZSET listener id -> last heartbeat (ms): who is alive."""
        return self._k("listeners")

    @property
    def wake_channel(self) -> str:
        """Published when a timer is scheduled earlier than every pending one."""
        return self._k("wake")

    @property
    def expired_channel(self) -> str:
        return f"__keyevent@{self.db}__:expired"


def checked_db(db: int) -> int:
    if not 0 <= db <= 15_999:
        raise InvalidInput(f"invalid Redis DB number {db}")
    return db
