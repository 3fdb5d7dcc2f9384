"""The test helpers themselves: if these fail, nothing else in the suite can be trusted."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from tests.servers import RedisFactory, RedisServer, start_process, stop_process, wait_for


def test_appendonly_server_keeps_keys_across_restart(redis_factory: RedisFactory) -> None:
    server = redis_factory(appendonly=True)
    client = server.client()
    client.set("order:1", "pending")
    client.set("timer:1", "x", px=600_000)
    port = server.port

    server.restart()

    assert server.alive
    assert server.port == port
    after = server.client()
    assert after.get("order:1") == "pending"
    assert after.pttl("timer:1") > 0


def test_kill_makes_server_not_alive(redis_server: RedisServer) -> None:
    client = redis_server.client()
    assert client.ping()

    redis_server.kill()

    assert not redis_server.alive
    with pytest.raises(redis.ConnectionError):
        redis_server.client().ping()


def test_default_server_sends_expired_events(redis_server: RedisServer) -> None:
    client = redis_server.client()
    flags = client.config_get("notify-keyspace-events")["notify-keyspace-events"]
    assert isinstance(flags, str)
    assert set(flags) == set("Egx")  # redis reorders the flags it reports

    pubsub = client.pubsub()  # type: ignore[no-untyped-call]
    pubsub.subscribe("__keyevent@0__:expired")
    confirmed = wait_for(
        lambda: pubsub.get_message(timeout=0.05), 5, what="the subscription to be confirmed"
    )
    assert confirmed is not None
    assert confirmed["type"] == "subscribe"
    client.set("timer:soon", "1", px=20)

    message = wait_for(
        lambda: pubsub.get_message(timeout=0.05), 5, what="the expired event for timer:soon"
    )
    assert message is not None
    assert message["data"] == "timer:soon"
    pubsub.close()


def test_notify_empty_disables_keyspace_events(redis_factory: RedisFactory) -> None:
    server = redis_factory(notify="")
    flags = server.client().config_get("notify-keyspace-events")
    assert flags == {"notify-keyspace-events": ""}


def test_wait_for_returns_the_truthy_value() -> None:
    calls: list[int] = []

    def third_time() -> int:
        calls.append(1)
        return len(calls) if len(calls) >= 3 else 0

    assert wait_for(third_time, 5, interval_s=0, what="the third call") == 3


def test_wait_for_raises_with_message_at_deadline() -> None:
    with pytest.raises(
        AssertionError, match=re.escape("timed out after 0.05s waiting for the impossible")
    ):
        wait_for(lambda: False, 0.05, what="the impossible")


def test_stop_process_terminates_a_running_child(tmp_path: Path) -> None:
    log_path = tmp_path / "child.log"
    script = "import time; print('ready', flush=True); time.sleep(600)"
    proc = start_process([sys.executable, "-c", script], dict(os.environ), log_path)

    wait_for(lambda: "ready" in log_path.read_text(), 10, what="the child to print ready")
    status = stop_process(proc, timeout_s=5)

    assert status == -15  # ended by our SIGTERM, not by the SIGKILL fallback


def test_mariadb_url_is_a_usable_empty_database(mariadb_url: str) -> None:
    assert re.fullmatch(
        r"mysql\+pymysql://root@127\.0\.0\.1:3306/delayq_t_[0-9a-f]{12}", mariadb_url
    )
    engine = sa.create_engine(mariadb_url)
    try:
        with engine.begin() as conn:
            assert sa.inspect(conn).get_table_names() == []
            conn.execute(sa.text("CREATE TABLE t (id INT PRIMARY KEY, note VARCHAR(20))"))
            conn.execute(sa.text("INSERT INTO t VALUES (1, 'due')"))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT note FROM t WHERE id = 1")).scalar_one() == "due"
    finally:
        engine.dispose()


def test_postgres_url_is_a_usable_empty_database(postgres_url: str) -> None:
    engine = sa.create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (id INT PRIMARY KEY, note TEXT)"))
            conn.execute(sa.text("INSERT INTO t VALUES (1, 'due')"))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT note FROM t WHERE id = 1")).scalar_one() == "due"
    finally:
        engine.dispose()


def test_database_url_runs_each_backend(database_url: str) -> None:
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()
