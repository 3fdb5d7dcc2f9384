"""Growing the due index's shard count (`delayq reshard`, delayq.layout): the refusals, and
resizes on a real redis-server while timers are scheduled, cancelled and claimed."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import redis

from delayq.errors import InvalidInput
from delayq.keys import Keys, Layout, key_hash
from delayq.layout import (
    MAX_SHARDS,
    check_target,
    index_figures,
    read_layout,
    reshard,
    suggested_shards,
)
from delayq.store import CANCELLED, FIRING_NOW, NOT_PENDING, TimerStore
from tests.harness import clean_env, run_cli
from tests.servers import RedisServer

#: A small default count, so that a resize is quick to run and to check.
FEW = 16
LEASE_MS = 60_000


def index(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """The due index, checking what every script relies on: `heads` names each non-empty
    shard with its earliest due time, and each entry is where cancel looks for it (in its
    shard once no resize is under way), once."""
    layout = read_layout(client, keys)
    raw_heads: list[tuple[str, float]] = client.zrange(keys.heads, 0, -1, withscores=True)  # type: ignore[assignment]
    heads = {str(s): head for s, head in raw_heads}
    shards = {str(n) for n in client.scan_iter(match=f"{keys.shard_prefix}*", count=10_000)}
    assert shards - {keys.layout} == {f"{keys.shard_prefix}{s}" for s in heads}, "heads: shards"
    out: dict[str, int] = {}
    for shard_id, head in heads.items():
        name = f"{keys.shard_prefix}{shard_id}"
        entries: list[tuple[str, float]] = client.zrange(name, 0, -1, withscores=True)  # type: ignore[assignment]
        assert entries[0][1] == head, f"head of shard {shard_id}"
        for member, due in entries:
            assert member not in out, f"{member} indexed twice"
            assert name in keys.shards_of(member, layout), f"{member} where cancel cannot see it"
            if layout.moved is None:
                assert name == keys.shards_of(member, layout)[0], f"{member} left behind"
            out[member] = int(due)
    return out


def now_ms(client: redis.Redis) -> int:
    sec, usec = client.time()
    return int(sec) * 1000 + int(usec) // 1000


# -- the count and its refusals ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("shards", "message"),
    [
        (100_000, "power of two"),
        (8192, "never shrinks"),
        (16384, "never shrinks"),
        (2 * MAX_SHARDS, "power of two up to"),
    ],
)
def test_a_resize_is_refused_unless_it_multiplies_the_count_by_a_power_of_two(
    shards: int, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        check_target(Layout(), shards)


def test_a_resize_that_stopped_must_be_finished_before_another_starts() -> None:
    stopped = Layout(shards=131072, previous=16384, moved=100)
    check_target(stopped, 131072)
    with pytest.raises(InvalidInput, match="delayq reshard --shards 131072"):
        check_target(stopped, 262144)


def test_the_suggested_count_keeps_ten_million_timers_compact_and_leaves_one_million_alone() -> (
    None
):
    assert suggested_shards(16384, 1_000_000, 128) == 16384
    assert suggested_shards(16384, 10_000_000, 128) == 131072
    assert suggested_shards(16384, 10_000_000, 512) == 32768


def test_a_timers_old_shard_is_its_new_one_modulo_the_old_count() -> None:
    layout = Layout(shards=131072, previous=16384)
    keys = [f"FAR{j:026d}:cancel" for j in range(2000)]
    both = [layout.shards_of(k) for k in keys]
    assert all(s[-1] == s[0] % 16384 for s in both)
    # For one key in 8 the two coincide: one shard to look in.
    alone = sum(1 for s in both if len(s) == 1) / len(keys)
    assert 0.09 < alone < 0.16, alone


# -- resizes on a real Redis ------------------------------------------------------------------


def test_timers_pending_before_a_resize_are_cancelled_and_claimed_after_it(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    keys = Keys(namespace="grow", shards=FEW)
    store = TimerStore(client, keys)
    now = now_ms(client)
    due = {f"DUE{i:05d}:cancel": now - 1000 + i for i in range(300)}
    later = {f"LATER{i:05d}:cancel": now + 3_600_000 + i for i in range(300)}
    store.schedule([(k, "at", ms) for k, ms in {**due, **later}.items()])

    assert reshard(client, keys, FEW * 8) == Layout(FEW * 8, FEW)

    assert index(client, keys) == {**due, **later}
    claimed = store.claim_due(1000, LEASE_MS).firings
    assert {f.key: f.due_ms for f in claimed} == due
    assert [store.cancel(k) for k in later] == [CANCELLED] * len(later)
    assert index(client, keys) == {}


def test_a_resize_that_stops_part_way_resumes_where_it_stopped(redis_server: RedisServer) -> None:
    client = redis_server.client()
    keys = Keys(namespace="resume", shards=FEW)
    store = TimerStore(client, keys)
    store.schedule([(f"SN{i}:cancel", "in", 3_600_000 + i) for i in range(400)])
    before = index(client, keys)

    class Crash(Exception):
        pass

    def crash_after_five(moved: int, total: int) -> None:
        if moved == 5:
            raise Crash

    with pytest.raises(Crash):
        reshard(client, keys, FEW * 4, progress=crash_after_five)
    assert read_layout(client, keys) == Layout(FEW * 4, FEW, moved=5)
    # Half-way, every timer is still where cancel looks for it.
    assert index(client, keys) == before
    figures = index_figures(client, keys, len(before))
    assert figures["resize_moved"] == f"5/{FEW}"
    assert f"delayq reshard --shards {FEW * 4}" in figures["advice"]
    with pytest.raises(InvalidInput, match="under way"):
        reshard(client, keys, FEW * 8)

    seen: list[int] = []
    reshard(client, keys, FEW * 4, progress=lambda moved, _: seen.append(moved))

    assert seen == list(range(5, FEW + 1))
    assert read_layout(client, keys) == Layout(FEW * 4, FEW)
    assert index(client, keys) == before
    assert store.cancel("SN7:cancel") == CANCELLED


def test_a_resize_interleaved_with_schedule_cancel_and_claim_loses_and_duplicates_nothing(
    redis_server: RedisServer,
) -> None:
    """One thread schedules, moves, cancels and claims timers in a random order while the
    main thread resizes the index twice (waiting for a round of that traffic every few
    shards, so that the two really interleave). Each operation is atomic and the thread
    runs them one after another, so it knows what each must answer and what must be
    pending at the end; a resize changes no timer, so Redis must hold exactly that, and
    every claim must be of the timer's latest due time."""
    client = redis_server.client()
    keys = Keys(namespace="busy", shards=64)
    store = TimerStore(client, keys)
    names = [f"ORD{i:04d}:cancel" for i in range(600)]
    pending: dict[str, int] = {}
    firing: set[str] = set()  # claimed, never acknowledged here
    claims = 0
    rounds = [0]
    stop = threading.Event()
    errors: list[BaseException] = []
    rng = random.Random(13)

    def traffic() -> None:
        nonlocal claims
        try:
            while not stop.is_set():
                batch = rng.sample(names, 20)
                now = now_ms(client)
                # Some due at once, most later: the claims find some every round. Each due
                # time once only: a schedule to the due time of a firing still claimed is
                # that firing (fired once), which this model does not follow.
                far = [past - rounds[0]]
                far += [now + 3_600_000 + 1000 * rounds[0] + rng.randrange(1000) for _ in range(3)]
                timers = [(k, "at", rng.choice(far)) for k in batch[:12]]
                for k, ms in zip(batch, store.schedule(timers), strict=False):
                    pending[k] = ms
                for k in batch[12:]:
                    was = pending.pop(k, None)
                    wanted = (
                        NOT_PENDING if was is None else FIRING_NOW if k in firing else CANCELLED
                    )
                    assert store.cancel(k) == wanted, k
                for f in store.claim_due(50, LEASE_MS).firings:
                    assert pending.pop(f.key) == f.due_ms, f"{f.key} claimed at a stale time"
                    firing.add(f.key)
                    claims += 1
                rounds[0] += 1
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def wait_for_traffic(moved: int, _total: int) -> None:
        if moved % 16 == 0:
            seen = rounds[0]
            deadline = time.monotonic() + 10
            while rounds[0] == seen and not errors and time.monotonic() < deadline:
                time.sleep(0.001)

    past = now_ms(client) - 1000
    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        reshard(client, keys, 64 * 8, progress=wait_for_traffic)
        reshard(client, keys, 64 * 64, progress=wait_for_traffic)
    finally:
        stop.set()
        worker.join(timeout=30)
    assert not errors, errors
    assert rounds[0] >= (64 + 512) // 16 and claims > 0, (rounds, claims)
    assert read_layout(client, keys) == Layout(64 * 64, 64 * 8)
    assert index(client, keys) == pending


