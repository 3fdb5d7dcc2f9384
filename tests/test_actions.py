"""User-defined actions end to end: the handler modules of tests/apps/ loaded by a real
`delayq listen` (with --app or DELAYQ_APP), timers in a real Redis, effects and outcomes
in a real database. The handlers write through `ctx.connection` and log each call to a
file, which no rollback undoes; the tests steer them through the listener's environment."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from delayq.keys import Keys
from delayq.producer import Producer
from delayq.timing import to_ms
from tests.harness import ListenerProcess, clean_env, engine_for, migrate_cli, run_cli
from tests.servers import RedisServer, free_port, log_tail, wait_for

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
APP = "tests.apps.shop_timers"
APP_FILE = REPO / "tests" / "apps" / "shop_timers.py"
#: Seconds to wait for a condition the listener should reach in well under one.
WAIT_S = 30

metadata = sa.MetaData()
shop_effects = sa.Table(
    "shop_effects",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("order_sn", sa.String(64), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("idempotency_key", sa.String(120), nullable=False),
    sa.Column("fired_at", sa.String(32), nullable=False),
    sa.Column("in_transaction", sa.Boolean, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
)
shop_batch_calls = sa.Table(
    "shop_batch_calls",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("size", sa.Integer, nullable=False),
)


@dataclass(frozen=True)
class Call:
    action: str
    order_sn: str
    attempt: int
    pid: int


@dataclass(frozen=True)
class Outcome:
    order_sn: str
    action: str
    due_at: datetime
    fired_at: datetime
    outcome: str
    detail: str | None


@dataclass
class Shop:
    """A migrated database with the shop's tables, a Redis, and the listeners a test starts
    (all stopped by the fixture)."""

    env: dict[str, str]
    engine: Engine
    server: RedisServer
    tmp: Path
    listeners: list[ListenerProcess] = field(default_factory=list)

    @property
    def call_log(self) -> Path:
        return self.tmp / "calls.log"

    def listener(
        self, *, app: tuple[str, ...] = ("--app", APP), extra: tuple[str, ...] = (), **env: str
    ) -> ListenerProcess:
        """A started `delayq listen` loading the shop's handlers; `env` adds variables."""
        log = self.tmp / f"listener-{len(self.listeners)}.log"
        proc = ListenerProcess({**self.env, **env}, log, args=(*app, *extra))
        # Registered before start() so that one failing to start is stopped too.
        self.listeners.append(proc)
        return proc.start()

    @cached_property
    def client(self) -> redis.Redis:
        return self.server.client()

    @cached_property
    def producer(self) -> Producer:
        return Producer(self.client, Keys())

    def schedule(self, order_sns: list[str], action: str, at: datetime | None = None) -> int:
        """Timers of `order_sns` for `action`, all due at `at` (default: now); the due ms."""
        due = at or datetime.now(UTC)
        self.producer.schedule_many((sn, due, action) for sn in order_sns)
        return to_ms(due)

    def calls(self, action: str | None = None) -> list[Call]:
        text = self.call_log.read_text() if self.call_log.exists() else ""
        # A line being written as we read is not complete yet: only whole lines count.
        lines = text.splitlines(keepends=True)
        calls = [
            Call(a, sn, int(n), int(pid))
            for a, sn, n, pid in (ln.split() for ln in lines if ln.endswith("\n"))
        ]
        return [c for c in calls if action is None or c.action == action]

    def effects(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.select(shop_effects))]

    def outcomes(self) -> list[Outcome]:
        query = "SELECT order_sn, action, due_at, fired_at, outcome, detail FROM delayq_outcomes"
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text(query)).all()
        # SQLite hands back strings through text(); the other databases datetimes.
        return [
            Outcome(sn, a, _as_datetime(due), _as_datetime(fired), o, d)
            for sn, a, due, fired, o, d in rows
        ]

    def wait(self, predicate: Callable[[], T], what: str, timeout_s: float = WAIT_S) -> T:
        """wait_for, with the tails of the listeners' logs when it times out."""
        try:
            return wait_for(predicate, timeout_s, what=what)
        except AssertionError as exc:
            logs = "\n".join(f"--- {p.log}\n{log_tail(p.log)}" for p in self.listeners)
            raise AssertionError(f"{exc}\n{logs}") from None

    def wait_outcomes(self, n: int) -> list[Outcome]:
        self.wait(lambda: len(self.outcomes()) >= n, f"{n} outcomes")
        return self.outcomes()

    def dead_letters(self) -> dict[str, dict[str, Any]]:
        raw = self.client.hgetall(Keys().dead)
        return {str(fid): json.loads(entry) for fid, entry in raw.items()}


