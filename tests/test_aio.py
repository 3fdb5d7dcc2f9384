"""delayq.aio, the asyncio producer, in real event loops against real servers: what it
leaves in Redis (the same as the blocking producer), that it never blocks the loop, that
every Redis failure is a delayq exception with redis-py's as its cause, and that a timer
it schedules is fired by a real `delayq listen`."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis
import redis.asyncio

import delayq.embedded
from delayq import aio
from delayq.aio import AsyncProducer
from delayq.cluster.store import ClusterStore
from delayq.errors import InvalidInput, NotReady, NotReplicated, ServiceUnavailable
from delayq.keys import Keys
from delayq.producer import BULK_CHUNK, BULK_PIPELINE_DEPTH
from delayq.redis_errors import OutOfMemory, PermissionDenied, ReadOnlyReplica
from delayq.settings import Settings
from delayq.timing import to_ms
from tests.cluster import ServerCluster
from tests.harness import (
    ListenerProcess,
    clean_env,
    create_orders,
    engine_for,
    index_members,
    index_score,
    index_size,
    migrate_cli,
    statuses,
)
from tests.proxy import FreezableProxy
from tests.servers import HOST, RedisFactory, RedisServer, free_port, wait_for
from tests.test_light_install import LISTENER_ONLY

T = TypeVar("T")
KEYS = Keys(db=0)
#: A primary that sends a new replica its data at once (the default waits 5 s for others).
QUICK_SYNC = {"repl-diskless-sync-delay": "0"}


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` in a fresh event loop, as an asyncio service would."""
    return asyncio.run(coro)


def producer_for(url: str, **kwargs: Any) -> AsyncProducer:
    """Built inside the loop that uses it: redis.asyncio connections belong to one loop."""
    return AsyncProducer(redis.asyncio.Redis.from_url(url, decode_responses=True), KEYS, **kwargs)


async def with_producer(url: str, use: Callable[[AsyncProducer], Awaitable[T]], **kw: Any) -> T:
    async with producer_for(url, **kw) as producer:
        return await use(producer)


