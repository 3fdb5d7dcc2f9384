"""Fixtures for tests against real Redis, SQLite, MariaDB and PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pymysql
import pytest
import sqlalchemy as sa

from tests.cluster import ClusterFactory, ServerCluster, redis_cli_binary
from tests.servers import (
    SERVER_KINDS,
    RedisFactory,
    RedisServer,
    ServerBinaryMissing,
    ServerKind,
    server_binary,
)

MARIADB_HOST = "127.0.0.1"
MARIADB_PORT = 3306
POSTGRES_HOST = "127.0.0.1"
POSTGRES_PORT = 5432
CONNECT_TIMEOUT_S = 5


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: takes more than a few seconds (deselect with -m 'not slow')"
    )
    config.addinivalue_line(
        "markers", "long_profile: runs for an hour; only with -m long_profile (not in CI)"
    )


@pytest.fixture
def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def _require_server_binary(kind: ServerKind, in_ci: bool) -> None:
    """Fail (CI, where scripts/bootstrap.sh installs both) or skip when `kind` has no binary."""
    try:
        server_binary(kind)
    except ServerBinaryMissing as exc:
        if in_ci:
            pytest.fail(f"CI needs {kind}-server: {exc}", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture
def server_kind() -> ServerKind:
    """The kind of server `redis_factory` and `redis_server` start: "redis" unless a test
    overrides it, e.g. a whole module on both kinds with
    `pytestmark = pytest.mark.parametrize("server_kind", SERVER_KINDS)`."""
    return "redis"


@pytest.fixture
def redis_factory(tmp_path: Path, server_kind: ServerKind, in_ci: bool) -> Iterator[RedisFactory]:
    """Makes started RedisServers (of `server_kind` unless a call passes kind=) in their own
    dirs under tmp_path; stops them all after."""
    servers: list[RedisServer] = []

    def make(
        *,
        appendonly: bool = False,
        notify: str = "Egx",
        extra: dict[str, str] | None = None,
        kind: ServerKind | None = None,
    ) -> RedisServer:
        kind = kind or server_kind
        _require_server_binary(kind, in_ci)
        server_dir = tmp_path / f"{kind}-{len(servers)}"
        server_dir.mkdir()
        server = RedisServer(
            server_dir, appendonly=appendonly, notify=notify, extra=extra, kind=kind
        )
        # Registered before start() so a half-started server is still cleaned up.
        servers.append(server)
        server.start()
        return server

    yield make

    errors: list[BaseException] = []
    for server in servers:
        try:
            server.stop()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def redis_server(redis_factory: RedisFactory) -> RedisServer:
    """A started server of the test's `server_kind` (Redis by default), notify Ex."""
    return redis_factory(notify="Egx")


