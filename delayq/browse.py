"""Paging through pending timers, in-flight firings and dead letters (the dashboard's
lists): a stable order, real cursors, and a bounded number of Redis reads per page.

Each list is a set of sorted sets ("sources") read together as one ordered list:

* pending: the due index, ordered by (due ms, timer key). On one Redis its 16,384 shards,
  whose heads (`{ns}:heads`) say where each begins; in a cluster each slot's `due:0`.
* in flight: the claims (firing id -> lease deadline), ordered by (lease deadline,
  firing id): the firing whose lease runs out first (the next to be retried or taken
  over) comes first. One set on one Redis, one per slot in a cluster.
* dead letters: the dead-letter index (firing id -> due ms, `{ns}:dead:due`), ordered
  by (due ms, firing id). One set on one Redis, one per slot (that has dead letters) in a
  cluster.

A page is a k-way merge after the cursor, the last (score, member) shown. The `limit`
smallest entries after it lie in the `limit` sources whose own next entry comes first (and
those tied with the last of them), so a page reads: each source's next entry after the
cursor, unless Redis says it already (`heads` on one Redis: a shard whose head lies after
the cursor begins with it), then up to `limit` entries from each chosen source. The first
page of pending timers on one Redis therefore costs about `limit` + 2 commands, however
many timers there are; a deeper page one more command per shard whose head is before the
cursor (at most 16,384), and any page in a cluster one command per slot (16,384), sent in
pipelines of PIPELINE_CHUNK so that Redis serves the listeners in between. `Page.reads`
says how many commands a page took.

The reads are not one snapshot: a timer that moves or fires while a list is paged may be
seen twice or not at all, as in any paginated view of a changing list.
"""

from __future__ import annotations

import base64
import binascii
import re
import weakref
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import redis
from redis.commands.core import Script

from delayq.errors import InvalidInput
from delayq.figures import dead_letter
from delayq.keys import Keys, Layout, parse_firing_id, parse_timer_key
from delayq.layout import read_layout
from delayq.redis_conn import is_cluster, run_read_only, script_source
from delayq.timing import from_ms, validate_order_sn

#: Rows per page unless asked otherwise, and the most a page may ask for.
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
#: Commands per pipeline: Redis serves other clients between two pipelines (1,024 small
#: reads hold one Redis 1-3 ms with 1,000,000 pending).
PIPELINE_CHUNK = 1024
#: Sorted sets read per peek_after.lua call (~1.3 ms of Redis with 1,000,000 pending),
#: and calls per round trip: Redis runs one client's pipelined commands back to back, so
#: a pipeline holds it as long as all of its calls together.
PROBE_CHUNK = 256
PROBE_CALLS_PER_PIPELINE = 1
#: Dead letters deleted or indexed per script call.
SCRIPT_CHUNK = 500
#: Entries asked for at most per command when a source's ties at the cursor's score must
#: be stepped over.
MAX_STEP = 1000

_ACTION_OR_FLAG = re.compile(r"[A-Za-z0-9_.-]{1,32}")

#: (score, member): the order of every list, and what a cursor names.
Entry = tuple[int, str]


@dataclass(frozen=True)
class Page:
    """One page of a list."""

    rows: list[dict[str, Any]]
    #: Opaque cursor of the next page; None on the last page.
    next: str | None
    #: Redis commands this page took (a pipelined command counts as one).
    reads: int


# -- the three lists -----------------------------------------------------------------------


def pending_page(
    client: redis.Redis, keys: Keys, *, after: str | None = None, limit: int = DEFAULT_LIMIT
) -> Page:
    """Pending timers ordered by (due ms, timer key): rows {"timer", "order_sn",
    "action", "due_ms", "due_at"}. `after` is the previous page's `next`."""
    cursor, n = _cursor("p", after), _limit(limit)
    reads = _Reads(client)
    if is_cluster(client):
        probe = [f"{p.shard_prefix}0" for p in _partitions(client, keys)]
        known: dict[str, int] = {}
    else:
        probe, known = _shards_around(reads, keys, cursor, n + 1)
    found = _merge(reads, probe, known, cursor, n + 1)
    rows = [_timer_row(member, score) for (score, member), _ in found[:n]]
    return _page(rows, found, n, "p", reads)