def _as_datetime(value: Any) -> datetime:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


@contextmanager
def open_shop(redis_server: RedisServer, database_url: str, tmp_path: Path) -> Iterator[Shop]:
    env = clean_env(
        REDIS_URL=redis_server.url(0), DATABASE_URL=database_url, HOME=str(tmp_path / "home")
    )
    # The listener imports tests.apps.* from the repository, wherever pytest runs from.
    env["PYTHONPATH"] = str(REPO)
    env["SHOP_TEST_CALL_LOG"] = str(tmp_path / "calls.log")
    migrate_cli(env)
    engine = engine_for(database_url)
    metadata.create_all(engine)
    shop = Shop(env, engine, redis_server, tmp_path)
    try:
        yield shop
    finally:
        for proc in shop.listeners:
            proc.stop()
        engine.dispose()


@pytest.fixture
def shop(redis_server: RedisServer, database_url: str, tmp_path: Path) -> Iterator[Shop]:
    """On SQLite and on MariaDB."""
    with open_shop(redis_server, database_url, tmp_path) as s:
        yield s


@pytest.fixture
def sqlite_shop(redis_server: RedisServer, sqlite_url: str, tmp_path: Path) -> Iterator[Shop]:
    with open_shop(redis_server, sqlite_url, tmp_path) as s:
        yield s


@pytest.fixture
def mariadb_shop(redis_server: RedisServer, mariadb_url: str, tmp_path: Path) -> Iterator[Shop]:
    with open_shop(redis_server, mariadb_url, tmp_path) as s:
        yield s


def pid_of(listener: ListenerProcess) -> int:
    assert listener.proc is not None
    return listener.proc.pid


def effects_per_order(shop: Shop) -> Counter[str]:
    return Counter(e["order_sn"] for e in shop.effects())


# -- loading handlers, and what they return ------------------------------------------------


def test_handler_file_given_with_app_writes_in_the_transaction_that_records_its_outcome(
    shop: Shop,
) -> None:
    due_ms = {
        action: shop.schedule([sn], action)
        for sn, action in (
            ("SN-STOCK", "release_stock"),
            ("SN-POINTS", "award_points"),
            ("SN-SMS", "notify_buyer"),
        )
    }
    shop.listener(app=("--app", str(APP_FILE)))
    outcomes = {o.order_sn: o for o in shop.wait_outcomes(3)}
    assert {sn: (o.outcome, o.detail) for sn, o in outcomes.items()} == {
        "SN-STOCK": ("applied", None),
        "SN-POINTS": ("points_awarded", None),
        "SN-SMS": ("notified", "sms to the buyer of SN-SMS"),
    }
    effects = {e["order_sn"]: e for e in shop.effects()}
    assert sorted(effects) == sorted(outcomes)
    for sn, effect in effects.items():
        o = outcomes[sn]
        # Written inside the listener's transaction, by the very call whose outcome it is.
        assert effect["in_transaction"]
        assert effect["fired_at"] == o.fired_at.isoformat(), (effect, o)
        assert effect["idempotency_key"] == f"{sn}:{o.action}@{due_ms[o.action]}"
        assert effect["attempt"] == 1
    assert len(shop.calls()) == 3


