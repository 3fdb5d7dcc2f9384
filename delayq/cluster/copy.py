"""`delayq copy-timers`: copy the timers of one Redis into another, usually a cluster.

Read from the source, in its single-node layout (delayq/keys.py), and written into the
target through its store (a ClusterStore for a cluster: each timer into the partition
of its slot):

* **pending timers**, every entry of the due index shards `{ns}:due:N` that `{ns}:heads`
  names: scheduled on the target at the same due time ('at', epoch ms), or, for one whose
  TTL key was re-armed (SETEX, EXPIRE) after it was indexed and no listener heard it, at
  its expiry time, as the source's listener would have moved it;
* **legacy TTL keys** that were never indexed (set by producers that do not use delayq
  while no listener heard their 'expire' event): scheduled at their expiry time
  (PEXPIRETIME), as the source's listener would have adopted them. What counts as one
  is what the listener's sweep adopts: a string key with a TTL and a `:` in its name
  that is not one of delayq's own;
* **in-flight firings**, claimed and not acknowledged (`{ns}:claims`, and the in-flight
  set of listeners before 0.2): added to the target's claims set with the same lease
  and failed attempts (delayq/lua/copy_in.lua), so that a listener takes each over when
  its lease ends, as a reclaimed firing, whose outcome it looks for first; a firing is
  kept apart from a newer pending schedule of the same timer, as in the source;
* **dead letters**, unchanged, into the dead hash of the target partition.

Everything is read and written in chunks of CHUNK entries, one pipelined round trip
each, so neither Redis is held for long and memory stays flat.

Running it again copies only what is new, and never undoes what happened on the target
since, so it can run before and after producers switch. Each entry is either copied, or
*already there*: the target has it as the source does (pending at the same time, the
firing claimed, the dead letter), or an earlier run copied it (each partition remembers
what was copied into it for two days, in a hash of 64-bit digests, ~26 bytes a timer:
`copied_hash`), so that what the target has since fired, cancelled or moved is not
brought back; or *kept as the target has it*: pending there at another time, armed there
with another TTL, or fired or cancelled there since its due time (the partition's
`recent` tombstones) by producers that wrote to the target directly. A timer an earlier
run copied that is pending at that same time on the target but moved in the source since
is moved on the target too: the latest change wins, wherever it was made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from itertools import islice
from typing import Any, TypeVar

import redis
from redis.cluster import ClusterNode
from redis.commands.core import Script

from delayq.cluster.router import Call
from delayq.cluster.slots import partition_of, slot_of
from delayq.cluster.store import ClusterStore
from delayq.cluster.url import is_cluster_url
from delayq.errors import InvalidInput, NotReady, ServiceUnavailable
from delayq.keys import Keys, firing_id, parse_firing_id
from delayq.layout import read_layout
from delayq.redis_conn import client_url, connect, keys_for
from delayq.settings import Settings, mask_url
from delayq.store import Timer, TimerStore, check_replicated, open_store

T = TypeVar("T")

#: Entries read, checked against the target and written per round trip.
CHUNK = 1000
#: COUNT of each SCAN, ZSCAN and HSCAN step.
SCAN_COUNT = 1000
#: Index shards read per pipelined round of ZSCANs (a shard holds ~128 entries or fewer
#: while it stays a listpack; a larger one is read COUNT at a time).
SHARDS_PER_ROUND = 64

#: How long a partition remembers what was copied into it (copied_hash), after the last
#: copy into it: two days.
COPIED_KEEP_S = 2 * 86_400

#: What the target holds decides what happens to an entry.
COPY, ALREADY_THERE, KEPT_TARGET = "copy", "already_there", "kept_target"


@dataclass
class Tally:
    """One kind of entry: how many were found in the source, and what became of them."""

    found: int = 0
    #: Written to the target (with --dry-run: would be).
    copied: int = 0
    #: The target has them already, as they are in the source.
    already_there: int = 0
    #: The target has something newer (moved, re-armed, fired or cancelled there): kept.
    kept_target: int = 0

    def count(self, verdict: str) -> None:
        self.found += 1
        if verdict == COPY:
            self.copied += 1
        elif verdict == ALREADY_THERE:
            self.already_there += 1
        else:
            self.kept_target += 1


@dataclass
class CopyReport:
    source: str
    target: str
    dry_run: bool
    pending: Tally = field(default_factory=Tally)
    in_flight: Tally = field(default_factory=Tally)
    dead_letters: Tally = field(default_factory=Tally)
    legacy: Tally = field(default_factory=Tally)

    def as_dict(self) -> dict[str, Any]:
        """For --json: `from` and `to` (passwords masked), then the tallies."""
        out = dataclasses.asdict(self)
        return {"from": out.pop("source"), "to": out.pop("target"), **out}

    @property
    def tallies(self) -> tuple[Tally, ...]:
        return (self.pending, self.in_flight, self.dead_letters, self.legacy)

    def summary(self) -> str:
        """One line: what was copied, and what the target had already."""
        copy, adopt = ("would copy", "would adopt") if self.dry_run else ("copied", "adopted")
        there = sum(t.already_there for t in self.tallies)
        kept = sum(t.kept_target for t in self.tallies)
        return (
            f"{copy} {self.pending.copied} pending timers, {self.in_flight.copied} in-flight "
            f"firings, {self.dead_letters.copied} dead letters, {adopt} "
            f"{self.legacy.copied} legacy timers from {self.source} to {self.target} "
            f"({there} already there, {kept} kept as the target has them)"
        )


def copy_timers(
    settings: Settings, from_url: str, to_url: str, *, dry_run: bool = False
) -> CopyReport:
    """Connect to both, refuse what cannot be right, copy; Redis errors end in one line."""
    if is_cluster_url(from_url):
        raise InvalidInput(
            f"--from {mask_url(from_url)}: copy-timers copies from one Redis (redis://, "
            "rediss://, unix://), not from a cluster"
        )
    source = connect(dataclasses.replace(settings, redis_url=from_url))
    target = connect(dataclasses.replace(settings, redis_url=to_url))
    _refuse_same(source, target, from_url, to_url)
    store = open_store(
        target,
        keys_for(target, settings),
        wait_replicas=settings.wait_replicas,
        wait_timeout_ms=settings.wait_timeout_ms,
    )
    copier = TimerCopier(
        source,
        keys_for(source, settings),
        store,
        dry_run=dry_run,
        report=CopyReport(mask_url(from_url), mask_url(to_url), dry_run),
    )
    try:
        return copier.run()
    except redis.exceptions.NoPermissionError as exc:
        raise NotReady(
            f"copying timers from {mask_url(from_url)} to {mask_url(to_url)} stopped: "
            f"{str(exc).splitlines()[0]} (docs/moving-to-cluster.md lists what each Redis "
            "user needs); what was copied stays, and running it again copies the rest"
        ) from None
    except redis.RedisError as exc:
        reason = (str(exc) or type(exc).__name__).splitlines()[0]
        raise ServiceUnavailable(
            f"copying timers from {mask_url(from_url)} to {mask_url(to_url)} stopped: "
            f"{reason}; what was copied stays, and running it again copies the rest"
        ) from None


def _refuse_same(source: redis.Redis, target: redis.Redis, from_url: str, to_url: str) -> None:
    try:
        cluster_node = int(source.info("cluster").get("cluster_enabled", 0) or 0) == 1
    except redis.ResponseError:  # INFO refused by an ACL
        cluster_node = False
    if cluster_node:
        raise InvalidInput(
            f"--from {mask_url(from_url)} is a node of a cluster: copy-timers copies from one Redis"
        )
    if client_url(source) == client_url(target):
        raise InvalidInput(
            f"--from and --to are the same Redis ({mask_url(to_url)}): nothing to copy"
        )


def _chunks(items: Iterable[T], size: int = CHUNK) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


class TimerCopier:
    """Copies one source's timers into a target store (one Redis or a cluster)."""

    def __init__(
        self,
        source: redis.Redis,
        source_keys: Keys,
        target: TimerStore,
        *,
        dry_run: bool = False,
        report: CopyReport | None = None,
    ) -> None:
        self.src = source
        self.sk = source_keys
        self.target = target
        self.tk = target.keys
        self.cluster = isinstance(target, ClusterStore)
        self.dry_run = dry_run
        self.report = report or CopyReport(client_url(source), client_url(target.client), dry_run)
        lua = files("delayq") / "lua"
        self.copy_in: Script = target.client.register_script(
            (lua / "_prelude.lua").read_text() + (lua / "copy_in.lua").read_text()
        )
        #: Indexed timers whose TTL key was re-armed since: copied at their TTL by the first pass.
        self._rearmed: set[str] = set()
        self._source_pexpiretime = True
        self._target_pexpiretime = True
        #: How far off an expiry read from the source may be (TIME + PTTL: a ms or two).
        self._slack_ms = 0

    def run(self) -> CopyReport:
        self._probe_pexpiretime()
        # In-flight firings first: handed back by listeners just stopped, they are due.
        self._copy_in_flight()
        # TTL keys before the index: a timer re-armed since it was indexed goes at its
        # new time, and the pass over the index leaves it alone.
        self._copy_legacy()
        self._copy_pending()
        self._copy_dead_letters()
        return self.report

    def _partition(self, key: str) -> Keys:
        return partition_of(self.tk, key) if self.cluster else self.tk

    def _probe_pexpiretime(self) -> None:
        """PEXPIRETIME came with Redis 7 (the embedded Redis is 6.2): without it the
        source's expiry times are read as TIME + PTTL, exact to a millisecond or two."""
        for client, probe, attr in (
            (self.src, self.sk.heads, "_source_pexpiretime"),
            (self.target.client, self.tk.heads, "_target_pexpiretime"),
        ):
            try:
                client.pexpiretime(probe)  # a key of delayq's, which its users may read
            except redis.ResponseError as exc:
                if "unknown" not in str(exc).lower():
                    raise
                setattr(self, attr, False)
        self._slack_ms = 0 if self._source_pexpiretime else 2

    # -- pending timers and legacy keys ----------------------------------------------------

    def _verdicts(self, timers: list[tuple[str, int]]) -> list[str]:
        """For each timer (key, due ms) of the source: copy it, or the target has it
        already (or had it from an earlier run), or the target has something newer."""
        pending = self._read_target(
            [("ZSCORE", self._partition(key).shard(key), key) for key, _ in timers]
        )
        out = [
            ALREADY_THERE if p is not None and abs(int(p) - due) <= self._slack_ms else ""
            for p, (_, due) in zip(pending, timers, strict=True)
        ]
        # The rest: what else the target knows of them.
        rest = [i for i, v in enumerate(out) if not v]
        reads: list[tuple[str, ...]] = []
        for i in rest:
            key, due = timers[i]
            k = self._partition(key)
            fid = firing_id(key, due)
            there = pending[i]
            reads += [
                ("ZSCORE", k.claims, fid),
                ("HEXISTS", copied_hash(k), marker("pending", fid)),
                # Whether what the target has pending is what an earlier run copied.
                ("HEXISTS", copied_hash(k), marker("pending", firing_id(key, int(there or 0)))),
                ("ZSCORE", k.recent, key),
                ("PEXPIRETIME", key) if self._target_pexpiretime else ("EXISTS", key),
            ]
        replies = self._read_target(reads)
        # Fired or cancelled on the target before this due time: a timer whose TTL key
        # left the source before its due time (deleted, or re-armed sooner and expired,
        # while no listener heard it) is superseded by that too.
        gone = self._gone(
            [
                timers[i]
                for n, i in enumerate(rest)
                if replies[5 * n + 3] is not None and int(replies[5 * n + 3]) < timers[i][1]
            ]
        )
        for n, i in enumerate(rest):
            key, due = timers[i]
            claimed, copied_before, theirs_copied, recent, expires = replies[5 * n : 5 * n + 5]
            if not self._target_pexpiretime:
                expires = -2  # not known: only the index is compared
            if claimed is not None or copied_before:
                # Being fired there, or copied by an earlier run and since fired,
                # cancelled or moved there.
                out[i] = ALREADY_THERE
            elif pending[i] is not None:
                # Pending there at another time: moved there (kept), or, if that is what
                # an earlier run copied, moved in the source since (copied again).
                out[i] = COPY if theirs_copied else KEPT_TARGET
            elif int(expires) > 0 and int(expires) != due:
                out[i] = KEPT_TARGET  # re-armed there by a producer of its own
            elif recent is not None and (int(recent) >= due or key in gone):
                out[i] = KEPT_TARGET  # fired or cancelled there since
            else:
                out[i] = COPY
        return out

    def _schedule(self, timers: list[tuple[str, int]], tally: Tally) -> None:
        unique = list(dict.fromkeys(timers))  # a SCAN may name an entry twice
        copy: list[Timer] = []
        for (key, due), verdict in zip(unique, self._verdicts(unique), strict=True):
            tally.count(verdict)
            if verdict == COPY:
                copy.append((key, "at", due))
        if copy and not self.dry_run:
            self.target.schedule_bulk([copy])
            self._copy_in(remember=[firing_id(key, due) for key, _, due in copy])

    def _copy_legacy(self) -> None:
        cursor = 0
        while True:
            cursor, found = self.src.scan(cursor, count=SCAN_COUNT, _type="string")
            # What the source's sweep would adopt (delayq.store.TimerStore.scan_timers).
            names = [str(k) for k in found if ":" in str(k) and not self.sk.is_own(str(k))]
            if names:
                self._adopt(names)
            if int(cursor) == 0:
                return

    def _adopt(self, names: list[str]) -> None:
        expires = self._source_expire_times(names)
        layout = read_layout(self.src, self.sk)
        pipe = self.src.pipeline(transaction=False)
        shards = [self.sk.shards_of(key, layout) for key in names]
        for key, candidates in zip(names, shards, strict=True):
            for shard in candidates:
                pipe.zscore(shard, key)
        replies = iter(pipe.execute())
        indexed = [
            next((d for d in [next(replies) for _ in c] if d is not None), None) for c in shards
        ]
        legacy: list[tuple[str, int]] = []
        rearmed: list[tuple[str, int]] = []
        for key, expires_ms, due in zip(names, expires, indexed, strict=True):
            if expires_ms <= 0:
                continue  # no TTL: not a timer
            if due is None:
                legacy.append((key, expires_ms))
            elif abs(int(due) - expires_ms) > self._slack_ms:
                # Indexed, then re-armed: a pending timer (counted so), at its new time.
                self._rearmed.add(key)
                rearmed.append((key, expires_ms))
            # Else a timer as delayq scheduled it: the pending pass copies it.
        if legacy:
            self._schedule(legacy, self.report.legacy)
        if rearmed:
            self._schedule(rearmed, self.report.pending)

    def _source_expire_times(self, names: list[str]) -> list[int]:
        """Epoch ms each key expires at; -1 without a TTL, -2 if it is gone."""
        pipe = self.src.pipeline(transaction=False)
        if self._source_pexpiretime:
            for key in names:
                pipe.pexpiretime(key)
            return [int(t) for t in pipe.execute()]
        pipe.time()
        for key in names:
            pipe.pttl(key)
        (sec, usec), *ttls = pipe.execute()
        now_ms = int(sec) * 1000 + int(usec) // 1000
        return [now_ms + int(t) if int(t) >= 0 else int(t) for t in ttls]

    def _copy_pending(self) -> None:
        for timers in _chunks(self._index_entries()):
            timers = [t for t in timers if t[0] not in self._rearmed]
            if timers:
                self._schedule(timers, self.report.pending)

    def _gone(self, timers: list[tuple[str, int]]) -> set[str]:
        """The timers not yet due whose TTL key is no longer in the source."""
        if not timers:
            return set()
        pipe = self.src.pipeline(transaction=False)
        pipe.time()
        for key, _ in timers:
            pipe.exists(key)
        (sec, usec), *exists = pipe.execute()
        now_ms = int(sec) * 1000 + int(usec) // 1000
        return {key for (key, due), n in zip(timers, exists, strict=True) if due > now_ms and not n}

    def _index_entries(self) -> Iterator[tuple[str, int]]:
        """Every (timer key, due ms) of the source's due index: the shards named by
        `heads`, read with ZSCAN, SHARDS_PER_ROUND shards per round trip."""
        heads = (
            str(shard_id) for shard_id, _ in self.src.zscan_iter(self.sk.heads, count=SCAN_COUNT)
        )
        for shard_ids in _chunks(heads, SHARDS_PER_ROUND):
            cursors = {f"{self.sk.shard_prefix}{s}": 0 for s in shard_ids}
            while cursors:
                pipe = self.src.pipeline(transaction=False)
                for shard, cursor in cursors.items():
                    pipe.zscan(shard, cursor, count=SCAN_COUNT)
                following: dict[str, int] = {}
                for shard, (cursor, entries) in zip(cursors, pipe.execute(), strict=True):
                    for key, due in entries:
                        yield str(key), int(due)
                    if int(cursor):
                        following[shard] = int(cursor)
                cursors = following

    # -- in-flight firings and dead letters ------------------------------------------------

    def _copy_in_flight(self) -> None:
        for chunk in _chunks(self.src.zscan_iter(self.sk.claims, count=SCAN_COUNT)):
            ids = [str(fid) for fid, _ in chunk]
            attempts = self.src.hmget(self.sk.attempts, ids)
            self._claim(
                [
                    (fid, int(lease), int(n or 0))
                    for fid, (_, lease), n in zip(ids, chunk, attempts, strict=True)
                ]
            )
        # Held by a listener from before firing ids (0.1): the same, named by key.
        for chunk in _chunks(self.src.zscan_iter(self.sk.inflight, count=SCAN_COUNT)):
            keys = [str(key) for key, _ in chunk]
            dues = self.src.hmget(self.sk.inflight_due, keys)
            self._claim(
                [
                    (firing_id(key, int(due) if due else int(lease)), int(lease), 0)
                    for key, (_, lease), due in zip(keys, chunk, dues, strict=True)
                ]
            )

    def _claim(self, firings: list[tuple[str, int, int]]) -> None:
        """Copy claimed firings (id, lease ms, failed attempts) the target does not know
        of: not claimed there, not pending there at the same time, not copied before."""
        firings = list({f[0]: f for f in firings}.values())
        reads: list[tuple[str, ...]] = []
        for fid, _, _ in firings:
            key, _ = parse_firing_id(fid)
            k = self._partition(key)
            reads += [
                ("ZSCORE", k.claims, fid),
                ("ZSCORE", k.shard(key), key),
                ("HEXISTS", copied_hash(k), marker("claim", fid)),
            ]
        replies = self._read_target(reads)
        copy: list[tuple[str, int, int]] = []
        for i, firing in enumerate(firings):
            claimed, pending, copied_before = replies[3 * i : 3 * i + 3]
            due = parse_firing_id(firing[0])[1]
            if (
                claimed is not None
                or copied_before
                or (pending is not None and int(pending) == due)
            ):
                self.report.in_flight.count(ALREADY_THERE)
            else:
                copy.append(firing)
        if copy and not self.dry_run:
            self._count(self.report.in_flight, len(copy), self._copy_in(claims=copy)[0])
        else:
            self._count(self.report.in_flight, len(copy), len(copy))

    def _copy_dead_letters(self) -> None:
        for chunk in _chunks(self.src.hscan_iter(self.sk.dead, count=SCAN_COUNT)):
            letters = [(str(f), str(raw)) for f, raw in chunk]
            reads: list[tuple[str, ...]] = []
            for name, raw in letters:
                k = self._partition(_dead_timer(name, raw))
                reads += [
                    ("HEXISTS", k.dead, name),
                    ("HEXISTS", copied_hash(k), marker("dead", name)),
                ]
            replies = self._read_target(reads)
            copy = []
            for i, letter in enumerate(letters):
                if any(replies[2 * i : 2 * i + 2]):
                    self.report.dead_letters.count(ALREADY_THERE)
                else:
                    copy.append(letter)
            if copy and not self.dry_run:
                self._count(self.report.dead_letters, len(copy), self._copy_in(dead=copy)[1])
            else:
                self._count(self.report.dead_letters, len(copy), len(copy))

    @staticmethod
    def _count(tally: Tally, wanted: int, added: int) -> None:
        """Count `wanted` entries the target lacked: what the script did not add (a
        listener there got to it first) was there after all."""
        tally.found += wanted
        tally.copied += added
        tally.already_there += wanted - added

    # -- reading and writing the target ----------------------------------------------------

    def _read_target(self, reads: list[tuple[str, ...]]) -> list[Any]:
        """Replies of read commands (name, key, args...) on the target, in one round trip
        per primary. (RedisCluster's own pipeline spends ~50 us of Python per command; it
        is used only when a slot moved meanwhile, as it follows MOVED and ASK.)"""
        if not reads:
            return []
        if not isinstance(self.target, ClusterStore):
            pipe = self.target.client.pipeline(transaction=False)
            for cmd in reads:
                pipe.execute_command(*cmd)  # type: ignore[no-untyped-call]
            return list(pipe.execute())
        router = self.target.router
        by_node: dict[str, tuple[ClusterNode, list[int]]] = {}
        for i, cmd in enumerate(reads):
            node = router.primary_of(slot_of(cmd[1]))
            by_node.setdefault(node.name, (node, []))[1].append(i)
        replies: list[Any] = [None] * len(reads)
        try:
            for node, idxs in by_node.values():
                pipe = router.node_client(node).pipeline(transaction=False)
                for i in idxs:
                    pipe.execute_command(*reads[i])
                for i, reply in zip(idxs, pipe.execute(raise_on_error=False), strict=True):
                    if isinstance(reply, Exception):
                        raise reply
                    replies[i] = reply
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            router.refresh_topology(force=True)
            cluster_pipe = self.target.client.pipeline(transaction=False)
            for cmd in reads:
                cluster_pipe.execute_command(*cmd)
            return list(cluster_pipe.execute())
        return replies

    def _copy_in(
        self,
        *,
        claims: Sequence[tuple[str, int, int]] = (),
        dead: Sequence[tuple[str, str]] = (),
        remember: Sequence[str] = (),
    ) -> tuple[int, int]:
        """copy_in.lua once per target partition; (firings added, dead letters added)."""
        groups: dict[Keys, tuple[list[Any], list[Any], list[Any]]] = defaultdict(
            lambda: ([], [], [])
        )
        for fid, lease, attempts in claims:
            group = groups[self._partition(parse_firing_id(fid)[0])]
            group[0].extend([fid, lease, attempts])
            group[2].append(marker("claim", fid))
        for name, raw in dead:
            group = groups[self._partition(_dead_timer(name, raw))]
            group[1].extend([name, raw])
            group[2].append(marker("dead", name))
        for fid in remember:
            groups[self._partition(parse_firing_id(fid)[0])][2].append(marker("pending", fid))
        calls = [
            (
                k,
                [k.claims, k.claims_per_key, k.attempts, k.dead, copied_hash(k), k.dead_index],
                [k.wake_channel, COPIED_KEEP_S, len(c) // 3, len(d) // 2, *c, *d, *r],
            )
            for k, (c, d, r) in groups.items()
        ]
        if isinstance(self.target, ClusterStore):
            replies = self.target.router.run(
                [Call(_slot(k), self.copy_in, keys, args) for k, keys, args in calls],
                wait=bool(self.target.wait_replicas),
            )
        else:
            pipe = self.target.client.pipeline(transaction=False)
            for _, keys, args in calls:
                self.copy_in(keys=keys, args=args, client=pipe)
            if self.target.wait_replicas:
                pipe.wait(self.target.wait_replicas, self.target.wait_timeout_ms)
            replies = pipe.execute()
            if self.target.wait_replicas:
                *replies, confirmed = replies
                check_replicated(
                    int(confirmed), self.target.wait_replicas, self.target.wait_timeout_ms
                )
        return sum(int(r[0]) for r in replies), sum(int(r[1]) for r in replies)


def copied_hash(k: Keys) -> str:
    """HASH marker -> 1 of what copy-timers brought into a partition (`marker`). A hash,
    not a set: a slot's share of markers stays in a compact listpack (~20 bytes each;
    sets are listpacks only from Redis 7.2)."""
    return f"{{{k.tag}}}:copied"


def marker(kind: str, name: str) -> str:
    """What `copied_hash` holds for a copied pending timer (its firing id), in-flight
    firing (its id) or dead letter (its field): a 64-bit digest, for compactness."""
    return f"{kind[0]}:{hashlib.blake2b(name.encode(), digest_size=8).hexdigest()}"


def _dead_timer(name: str, raw: str) -> str:
    """The timer key of a dead letter: its entry says; else its field (`KEY@DUE`, or the
    timer key itself before firing ids)."""
    try:
        timer = json.loads(raw).get("timer")
    except (ValueError, AttributeError):
        timer = None
    if isinstance(timer, str) and timer:
        return timer
    return name.rpartition("@")[0] if "@" in name else name


def _slot(k: Keys) -> int:
    assert k.slot is not None, "a cluster partition has a slot"
    return k.slot
