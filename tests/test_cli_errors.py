"""The `delayq` command as a subprocess: every mistake ends in one clear line.

A bad order id, duration, option or setting must give exactly one line on stderr that
starts with `delayq: error:`, a non-zero exit status and no traceback, and must be
refused before anything connects (in particular before the embedded Redis is started).
Unreachable servers are named with their password masked."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from delayq.embedded import socket_path, stop_embedded_redis
from delayq.settings import Settings
from delayq.timing import to_ms
from tests.harness import ListenerProcess, clean_env, run_cli
from tests.servers import RedisFactory, RedisServer, free_port

INVALID_INPUT, UNAVAILABLE, NOT_READY = 2, 3, 4
SECRET = "s3cret"


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """DELAYQ_HOME: never the real home. Not created, so a test sees anything written."""
    home = tmp_path / "home"
    yield home
    # Should a command have started the embedded Redis after all, do not leave it running.
    stop_embedded_redis(Settings(home=home))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The commands' working directory: no stray .env from the checkout is read."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return workdir


def delayq(*args: str, env: dict[str, str], cwd: Path) -> CompletedProcess[str]:
    return run_cli(*args, env=env, cwd=cwd, timeout_s=30)


def one_error_line(done: CompletedProcess[str], exit_code: int | None = None) -> str:
    """The single `delayq: error:` line of a failed command."""
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Traceback" not in output, output
    lines = done.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{done.stderr}"
    assert lines[0].startswith("delayq: error: "), lines[0]
    if exit_code is not None:
        assert done.returncode == exit_code, output
    return lines[0]


def assert_nothing_started(home: Path) -> None:
    assert not socket_path(home).exists(), "the embedded Redis was started"
    assert not (home / "redis.sock").exists(), "the embedded Redis was started"
    assert not (home / "redis.conf").exists(), "the embedded Redis was configured"
    assert not (home / "delayq.db").exists(), "the embedded database was created"


# -- bad input: refused before anything connects -------------------------------------------

BAD_INPUT = [
    pytest.param(["schedule", "SN:1", "--in", "20m"], "invalid order id", id="colon-in-order-id"),
    pytest.param(["schedule", "SN 1", "--in", "20m"], "invalid order id", id="space-in-order-id"),
    pytest.param(["schedule", "x" * 65, "--in", "20m"], "invalid order id", id="order-id-65"),
    pytest.param(["cancel", "SN*1"], "invalid order id", id="glob-in-cancelled-order-id"),
    pytest.param(["retry-dead", "SN?"], "invalid order id", id="glob-in-retried-order-id"),
    pytest.param(["schedule", "SN1", "--in", "5x"], "invalid duration", id="bad-duration"),
    pytest.param(["reshard", "--shards", "20000"], "power of two", id="reshard-not-a-power-of-2"),
    pytest.param(["schedule", "SN1", "--in", "1h 30m"], "invalid duration", id="spaced-duration"),
    pytest.param(["schedule", "SN1", "--in=-1"], "invalid duration", id="negative-duration"),
    pytest.param(
        ["schedule", "SN1", "--in", "20m", "--at", "2030-01-01T00:00Z"],
        "exactly one of --in",
        id="both-in-and-at",
    ),
    pytest.param(["schedule", "SN1"], "exactly one of --in", id="neither-in-nor-at"),
    pytest.param(["schedule", "SN1", "--at", "garbage"], "invalid time", id="at-garbage"),
    pytest.param(
        ["schedule", "SN1", "--at", "2030-01-01T10:00:00"], "no zone", id="at-without-zone"
    ),
    pytest.param(
        ["schedule", "SN1", "--in", "20m", "--action", "Cancel"],
        "invalid action",
        id="bad-action",
    ),
    pytest.param(["cancel", "SN1", "-a", "can-cel"], "invalid action", id="bad-cancel-action"),
    pytest.param(["schedule", "SN1", "--in", "20m", "--bogus"], "--bogus", id="unknown-option"),
    pytest.param(["schedule"], "Missing argument", id="missing-order-id"),
    pytest.param(["cancel"], "Missing argument", id="missing-cancel-order-id"),
    pytest.param(["schedule", "SN1", "--in"], "--in", id="missing-option-value"),
    pytest.param(["listen", "--log-level", "loud"], "invalid log level", id="bad-log-level"),
    pytest.param(["nosuchcommand"], "nosuchcommand", id="unknown-command"),
]


@pytest.mark.parametrize(("args", "fragment"), BAD_INPUT)
def test_bad_input_gives_one_error_line_and_connects_nothing(
    args: list[str], fragment: str, home: Path, workdir: Path
) -> None:
    done = delayq(*args, env=clean_env(HOME=str(home)), cwd=workdir)

    line = one_error_line(done, INVALID_INPUT)
    assert fragment in line
    assert done.stdout == ""
    assert_nothing_started(home)


@pytest.mark.parametrize(
    ("setting", "value", "args"),
    [
        ("BATCH_SIZE", "abc", ["schedule", "SN1", "--in", "20m"]),
        ("ORDERS_TABLE", "orders; drop table x", ["listen"]),
        ("NAMESPACE", "my queue", ["cancel", "SN1"]),
        ("LEASE_S", "soon", ["check"]),
    ],
)
def test_bad_settings_in_the_environment_are_refused_naming_the_setting(
    setting: str, value: str, args: list[str], home: Path, workdir: Path
) -> None:
    env = clean_env(HOME=str(home), **{setting: value})

    line = one_error_line(delayq(*args, env=env, cwd=workdir), INVALID_INPUT)

    assert f"DELAYQ_{setting}" in line
    assert_nothing_started(home)


def test_bad_settings_in_the_dotenv_file_are_refused_naming_the_setting(
    home: Path, workdir: Path
) -> None:
    (workdir / ".env").write_text("DELAYQ_BATCH_SIZE=abc\n")

    done = delayq("schedule", "SN1", "--in", "20m", env=clean_env(HOME=str(home)), cwd=workdir)

    assert "DELAYQ_BATCH_SIZE" in one_error_line(done, INVALID_INPUT)
    assert_nothing_started(home)


@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "nosuchdb://user:s3cret@db/x",
        "mysql+pymysql://root:s3cret@127.0.0.1:xx/db",
    ],
    ids=["not-a-url", "unknown-dialect", "non-numeric-port"],
)
def test_a_malformed_database_url_is_refused_without_showing_its_password(
    url: str, home: Path, workdir: Path
) -> None:
    env = clean_env(HOME=str(home), DATABASE_URL=url)

    line = one_error_line(delayq("migrate", env=env, cwd=workdir), INVALID_INPUT)

    assert "DELAYQ_DATABASE_URL" in line
    assert SECRET not in line
    assert_nothing_started(home)


@pytest.mark.parametrize("command", ["listen", "check"])
def test_a_malformed_database_url_is_refused_before_the_embedded_redis_starts(
    command: str, home: Path, workdir: Path
) -> None:
    env = clean_env(HOME=str(home), DATABASE_URL="not a url")

    line = one_error_line(delayq(command, env=env, cwd=workdir), INVALID_INPUT)

    assert "DELAYQ_DATABASE_URL" in line
    # A typo in the database URL must not leave an embedded redis-server daemon behind.
    assert_nothing_started(home)


@pytest.mark.parametrize(
    "url", ["http://:s3cret@cache:6379/0", "redis://:s3cret@127.0.0.1:xx/0"], ids=["http", "port"]
)
def test_a_malformed_redis_url_is_refused_without_showing_its_password(
    url: str, home: Path, workdir: Path
) -> None:
    done = delayq(
        "--redis-url",
        url,
        "schedule",
        "SN1",
        "--in",
        "20m",
        env=clean_env(HOME=str(home)),
        cwd=workdir,
    )

    line = one_error_line(done, INVALID_INPUT)
    assert "DELAYQ_REDIS_URL" in line
    assert SECRET not in done.stdout + done.stderr
    assert_nothing_started(home)


# -- servers that do not answer ----------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["schedule", "SN1", "--in", "20m"], ["cancel", "SN1"], ["check"], ["listen"], ["status"]],
    ids=lambda args: args[0],
)
def test_an_unreachable_redis_is_named_with_its_password_masked(
    args: list[str], home: Path, workdir: Path, sqlite_url: str
) -> None:
    port = free_port()
    url = f"redis://:{SECRET}@127.0.0.1:{port}/0"
    env = clean_env(HOME=str(home), DATABASE_URL=sqlite_url)

    done = delayq("--redis-url", url, *args, env=env, cwd=workdir)

    line = one_error_line(done, UNAVAILABLE)
    assert f"redis://:***@127.0.0.1:{port}/0" in line
    assert "not reachable" in line
    assert SECRET not in done.stdout + done.stderr
    assert_nothing_started(home)


@pytest.mark.parametrize("command", ["check", "migrate", "status"])
def test_an_unreachable_database_is_named_with_its_password_masked(
    command: str, redis_server: RedisServer, home: Path, workdir: Path
) -> None:
    port = free_port()
    env = clean_env(
        HOME=str(home),
        REDIS_URL=redis_server.url(),
        DATABASE_URL=f"mysql+pymysql://root:{SECRET}@127.0.0.1:{port}/x",
    )

    done = delayq(command, env=env, cwd=workdir)

    line = one_error_line(done, UNAVAILABLE)
    assert f"mysql+pymysql://root:***@127.0.0.1:{port}/x" in line
    assert "not reachable" in line
    assert SECRET not in done.stdout + done.stderr


def test_an_unmigrated_database_is_reported_with_what_to_run(
    redis_server: RedisServer, home: Path, workdir: Path, sqlite_url: str
) -> None:
    env = clean_env(HOME=str(home), REDIS_URL=redis_server.url(), DATABASE_URL=sqlite_url)

    line = one_error_line(delayq("check", env=env, cwd=workdir), NOT_READY)

    assert "delayq migrate" in line


# -- Redis without keyspace notifications --------------------------------------------------


def test_a_redis_without_keyspace_notifications_is_refused_until_configure_redis_fixes_it(
    redis_factory: RedisFactory, home: Path, workdir: Path, sqlite_url: str, tmp_path: Path
) -> None:
    server = redis_factory(notify="")
    client = server.client()
    env = clean_env(HOME=str(home), REDIS_URL=server.url(), DATABASE_URL=sqlite_url)
    assert delayq("migrate", env=env, cwd=workdir).returncode == 0

    for command in ("listen", "check"):
        line = one_error_line(delayq(command, env=env, cwd=workdir), NOT_READY)
        assert "notify-keyspace-events Egx" in line
        assert "--configure-redis" in line
    # Refusing changed nothing on the server.
    assert client.config_get("notify-keyspace-events")["notify-keyspace-events"] == ""

    listener = ListenerProcess(env, tmp_path / "listener.log", args=("--configure-redis",))
    try:
        listener.start()
        flags = client.config_get("notify-keyspace-events")["notify-keyspace-events"]
    finally:
        exit_status = listener.stop()

    assert {"E", "x"} <= set(flags)
    assert "notify-keyspace-events set to" in listener.text()
    assert exit_status == 0, listener.text()
    done = delayq("check", env=env, cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert "ok: notify-keyspace-events is" in done.stdout


# -- what works says what it did -----------------------------------------------------------

DUE_RE = re.compile(r"^scheduled (\S+) due (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)$")


def test_schedule_then_cancel_from_the_command_line(
    redis_server: RedisServer, home: Path, workdir: Path
) -> None:
    client = redis_server.client()
    env = clean_env(HOME=str(home), REDIS_URL=redis_server.url())
    before = datetime.now(UTC)

    scheduled = delayq("schedule", "SN1", "--in", "20m", env=env, cwd=workdir)

    assert scheduled.returncode == 0, scheduled.stderr
    assert scheduled.stderr == ""
    match = DUE_RE.match(scheduled.stdout.strip())
    assert match, scheduled.stdout
    assert match.group(1) == "SN1:cancel"
    due = datetime.fromisoformat(match.group(2))
    assert before + timedelta(minutes=20) <= due <= datetime.now(UTC) + timedelta(minutes=20)
    assert client.pexpiretime("SN1:cancel") == to_ms(due)

    cancelled = delayq("cancel", "SN1", env=env, cwd=workdir)

    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == "cancelled SN1:cancel"
    assert client.exists("SN1:cancel") == 0
    assert client.zcard("{delayq}:due") == 0

    again = delayq("cancel", "SN1", env=env, cwd=workdir)

    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("no pending timer SN1:cancel")
    assert_nothing_started(home)


def test_schedule_at_a_time_with_an_offset_prints_the_due_time_in_utc(
    redis_server: RedisServer, home: Path, workdir: Path
) -> None:
    client = redis_server.client()
    env = clean_env(HOME=str(home), REDIS_URL=redis_server.url())
    year = datetime.now(UTC).year + 1

    done = delayq(
        "schedule",
        "SN2",
        "--at",
        f"{year}-06-01T12:00:00+02:00",
        "--action",
        "complete",
        env=env,
        cwd=workdir,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"scheduled SN2:complete due {year}-06-01T10:00:00.000Z"
    assert client.pexpiretime("SN2:complete") == to_ms(datetime(year, 6, 1, 10, tzinfo=UTC))