def in_flight_page(
    client: redis.Redis, keys: Keys, *, after: str | None = None, limit: int = DEFAULT_LIMIT
) -> Page:
    """Claimed firings (being applied, or waiting for a retry) ordered by (lease deadline,
    firing id): rows {"firing", "timer", "order_sn", "action", "due_ms", "due_at",
    "lease_ms", "lease_until", "attempts"} (attempts: failed attempts so far)."""
    cursor, n = _cursor("f", after), _limit(limit)
    reads = _Reads(client)
    parts = _partitions(client, keys)
    by_source = {p.claims: p for p in parts}
    found = _merge(reads, list(by_source), {}, cursor, n + 1)
    shown = found[:n]
    attempts = _hmget(reads, [(by_source[src].attempts, fid) for (_, fid), src in shown])
    rows = []
    for ((lease, fid), _), failed in zip(shown, attempts, strict=True):
        row = _firing_row(fid)
        row.update(
            lease_ms=lease, lease_until=from_ms(lease).isoformat(), attempts=int(failed or 0)
        )
        rows.append(row)
    return _page(rows, found, n, "f", reads)


def dead_page(
    client: redis.Redis, keys: Keys, *, after: str | None = None, limit: int = DEFAULT_LIMIT
) -> Page:
    """Dead letters ordered by (due ms, firing id): rows as delayq.figures.dead_letter
    gives them ({"firing", "timer", "due_at", "attempts", "error", "dead_at"}) plus
    "order_sn", "action" and "due_ms". Dead letters written before the index existed
    are indexed first (once)."""
    cursor, n = _cursor("d", after), _limit(limit)
    reads = _Reads(client)
    parts = _with_dead(reads, keys)
    by_source = {p.dead_index: p for p in parts}
    found = _merge(reads, list(by_source), {}, cursor, n + 1)
    shown = found[:n]
    entries = _hmget(reads, [(by_source[src].dead, fid) for (_, fid), src in shown])
    rows, stale = [], []
    for ((due, fid), src), raw in zip(shown, entries, strict=True):
        if raw is None:
            stale.append((by_source[src], fid))  # re-queued or deleted by an older version
            continue
        row = dead_letter(fid, raw)
        row.update(_split(str(row["timer"])), due_ms=due)
        rows.append(row)
    if stale:
        groups: dict[Keys, list[str]] = defaultdict(list)
        for p, fid in stale:
            groups[p].append(fid)
        for p, fids in groups.items():
            _run_script(client, p, "index_dead", [p.dead, p.dead_index], fids)
            reads.n += 1
    return _page(rows, found, n, "d", reads)


def pending_cursor(due_ms: int) -> str:
    """A cursor that opens the pending list at a due time: its page starts with the first
    timer due at or after `due_ms` (epoch ms)."""
    if not isinstance(due_ms, int) or due_ms < 0:
        raise InvalidInput(f"invalid due time {due_ms!r}")
    return _encode("p", (due_ms, ""))


# -- dead letters: delete, and the index -------------------------------------------------


def delete_dead(client: redis.Redis, keys: Keys, firings: Sequence[str]) -> int:
    """Delete dead letters for good: the firings named (firing ids, or timer keys for every
    dead letter of those timers), or all of them when none are named. Returns how many
    were deleted. In chunks of SCRIPT_CHUNK, one script call each (hash, index and
    attempts together)."""
    n = 0
    if firings:
        groups: dict[Keys, list[str]] = defaultdict(list)
        for name in dict.fromkeys(firings):
            timer = name.rpartition("@")[0] if "@" in name else name
            groups[_partition_of(client, keys, timer)].append(name)
        for p, names in groups.items():
            n += _delete_fields(client, p, _expand(client, p, names))
        return n
    for p in _with_dead(_Reads(client), keys, indexed_too=True):
        hashed = (str(_text(f)) for f, _ in client.hscan_iter(p.dead, count=SCRIPT_CHUNK))
        n += _delete_fields(client, p, hashed)
        # Index entries left without a dead letter (written by an older version).
        while leftover := [_text(m) for m in client.zrange(p.dead_index, 0, SCRIPT_CHUNK - 1)]:
            n += _delete_fields(client, p, iter(leftover))
    return n


