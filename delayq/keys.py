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
    def claims(self) -> str:
        """ZSET firing id -> lease deadline (ms): every firing claimed and not yet
        acknowledged, or waiting for a retry. Keyed by firing (timer key and due time), so
        a timer rescheduled while one of its firings is being applied has two, and the
        acknowledgement of one never touches the other."""
        return self._k("claims")

    @property
    def claims_per_key(self) -> str:
        """HASH timer key -> how many of its firings are in `claims`: what cancel looks at
        to tell whether a firing of the timer may still apply."""
        return self._k("claims:keys")

    @property
    def inflight(self) -> str:
        """Before firing ids (0.1): ZSET timer key -> lease deadline. Listeners drain what
        older listeners left there once its lease runs out, so a rolling upgrade loses
        nothing; nothing new is written to it."""
        return self._k("inflight")

    @property
    def inflight_due(self) -> str:
        """Before firing ids (0.1): HASH timer key -> due time of the firing in `inflight`."""
        return self._k("inflight:due")

    @property
    def attempts(self) -> str:
        """HASH firing id -> failed attempts of that firing."""
        return self._k("attempts")

    @property
    def dead(self) -> str:
        """HASH firing id -> JSON {timer, due_ms, attempts, error, dead_ms}: given up on,
        kept for `delayq retry-dead`. (Fields written before firing ids are timer keys.)"""
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
        """Published by Redis when a TTL key is deleted for having expired (flags `Ex`)."""
        return f"__keyevent@{self.db}__:expired"

    @property
    def expire_channel(self) -> str:
        """Published by Redis when a TTL is set (SETEX, SET PX, EXPIRE...; flags `Eg`): how
        timers armed by producers that do not use delayq are adopted the moment they are set."""
        return f"__keyevent@{self.db}__:expire"

    @property
    def del_channel(self) -> str:
        """Published by Redis on DEL (flags `Eg`): a legacy producer disarming its timer."""
        return f"__keyevent@{self.db}__:del"

    def is_own(self, key: str) -> bool:
        """One of delayq's own keys (never a timer)."""
        return key.startswith(f"{{{self.namespace}}}:")


def firing_id(key: str, due_ms: int) -> str:
    """A firing: one timer falling due at one time. `SN1:cancel@1767225600000`."""
    return f"{key}@{due_ms}"


def parse_firing_id(firing: str) -> tuple[str, int]:
    """(timer key, due ms) of a firing id."""
    key, sep, due = firing.rpartition("@")
    if not sep or not due.isdigit():
        raise InvalidInput(f"not a firing id: {firing!r}")
    return key, int(due)


def checked_db(db: int) -> int:
    if not 0 <= db <= 15_999:
        raise InvalidInput(f"invalid Redis DB number {db}")
    return db