def test_handler_module_named_by_DELAYQ_APP_is_loaded_without_app_flag(
    sqlite_shop: Shop,
) -> None:
    sqlite_shop.schedule(["SN-ENV"], "release_stock")
    sqlite_shop.listener(app=(), DELAYQ_APP=APP)
    (outcome,) = sqlite_shop.wait_outcomes(1)
    assert (outcome.order_sn, outcome.action, outcome.outcome) == (
        "SN-ENV",
        "release_stock",
        "applied",
    )
    assert effects_per_order(sqlite_shop) == {"SN-ENV": 1}


# -- batches ----------------------------------------------------------------------------------


def test_batch_handler_is_given_many_firings_due_at_one_instant_and_applies_each_once(
    shop: Shop,
) -> None:
    orders = [f"CPN-{i:03d}" for i in range(200)]
    shop.schedule(orders, "expire_coupons")
    shop.listener()
    outcomes = shop.wait_outcomes(200)
    assert Counter((o.order_sn, o.outcome) for o in outcomes) == {
        (sn, "applied"): 1 for sn in orders
    }
    assert effects_per_order(shop) == dict.fromkeys(orders, 1)
    with shop.engine.connect() as conn:
        sizes = [row.size for row in conn.execute(sa.select(shop_batch_calls.c.size))]
    assert sum(sizes) == 200, sizes
    assert max(sizes) > 1, f"the handler was only ever given one context at a time: {sizes}"


def test_one_failing_firing_does_not_hold_back_the_others_due_at_the_same_instant(
    shop: Shop,
) -> None:
    good = [f"GOOD-{i}" for i in range(5)]
    at = datetime.now(UTC)
    shop.schedule([*good, "BAD-1"], "charge_retry", at)
    shop.schedule(["STOCK-1", "STOCK-2"], "release_stock", at)
    shop.listener(
        SHOP_TEST_BAD_ORDERS="BAD-1",
        DELAYQ_ACTION_CHARGE_RETRY_MAX_ATTEMPTS="3",
        DELAYQ_ACTION_CHARGE_RETRY_BACKOFF_S="0.05",
    )
    shop.wait(shop.dead_letters, "BAD-1 dead-lettered")
    assert [d["timer"] for d in shop.dead_letters().values()] == ["BAD-1:charge_retry"]
    outcomes = shop.wait_outcomes(7)
    assert sorted((o.order_sn, o.outcome) for o in outcomes) == sorted(
        [(sn, "applied") for sn in good] + [("STOCK-1", "applied"), ("STOCK-2", "applied")]
    )
    calls = Counter(c.order_sn for c in shop.calls())
    # The failing handler is called once per attempt. A firing that shared a transaction
    # with it may have been called once more (that run rolled back with it): its effect
    # is committed once all the same.
    assert calls["BAD-1"] == 3
    assert all(1 <= calls[sn] <= 2 for sn in [*good, "STOCK-1", "STOCK-2"]), calls
    assert effects_per_order(shop) == dict.fromkeys([*good, "STOCK-1", "STOCK-2"], 1)


# -- failures, retries, skips -----------------------------------------------------------------


def test_handler_that_fails_twice_then_succeeds_is_applied_once_on_its_third_attempt(
    shop: Shop,
) -> None:
    shop.schedule(["SN-FLAKY"], "charge_retry")
    shop.listener(
        SHOP_TEST_FAIL_ATTEMPTS="2",
        DELAYQ_RETRY_BACKOFF_S="0.05",
        DELAYQ_ACTION_CHARGE_RETRY_BACKOFF_S="0.05",
    )
    (outcome,) = shop.wait_outcomes(1)
    assert (outcome.order_sn, outcome.outcome) == ("SN-FLAKY", "applied")
    assert [c.attempt for c in shop.calls("charge_retry")] == [1, 2, 3]
    # The effects written by the two failed calls were rolled back with them.
    (effect,) = shop.effects()
    assert (effect["order_sn"], effect["attempt"]) == ("SN-FLAKY", 3)
    assert not shop.dead_letters()


