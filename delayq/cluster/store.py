"""ClusterStore: the TimerStore of a Redis Cluster.

Every method does what TimerStore's does, with the same scripts, one call per slot: a
slot's partition (delayq.cluster.slots) holds the index, claims and dead letters of the
timers that hash to it. Calls of many slots go out pipelined per primary (router.py).

There is no global order of due times across slots (no script may touch two slots), so
each listener keeps a *due view*: each slot's next due time or lease end, as last seen.
It is kept current by

* the replies of the claims themselves (each returns its slot's next wake-up),
* wake-ups: a schedule that becomes its slot's earliest publishes on `{ns}:wake:SLOT`,
* a full read of every slot's heads and leases at start-up, after a topology change or a
  lost subscription (when wake-ups may have been missed), and every REFRESH_S (which
  also finds firings whose lease another listener let run out).

The claimer asks only the slots whose time has come; a wake-up lost between two full
reads would be noticed at the latest by the next one, and the timer's own `expired`
event is a second net.

A failover can lose the last writes a primary acknowledged (replication is
asynchronous): an acknowledgement, or even a claim. A firing whose claim was lost comes
back as due and would be applied a second time, so in a cluster every firing is treated
as possibly applied before: the applier looks for its outcome first (one SELECT per
batch), and a recorded one is acknowledged, not applied again.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from importlib.resources import files
from itertools import islice
from typing import Any, TypeVar

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script

from delayq.cluster.router import Call, Router, read_only_script, slots_by_primary
from delayq.cluster.slots import SLOTS, partition, slot_of
from delayq.keys import Keys, parse_firing_id
from delayq.redis_conn import Scripts
from delayq.store import (
    BULK_PIPELINE_DEPTH,
    REQUEUE_CHUNK,
    Claim,
    Firing,
    Timer,
    TimerState,
    TimerStore,
    ack_call,
    adopt_call,
    cancel_call,
    claim_due_call,
    claim_expired_call,
    forget_call,
    release_call,
    renew_call,
    retry_dead_call,
    retry_later_call,
    schedule_call,
)

log = logging.getLogger("delayq.cluster")

T = TypeVar("T")
#: What the store's `*_call` helpers return: a script's keys and arguments.
Built = tuple[list[str], list[Any]]

#: Seconds between full reads of every slot's next due time and lease end.
REFRESH_S = 5.0
#: Slots claimed from per round (each round: one pipelined call per primary).
SLOTS_PER_ROUND = 64
#: A slot whose claim failed (its primary is down) is asked again after this long.
FAILED_SLOT_RETRY_MS = 500
#: Slots read per pipeline in a full refresh.
REFRESH_CHUNK = 2048
#: Slots read per peek_slots.lua call (well under a millisecond of the node's time).
PEEK_CHUNK = 256


class DueView:
    """Each slot's next wake-up (due time or lease end, in Redis ms), as last seen; the
    earliest first. Thread-safe."""

    def __init__(self) -> None:
        self._next: dict[int, int] = {}
        self._heap: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        #: Bumped by every change; each slot's entry remembers the count it was made at.
        self._version = 0
        self._changed: dict[int, int] = {}

    def set(self, slot: int, ms: int) -> None:
        """The slot's next wake-up is `ms` (-1: nothing pending or claimed)."""
        with self._lock:
            self._set(slot, ms)

    def _set(self, slot: int, ms: int) -> None:
        self._version += 1
        self._changed[slot] = self._version
        if ms < 0:
            self._next.pop(slot, None)
            return
        if self._next.get(slot) != ms:
            self._next[slot] = ms
            heapq.heappush(self._heap, (ms, slot))

    def lower(self, slot: int, ms: int) -> None:
        """Something in the slot is due at `ms` (a wake-up): keep the earlier time."""
        with self._lock:
            current = self._next.get(slot)
            if current is None or ms < current:
                self._set(slot, ms)

    def mark(self) -> int:
        """A point in the view's changes, to give to replace()."""
        with self._lock:
            return self._version

    def replace(
        self, wakeups: dict[int, int], read: Collection[int] | None = None, since: int = 0
    ) -> None:
        """A full read, begun at mark() `since`, of the slots in `read` (default: all):
        for them the view becomes exactly `wakeups`, except that what changed since the
        read began (a claim's reply, a wake-up) and earlier times are kept; slots not
        read keep what the view had."""
        with self._lock:
            merged = {s: ms for s, ms in wakeups.items() if ms >= 0}
            for slot, ms in self._next.items():
                unread = read is not None and slot not in read
                newer = self._changed.get(slot, 0) > since
                if unread or newer or (slot in merged and ms < merged[slot]):
                    merged[slot] = ms
            for slot, version in self._changed.items():
                if version > since and slot not in self._next:
                    merged.pop(slot, None)  # claimed empty, or taken, since the read began
            self._next = merged
            self._heap = [(ms, s) for s, ms in merged.items()]
            heapq.heapify(self._heap)

    def take_due(self, now_ms: int, limit: int) -> list[int]:
        """Up to `limit` slots due by `now_ms`, earliest first; they leave the view until
        their claim says when they are next due."""
        out: list[int] = []
        with self._lock:
            while self._heap and len(out) < limit:
                ms, slot = self._heap[0]
                if self._next.get(slot) != ms:
                    heapq.heappop(self._heap)  # superseded
                    continue
                if ms > now_ms:
                    break
                heapq.heappop(self._heap)
                del self._next[slot]
                self._version += 1
                self._changed[slot] = self._version
                out.append(slot)
        return out

    def earliest(self) -> int:
        """The earliest wake-up (ms), or -1 when nothing is known to be pending."""
        with self._lock:
            while self._heap and self._next.get(self._heap[0][1]) != self._heap[0][0]:
                heapq.heappop(self._heap)
            return self._heap[0][0] if self._heap else -1

    def __len__(self) -> int:
        return len(self._next)