def sync_dead_index(client: redis.Redis, keys: Keys) -> int:
    """Index the dead letters the index lacks (written before it existed, or by a listener
    of an older version) and drop index entries whose dead letter is gone, in every
    partition where the two disagree in size. Returns how many were indexed."""
    reads = _Reads(client)
    return sum(_sync(client, p, reads) for p in _dead_partitions(reads, keys))


def timers_of_order(
    client: redis.Redis, keys: Keys, order_sn: str, actions: Iterable[str]
) -> list[str]:
    """The timer keys `ORDER_SN:ACTION` of one order, for each action named, that Redis
    holds: pending, in flight, dead-lettered, or a TTL key not yet indexed. A few
    commands per action (plus an HSCAN of the partition's dead letters for a timer found
    nowhere else)."""
    validate_order_sn(order_sn)
    wanted = []
    for action in dict.fromkeys(actions):
        if not _ACTION_OR_FLAG.fullmatch(action):
            raise InvalidInput(f"invalid action {action!r}")
        wanted.append(f"{order_sn}:{action}")
    reads = _Reads(client)
    parts = [_partition_of(client, keys, key) for key in wanted]
    layout = Layout() if is_cluster(client) else read_layout(client, keys)
    calls: list[Cmd] = []
    for key, p in zip(wanted, parts, strict=True):
        calls += [
            # Each shard it may be in (two while the index is resized: delayq.layout).
            *(_cmd("zscore", shard, key) for shard in p.shards_of(key, layout)),
            _cmd("exists", key),
            _cmd("hexists", p.claims_per_key, key),
            _cmd("hexists", p.dead, key),
        ]
    replies = iter(reads.run(calls))
    found = []
    for key, p in zip(wanted, parts, strict=True):
        held = [next(replies) for _ in range(len(p.shards_of(key, layout)) + 3)]
        if any(held) or _has_dead_firing(client, p, key):
            found.append(key)
    return found


# -- merging sorted sets -----------------------------------------------------------------


#: A read for a pipeline: (redis-py method, arguments, keyword arguments).
Cmd = tuple[str, tuple[Any, ...], dict[str, Any]]


def _cmd(name: str, *args: Any, **kwargs: Any) -> Cmd:
    return name, args, kwargs


