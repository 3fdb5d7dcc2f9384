"""A database link that stops answering: no applier hangs on it, /healthz answers at once,
and every timer still fires exactly once.

The listener (`delayq listen`, a real subprocess) reaches the database through
tests/proxy.py, which freezes the link the way a dead network path does: the sockets stay
open and nothing resets them, only no byte comes through any more.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from delayq.actions import Applier
from delayq.db import break_connection, make_engine
from delayq.keys import Keys
from delayq.liveness import Probe, Watch
from delayq.producer import Producer
from delayq.settings import Settings
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
from tests.proxy import FreezableProxy, blackhole
from tests.servers import RedisServer, free_port, wait_for
from tests.test_reliability import ListenerFactory, listeners  # noqa: F401  (the fixture)

#: The batch bound these tests set: small, so that a stuck batch is given up quickly.
BATCH_TIMEOUT_S = 3.0
#: What a loaded CI machine may add to a bound.
MARGIN_S = 3.0
#: /healthz must answer within this, whatever the database does.
HEALTH_ANSWER_S = 2.0
#: The log line of the watch breaking a stuck batch's connection.
WATCH_BROKE = "without an answer from the database"

ProxyFactory = Callable[[str], tuple[FreezableProxy, str]]


@pytest.fixture
def proxied() -> Iterator[ProxyFactory]:
    """Puts a FreezableProxy in front of a database URL's server: (proxy, URL through it).
    Every proxy is stopped at the end, even on failure."""
    proxies: list[FreezableProxy] = []

    def make(database_url: str) -> tuple[FreezableProxy, str]:
        url = sa.make_url(database_url)
        proxy = FreezableProxy((url.host or "127.0.0.1", url.port or 0))
        proxies.append(proxy)
        return proxy, url.set(host="127.0.0.1", port=proxy.port).render_as_string(False)

    yield make
    for proxy in proxies:
        proxy.stop()


@pytest.fixture(params=["mariadb", "postgres"])
def server_database_url(request: pytest.FixtureRequest) -> str:
    """Runs a test once on MariaDB and once on PostgreSQL."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


