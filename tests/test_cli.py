"""The `delayq` command as a script's tool: --version, shell completion, the environment
variables --help shows (and their precedence), `--json` on stdout, `python -m delayq` and
`schedule --from-file`. Each runs the real command as a subprocess."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import typer

import delayq
from delayq.cli import app
from delayq.embedded import stop_embedded_redis
from delayq.settings import Settings
from delayq.timing import to_ms
from tests.harness import DELAYQ, clean_env, run_cli
from tests.servers import RedisFactory, RedisServer, free_port

INVALID_INPUT = 2
SECRET = "s3cret"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The commands' working directory: no stray .env from the checkout is read."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return workdir


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """DELAYQ_HOME for a test that must not start the embedded Redis: should it start
    after all, it is stopped."""
    home = tmp_path / "home"
    yield home
    stop_embedded_redis(Settings(home=home))


@pytest.fixture
def env(redis_server: RedisServer, sqlite_url: str, tmp_path: Path) -> dict[str, str]:
    return clean_env(
        HOME=str(tmp_path / "home"), REDIS_URL=redis_server.url(), DATABASE_URL=sqlite_url
    )


def cli(
    *args: str, env: dict[str, str], cwd: Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    if stdin is None:
        return run_cli(*args, env=env, cwd=cwd, timeout_s=60)
    return subprocess.run(
        [DELAYQ, *args], env=env, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=60
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    """stdout of a --json command: one JSON object and nothing else."""
    return json.loads(ok(done))


def one_error_line(done: subprocess.CompletedProcess[str], exit_code: int) -> str:
    assert done.returncode == exit_code, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("delayq: error: "), lines[0]
    assert done.stdout == ""
    return lines[0]


def timers(server: RedisServer) -> dict[str, int]:
    """The timer keys in Redis (delayq's own keys left out) and their due times (ms)."""
    client = server.client()
    names = [k for k in client.scan_iter(count=1000) if not k.startswith("{")]
    return {name: client.pexpiretime(name) for name in names}


def now_ms() -> int:
    return to_ms(datetime.now(UTC))


# -- --version and python -m delayq ------------------------------------------------------


def test_version_prints_the_package_version(tmp_path: Path) -> None:
    done = run_cli("--version", env=clean_env(), cwd=tmp_path)

    assert ok(done) == f"delayq {delayq.__version__}\n"
    assert done.stderr == ""


def test_python_dash_m_delayq_runs_the_command_line(tmp_path: Path) -> None:
    for args in (["--version"], ["schedule", "SN:1", "--in", "20m"]):
        module = subprocess.run(
            [sys.executable, "-m", "delayq", *args],
            env=clean_env(HOME=str(tmp_path / "home")),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        script = run_cli(*args, env=clean_env(HOME=str(tmp_path / "home")), cwd=tmp_path)
        assert (module.returncode, module.stdout, module.stderr) == (
            script.returncode,
            script.stdout,
            script.stderr,
        )
    assert "delayq: error: invalid order id" in module.stderr


# -- shell completion ------------------------------------------------------------------

SCRIPT_MARKS = {
    "bash": "complete -o default -F _delayq_completion delayq",
    "zsh": "#compdef delayq",
    "fish": "complete --command delayq",
}


@pytest.mark.parametrize("shell", sorted(SCRIPT_MARKS))
def test_show_completion_prints_the_script_of_the_shell_named(shell: str, tmp_path: Path) -> None:
    # setsid: no shell among the parents to detect; the name given is what counts.
    done = subprocess.run(
        ["setsid", DELAYQ, "--show-completion", shell],
        env=clean_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )

    script = ok(done)
    assert SCRIPT_MARKS[shell] in script
    for other, mark in SCRIPT_MARKS.items():
        assert other == shell or mark not in script


def test_show_completion_alone_prints_the_script_of_the_shell_it_runs_in(tmp_path: Path) -> None:
    # '; true': bash must stay the parent process instead of exec-ing delayq.
    done = subprocess.run(
        ["bash", "-c", f"{DELAYQ} --show-completion; true"],
        env=clean_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert SCRIPT_MARKS["bash"] in ok(done)


@pytest.mark.parametrize("instruction", ["source_bash", "bash_source"])
def test_the_completion_variable_prints_the_script_in_typer_and_click_spelling(
    instruction: str, tmp_path: Path
) -> None:
    done = run_cli(env=clean_env() | {"_DELAYQ_COMPLETE": instruction}, cwd=tmp_path)

    assert SCRIPT_MARKS["bash"] in ok(done)


@pytest.mark.parametrize(
    ("words", "expected"),
    [("delayq sch", "schedule"), ("delayq schedule --from", "--from-file")],
)
def test_bash_completion_completes_commands_and_options(
    words: str, expected: str, tmp_path: Path
) -> None:
    env = clean_env() | {
        "_DELAYQ_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - 1),
    }

    assert ok(run_cli(env=env, cwd=tmp_path)).split() == [expected]


def test_install_completion_writes_the_script_and_sources_it_from_bashrc(tmp_path: Path) -> None:
    home = tmp_path / "home"

    done = run_cli("--install-completion", "bash", env=clean_env() | {"HOME": str(home)})

    assert "bash completion installed in" in ok(done)
    script = home / ".bash_completions" / "delayq.sh"
    assert SCRIPT_MARKS["bash"] in script.read_text()
    assert str(script) in (home / ".bashrc").read_text()


# -- environment variables in --help ---------------------------------------------------

#: Options named like a setting that are something else. bench's --redis-url,
#: --database-url, --batch-size, --appliers configure the scratch servers and listener of a
#: benchmark: read from DELAYQ_*, a benchmark would be pointed at the production Redis.
#: reconcile's --batch-size is orders read per query.
NOT_SETTINGS = {"bench": "*", "reconcile": "batch_size"}


def _is_setting(path: tuple[str, ...], name: str) -> bool:
    fields = {f.name for f in dataclasses.fields(Settings)}
    return name in fields and NOT_SETTINGS.get(" ".join(path)) not in ("*", name)


def _options() -> Iterator[tuple[tuple[str, ...], Any]]:
    def walk(command: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
        for param in command.params:
            if param.param_type_name == "option":
                yield path, param
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, (*path, name))

    yield from walk(typer.main.get_command(app), ())


def test_every_option_backed_by_a_setting_reads_and_shows_its_environment_variable() -> None:
    backed = []
    for path, option in _options():
        name = option.name.rstrip("_")
        if _is_setting(path, name):
            backed.append(f"{' '.join(path)} --{name}")
            assert option.envvar == f"DELAYQ_{name.upper()}", (path, name)
            assert option.show_envvar, (path, name)
        else:
            assert option.envvar is None, (path, name)  # no env var without a setting
    # The options known to have a setting are all found (the walk itself works).
    assert {" --redis_url", " --database_url", "listen --http", "listen --app"} <= set(backed)


@pytest.mark.parametrize(
    ("args", "variables"),
    [
        ((), ["DELAYQ_REDIS_URL", "DELAYQ_DATABASE_URL"]),
        (("listen",), ["DELAYQ_HTTP", "DELAYQ_APP"]),
        (("check",), ["DELAYQ_APP"]),
        (("actions",), ["DELAYQ_APP"]),
    ],
    ids=["global", "listen", "check", "actions"],
)
def test_help_shows_the_environment_variable_of_each_setting(
    args: tuple[str, ...], variables: list[str], tmp_path: Path
) -> None:
    text = " ".join(ok(run_cli(*args, "--help", env=clean_env(), cwd=tmp_path)).split())

    for variable in variables:
        assert f"[env var: {variable}]" in text
    assert "[env:" not in text  # the hand-written notes are gone


# -- precedence: flag > environment > .env > default -----------------------------------


def test_the_environment_wins_over_the_dotenv_file(
    redis_server: RedisServer, workdir: Path, tmp_path: Path
) -> None:
    (workdir / ".env").write_text(f"DELAYQ_REDIS_URL=redis://127.0.0.1:{free_port()}/0\n")
    env = clean_env(HOME=str(tmp_path / "home"), REDIS_URL=redis_server.url())

    ok(cli("schedule", "P1", "--in", "20m", env=env, cwd=workdir))

    assert set(timers(redis_server)) == {"P1:cancel"}


def test_the_flag_wins_over_the_environment(
    redis_server: RedisServer, workdir: Path, tmp_path: Path
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    env = clean_env(HOME=str(tmp_path / "home"), REDIS_URL=dead)

    ok(
        cli(
            "--redis-url", redis_server.url(), "schedule", "P2", "--in", "20m", env=env, cwd=workdir
        )
    )

    assert set(timers(redis_server)) == {"P2:cancel"}


def test_the_dotenv_file_is_read_when_the_environment_says_nothing(
    redis_server: RedisServer, workdir: Path, home: Path
) -> None:
    (workdir / ".env").write_text(f"DELAYQ_REDIS_URL={redis_server.url()}\n")
    env = clean_env(HOME=str(home))

    ok(cli("schedule", "P3", "--in", "20m", env=env, cwd=workdir))

    assert set(timers(redis_server)) == {"P3:cancel"}
    assert not home.exists()  # no embedded Redis was started


@pytest.mark.parametrize(
    ("variable", "value", "args", "said"),
    [
        ("REDIS_URL", f"http://:{SECRET}@cache:6379/0", ("cancel", "SN1"), "DELAYQ_REDIS_URL"),
        ("DATABASE_URL", "not a url", ("migrate",), "DELAYQ_DATABASE_URL"),
        ("HTTP", "nonsense", ("listen",), "DELAYQ_HTTP"),
        ("APP", "shop timers!", ("actions",), "DELAYQ_APP"),
    ],
    ids=["redis-url", "database-url", "http", "app"],
)
def test_a_malformed_value_read_through_an_option_env_var_gives_delayqs_one_line(
    variable: str, value: str, args: tuple[str, ...], said: str, workdir: Path, home: Path
) -> None:
    env = clean_env(HOME=str(home), **{variable: value})

    line = one_error_line(cli(*args, env=env, cwd=workdir), INVALID_INPUT)

    assert said in line
    assert SECRET not in line
    assert not home.exists()


# -- --json: one object on stdout -------------------------------------------------------


def test_every_json_option_prints_one_json_object_on_stdout(
    env: dict[str, str],
    redis_server: RedisServer,
    redis_factory: RedisFactory,
    workdir: Path,
) -> None:
    assert as_json(cli("migrate", "--json", env=env, cwd=workdir))["after"]

    due = as_json(cli("schedule", "J1", "--in", "20m", "--json", env=env, cwd=workdir))
    assert (due["timer"], due["order_sn"], due["action"]) == ("J1:cancel", "J1", "cancel")
    assert to_ms(datetime.fromisoformat(due["due_at"])) == timers(redis_server)["J1:cancel"]

    inspected = as_json(cli("inspect", "J1", "--json", env=env, cwd=workdir))
    assert (inspected["timer"], inspected["state"]) == ("J1:cancel", "pending")
    assert as_json(cli("status", "--json", env=env, cwd=workdir))["pending"] == 1

    checked = as_json(cli("check", "--json", env=env, cwd=workdir))
    assert any("database schema at" in line for line in checked["ok"])
    assert isinstance(checked["warnings"], list)

    listed = as_json(cli("actions", "--json", env=env, cwd=workdir))
    assert {"cancel", "complete"} <= {a["name"] for a in listed["actions"]}

    assert as_json(cli("retry-dead", "--json", env=env, cwd=workdir)) == {"requeued": 0}

    other = redis_factory()
    copied = as_json(
        cli(
            "copy-timers", "--from", redis_server.url(), "--to", other.url(), "--dry-run",
            "--json", env=env, cwd=workdir,
        )
    )  # fmt: skip
    assert isinstance(copied, dict)

    for _ in range(2):
        cancelled = as_json(cli("cancel", "J1", "--json", env=env, cwd=workdir))
        assert cancelled["timer"] == "J1:cancel"
    assert cancelled["cancelled"] is False  # the second time: nothing was pending
    assert timers(redis_server) == {}


# -- schedule --from-file ---------------------------------------------------------------

YEAR = datetime.now(UTC).year + 1
AT = f"{YEAR}-06-01T10:00:00Z"
AT_MS = to_ms(datetime(YEAR, 6, 1, 10, tzinfo=UTC))


@pytest.mark.parametrize(
    ("name", "content", "args"),
    [
        ("header.csv", f"order_sn,delay,action\nF1,20m,cancel\n\nF2,90s,\nF3,{AT},complete\n", ()),
        # F3 gives no time: --at is the time of rows that give none.
        (
            "in-at.csv",
            "order_sn,in,at,action\nF1,20m,,\nF2,90,,cancel\nF3,,,complete\n",
            ("--at", AT),
        ),
        ("headerless.txt", f"F1,20m\nF2,90,cancel\nF3,{AT},complete\n", ()),
        (
            "orders.jsonl",
            '{"order_sn": "F1", "in": "20m", "action": "cancel"}\n'
            '{"order_sn": "F2", "in": 90}\n\n'
            f'{{"order_sn": "F3", "at": "{AT}", "action": "complete"}}\n',
            (),
        ),
    ],
    ids=["csv-header-delay", "csv-header-in-at", "csv-without-header", "json-lines"],
)  # fmt: skip
def test_from_file_schedules_exactly_the_rows_of_the_file(
    name: str,
    content: str,
    args: tuple[str, ...],
    env: dict[str, str],
    redis_server: RedisServer,
    workdir: Path,
) -> None:
    (workdir / name).write_text(content)
    before = now_ms()

    out = ok(cli("schedule", "--from-file", name, *args, env=env, cwd=workdir))

    after = now_ms()
    assert out == f"scheduled 3 timers from {name}\n"
    due = timers(redis_server)
    assert set(due) == {"F1:cancel", "F2:cancel", "F3:complete"}
    # A row's delay counts from when it is written, not from when the file was read.
    assert before + 20 * 60_000 <= due["F1:cancel"] <= after + 20 * 60_000
    assert before + 90_000 <= due["F2:cancel"] <= after + 90_000
    assert due["F3:complete"] == AT_MS


def test_from_file_reads_standard_input_and_prints_a_json_summary(
    env: dict[str, str], redis_server: RedisServer, workdir: Path
) -> None:
    rows = "".join(f"S{i}\n" for i in range(5))

    done = cli(
        "schedule", "--from-file", "-", "--in", "1h", "-a", "complete", "--json",
        env=env, cwd=workdir, stdin=rows,
    )  # fmt: skip

    assert as_json(done) == {"file": "stdin", "scheduled": 5}
    assert set(timers(redis_server)) == {f"S{i}:complete" for i in range(5)}


def test_a_large_file_is_scheduled_in_chunks_and_every_row_lands(
    env: dict[str, str], redis_server: RedisServer, workdir: Path
) -> None:
    count = 25_000  # three chunks of at most 10,000
    (workdir / "big.csv").write_text("".join(f"B{i},1d\n" for i in range(count)))

    out = ok(cli("schedule", "--from-file", "big.csv", env=env, cwd=workdir))

    assert out == f"scheduled {count} timers from big.csv\n"
    assert len(timers(redis_server)) == count


@pytest.mark.parametrize(
    ("content", "line", "said"),
    [
        ("G1,20m\nG2,20m\nG:3,20m\n", 3, "invalid order id"),
        ("order_sn,in\nG1,20m\n\nG2,5x\n", 4, "invalid duration"),
        ("G1,20m\nG2,2030-01-01T10:00:00\n", 2, "has no zone"),
        ("G1,20m\nG2\n", 2, "no delay (in) or time (at)"),
        ("order_sn,in,colour\nG1,20m,red\n", 1, "unknown column 'colour'"),
        ('{"order_sn": "G1", "in": "20m"}\n{"order_sn": "G2", "in": "20m", "x": 1}\n', 2, "x"),
        ('{"order_sn": "G1", "in": "20m"}\n\n\n{"order_sn": "G2", "in": "20m"\n', 4, "JSON"),
        ('{"order_sn": "G1", "in": "20m", "at": "2030-01-01T10:00Z"}\n', 1, "not both"),
        ("G1,20m,cancel,extra\n", 1, "4 values"),
    ],
    ids=[
        "bad-order-id", "bad-delay", "time-without-zone", "no-time", "unknown-column",
        "unknown-json-field", "broken-json", "in-and-at", "too-many-values",
    ],
)  # fmt: skip
def test_a_bad_row_names_its_line_and_nothing_is_scheduled(
    content: str,
    line: int,
    said: str,
    env: dict[str, str],
    redis_server: RedisServer,
    workdir: Path,
) -> None:
    (workdir / "timers").write_text(content)

    error = one_error_line(cli("schedule", "--from-file", "timers", env=env, cwd=workdir), 2)

    assert error.startswith(f"delayq: error: timers line {line}: "), error
    assert said in error
    assert timers(redis_server) == {}


def test_a_bad_row_after_many_chunks_still_leaves_nothing_scheduled(
    env: dict[str, str], redis_server: RedisServer, workdir: Path
) -> None:
    rows = [f"H{i},1d\n" for i in range(24_000)]
    rows[23_456] = "H 23456,1d\n"
    stdin = "".join(rows)

    done = cli("schedule", "--from-file", "-", env=env, cwd=workdir, stdin=stdin)

    error = one_error_line(done, INVALID_INPUT)
    assert error.startswith("delayq: error: stdin line 23457: invalid order id"), error
    assert timers(redis_server) == {}


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--from-file", "nosuch.csv"), "nosuch.csv: no such file"),
        (("SN1", "--from-file", "x.csv"), "not both"),
        (("--from-file", "x.csv", "--in", "1m", "--at", AT), "exactly one of --in"),
        (("--from-file", "x.csv", "--action", "Cancel"), "invalid action"),
    ],
    ids=["missing-file", "order-and-file", "in-and-at", "bad-default-action"],
)
def test_from_file_refuses_bad_arguments_before_connecting(
    args: tuple[str, ...], said: str, workdir: Path, home: Path
) -> None:
    (workdir / "x.csv").write_text("X1,20m\n")
    env = clean_env(HOME=str(home), REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")

    assert said in one_error_line(cli("schedule", *args, env=env, cwd=workdir), INVALID_INPUT)
    assert not home.exists()


def test_from_file_says_how_far_it_got_when_redis_goes_away(workdir: Path, tmp_path: Path) -> None:
    (workdir / "x.csv").write_text("X1,20m\n")
    dead = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"
    env = clean_env(HOME=str(tmp_path / "home"), REDIS_URL=dead)

    error = one_error_line(cli("schedule", "--from-file", "x.csv", env=env, cwd=workdir), 3)

    assert "not reachable" in error and "scheduled 0 of 1 timers from x.csv" in error
    assert SECRET not in error
