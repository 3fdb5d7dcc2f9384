"""The product path as a new user tries it: orders in a real database, timers in a real
Redis, `delayq listen` as a real subprocess."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
    set_status,
    statuses,
)
from tests.servers import SERVER_KINDS, RedisServer, wait_for

# Every test here runs on Redis and on Valkey (the server_kind fixture, tests/conftest.py).
pytestmark = pytest.mark.parametrize("server_kind", SERVER_KINDS)


@pytest.fixture(params=["sqlite", "mariadb", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Every end-to-end scenario on each supported database (PostgreSQL when it runs)."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
def env(redis_server: RedisServer, database_url: str, tmp_path: Path) -> dict[str, str]:
    env = clean_env(
        REDIS_URL=redis_server.url(0), DATABASE_URL=database_url, HOME=str(tmp_path / "home")
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


def test_unpaid_order_is_cancelled_paid_and_disarmed_ones_are_untouched(
    env: dict[str, str], listener: ListenerProcess, database_url: str
) -> None:
    engine = engine_for(database_url)
    create_orders(engine, ["SN-UNPAID", "SN-PAID", "SN-DISARMED"])
    listener.start()
    for sn in ("SN-UNPAID", "SN-PAID", "SN-DISARMED"):
        # Far enough ahead for the CLI calls below on a loaded machine (~1.5 s each).
        done = run_cli("schedule", sn, "--in", "8s", env=env)
        assert done.returncode == 0, done.stderr
    set_status(engine, "SN-PAID", "paid")
    assert run_cli("cancel", "SN-PAID", env=env).returncode == 0
    assert run_cli("cancel", "SN-DISARMED", env=env).stdout.startswith("cancelled")

    wait_for(lambda: statuses(engine)["SN-UNPAID"] == "cancelled", 30, what="SN-UNPAID cancelled")
    assert statuses(engine) == {
        "SN-UNPAID": "cancelled",
        "SN-PAID": "paid",
        "SN-DISARMED": "unpaid",
    }
    (row,) = outcome_rows(engine)
    assert (row.order_sn, row.action, row.outcome) == ("SN-UNPAID", "cancel", "applied")
    assert 0 <= row.lateness_ms < 1000, row


def test_order_paid_after_scheduling_but_timer_left_armed_is_never_cancelled(
    env: dict[str, str], listener: ListenerProcess, database_url: str, redis_server: RedisServer
) -> None:
    engine = engine_for(database_url)
    create_orders(engine, ["SN-1"])
    listener.start()
    Producer(redis_server.client(), Keys()).schedule("SN-1", 0.5)
    set_status(engine, "SN-1", "paid")  # paid, but the shop forgot to cancel the timer
    wait_for(lambda: outcome_rows(engine), 30, what="an outcome for SN-1")
    assert statuses(engine) == {"SN-1": "paid"}
    assert [r.outcome for r in outcome_rows(engine)] == ["skipped_not_unpaid"]


def test_legacy_setex_key_without_index_entry_still_cancels_its_order(
    env: dict[str, str], listener: ListenerProcess, database_url: str, redis_server: RedisServer
) -> None:
    engine = engine_for(database_url)
    create_orders(engine, ["LEGACY-1"])
    listener.start()
    client = redis_server.client()
    client.execute_command("SETEX", "LEGACY-1:cancel", 1, "x")
    # Expire it now, as any read after its TTL would, instead of waiting for Redis's cycle.
    wait_for(lambda: client.exists("LEGACY-1:cancel") == 0, 10, what="legacy key expired")
    wait_for(lambda: statuses(engine)["LEGACY-1"] == "cancelled", 30, what="legacy order cancelled")
    assert [r.outcome for r in outcome_rows(engine)] == ["applied"]


def test_unknown_action_and_missing_order_are_recorded_not_crashed_on(
    env: dict[str, str], listener: ListenerProcess, database_url: str, redis_server: RedisServer
) -> None:
    engine = engine_for(database_url)
    create_orders(engine, ["SN-OK"])
    listener.start()
    producer = Producer(redis_server.client(), Keys())
    producer.schedule("SN-OK", 0, action="refund")  # no such action
    producer.schedule("SN-GHOST", 0)  # no such order
    producer.schedule("SN-OK", 0.2)
    wait_for(lambda: len(outcome_rows(engine)) == 3, 30, what="three outcomes")
    got = {(r.order_sn, r.action): r.outcome for r in outcome_rows(engine)}
    assert got == {
        ("SN-OK", "refund"): "unknown_action",
        ("SN-GHOST", "cancel"): "not_found",
        ("SN-OK", "cancel"): "applied",
    }
    assert listener.proc is not None and listener.proc.poll() is None


def test_past_and_zero_delays_fire_immediately_through_the_same_path(
    env: dict[str, str], listener: ListenerProcess, database_url: str
) -> None:
    engine = engine_for(database_url)
    create_orders(engine, ["SN-ZERO", "SN-PAST"])
    listener.start()
    assert run_cli("schedule", "SN-ZERO", "--in", "0", env=env).returncode == 0
    assert run_cli("schedule", "SN-PAST", "--at", "2020-01-01T00:00:00Z", env=env).returncode == 0
    wait_for(
        lambda: set(statuses(engine).values()) == {"cancelled"}, 30, what="both orders cancelled"
    )
    assert sorted(r.outcome for r in outcome_rows(engine)) == ["applied", "applied"]


def test_listener_refuses_a_redis_without_keyspace_notifications(
    redis_factory: object, sqlite_url: str, tmp_path: Path
) -> None:
    server = redis_factory(notify="")  # type: ignore[operator]
    env = clean_env(REDIS_URL=server.url(0), DATABASE_URL=sqlite_url, HOME=str(tmp_path))
    migrate_cli(env)
    done = run_cli("listen", env=env, timeout_s=30)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "notify-keyspace-events Egx" in lines[0], done.stderr


def test_sigterm_stops_the_listener_cleanly(env: dict[str, str], listener: ListenerProcess) -> None:
    listener.start()
    assert listener.stop() == 0
    assert "stopped" in listener.text()


def test_your_own_orders_table_is_used_through_settings_alone(
    redis_server: RedisServer, database_url: str, tmp_path: Path
) -> None:
    engine = engine_for(database_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text("CREATE TABLE shop_orders (sn VARCHAR(64) PRIMARY KEY, state VARCHAR(16))")
        )
        conn.execute(
            sa.text("INSERT INTO shop_orders (sn, state) VALUES (:sn, :st)"),
            [{"sn": "OWN-1", "st": "NEW"}, {"sn": "OWN-2", "st": "PAID"}],
        )
    env = clean_env(
        REDIS_URL=redis_server.url(0),
        DATABASE_URL=database_url,
        HOME=str(tmp_path / "home"),
        ORDERS_TABLE="shop_orders",
        ORDER_KEY_COLUMN="sn",
        STATUS_COLUMN="state",
        STATUS_UNPAID="NEW",
        STATUS_PAID="PAID",
        STATUS_CANCELLED="CANCELED",
        CANCELLED_AT_COLUMN="",
        UPDATED_AT_COLUMN="",
    )
    migrate_cli(env)
    assert not sa.inspect(engine).has_table("orders"), "delayq must not create its own orders"
    listener = ListenerProcess(env, tmp_path / "listener.log")
    try:
        listener.start()
        for sn in ("OWN-1", "OWN-2"):
            assert run_cli("schedule", sn, "--in", "0", env=env).returncode == 0
        wait_for(lambda: len(outcome_rows(engine)) == 2, 30, what="two outcomes")
    finally:
        listener.stop()
    with engine.connect() as conn:
        rows = dict(conn.execute(sa.text("SELECT sn, state FROM shop_orders")).all())  # type: ignore[arg-type]
    assert rows == {"OWN-1": "CANCELED", "OWN-2": "PAID"}
    assert sorted(r.outcome for r in outcome_rows(engine)) == ["applied", "skipped_not_NEW"]
