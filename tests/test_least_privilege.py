"""Least privilege and TLS, against real servers: Redis users with only the rules of
deploy/redis/users.acl, database users with only the grants of deploy/database/grants.sql,
and a TLS-only redis-server with a certificate made here by the openssl CLI.

Tests marked "wired" run `delayq check` and expect the lines of delayq.permissions: they
pass once Delayq.check calls check_redis and check_database."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pymysql
import pytest
import redis
import sqlalchemy as sa

from delayq import migrate
from delayq.db import make_engine
from delayq.errors import NotReady
from delayq.keys import Keys
from delayq.permissions import PROBE_KEY, check_database, check_redis
from delayq.producer import Producer
from delayq.redis_conn import Scripts
from delayq.settings import Settings
from delayq.store import TimerStore
from tests.harness import (
    ListenerProcess,
    clean_env,
    create_orders,
    engine_for,
    index_members,
    migrate_cli,
    outcome_rows,
    run_cli,
    statuses,
)
from tests.servers import RedisFactory, RedisServer, TlsFiles, no_retry, wait_for

REPO = Path(__file__).resolve().parent.parent
USERS_ACL = REPO / "deploy" / "redis" / "users.acl"
PASSWORDS = {"delayq-producer": "producer-pw", "delayq-listener": "listener-pw"}
#: Short leases and backoffs, as in test_reliability.
FAST = {"LEASE_S": "2", "RETRY_BACKOFF_S": "0.1", "RETRY_BACKOFF_MAX_S": "0.5"}
#: What the least-privileged listener may be refused without harm (and is, on Redis 7):
#: CONFIG GET of notify-keyspace-events, and redis-py's CLIENT SETINFO on Redis >= 7.2.
TOLERATED_REFUSALS = {"config|get", "client|setinfo", "info"}
NOT_READY = 4
UNAVAILABLE = 3


# -- Redis users ------------------------------------------------------------------------------


def acl_rules(user: str) -> list[str]:
    """The rules of `user` in deploy/redis/users.acl, with the test's password."""
    for line in USERS_ACL.read_text().splitlines():
        words = line.split()
        if words[:2] == ["user", user]:
            return [f">{PASSWORDS[user]}" if w.startswith(">") else w for w in words[2:]]
    raise AssertionError(f"no user {user} in {USERS_ACL}")


def write_acl_file(path: Path) -> Path:
    """deploy/redis/users.acl as shipped, but with test passwords and a password-less
    admin `default` user (the test harness pings and stops servers as `default`)."""
    lines = ["user default on nopass ~* &* +@all"]
    lines += [f"user {user} {' '.join(acl_rules(user))}" for user in PASSWORDS]
    path.write_text("\n".join(lines) + "\n")
    return path


def user_url(server: RedisServer, user: str, password: str | None = None) -> str:
    scheme, rest = server.url(0).split("://", 1)
    return f"{scheme}://{user}:{password or PASSWORDS[user]}@{rest}"


def set_user(admin: redis.Redis, name: str, rules: Sequence[str]) -> str:
    """(Re)define a user with `rules` and password 'pw'; returns the name."""
    admin.execute_command("ACL", "SETUSER", name, "reset", *rules)
    return name


@pytest.fixture
def acl_redis(redis_factory: RedisFactory, tmp_path: Path) -> RedisServer:
    """A redis-server whose users are those of deploy/redis/users.acl."""
    return redis_factory(extra={"aclfile": str(write_acl_file(tmp_path / "users.acl"))})


@pytest.fixture
def connect() -> Iterator[Callable[[str], redis.Redis]]:
    """Clients for URLs, closed after the test."""
    made: list[redis.Redis] = []

    def make(url: str) -> redis.Redis:
        client: redis.Redis = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=5, retry=no_retry()
        )
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def acl_refusals(admin: redis.Redis) -> set[str]:
    """What ACL LOG says was refused (command names, keys or channels)."""
    return {str(entry["object"]) for entry in admin.acl_log()}


def snapshot(admin: redis.Redis) -> dict[str, Any]:
    """Every key with its type, content and absolute expiry."""
    readers: dict[str, Callable[[str], Any]] = {
        "string": admin.get,
        "zset": lambda k: admin.zrange(k, 0, -1, withscores=True),
        "hash": admin.hgetall,
    }
    return {
        key: (admin.type(key), readers[admin.type(key)](key), admin.pexpiretime(key))
        for key in sorted(admin.scan_iter())
    }