def test_writes_read_the_layout_so_a_client_started_before_a_resize_follows_it(
    redis_server: RedisServer,
) -> None:
    """A producer holds its Keys for its life; the scripts read the count from Redis, so
    timers it writes after a resize land in the new shards."""
    client = redis_server.client()
    keys = Keys(namespace="live", shards=FEW)
    store = TimerStore(client, keys)
    reshard(client, keys, FEW * 2)
    key = next(f"K{i}:cancel" for i in range(100) if key_hash(f"K{i}:cancel") % (FEW * 2) >= FEW)
    store.schedule([(key, "in", 60_000)])
    assert client.zscore(f"{keys.shard_prefix}{key_hash(key) % (FEW * 2)}", key) is not None
    assert store.timer_state(key).pending_due_ms is not None
    assert index(client, keys).keys() == {key}


def test_status_names_a_producer_of_0_2_still_writing_after_a_resize(
    redis_server: RedisServer,
) -> None:
    """A 0.2 producer keeps writing `crc % 16384` (here: the old count): its entries land
    outside their shard, where nothing newer puts one, and `status`/`check` say so."""
    client = redis_server.client()
    keys = Keys(namespace="old", shards=FEW)
    TimerStore(client, keys).schedule([(f"NEW{i}:cancel", "in", 600_000) for i in range(100)])
    reshard(client, keys, FEW * 8)
    assert index_figures(client, keys, 100)["advice"] is None

    old = next(
        f"OLD{i}:cancel" for i in range(100) if key_hash(f"OLD{i}:cancel") % (FEW * 8) >= FEW
    )
    shard_id = key_hash(old) % FEW  # what 0.2's schedule.lua does
    client.zadd(f"{keys.shard_prefix}{shard_id}", {old: now_ms(client) + 600_000})
    figures = index_figures(client, keys, 101)

    assert figures["strays_sampled"] == 1
    assert "a producer or listener of 0.2 is running" in figures["advice"]


