"""A model-based test of the timer state machine.

Hypothesis drives the real Lua scripts on a real redis-server (and valkey-server), and the
real applier on a real database, through every operation in arbitrary order and
interleaving: schedule, reschedule earlier / later / into the past, cancel; timers armed
and deleted by a producer that does not use delayq, and their keyspace events delivered
late, twice or never; claims by two listeners; apply and acknowledge, commit then crash
before the acknowledgement, fail and retry, dead letters, retry-dead, deleting dead letters,
hand-backs, crashes holding claims, leases running out, Redis killed and restarted from
its AOF, and the due index resized (`delayq reshard`) a few shards at a time, stopped and
resumed, between any of these.

After every step it compares Redis with a plain-Python model (claims and their leases,
the due index, TTL keys, dead letters, attempts) and checks:

* no firing is claimed before its due time;
* nothing is held only in a listener's memory: every claimed firing not yet committed is
  in Redis (claimed or dead-lettered);
* one outcome row per firing, exactly the firings the model says were applied;
* the dead-letter index holds exactly the dead letters, and the dashboard's lists
  (delayq.browse) page through pending timers, claims and dead letters in order.

At the end it drains everything (re-queues dead letters, lets every lease run out) and
checks that the latest schedule of every timer fired exactly once unless it was cancelled
before it was claimed, and that no firing of a delayq timer has a made-up due time.

Time is a number in Redis that the test moves by hand: the scripts are loaded with a clock
that reads it (Scripts.register(clock=...)), and nothing else in them changes.

`pytest -m long_profile` runs the long profile (about an hour; not part of CI).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from delayq import browse
from delayq.actions import Applier
from delayq.context import Delayq
from delayq.keys import Keys, firing_id, parse_firing_id
from delayq.layout import read_layout, reshard
from delayq.listener import RECENT_WINDOW_MS, Listener
from delayq.redis_conn import Scripts
from delayq.settings import Settings
from delayq.store import CANCELLED, FIRING_NOW, NOT_PENDING, Firing, TimerStore
from tests.harness import create_orders
from tests.servers import SERVER_KINDS, RedisServer

pytestmark = pytest.mark.parametrize("server_kind", SERVER_KINDS)

CLOCK_KEY = "delayq-test:clock"
#: The scripts' clock, read from CLOCK_KEY (microseconds) instead of TIME.
TEST_CLOCK = f"""
local function now_us() return tonumber(redis.call('GET', '{CLOCK_KEY}')) end
local function now_ms() return math.floor(now_us() / 1000) end
"""
LEASE_MS = 5_000
MAX_ATTEMPTS = 3
BACKOFF_MS, BACKOFF_MAX_MS = 500, 2_000
#: A keyspace event is delivered within this long, or never (a disconnect loses it).
EVENT_MAX_AGE_MS = 60_000

#: Timers only delayq schedules, and timers only a legacy producer arms (one of them with
#: the PHP producer's numeric flag, mapped by DELAYQ_FLAG_ACTIONS).
DELAYQ_KEYS = ("A1:cancel", "A1:complete", "B2:cancel")
LEGACY_KEYS = ("L1:cancel", "L2:1")
ALL_KEYS = DELAYQ_KEYS + LEGACY_KEYS
ORDERS = ("A1", "B2", "L1", "L2")

#: The due index's shard count before any resize (few, so that a resize is a few steps),
#: and the largest a resize step grows it to.
SHARDS, MAX_SHARDS = 2, 64

#: Steps explored, over every run of the machine in this session (the closing note).
STEPS: Counter[str] = Counter()


@dataclass
class Model:
    """What Redis and the database should hold, in plain Python."""

    now: int
    pending: dict[str, int] = field(default_factory=dict)  # the due index
    ttl: dict[str, int] = field(default_factory=dict)  # TTL keys and their expiry
    claims: dict[str, int] = field(default_factory=dict)  # firing id -> lease deadline
    attempts: dict[str, int] = field(default_factory=dict)
    dead: set[str] = field(default_factory=set)
    recent: dict[str, int] = field(default_factory=dict)  # tombstones
    recorded: set[str] = field(default_factory=set)  # firings with an outcome row
    ever_claimed: set[str] = field(default_factory=set)
    #: The latest schedule of each delayq timer, until cancelled.
    latest: dict[str, int] = field(default_factory=dict)
    #: Every due time each delayq timer was scheduled for.
    scheduled: dict[str, set[int]] = field(default_factory=dict)
    #: Keyspace events not yet delivered: (kind, key, when).
    events: list[tuple[str, str, int]] = field(default_factory=list)

    def claimed_keys(self) -> set[str]:
        return {parse_firing_id(fid)[0] for fid in self.claims}

    def claim(self, key: str, due: int) -> str | None:
        fid = firing_id(key, due)
        if fid in self.claims:
            return None
        self.claims[fid] = self.now + LEASE_MS
        self.ever_claimed.add(fid)
        return fid

    def delete_key(self, key: str) -> None:
        """DEL of a TTL key: Redis emits 'expired' if it was past its time, else 'del'."""
        if key in self.ttl:
            expired = self.ttl.pop(key) <= self.now
            self.events.append(("expired" if expired else "del", key, self.now))


class Real:
    """The system under test: one Redis, one database, two listeners' worth of code."""

    def __init__(self, server: RedisServer, database_url: str, home: Path) -> None:
        self.server = server
        self.settings = Settings(
            redis_url=server.url(0),
            database_url=database_url,
            home=home,
            lease_s=LEASE_MS / 1000,
            max_attempts=MAX_ATTEMPTS,
            retry_backoff_s=BACKOFF_MS / 1000,
            retry_backoff_max_s=BACKOFF_MAX_MS / 1000,
            flag_actions="1=cancel",
            # The model's clock is not the host's: claims are exactly "due <= now" here
            # (claiming ahead and holding until due: tests/test_due_queue.py).
            claim_ahead_ms=0,
        )
        self.dq = Delayq(self.settings)
        self.dq.migrate()
        self.engine = self.dq.engine
        create_orders(self.engine, ORDERS)
        self.client = server.client()
        self.keys = Keys(shards=SHARDS)

    def reset(self, now_ms: int) -> None:
        self.client.flushall()
        self.client.set(CLOCK_KEY, now_ms * 1000)
        with self.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM delayq_outcomes"))
            conn.execute(sa.text("UPDATE orders SET status = 'unpaid'"))

    def store(self) -> TimerStore:
        return TimerStore(self.client, self.keys, Scripts.register(self.client, clock=TEST_CLOCK))

    def listener(self, clock: Any) -> Listener:
        listener = Listener(self.settings, self.client, self.engine, self.keys)
        listener.store = self.store()
        listener.applier = Applier(self.engine, self.settings, clock=clock)
        return listener

    # -- what Redis holds --------------------------------------------------------------

    def claims(self) -> dict[str, int]:
        return {m: int(s) for m, s in self.client.zrange(self.keys.claims, 0, -1, withscores=True)}

    def index(self) -> dict[str, int]:
        """The due index, checking that `heads` names each non-empty shard's earliest."""
        k = self.keys
        heads = dict(self.client.zrange(k.heads, 0, -1, withscores=True))
        shards = set(self.client.scan_iter(match=f"{k.shard_prefix}*", count=1000)) - {k.layout}
        assert shards == {f"{k.shard_prefix}{s}" for s in heads}, "heads names every shard"
        layout = read_layout(self.client, k)
        out: dict[str, int] = {}
        for shard_id, head in heads.items():
            shard = f"{k.shard_prefix}{shard_id}"
            entries = self.client.zrange(shard, 0, -1, withscores=True)
            assert entries and entries[0][1] == head, f"head of shard {shard_id} is its earliest"
            for m, _ in entries:
                assert m not in out, f"{m} indexed twice"
                # Where cancel looks: its shard, or its shard before a resize moved it.
                assert shard in k.shards_of(m, layout), f"{m} in shard {shard_id}"
                if layout.moved is None:
                    assert shard == k.shards_of(m, layout)[0], f"{m} left behind by a resize"
            out.update({m: int(s) for m, s in entries})
        return out

    def ttls(self) -> dict[str, int]:
        out = {}
        for key in ALL_KEYS:
            t = int(self.client.pexpiretime(key))
            assert t != -1, f"{key} exists without a TTL"
            if t >= 0:
                out[key] = t
        return out

    def outcomes(self) -> list[tuple[str, str, datetime, datetime, str]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT order_sn, action, due_at, fired_at, outcome FROM delayq_outcomes")
            ).all()
        return [(r[0], r[1], _dt(r[2]), _dt(r[3]), r[4]) for r in rows]


