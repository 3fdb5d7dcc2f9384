"""delayq on a Redis Cluster and a Valkey cluster (issue 10), end to end and under faults.

Every test runs against a real cluster of 3 primaries with a replica each (tests/cluster.py),
once of redis-server and once of valkey-server, with `delayq listen` as a real subprocess
and the outcomes read from the database. Each asserts, from `delayq_outcomes` and the
orders table: 0 lost (every timer that must fire has its `applied` row and its order is
cancelled), 0 applied twice (exactly one row per timer and due time, all `applied`), none
early (fired_at >= due_at); each prints the lateness it measured.

The last test drives ClusterStore itself through a Hypothesis state machine against a
real cluster, checked against a plain model after every step: the routing of every call
to its slot's partition, and the due view (claim replies and wake-ups alone must lead the
listeners to every due firing, without a full read of every slot).

Long ones are marked `slow`; the default run keeps one failover test (CLUSTER FAILOVER,
on Redis).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import delayq.producer
from delayq.cluster.slots import partition, slot_of
from delayq.cluster.store import ClusterStore
from delayq.errors import DelayqError
from delayq.keys import Keys, firing_id, parse_firing_id
from delayq.listener import RECENT_WINDOW_MS
from delayq.producer import Producer
from delayq.redis_conn import Scripts
from delayq.settings import Settings
from delayq.store import CANCELLED, FIRING_NOW, NOT_PENDING, Claim, Firing
from delayq.timing import from_ms
from tests.cluster import SLOTS, ClusterFactory, ServerCluster
from tests.harness import (
    ListenerProcess,
    clean_env,
    create_orders,
    engine_for,
    migrate_cli,
    outcome_rows,
    percentile,
    statuses,
)
from tests.servers import SERVER_KINDS, ServerKind, log_tail, wait_for

#: Every test runs on each server kind; some only in the slow run on Valkey.
ON_BOTH = pytest.mark.parametrize("server_kind", SERVER_KINDS)
VALKEY_SLOW = pytest.mark.parametrize(
    "server_kind", ["redis", pytest.param("valkey", marks=pytest.mark.slow)]
)

#: Short leases and retries, so that a firing whose claim or acknowledgement a failover
#: lost is taken over within the test.
FAST = {"LEASE_S": "3", "RETRY_BACKOFF_S": "0.1", "RETRY_BACKOFF_MAX_S": "0.5"}
#: Long enough for every timer of a test to fire on a loaded 2-core machine, faults included.
FIRE_TIMEOUT_S = 90.0

ListenerFactory = Callable[..., ListenerProcess]
ProducerFactory = Callable[..., Producer]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def listeners(tmp_path: Path) -> Iterator[ListenerFactory]:
    """Starts `delayq listen` subprocesses; every one is stopped at the end, even on failure."""
    started: list[ListenerProcess] = []

    def make(env: dict[str, str], *, wait_ready: bool = True) -> ListenerProcess:
        proc = ListenerProcess(env, tmp_path / f"listener-{len(started)}.log")
        started.append(proc)
        return proc.start(wait_ready=wait_ready)

    try:
        yield make
    finally:
        for proc in started:
            proc.stop()


@pytest.fixture
def producers() -> Iterator[ProducerFactory]:
    """Producers on a cluster (as an order service makes them from its settings); their
    clients are closed at the end."""
    made: list[Producer] = []

    def make(cluster: ServerCluster, **options: Any) -> Producer:
        producer = Producer.from_settings(Settings(redis_url=cluster.url, **options))
        made.append(producer)
        return producer

    try:
        yield make
    finally:
        for producer in made:
            with contextlib.suppress(Exception):
                producer.client.close()


def cluster_env(
    cluster: ServerCluster, database_url: str, tmp_path: Path, **extra: str
) -> dict[str, str]:
    """The listener's environment on `cluster`, with a migrated database."""
    env = clean_env(
        REDIS_URL=cluster.url,
        DATABASE_URL=database_url,
        HOME=str(tmp_path / "home"),
        **{**FAST, **extra},
    )
    migrate_cli(env)
    return env


# -- helpers ----------------------------------------------------------------------------------


def redis_now_ms(cluster: ServerCluster) -> int:
    """The cluster's clock (every node runs on this host): TIME of a live primary."""
    with contextlib.closing(cluster.primaries()[0].admin()) as admin:
        sec, usec = admin.time()
    return int(sec) * 1000 + int(usec) // 1000


def orders(n: int, prefix: str) -> list[str]:
    return [f"{prefix}-{i:06d}" for i in range(n)]


def spread(sns: Sequence[str], first_ms: int, span_ms: int) -> dict[str, int]:
    """A due time (epoch ms) for each order, evenly from first_ms over span_ms."""
    step = span_ms / max(1, len(sns) - 1)
    return {sn: first_ms + round(i * step) for i, sn in enumerate(sns)}


def schedule_at(producer: Producer, due: dict[str, int]) -> None:
    producer.schedule_many((sn, from_ms(ms)) for sn, ms in due.items())


def applied_count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT COUNT(*) FROM delayq_outcomes WHERE outcome = 'applied'")
            ).scalar_one()
        )


def tails(procs: Sequence[ListenerProcess]) -> str:
    return "\n".join(f"--- {p.log.name}:\n{log_tail(p.log, 30)}" for p in procs)