class _Reads:
    """Runs reads in pipelines of PIPELINE_CHUNK and counts the commands."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.n = 0

    def run(self, calls: Sequence[Cmd]) -> list[Any]:
        out: list[Any] = []
        for start in range(0, len(calls), PIPELINE_CHUNK):
            pipe = self.client.pipeline(transaction=False)
            for name, args, kwargs in calls[start : start + PIPELINE_CHUNK]:
                getattr(pipe, name)(*args, **kwargs)
            out += pipe.execute()
        self.n += len(calls)
        return out


def _after(
    reads: _Reads, zsets: Sequence[str], after: Entry | None, n: int
) -> dict[str, list[Entry]]:
    """Up to `n` entries of each sorted set that come after `after`, in (score, member)
    order. Entries tied with the cursor's score that sort before it are stepped over, in
    further rounds for the sets that have many."""
    low: int | str = "-inf" if after is None else after[0]
    found: dict[str, list[Entry]] = {z: [] for z in zsets}
    todo = dict.fromkeys(zsets, 0)
    step = n
    while todo:
        asked = list(todo.items())
        replies = reads.run(
            [
                _cmd("zrangebyscore", z, low, "+inf", start=off, num=step, withscores=True)
                for z, off in asked
            ]
        )
        todo = {}
        for (z, off), entries in zip(asked, replies, strict=True):
            got = found[z]
            got += [e for e in _entries(entries) if after is None or e > after]
            if len(entries) == step and len(got) < n:
                todo[z] = off + step
        step = min(step * 4, MAX_STEP)
    return {z: got[:n] for z, got in found.items()}


def _probe(reads: _Reads, zsets: Sequence[str], after: Entry | None) -> dict[str, Entry]:
    """Each sorted set's first entry after `after` (sets with none are left out): by
    peek_after.lua, PROBE_CHUNK sets a call, or by one command a set where scripts are
    refused (an ACL without EVALSHA, a server without script flags, a slot on the move)."""
    try:
        return _probe_by_script(reads, zsets, after)
    except redis.ResponseError:
        return {z: es[0] for z, es in _after(reads, zsets, after, 1).items() if es}


def _probe_by_script(reads: _Reads, zsets: Sequence[str], after: Entry | None) -> dict[str, Entry]:
    low = "-inf" if after is None else str(after[0])
    found: dict[str, Entry] = {}
    for conn, group in _by_connection(reads.client, zsets):
        chunks = [group[i : i + PROBE_CHUNK] for i in range(0, len(group), PROBE_CHUNK)]
        for start in range(0, len(chunks), PROBE_CALLS_PER_PIPELINE):
            batch = chunks[start : start + PROBE_CALLS_PER_PIPELINE]
            replies = run_read_only(conn, "peek_after", [[low, *chunk] for chunk in batch])
            for chunk, reply in zip(batch, replies, strict=True):
                for j in range(0, len(reply), 3):
                    entry = (int(float(_text(reply[j + 2]))), _text(reply[j + 1]))
                    found[chunk[int(reply[j]) - 1]] = entry
    reads.n += len(zsets)
    # A set whose first entry at the cursor's score sorts before (or is) the cursor:
    # its next entry comes after those ties (rare: the cursor's own shard, and shards
    # with timers due in the same millisecond).
    behind = [z for z, e in found.items() if after is not None and e <= after]
    for z, es in _after(reads, behind, after, 1).items():
        if es:
            found[z] = es[0]
        else:
            del found[z]
    return found


def _by_connection(
    client: redis.Redis, zsets: Sequence[str]
) -> list[tuple[redis.Redis, list[str]]]:
    """The sets grouped by the server that holds them: one Redis; a cluster's primaries."""
    if not is_cluster(client):
        return [(client, list(zsets))]
    from delayq.cluster.slots import slot_of

    cluster: Any = client
    groups: dict[str, tuple[redis.Redis, list[str]]] = {}
    for z in zsets:
        node = cluster.nodes_manager.get_node_from_slot(slot_of(z))
        if node.name not in groups:
            groups[node.name] = (cluster.get_redis_connection(node), [])
        groups[node.name][1].append(z)
    return list(groups.values())


def _merge(
    reads: _Reads, probe: Sequence[str], known: dict[str, int], after: Entry | None, n: int
) -> list[tuple[Entry, str]]:
    """The first `n` entries after `after` over all sources, each with its source.
    `known`: sources whose next entry's score is known already (and none of their
    entries comes before `after`); the others are probed for their next entry."""
    chosen: list[str]
    if len(probe) + len(known) <= n:
        chosen = [*probe, *known]
    else:
        nexts = [(e[0], z) for z, e in _probe(reads, probe, after).items()]
        nexts += [(score, z) for z, score in known.items()]
        if not nexts:
            return []
        nexts.sort()
        # Every source tied with the n-th: the order within a score is by member, which
        # `known` sources do not say.
        bound = nexts[min(n, len(nexts)) - 1][0]
        chosen = [z for score, z in nexts if score <= bound]
    merged = sorted((e, z) for z, es in _after(reads, chosen, after, n).items() for e in es)
    return merged[:n]