def test_handler_that_always_fails_is_dead_lettered_after_exactly_max_attempts_calls(
    sqlite_shop: Shop,
) -> None:
    due_ms = sqlite_shop.schedule(["SN-REFUND"], "refund_deposit")
    sqlite_shop.listener(DELAYQ_MAX_ATTEMPTS="3", DELAYQ_RETRY_BACKOFF_S="0.05")
    dead = sqlite_shop.wait(sqlite_shop.dead_letters, "a dead letter")
    assert list(dead) == [f"SN-REFUND:refund_deposit@{due_ms}"]
    (entry,) = dead.values()
    assert entry["attempts"] == 3
    assert "bank refused the refund" in entry["error"], entry
    assert [c.attempt for c in sqlite_shop.calls("refund_deposit")] == [1, 2, 3]
    assert sqlite_shop.outcomes() == []
    assert sqlite_shop.effects() == []


def test_skip_records_skipped_with_its_reason_and_rolls_back_what_the_handler_wrote(
    shop: Shop,
) -> None:
    shop.schedule(["SN-SHIPPED"], "ship_reminder")
    shop.schedule(["SN-STOCK"], "release_stock")
    shop.listener()
    outcomes = {o.order_sn: o for o in shop.wait_outcomes(2)}
    skipped = outcomes["SN-SHIPPED"]
    assert (skipped.action, skipped.outcome, skipped.detail) == (
        "ship_reminder",
        "skipped",
        "order already shipped",
    )
    assert outcomes["SN-STOCK"].outcome == "applied"
    assert effects_per_order(shop) == {"SN-STOCK": 1}
    assert [c.order_sn for c in shop.calls("ship_reminder")] == ["SN-SHIPPED"]


# -- a crash in the middle of a batch ----------------------------------------------------------


def test_listener_killed_inside_a_batch_handler_leaves_every_effect_applied_exactly_once(
    mariadb_shop: Shop,
) -> None:
    shop = mariadb_shop
    gate = shop.tmp / "gate"
    # Short leases: the second listener takes over what the first held within seconds.
    first = shop.listener(DELAYQ_LEASE_S="2", SHOP_TEST_GATE=str(gate))
    done = [f"DONE-{i}" for i in range(10)]
    shop.schedule(done, "close_auction")
    shop.wait_outcomes(len(done))

    held = [f"HOLD-{i}" for i in range(30)]
    shop.schedule(held, "close_auction")
    shop.wait(
        lambda: any(c.order_sn.startswith("HOLD-") for c in shop.calls()),
        "the batch handler holding HOLD-* firings",
    )
    first.kill()  # SIGKILL: its transaction, effects written, is never committed
    assert len(shop.outcomes()) == len(done)
    gate.touch()

    second = shop.listener(DELAYQ_LEASE_S="2", SHOP_TEST_GATE=str(gate))
    outcomes = shop.wait_outcomes(len(done) + len(held))
    assert Counter((o.order_sn, o.action, o.outcome) for o in outcomes) == {
        (sn, "close_auction", "applied"): 1 for sn in done + held
    }
    assert effects_per_order(shop) == dict.fromkeys(done + held, 1)
    # What the first listener wrote for the held firings died with its transaction: every
    # effect of theirs that stands is the second listener's.
    by_pid = {e["order_sn"]: e["pid"] for e in shop.effects()}
    assert {sn: by_pid[sn] for sn in held} == dict.fromkeys(held, pid_of(second))
    assert {sn: by_pid[sn] for sn in done} == dict.fromkeys(done, pid_of(first))
    assert any(c.pid == pid_of(first) for c in shop.calls() if c.order_sn in held)


# -- delayq actions, check, and bad input ------------------------------------------------------