def seed_timers(admin: redis.Redis) -> None:
    """A pending timer, a legacy TTL key, a claim, a dead letter and a listener heartbeat:
    the things a permission check must leave exactly as they are."""
    keys = Keys()
    Producer(admin, keys).schedule("PENDING1", 3600)
    admin.set("LEGACY1:cancel", 1, ex=3600)
    admin.zadd(keys.claims, {"CLAIMED1:cancel@1": 9_999_999_999_999})
    admin.hset(keys.claims_per_key, "CLAIMED1:cancel", 1)
    admin.hset(keys.attempts, "CLAIMED1:cancel@1", 2)
    admin.hset(
        keys.dead,
        "DEAD1:cancel@1",
        json.dumps({"timer": "DEAD1:cancel", "due_ms": 1, "attempts": 3, "error": "x"}),
    )
    admin.zadd(keys.listeners, {"host:1": 1})


def test_producer_user_schedules_and_cancels_but_may_not_claim_listen_or_touch_other_keys(
    acl_redis: RedisServer, connect: Callable[[str], redis.Redis]
) -> None:
    admin = acl_redis.client()
    client = connect(user_url(acl_redis, "delayq-producer"))
    producer = Producer(client, Keys())

    producer.schedule("SN1", 600)
    assert producer.schedule_many([("SN2", 600), ("SN3", 600, "complete")]) == 2
    assert producer.cancel("SN1") is True
    assert producer.cancel("SN9") is False
    lines = check_redis(client, Keys(), Scripts.register(client), role="producer")

    assert index_members(admin) == ["SN2:cancel", "SN3:complete"]
    assert admin.pttl("SN2:cancel") > 0
    # Nothing the producer did was refused and then tolerated: its rules are complete.
    assert acl_refusals(admin) <= {"client|setinfo"}
    assert lines == [
        "Redis user 'delayq-producer' has every permission a producer needs "
        "(18 commands, 2 scripts probed)"
    ]
    # What only a listener may do is refused.
    scripts = Scripts.register(client)
    with pytest.raises(redis.ResponseError, match="permission"):
        k = Keys()
        TimerStore(client, k, scripts).claim_due(10, 1000)
    pubsub = client.pubsub()  # type: ignore[no-untyped-call]
    try:
        pubsub.psubscribe(Keys().expired_channel)
        with pytest.raises(redis.ResponseError, match="permission"):
            pubsub.get_message(timeout=5)
    finally:
        pubsub.close()
    with pytest.raises(NotReady, match="Redis user 'delayq-producer' lacks permission"):
        check_redis(client, Keys(), scripts, role="listener")
    # Keys that are neither delayq's nor timers are out of reach.
    with pytest.raises(redis.ResponseError, match="permission"):
        client.set("session:42", "x")
    assert index_members(admin) == ["SN2:cancel", "SN3:complete"]


def test_permission_checks_of_both_users_and_the_admin_change_no_key_and_fire_nothing(
    redis_factory: RedisFactory, tmp_path: Path, connect: Callable[[str], redis.Redis]
) -> None:
    # Every keyspace event on: any write the checks made would show.
    server = redis_factory(
        notify="KEA", extra={"aclfile": str(write_acl_file(tmp_path / "users.acl"))}
    )
    admin = server.client()
    seed_timers(admin)
    before = snapshot(admin)
    events = server.client().pubsub()  # type: ignore[no-untyped-call]
    events.psubscribe("__keyevent@0__:*")
    wait_for(lambda: events.get_message(timeout=0.1), 5, what="psubscribe confirmed")

    for user, role in [
        ("delayq-producer", "producer"),
        ("delayq-listener", "listener"),
        ("default", "producer"),
        ("default", "listener"),
    ]:
        url = server.url(0) if user == "default" else user_url(server, user)
        client = connect(url)
        lines = check_redis(client, Keys(), Scripts.register(client), role=role)
        assert lines[0].startswith(f"Redis user {user!r} has every permission a {role} needs")

    admin.set("sentinel", 1)  # the last event: once it is in, all of the checks' are
    seen: list[tuple[str, str]] = []

    def sentinel_seen() -> bool:
        while msg := events.get_message(timeout=0.1):
            if msg["type"] == "pmessage":
                seen.append((msg["channel"].split(":", 1)[1], msg["data"]))
        return ("set", "sentinel") in seen

    wait_for(sentinel_seen, 10, what="the sentinel's keyspace event")
    events.close()
    admin.delete("sentinel")
    assert snapshot(admin) == before
    # The only writes: a field of the probe key in two hashes, deleted again.
    k = Keys()
    assert {key for _, key in seen} <= {k.dead, k.attempts, k.claims_per_key, "sentinel"}, seen
    assert not [e for e in seen if e[0] == "expired"]
    assert acl_refusals(admin) <= {"client|setinfo"}