def _shards_around(
    reads: _Reads, keys: Keys, after: Entry | None, n: int
) -> tuple[list[str], dict[str, int]]:
    """One Redis: (the shards that may hold entries after the cursor but begin before
    it, to probe; the first `n` shards that begin after it, with their heads)."""
    heads = keys.heads
    if after is None:
        before: list[str] = []
        replies = reads.run([_cmd("zrange", heads, 0, n - 1, withscores=True)])
    else:
        replies = reads.run(
            [
                _cmd("zrangebyscore", heads, "-inf", after[0]),
                _cmd(
                    "zrangebyscore", heads, f"({after[0]}", "+inf", start=0, num=n, withscores=True
                ),
            ]
        )
        before = [_text(s) for s in replies.pop(0)]
    beyond = {shard: score for score, shard in _entries(replies[0])}
    if len(beyond) == n:
        # Shards whose head ties with the last one read: any of them may come first.
        last = max(beyond.values())
        (tied,) = reads.run([_cmd("zrangebyscore", heads, last, last, withscores=True)])
        beyond.update({shard: score for score, shard in _entries(tied)})
    prefix = keys.shard_prefix
    return [f"{prefix}{s}" for s in before], {f"{prefix}{s}": h for s, h in beyond.items()}


# -- partitions ----------------------------------------------------------------------------


def _partitions(client: redis.Redis, keys: Keys) -> list[Keys]:
    """The partitions a list is read from: the one of one Redis, or every slot's."""
    if not is_cluster(client):
        return [keys]
    from delayq.cluster.slots import SLOTS, partition

    return [partition(keys.namespace, keys.db, s) for s in range(SLOTS)]


def _partition_of(client: redis.Redis, keys: Keys, timer: str) -> Keys:
    if not is_cluster(client):
        return keys
    from delayq.cluster.slots import partition_of

    return partition_of(keys, timer)


def _with_dead(reads: _Reads, keys: Keys, *, indexed_too: bool = False) -> list[Keys]:
    """The partitions with dead letters, their index brought up to date first."""
    parts = _dead_partitions(reads, keys, indexed_too=indexed_too)
    for p in parts:
        _sync(reads.client, p, reads)
    return parts


def _dead_partitions(reads: _Reads, keys: Keys, *, indexed_too: bool = False) -> list[Keys]:
    """One Redis: its partition. A cluster: the slots whose dead-letter hash (or, with
    `indexed_too`, index) is not empty."""
    if not is_cluster(reads.client):
        return [keys]
    parts = _partitions(reads.client, keys)
    calls = [_cmd("hlen", p.dead) for p in parts]
    if indexed_too:
        calls += [_cmd("zcard", p.dead_index) for p in parts]
    sizes = reads.run(calls)
    count = len(parts)
    return [p for i, p in enumerate(parts) if sizes[i] or (indexed_too and sizes[count + i])]


def _sync(client: redis.Redis, p: Keys, reads: _Reads) -> int:
    """Bring one partition's dead-letter index in line with its hash when their sizes
    differ: every field of the hash, then every member of the index, in chunks."""
    hashed, indexed = reads.run([_cmd("hlen", p.dead), _cmd("zcard", p.dead_index)])
    if int(hashed) == int(indexed):
        return 0
    n = 0
    for source in (
        (_text(f) for f, _ in client.hscan_iter(p.dead, count=SCRIPT_CHUNK)),
        (_text(m) for m, _ in client.zscan_iter(p.dead_index, count=SCRIPT_CHUNK)),
    ):
        while chunk := list(islice(source, SCRIPT_CHUNK)):
            n += int(_run_script(client, p, "index_dead", [p.dead, p.dead_index], chunk))
            reads.n += 2  # a step of the scan, and the script call
    return n


def _expand(client: redis.Redis, p: Keys, names: list[str]) -> Iterator[str]:
    """Dead-letter fields named: firing ids as they are; a timer key stands for its dead
    letter from before firing ids and every dead firing of it."""
    for name in names:
        yield name
        if "@" not in name:
            pattern = f"{_glob_escape(name)}@*"
            for field, _ in client.hscan_iter(p.dead, match=pattern, count=SCRIPT_CHUNK):
                yield _text(field)