def _require_redis_cli(in_ci: bool) -> None:
    """Fail (CI) or skip without redis-cli, which ServerCluster reshards with."""
    try:
        redis_cli_binary()
    except ServerBinaryMissing as exc:
        if in_ci:
            pytest.fail(f"CI needs redis-cli: {exc}", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture
def cluster_factory(
    tmp_path: Path, server_kind: ServerKind, in_ci: bool
) -> Iterator[ClusterFactory]:
    """Makes started ServerClusters (tests/cluster.py; of `server_kind` unless a call
    passes kind=) in their own dirs under tmp_path; stops them all after."""
    clusters: list[ServerCluster] = []

    def make(
        *,
        kind: ServerKind | None = None,
        primaries: int = 3,
        replicas_per_primary: int = 1,
        node_timeout_ms: int = 1000,
        appendonly: bool = False,
        notify: str = "Egx",
        extra: dict[str, str] | None = None,
    ) -> ServerCluster:
        kind = kind or server_kind
        _require_server_binary(kind, in_ci)
        _require_redis_cli(in_ci)
        cluster = ServerCluster(
            tmp_path / f"{kind}-cluster-{len(clusters)}",
            kind=kind,
            primaries=primaries,
            replicas_per_primary=replicas_per_primary,
            node_timeout_ms=node_timeout_ms,
            appendonly=appendonly,
            notify=notify,
            extra=extra,
        )
        # Registered before start() so a half-started cluster is still stopped.
        clusters.append(cluster)
        cluster.start()
        return cluster

    yield make

    errors: list[BaseException] = []
    for cluster in clusters:
        try:
            cluster.stop()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def redis_cluster(cluster_factory: ClusterFactory) -> ServerCluster:
    """A started cluster of the test's `server_kind`: 3 primaries with a replica each."""
    return cluster_factory()


@pytest.fixture(params=SERVER_KINDS, ids=SERVER_KINDS)
def any_server_kind(request: pytest.FixtureRequest) -> ServerKind:
    """Runs a test once per supported server: ids "redis" and "valkey"."""
    kind: ServerKind = request.param
    return kind


@pytest.fixture
def any_redis_factory(redis_factory: RedisFactory, any_server_kind: ServerKind) -> RedisFactory:
    """`redis_factory` making servers of `any_server_kind`: the test runs on each kind."""

    def make(
        *,
        appendonly: bool = False,
        notify: str = "Egx",
        extra: dict[str, str] | None = None,
        kind: ServerKind | None = None,
    ) -> RedisServer:
        return redis_factory(
            appendonly=appendonly, notify=notify, extra=extra, kind=kind or any_server_kind
        )

    return make


@pytest.fixture
def any_redis(any_redis_factory: RedisFactory) -> RedisServer:
    """A started server, notify Ex, once as Redis and once as Valkey (`.kind` says which)."""
    return any_redis_factory(notify="Egx")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/delayq.db"


def _unique_database_name() -> str:
    return f"delayq_t_{uuid.uuid4().hex[:12]}"


def _mariadb_connect() -> pymysql.connections.Connection[Any]:
    return pymysql.connect(
        host=MARIADB_HOST,
        port=MARIADB_PORT,
        user="root",
        password="",
        connect_timeout=CONNECT_TIMEOUT_S,
        autocommit=True,
    )


@pytest.fixture
def mariadb_url(in_ci: bool) -> Iterator[str]:
    """A fresh, empty MariaDB database for this test, dropped afterwards."""
    try:
        conn = _mariadb_connect()
    except pymysql.MySQLError as exc:
        reason = f"MariaDB not reachable as root@{MARIADB_HOST}:{MARIADB_PORT}: {exc}"
        # CI is set up by scripts/bootstrap.sh, so there a missing server is a bug.
        if in_ci:
            pytest.fail(reason)
        pytest.skip(f"{reason} (run scripts/bootstrap.sh)")
    name = _unique_database_name()
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")

    yield f"mysql+pymysql://root@{MARIADB_HOST}:{MARIADB_PORT}/{name}"

    # A fresh connection: the test may have run longer than wait_timeout.
    with contextlib.closing(_mariadb_connect()) as conn, conn.cursor() as cur:
        # Connections the test leaked (an engine not disposed, a worker thread)
        # would hold metadata locks and make DROP DATABASE wait for a year.
        cur.execute(
            "SELECT id FROM information_schema.processlist WHERE db = %s AND id <> CONNECTION_ID()",
            (name,),
        )
        for (thread_id,) in cur.fetchall():
            with contextlib.suppress(pymysql.MySQLError):
                cur.execute(f"KILL {int(thread_id)}")
        cur.execute("SET SESSION lock_wait_timeout = 30")
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture
def postgres_url(in_ci: bool) -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards. Outside CI PostgreSQL is optional
    (skip); CI is set up by scripts/bootstrap.sh, so there a missing one fails."""

    def unavailable(reason: str) -> NoReturn:
        if in_ci:
            pytest.fail(reason, pytrace=False)
        pytest.skip(f"{reason} (run scripts/bootstrap.sh as root)")

    try:
        import psycopg
        from psycopg import sql
    except ImportError as exc:
        unavailable(f"psycopg not installed (pip install -e '.[postgres]'): {exc}")

    def connect() -> psycopg.Connection[Any]:
        return psycopg.connect(
            host=POSTGRES_HOST,
            port=POSTGRES_PORT,
            user="postgres",
            dbname="postgres",
            connect_timeout=CONNECT_TIMEOUT_S,
            autocommit=True,
        )

    try:
        conn = connect()
    except psycopg.Error as exc:
        unavailable(f"PostgreSQL not reachable as postgres@{POSTGRES_HOST}:{POSTGRES_PORT}: {exc}")
    name = _unique_database_name()
    with conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    yield f"postgresql+psycopg://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/{name}"

    with connect() as conn:
        # FORCE ends sessions the test leaked instead of failing the drop.
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(params=["sqlite", "mariadb"], ids=["sqlite", "mariadb"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Runs a test once per supported database backend."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
def limited_user(mariadb_url: str) -> Iterator[tuple[str, Callable[[bool], None]]]:
    """A MariaDB user with table privileges on the test database only, and a switch that
    revokes or grants them (table privileges take effect at the next statement)."""
    database = sa.make_url(mariadb_url).database
    user = f"dq_{database[-12:]}"
    admin = _mariadb_connect()
    tables = ("orders", "delayq_outcomes", "delayq_alembic_version", "delayq_outbox")

    def grant(on: bool) -> None:
        with admin.cursor() as cur:
            for table in tables:
                if on:
                    # The outbox relay deletes the rows it relayed.
                    more = ", DELETE" if table == "delayq_outbox" else ""
                    cur.execute(
                        f"GRANT SELECT, INSERT, UPDATE{more} ON `{database}`.`{table}` TO %s@'%%'",
                        (user,),
                    )
                else:
                    cur.execute(
                        f"REVOKE ALL PRIVILEGES ON `{database}`.`{table}` FROM %s@'%%'", (user,)
                    )

    with admin.cursor() as cur:
        cur.execute("CREATE USER %s@'%%' IDENTIFIED BY 'pw'", (user,))
    try:
        yield f"mysql+pymysql://{user}:pw@{MARIADB_HOST}:{MARIADB_PORT}/{database}", grant
    finally:
        with admin.cursor() as cur:
            cur.execute("DROP USER IF EXISTS %s@'%%'", (user,))
        admin.close()