def wait_applied(
    engine: sa.Engine,
    sns: Collection[str],
    procs: Sequence[ListenerProcess],
    timeout_s: float = FIRE_TIMEOUT_S,
) -> None:
    """Wait until every order of `sns` has its applied outcome (log tails on a timeout)."""
    wanted = set(sns)

    def done() -> bool:
        with engine.connect() as conn:
            fired = {
                sn
                for (sn,) in conn.execute(
                    sa.text("SELECT order_sn FROM delayq_outcomes WHERE outcome = 'applied'")
                )
            }
        return wanted <= fired

    try:
        wait_for(done, timeout_s, interval_s=0.2, what=f"{len(wanted)} timers applied")
    except AssertionError as exc:
        with engine.connect() as conn:
            n = conn.execute(sa.text("SELECT COUNT(*) FROM delayq_outcomes")).scalar_one()
        raise AssertionError(f"{exc} ({n} outcome rows)\n{tails(procs)}") from None


@dataclass
class Verdict:
    """What the outcomes table says about a run."""

    lateness_ms: list[float]

    def report(self, label: str, more: str = "") -> None:
        """Print the lateness (pytest -s, or the captured output of a failure)."""
        late = self.lateness_ms
        print(
            f"\n{label}: {len(late)} fired, lateness ms p50 {percentile(late, 0.5):.1f} "
            f"p99 {percentile(late, 0.99):.1f} max {max(late):.1f}{more}"
        )


def assert_fired_exactly_once(
    engine: sa.Engine,
    must: Collection[str],
    *,
    may: Collection[str] = (),
    never: Collection[str] = (),
) -> Verdict:
    """Every order of `must` applied exactly once and cancelled; those of `may` (a schedule
    that reported an error) at most once; those of `never` (cancelled timers) not at all;
    no other outcome row; none fired before its due time. Returns the lateness of `must`."""
    rows = outcome_rows(engine)
    per_firing = Counter((r.order_sn, r.action, r.due_at) for r in rows)
    assert max(per_firing.values(), default=1) == 1, "a firing recorded twice"
    not_applied = [r for r in rows if r.outcome != "applied"]
    assert not not_applied, f"{len(not_applied)} outcomes not applied: {not_applied[:3]}"
    per_order = Counter(r.order_sn for r in rows)
    lost = sorted(set(must) - set(per_order))
    assert not lost, f"{len(lost)} timers lost: {lost[:5]}"
    twice = sorted(sn for sn, n in per_order.items() if n > 1)
    assert not twice, f"{len(twice)} timers applied twice: {twice[:5]}"
    fired_never = sorted(set(never) & set(per_order))
    assert not fired_never, f"{len(fired_never)} cancelled timers fired: {fired_never[:5]}"
    stray = sorted(set(per_order) - set(must) - set(may))
    assert not stray, f"{len(stray)} outcomes of timers never scheduled: {stray[:5]}"
    early = [r for r in rows if r.fired_at < r.due_at]
    assert not early, f"{len(early)} fired before their due time: {early[:3]}"
    status = statuses(engine)
    assert all(status[sn] == "cancelled" for sn in must)
    assert all(status[sn] == "unpaid" for sn in never)
    fired = set(per_order)
    assert all(status[sn] == ("cancelled" if sn in fired else "unpaid") for sn in may)
    return Verdict([r.lateness_ms for r in rows if r.order_sn in set(must)])


def primaries_of(cluster: ServerCluster, sns: Collection[str]) -> Counter[int]:
    """How many of the orders' timer keys each primary (by port) holds."""
    owner = {slot: node.port for node in cluster.primaries() for slot in cluster.slots_of(node)}
    return Counter(owner[slot_of(f"{sn}:cancel")] for sn in sns)


def wait_until_replicated(cluster: ServerCluster) -> None:
    """Every replica has its primary's last write (WAIT on each primary)."""
    for primary in cluster.primaries():
        replicas = len(cluster.replicas(primary))
        with contextlib.closing(primary.admin()) as admin:
            assert int(admin.execute_command("WAIT", replicas, 10_000)) >= replicas


# -- 1. end to end ----------------------------------------------------------------------------