def _dt(value: Any) -> datetime:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def _ms(when: datetime) -> int:
    return round(
        (when.replace(tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(milliseconds=1)
    )


def _key_of(order_sn: str, action: str) -> str:
    return "L2:1" if (order_sn, action) == ("L2", "cancel") else f"{order_sn}:{action}"


def machine_for(real: Real) -> type[RuleBasedStateMachine]:
    class TimerMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            # Start an hour after Redis's real clock: the TTL keys the test sets never
            # really expire while it runs; only the test's clock moves them.
            sec, usec = real.client.time()
            start = (sec + 3600) * 1000 + usec // 1000
            real.reset(start)
            self.model = Model(now=start)
            self.store = real.store()
            self.listeners = [real.listener(self._clock), real.listener(self._clock)]
            self.restarts = 0

        def _clock(self) -> datetime:
            return datetime(1970, 1, 1) + timedelta(milliseconds=self.model.now)

        def _take(self, who: int, n: int) -> list[Firing]:
            q = self.listeners[who].queue
            return [f for f in q.take(n, timeout_s=0)[0] if isinstance(f, Firing)]

        def _holding(self) -> list[int]:
            return [who for who, lst in enumerate(self.listeners) if lst.queue.qsize()]

        def _memory(self, who: int) -> list[Firing]:
            return [f for f in self.listeners[who].queue.items() if isinstance(f, Firing)]

        # -- producers -------------------------------------------------------------------

        @rule(
            key=st.sampled_from(DELAYQ_KEYS),
            mode=st.sampled_from(["in", "at"]),
            delta=st.one_of(
                st.sampled_from([0, 1, 500, LEASE_MS, LEASE_MS + 1]),
                st.integers(-3_000, 90_000),
            ),
        )
        def schedule(self, key: str, mode: str, delta: int) -> None:
            m = self.model
            if mode == "in":
                delta = max(delta, 0)
            value = delta if mode == "in" else m.now + delta
            (due,) = self.store.schedule([(key, mode, value)])
            assert due == m.now + delta
            if due > m.now:
                m.ttl[key] = due
                m.events.append(("expire", key, m.now))
            else:
                m.delete_key(key)
            m.pending[key] = due
            m.latest[key] = due
            m.scheduled.setdefault(key, set()).add(due)

        @rule(key=st.sampled_from(ALL_KEYS))
        def cancel(self, key: str) -> None:
            m = self.model
            removed = key in m.pending or key in m.ttl
            due = m.pending.pop(key, None)
            ttl = m.ttl.get(key)
            m.delete_key(key)
            if (due is not None and due <= m.now) or (ttl is not None and ttl <= m.now):
                m.recent[key] = m.now
            m.latest.pop(key, None)
            claimed = key in m.claimed_keys()
            expected = (FIRING_NOW if claimed else CANCELLED) if removed else NOT_PENDING
            assert self.store.cancel(key) == expected
            if expected == CANCELLED:
                # The promise: no firing of this timer applies after cancel says True.
                assert not any(parse_firing_id(f)[0] == key for f in real.claims())

        @rule(key=st.sampled_from(LEGACY_KEYS), delta=st.integers(1, 90_000))
        def legacy_set(self, key: str, delta: int) -> None:
            """SETEX from a producer that does not use delayq."""
            m = self.model
            real.client.set(key, "redis Delayed task", pxat=m.now + delta)
            m.ttl[key] = m.now + delta
            m.events.append(("expire", key, m.now))

        @rule(key=st.sampled_from(LEGACY_KEYS))
        def legacy_delete(self, key: str) -> None:
            """DEL from a producer that does not use delayq: it disarms its timer."""
            real.client.delete(key)
            self.model.delete_key(key)

        @precondition(lambda self: any(t <= self.model.now for t in self.model.ttl.values()))
        @rule(data=st.data())
        def redis_expires_a_key(self, data: st.DataObject) -> None:
            """Redis's own expiry cycle gets to a key that is past its time."""
            m = self.model
            key = data.draw(st.sampled_from(sorted(k for k, t in m.ttl.items() if t <= m.now)))
            real.client.delete(key)
            m.delete_key(key)

        # -- keyspace events -------------------------------------------------------------

        @precondition(lambda self: self.model.events)
        @rule(data=st.data(), who=st.integers(0, 1), again=st.booleans())
        def deliver_event(self, data: st.DataObject, who: int, again: bool) -> None:
            """A keyspace event reaches a listener, in any order; possibly a second time."""
            m = self.model
            i = data.draw(st.integers(0, len(m.events) - 1))
            kind, key, when = m.events[i] if again else m.events.pop(i)
            if m.now - when > EVENT_MAX_AGE_MS:
                return  # pub/sub does not hold events for minutes: it drops them
            listener = self.listeners[who]
            if kind == "expire":
                listener._each_allowed(listener.store.adopt, [key])
                if key in m.ttl and m.pending.get(key) != m.ttl[key]:
                    m.pending[key] = m.ttl[key]
            elif kind == "del":
                listener._each_allowed(listener.store.forget, [key])
                if key not in m.ttl and m.pending.get(key, -1) > m.now:
                    del m.pending[key]
            else:
                before = len(self._memory(who))
                listener.claim_expired([key])
                got = [f.id for f in self._memory(who)[before:]]
                expected = []
                if key in m.pending:
                    if m.pending[key] <= m.now:
                        fid = m.claim(key, m.pending.pop(key))
                        expected = [fid] if fid else []
                elif key not in m.claimed_keys() and key not in m.recent:
                    fid = m.claim(key, m.now)
                    expected = [fid] if fid else []
                assert got == expected

        @precondition(lambda self: self.model.events)
        @rule(data=st.data())
        def lose_event(self, data: st.DataObject) -> None:
            """Pub/sub drops an event (a disconnect, a full output buffer)."""
            self.model.events.pop(data.draw(st.integers(0, len(self.model.events) - 1)))

        @rule()
        def sweep(self) -> None:
            """A full sweep pass adopts every TTL key set by other producers."""
            cursor = 0
            while True:
                cursor, found = self.store.scan_timers(cursor, 100)
                if found:
                    self.store.adopt(found)
                if cursor == 0:
                    break
            m = self.model
            for key, t in m.ttl.items():
                if m.pending.get(key) != t:
                    m.pending[key] = t

        # -- listeners -------------------------------------------------------------------

        @rule(who=st.integers(0, 1))
        def claim_due(self, who: int) -> None:
            m = self.model
            claim = self.listeners[who].claim_due()
            assert claim.now_ms == m.now
            stale = sorted(f for f, lease in m.claims.items() if lease <= m.now)
            for fid in stale:
                m.claims[fid] = m.now + LEASE_MS
            fresh = []
            for key, due in sorted(m.pending.items()):
                if due > m.now:
                    continue
                del m.pending[key]
                t = m.ttl.get(key)
                if t is not None and t > due:
                    m.pending[key] = t  # re-armed by its legacy producer: it wins
                    continue
                m.delete_key(key)
                fid = m.claim(key, due)
                if fid:
                    fresh.append(fid)
            assert sorted(f.id for f in claim.firings if f.reclaimed) == stale
            assert sorted(f.id for f in claim.firings if not f.reclaimed) == sorted(fresh)
            for firing in claim.firings:
                # The attempt a handler is told: 1, plus the failures Redis has counted.
                assert firing.attempt == 1 + m.attempts.get(firing.id, 0)
            for firing in claim.firings:
                assert firing.due_ms <= m.now, f"{firing.id} claimed before its due time"
                self.listeners[who].queue.put(firing)

        @precondition(lambda self: self._holding())
        @rule(data=st.data(), n=st.integers(1, 4))
        def apply_and_ack(self, data: st.DataObject, n: int) -> None:
            who = data.draw(st.sampled_from(self._holding()))
            batch = self._take(who, n)
            self.listeners[who].apply_batch(batch)
            self._applied(batch)
            self._acked(batch)

        def _settle_all(self, who: int) -> None:
            while self.listeners[who].queue.qsize():
                batch = self._take(who, 1000)
                self.listeners[who].apply_batch(batch)
                self._applied(batch)
                self._acked(batch)

        @precondition(lambda self: self._holding())
        @rule(data=st.data(), n=st.integers(1, 4))
        def commit_then_crash_before_ack(self, data: st.DataObject, n: int) -> None:
            who = data.draw(st.sampled_from(self._holding()))
            batch = self._take(who, n)
            self.listeners[who].applier.apply(batch)
            self._applied(batch)
            self.crash(who)

        @precondition(lambda self: self._holding())
        @rule(data=st.data(), n=st.integers(1, 4))
        def fail_batch(self, data: st.DataObject, n: int) -> None:
            who = data.draw(st.sampled_from(self._holding()))
            """The database refused the batch: retry later, or dead-letter."""
            m = self.model
            batch = self._take(who, n)
            self.listeners[who]._retry_later(batch, RuntimeError("database said no"))
            for fid in dict.fromkeys(f.id for f in batch):
                if fid not in m.claims:
                    continue  # acknowledged by another listener meanwhile: stays done
                m.attempts[fid] = m.attempts.get(fid, 0) + 1
                if m.attempts[fid] >= MAX_ATTEMPTS:
                    del m.claims[fid], m.attempts[fid]
                    m.dead.add(fid)
                    m.recent[parse_firing_id(fid)[0]] = m.now
                else:
                    backoff = min(BACKOFF_MAX_MS, BACKOFF_MS * 2 ** (m.attempts[fid] - 1))
                    m.claims[fid] = m.now + backoff

        @rule(who=st.integers(0, 1))
        def hand_back(self, who: int) -> None:
            """SIGTERM: what the listener holds goes back, claimable at once."""
            held = [f.id for f in self._memory(who)]
            self.listeners[who]._release_queued()
            for fid in held:
                if fid in self.model.claims:
                    self.model.claims[fid] = self.model.now

        @precondition(lambda self: self._holding())
        @rule(data=st.data())
        def renew_leases(self, data: st.DataObject) -> None:
            """A listener keeps the leases of what it holds (an external call queued or
            under way): only firings still claimed are touched."""
            m = self.model
            who = data.draw(st.sampled_from(self._holding()))
            held = sorted({f.id for f in self._memory(who)})
            self.listeners[who].store.renew(held, LEASE_MS)
            for fid in held:
                if fid in m.claims:
                    m.claims[fid] = m.now + LEASE_MS

        @rule(who=st.integers(0, 1))
        def crash(self, who: int) -> None:
            """kill -9: the listener's memory is gone; its claims stay in Redis."""
            self._take(who, 10**6)

        @rule(which=st.one_of(st.none(), st.sampled_from(ALL_KEYS)))
        def retry_dead(self, which: str | None) -> None:
            m = self.model
            names = [] if which is None else [which]
            chosen = [f for f in sorted(m.dead) if which is None or parse_firing_id(f)[0] == which]
            assert self.listeners[0].retry_dead(names) == len(chosen)
            for fid in chosen:
                m.dead.discard(fid)
                if fid not in m.claims:
                    m.claims[fid] = m.now
                m.attempts.pop(fid, None)

        @rule(which=st.one_of(st.none(), st.sampled_from(ALL_KEYS)))
        def delete_dead(self, which: str | None) -> None:
            """An operator deletes dead letters (one timer's, or all) from the dashboard."""
            m = self.model
            names = [] if which is None else [which]
            chosen = [f for f in sorted(m.dead) if which is None or parse_firing_id(f)[0] == which]
            assert browse.delete_dead(real.client, real.keys, names) == len(chosen)
            m.dead.difference_update(chosen)

        @rule(
            ms=st.sampled_from(
                [1, 10, 499, 500, 1_000, LEASE_MS, LEASE_MS + 1, 30_000, RECENT_WINDOW_MS + 1]
            )
        )
        def advance(self, ms: int) -> None:
            self.model.now += ms
            real.client.set(CLOCK_KEY, self.model.now * 1000)

        @precondition(lambda self: read_layout(real.client, real.keys).shards < MAX_SHARDS)
        @rule(factor=st.sampled_from([2, 4]), stop_after=st.integers(0, 4))
        def resize(self, factor: int, stop_after: int) -> None:
            """`delayq reshard`: starts a resize (or resumes one that stopped) and stops
            after `stop_after` shards moved (0: as soon as the new count is recorded), as a
            crash would; the next resize step goes on. It changes no timer: the model stays
            as it is."""
            layout = read_layout(real.client, real.keys)
            target = layout.shards if layout.moved is not None else layout.shards * factor
            moved: list[int] = []

            def progress(done: int, total: int) -> None:
                moved.append(done)
                if len(moved) > stop_after and done < total:
                    raise _Stopped

            try:
                reshard(real.client, real.keys, target, progress=progress)
            except _Stopped:
                assert read_layout(real.client, real.keys).moved == moved[-1]

        @precondition(lambda self: self.restarts < 2)
        @rule()
        def redis_killed_and_restarted_from_its_aof(self) -> None:
            self.restarts += 1
            real.server.kill()
            real.server.start()
            real.client.connection_pool.disconnect()

        # -- bookkeeping ----------------------------------------------------------------

        def _applied(self, batch: list[Firing]) -> None:
            self.model.recorded.update(f.id for f in batch)

        def _acked(self, batch: list[Firing]) -> None:
            m = self.model
            for fid in dict.fromkeys(f.id for f in batch):
                if m.claims.pop(fid, None) is not None:
                    m.attempts.pop(fid, None)
                m.recent[parse_firing_id(fid)[0]] = m.now
            m.recent = {k: t for k, t in m.recent.items() if t >= m.now - RECENT_WINDOW_MS}

        # -- invariants -----------------------------------------------------------------

        @invariant()
        def redis_matches_the_model(self) -> None:
            STEPS["steps"] += 1
            m = self.model
            assert real.claims() == m.claims
            assert real.index() == m.pending
            assert real.ttls() == m.ttl
            assert set(real.client.hkeys(real.keys.dead)) == m.dead
            dead_index = real.client.zrange(real.keys.dead_index, 0, -1, withscores=True)
            assert {f: int(due) for f, due in dead_index} == {
                f: parse_firing_id(f)[1] for f in m.dead
            }
            per_key = Counter(parse_firing_id(f)[0] for f in m.claims)
            assert {
                k: int(v) for k, v in real.client.hgetall(real.keys.claims_per_key).items()
            } == dict(per_key)
            attempts = {k: int(v) for k, v in real.client.hgetall(real.keys.attempts).items()}
            assert attempts == m.attempts
            assert set(real.client.zrange(real.keys.recent, 0, -1)) == set(m.recent)

        @invariant()
        def the_dashboards_lists_page_in_order(self) -> None:
            """Pending, in flight and dead letters, page by page (delayq.browse)."""
            m = self.model
            for pager, expected in (
                (browse.pending_page, sorted((d, k) for k, d in m.pending.items())),
                (browse.in_flight_page, sorted((lease, f) for f, lease in m.claims.items())),
                (browse.dead_page, sorted((parse_firing_id(f)[1], f) for f in m.dead)),
            ):
                seen: list[tuple[int, str]] = []
                after = None
                while True:
                    page = pager(real.client, real.keys, after=after, limit=2)
                    seen += [
                        (r.get("lease_ms", r["due_ms"]), r.get("firing", r["timer"]))
                        for r in page.rows
                    ]
                    if page.next is None:
                        break
                    after = page.next
                assert seen == expected, pager.__name__

        @invariant()
        def nothing_is_held_only_in_a_listeners_memory(self) -> None:
            m = self.model
            in_redis = set(real.claims()) | set(real.client.hkeys(real.keys.dead))
            for who in (0, 1):
                for firing in self._memory(who):
                    if firing.id not in m.recorded:
                        assert firing.id in in_redis, f"{firing.id} only in listener {who}"

        @invariant()
        def one_outcome_row_per_firing(self) -> None:
            rows = real.outcomes()
            firings = [firing_id(_key_of(sn, action), _ms(due)) for sn, action, due, _, _ in rows]
            assert len(firings) == len(set(firings)), "a firing recorded twice"
            assert set(firings) == self.model.recorded
            for _, _, due, fired, _ in rows:
                assert fired >= due, "applied before its due time"

        def teardown(self) -> None:
            """Drain, then: the latest schedule of every timer fired exactly once."""
            m = self.model
            for who in (0, 1):
                self.crash(who)
            self.retry_dead(None)
            self.sweep()
            for _ in range(50):
                if not m.pending and not m.claims:
                    break
                self.advance(RECENT_WINDOW_MS + 1)
                self.claim_due(0)
                self._settle_all(0)
                self.redis_matches_the_model()
            assert not m.pending and not m.claims and not m.dead
            rows = real.outcomes()
            fired = Counter((_key_of(sn, action), _ms(due)) for sn, action, due, _, _ in rows)
            for key, due in m.latest.items():
                assert fired[(key, due)] == 1, (
                    f"latest schedule of {key} at {due} fired {fired[(key, due)]}"
                )
            assert {firing_id(k, d) for k, d in fired} == m.ever_claimed
            for (key, due), _ in fired.items():
                if key in DELAYQ_KEYS:
                    assert due in m.scheduled.get(key, set()), f"{key} fired for a made-up {due}"

    return TimerMachine


class _Stopped(Exception):
    """A resize stopped part way (what a crash or ^C does)."""


def _run(real: Real, max_examples: int, steps: int) -> None:
    run_state_machine_as_test(
        machine_for(real),
        settings=settings(
            max_examples=max_examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        ),
    )


@pytest.fixture
def real(redis_factory: Any, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Real]:
    server = redis_factory(appendonly=True, extra={"appendfsync": "always"})
    database_url: str = request.getfixturevalue(f"{request.param}_url")
    r = Real(server, database_url, tmp_path / "home")
    yield r
    r.engine.dispose()


#: The fixed budget CI runs (examples, steps per example): most on SQLite, the fastest.
CI_BUDGET = {"sqlite": (100, 60), "mariadb": (40, 50), "postgres": (40, 50)}


@pytest.mark.parametrize("real", list(CI_BUDGET), indirect=True)
def test_timer_state_machine_matches_its_model(real: Real, request: pytest.FixtureRequest) -> None:
    before = STEPS["steps"]
    _run(real, *CI_BUDGET[request.node.callspec.params["real"]])
    print(f"\nstate machine: {STEPS['steps'] - before} steps explored")


@pytest.mark.long_profile
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("real", ["sqlite", "mariadb"], indirect=True)
def test_timer_state_machine_matches_its_model_long_profile(real: Real) -> None:
    before = STEPS["steps"]
    _run(real, max_examples=1000, steps=100)
    print(f"\nstate machine (long profile): {STEPS['steps'] - before} steps explored")
