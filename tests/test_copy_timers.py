"""`delayq copy-timers`: moving from one Redis to a cluster with timers pending, in
flight and dead-lettered, then firing them there with a real `delayq listen`
(docs/moving-to-cluster.md)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
import redis

from delayq.cluster.copy import copy_timers
from delayq.cluster.store import ClusterStore
from delayq.keys import Keys
from delayq.settings import Settings
from delayq.store import TimerStore
from tests.cluster import ServerCluster
from tests.harness import (
    ListenerProcess,
    clean_env,
    create_orders,
    engine_for,
    migrate_cli,
    outcome_rows,
    run_cli,
    statuses,
)
from tests.servers import RedisFactory, RedisServer, free_port, wait_for
from tests.test_least_privilege import acl_rules

#: Timers due a few seconds after they are copied: the listener on the cluster fires them.
SOON = [f"SOON-{i}" for i in range(12)]
#: Timers due in hours to weeks: they must stay pending, at the same time, in the cluster.
FAR = [f"FAR-{i}" for i in range(300)]
#: Firings claimed on the old Redis and not acknowledged: handed back by a stopped
#: listener, waiting for a retry after one failure, held by a listener that was killed.
FLY_RELEASED, FLY_RETRY, FLY_KILLED = "FLY-RELEASED", "FLY-RETRY", "FLY-KILLED"
#: Due before the old listener stopped, and not claimed yet.
OVERDUE = "OVERDUE-1"
#: Claimed (being applied) and rescheduled meanwhile: a firing and a pending schedule.
BOTH = "BOTH-1"
DEAD = ["DEAD-1", "DEAD-2"]
#: Set by a producer that does not use delayq (SET PX), never indexed (no listener heard it).
LEGACY_SOON, LEGACY_FAR = "LEGACY-1:cancel", "LEGACY-FAR:cancel"
#: Scheduled through delayq far ahead, then re-armed sooner by a plain PEXPIRE.
REARMED = "REARMED-1"


def key(order_sn: str) -> str:
    return f"{order_sn}:cancel"


@dataclass
class Source:
    """The old single Redis, loaded with every kind of timer the copy must carry over."""

    server: RedisServer
    client: redis.Redis
    store: TimerStore
    #: timer key -> due ms of its pending schedule (what the cluster must end up with).
    pending: dict[str, int]
    #: firing id -> (lease ms, failed attempts).
    claims: dict[str, tuple[int, int]]
    #: dead letter field -> entry.
    dead: dict[str, dict[str, Any]]


def redis_now_ms(client: redis.Redis) -> int:
    sec, usec = client.time()
    return int(sec) * 1000 + int(usec) // 1000


def load_source(server: RedisServer) -> Source:
    client = server.client()
    store = TimerStore(client, Keys())
    now = redis_now_ms(client)
    # Claimed firings first: due a while ago, claimed with a short lease.
    past = [FLY_RELEASED, FLY_RETRY, FLY_KILLED, BOTH, *DEAD]
    store.schedule([(key(sn), "at", now - 5000 - i) for i, sn in enumerate(past)])
    claim = store.claim_due(100, lease_ms=3000)
    ids = {f.key: f.id for f in claim.firings}
    assert set(ids) == {key(sn) for sn in past}
    store.release([ids[key(FLY_RELEASED)]])
    retry = {"backoff_ms": 1000, "backoff_max_ms": 1000, "error": "database down"}
    store.retry_later([ids[key(FLY_RETRY)]], max_attempts=5, **retry)
    assert store.retry_later([ids[key(d)] for d in DEAD], max_attempts=1, **retry) == 2
    store.schedule([(key(OVERDUE), "at", now - 2000)])

    store.schedule([(key(sn), "at", now + 15_000 + 100 * i) for i, sn in enumerate(SOON)])
    store.schedule([(key(BOTH), "at", now + 15_500)])
    store.schedule([(key(sn), "at", now + 3_600_000 + 997_001 * i) for i, sn in enumerate(FAR)])
    store.schedule([(key(REARMED), "at", now + 86_400_000)])
    client.pexpire(key(REARMED), 16_000)
    client.set(LEGACY_SOON, "x", px=15_500)
    client.set(LEGACY_FAR, "x", px=2 * 86_400_000)
    client.set("settings:theme", "dark")  # no TTL: not a timer, not copied

    pending = {
        k: store.timer_state(k).pending_due_ms for k in map(key, [*SOON, *FAR, BOTH, OVERDUE])
    }
    for legacy in (key(REARMED), LEGACY_SOON, LEGACY_FAR):
        pending[legacy] = int(client.pexpiretime(legacy))
    claims = {
        str(fid): (int(lease), int(client.hget(Keys().attempts, fid) or 0))
        for fid, lease in client.zrange(Keys().claims, 0, -1, withscores=True)
    }
    dead = {f: json.loads(v) for f, v in client.hgetall(Keys().dead).items()}
    assert len(claims) == 4 and len(dead) == 2
    return Source(server, client, store, {k: int(v) for k, v in pending.items() if v}, claims, dead)


@pytest.fixture
def source(redis_factory: RedisFactory) -> Source:
    return load_source(redis_factory())


@pytest.fixture
def env(redis_cluster: ServerCluster, sqlite_url: str, tmp_path: Path) -> dict[str, str]:
    env = clean_env(
        REDIS_URL=redis_cluster.url, DATABASE_URL=sqlite_url, HOME=str(tmp_path / "home")
    )
    migrate_cli(env)
    return env


@pytest.fixture
def listener(env: dict[str, str], tmp_path: Path) -> Iterator[ListenerProcess]:
    proc = ListenerProcess(env, tmp_path / "listener.log")
    try:
        yield proc
    finally:
        proc.stop()


def copy_cli(env: dict[str, str], source: Source, cluster: ServerCluster, *flags: str) -> Any:
    done = run_cli(
        "copy-timers", "--from", source.server.url(0), "--to", cluster.url, *flags, env=env
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if "--json" in flags else done.stdout


def copied(report: dict[str, Any]) -> dict[str, int]:
    return {
        kind: report[kind]["copied"] for kind in ("pending", "in_flight", "dead_letters", "legacy")
    }


def ms_of(dt: Any) -> int:
    return round(dt.replace(tzinfo=UTC).timestamp() * 1000)


# On Valkey too, outside the default run (it takes ~20 s).
@pytest.mark.parametrize("server_kind", ["redis", pytest.param("valkey", marks=pytest.mark.slow)])
def test_timers_pending_in_flight_dead_and_legacy_move_to_a_cluster_and_fire_there_once(
    source: Source,
    redis_cluster: ServerCluster,
    env: dict[str, str],
    sqlite_url: str,
    listener: ListenerProcess,
) -> None:
    engine = engine_for(sqlite_url)
    fired = [*SOON, OVERDUE, FLY_RELEASED, FLY_RETRY, FLY_KILLED, BOTH, "LEGACY-1", REARMED]
    create_orders(engine, fired)
    expected = {
        "pending": len(SOON) + len(FAR) + 3,  # BOTH's newer schedule, OVERDUE, REARMED
        "in_flight": 4,
        "dead_letters": 2,
        "legacy": 2,
    }

    dry = copy_cli(env, source, redis_cluster, "--dry-run", "--json")
    assert dry["dry_run"] is True and copied(dry) == expected
    assert sum(node.client().dbsize() for node in redis_cluster.primaries()) == 0

    line = copy_cli(env, source, redis_cluster)
    assert line == (
        f"copied {expected['pending']} pending timers, 4 in-flight firings, 2 dead letters, "
        f"adopted 2 legacy timers from {source.server.url(0)} to {redis_cluster.url} "
        "(0 already there, 0 kept as the target has them)\n"
    ), line

    cluster = ClusterStore(redis_cluster.client(), Keys())
    for timer, due in source.pending.items():
        assert cluster.timer_state(timer).pending_due_ms == due, timer
    for fid, (lease, attempts) in source.claims.items():
        timer = fid.rpartition("@")[0]
        held = {(f.id, le, n) for f, le, n in cluster.timer_state(timer).claims}
        assert (fid, lease, attempts) in held, fid
    assert dict(cluster.dead_letters()) == source.dead
    assert cluster.timer_state("settings:theme").ttl_ms is None
    assert redis_cluster.client().exists("settings:theme") == 0

    second = copy_cli(env, source, redis_cluster, "--json")
    assert copied(second) == dict.fromkeys(expected, 0)
    assert {k: second[k]["already_there"] for k in ("in_flight", "dead_letters")} == {
        "in_flight": 4,
        "dead_letters": 2,
    }
    # (On a slow machine the soon legacy key may have expired in the source meanwhile.)
    assert second["pending"]["already_there"] + second["legacy"]["already_there"] >= (
        len(SOON) + len(FAR) + 3
    )
    assert (second["from"], second["to"]) == (source.server.url(0), redis_cluster.url)
    # `delayq status` on both: the cluster holds what the old Redis holds, plus the legacy
    # keys the old Redis never indexed.
    old, new = (
        json.loads(run_cli("--redis-url", url, "status", "--json", env=env).stdout)
        for url in (source.server.url(0), redis_cluster.url)
    )
    assert new["pending"] == old["pending"] + expected["legacy"]
    assert (new["in_flight"], new["dead_lettered"]) == (old["in_flight"], old["dead_lettered"])

    listener.start()
    ready_ms = time.time() * 1000
    # The claimed firing of BOTH and its newer schedule each fire: two outcomes.
    wait_for(lambda: len(outcome_rows(engine)) == len(fired) + 1, 60, what="every outcome")
    rows = outcome_rows(engine)
    per_firing = Counter((r.order_sn, ms_of(r.due_at)) for r in rows)
    assert max(per_firing.values()) == 1, per_firing
    assert Counter(r.order_sn for r in rows) == Counter([*fired, BOTH])
    assert all(r.lateness_ms >= 0 for r in rows), "none fired early"
    # Those that fell due once the listener ran fired on time (the rest on its start).
    on_time = [r for r in rows if ms_of(r.due_at) > ready_ms]
    assert all(r.lateness_ms < 2000 for r in on_time), on_time
    assert set(statuses(engine).values()) == {"cancelled"}
    both = sorted((ms_of(r.due_at), r.outcome) for r in rows if r.order_sn == BOTH)
    assert [o for _, o in both] == ["applied", "skipped_not_unpaid"]
    assert both[1][0] == source.pending[key(BOTH)]
    wait_for(lambda: all_settled(cluster, fired), 30, what="every firing acknowledged")

    # Run again once they fired: nothing comes back (the copy remembers what it copied).
    third = copy_cli(env, source, redis_cluster, "--json")
    assert copied(third) == dict.fromkeys(expected, 0)

    # Days later that memory is gone: the in-flight firings, which the old Redis still
    # holds, are copied again, and the listener finds their outcomes and acknowledges
    # them without applying them a second time.
    for node in redis_cluster.primaries():
        client = node.client()
        for name in client.scan_iter(match="{delayq:*}:copied", count=1000):
            client.delete(name)
    fourth = copy_cli(env, source, redis_cluster, "--json")
    assert fourth["in_flight"]["copied"] == 4
    assert fourth["pending"]["copied"] == fourth["dead_letters"]["copied"] == 0
    wait_for(lambda: all_settled(cluster, fired), 30, what="re-copied firings acknowledged")
    assert outcome_rows(engine) == rows
    for timer in map(key, FAR):
        assert cluster.timer_state(timer).pending_due_ms == source.pending[timer]
    assert dict(cluster.dead_letters()) == source.dead
    assert "Traceback" not in listener.text()


def all_settled(cluster: ClusterStore, order_sns: list[str]) -> bool:
    """No claim or pending schedule of these timers is left in the cluster."""
    states = [cluster.timer_state(key(sn)) for sn in order_sns]
    return not any(s.claims or s.pending_due_ms is not None for s in states)


def test_copy_timers_refuses_a_cluster_source_the_same_redis_and_hides_passwords(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    server = redis_factory()
    env = clean_env(HOME=str(tmp_path / "home"))
    cases = [
        (
            ["--from", "redis+cluster://127.0.0.1:7000", "--to", server.url(0)],
            2,
            "not from a cluster",
        ),
        (["--from", server.url(0), "--to", server.url(0)], 2, "the same Redis"),
        (
            ["--from", server.url(0), "--to", f"redis://:s3cret@127.0.0.1:{free_port()}/0"],
            3,
            "not reachable",
        ),
    ]
    for args, code, words in cases:
        done = run_cli("copy-timers", *args, env=env)
        assert done.returncode == code, (args, done.stderr)
        assert done.stdout == "" and words in done.stderr, done.stderr
        assert done.stderr.startswith("delayq: error:") and done.stderr.count("\n") == 1
        assert "s3cret" not in done.stderr


def test_copy_to_a_single_redis_keeps_what_the_target_changed_and_copies_only_what_is_new(
    redis_factory: RedisFactory,
) -> None:
    source = load_source(redis_factory())
    target_server = redis_factory()
    target = TimerStore(target_server.client(), Keys())
    settings = Settings()
    report = copy_timers(settings, source.server.url(0), target_server.url(0))
    assert (report.pending.copied, report.in_flight.copied) == (len(SOON) + len(FAR) + 3, 4)
    assert (report.dead_letters.copied, report.legacy.copied) == (2, 2)
    for timer, due in source.pending.items():
        assert target.timer_state(timer).pending_due_ms == due, timer
    assert target_server.client().hgetall(Keys().dead) == source.client.hgetall(Keys().dead)

    # Producers switched: on the target one timer moved, one cancelled ahead of its due
    # time and one after it; in the source (a producer not switched yet) one moved and
    # one new.
    moved_there, cancelled_there, moved_here = key(FAR[0]), key(FAR[1]), key(FAR[2])
    now = redis_now_ms(target.client)
    target.schedule([(moved_there, "at", now + 60_000)])
    assert target.cancel(cancelled_there) == target.cancel(key(OVERDUE)) == 1
    source.store.schedule([(moved_here, "at", now + 90_000), ("LATE-1:cancel", "at", now + 1)])
    # Set on both sides, never copied: the target's schedule is the one kept.
    source.store.schedule([("BOTH-SIDES:cancel", "at", now + 5000)])
    target.schedule([("BOTH-SIDES:cancel", "at", now + 6000)])
    again = copy_timers(settings, source.server.url(0), target_server.url(0))
    # What an earlier run copied and the target changed since stays changed; what
    # changed in the source since is copied.
    assert (again.pending.copied, again.pending.kept_target) == (2, 1)
    assert again.pending.already_there == again.pending.found - 3
    assert again.in_flight.copied == again.dead_letters.copied == again.legacy.copied == 0
    assert target.timer_state(moved_there).pending_due_ms == now + 60_000
    assert target.timer_state(cancelled_there).pending_due_ms is None
    assert target.timer_state(key(OVERDUE)).pending_due_ms is None
    assert target.timer_state(moved_here).pending_due_ms == now + 90_000
    assert target.timer_state("LATE-1:cancel").pending_due_ms == now + 1
    assert target.timer_state("BOTH-SIDES:cancel").pending_due_ms == now + 6000
    dry = copy_timers(settings, source.server.url(0), target_server.url(0), dry_run=True)
    assert sum(t.copied for t in dry.tallies) == 0


#: What copy-timers reads from the old Redis: a read-only user will do.
SOURCE_RULES = "+ping +info +time +scan +zscan +hscan +zscore +hmget +exists +pexpiretime +pttl ~*"
#: What it needs on the target beyond the shipped listener's rules (docs/moving-to-cluster.md).
TARGET_EXTRA = ["+set", "+script|exists", "+hsetnx", "+expire"]


def test_copy_timers_needs_only_reads_on_the_source_and_four_rules_beyond_the_listeners(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    source = load_source(redis_factory())
    target_server = redis_factory()
    admin = target_server.client()
    listener_rules = acl_rules("delayq-listener")
    source.client.execute_command("ACL", "SETUSER", "reader", "on", ">pw", *SOURCE_RULES.split())
    env = clean_env(HOME=str(tmp_path / "home"))
    source_url = source.server.url(0).replace("redis://", "redis://reader:pw@")
    target_url = target_server.url(0).replace("redis://", "redis://copier:pw@")

    admin.execute_command("ACL", "SETUSER", "copier", "reset", *listener_rules, ">pw")
    refused = run_cli("copy-timers", "--from", source_url, "--to", target_url, env=env)
    assert refused.returncode == 4 and refused.stderr.count("\n") == 1, refused.stderr
    assert "no permissions" in refused.stderr and "pw@" not in refused.stderr

    admin.execute_command("ACL", "SETUSER", "copier", *TARGET_EXTRA)
    done = run_cli("copy-timers", "--from", source_url, "--to", target_url, "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert copied(json.loads(done.stdout)) == {
        "pending": len(SOON) + len(FAR) + 3,
        "in_flight": 4,
        "dead_letters": 2,
        "legacy": 2,
    }