@pytest.mark.parametrize(
    ("role", "drop", "add", "expected"),
    [
        ("producer", "+zadd", None, "'zadd' on key '{delayq}:due:15377'"),
        ("producer", "~*:cancel", None, f"'set' on key '{PROBE_KEY}'"),
        ("producer", "+script|exists", None, "'script|exists'"),
        ("producer", "&{delayq}:wake", None, "'publish' on channel '{delayq}:wake'"),
        ("listener", "+hincrby", None, "'hincrby' on key '{delayq}:attempts'"),
        ("listener", "+hdel", None, "'hdel' on key '{delayq}:inflight:due'"),
        ("listener", "+evalsha", None, "'evalsha' of the claim_due script"),
        ("listener", "+script|load", None, "'script|load'"),
        # A PSUBSCRIBE pattern must be allowed literally: a glob rule does not cover it.
        (
            "listener",
            "&__keyevent@0__:expired",
            "&__keyevent@*__:expired",
            "'psubscribe' on channel '__keyevent@0__:expired'",
        ),
    ],
    ids=[
        "producer-no-zadd",
        "producer-no-timer-keys",
        "producer-no-script-exists",
        "producer-no-wake-channel",
        "listener-no-hincrby",
        "listener-no-hdel",
        "listener-no-evalsha",
        "listener-no-script-load",
        "listener-keyevent-as-glob",
    ],
)
def test_a_user_missing_one_permission_fails_the_check_naming_it_and_changes_nothing(
    role: str,
    drop: str,
    add: str | None,
    expected: str,
    acl_redis: RedisServer,
    connect: Callable[[str], redis.Redis],
) -> None:
    admin = acl_redis.client()
    rules = [r for r in acl_rules(f"delayq-{role}") if r != drop] + ([add] if add else [])
    name = set_user(admin, f"limited-{role}", rules)
    seed_timers(admin)
    before = snapshot(admin)
    client = connect(user_url(acl_redis, name, PASSWORDS[f"delayq-{role}"]))

    with pytest.raises(NotReady) as failed:
        check_redis(client, Keys(), Scripts.register(client), role=role)

    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith(f"Redis user '{name}' lacks permission for {expected}")
    assert message.endswith("see deploy/redis/users.acl")
    assert snapshot(admin) == before


# -- a real listener with only the listener's rules ----------------------------------------


@pytest.fixture
def listeners(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], ListenerProcess]]:
    """Starts `delayq listen` subprocesses; all are stopped at the end, even on failure."""
    started: list[ListenerProcess] = []

    def make(env: dict[str, str]) -> ListenerProcess:
        proc = ListenerProcess(env, tmp_path / f"listener-{len(started)}.log")
        started.append(proc)
        return proc.start()

    yield make
    for proc in started:
        proc.stop()


def _cancelled(engine: sa.Engine, sns: Sequence[str]) -> Callable[[], bool]:
    return lambda: all(statuses(engine).get(sn) == "cancelled" for sn in sns)