def _delete_fields(client: redis.Redis, p: Keys, fields: Iterator[str]) -> int:
    n = 0
    while chunk := list(islice(fields, SCRIPT_CHUNK)):
        n += int(_run_script(client, p, "delete_dead", [p.dead, p.dead_index, p.attempts], chunk))
    return n


def _has_dead_firing(client: redis.Redis, p: Keys, key: str) -> bool:
    pattern = f"{_glob_escape(key)}@*"
    return any(True for _ in client.hscan_iter(p.dead, match=pattern, count=1000))


# -- scripts -------------------------------------------------------------------------------

_scripts: weakref.WeakKeyDictionary[Any, dict[str, Script]] = weakref.WeakKeyDictionary()


def _run_script(client: redis.Redis, p: Keys, name: str, keys: list[str], args: list[str]) -> Any:
    """Run one of browse's scripts in partition `p` (its keys all in one slot)."""
    scripts = _scripts.setdefault(client, {})
    if name not in scripts:
        scripts[name] = client.register_script(script_source(name))
    script = scripts[name]
    if p.slot is None:
        return script(keys=keys, args=args)
    from delayq.cluster.router import Call, Router

    return Router(client).run([Call(p.slot, script, keys, list(args))])[0]  # type: ignore[arg-type]


# -- rows and cursors ----------------------------------------------------------------------


def _hmget(reads: _Reads, wanted: Sequence[tuple[str, str]]) -> list[Any]:
    """HGET of each (hash, field), one HMGET per hash."""
    groups: dict[str, list[str]] = defaultdict(list)
    for hash_key, field in wanted:
        groups[hash_key].append(field)
    order = list(groups.items())
    if not order:
        return []
    replies = reads.run([_cmd("hmget", h, fs) for h, fs in order])
    values = {
        (h, f): v
        for (h, fs), vs in zip(order, replies, strict=True)
        for f, v in zip(fs, vs, strict=True)
    }
    return [values[w] for w in wanted]


def _entries(reply: Iterable[tuple[Any, Any]]) -> list[Entry]:
    return [(int(score), _text(member)) for member, score in reply]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _split(timer: str) -> dict[str, str]:
    """order_sn and action of a timer key (a flag key such as `SN1:1` is split too)."""
    try:
        order_sn, action = parse_timer_key(timer)
    except InvalidInput:
        order_sn, _, action = timer.rpartition(":")
    return {"order_sn": order_sn, "action": action}


def _timer_row(timer: str, due_ms: int) -> dict[str, Any]:
    return {
        "timer": timer,
        **_split(timer),
        "due_ms": due_ms,
        "due_at": from_ms(due_ms).isoformat(),
    }


def _firing_row(fid: str) -> dict[str, Any]:
    try:
        timer, due_ms = parse_firing_id(fid)
    except InvalidInput:
        timer, due_ms = fid, 0
    row = _timer_row(timer, due_ms)
    return {"firing": fid, **row}


def _page(
    rows: list[dict[str, Any]], found: list[tuple[Entry, str]], n: int, kind: str, reads: _Reads
) -> Page:
    more = len(found) > n
    return Page(rows, _encode(kind, found[n - 1][0]) if more else None, reads.n)


def _limit(limit: int) -> int:
    if not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"invalid page size {limit!r}: 1 to {MAX_LIMIT}")
    return limit


def _encode(kind: str, entry: Entry) -> str:
    raw = f"{kind}{entry[0]}:{entry[1]}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _cursor(kind: str, text: str | None) -> Entry | None:
    """The (score, member) a cursor names; InvalidInput for one that is not a cursor of
    this list."""
    if text is None or text == "":
        return None
    try:
        padded = text + "=" * (-len(text) % 4)
        raw = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    score, sep, member = raw[1:].partition(":")
    if raw[:1] != kind or not sep or not score.isdigit() or len(member) > 200:
        raise InvalidInput("invalid page cursor")
    return int(score), member


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