@ON_BOTH
def test_timers_scheduled_on_a_cluster_fire_once_on_every_primary_and_cancelled_ones_never(
    redis_cluster: ServerCluster,
    sqlite_url: str,
    tmp_path: Path,
    listeners: ListenerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = cluster_env(redis_cluster, sqlite_url, tmp_path)
    engine = engine_for(sqlite_url)
    fire, cancel = orders(300, "FIRE"), orders(100, "PAID")
    create_orders(engine, fire + cancel)
    listener = listeners(env)

    # The order service's own calls, configured by DELAYQ_REDIS_URL alone.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DELAYQ_REDIS_URL", redis_cluster.url)
    monkeypatch.setattr(delayq.producer, "_default", None)
    try:
        now = redis_now_ms(redis_cluster)
        # The paid orders fall due among the others: the last unpaid one is due last.
        due = spread(fire, now + 2500, 2000) | spread(cancel, now + 2400, 1900)
        assert delayq.schedule_many((sn, from_ms(due[sn])) for sn in fire + cancel) == 400
        assert all(delayq.cancel_expiry(sn) for sn in cancel)
        store = ClusterStore(redis_cluster.client(), Keys())
        for sn in fire[:20]:
            assert store.timer_state(f"{sn}:cancel").pending_due_ms == due[sn]
    finally:
        if delayq.producer._default is not None:
            delayq.producer._default.client.close()

    # Spread over every primary: timer keys and delayq's partitions alike.
    assert len(primaries_of(redis_cluster, fire)) == 3
    for primary in redis_cluster.primaries():
        with contextlib.closing(primary.admin()) as admin:
            assert any(admin.scan_iter(match="FIRE-*:cancel", count=1000))
            assert any(admin.scan_iter(match="{delayq:*}:due:0", count=1000))

    wait_applied(engine, fire, [listener])
    assert_fired_exactly_once(engine, fire, never=cancel).report(
        f"{redis_cluster.kind} cluster, end to end"
    )
    for sn in fire + cancel:
        state = store.timer_state(f"{sn}:cancel")
        assert state.pending_due_ms is None and state.ttl_ms is None and state.dead == []
    wait_for(
        lambda: all(not store.timer_state(f"{sn}:cancel").claims for sn in fire),
        30,
        interval_s=0.2,
        what="every firing acknowledged",
    )
    assert "Traceback" not in listener.text()


# -- 2. CLUSTER FAILOVER ----------------------------------------------------------------------


@VALKEY_SLOW
def test_cluster_failover_while_timers_fall_due_loses_none_and_applies_none_twice(
    server_kind: ServerKind,
    redis_cluster: ServerCluster,
    sqlite_url: str,
    tmp_path: Path,
    listeners: ListenerFactory,
    producers: ProducerFactory,
) -> None:
    env = cluster_env(redis_cluster, sqlite_url, tmp_path)
    engine = engine_for(sqlite_url)
    sns = orders(600, "FO")
    create_orders(engine, sns)
    listener = listeners(env)
    due = spread(sns, redis_now_ms(redis_cluster) + 1500, 3000)
    schedule_at(producers(redis_cluster), due)
    wait_until_replicated(redis_cluster)

    first = redis_cluster.primaries()[0]
    wait_for(lambda: applied_count(engine) >= 150, 30, what="150 timers applied first")
    promoted = redis_cluster.failover(redis_cluster.replicas(first)[0])
    assert redis_cluster.replicas(promoted)[0].port == first.port

    wait_applied(engine, sns, [listener])
    verdict = assert_fired_exactly_once(engine, sns)
    verdict.report(f"{server_kind} cluster, CLUSTER FAILOVER while due")
    assert primaries_of(redis_cluster, sns)[promoted.port] > 0


# -- 3. kill -9 of a primary ------------------------------------------------------------------


@dataclass
class Scheduler:
    """Schedules one timer at a time from a thread (an order service taking orders), and
    records which calls returned without an error."""

    producer: Producer
    due_in_ms: int
    acknowledged: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self, engine: sa.Engine) -> Scheduler:
        self.engine = engine
        self.thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        for i in itertools.count():
            if self.stop.is_set():
                return
            sn = f"ACK-{i:06d}"
            create_orders(self.engine, [sn])
            try:
                self.producer.schedule(sn, timedelta(milliseconds=self.due_in_ms))
            except DelayqError as exc:
                self.refused.append((sn, type(exc).__name__))
            else:
                self.acknowledged.append(sn)
            self.stop.wait(0.01)

    def finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=60)
            assert not self.thread.is_alive(), "the scheduler thread did not stop"

    @property
    def issued(self) -> int:
        return len(self.acknowledged) + len(self.refused)


@pytest.mark.slow
@ON_BOTH
def test_primary_killed_while_timers_fall_due_loses_no_timer_and_no_replicated_schedule(
    server_kind: ServerKind,
    redis_cluster: ServerCluster,
    mariadb_url: str,
    tmp_path: Path,
    listeners: ListenerFactory,
    producers: ProducerFactory,
) -> None:
    env = cluster_env(redis_cluster, mariadb_url, tmp_path)
    engine = engine_for(mariadb_url)
    sns = orders(600, "KILL")
    create_orders(engine, sns)
    listener = listeners(env)
    waiting = producers(redis_cluster, wait_replicas=1, wait_timeout_ms=1000)
    due = spread(sns, redis_now_ms(redis_cluster) + 1500, 4000)
    schedule_at(waiting, due)

    scheduler = Scheduler(waiting, due_in_ms=1500).start(engine)
    try:
        wait_for(lambda: applied_count(engine) >= 150, 30, what="150 timers applied first")
        wait_for(lambda: len(scheduler.acknowledged) >= 50, 30, what="50 schedules acknowledged")
        before_kill = scheduler.issued
        killed, promoted = redis_cluster.kill_primary(redis_cluster.primaries()[1])
        wait_for(
            lambda: scheduler.issued >= before_kill + 50, 60, what="schedules after the failover"
        )
        # The killed node comes back as a replica of the promoted one: WAIT 1 succeeds again.
        killed.restart()
        redis_cluster.wait_ok()
        after_rejoin = len(scheduler.acknowledged)
        wait_for(
            lambda: len(scheduler.acknowledged) >= after_rejoin + 50,
            60,
            what="schedules acknowledged after the rejoin",
        )
    finally:
        scheduler.finish()

    acknowledged = set(scheduler.acknowledged)
    # NotReplicated says the write reached the primary (only WAIT fell short): with no
    # second failover to lose it, it fires. Other errors promise nothing either way.
    unreplicated = {sn for sn, kind in scheduler.refused if kind == "NotReplicated"}
    refused = {sn for sn, _ in scheduler.refused} - unreplicated
    wait_applied(engine, [*sns, *acknowledged, *unreplicated], [listener])
    store = ClusterStore(redis_cluster.client(), Keys())

    def refused_settled() -> bool:
        """Every other refused schedule fired, or left nothing in Redis to fire."""
        with engine.connect() as conn:
            fired = {sn for (sn,) in conn.execute(sa.text("SELECT order_sn FROM delayq_outcomes"))}
        for sn in refused - fired:
            state = store.timer_state(f"{sn}:cancel")
            if state.pending_due_ms is not None or state.claims:
                return False
        return True

    wait_for(refused_settled, 30, interval_s=0.5, what="refused schedules fired or gone")
    verdict = assert_fired_exactly_once(engine, [*sns, *acknowledged, *unreplicated], may=refused)
    verdict.report(
        f"{server_kind} cluster, kill -9 of a primary while due",
        f"; schedules with WAIT 1: {len(acknowledged)} acknowledged (all fired), "
        f"{len(unreplicated)} NotReplicated (all fired), {len(refused)} other errors "
        f"{dict(Counter(kind for sn, kind in scheduler.refused if sn in refused))}",
    )
    assert primaries_of(redis_cluster, sns)[promoted.port] > 0


