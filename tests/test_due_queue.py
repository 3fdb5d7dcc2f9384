"""Claiming ahead of the due time and holding each firing until it is due.

The hand-off queue (delayq.due_queue) is proven against a plain model with hypothesis on a
clock the test moves; the claim script's window and the listener's "never early" are
checked on a real redis-server, with the listener's own threads."""

from __future__ import annotations

import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from delayq.context import Delayq
from delayq.due_queue import (
    TIMER_SLACK_NS,
    DueQueue,
    fine_timer_slack,
    ready_at,
    sleep_until,
    timer_slack_ns,
)
from delayq.settings import Settings
from tests.harness import create_orders, outcome_rows
from tests.servers import SERVER_KINDS, RedisServer, wait_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class DueQueueMachine(RuleBasedStateMachine):
    """Model: a bag of (ready, n) items. A take may return only items ready by the instant
    it names, that instant is never more than `early` ahead of now, and each take returns
    the earliest items; nothing is lost or returned twice."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.queue: DueQueue[int] = DueQueue(clock=self.clock)
        self.model: dict[int, float] = {}
        self.taken: set[int] = set()
        self.n = 0

    @rule(offset_ms=st.integers(-5, 20), now=st.booleans())
    def put(self, offset_ms: int, now: bool) -> None:
        ready = 0.0 if now else self.clock.now + offset_ms / 1000
        self.n += 1
        self.queue.put(self.n, ready)
        self.model[self.n] = ready

    @rule(ms=st.integers(0, 10))
    def advance(self, ms: int) -> None:
        self.clock.now += ms / 1000

    def _takeable(self, early_s: float) -> bool:
        return bool(self.model) and min(self.model.values()) - early_s <= self.clock.now

    @precondition(lambda self: bool(self.model))
    @rule(limit=st.integers(1, 5), early_ms=st.sampled_from([0, 1, 3]))
    def take(self, limit: int, early_ms: int) -> None:
        early_s = early_ms / 1000
        if not self._takeable(early_s):
            return  # a real applier would wait here; the fake clock never moves by itself
        items, ready = self.queue.take(limit, 0.0, early_s)
        assert 1 <= len(items) <= limit
        now = self.clock.now
        assert ready <= now + early_s + 1e-9, "handed out more than `early` before due"
        for item in items:
            assert item not in self.taken, f"item {item} handed out twice"
            assert self.model[item] <= max(now, ready) + 1e-9, "handed out before its instant"
        left = [r for i, r in self.model.items() if i not in items]
        if left and len(items) < limit:
            # Whatever it left behind is later than its own instant.
            assert min(left) > max(now, ready) - 1e-9
        if left:
            assert max(self.model[i] for i in items) <= min(left) + 1e-9, "not earliest first"
        for item in items:
            self.taken.add(item)
            del self.model[item]

    @precondition(lambda self: not self.model)
    @rule()
    def take_from_empty(self) -> None:
        assert self.queue.take(3, 0.0, 0.001) == ([], 0.0)

    @invariant()
    def sizes_agree(self) -> None:
        assert self.queue.qsize() == len(self.model)

    def teardown(self) -> None:
        left = self.queue.drain()
        assert sorted(left) == sorted(self.model), "an item was lost"
        assert [self.model[i] for i in left] == sorted(self.model[i] for i in left)


TestDueQueueAgainstModel = DueQueueMachine.TestCase
TestDueQueueAgainstModel.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None
)


@given(
    due_ms=st.integers(1_700_000_000_000, 1_800_000_000_000),
    redis_lag_ms=st.floats(0, 50),
    wall_skew_ms=st.floats(-20, 20),
    ahead_ms=st.floats(0, 10),
)
def test_ready_at_is_never_before_the_due_time_by_either_clock(
    due_ms: int, redis_lag_ms: float, wall_skew_ms: float, ahead_ms: float
) -> None:
    # Redis stamped its reply redis_lag_ms before it arrived here; this host's wall clock
    # reads wall_skew_ms ahead of Redis's; the timer is due ahead_ms after Redis's stamp.
    redis_now = due_ms - ahead_ms
    mono = 5000.0
    wall = (redis_now + redis_lag_ms + wall_skew_ms) / 1000
    ready = ready_at(due_ms, redis_now, mono, wall)
    # Redis's clock at `ready`: its stamp, plus the lag, plus the time waited here.
    assert redis_now + redis_lag_ms + (ready - mono) * 1000 >= due_ms - 1e-6
    # This host's wall clock at `ready`.
    assert wall * 1000 + (ready - mono) * 1000 >= due_ms - 1e-6


def test_sleep_until_returns_at_the_instant_never_before() -> None:
    for wait_s in (0.0, 0.0001, 0.002, 0.01):
        target = time.monotonic() + wait_s
        sleep_until(target)
        assert time.monotonic() >= target


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl timer slack is Linux's")
def test_fine_timer_slack_holds_for_the_threads_the_listener_starts_after_it() -> None:
    """The listener asks for a 1 µs timer slack before it starts its threads: each of
    them (appliers sleeping to a due time) wakes within it, not Linux's default 50 µs."""
    seen: dict[str, int | None] = {}

    def listener_main() -> None:
        assert fine_timer_slack()
        child = threading.Thread(target=lambda: seen.update(child=timer_slack_ns()))
        child.start()
        child.join()
        seen["after"] = timer_slack_ns()

    main = threading.Thread(target=listener_main)  # not pytest's own thread
    main.start()
    main.join()
    assert seen["after"] == seen["child"] == TIMER_SLACK_NS