@pytest.mark.slow  # moves 16,384 shards: a few seconds
def test_reshard_on_the_command_line_grows_the_index_and_refuses_a_bad_count(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    env = clean_env(REDIS_URL=redis_server.url(0), NAMESPACE="cli")
    client = redis_server.client()
    keys = Keys(namespace="cli")
    TimerStore(client, keys).schedule([(f"SN{i}:cancel", "in", 600_000) for i in range(50)])

    bad = run_cli("reshard", "--shards", "20000", env=env, cwd=tmp_path)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.splitlines() == [
        "delayq: error: --shards must be a power of two up to 1,048,576 (e.g. 131072), not 20000"
    ]
    smaller = run_cli("reshard", "--shards", "8192", env=env, cwd=tmp_path)
    assert smaller.returncode != 0 and "Traceback" not in smaller.stderr
    assert smaller.stderr.splitlines() == [
        "delayq: error: --shards must be a multiple of the current 16,384 and larger "
        "(e.g. 131072): the count never shrinks"
    ]
    done = run_cli("reshard", "--shards", "32768", env=env, cwd=tmp_path, timeout_s=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "the due index has 32,768 shards (was 16,384)"
    assert read_layout(client, keys) == Layout(32768, 16384)
    again = run_cli("reshard", env=env, cwd=tmp_path)
    assert again.stdout.strip() == (
        "the due index keeps its 32,768 shards: enough for 50 pending timers"
    )