# -- 4. resharding ----------------------------------------------------------------------------


@pytest.mark.slow
@ON_BOTH
def test_slots_resharded_while_timers_are_pending_and_falling_due_lose_none(
    server_kind: ServerKind,
    redis_cluster: ServerCluster,
    sqlite_url: str,
    tmp_path: Path,
    listeners: ListenerFactory,
    producers: ProducerFactory,
) -> None:
    env = cluster_env(redis_cluster, sqlite_url, tmp_path)
    engine = engine_for(sqlite_url)
    sns, far = orders(1500, "RS"), orders(3000, "FAR")
    create_orders(engine, sns)
    producer = producers(redis_cluster)
    now = redis_now_ms(redis_cluster)
    far_due = {sn: now + 86_400_000 + i for i, sn in enumerate(far)}
    schedule_at(producer, far_due)
    listener = listeners(env)
    due = spread(sns, now + 2000, 8000)
    schedule_at(producer, due)

    source, target = redis_cluster.primaries()[:2]
    moving = set(sorted(redis_cluster.slots_of(source))[:2000])
    started, applied_before = time.monotonic(), applied_count(engine)
    reshard = redis_cluster.reshard_async(2000, source, target)
    redis_cluster.wait_reshard(reshard)
    took_s, applied_during = time.monotonic() - started, applied_count(engine) - applied_before
    assert moving <= redis_cluster.slots_of(target)
    assert applied_during > 0, "timers fell due while the slots moved"

    wait_applied(engine, sns, [listener])
    verdict = assert_fired_exactly_once(engine, sns)
    verdict.report(
        f"{server_kind} cluster, 2,000 slots resharded while due",
        f"; the reshard took {took_s:.1f} s, {applied_during} applied meanwhile",
    )
    moved = [sn for sn in sns if slot_of(f"{sn}:cancel") in moving]
    assert moved, "some of the timers falling due lived in the moved slots"
    # Every far timer is still pending. MIGRATE carries a key's TTL as time remaining, so
    # a moved TTL key expires a few ms later than it did; the sweep re-indexes the timer
    # from its TTL key (the last schedule wins): later, never earlier.
    store = ClusterStore(redis_cluster.client(), Keys())
    moved_far = {sn for sn in far if slot_of(f"{sn}:cancel") in moving}
    assert moved_far
    drift = {}
    for sn in far:
        pending = store.timer_state(f"{sn}:cancel").pending_due_ms
        assert pending is not None, f"far timer {sn} lost"
        drift[sn] = pending - far_due[sn]
    assert all(drift[sn] == 0 for sn in far if sn not in moved_far)
    assert all(0 <= drift[sn] <= 1000 for sn in moved_far), max(drift.values())
    print(
        f"{len(moved_far)} far timers moved with their slots, due time moved later by "
        f"up to {max(drift.values())} ms ({sum(1 for v in drift.values() if v)} of them)"
    )


# -- 5. two listeners -------------------------------------------------------------------------


@ON_BOTH
def test_two_listeners_on_a_cluster_apply_each_timer_once(
    server_kind: ServerKind,
    redis_cluster: ServerCluster,
    mariadb_url: str,
    tmp_path: Path,
    listeners: ListenerFactory,
    producers: ProducerFactory,
) -> None:
    env = cluster_env(redis_cluster, mariadb_url, tmp_path)
    engine = engine_for(mariadb_url)
    sns = orders(1000, "TWO")
    create_orders(engine, sns)
    both = [listeners(env), listeners(env)]
    schedule_at(producers(redis_cluster), spread(sns, redis_now_ms(redis_cluster) + 1500, 3000))
    wait_applied(engine, sns, both)
    assert_fired_exactly_once(engine, sns).report(f"{server_kind} cluster, two listeners")
    for proc in both:
        assert "Traceback" not in proc.text(), tails(both)


# -- 6. a primary added -----------------------------------------------------------------------