def test_actions_lists_builtins_module_handlers_and_webhooks_with_secrets_masked(
    tmp_path: Path,
) -> None:
    env = clean_env(
        REDIS_URL="redis://127.0.0.1:1/0",  # never connected to: listing needs no server
        DATABASE_URL=f"sqlite:///{tmp_path}/unused.db",
        HOME=str(tmp_path / "home"),
        WEBHOOK_NOTIFY_CRM="https://crm.example/hooks/timer?token=s3cret&team=ops",
    )
    # A dotted module is found from the current directory, as a worker's would be.
    done = run_cli("actions", "--app", APP, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "s3cret" not in done.stdout + done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines()}
    module_actions = {
        "release_stock",
        "award_points",
        "notify_buyer",
        "expire_coupons",
        "charge_retry",
        "refund_deposit",
        "ship_reminder",
        "close_auction",
    }
    assert set(lines) == {"cancel", "complete", "notify_crm", *module_actions}
    assert len(done.stdout.splitlines()) == len(lines), "one line per action"
    for name in ("cancel", "complete"):
        assert lines[name].split()[1] == "built-in", lines[name]
    for name in module_actions:
        assert lines[name].split()[1:3] == ["module", APP], lines[name]
    assert "batch" in lines["expire_coupons"]
    webhook = lines["notify_crm"].split()
    assert webhook[1:3] == ["webhook", "https://crm.example/hooks/timer?token=***&team=ops"]


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("delayq: error: "), done.stderr
    line: str = lines[0]
    return line


def test_app_module_that_does_not_exist_stops_listen_and_actions_with_one_line(
    sqlite_shop: Shop,
) -> None:
    for command in ("listen", "actions"):
        done = run_cli(command, "--app", "no_such_module", env=sqlite_shop.env, timeout_s=30)
        line = _one_error_line(done)
        assert "no_such_module" in line and "cannot import" in line, line


@pytest.mark.parametrize(
    ("module", "says"),
    [
        ("tests.apps.registered_twice", "action 'gift_wrap' is registered twice"),
        ("tests.apps.bad_name", "delayq.action('Bad Name')"),
    ],
    ids=["registered-twice", "bad-name"],
)
def test_handler_module_with_a_mistake_is_refused_with_one_line(
    module: str, says: str, tmp_path: Path
) -> None:
    env = clean_env(
        REDIS_URL="redis://127.0.0.1:1/0",
        DATABASE_URL=f"sqlite:///{tmp_path}/unused.db",
        HOME=str(tmp_path / "home"),
    )
    line = _one_error_line(run_cli("actions", "--app", module, env=env, cwd=REPO))
    assert says in line, line


def test_check_fails_on_a_table_a_handler_names_that_does_not_exist_and_passes_once_it_does(
    sqlite_shop: Shop,
) -> None:
    env = sqlite_shop.env
    line = _one_error_line(run_cli("check", "--app", "tests.apps.ledger", env=env))
    assert "post_ledger" in line and "'shop_ledger'" in line and "does not exist" in line, line
    with sqlite_shop.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE shop_ledger (order_sn VARCHAR(64))"))
    done = run_cli("check", "--app", "tests.apps.ledger", env=env)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^ok: actions: .*post_ledger \(module\)", done.stdout, re.M), done.stdout


# -- actions nobody here knows -------------------------------------------------------------


def test_timer_of_an_action_no_listener_knows_is_recorded_logged_and_counted(
    sqlite_shop: Shop,
) -> None:
    shop = sqlite_shop
    port = free_port()
    shop.schedule(["SN-REFUND"], "refund")
    shop.schedule(["SN-STOCK"], "release_stock")
    listener = shop.listener(extra=("--http", f"127.0.0.1:{port}"))
    outcomes = {o.order_sn: (o.action, o.outcome) for o in shop.wait_outcomes(2)}
    assert outcomes == {
        "SN-REFUND": ("refund", "unknown_action"),
        "SN-STOCK": ("release_stock", "applied"),
    }
    # The listener logs JSON lines when its stderr is not a terminal.
    entries = [json.loads(ln) for ln in listener.text().splitlines() if ln.startswith("{")]
    warnings = [e["msg"] for e in entries if e.get("level") == "warning"]
    assert any("refund" in msg and "unknown_action" in msg for msg in warnings), warnings
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    counted = re.findall(
        r'^delayq_timers_fired_total\{action="([^"]*)",outcome="unknown_action"\} (\S+)$',
        metrics,
        re.M,
    )
    assert [float(n) for _, n in counted] == [1.0], counted
    assert re.search(
        r'^delayq_timers_fired_total\{action="release_stock",outcome="applied"\} 1\.0$',
        metrics,
        re.M,
    ), metrics
