"""Running delayq unattended: HTTP metrics and health, systemd's notify protocol, logs,
`delayq inspect`, migrations and restarts while listeners run."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pymysql
import pytest
import sqlalchemy as sa

from delayq.keys import Keys
from delayq.producer import Producer
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
from tests.servers import RedisServer, free_port, wait_for

ListenerFactory = Callable[..., ListenerProcess]


@pytest.fixture
def listeners(tmp_path: Path) -> Iterator[ListenerFactory]:
    started: list[ListenerProcess] = []

    def make(env: dict[str, str], *args: str, wait_ready: bool = True) -> ListenerProcess:
        proc = ListenerProcess(env, tmp_path / f"listener-{len(started)}.log", args)
        started.append(proc)
        return proc.start(wait_ready=wait_ready)

    yield make
    for proc in started:
        proc.stop()


@pytest.fixture
def env(redis_server: RedisServer, sqlite_url: str, tmp_path: Path) -> dict[str, str]:
    env = clean_env(
        REDIS_URL=redis_server.url(0), DATABASE_URL=sqlite_url, HOME=str(tmp_path / "home"),
        LEASE_S="2",
    )  # fmt: skip
    migrate_cli(env)
    return env


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_listener_serves_metrics_health_and_readiness(
    env: dict[str, str], listeners: ListenerFactory, redis_server: RedisServer, sqlite_url: str
) -> None:
    port = free_port()
    listeners(env, "--http", f"127.0.0.1:{port}")
    base = f"http://127.0.0.1:{port}"
    assert _get(f"{base}/readyz") == (200, "ready\n")
    assert _get(f"{base}/healthz") == (200, "ok\n")
    engine = engine_for(sqlite_url)
    create_orders(engine, ["M1", "M2", "M3"])
    producer = Producer(redis_server.client(), Keys())
    producer.schedule_many([("M1", 0), ("M2", 0), ("M3", 0), ("GHOST", 0), ("LATER", "1h")])
    wait_for(lambda: len(outcome_rows(engine)) == 4, 30, what="four outcomes")

    def metrics() -> str:
        return _get(f"{base}/metrics")[1]

    wait_for(
        lambda: 'delayq_timers_fired_total{action="cancel",outcome="applied"} 3.0' in metrics(),
        10,
        what="applied counter",
    )
    text = metrics()
    assert 'delayq_timers_fired_total{action="cancel",outcome="not_found"} 1.0' in text
    assert "delayq_lateness_seconds_count 3.0" in text
    assert "delayq_pending 1.0" in text
    assert "delayq_overdue 0.0" in text
    assert "delayq_dead_letters 0.0" in text
    assert "delayq_listeners_alive 1.0" in text
    assert "delayq_db_batch_seconds_count" in text
    assert "delayq_last_event_age_seconds" in text
    assert _get(f"{base}/nope")[0] == 404


def test_healthz_says_why_while_redis_is_down_and_recovers(
    redis_factory: Callable[..., RedisServer],
    sqlite_url: str,
    tmp_path: Path,
    listeners: ListenerFactory,
) -> None:
    server = redis_factory(appendonly=True)
    env = clean_env(REDIS_URL=server.url(0), DATABASE_URL=sqlite_url, HOME=str(tmp_path))
    migrate_cli(env)
    port = free_port()
    listener = listeners(env, "--http", f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}/healthz"
    server.stop()
    # Redis is probed once a second: the lost subscription may be reported first.
    _, body = wait_for(
        lambda: (r := _get(url))[0] == 503 and "redis:" in r[1] and r, 30, what="healthz 503"
    )
    assert "redis:" in body and "subscription" in body, body
    server.restart()
    wait_for(lambda: _get(url) == (200, "ok\n"), 30, what="healthz 200 again")
    assert listener.proc is not None and listener.proc.poll() is None
    metrics = _get(f"http://127.0.0.1:{port}/metrics")[1]
    assert "delayq_redis_reconnects_total 1.0" in metrics


def test_listener_speaks_systemd_notify_ready_watchdog_and_stopping(
    env: dict[str, str], listeners: ListenerFactory, tmp_path: Path
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        notify_env = {**env, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}
        listener = listeners(notify_env, wait_ready=False)
        messages: list[str] = []

        def receive_until(predicate: Callable[[list[str]], bool]) -> None:
            while not predicate(messages):
                messages.append(sock.recv(4096).decode())

        receive_until(lambda m: any(x.startswith("READY=1") for x in m))
        # READY comes only once the subscription is live.
        assert "listening:" in listener.text()
        ready = next(x for x in messages if x.startswith("READY=1"))
        assert "STATUS=listening" in ready
        receive_until(lambda m: m.count("WATCHDOG=1") >= 3)
        assert listener.stop() == 0
        receive_until(lambda m: "STOPPING=1" in m)


def test_logs_are_json_lines_without_secrets_when_not_on_a_terminal(
    redis_factory: Callable[..., RedisServer],
    sqlite_url: str,
    tmp_path: Path,
    listeners: ListenerFactory,
) -> None:
    server = redis_factory()
    server.client().acl_setuser(
        "app",
        enabled=True,
        passwords=["+s3cret-pw"],
        keys=["*"],
        channels=["*"],
        commands=["+@all"],
    )
    url = f"redis://app:s3cret-pw@127.0.0.1:{server.port}/0"
    env = clean_env(REDIS_URL=url, DATABASE_URL=sqlite_url, HOME=str(tmp_path))
    migrate_cli(env)
    listener = listeners(env)
    assert listener.stop() == 0
    lines = [json.loads(line) for line in listener.text().splitlines() if line.strip()]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(x) for x in lines)
    assert any(x["msg"].startswith("listening:") for x in lines)
    assert "s3cret-pw" not in listener.text()
    assert "***" in listener.text()


def test_inspect_shows_a_timers_state_due_time_ttl_and_last_outcome(
    env: dict[str, str], listeners: ListenerFactory, redis_server: RedisServer, sqlite_url: str
) -> None:
    engine = engine_for(sqlite_url)
    create_orders(engine, ["I1"])
    assert run_cli("schedule", "I1", "--in", "1h", env=env).returncode == 0
    pending = json.loads(run_cli("inspect", "I1", "--json", env=env).stdout)
    assert pending["state"] == "pending" and pending["timer"] == "I1:cancel"
    assert 3_500_000 < pending["ttl_ms"] <= 3_600_000 and pending["due_at"]
    assert pending["last_outcome"] is None
    listeners(env)
    assert run_cli("schedule", "I1", "--in", "0", env=env).returncode == 0
    wait_for(lambda: outcome_rows(engine), 30, what="I1 fired")
    fired = json.loads(run_cli("inspect", "I1", "--json", env=env).stdout)
    assert fired["state"] == "none" and fired["last_outcome"]["outcome"] == "applied"
    none = run_cli("inspect", "NEVER", env=env)
    assert none.returncode == 0 and "state: none" in none.stdout
    bad = run_cli("inspect", "bad:id", env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("delayq: error:")


def test_migrate_while_listeners_run_is_harmless(
    env: dict[str, str], listeners: ListenerFactory, redis_server: RedisServer, sqlite_url: str
) -> None:
    engine = engine_for(sqlite_url)
    create_orders(engine, ["U1"])
    listener = listeners(env)
    done = run_cli("migrate", env=env)
    assert done.returncode == 0, done.stderr
    Producer(redis_server.client(), Keys()).schedule("U1", 0)
    wait_for(lambda: statuses(engine)["U1"] == "cancelled", 30, what="U1 cancelled")
    assert listener.proc is not None and listener.proc.poll() is None


def test_rolling_restart_of_two_listeners_loses_nothing(
    redis_server: RedisServer, mariadb_url: str, tmp_path: Path, listeners: ListenerFactory
) -> None:
    # A long lease: only a listener that gives its claims back on SIGTERM lets the others
    # fire them within this test's deadlines.
    env = clean_env(
        REDIS_URL=redis_server.url(0), DATABASE_URL=mariadb_url, HOME=str(tmp_path), LEASE_S="120"
    )
    migrate_cli(env)
    engine = engine_for(mariadb_url)
    sns = [f"R{i:05d}" for i in range(1500)]
    create_orders(engine, sns)
    a, b = listeners(env), listeners(env)
    Producer(redis_server.client(), Keys()).schedule_many(
        (sn, 0.5 + i * 4.0 / len(sns)) for i, sn in enumerate(sns)
    )

    def cancelled() -> int:
        return Counter(statuses(engine).values())["cancelled"]

    wait_for(lambda: cancelled() >= 200, 30, what="firing under way")
    assert a.stop() == 0  # SIGTERM: finishes its batch, gives its claims back
    listeners(env)
    wait_for(lambda: cancelled() >= 700, 30, what="firing goes on")
    assert b.stop() == 0
    listeners(env)
    wait_for(lambda: cancelled() == len(sns), 45, what="every order cancelled")
    rows = outcome_rows(engine)
    assert Counter(r.order_sn for r in rows) == Counter(sns)
    assert {r.outcome for r in rows} == {"applied"}


def test_database_connections_dropped_by_the_server_are_replaced_at_once(
    redis_server: RedisServer, mariadb_url: str, tmp_path: Path, listeners: ListenerFactory
) -> None:
    env = clean_env(REDIS_URL=redis_server.url(0), DATABASE_URL=mariadb_url, HOME=str(tmp_path))
    migrate_cli(env)
    engine = engine_for(mariadb_url)
    create_orders(engine, ["K1", "K2"])
    listeners(env)
    producer = Producer(redis_server.client(), Keys())
    producer.schedule("K1", 0)
    wait_for(lambda: statuses(engine)["K1"] == "cancelled", 30, what="K1 cancelled")
    database = sa.make_url(mariadb_url).database
    admin = pymysql.connect(host="127.0.0.1", port=3306, user="root", autocommit=True)
    try:
        with admin.cursor() as cur:  # what a server restart or wait_timeout does to a pool
            cur.execute(
                "SELECT id FROM information_schema.processlist"
                " WHERE db = %s AND id <> CONNECTION_ID()",
                (database,),
            )
            for (thread_id,) in cur.fetchall():
                cur.execute(f"KILL {int(thread_id)}")
    finally:
        admin.close()
    engine.dispose()
    producer.schedule("K2", 0)
    wait_for(lambda: statuses(engine)["K2"] == "cancelled", 30, what="K2 cancelled")
    (k2,) = [r for r in outcome_rows(engine) if r.order_sn == "K2"]
    # Not through the retry backoff (>= 500 ms): a fresh connection at once.
    assert k2.outcome == "applied" and k2.lateness_ms < 400, k2


def test_check_warns_when_redis_would_lose_pending_timers_on_restart(
    redis_factory: Callable[..., RedisServer], sqlite_url: str, tmp_path: Path
) -> None:
    volatile, durable = redis_factory(appendonly=False), redis_factory(appendonly=True)
    for server, expected in (
        (volatile, "warning: Redis keeps nothing on disk"),
        (durable, "ok: appendonly is on"),
    ):
        env = clean_env(REDIS_URL=server.url(0), DATABASE_URL=sqlite_url, HOME=str(tmp_path))
        migrate_cli(env)
        done = run_cli("check", env=env)
        assert done.returncode == 0, done.stderr
        assert expected in done.stdout, done.stdout