@pytest.mark.slow
@ON_BOTH
def test_primary_added_while_running_fires_its_slots_timers_and_is_heard(
    server_kind: ServerKind,
    redis_cluster: ServerCluster,
    sqlite_url: str,
    tmp_path: Path,
    listeners: ListenerFactory,
    producers: ProducerFactory,
) -> None:
    # The steady sweep at its slowest (200 keys every 2 s) over 20,000 plain keys: a full
    # pass takes minutes, so a legacy timer fired within seconds was heard, not swept up.
    env = cluster_env(redis_cluster, sqlite_url, tmp_path, SWEEP_KEYS_PER_S="100")
    filler = redis_cluster.client()
    pipe = filler.pipeline()
    for i in range(20_000):
        pipe.set(f"cache:{i}", "x")
    pipe.execute()
    engine = engine_for(sqlite_url)
    before = orders(600, "OLD")
    create_orders(engine, before)
    listener = listeners(env)
    producer = producers(redis_cluster)
    schedule_at(producer, spread(before, redis_now_ms(redis_cluster) + 4000, 4000))

    new = redis_cluster.add_primary()
    new_slots = redis_cluster.slots_of(new)
    assert len(new_slots) == SLOTS // 4
    moved = [sn for sn in before if slot_of(f"{sn}:cancel") in new_slots]
    assert moved, "timers pending before the new primary came now live on it"
    wait_for(
        lambda: f"subscribed to {Keys().expired_channel} on {new.address}" in listener.text(),
        15,
        what=f"the listener to subscribe to the new primary {new.address}\n{listener.text()}",
    )

    def on_new(prefix: str, n: int) -> list[str]:
        names = (f"{prefix}-{i:06d}" for i in itertools.count())
        return list(
            itertools.islice((sn for sn in names if slot_of(f"{sn}:cancel") in new_slots), n)
        )

    after = on_new("NEW", 300)
    (legacy,) = on_new("LEGACY", 1)
    create_orders(engine, [*after, legacy])
    schedule_at(producer, spread(after, redis_now_ms(redis_cluster) + 1000, 2000))

    # A producer that does not use delayq arms a timer in a slot the new primary owns.
    legacy_key = f"{legacy}:cancel"
    assert redis_cluster.node_for_key(legacy_key).port == new.port
    set_at = redis_now_ms(redis_cluster)
    filler.set(legacy_key, "1", px=3000)
    expiry = int(filler.pexpiretime(legacy_key))
    store = ClusterStore(redis_cluster.client(), Keys())
    # Adopted from the new primary's `expire` event, long before it is due.
    wait_for(
        lambda: store.timer_state(legacy_key).pending_due_ms == expiry,
        2.5,
        interval_s=0.05,
        what=f"{legacy_key} adopted from the new primary's expire event",
    )
    adopted_after_ms = redis_now_ms(redis_cluster) - set_at

    wait_applied(engine, [*before, *after, legacy], [listener])
    verdict = assert_fired_exactly_once(engine, [*before, *after, legacy])
    verdict.report(f"{server_kind} cluster, a fourth primary added while running")
    (row,) = [r for r in outcome_rows(engine) if r.order_sn == legacy]
    print(
        f"legacy timer on the new primary adopted within {adopted_after_ms} ms, "
        f"fired {row.lateness_ms:.0f} ms after its expiry"
    )
    assert row.lateness_ms < 5000, "a legacy timer on the new primary fired late"


# -- 7. 200,000 pending -----------------------------------------------------------------------


@pytest.mark.slow
@ON_BOTH
def test_2000_timers_falling_due_among_200k_pending_on_a_cluster_fire_on_time(
    server_kind: ServerKind,
    redis_cluster: ServerCluster,
    sqlite_url: str,
    tmp_path: Path,
    listeners: ListenerFactory,
    producers: ProducerFactory,
) -> None:
    env = cluster_env(redis_cluster, sqlite_url, tmp_path)
    engine = engine_for(sqlite_url)
    producer = producers(redis_cluster)
    now = redis_now_ms(redis_cluster)
    loaded = time.monotonic()
    producer.schedule_many((f"FAR-{i:07d}", from_ms(now + 86_400_000 + i)) for i in range(200_000))
    load_s = time.monotonic() - loaded
    sns = orders(2000, "DUE")
    create_orders(engine, sns)
    listener = listeners(env)
    schedule_at(producer, spread(sns, redis_now_ms(redis_cluster) + 1500, 4000))
    wait_applied(engine, sns, [listener])
    verdict = assert_fired_exactly_once(engine, sns)
    verdict.report(
        f"{server_kind} cluster, 2,000 due among 200,000 pending",
        f"; 200,000 scheduled in {load_s:.1f} s",
    )
    assert max(verdict.lateness_ms) < 5000
    pending = 0
    for primary in redis_cluster.primaries():
        with contextlib.closing(primary.admin()) as admin:
            pending += sum(1 for _ in admin.scan_iter(match="FAR-*", count=10_000))
    assert pending == 200_000


# -- 8. the ClusterStore state machine --------------------------------------------------------

#: A lease or backoff that has run out by the next call (ms; so the machine does not
#: depend on how fast it runs), and one that never runs out within the test.
SHORT_MS, LONG_MS = 0, 3_600_000
MAX_ATTEMPTS = 3