def test_listener_user_runs_delayq_listen_end_to_end_with_only_its_acl_rules(
    acl_redis: RedisServer,
    sqlite_url: str,
    tmp_path: Path,
    listeners: Callable[[dict[str, str]], ListenerProcess],
) -> None:
    admin = acl_redis.client()
    home = str(tmp_path / "home")
    migrate_cli(clean_env(DATABASE_URL=sqlite_url, HOME=home))
    engine = engine_for(sqlite_url)
    create_orders(engine, ["SN1", "SN2", "SN3", "SN4"])
    as_listener = clean_env(
        REDIS_URL=user_url(acl_redis, "delayq-listener"),
        DATABASE_URL=sqlite_url,
        HOME=home,
        **FAST,
    )
    as_producer = clean_env(REDIS_URL=user_url(acl_redis, "delayq-producer"), HOME=home)
    listener = listeners(as_listener)

    # An indexed timer, one cancelled (paid), a plain SETEX (keyspace event only), and a
    # dead letter re-queued by `delayq retry-dead`.
    for args in (["schedule", "SN1", "--in", "1s"], ["schedule", "SN2", "--in", "1s"]):
        assert run_cli(*args, env=as_producer).returncode == 0
    assert run_cli("cancel", "SN2", env=as_producer).stdout.startswith("cancelled")
    admin.set("SN3:cancel", 1, px=300)
    now_ms = int(time.time() * 1000)
    entry = {"due_ms": now_ms, "attempts": 3, "error": "test", "dead_ms": now_ms}
    admin.hset(Keys().dead, "SN4:cancel", json.dumps(entry))
    requeued = run_cli("retry-dead", env=as_listener)
    assert requeued.stdout.strip() == "re-queued 1 dead-lettered timers", requeued.stderr

    wait_for(_cancelled(engine, ["SN1", "SN3", "SN4"]), 30, interval_s=0.05, what="3 cancelled")
    for args in (["status"], ["inspect", "SN1"]):
        done = run_cli(*args, env=as_listener)
        assert done.returncode == 0, done.stderr
    assert "state: none" in run_cli("inspect", "SN1", env=as_listener).stdout
    assert listener.stop() == 0, listener.text()

    assert statuses(engine)["SN2"] == "unpaid"
    assert sorted(r.order_sn for r in outcome_rows(engine)) == ["SN1", "SN3", "SN4"]
    assert admin.zcard(Keys().listeners) == 0  # it left the listeners set on its way out
    # Nothing it needed was refused: only what it tolerates.
    assert acl_refusals(admin) <= TOLERATED_REFUSALS, admin.acl_log()
    assert "CONFIG not allowed" in listener.text()
    engine.dispose()


def test_delayq_check_as_the_listener_user_reports_its_permissions_wired(
    acl_redis: RedisServer, sqlite_url: str, tmp_path: Path
) -> None:
    home = str(tmp_path / "home")
    migrate_cli(clean_env(DATABASE_URL=sqlite_url, HOME=home))
    env = clean_env(
        REDIS_URL=user_url(acl_redis, "delayq-listener"), DATABASE_URL=sqlite_url, HOME=home
    )

    done = run_cli("check", env=env)

    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert any(
        line.startswith("ok: Redis user 'delayq-listener' has every permission a listener needs")
        for line in out
    ), done.stdout
    assert any("may DELETE, INSERT, SELECT, UPDATE as the listener does" in line for line in out)


def test_delayq_check_names_a_missing_redis_permission_on_one_line_wired(
    acl_redis: RedisServer, sqlite_url: str, tmp_path: Path
) -> None:
    home = str(tmp_path / "home")
    migrate_cli(clean_env(DATABASE_URL=sqlite_url, HOME=home))
    rules = [r for r in acl_rules("delayq-listener") if r != "+hincrby"]
    set_user(acl_redis.client(), "no-hincrby", rules)
    url = user_url(acl_redis, "no-hincrby", PASSWORDS["delayq-listener"])

    done = run_cli("check", env=clean_env(REDIS_URL=url, DATABASE_URL=sqlite_url, HOME=home))

    assert done.returncode == NOT_READY, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "lacks permission for 'hincrby' on key '{delayq}:attempts'" in done.stderr
    assert PASSWORDS["delayq-listener"] not in done.stderr


# -- TLS --------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"openssl {' '.join(args)}:\n{done.stderr}"


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl(
        *("req", "-x509", "-new", "-nodes", "-days", "2", "-subj", f"/CN={name}"),
        *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-keyout", str(key), "-out", str(cert)),
        cwd=directory,
    )
    return key, cert