class ClusterStore:
    """delayq's partitions across a Redis Cluster, driven through the scripts. Thread-safe."""

    def __init__(
        self,
        client: RedisCluster,
        keys: Keys,
        scripts: Scripts | None = None,
        *,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self.client = client
        self.keys = keys
        self.scripts = scripts or Scripts.register(client)  # type: ignore[arg-type]
        self.router = Router(client, wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms)
        self.wait_replicas = wait_replicas
        self.view = DueView()
        self._refreshed_at = float("-inf")
        self._refresh_requested = True
        self._refresher: threading.Thread | None = None
        #: Redis's clock minus this host's (ms), as the last claim saw it.
        self._clock_offset_ms = 0.0
        #: Primaries whose slots could not be claimed from lately: name -> error.
        self.failing: dict[str, str] = {}
        #: The sweep's pass: each primary not yet scanned to the end, and its cursor.
        self._sweep: dict[str, tuple[ClusterNode, int]] | None = None
        self._sweep_turn = 0
        lua = files("delayq") / "lua"
        self._peek_script = read_only_script(client, "peek_slots")
        self._adopt_node_script = client.register_script(
            "#!lua flags=allow-cross-slot-keys\n"
            + (lua / "_clock.lua").read_text()
            + (lua / "_prelude.lua").read_text()
            + (lua / "adopt_node.lua").read_text()
        )

    # -- partitions ----------------------------------------------------------------------

    def partition(self, slot: int) -> Keys:
        return partition(self.keys.namespace, self.keys.db, slot)

    def partition_of(self, key: str) -> Keys:
        return self.partition(slot_of(key))

    def _calls(
        self, script: Script, groups: dict[int, list[T]], build: Callable[[Keys, list[T]], Built]
    ) -> list[Call]:
        """One call of `script` per slot, its keys and arguments built for the slot's
        partition from the slot's group (`build(partition, group)`)."""
        return [Call(s, script, *build(self.partition(s), g)) for s, g in groups.items()]

    def _per_slot(self, items: Iterable[T], key: Callable[[T], str]) -> dict[int, list[T]]:
        groups: dict[int, list[T]] = defaultdict(list)
        for item in items:
            groups[slot_of(key(item))].append(item)
        return groups

    # -- producers -----------------------------------------------------------------------

    def schedule(self, timers: Sequence[Timer]) -> list[int]:
        """Arm or move timers. Returns each due time (epoch ms), in order."""
        order = {t[0]: i for i, t in enumerate(timers)}
        groups = self._per_slot(timers, lambda t: t[0])
        calls = self._calls(self.scripts.schedule, groups, schedule_call)
        replies = self.router.run(calls, wait=bool(self.wait_replicas))
        due = [0] * len(timers)
        for group, reply in zip(groups.values(), replies, strict=True):
            for (key, _, _), ms in zip(group, reply, strict=True):
                due[order[key]] = int(ms)
        return due

    def schedule_bulk(self, chunks: Iterable[Sequence[Timer]]) -> None:
        """Schedule many timers: for each BULK_PIPELINE_DEPTH chunks, one call per slot,
        pipelined per primary."""
        rounds = iter(chunks)
        while batch := list(islice(rounds, BULK_PIPELINE_DEPTH)):
            groups = self._per_slot((t for chunk in batch for t in chunk), lambda t: t[0])
            calls = self._calls(self.scripts.schedule, groups, schedule_call)
            self.router.run(calls, wait=bool(self.wait_replicas))

    def cancel(self, key: str) -> int:
        """As TimerStore.cancel."""
        slot = slot_of(key)
        call = Call(slot, self.scripts.cancel, *cancel_call(self.partition(slot), [key]))
        return int(self.router.run([call], wait=bool(self.wait_replicas))[0][0])

    # -- listeners: claiming -------------------------------------------------------------

    def request_refresh(self) -> None:
        """Wake-ups may have been missed (a subscription was lost or the topology
        changed): read every slot's next wake-up before the next claim."""
        self._refresh_requested = True

    def note_wake(self, channel: str, payload: str) -> None:
        """A wake-up published on a slot's channel: something there is due at `payload`."""
        try:
            slot = int(channel.rpartition(":")[2])
            due = int(float(payload))
        except ValueError:
            return
        if 0 <= slot < SLOTS:
            self.view.lower(slot, due)

    def now_ms(self) -> int:
        """Redis's clock (ms), estimated from this host's and the last claim's offset."""
        return int(time.time() * 1000 + self._clock_offset_ms)

    def claim_due(self, limit: int, lease_ms: int, ahead_ms: int = 0) -> Claim:
        """Claim up to about `limit` firings from the slots the view says are due (or due
        within `ahead_ms`: the caller holds those until they are due)."""
        self._refresh_in_background()
        now = self.now_ms()
        slots = self.view.take_due(now + ahead_ms, SLOTS_PER_ROUND)
        if not slots:
            return Claim(float(now), self.view.earliest(), [])
        share = max(8, -(-limit // len(slots)))
        calls = [
            Call(
                slot,
                self.scripts.claim_due,
                *claim_due_call(self.partition(slot), share, lease_ms, ahead_ms),
            )
            for slot in slots
        ]
        replies = self.router.run(calls, retry_s=0.5, raise_on_error=False)
        firings: list[Firing] = []
        reclaimed_ids: list[str] = []
        errors: list[Exception] = []
        seen_now = 0.0
        for slot, reply in zip(slots, replies, strict=True):
            if isinstance(reply, Exception):
                errors.append(reply)
                self.view.set(slot, now + FAILED_SLOT_RETRY_MS)
                continue
            seen_now = max(seen_now, int(reply[0]) / 1000)
            self.view.set(slot, int(reply[1]))
            n = int(reply[2])
            ids = [str(fid) for fid in reply[3:]]
            reclaimed_ids += ids[:n]
            # Any firing may have been applied before a failover lost its claim: the
            # applier checks (see the module docstring).
            firings += [Firing.from_id(fid, reclaimed=True) for fid in ids]
        if seen_now:
            self._clock_offset_ms = seen_now - time.time() * 1000
        self._note_failures(slots, replies)
        if errors and not firings and len(errors) == len(slots):
            raise errors[0]
        if reclaimed_ids:
            attempts = self._failed_attempts(reclaimed_ids)
            firings = [Firing(f.key, f.due_ms, True, 1 + attempts.get(f.id, 0)) for f in firings]
        return Claim(seen_now or float(now), self.view.earliest(), firings)

    def _note_failures(self, slots: list[int], replies: list[Any]) -> None:
        failing: dict[str, str] = {}
        for slot, reply in zip(slots, replies, strict=True):
            if isinstance(reply, redis.RedisError):
                try:
                    name = self.router.primary_of(slot).name
                except Exception:
                    name = f"slot {slot}"
                failing[name] = str(reply).splitlines()[0] if str(reply) else type(reply).__name__
        for name, error in failing.items():
            if name not in self.failing:
                log.warning("claiming from %s failed: %s; its slots are retried", name, error)
        ok = set()
        for slot, reply in zip(slots, replies, strict=True):
            if not isinstance(reply, Exception):
                with contextlib.suppress(redis.RedisError, IndexError):
                    ok.add(self.router.primary_of(slot).name)
        for name in list(self.failing):
            if name in ok:
                del self.failing[name]
        self.failing.update(failing)

    def _failed_attempts(self, firing_ids: Sequence[str]) -> dict[str, int]:
        pipe = self.client.pipeline(transaction=False)  # type: ignore[no-untyped-call]
        for fid in firing_ids:
            pipe.hget(self.partition_of(parse_firing_id(fid)[0]).attempts, fid)
        return {fid: int(n or 0) for fid, n in zip(firing_ids, pipe.execute(), strict=True)}

    def _refresh_in_background(self) -> None:
        """Start a full read of the view when one is due, on a thread of its own: the
        claimer goes on claiming with the view it has meanwhile."""
        if not (self._refresh_requested or time.monotonic() - self._refreshed_at >= REFRESH_S):
            return
        if self._refresher is not None and self._refresher.is_alive():
            return
        self._refresh_requested = False
        self._refreshed_at = time.monotonic()
        self._refresher = threading.Thread(
            target=self._refresh_quietly, name="delayq-cluster-view", daemon=True
        )
        self._refresher.start()

    def _refresh_quietly(self) -> None:
        try:
            self.refresh_view()
        except Exception as exc:  # a thread of its own: log, and read again on the next claim
            self._refresh_requested = True
            log.warning("reading the due view failed: %s", exc)

    def refresh_view(self) -> None:
        """Read every slot's next due time and lease end: one read-only script per
        primary (peek_slots.lua), or, for a primary that refuses it (a slot migrating
        away, a server without script flags), two commands per slot."""
        self._refresh_requested = False
        self._refreshed_at = time.monotonic()
        wakeups: dict[int, int] = {}
        read: set[int] = set()
        since = self.view.mark()
        for node, slots in slots_by_primary(self.client).items():
            try:
                wakeups.update(self._peek(node, slots))
            except redis.RedisError as exc:
                log.debug("peeking at %s failed (%s); reading slot by slot", node.name, exc)
                try:
                    wakeups.update(self._read_slots(slots))
                except redis.RedisError as exc:
                    # That primary is down or failing over: its slots keep what the view
                    # had, and the next claim reads again. The others go on.
                    log.debug("reading the slots of %s failed: %s", node.name, exc)
                    self._refresh_requested = True
                    continue
            read.update(slots)
        self.view.replace(wakeups, read, since)

    def _peek(self, node: ClusterNode, slots: list[int]) -> dict[int, int]:
        """PEEK_CHUNK slots per script call: each holds the node ~1 ms."""
        client = self.router.node_client(node)
        found: dict[int, int] = {}
        for start in range(0, len(slots), PEEK_CHUNK):
            chunk = slots[start : start + PEEK_CHUNK]
            reply = self._peek_script(keys=[], args=self._peek_names(chunk), client=client)
            for i in range(0, len(reply), 2):
                found[chunk[int(reply[i]) - 1]] = int(reply[i + 1])
        return found

    def _peek_names(self, slots: list[int]) -> list[str]:
        names: list[str] = []
        for slot in slots:
            k = self.partition(slot)
            names += [k.heads, k.claims]
        return names

    def _read_slots(self, slots: Sequence[int]) -> dict[int, int]:
        wakeups: dict[int, int] = {}
        for start in range(0, len(slots), REFRESH_CHUNK):
            chunk = slots[start : start + REFRESH_CHUNK]
            pipe = self.client.pipeline(transaction=False)  # type: ignore[no-untyped-call]
            for slot in chunk:
                k = self.partition(slot)
                pipe.zrange(k.heads, 0, 0, withscores=True)
                pipe.zrange(k.claims, 0, 0, withscores=True)
            replies = pipe.execute()
            for i, slot in enumerate(chunk):
                times = [int(r[0][1]) for r in replies[2 * i : 2 * i + 2] if r]
                if times:
                    wakeups[slot] = min(times)
        return wakeups

    def claim_expired(self, timer_keys: Sequence[str], lease_ms: int) -> list[Firing]:
        groups = self._per_slot(timer_keys, str)
        calls = self._calls(
            self.scripts.claim_expired, groups, lambda k, g: claim_expired_call(k, g, lease_ms)
        )
        return [
            Firing.from_id(str(fid), reclaimed=True)
            for reply in self.router.run(calls)
            for fid in reply
        ]

    def adopt(self, timer_keys: Sequence[str]) -> int:
        return self._sum(self.scripts.adopt, adopt_call, timer_keys)

    def adopt_on_node(self, timer_keys: Sequence[str]) -> int:
        """adopt() for keys a SCAN step found on one node: one call per primary for all
        their slots (adopt_node.lua), slot by slot where a primary refuses it."""
        by_node: dict[str, tuple[ClusterNode, list[str]]] = {}
        for key in timer_keys:
            try:
                node = self.router.primary_of(slot_of(key))
            except (redis.RedisError, IndexError):
                continue  # no primary serves it now: the next pass finds it
            by_node.setdefault(node.name, (node, []))[1].append(key)
        n = 0
        for node, keys in by_node.values():
            args: list[str] = []
            for key in keys:
                k = self.partition_of(key)
                args += [key, k.heads, k.shard(key), k.wake_channel]
            try:
                client = self.router.node_client(node)
                n += int(self._adopt_node_script(keys=[], args=args, client=client))
            except redis.ResponseError:
                n += self.adopt(keys)  # a slot moving, or a refusal: the per-slot calls
        return n

    def forget(self, timer_keys: Sequence[str]) -> int:
        return self._sum(self.scripts.forget, forget_call, timer_keys)

    def _sum(
        self, script: Script, build: Callable[[Keys, list[str]], Built], timer_keys: Sequence[str]
    ) -> int:
        calls = self._calls(script, self._per_slot(timer_keys, str), build)
        return sum(int(r) for r in self.router.run(calls))

    def scan_timers(self, cursor: int, count: int) -> tuple[int, list[str]]:
        """One step of a SCAN over every primary, taking the primaries in turn step by
        step (so that each carries its share of the sweep all along): (0 when the pass
        over all of them is complete, else a positive token; the string keys that may
        be timers)."""
        if cursor == 0 or self._sweep is None:
            primaries = sorted(self.router.primaries(), key=lambda n: n.name)
            self._sweep = {n.name: (n, 0) for n in primaries}
            self._sweep_turn = 0
        if not self._sweep:
            self._sweep = None
            return 0, []
        names = sorted(self._sweep)
        name = names[self._sweep_turn % len(names)]
        self._sweep_turn += 1
        node, node_cursor = self._sweep[name]
        client = self.router.node_client(node)
        next_cursor, found = client.scan(node_cursor, count=count, _type="string")
        if int(next_cursor) == 0:
            del self._sweep[name]  # this primary's pass is complete
        else:
            self._sweep[name] = (node, int(next_cursor))
        keys = [str(k) for k in found if ":" in str(k) and not self.keys.is_own(str(k))]
        if not self._sweep:
            self._sweep = None
            return 0, keys
        return 1, keys

    # -- listeners: settling -------------------------------------------------------------

    def _by_firing_slot(self, firing_ids: Iterable[str]) -> dict[int, list[str]]:
        return self._per_slot(dict.fromkeys(firing_ids), lambda fid: parse_firing_id(fid)[0])

    def ack(
        self,
        firing_ids: Sequence[str],
        recent_window_ms: int,
        stats: tuple[list[str], list[Any]] | None = None,
    ) -> None:
        groups = self._by_firing_slot(firing_ids)
        calls = self._calls(self.scripts.ack, groups, lambda k, g: ack_call(k, g, recent_window_ms))
        if stats is None:
            self.router.run(calls)
            return
        # In the same round: one more call in the pipeline of the namespace's primary. The
        # chart's figures are best effort: only the acks' own errors are raised.
        calls.append(Call(slot_of(stats[0][0]), self.scripts.record_firings, *stats))
        for reply in self.router.run(calls, raise_on_error=False)[:-1]:
            if isinstance(reply, Exception):
                raise reply

    def retry_later(
        self,
        firing_ids: Sequence[str],
        *,
        max_attempts: int,
        backoff_ms: int,
        backoff_max_ms: int,
        error: str,
    ) -> int:
        groups = self._by_firing_slot(firing_ids)
        calls = self._calls(
            self.scripts.retry_later,
            groups,
            lambda k, g: retry_later_call(k, g, max_attempts, backoff_ms, backoff_max_ms, error),
        )
        dead = sum(int(r) for r in self.router.run(calls))
        # The retries come back when their backoff runs out: no sooner than this.
        for slot in groups:
            self.view.lower(slot, self.now_ms() + backoff_ms)
        return dead

    def release(self, firing_ids: Sequence[str]) -> None:
        """Hand firings back, and tell every listener their slots have something due."""
        groups = self._by_firing_slot(firing_ids)
        self.router.run(self._calls(self.scripts.release, groups, release_call))
        for slot in groups:
            self.client.publish(self.partition(slot).wake_channel, 0)

    def renew(self, firing_ids: Sequence[str], lease_ms: int) -> int:
        groups = self._by_firing_slot(firing_ids)
        calls = self._calls(self.scripts.renew, groups, lambda k, g: renew_call(k, g, lease_ms))
        return sum(int(r) for r in self.router.run(calls))

    def requeue_dead(self, names: Iterable[str] = ()) -> int:
        """As TimerStore.requeue_dead, slot by slot."""
        # Names are firing ids (`KEY@DUE`) or timer keys: each belongs to its key's slot.
        wanted = self._per_slot(names, lambda n: n.rpartition("@")[0] if "@" in n else n)
        n = 0
        for slot in sorted(wanted) if wanted else self._slots_with_dead():
            fields = self._slot_store(slot)._dead_fields(wanted.get(slot, []))
            while chunk := list(islice(fields, REQUEUE_CHUNK)):
                call = Call(
                    slot, self.scripts.retry_dead, *retry_dead_call(self.partition(slot), chunk)
                )
                n += int(self.router.run([call])[0])
        return n

    def _slots_with_dead(self) -> list[int]:
        found: list[int] = []
        for start in range(0, SLOTS, REFRESH_CHUNK):
            slots = range(start, min(start + REFRESH_CHUNK, SLOTS))
            pipe = self.client.pipeline(transaction=False)  # type: ignore[no-untyped-call]
            for slot in slots:
                pipe.hlen(self.partition(slot).dead)
            found += [s for s, n in zip(slots, pipe.execute(), strict=True) if n]
        return found

    def _slot_store(self, slot: int) -> TimerStore:
        """A TimerStore of one slot's partition, for reads routed by RedisCluster."""
        return TimerStore(self.client, self.partition(slot), self.scripts)  # type: ignore[arg-type]

    def timer_state(self, key: str) -> TimerState:
        return self._slot_store(slot_of(key)).timer_state(key)

    def pending_page(self, cursor: int) -> tuple[int, list[tuple[str, int]]]:
        """As TimerStore.pending_page, over hash slots: 256 slots' indexes a call,
        pipelined per primary by RedisCluster."""
        end = min(cursor + PEEK_CHUNK, SLOTS)
        pipe = self.client.pipeline()  # type: ignore[no-untyped-call]
        for slot in range(cursor, end):
            pipe.zrange(f"{self.partition(slot).shard_prefix}0", 0, -1, withscores=True)
        found = [(str(key), int(due)) for entries in pipe.execute() for key, due in entries]
        return (0 if end >= SLOTS else end), found

    def heartbeat(self, listener_id: str) -> None:
        slot = slot_of(self.keys.listeners)
        call = Call(slot, self.scripts.heartbeat, [self.keys.listeners], [listener_id])
        self.router.run([call], retry_s=0.5)

    def dead_letters(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every dead letter (field, entry), slot by slot."""
        for slot in self._slots_with_dead():
            for field, raw in self.client.hscan_iter(self.partition(slot).dead, count=1000):
                yield str(field), json.loads(raw)