def _machine_keys() -> tuple[str, ...]:
    """Timer keys for the machine: two in each third of the slots (one per primary of a
    fresh 3-primary ServerCluster), and three that share one slot."""
    per_third: dict[int, list[str]] = {0: [], 1: [], 2: []}
    by_slot: dict[int, list[str]] = {}
    shared: list[str] = []
    for i in itertools.count():
        key = f"M{i}:cancel"
        slot = slot_of(key)
        third = slot * 3 // SLOTS
        if len(per_third[third]) < 2:
            per_third[third].append(key)
        if not shared:
            by_slot.setdefault(slot, []).append(key)
            if len(by_slot[slot]) == 3:
                shared = by_slot[slot]
        if shared and all(len(v) == 2 for v in per_third.values()):
            break
    return tuple(k for third in per_third.values() for k in third) + tuple(shared)


MACHINE_KEYS = _machine_keys()


@dataclass
class ClusterModel:
    """What the cluster should hold, in plain Python."""

    pending: dict[str, int] = field(default_factory=dict)  # timer key -> due ms
    claims: dict[str, int] = field(default_factory=dict)  # firing id -> lease end ms
    attempts: dict[str, int] = field(default_factory=dict)
    dead: set[str] = field(default_factory=set)
    acked: Counter[str] = field(default_factory=Counter)
    #: Firings of schedules neither replaced nor cancelled before they were claimed:
    #: each must be pending, claimed, dead-lettered or acknowledged, exactly one of them.
    live: set[str] = field(default_factory=set)

    def claimable(self, now_ms: float) -> set[str]:
        due = {firing_id(k, d) for k, d in self.pending.items() if d <= now_ms}
        return due | {f for f, lease in self.claims.items() if lease <= now_ms}