@pytest.fixture
def tls_files(tmp_path: Path, in_ci: bool) -> tuple[TlsFiles, Path]:
    """A CA, a server certificate for 127.0.0.1 it signed, and a second, unrelated CA."""
    if shutil.which("openssl") is None:
        # Debian's base system has openssl: in CI its absence is a bug, not a skip.
        if in_ci:
            pytest.fail("the openssl CLI is not installed")
        pytest.skip("the openssl CLI is not installed")
    d = tmp_path / "tls"
    d.mkdir()
    ca_key, ca = _make_ca(d, "delayq-test-ca")
    _, other_ca = _make_ca(d, "other-ca")
    key, csr, cert = d / "server.key", d / "server.csr", d / "server.pem"
    _openssl(
        *("req", "-new", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key)),
        *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", str(csr)),
        cwd=d,
    )
    ext = d / "server.ext"
    ext.write_text(
        "subjectAltName = IP:127.0.0.1\nbasicConstraints = CA:FALSE\n"
        "keyUsage = digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\n"
    )
    _openssl(
        *("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key)),
        *("-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", str(ext)),
        cwd=d,
    )
    return TlsFiles(cert=cert, key=key, ca=ca), other_ca


@pytest.fixture
def tls_redis(tls_files: tuple[TlsFiles, Path], tmp_path: Path) -> Iterator[RedisServer]:
    """A TLS-only redis-server (plain TCP off) with the users of deploy/redis/users.acl."""
    acl = write_acl_file(tmp_path / "tls-users.acl")
    server = RedisServer(tmp_path / "redis-tls", tls=tls_files[0], extra={"aclfile": str(acl)})
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_rediss_url_with_a_ca_file_fires_a_timer_end_to_end_over_tls(
    tls_redis: RedisServer,
    sqlite_url: str,
    tmp_path: Path,
    listeners: Callable[[dict[str, str]], ListenerProcess],
) -> None:
    home = str(tmp_path / "home")
    migrate_cli(clean_env(DATABASE_URL=sqlite_url, HOME=home))
    engine = engine_for(sqlite_url)
    create_orders(engine, ["SN1"])
    listener_url = user_url(tls_redis, "delayq-listener")
    assert (
        listener_url.startswith("rediss://delayq-listener:") and "?ssl_ca_certs=/" in listener_url
    )
    as_listener = clean_env(REDIS_URL=listener_url, DATABASE_URL=sqlite_url, HOME=home, **FAST)
    as_producer = clean_env(REDIS_URL=user_url(tls_redis, "delayq-producer"), HOME=home)

    checked = run_cli("check", env=as_listener)
    assert checked.returncode == 0, checked.stderr
    listeners(as_listener)
    scheduled = run_cli("schedule", "SN1", "--in", "500ms", env=as_producer)
    assert scheduled.returncode == 0, scheduled.stderr

    wait_for(_cancelled(engine, ["SN1"]), 30, interval_s=0.05, what="SN1 cancelled over TLS")
    assert [r.outcome for r in outcome_rows(engine)] == ["applied"]
    engine.dispose()


@pytest.mark.parametrize(
    "args", [["check"], ["schedule", "SN1", "--in", "20m"]], ids=["check", "schedule"]
)
def test_a_wrong_ca_file_fails_with_one_clear_line_and_no_traceback(
    args: list[str],
    tls_redis: RedisServer,
    tls_files: tuple[TlsFiles, Path],
    sqlite_url: str,
    tmp_path: Path,
) -> None:
    right_ca = str(tls_files[0].ca)
    url = user_url(tls_redis, "delayq-listener").replace(right_ca, str(tls_files[1]))
    env = clean_env(REDIS_URL=url, DATABASE_URL=sqlite_url, HOME=str(tmp_path / "home"))

    done = run_cli(*args, env=env)

    assert done.returncode == UNAVAILABLE, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    masked = f"rediss://delayq-listener:***@127.0.0.1:{tls_redis.port}/0"
    assert lines[0].startswith(f"delayq: error: Redis at {masked}"), lines[0]
    assert "is not reachable" in lines[0] and "certificate verify failed" in lines[0]
    assert PASSWORDS["delayq-listener"] not in done.stderr


# -- database users ---------------------------------------------------------------------------

Grants = Sequence[tuple[str, str]]
#: What deploy/database/grants.sql grants the listener's MariaDB user.
MARIADB_GRANTS: Grants = [
    ("SELECT, UPDATE", "orders"),
    ("SELECT, INSERT", "delayq_outcomes"),
    ("SELECT", "delayq_alembic_version"),
    ("SELECT, DELETE", "delayq_outbox"),
]


@pytest.fixture
def mariadb_user(mariadb_url: str) -> Iterator[Callable[[Grants], str]]:
    """Makes MariaDB users with only `grants` (privileges, table) on the test database;
    they are dropped after the test, even when it fails. The database is migrated first."""
    settings = Settings(database_url=mariadb_url)
    engine = make_engine(settings)
    try:
        migrate.upgrade(engine, settings)
    finally:
        engine.dispose()
    database = sa.make_url(mariadb_url).database
    admin = pymysql.connect(host="127.0.0.1", port=3306, user="root", autocommit=True)
    made: list[str] = []

    def make(grants: Grants) -> str:
        user = f"dqlp_{uuid.uuid4().hex[:12]}"
        with admin.cursor() as cur:
            cur.execute("CREATE USER %s@'%%' IDENTIFIED BY 'pw'", (user,))
            made.append(user)
            for privileges, table in grants:
                cur.execute(f"GRANT {privileges} ON `{database}`.`{table}` TO %s@'%%'", (user,))
        return f"mysql+pymysql://{user}:pw@127.0.0.1:3306/{database}"

    try:
        yield make
    finally:
        with admin.cursor() as cur:
            for user in made:
                cur.execute("DROP USER IF EXISTS %s@'%%'", (user,))
        admin.close()


def _check_database(url: str) -> list[str]:
    settings = Settings(database_url=url)
    engine = make_engine(settings)
    try:
        return check_database(engine, settings)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "grants",
    [
        MARIADB_GRANTS,
        [("SELECT, UPDATE (status, cancelled_at, updated_at)", "orders"), *MARIADB_GRANTS[1:]],
    ],
    ids=["table-grants", "column-grants"],
)
def test_a_mariadb_user_with_only_the_documented_grants_passes_and_the_probe_keeps_nothing(
    grants: Grants, mariadb_url: str, mariadb_user: Callable[[Grants], str]
) -> None:
    engine = engine_for(mariadb_url)
    create_orders(engine, ["SN1"])
    url = mariadb_user(grants)

    lines = _check_database(url)

    user = sa.make_url(url).username
    assert lines == [
        "database schema at 0002",
        f"database user {user!r} may DELETE, INSERT, SELECT, UPDATE as the listener does "
        "(8 statements probed, rolled back)",
    ]
    assert statuses(engine) == {"SN1": "unpaid"}
    assert outcome_rows(engine) == []
    engine.dispose()