class Health:
    """GET /healthz, failing the test if an answer takes longer than HEALTH_ANSWER_S."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/healthz"
        self.slowest_s = 0.0

    def get(self) -> tuple[int, str]:
        started = time.monotonic()
        try:
            with urllib.request.urlopen(self.url, timeout=HEALTH_ANSWER_S + 3) as response:
                status, body = response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read().decode()
        took_s = time.monotonic() - started
        self.slowest_s = max(self.slowest_s, took_s)
        assert took_s < HEALTH_ANSWER_S, f"/healthz took {took_s:.1f} s ({status}: {body!r})"
        return status, body


def _start(
    start_listener: ListenerFactory,
    redis: RedisServer,
    database_url: str,
    proxied_url: str,
    tmp_path: Path,
    **settings: str,
) -> tuple[ListenerProcess, Health]:
    """Migrate directly, then `delayq listen` through the proxy, with /healthz served."""
    home = str(tmp_path / "home")
    migrate_cli(clean_env(REDIS_URL=redis.url(0), DATABASE_URL=database_url, HOME=home))
    port = free_port()
    env = clean_env(
        REDIS_URL=redis.url(0),
        DATABASE_URL=proxied_url,
        HOME=home,
        HTTP=f"127.0.0.1:{port}",
        RETRY_BACKOFF_S="0.1",
        RETRY_BACKOFF_MAX_S="0.5",
        MAX_ATTEMPTS="1000",
        **{"BATCH_TIMEOUT_S": f"{BATCH_TIMEOUT_S:g}", **settings},
    )
    listener = start_listener(env)
    health = Health(port)
    wait_for(lambda: health.get() == (200, "ok\n"), 15, interval_s=0.1, what="/healthz 200")
    return listener, health


def _log_time(listener: ListenerProcess, text: str) -> datetime | None:
    """When the listener first logged a line containing `text` (naive UTC), if it has."""
    for line in listener.text().splitlines():
        if text in line and line.startswith("{"):
            ts = datetime.fromisoformat(json.loads(line)["ts"])
            return ts.astimezone(UTC).replace(tzinfo=None)
    return None


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _since(start: datetime, moment: datetime | None) -> str:
    return "never" if moment is None else f"+{(moment - start).total_seconds():.2f} s"


@dataclass(frozen=True)
class Bound:
    """What gives up on a frozen link first, and the settings that make it so."""

    name: str
    seconds: float
    settings: dict[str, str]


WATCH = Bound("batch watch", BATCH_TIMEOUT_S, {"DB_TIMEOUT_S": "60"})
READ_TIMEOUT = Bound("driver read timeout", 2.0, {"DB_TIMEOUT_S": "2", "BATCH_TIMEOUT_S": "60"})


@pytest.mark.parametrize(
    ("database", "bound"),
    [
        ("mariadb", WATCH),
        ("mariadb", READ_TIMEOUT),
        # PostgreSQL's driver has no read timeout (statement_timeout is the server's,
        # which cannot answer): only the watch frees the applier.
        ("postgres", WATCH),
    ],
    ids=["mariadb-watch", "mariadb-read-timeout", "postgres-watch"],
)
def test_timer_due_while_the_link_is_frozen_fires_once_on_a_new_connection_within_the_bound(
    database: str,
    bound: Bound,
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    proxied: ProxyFactory,
    listeners: ListenerFactory,  # noqa: F811
    tmp_path: Path,
) -> None:
    database_url: str = request.getfixturevalue(f"{database}_url")
    proxy, proxied_url = proxied(database_url)
    listener, health = _start(
        listeners, redis_server, database_url, proxied_url, tmp_path, **bound.settings
    )
    direct = engine_for(database_url)
    create_orders(direct, ["SN1"])

    # Every pooled connection stops answering; a new connection reaches the server (a
    # failover, or a NAT that dropped its state).
    frozen_at = _utcnow()
    proxy.freeze(new_connections="forward")
    Producer(redis_server.client(), Keys()).schedule("SN1", 0.5)

    def applied() -> bool:
        health.get()
        return bool(outcome_rows(direct))

    wait_for(applied, bound.seconds + 10, interval_s=0.1, what="the timer applied")
    [row] = outcome_rows(direct)
    assert row.outcome == "applied" and statuses(direct) == {"SN1": "cancelled"}
    detected_at = _log_time(listener, WATCH_BROKE)
    late_s = row.lateness_ms / 1000
    print(
        f"\n{database}, {bound.name} {bound.seconds:g} s: link frozen at 0, timer due "
        f"{_since(frozen_at, row.due_at)}, stuck batch detected {_since(frozen_at, detected_at)}"
        f", applied {_since(frozen_at, row.fired_at)} ({late_s:.2f} s after due); "
        f"slowest /healthz {health.slowest_s * 1000:.0f} ms"
    )
    assert late_s < bound.seconds + MARGIN_S
    assert (detected_at is not None) == (bound is WATCH), listener.text()[-2000:]
    wait_for(lambda: health.get() == (200, "ok\n"), 10, interval_s=0.1, what="/healthz 200")
    assert len(outcome_rows(direct)) == 1


def test_database_gone_healthz_says_503_at_once_and_timers_fire_once_when_it_is_back(
    server_database_url: str,
    redis_server: RedisServer,
    proxied: ProxyFactory,
    listeners: ListenerFactory,  # noqa: F811
    tmp_path: Path,
) -> None:
    proxy, proxied_url = proxied(server_database_url)
    listener, health = _start(
        listeners, redis_server, server_database_url, proxied_url, tmp_path, DB_TIMEOUT_S="2"
    )
    direct = engine_for(server_database_url)
    sns = [f"SN{i:03d}" for i in range(20)]
    create_orders(direct, sns)

    # The server is gone: established connections and new ones alike get no answer.
    frozen_at = _utcnow()
    proxy.freeze(new_connections="hang")
    Producer(redis_server.client(), Keys()).schedule_many((sn, 0.5) for sn in sns)
    seen_503: list[str] = []

    def unhealthy_and_given_back() -> bool:
        status, body = health.get()
        if status == 503 and not seen_503:
            seen_503.append(f"{_since(frozen_at, _utcnow())}: {body!r}")
        # The batch failed and went back to Redis, to be retried with a backoff.
        return status == 503 and "database" in body and "unreachable" in listener.text()

    wait_for(unhealthy_and_given_back, 30, interval_s=0.1, what="503 and the batch given back")
    assert not outcome_rows(direct)
    broken_at = _log_time(listener, WATCH_BROKE)
    given_back_at = _log_time(listener, "unreachable")

    thawed_at = _utcnow()
    proxy.thaw()

    def all_applied() -> bool:
        health.get()
        return len(outcome_rows(direct)) >= len(sns)

    wait_for(all_applied, 30, interval_s=0.1, what="every timer applied")
    wait_for(lambda: health.get() == (200, "ok\n"), 15, interval_s=0.1, what="/healthz 200")
    rows = outcome_rows(direct)
    assert sorted(r.order_sn for r in rows) == sns and {r.outcome for r in rows} == {"applied"}
    assert set(statuses(direct).values()) == {"cancelled"}
    print(
        f"\n{sa.make_url(server_database_url).get_backend_name()} gone: first 503 at "
        f"{seen_503[0]}; watch broke a batch "
        f"{_since(frozen_at, broken_at)}; batch given back {_since(frozen_at, given_back_at)}; "
        f"link back {_since(frozen_at, thawed_at)}, all "
        f"applied {_since(frozen_at, max(r.fired_at for r in rows))}; slowest /healthz "
        f"{health.slowest_s * 1000:.0f} ms"
    )


def test_database_host_that_accepts_but_never_answers_fails_check_within_the_timeout(
    server_database_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    with blackhole() as port:
        url = sa.make_url(server_database_url).set(host="127.0.0.1", port=port)
        env = clean_env(
            REDIS_URL=redis_server.url(0),
            DATABASE_URL=url.render_as_string(False),
            HOME=str(tmp_path),
            DB_TIMEOUT_S="2",
        )
        started = time.monotonic()
        done = run_cli("check", env=env, timeout_s=30)
        took_s = time.monotonic() - started
    print(f"\ncheck against a silent database host gave up after {took_s:.1f} s")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "database at" in done.stderr and "not reachable" in done.stderr, done.stderr
    assert took_s < 15


def test_server_releases_the_row_locks_of_a_client_that_vanished_mid_transaction(
    server_database_url: str, proxied: ProxyFactory, tmp_path: Path
) -> None:
    migrate_cli(clean_env(DATABASE_URL=server_database_url, HOME=str(tmp_path)))
    proxy, proxied_url = proxied(server_database_url)
    direct = engine_for(server_database_url)
    create_orders(direct, ["SN1"])
    vanishing = make_engine(Settings(database_url=proxied_url, db_timeout_s=2))
    raw = vanishing.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("SELECT status FROM orders WHERE order_sn = 'SN1' FOR UPDATE")
        cursor.fetchall()
        proxy.freeze(new_connections="hang")  # the client is gone, its transaction open
        started = time.monotonic()
        with direct.begin() as conn:
            conn.execute(sa.text("UPDATE orders SET status = 'paid' WHERE order_sn = 'SN1'"))
        took_s = time.monotonic() - started
    finally:
        proxy.stop()  # the frozen client's socket is closed, so its driver gives up
        raw.invalidate()
        vanishing.dispose()
    print(f"\nrow lock of a vanished client released after {took_s:.1f} s")
    assert took_s < 2 + MARGIN_S
    assert statuses(direct) == {"SN1": "paid"}


def test_sixteen_appliers_warm_up_without_waiting_for_the_pool(
    mariadb_url: str, tmp_path: Path
) -> None:
    migrate_cli(clean_env(DATABASE_URL=mariadb_url, HOME=str(tmp_path)))
    settings = Settings(database_url=mariadb_url, appliers=16)
    engine = make_engine(settings, pool_timeout=5)
    started = time.monotonic()
    Applier(engine, settings).warm_up(16)
    assert time.monotonic() - started < 5
    engine.dispose()


# -- the watch and the probes, on a clock of their own ----------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakePyMySQLConnection:
    """Just what break_connection looks at: PyMySQL keeps its socket in `_sock`."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock


def test_watch_breaks_the_connection_of_a_batch_past_its_bound_and_of_no_other(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    watch = Watch(clock)
    ours, server_side = socket.socketpair()
    with ours, server_side:
        conn = FakePyMySQLConnection(ours)
        registered = threading.Event()
        release = threading.Event()

        def applier() -> None:
            with watch.running("applier-0", 3.0, bound_setting="DELAYQ_BATCH_TIMEOUT_S", size=7):
                watch._checkout(conn, object(), None)  # what the pool's event does
                registered.set()
                release.wait(10)

        thread = threading.Thread(target=applier)
        thread.start()
        try:
            registered.wait(10)
            clock.now += 3.0
            assert watch.check() == 0
            assert watch.batches() == [("applier-0", 3.0, 7)]
            clock.now += 0.5
            assert watch.check() == 1
            assert ours.recv(1) == b"", "the socket was shut down: a blocked read returns"
            assert watch.check() == 0, "broken once"
        finally:
            release.set()
            thread.join(10)
    assert watch.batches() == []
    [record] = [r for r in caplog.records if WATCH_BROKE in r.getMessage()]
    assert "applier-0: batch of 7" in record.getMessage()
    assert "DELAYQ_BATCH_TIMEOUT_S=3" in record.getMessage()


def test_sqlite_statement_is_interrupted_by_break_connection() -> None:
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT max(i) FROM n"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            conn.execute(endless)
        except sqlite3.OperationalError as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    # An interrupt reaches only a statement already running: repeat it until one has.
    deadline = time.monotonic() + 10
    while thread.is_alive() and time.monotonic() < deadline:
        break_connection(conn)
        thread.join(0.05)
    assert not thread.is_alive() and "interrupted" in str(errors[0])
    conn.close()


def test_probe_reports_its_last_answer_with_its_age_and_a_round_trip_that_hangs() -> None:
    clock = FakeClock()
    answer: list[Any] = [None]
    probe = Probe("database", lambda: answer[0], clock=clock)
    assert probe.problem() is None, "no answer yet is not a problem yet"
    probe.probe()
    assert probe.problem() is None
    answer[0] = "database: (2013, 'Lost connection')"
    probe.probe()
    clock.now += 1.5
    assert probe.problem() == "database: (2013, 'Lost connection') (checked 1.5 s ago)"

    def hangs() -> None:
        clock.now += 4.0
        assert probe.problem() == "database did not answer for 4 s"

    probe.round_trip = hangs
    probe.probe()
    assert probe.problem() is None, "it answered in the end"
    clock.now += 10
    assert probe.problem() == "database not checked for 10 s"
