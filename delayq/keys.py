"""Every Redis key and channel name delayq uses, built in one place.

Timer keys are the card's contract: `ORDER_SN:ACTION` with a TTL, no prefix, so that
existing producers' `SETEX SN123:cancel 1200 x` keys are understood. delayq's own keys
carry a hash tag in braces (`{delayq}:due:7`): braces can never appear in an order id, so
they never look like timers.

On one Redis the tag is the namespace and one *partition* holds every timer. In a Redis
Cluster each hash slot is a partition of its own, tagged so that its keys live in the same
slot as the timer keys they index (`{delayq:1234}:due:0`, see delayq/cluster/slots.py): a
script touches a timer key and its index in one slot, and the timers spread over the
primaries exactly as the cluster's slots do.
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
#: big sorted set. It is the count of a namespace never resized, and the only one delayq
#: 0.2 knows; `delayq reshard` grows a namespace's count, kept in Redis (Layout).
SHARDS = 16384


def key_hash(key: str) -> int:
    """The CRC-32 of a timer key: its shard under any shard count is this modulo the count.
    Scripts are given the hash and take the modulo of the count Redis holds (Layout)."""
    return zlib.crc32(key.encode())


def shard_of(key: str, shards: int = SHARDS) -> int:
    """The index shard of a timer key: a pure function of the key, so cancelling or moving
    a timer finds its entry without knowing its due time."""
    return key_hash(key) % shards if shards > 1 else 0


@dataclass(frozen=True)
class Layout:
    """How many shards a namespace's due index has (delayq/layout.py keeps it in Redis).

    Writes put a timer's entry in shard `hash % shards`; until a resize has moved it, an
    entry written before the resize is in `hash % previous` (`shards` is a multiple of
    `previous`, so that shard's number is the new one's modulo `previous`). Scripts read
    the layout themselves, in the same atomic step as the entry, so a resize that starts
    while a client runs is never missed."""

    shards: int = SHARDS
    #: The count before the last resize (equal to `shards` if there was none).
    previous: int = SHARDS
    #: While a resize is under way: how many of the `previous` shards it has moved.
    moved: int | None = None

    def shards_of(self, key: str) -> tuple[int, ...]:
        """The shards `key`'s entry may be in: where writes put it first."""
        h = key_hash(key)
        home, before = h % self.shards, h % self.previous
        return (home,) if home == before else (home, before)


def parse_timer_key(key: str) -> tuple[str, str]:
    """Split a timer key into (order_sn, action); raises InvalidInput if it is not one."""
    order_sn, sep, action = key.rpartition(":")
    if not sep or not ORDER_SN_RE.fullmatch(order_sn) or not ACTION_RE.fullmatch(action):
        raise InvalidInput(f"not a timer key: {key!r}")
    return order_sn, action


@dataclass(frozen=True)
class Keys:
    """delayq's own keys in one partition of a namespace, and the keyspace channels of the
    timer DB."""

    namespace: str = "delayq"
    db: int = 0
    #: The hash tag of this partition's keys: the namespace on one Redis; in a cluster, the
    #: tag of one hash slot (delayq.cluster.slots.partition_keys).
    tag: str = ""
    #: The cluster hash slot this partition lives in, or None on one Redis.
    slot: int | None = None
    #: How many index shards this partition has (one per slot in a cluster: a slot's
    #: share of the timers is small, and it keeps every call within the slot).
    shards: int = SHARDS

    def __post_init__(self) -> None:
        if not self.tag:
            object.__setattr__(self, "tag", self.namespace)

    def _k(self, name: str) -> str:
        return f"{{{self.tag}}}:{name}"

    def shard_id(self, key: str) -> int:
        """The shard of this partition that indexes `key`."""
        return shard_of(key, self.shards)

    @property
    def shard_prefix(self) -> str:
        """Shard n of the due index is `{shard_prefix}n`: a ZSET timer key -> due time (ms).
        Together the shards hold every pending timer: the source of truth."""
        return self._k("due:")

    def shard(self, key: str) -> str:
        return f"{self.shard_prefix}{self.shard_id(key)}"

    def shards_of(self, key: str, layout: Layout) -> list[str]:
        """The shard keys that may hold `key`'s entry under `layout` (delayq.layout)."""
        if self.slot is not None:
            return [self.shard(key)]
        return [f"{self.shard_prefix}{n}" for n in layout.shards_of(key)]

    @property
    def layout(self) -> str:
        """ZSET `shards` -> shard count, `previous` -> count before the last resize,
        `moved` -> shards moved by a resize under way (delayq.layout). Absent: SHARDS, never
        resized. Named among the shards (`due:layout`) so that the ACLs written for 0.2,
        which grant `~{ns}:due:*` with sorted-set commands, let every client read it. A
        cluster partition has no layout (one shard per slot): ''."""
        return "" if self.slot is not None else self._k("due:layout")

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
    def dead_index(self) -> str:
        """ZSET dead letter field -> due ms: the dead letters in a stable order, for paging
        through them (delayq.browse). Kept by every script that writes or removes `dead`."""
        return self._k("dead:due")

    def firing_stats(self, minute: int) -> str:
        """HASH of one minute's firings (minute = epoch ms // 60,000): counts and a lateness
        histogram, written by every listener (delayq.firing_stats). Tagged with the
        namespace, as `listeners` is, so that a cluster keeps them on one node."""
        return f"{{{self.namespace}}}:stats:{minute}"

    @property
    def recent(self) -> str:
        """ZSET timer key -> ms: fired or cancelled lately, so a late keyspace event for it
        is not mistaken for a legacy timer and fired twice."""
        return self._k("recent")

    @property
    def listeners(self) -> str:
        """ZSET listener id -> last heartbeat (ms): who is alive (one per namespace, also
        in a cluster)."""
        return f"{{{self.namespace}}}:listeners"

    @property
    def wake_channel(self) -> str:
        """Published when a timer is scheduled earlier than every pending one of its
        partition. In a cluster the slot is in the name (`{delayq}:wake:1234`), so that
        listeners know which slot to look at."""
        base = f"{{{self.namespace}}}:wake"
        return base if self.slot is None else f"{base}:{self.slot}"

    @property
    def wake_pattern(self) -> str:
        """The pattern of every partition's wake channel in a cluster."""
        return f"{{{self.namespace}}}:wake:*"

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
        """One of delayq's own keys (never a timer), on one Redis or in a cluster."""
        return key.startswith((f"{{{self.namespace}}}:", f"{{{self.namespace}:"))


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