class WakeFeed:
    """The wake-ups a listener's subscriptions deliver, made synchronous and each delivered
    once: one subscription (a PUBLISH reaches every node of a cluster), read until a
    barrier published on each primary came through it. A node's messages reach the
    others in order, so every wake-up published before the barriers is in hand, and no
    late copy of an old one lowers a view by chance."""

    def __init__(self, cluster: ServerCluster) -> None:
        self.admins = [node.admin() for node in cluster.primaries()]
        self.sub = self.admins[0].pubsub()
        self.sub.psubscribe(Keys().wake_pattern)
        wait_for(
            lambda: (m := self.sub.get_message(timeout=0.1)) and m["type"] == "psubscribe",
            5,
            what="the wake-up subscription",
        )
        self.barriers = itertools.count()

    def deliver(self, stores: Sequence[ClusterStore]) -> None:
        """Hand every wake-up published so far to each store, as a listener would."""
        tokens = set()
        for admin in self.admins:
            token = f"barrier-{next(self.barriers)}"
            admin.publish(f"{{delayq}}:wake:{token}", token)
            tokens.add(token)
        deadline = time.monotonic() + 5
        while tokens:
            assert time.monotonic() < deadline, f"wake-up barriers {tokens} did not come back"
            msg = self.sub.get_message(timeout=0.5)
            if msg is None or msg["type"] != "pmessage":
                continue
            if msg["channel"].rpartition(":")[2].startswith("barrier-"):
                tokens.discard(msg["data"])
                continue
            for store in stores:
                store.note_wake(msg["channel"], msg["data"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sub.close()
        for admin in self.admins:
            admin.close()


def machine_for(cluster: ServerCluster, feed: WakeFeed) -> type:
    client = cluster.client(decode_responses=True)
    scripts = Scripts.register(client)  # type: ignore[arg-type]
    keys = Keys()
    slots = sorted({slot_of(k) for k in MACHINE_KEYS})

    def now_ms() -> int:
        return redis_now_ms(cluster)

    class ClusterStoreMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            for primary in cluster.primaries():
                with contextlib.closing(primary.admin()) as admin:
                    admin.flushall()
            self.model = ClusterModel()
            #: An order service's store, and each listener's.
            self.producer = ClusterStore(client, keys, scripts)
            self.stores = [ClusterStore(client, keys, scripts) for _ in range(2)]
            for store in self.stores:
                store.refresh_view()  # a listener's start-up read
                # No periodic full read: claim replies and wake-ups alone must do.
                store._refresh_in_background = lambda: None  # type: ignore[method-assign]
            feed.deliver(self.stores)
            self.held: list[list[Firing]] = [[], []]
            self.start = now_ms()
            self.due_counter = itertools.count(1)

        @initialize(listeners=st.sampled_from([1, 2]))
        def listeners(self, listeners: int) -> None:
            """One listener (its own view must find everything due) or two (between them
            they must: a retry's earlier lease is known only to the listener that made it)."""
            self.stores = self.stores[:listeners]

        # -- producers ----------------------------------------------------------------------

        @rule(
            items=st.lists(
                st.tuples(st.sampled_from(MACHINE_KEYS), st.sampled_from(["past", "far"])),
                min_size=1,
                max_size=4,
                unique_by=lambda item: item[0],
            ),
            bulk=st.booleans(),
        )
        def schedule(self, items: list[tuple[str, str]], bulk: bool) -> None:
            m = self.model
            timers = []
            for key, when in items:
                n = next(self.due_counter)
                # Unique due times: each schedule is a firing of its own.
                due = self.start - 600_000 + n if when == "past" else self.start + LONG_MS + n
                timers.append((key, "at", due))
            if bulk:
                self.producer.schedule_bulk([timers])
            else:
                assert self.producer.schedule(timers) == [due for _, _, due in timers]
            for key, _, due in timers:
                old = m.pending.get(key)
                if old is not None:
                    m.live.discard(firing_id(key, old))
                m.pending[key] = due
                m.live.add(firing_id(key, due))

        @rule(key=st.sampled_from(MACHINE_KEYS))
        def cancel(self, key: str) -> None:
            m = self.model
            removed = key in m.pending
            claimed = any(parse_firing_id(f)[0] == key for f in m.claims)
            expected = (FIRING_NOW if claimed else CANCELLED) if removed else NOT_PENDING
            assert self.producer.cancel(key) == expected
            due = m.pending.pop(key, None)
            if due is not None:
                m.live.discard(firing_id(key, due))

        # -- listeners ----------------------------------------------------------------------

        def _claim(self, who: int, limit: int, lease_ms: int) -> Claim:
            m = self.model
            who %= len(self.stores)
            feed.deliver(self.stores)
            before = now_ms()
            claim = self.stores[who].claim_due(limit, lease_ms)
            after = max(now_ms(), int(claim.now_ms))
            ids = [f.id for f in claim.firings]
            assert len(ids) == len(set(ids)), f"a firing claimed twice in one call: {ids}"
            leases = self._leases(ids)
            for firing in claim.firings:
                fid = firing.id
                assert firing.reclaimed, "in a cluster every firing may have been applied"
                assert firing.attempt == 1 + m.attempts.get(fid, 0)
                if fid in m.claims:
                    assert m.claims[fid] <= claim.now_ms, (
                        f"{fid} claimed again while its lease ran until {m.claims[fid]} "
                        f"(claimed at {claim.now_ms})"
                    )
                else:
                    assert m.pending.get(firing.key) == firing.due_ms, (
                        f"{fid} claimed but not pending (acked {m.acked[fid]}, "
                        f"dead {fid in m.dead})"
                    )
                    assert firing.due_ms <= claim.now_ms, f"{fid} claimed before due"
                    del m.pending[firing.key]
                assert before + lease_ms <= leases[fid] <= after + lease_ms, (fid, leases[fid])
                m.claims[fid] = leases[fid]
            self.held[who] += claim.firings
            return claim

        def _leases(self, ids: Sequence[str]) -> dict[str, int]:
            pipe = client.pipeline()
            for fid in ids:
                pipe.zscore(
                    partition(keys.namespace, keys.db, slot_of(fid.rpartition("@")[0])).claims, fid
                )
            return {
                fid: int(s) for fid, s in zip(ids, pipe.execute(), strict=True) if s is not None
            }

        @rule(
            who=st.integers(0, 1),
            limit=st.sampled_from([1, 8, 1000]),
            lease_ms=st.sampled_from([SHORT_MS, LONG_MS]),
        )
        def claim_due(self, who: int, limit: int, lease_ms: int) -> None:
            self._claim(who, limit, lease_ms)

        def _take(self, who: int, n: int) -> list[Firing]:
            taken, self.held[who] = self.held[who][:n], self.held[who][n:]
            return taken

        @precondition(lambda self: any(self.held))
        @rule(data=st.data(), n=st.integers(1, 4))
        def ack(self, data: st.DataObject, n: int) -> None:
            m = self.model
            who = data.draw(st.sampled_from([w for w in (0, 1) if self.held[w]]))
            batch = self._take(who, n)
            self.stores[who].ack([f.id for f in batch], RECENT_WINDOW_MS)
            for fid in dict.fromkeys(f.id for f in batch):
                if m.claims.pop(fid, None) is not None:
                    m.attempts.pop(fid, None)
                    m.acked[fid] += 1

        @precondition(lambda self: any(self.held))
        @rule(data=st.data(), n=st.integers(1, 4), backoff_ms=st.sampled_from([SHORT_MS, LONG_MS]))
        def retry_later(self, data: st.DataObject, n: int, backoff_ms: int) -> None:
            m = self.model
            who = data.draw(st.sampled_from([w for w in (0, 1) if self.held[w]]))
            batch = self._take(who, n)
            ids = list(dict.fromkeys(f.id for f in batch))
            before = now_ms()
            dead = self.stores[who].retry_later(
                ids,
                max_attempts=MAX_ATTEMPTS,
                backoff_ms=backoff_ms,
                backoff_max_ms=backoff_ms,
                error="database said no",
            )
            after = now_ms()
            expected_dead = 0
            for fid in ids:
                if fid not in m.claims:
                    continue  # acknowledged meanwhile: left alone
                m.attempts[fid] = m.attempts.get(fid, 0) + 1
                if m.attempts[fid] >= MAX_ATTEMPTS:
                    del m.claims[fid], m.attempts[fid]
                    m.dead.add(fid)
                    expected_dead += 1
            assert dead == expected_dead
            still = [fid for fid in ids if fid in m.claims]
            for fid, lease in self._leases(still).items():
                assert before + backoff_ms <= lease <= after + backoff_ms
                m.claims[fid] = lease

        @rule(who=st.integers(0, 1))
        def release(self, who: int) -> None:
            """A listener stops: what it holds goes back, claimable at once."""
            m = self.model
            who %= len(self.stores)
            ids = list(dict.fromkeys(f.id for f in self._take(who, 10**6)))
            if not ids:
                return
            before = now_ms()
            self.stores[who].release(ids)
            after = now_ms()
            for fid, lease in self._leases([f for f in ids if f in m.claims]).items():
                assert before <= lease <= after
                m.claims[fid] = lease

        @rule(who=st.integers(0, 1))
        def crash(self, who: int) -> None:
            """kill -9: what the listener held is gone from its memory, claimed in Redis."""
            self._take(who % len(self.stores), 10**6)

        @precondition(lambda self: self.model.dead)
        @rule()
        def requeue_dead(self) -> None:
            m = self.model
            before = now_ms()
            assert self.stores[0].requeue_dead() == len(m.dead)
            after = now_ms()
            requeued, m.dead = sorted(m.dead), set()
            for fid, lease in self._leases(requeued).items():
                assert before <= lease <= after
                m.claims[fid] = lease
                m.attempts.pop(fid, None)

        @rule(who=st.integers(0, 1))
        def full_read(self, who: int) -> None:
            """A listener's periodic full read of the due view."""
            self.stores[who % len(self.stores)].refresh_view()

        @rule()
        def claim_everything_due(self) -> None:
            """Claim until nothing more comes: every firing due by then must have come,
            found through the due views as claims and wake-ups left them."""
            m = self.model
            soon = [t for t in m.claims.values() if t < self.start + LONG_MS // 2]
            if soon:
                wait_for(lambda: now_ms() > max(soon), 5, what="short leases to run out")
            target = now_ms()
            expected = m.claimable(target)
            got: set[str] = set()

            def settled() -> bool:
                found = 0
                for who in range(len(self.stores)):
                    claim = self._claim(who, 1000, LONG_MS)
                    found += len(claim.firings)
                    got.update(f.id for f in claim.firings)
                if found:
                    return False
                return all(not 0 <= s.view.earliest() <= target for s in self.stores)

            try:
                wait_for(settled, 10, interval_s=0.005, what="the listeners to claim all due")
            except AssertionError:
                views = [sorted(s.view._next.items())[:10] for s in self.stores]
                raise AssertionError(
                    f"due but never claimed: {sorted(m.claimable(target))}; views {views}"
                ) from None
            missed = m.claimable(target)
            assert not missed, f"the due views missed {sorted(missed)}"
            assert expected <= got

        # -- invariants ---------------------------------------------------------------------

        @invariant()
        def redis_matches_the_model(self) -> None:
            m = self.model
            pipe = client.pipeline()
            for slot in slots:
                k = partition(keys.namespace, keys.db, slot)
                pipe.zrange(k.heads, 0, -1, withscores=True)
                pipe.zrange(f"{k.shard_prefix}0", 0, -1, withscores=True)
                pipe.zrange(k.claims, 0, -1, withscores=True)
                pipe.hgetall(k.claims_per_key)
                pipe.hgetall(k.attempts)
                pipe.hkeys(k.dead)
            replies = iter(pipe.execute())
            pending: dict[str, int] = {}
            claims: dict[str, int] = {}
            per_key: dict[str, int] = {}
            attempts: dict[str, int] = {}
            dead: set[str] = set()
            for slot in slots:
                heads, shard, slot_claims, slot_per_key, slot_attempts, slot_dead = (
                    next(replies) for _ in range(6)
                )
                assert heads == ([("0", shard[0][1])] if shard else []), f"heads of slot {slot}"
                for name in [
                    *(n for n, _ in shard),
                    *(parse_firing_id(f)[0] for f, _ in slot_claims),
                ]:
                    assert slot_of(name) == slot, f"{name} indexed in slot {slot}'s partition"
                pending.update({name: int(s) for name, s in shard})
                claims.update({fid: int(s) for fid, s in slot_claims})
                per_key.update({name: int(n) for name, n in slot_per_key.items()})
                attempts.update({fid: int(n) for fid, n in slot_attempts.items()})
                dead.update(slot_dead)
            assert pending == m.pending
            assert claims == m.claims
            assert per_key == dict(Counter(parse_firing_id(f)[0] for f in m.claims))
            assert attempts == m.attempts
            assert dead == m.dead

        @invariant()
        def every_schedule_is_pending_claimed_dead_or_acked_exactly_once(self) -> None:
            m = self.model
            assert max(m.acked.values(), default=0) <= 1, "a firing acknowledged twice"
            for fid in m.live:
                key, due = parse_firing_id(fid)
                where = [
                    m.pending.get(key) == due,
                    fid in m.claims,
                    fid in m.dead,
                    m.acked[fid] == 1,
                ]
                assert sum(where) == 1, f"{fid}: pending/claimed/dead/acked = {where}"

        def teardown(self) -> None:
            self.claim_everything_due()

    return ClusterStoreMachine


@VALKEY_SLOW
@pytest.mark.timeout(600)  # Hypothesis shrinks a failure for up to 5 minutes
def test_cluster_store_matches_a_plain_model_through_random_operations(
    server_kind: ServerKind, cluster_factory: ClusterFactory
) -> None:
    cluster = cluster_factory(replicas_per_primary=0)
    primaries = {cluster.node_for_key(k).port for k in MACHINE_KEYS}
    assert len(primaries) == 3, "the machine's timers live on every primary"
    assert len({slot_of(k) for k in MACHINE_KEYS[-3:]}) == 1
    feed = WakeFeed(cluster)
    try:
        run_state_machine_as_test(
            machine_for(cluster, feed),
            settings=settings(
                max_examples=25,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
            ),
        )
    finally:
        feed.close()
