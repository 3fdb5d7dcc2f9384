"""The order service's install: plain `pip install delayq` (redis-py and python-dotenv
only) schedules a timer that a full listener (`delayq[listener]`) fires.

The producer-only virtualenv is built once per test session from this checkout, with pip
(its wheel cache makes later runs quick)."""

from __future__ import annotations

import os
import subprocess
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import (
    ListenerProcess,
    clean_env,
    create_orders,
    engine_for,
    migrate_cli,
    statuses,
)
from tests.servers import RedisServer, wait_for

REPO = Path(__file__).resolve().parents[1]
#: What a producer-only install may hold besides pip itself.
PRODUCER_PACKAGES = {"delayq", "redis", "python-dotenv", "async-timeout"}
LISTENER_ONLY = ("sqlalchemy", "typer", "alembic", "prometheus_client", "httpx", "pymysql")


@pytest.fixture(scope="module")
def light_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv holding `pip install delayq` from this checkout, nothing else."""
    home = tmp_path_factory.mktemp("light-venv")
    venv.EnvBuilder(with_pip=True).create(home)
    python = home / "bin" / "python"
    # A copy of the checkout without .venv: pip builds the wheel from it (hatchling).
    src = home / "src"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(src)],
        check=True,
        timeout=600,
    )
    return python


def _installed(python: Path) -> set[str]:
    out = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = {line.split("==")[0].lower() for line in out.split()}
    return names - {"pip", "setuptools"}


@pytest.fixture
def listener_env(redis_server: RedisServer, sqlite_url: str, tmp_path: Path) -> dict[str, str]:
    env = clean_env(
        REDIS_URL=redis_server.url(0), DATABASE_URL=sqlite_url, HOME=str(tmp_path / "home")
    )
    migrate_cli(env)
    return env


@pytest.fixture
def listener(listener_env: dict[str, str], tmp_path: Path) -> Iterator[ListenerProcess]:
    proc = ListenerProcess(listener_env, tmp_path / "listener.log")
    try:
        yield proc.start()
    finally:
        proc.stop()


def test_producer_only_install_holds_redis_and_dotenv_and_nothing_of_the_listener(
    light_python: Path,
) -> None:
    installed = _installed(light_python)
    assert installed <= PRODUCER_PACKAGES, installed - PRODUCER_PACKAGES
    assert {"delayq", "redis", "python-dotenv"} <= installed


def test_timer_scheduled_from_a_producer_only_install_is_fired_by_a_full_listener(
    light_python: Path,
    listener_env: dict[str, str],
    listener: ListenerProcess,
    sqlite_url: str,
    tmp_path: Path,
) -> None:
    engine = engine_for(sqlite_url)
    create_orders(engine, ["SN-LIGHT"])
    script = (
        "import sys, delayq\n"
        "due = delayq.schedule_expiry('SN-LIGHT', '1s')\n"
        f"heavy = sorted(m for m in {LISTENER_ONLY!r} if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print(due.isoformat())\n"
    )
    done = subprocess.run(
        [str(light_python), "-c", script],
        env={**listener_env, "PATH": os.environ["PATH"]},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    wait_for(lambda: statuses(engine).get("SN-LIGHT") == "cancelled", 15, what="SN-LIGHT cancelled")


def test_producer_only_install_refuses_an_unset_redis_url_in_one_line(
    light_python: Path, tmp_path: Path
) -> None:
    done = subprocess.run(
        [str(light_python), "-c", "import delayq; delayq.schedule_expiry('SN1', '20m')"],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "delayq.errors.NotReady: DELAYQ_REDIS_URL is not set" in done.stderr
    # Nothing was started behind the caller's back.
    assert not (tmp_path / ".local" / "share" / "delayq").exists()


def test_delayq_command_on_a_producer_only_install_names_the_listener_extra(
    light_python: Path, tmp_path: Path
) -> None:
    done = subprocess.run(
        [str(light_python.parent / "delayq"), "status"],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 4
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # no traceback
    assert "pip install 'delayq[listener]'" in done.stderr