def assert_armed(client: redis.Redis, key: str, due: datetime) -> None:
    """The TTL key and the index entry agree with each other and with `due`, to the ms."""
    assert client.pexpiretime(key) == to_ms(due)
    assert index_score(client, key) == to_ms(due)


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No DELAYQ_* from the developer's environment, and no .env in the working dir."""
    for name in [n for n in os.environ if n.startswith("DELAYQ_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


# -- what it writes --------------------------------------------------------------------


def test_schedule_reschedule_and_cancel_in_a_running_loop_write_what_the_blocking_one_does(
    any_redis: RedisServer,
) -> None:
    client = any_redis.client()

    async def scenario(p: AsyncProducer) -> tuple[datetime, ...]:
        first = await p.schedule("SN1", "20m")
        assert_armed(client, "SN1:cancel", first)
        earlier = await p.schedule("SN1", timedelta(minutes=5))  # the last schedule wins
        assert_armed(client, "SN1:cancel", earlier)
        at = datetime(2099, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
        exact = await p.schedule("SN2", at=at, action="complete")
        assert exact == at
        assert_armed(client, "SN2:complete", at)
        assert await p.cancel("SN1") is True
        assert await p.cancel("SN1") is False  # nothing pending any more
        return first, earlier

    first, earlier = run(with_producer(any_redis.url(), scenario))
    assert earlier < first
    assert first.tzinfo == UTC
    assert client.exists("SN1:cancel") == 0
    assert index_members(client) == ["SN2:complete"]


def test_schedule_many_arms_every_item_over_several_pipelined_rounds(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    n = BULK_CHUNK * BULK_PIPELINE_DEPTH + 250  # more than one round trip
    items = [(f"SN{i}", 600 + i % 7) for i in range(n)]
    items.append(("SN-X", "1h", "complete"))

    assert run(with_producer(redis_server.url(), lambda p: p.schedule_many(items))) == n + 1
    assert index_size(client) == n + 1
    assert client.pttl("SN-X:complete") > 3_500_000


def test_bad_input_raises_invalid_input_before_any_io() -> None:
    """Against a closed port: any I/O would raise ServiceUnavailable instead."""
    url = f"redis://{HOST}:{free_port()}/0"
    bad: list[Callable[[AsyncProducer], Awaitable[object]]] = [
        lambda p: p.schedule("SN 1", "20m"),
        lambda p: p.schedule("SN1", "20m", at="2099-01-01T00:00:00Z"),
        lambda p: p.schedule("SN1"),
        lambda p: p.schedule("SN1", "soon"),
        lambda p: p.schedule("SN1", "20m", action="no such action!"),
        lambda p: p.schedule("SN1", at=datetime(2099, 1, 1)),  # naive: which zone?
        lambda p: p.cancel("SN:1"),
        lambda p: p.schedule_many([("SN1", "1m"), ("SN2",)]),  # type: ignore[list-item]
        lambda p: p.schedule_many([("SN1", "1m"), ("SN 2", "1m")]),
    ]
    for call in bad:
        with pytest.raises(InvalidInput) as caught:
            run(with_producer(url, call))
        assert isinstance(caught.value, ValueError)
        assert "\n" not in str(caught.value)


def test_importing_and_using_delayq_aio_loads_nothing_of_the_listeners(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A fresh interpreter: `import delayq.aio` and a schedule load no SQLAlchemy, Typer,
    httpx... (the light producer install has none of them)."""
    script = (
        "import asyncio, sys\n"
        "from delayq import aio\n"
        "async def main():\n"
        "    await aio.schedule_expiry('SN-LIGHT', '20m')\n"
        "    await aio.aclose()\n"
        "asyncio.run(main())\n"
        f"print(sorted(m for m in {LISTENER_ONLY!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=clean_env(REDIS_URL=redis_server.url(0)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert redis_server.client().exists("SN-LIGHT:cancel") == 1


# -- the module-level coroutines and their default producer ------------------------------


def test_module_coroutines_use_one_producer_per_loop_built_from_the_environment(
    redis_server: RedisServer, settings_env: pytest.MonkeyPatch
) -> None:
    settings_env.setenv("DELAYQ_REDIS_URL", redis_server.url(0))
    client = redis_server.client()

    async def first_loop() -> AsyncProducer:
        due = await aio.schedule_expiry("SN-A", "20m")
        assert_armed(client, "SN-A:cancel", due)
        assert await aio.schedule_many([("SN-B", 60), ("SN-C", 60, "complete")]) == 2
        assert await aio.cancel_expiry("SN-B") is True
        return await aio.default_producer()

    async def second_loop(before: AsyncProducer) -> None:
        # A new loop cannot use the old loop's connections: it gets a producer of its own.
        assert await aio.cancel_expiry("SN-A") is True
        assert await aio.default_producer() is not before
        await aio.aclose()

    before = run(first_loop())
    run(second_loop(before))
    assert index_members(client) == ["SN-C:complete"]


def test_module_coroutines_validate_before_reading_any_setting(
    settings_env: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(InvalidInput):
        run(aio.schedule_expiry("SN 1", "20m"))
    with pytest.raises(InvalidInput):
        run(aio.cancel_expiry("SN1", action="Nope!"))
    with pytest.raises(InvalidInput):
        run(aio.schedule_many([("SN1", -5)]))


def test_no_redis_url_is_refused_in_one_line_like_the_blocking_producer(
    settings_env: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(NotReady, match=r"^DELAYQ_REDIS_URL is not set: ") as caught:
        run(aio.schedule_expiry("SN1", "20m"))
    assert "\n" not in str(caught.value)


def test_embedded_redis_is_started_on_a_worker_thread_not_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starting redis-server waits for it to answer: from_settings does that off the loop."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is part of the test set-up"
    settings = Settings(redis_url="embedded", home=tmp_path / "home", redis_server_bin=binary)
    started_on: list[threading.Thread] = []
    real_start = delayq.embedded.ensure_embedded_redis

    def start(s: Settings) -> str:
        started_on.append(threading.current_thread())
        return real_start(s)

    monkeypatch.setattr(delayq.embedded, "ensure_embedded_redis", start)

    async def scenario() -> datetime:
        async with await AsyncProducer.from_settings(settings) as producer:
            return await producer.schedule("SN-EMB", "1h")

    try:
        due = run(scenario())
    finally:
        delayq.embedded.stop_embedded_redis(settings)
    assert due > datetime.now(UTC) + timedelta(minutes=59)
    assert [t is threading.main_thread() for t in started_on] == [False]


# -- the event loop is never blocked -----------------------------------------------------


class Heartbeat:
    """A task ticking every 5 ms; `max_gap_s` is the longest the loop kept it waiting."""

    TICK_S = 0.005

    def __init__(self) -> None:
        self.max_gap_s = 0.0
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Heartbeat:
        self._task = asyncio.create_task(self._beat())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _beat(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.TICK_S)
            now = time.monotonic()
            self.max_gap_s = max(self.max_gap_s, now - last)
            self.ticks += 1
            last = now


def test_a_thousand_schedules_against_a_stalled_redis_never_block_the_loop(
    redis_factory: RedisFactory,
) -> None:
    """Redis stops answering (DEBUG SLEEP) three times while 1,000 schedules run on 20
    tasks: they wait, the loop does not. A loop blocked on the stalled socket would keep a
    5 ms heartbeat waiting the whole 300 ms stall; a free one never keeps it 100 ms (CI once
    saw a 60 ms hiccup on a busy 2-core machine, so 50 ms was too tight to mean blocking)."""
    server = redis_factory(extra={"enable-debug-command": "local"})
    admin = server.client()
    stalls = threading.Thread(
        target=lambda: [admin.execute_command("DEBUG", "SLEEP", "0.3") for _ in range(3)]
    )

    async def scenario() -> tuple[float, float, int]:
        async with producer_for(server.url()) as producer:

            async def worker(w: int) -> None:
                for i in range(50):
                    await producer.schedule(f"SN{w}-{i}", "1h")

            # A warm pool, as a running service has: opening 20 connections at once is
            # a burst of the loop's own work (tens of ms on a loaded 2-core machine),
            # not a wait for Redis, and not what this test is about.
            await asyncio.gather(*(producer.schedule(f"SN{w}-0", "1h") for w in range(20)))
            admin.ping()
            async with Heartbeat() as beat:
                started = time.monotonic()
                stalls.start()
                await asyncio.gather(*(worker(w) for w in range(20)))
                elapsed = time.monotonic() - started
                await asyncio.to_thread(stalls.join)
        return beat.max_gap_s, elapsed, beat.ticks

    max_gap_s, elapsed_s, ticks = run(scenario())
    assert index_size(server.client()) == 1000
    assert elapsed_s >= 0.6, "the schedules should have waited for Redis"
    assert ticks > elapsed_s / 0.05
    assert max_gap_s < 0.1, f"the loop was blocked for {max_gap_s * 1000:.0f} ms"


# -- failures: delayq exceptions, redis-py's as their cause ------------------------------


def test_an_unreachable_redis_is_service_unavailable_caused_by_a_connection_error() -> None:
    url = f"redis://{HOST}:{free_port()}/0"
    with pytest.raises(ServiceUnavailable, match="is not reachable") as caught:
        run(with_producer(url, lambda p: p.schedule("SN1", "20m")))
    assert isinstance(caught.value.__cause__, redis.ConnectionError)
    assert "\n" not in str(caught.value)


def test_an_acl_user_without_evalsha_is_permission_denied_naming_the_rule(
    redis_server: RedisServer,
) -> None:
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", "shop", "on", ">pw", "~*", "&*", "+@all", "-evalsha")
    url = f"redis://shop:pw@{HOST}:{redis_server.port}/0"
    with pytest.raises(PermissionDenied, match=r"\+evalsha") as caught:
        run(with_producer(url, lambda p: p.schedule("SN1", "20m")))
    assert isinstance(caught.value.__cause__, redis.exceptions.NoPermissionError)
    assert "pw" not in str(caught.value)


def test_a_full_redis_is_out_of_memory_caused_by_redis_oom(redis_server: RedisServer) -> None:
    admin = redis_server.client()
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1")
    with pytest.raises(OutOfMemory, match="out of memory") as caught:
        run(with_producer(redis_server.url(), lambda p: p.schedule("SN1", "20m")))
    assert isinstance(caught.value.__cause__, redis.RedisError)
    assert admin.exists("SN1:cancel") == 0


def test_a_replica_is_read_only_after_exactly_one_retry_on_a_fresh_connection(
    redis_factory: RedisFactory,
) -> None:
    primary, replica = redis_factory(extra=QUICK_SYNC), redis_factory()
    admin = replica.client()
    admin.replicaof(HOST, primary.port)
    wait_for(lambda: admin.info("replication")["master_link_status"] == "up", 10, what="sync")
    before = int(admin.info("stats")["total_connections_received"])

    with pytest.raises(ReadOnlyReplica, match="read-only replica") as caught:
        run(with_producer(replica.url(), lambda p: p.schedule("SN1", "20m")))
    assert redis.exceptions.ReadOnlyError in type(caught.value.__cause__).__mro__ or str(
        caught.value.__cause__
    ).startswith("READONLY")
    connections = int(admin.info("stats")["total_connections_received"]) - before
    assert connections == 2, "one try, then one retry on a fresh connection"


def test_a_failover_behind_a_stable_address_succeeds_on_the_one_retry(
    redis_factory: RedisFactory,
) -> None:
    """The address (a DNS name, a proxy) moves to the new primary while the pooled
    connection still reaches the demoted one, which answers READONLY: the one retry, on a
    fresh connection, reaches the new primary and the caller sees success."""
    old, new = redis_factory(), redis_factory()
    with FreezableProxy((HOST, old.port)) as proxy:

        async def scenario(p: AsyncProducer) -> None:
            await p.schedule("SN-BEFORE", "20m")
            # Failover: the old primary becomes a replica of the new one; the address moves.
            old.client().replicaof(HOST, new.port)
            proxy.upstream = (HOST, new.port)
            await p.schedule("SN-AFTER", "20m")

        run(with_producer(f"redis://{HOST}:{proxy.port}/0", scenario))
    assert new.client().pttl("SN-AFTER:cancel") > 0
    assert "errorstat_READONLY" in old.client().info("errorstats")


def test_wait_replicas_confirms_each_write_and_refuses_too_few_replicas(
    redis_factory: RedisFactory,
) -> None:
    primary, replica = redis_factory(extra=QUICK_SYNC), redis_factory()
    follower = replica.client()
    follower.replicaof(HOST, primary.port)
    wait_for(lambda: follower.info("replication")["master_link_status"] == "up", 10, what="sync")

    async def confirmed(p: AsyncProducer) -> int:
        await p.schedule("SN1", "20m")
        await p.schedule_many([(f"SN-M{i}", 60) for i in range(300)])
        return int(await p.cancel("SN1"))

    assert run(with_producer(primary.url(), confirmed, wait_replicas=1)) == 1
    wait_for(lambda: index_size(replica.client()) == 300, 10, what="replicated")

    async def too_few(p: AsyncProducer) -> object:
        return await p.schedule("SN2", "20m")

    with pytest.raises(NotReplicated, match="only 1 of 2 replicas"):
        run(with_producer(primary.url(), too_few, wait_replicas=2, wait_timeout_ms=100))
    assert primary.client().exists("SN2:cancel") == 1  # it reached the primary


# -- a real listener fires what aio scheduled --------------------------------------------


@pytest.fixture
def listener(
    redis_server: RedisServer, sqlite_url: str, tmp_path: Path
) -> Iterator[ListenerProcess]:
    env = clean_env(
        REDIS_URL=redis_server.url(0), DATABASE_URL=sqlite_url, HOME=str(tmp_path / "home")
    )
    migrate_cli(env)
    proc = ListenerProcess(env, tmp_path / "listener.log")
    try:
        yield proc
    finally:
        proc.stop()


def test_a_timer_scheduled_through_aio_is_fired_by_delayq_listen(
    redis_server: RedisServer, sqlite_url: str, listener: ListenerProcess
) -> None:
    engine = engine_for(sqlite_url)
    create_orders(engine, ["SN-AIO", "SN-AIO-PAID"])
    listener.start()

    async def scenario(p: AsyncProducer) -> None:
        await p.schedule("SN-AIO", "1s")
        await p.schedule("SN-AIO-PAID", "1s")
        assert await p.cancel("SN-AIO-PAID") is True

    run(with_producer(redis_server.url(), scenario))
    wait_for(lambda: statuses(engine)["SN-AIO"] == "cancelled", 30, what="SN-AIO cancelled")
    assert statuses(engine)["SN-AIO-PAID"] == "unpaid"


# -- in a FastAPI app (examples/fastapi_app.py) ------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fastapi_app.py"


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("fastapi_app_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: pydantic resolves annotations there
    spec.loader.exec_module(module)
    return module.app


async def call_app(*requests: tuple[str, dict[str, Any] | None]) -> list[httpx.Response]:
    """POST each (path, json) to the example app, its lifespan run around them."""
    app = load_example()
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shop") as http,
    ):
        return [await http.post(path, json=body) for path, body in requests]


def test_fastapi_app_arms_an_order_on_creation_and_disarms_it_on_payment(
    redis_server: RedisServer, settings_env: pytest.MonkeyPatch
) -> None:
    settings_env.setenv("DELAYQ_REDIS_URL", redis_server.url(0))
    client = redis_server.client()
    placed, paid, paid_again, other = run(
        call_app(
            ("/orders", {"order_sn": "SN-1001"}),
            ("/orders/SN-1001/pay", None),
            ("/orders/SN-1001/pay", None),
            ("/orders", {"order_sn": "SN-1002"}),
        )
    )
    assert placed.status_code == 201, placed.text
    expires_at = datetime.fromisoformat(placed.json()["expires_at"])
    assert abs(expires_at - datetime.now(UTC) - timedelta(minutes=30)) < timedelta(seconds=5)
    assert paid.json() == {"order_sn": "SN-1001", "disarmed": True}
    assert paid_again.json() == {"order_sn": "SN-1001", "disarmed": False}
    assert other.status_code == 201
    assert index_members(client) == ["SN-1002:cancel"]
    assert aio._default is None, "the lifespan closed the default producer's pool"


def test_fastapi_app_answers_bad_input_422_and_redis_down_503_in_one_line(
    settings_env: pytest.MonkeyPatch,
) -> None:
    settings_env.setenv("DELAYQ_REDIS_URL", f"redis://{HOST}:{free_port()}/0")
    bad, down = run(
        call_app(("/orders", {"order_sn": "SN 1001; DROP"}), ("/orders/SN-1/pay", None))
    )
    assert bad.status_code == 422
    assert "order" in bad.json()["detail"].lower()
    assert down.status_code == 503
    assert "is not reachable" in down.json()["detail"]
    assert "\n" not in down.json()["detail"]


# -- staged in the caller's async transaction (delayq.outbox) ----------------------------


def test_connection_stages_in_the_async_session_transaction_and_a_rollback_stages_nothing(
    tmp_path: Path, settings_env: pytest.MonkeyPatch
) -> None:
    """No DELAYQ_REDIS_URL at all: the staged form never talks to Redis."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    db = tmp_path / "shop.db"
    migrate_cli(clean_env(DATABASE_URL=f"sqlite:///{db}", HOME=str(tmp_path / "home")))

    async def scenario() -> list[tuple[Any, ...]]:
        engine = create_async_engine(f"sqlite+aiosqlite:///{db}")
        try:
            async with AsyncSession(engine) as session, session.begin():
                due = await aio.schedule_expiry("SN-T1", "20m", connection=session)
                assert abs(due - datetime.now(UTC) - timedelta(minutes=20)) < timedelta(seconds=5)
                assert await aio.schedule_many([("SN-T2", 60, "complete")], connection=session)
                assert await aio.cancel_expiry("SN-T1", connection=session) is True
            async with AsyncSession(engine) as session:
                await session.begin()
                await aio.schedule_expiry("SN-ROLLED-BACK", "20m", connection=session)
                await session.rollback()
            async with engine.connect() as conn:
                rows = await conn.execute(
                    text("SELECT order_sn, action, op, spec, ms FROM delayq_outbox ORDER BY id")
                )
                return [tuple(r) for r in rows]
        finally:
            await engine.dispose()

    assert run(scenario()) == [
        ("SN-T1", "cancel", "schedule", "in", 1_200_000),
        ("SN-T2", "complete", "schedule", "in", 60_000),
        ("SN-T1", "cancel", "cancel", None, None),
    ]


# -- on a Redis Cluster ------------------------------------------------------------------


def test_on_a_cluster_each_timer_is_written_to_its_slots_partition_and_fired_by_listen(
    redis_cluster: ServerCluster, sqlite_url: str, tmp_path: Path
) -> None:
    """The same calls on a redis+cluster:// URL, with WAIT on each primary: every slot's
    partition gets its timers (as ClusterStore reads them), scripts flushed from every
    primary are loaded again, and a real `delayq listen` on the cluster fires them."""
    env = clean_env(
        REDIS_URL=redis_cluster.url, DATABASE_URL=sqlite_url, HOME=str(tmp_path / "home")
    )
    migrate_cli(env)
    engine = engine_for(sqlite_url)
    fire = [f"CL-{i}" for i in range(60)]
    paid = [f"CL-PAID-{i}" for i in range(20)]
    create_orders(engine, fire + paid)
    settings = Settings(redis_url=redis_cluster.url, wait_replicas=1)
    later = [(f"CL-LATER-{i}", "1h") for i in range(500)]

    async def scenario() -> datetime:
        async with await AsyncProducer.from_settings(settings) as producer:
            one = await producer.schedule("CL-ONE", "1h", action="complete")
            assert await producer.schedule_many(later) == 500
            for primary in redis_cluster.primaries():
                with contextlib.closing(primary.admin()) as admin:
                    admin.script_flush()  # as on a promoted replica: NOSCRIPT, loaded again
            assert await producer.schedule_many([(sn, "3s") for sn in fire + paid]) == 80
            assert all([await producer.cancel(sn) for sn in paid])
            assert await producer.cancel("CL-NEVER") is False
        too_many = Settings(redis_url=redis_cluster.url, wait_replicas=2, wait_timeout_ms=100)
        async with await AsyncProducer.from_settings(too_many) as producer:
            with pytest.raises(NotReplicated, match="only 1 of 2 replicas"):
                await producer.schedule("CL-UNSURE", "1h")
        return one

    one = run(scenario())
    stats = redis_cluster.info_per_primary("commandstats").values()
    assert all(s["cmdstat_wait"]["calls"] > 0 for s in stats), "WAIT on every primary"
    assert all(s["cmdstat_script|load"]["calls"] > 0 for s in stats), "loaded after the flush"
    store = ClusterStore(redis_cluster.client(), Keys())
    assert store.timer_state("CL-ONE:complete").pending_due_ms == to_ms(one)
    assert all(store.timer_state(f"{sn}:cancel").pending_due_ms for sn, _ in later[:50])
    assert not store.timer_state(f"{paid[0]}:cancel").pending_due_ms
    assert len({redis_cluster.node_for_key(sn + ":cancel").port for sn, _ in later}) == 3

    listener = ListenerProcess(env, tmp_path / "listener.log").start()
    try:
        wait_for(
            lambda: all(st == "cancelled" for sn, st in statuses(engine).items() if sn in fire),
            60,
            interval_s=0.2,
            what="every unpaid order cancelled",
        )
    finally:
        listener.stop()
    assert {sn: st for sn, st in statuses(engine).items() if sn in paid} == dict.fromkeys(
        paid, "unpaid"
    )