@pytest.mark.parametrize(
    ("grants", "expected"),
    [
        (
            [("SELECT", "orders"), *MARIADB_GRANTS[1:]],
            "lacks UPDATE on table 'orders' (1142: UPDATE command denied",
        ),
        (
            [MARIADB_GRANTS[0], ("SELECT", "delayq_outcomes"), MARIADB_GRANTS[2]],
            "lacks INSERT on table 'delayq_outcomes' (1142: INSERT command denied",
        ),
        (MARIADB_GRANTS[:2], "lacks SELECT on table 'delayq_alembic_version' (1142: "),
        (
            [("SELECT, UPDATE (status, updated_at)", "orders"), *MARIADB_GRANTS[1:]],
            "lacks UPDATE on column 'cancelled_at' of table 'orders' (1143: ",
        ),
    ],
    ids=["no-update-orders", "no-insert-outcomes", "no-select-version", "no-update-column"],
)
def test_a_mariadb_user_missing_a_privilege_fails_the_check_naming_it(
    grants: Grants, expected: str, mariadb_url: str, mariadb_user: Callable[[Grants], str]
) -> None:
    url = mariadb_user(grants)

    with pytest.raises(NotReady) as failed:
        _check_database(url)

    message = str(failed.value)
    user = sa.make_url(url).username
    assert message.startswith(f"database user {user!r} {expected}"), message
    assert message.endswith("see deploy/database/grants.sql")
    assert "\n" not in message and ":pw@" not in message