def test_an_applier_waiting_for_a_held_firing_is_woken_by_one_due_sooner() -> None:
    q: DueQueue[str] = DueQueue()
    got: list[tuple[list[str], float]] = []
    t = threading.Thread(target=lambda: got.append(q.take(10, 5.0)))
    q.put("later", time.monotonic() + 2.0)
    t.start()
    time.sleep(0.05)  # the taker is waiting for "later"
    q.put("now")
    t.join(timeout=1.0)
    assert got and got[0][0] == ["now"]


# -- the claim script's window and the listener, on a real redis-server --------------------

pytestmark_real = pytest.mark.parametrize("server_kind", SERVER_KINDS)


def _dq(server: RedisServer, sqlite_url: str, home: Path, **kw: object) -> Delayq:
    dq = Delayq(Settings(redis_url=server.url(0), database_url=sqlite_url, home=home, **kw))
    dq.migrate()
    return dq


@pytestmark_real
def test_claim_ahead_takes_timers_due_within_the_window_and_no_later_ones(
    redis_server: RedisServer, sqlite_url: str, tmp_path: Path
) -> None:
    dq = _dq(redis_server, sqlite_url, tmp_path)
    now = datetime.now(UTC)
    dq.producer.schedule("SOON", at=now + timedelta(milliseconds=300))
    dq.producer.schedule("LATER", at=now + timedelta(seconds=30))
    assert dq.store.claim_due(100, 60_000).firings == []  # nothing is due yet
    claim = dq.store.claim_due(100, 60_000, 2_000)
    assert [f.key for f in claim.firings] == ["SOON:cancel"]
    assert claim.firings[0].due_ms > claim.now_ms  # claimed before it was due
    assert claim.next_ms >= claim.now_ms + 20_000  # the next wake-up: LATER's due time


@pytestmark_real
def test_timers_claimed_ahead_are_applied_at_their_due_time_never_before(
    redis_server: RedisServer, sqlite_url: str, tmp_path: Path
) -> None:
    dq = _dq(redis_server, sqlite_url, tmp_path, claim_ahead_ms=50)
    orders = [f"AHEAD{i}" for i in range(20)]
    create_orders(dq.engine, orders)
    listener = dq.listener()
    runner = threading.Thread(target=listener.run, daemon=True)
    runner.start()
    try:
        wait_for(listener.ready.is_set, 15, what="the listener to start")
        start = datetime.now(UTC) + timedelta(milliseconds=300)
        for i, sn in enumerate(orders):
            dq.producer.schedule(sn, at=start + timedelta(milliseconds=7 * i))
        wait_for(lambda: len(outcome_rows(dq.engine)) == len(orders), 15, what="every firing")
    finally:
        listener.stop()
        runner.join(timeout=30)
    rows = outcome_rows(dq.engine)
    assert sorted(r.order_sn for r in rows) == sorted(orders)
    # Claimed up to 50 ms ahead, yet none was applied before its due time.
    assert all(r.fired_at >= r.due_at for r in rows), [(r.fired_at, r.due_at) for r in rows]
    assert all(r.outcome == "applied" for r in rows)
