"""delayq.testing used the way a user's test suite uses it: a private Redis per test, the
user's own code calling delayq.schedule_expiry, and fire_due applying real firings in the
test's database. Nothing here is mocked."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

import delayq
import delayq.aio
from delayq import producer as producer_module
from delayq.actions import registry
from delayq.errors import ServiceUnavailable
from delayq.testing import TimerTestServer, running
from tests.servers import wait_for

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "order_service"


@pytest.fixture
def own_actions() -> Iterator[None]:
    """Actions a test registers with @delayq.action are forgotten after it, so that no
    other test's listener sees them."""
    before = dict(registry._registered)
    yield
    registry._registered.clear()
    registry._registered.update(before)


def add_orders(url: str, *order_sns: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for sn in order_sns:
            conn.execute(
                sa.text("INSERT INTO orders (order_sn, status) VALUES (:sn, 'unpaid')"),
                {"sn": sn},
            )
    engine.dispose()


def statuses(url: str) -> dict[str, str]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT order_sn, status FROM orders")).all()
    engine.dispose()
    return {sn: status for sn, status in rows}


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def test_an_unpaid_order_is_cancelled_and_a_paid_one_is_not(database_url: str) -> None:
    with running(database_url=database_url) as server, server.use():
        server.migrate()  # the standard orders table: this database has none
        add_orders(database_url, "SN1", "SN2")
        delayq.schedule_expiry("SN1", "20m")
        delayq.schedule_expiry("SN2", "20m")
        assert delayq.cancel_expiry("SN2")  # paid

        fired = server.fire_due()

        assert [(f.order_sn, f.action, f.outcome) for f in fired] == [("SN1", "cancel", "applied")]
        assert statuses(database_url) == {"SN1": "cancelled", "SN2": "unpaid"}
        assert server.pending() == []
        # The firing went the listener's whole way: outcome row, acknowledged in Redis.
        info = server.delayq.inspect("SN1", "cancel")
        assert info["state"] == "none"
        assert info["last_outcome"]["outcome"] == "applied"
        # Reported with the time it was scheduled for, not the moment it was made due.
        assert 19 * 60 < (fired[0].due_at - fired[0].fired_at).total_seconds() <= 20 * 60


def test_a_timer_staged_in_the_services_transaction_fires_only_if_it_committed(
    database_url: str,
) -> None:
    with running(database_url=database_url) as server, server.use():
        server.migrate()
        engine = sa.create_engine(database_url)
        insert = sa.text("INSERT INTO orders (order_sn, status) VALUES (:sn, 'unpaid')")
        with engine.begin() as conn:
            conn.execute(insert, {"sn": "SN1"})
            delayq.schedule_expiry("SN1", "20m", connection=conn)
        with pytest.raises(RuntimeError), engine.begin() as conn:
            conn.execute(insert, {"sn": "SN2"})
            delayq.schedule_expiry("SN2", "20m", connection=conn)
            raise RuntimeError("the order could not be placed")
        engine.dispose()

        assert [t.order_sn for t in server.pending()] == ["SN1"]
        assert [(f.order_sn, f.outcome) for f in server.fire_due()] == [("SN1", "applied")]
        assert statuses(database_url) == {"SN1": "cancelled"}


def test_fire_due_within_fires_only_what_falls_due_by_then(sqlite_url: str) -> None:
    with running(database_url=sqlite_url) as server, server.use():
        server.migrate()
        add_orders(sqlite_url, "SN5M", "SN20M", "SN2H")
        for sn, delay in (("SN5M", "5m"), ("SN20M", "20m"), ("SN2H", "2h")):
            delayq.schedule_expiry(sn, delay)

        fired = server.fire_due(within="30m")

        assert [f.order_sn for f in fired] == ["SN5M", "SN20M"]  # in due order
        assert [(t.order_sn, t.action) for t in server.pending()] == [("SN2H", "cancel")]
        assert statuses(sqlite_url)["SN2H"] == "unpaid"
        assert [f.order_sn for f in server.fire_due()] == ["SN2H"]
        assert [f.order_sn for f in server.fired] == ["SN5M", "SN20M", "SN2H"]


def test_user_actions_run_in_the_listeners_transaction_and_failures_are_retried(
    sqlite_url: str, own_actions: None
) -> None:
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE points (order_sn TEXT, points INTEGER)"))

    with running(database_url=sqlite_url) as server, server.use():
        # Registered after the server started, as a module imported late would be.
        @delayq.action("award_points")
        def award_points(ctx: delayq.Context) -> str:
            assert ctx.connection is not None
            ctx.connection.execute(
                sa.text("INSERT INTO points VALUES (:sn, 10)"), {"sn": ctx.order_sn}
            )
            return "awarded"

        @delayq.action("charge_card")
        def charge_card(ctx: delayq.Context) -> None:
            assert ctx.connection is not None
            ctx.connection.execute(sa.text("INSERT INTO points VALUES (:sn, -1)"), {"sn": "x"})
            raise RuntimeError("card declined")

        delayq.schedule_expiry("SN1", "1h", action="award_points")
        delayq.schedule_expiry("SN2", "1h", action="charge_card")
        fired = {f.action: f for f in server.fire_due()}

        assert fired["award_points"].outcome == "awarded"
        assert fired["charge_card"].outcome == "failed"
        assert isinstance(fired["charge_card"].error, RuntimeError)
        # The failed handler's write is rolled back; its firing waits for its retry.
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT * FROM points")).all() == [("SN1", 10)]
        claims = server.delayq.inspect("SN2", "charge_card")["claims"]
        assert [c["failed_attempts"] for c in claims] == [1]
    engine.dispose()


def test_a_failed_firing_is_retried_by_a_later_fire_due_once_its_backoff_passed(
    sqlite_url: str, own_actions: None
) -> None:
    with running(database_url=sqlite_url, retry_backoff_s=0.05) as server, server.use():

        @delayq.action("notify_buyer")
        def notify_buyer(ctx: delayq.Context) -> str:
            if ctx.attempt == 1:
                raise ConnectionError("mail server down")
            return "notified"

        delayq.schedule_expiry("SN1", "10m", action="notify_buyer")
        assert [(f.outcome, f.attempt) for f in server.fire_due()] == [("failed", 1)]

        retried = wait_for(server.fire_due, 10, what="the retry's backoff to pass")

        assert [(f.outcome, f.attempt) for f in retried] == [("notified", 2)]
        assert server.delayq.inspect("SN1", "notify_buyer")["state"] == "none"


def test_an_external_action_is_called_once_in_the_tests_thread(
    sqlite_url: str, own_actions: None
) -> None:
    calls: list[tuple[str, str, bool]] = []

    with running(database_url=sqlite_url) as server, server.use():

        @delayq.action("push_to_crm", external=True)
        def push_to_crm(ctx: delayq.Context) -> str:
            main = threading.current_thread() is threading.main_thread()
            calls.append((ctx.order_sn, ctx.idempotency_key, main))
            if ctx.order_sn == "SN2":
                raise TimeoutError("crm did not answer")
            return "pushed"

        delayq.schedule_expiry("SN1", "5m", action="push_to_crm")
        delayq.schedule_expiry("SN2", "6m", action="push_to_crm")
        fired = server.fire_due()

        assert [(f.order_sn, f.outcome) for f in fired] == [("SN1", "pushed"), ("SN2", "failed")]
        assert sorted((sn, main) for sn, _, main in calls) == [("SN1", True), ("SN2", True)]
        assert all(key.startswith(f"{sn}:push_to_crm@") for sn, key, _ in calls)


def test_a_ttl_key_set_without_delayq_is_fired_like_the_listener_would(sqlite_url: str) -> None:
    with running(database_url=sqlite_url) as server:
        server.migrate()
        add_orders(sqlite_url, "LEGACY1")
        server.redis.set("LEGACY1:cancel", "1", ex=1200)  # an old PHP producer's SETEX

        assert [(f.order_sn, f.outcome) for f in server.fire_due()] == [("LEGACY1", "applied")]
        assert statuses(sqlite_url) == {"LEGACY1": "cancelled"}


def test_no_redis_server_thread_or_directory_is_left_even_when_the_test_body_raises(
    sqlite_url: str,
) -> None:
    threads_before = set(threading.enumerate())
    server = TimerTestServer(database_url=sqlite_url)
    with pytest.raises(RuntimeError, match="the test failed"), server, server.use():
        pid = server.redis_process.pid
        assert pid is not None and alive(pid)
        delayq.schedule_expiry("SN1", "20m")
        server.fire_due()
        raise RuntimeError("the test failed")
    assert not alive(pid)  # exited and reaped: not even a zombie
    assert not server.dir.exists()
    assert set(threading.enumerate()) <= threads_before
    assert os.environ.get("DELAYQ_REDIS_URL") != server.url


def test_use_points_delayq_at_the_test_redis_and_puts_everything_back(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a developer's shell may hold: the real Redis. The test must never write there.
    monkeypatch.setenv("DELAYQ_REDIS_URL", "redis://production.invalid:6379/1")
    monkeypatch.delenv("DELAYQ_HOME", raising=False)
    sentinel = object()
    monkeypatch.setattr(producer_module, "_default", sentinel)
    monkeypatch.setattr(delayq.aio, "_default", sentinel)

    with running(database_url=sqlite_url) as server:
        with server.use():
            assert os.environ["DELAYQ_REDIS_URL"] == server.url
            assert os.environ["DELAYQ_DATABASE_URL"] == sqlite_url
            delayq.schedule_expiry("SN1", "20m")
            assert [t.order_sn for t in server.pending()] == ["SN1"]
            # Code that builds its own producer from the environment finds it too.
            own = delayq.Producer.from_settings(delayq.Settings.load(env_file=None))
            assert own.cancel("SN1")
            own.client.close()
            # And delayq.aio's, in an event loop of the test's own.
            asyncio.run(delayq.aio.schedule_expiry("SN2", "20m"))
            assert [t.order_sn for t in server.pending()] == ["SN2"]
        assert os.environ["DELAYQ_REDIS_URL"] == "redis://production.invalid:6379/1"
        assert "DELAYQ_HOME" not in os.environ
        assert producer_module._default is sentinel
        assert delayq.aio._default is sentinel


def test_a_failing_database_is_one_clear_error_and_the_firing_is_kept(sqlite_url: str) -> None:
    # An orders table the settings name but the database does not have.
    with running(database_url=sqlite_url, orders_table="shop_orders") as server, server.use():
        delayq.schedule_expiry("SN1", "20m")
        with pytest.raises(ServiceUnavailable, match=r"no such table: shop_orders"):
            server.fire_due()
        assert server.delayq.inspect("SN1", "cancel")["state"] == "in_flight"


def test_a_redis_server_that_cannot_start_is_one_clear_error_and_leaves_nothing() -> None:
    server = TimerTestServer(redis_server_bin="/bin/false")
    with pytest.raises(ServiceUnavailable, match="did not start"):
        server.start()
    assert not server.dir.exists()


def test_one_server_shared_by_tests_is_emptied_by_reset(sqlite_url: str) -> None:
    with running(database_url=sqlite_url) as server, server.use():
        delayq.schedule_expiry("SN1", "20m")
        server.reset()
        assert server.pending() == []
        assert server.fire_due() == []
        with pytest.raises(redis.ResponseError):
            server.redis.execute_command("NO-SUCH-COMMAND")  # still answering


def test_the_order_service_example_passes_its_own_tests(tmp_path: Path) -> None:
    """examples/order_service as its users run it: pytest with the plugin from its root
    conftest.py, and python -m unittest."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELAYQ_")}
    env["TMPDIR"] = str(tmp_path)
    for args, expected in (
        (["-m", "pytest", "-q"], "7 passed"),
        (["-m", "unittest", "test_orders_unittest"], "OK"),
    ):
        run = subprocess.run(
            [sys.executable, *args],
            cwd=EXAMPLE,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        output = run.stdout + run.stderr
        assert run.returncode == 0, output
        assert expected in output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("delayq-test-")]


def test_without_the_listener_extra_the_import_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['sqlalchemy'] = None\n"
        "try:\n    import delayq.testing\nexcept ImportError as exc:\n    print(exc)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "pip install 'delayq[listener]'" in run.stdout