def test_delayq_check_names_a_missing_database_privilege_on_one_line_wired(
    acl_redis: RedisServer, mariadb_user: Callable[[Grants], str], tmp_path: Path
) -> None:
    url = mariadb_user([("SELECT", "orders"), *MARIADB_GRANTS[1:]])
    env = clean_env(
        REDIS_URL=user_url(acl_redis, "delayq-listener"),
        DATABASE_URL=url,
        HOME=str(tmp_path / "home"),
    )

    done = run_cli("check", env=env)

    assert done.returncode == NOT_READY, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "lacks UPDATE on table 'orders'" in done.stderr


def test_least_privileged_mariadb_and_redis_users_cancel_an_order_end_to_end(
    acl_redis: RedisServer,
    mariadb_url: str,
    mariadb_user: Callable[[Grants], str],
    tmp_path: Path,
    listeners: Callable[[dict[str, str]], ListenerProcess],
) -> None:
    engine = engine_for(mariadb_url)
    create_orders(engine, ["SN1", "SN2"])
    env = clean_env(
        REDIS_URL=user_url(acl_redis, "delayq-listener"),
        DATABASE_URL=mariadb_user(MARIADB_GRANTS),
        HOME=str(tmp_path / "home"),
        **FAST,
    )
    listener = listeners(env)
    producer = Producer(
        redis.Redis.from_url(user_url(acl_redis, "delayq-producer"), decode_responses=True),
        Keys(),
    )
    try:
        producer.schedule_many([("SN1", 0.3), ("SN2", 0.3)])
    finally:
        producer.client.close()

    wait_for(_cancelled(engine, ["SN1", "SN2"]), 30, interval_s=0.05, what="2 cancelled")
    assert listener.stop() == 0, listener.text()
    assert sorted((r.order_sn, r.outcome) for r in outcome_rows(engine)) == [
        ("SN1", "applied"),
        ("SN2", "applied"),
    ]
    assert acl_refusals(acl_redis.client()) <= TOLERATED_REFUSALS
    engine.dispose()


def test_sqlite_passes_the_database_check_and_an_unmigrated_one_says_to_migrate(
    sqlite_url: str,
) -> None:
    with pytest.raises(NotReady, match="run 'delayq migrate'"):
        _check_database(sqlite_url)
    settings = Settings(database_url=sqlite_url)
    engine = make_engine(settings)
    try:
        migrate.upgrade(engine, settings)
    finally:
        engine.dispose()

    lines = _check_database(sqlite_url)

    assert lines[0] == "database schema at 0002"
    assert outcome_rows(engine_for(sqlite_url)) == []


# -- PostgreSQL ---------------------------------------------------------------------------------


@pytest.fixture
def postgres_role(postgres_url: str) -> Iterator[Callable[[Sequence[str]], str]]:
    """Makes PostgreSQL roles with only `grants` (GRANT statements with {role}); each is
    stripped of its privileges and dropped after the test, even when it fails."""
    import psycopg
    from psycopg import sql

    settings = Settings(database_url=postgres_url)
    engine = make_engine(settings)
    try:
        migrate.upgrade(engine, settings)
    finally:
        engine.dispose()
    database = sa.make_url(postgres_url).database
    admin = psycopg.connect(
        host="127.0.0.1", port=5432, user="postgres", dbname=database, autocommit=True
    )
    made: list[str] = []

    def make(grants: Sequence[str]) -> str:
        role = f"dqlp_{uuid.uuid4().hex[:12]}"
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw'").format(sql.Identifier(role)))
        made.append(role)
        for grant in grants:
            admin.execute(sql.SQL(grant).format(role=sql.Identifier(role)))
        return f"postgresql+psycopg://{role}:pw@127.0.0.1:5432/{database}"

    try:
        yield make
    finally:
        for role in made:
            with contextlib.suppress(psycopg.Error):
                admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        admin.close()


POSTGRES_GRANTS = [
    "GRANT SELECT, UPDATE ON orders TO {role}",
    "GRANT SELECT, INSERT ON delayq_outcomes TO {role}",
    "GRANT USAGE ON SEQUENCE delayq_outcomes_id_seq TO {role}",
    "GRANT SELECT ON delayq_alembic_version TO {role}",
    "GRANT SELECT, UPDATE, DELETE ON delayq_outbox TO {role}",
]


def test_a_postgres_role_with_the_documented_grants_passes_the_database_check(
    postgres_role: Callable[[Sequence[str]], str],
) -> None:
    lines = _check_database(postgres_role(POSTGRES_GRANTS))

    assert lines[0] == "database schema at 0002"
    assert "may DELETE, INSERT, SELECT, UPDATE as the listener does" in lines[1]


@pytest.mark.parametrize(
    ("missing", "expected"),
    [
        (1, "lacks INSERT on table 'delayq_outcomes' (42501: permission denied"),
        (2, "lacks USAGE on sequence 'delayq_outcomes_id_seq' (INSERT into 'delayq_outcomes'"),
    ],
    ids=["no-insert-outcomes", "no-usage-sequence"],
)
def test_a_postgres_role_missing_a_privilege_fails_the_check_naming_it(
    missing: int, expected: str, postgres_role: Callable[[Sequence[str]], str]
) -> None:
    grants = [g for i, g in enumerate(POSTGRES_GRANTS) if i != missing]
    if missing == 1:
        grants.append("GRANT SELECT ON delayq_outcomes TO {role}")
    url = postgres_role(grants)

    with pytest.raises(NotReady) as failed:
        _check_database(url)

    assert f"database user '{sa.make_url(url).username}' {expected}" in str(failed.value)


RELEASE_STOCK_APP = """
import delayq


@delayq.action("release_stock")
def release_stock(ctx):
    return "released"
"""


def test_a_new_action_needs_one_acl_pattern_that_delayq_check_names_and_meanwhile_stalls_nothing(
    acl_redis: RedisServer,
    sqlite_url: str,
    tmp_path: Path,
    listeners: Callable[[dict[str, str]], ListenerProcess],
) -> None:
    admin = acl_redis.client()
    home = str(tmp_path / "home")
    migrate_cli(clean_env(DATABASE_URL=sqlite_url, HOME=home))
    engine = engine_for(sqlite_url)
    create_orders(engine, ["SN1", "SN2", "SN9"])
    app = tmp_path / "shop_timers.py"
    app.write_text(RELEASE_STOCK_APP)
    as_listener = clean_env(
        REDIS_URL=user_url(acl_redis, "delayq-listener"), DATABASE_URL=sqlite_url, HOME=home
    )
    as_producer = clean_env(REDIS_URL=user_url(acl_redis, "delayq-producer"), HOME=home)

    # The shipped rules cover cancel and complete only: the check names the one rule to add.
    for env, user in ((as_listener, "delayq-listener"), (as_producer, "delayq-producer")):
        role = "listener" if env is as_listener else "producer"
        refused = run_cli("check", "--role", role, "--app", str(app), env=env)
        assert refused.returncode == NOT_READY, refused.stdout
        assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
        assert f"ACL SETUSER {user} ~*:release_stock" in refused.stderr, refused.stderr

    # Meanwhile a timer of that action, scheduled by someone allowed to, stalls no other
    # timer of a listener whose ACL refuses its key: both fire.
    producer = Producer(admin, Keys())
    producer.schedule("SN9", 0, action="release_stock")
    producer.schedule("SN2", 0)
    listener = listeners(as_listener)
    wait_for(lambda: len(outcome_rows(engine)) == 2, 30, interval_s=0.05, what="two outcomes")
    assert listener.stop() == 0, listener.text()
    outcomes = {r.order_sn: r.outcome for r in outcome_rows(engine)}
    assert outcomes == {"SN2": "applied", "SN9": "unknown_action"}

    # The one line, for each user; then the action fires end to end.
    for user in ("delayq-listener", "delayq-producer"):
        admin.execute_command("ACL", "SETUSER", user, "~*:release_stock")
    assert run_cli("check", "--app", str(app), env=as_listener).returncode == 0
    assert run_cli("check", "--role", "producer", env=as_producer).returncode == 0
    listeners({**as_listener, "DELAYQ_APP": str(app)})
    scheduled = run_cli(
        "schedule", "SN1", "--in", "0", "--action", "release_stock", env=as_producer
    )
    assert scheduled.returncode == 0, scheduled.stderr
    wait_for(lambda: len(outcome_rows(engine)) == 3, 30, interval_s=0.05, what="SN1 fired")
    assert {r.order_sn: r.outcome for r in outcome_rows(engine)}["SN1"] == "released"
    engine.dispose()
