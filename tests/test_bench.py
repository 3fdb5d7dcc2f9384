"""A smoke run of `delayq bench`: the real listener fires everything, and the JSON report
has the shape BENCHMARKS.md relies on. Speed itself is measured by the benchmark, not
asserted here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pymysql
import pytest

from delayq.bench_profile import summarize
from delayq.errors import InvalidInput
from tests.harness import clean_env, run_cli

RUN_FIELDS = {
    "mode", "action", "scheduled", "fired", "lost", "duplicates", "early", "lateness_ms",
    "throughput_per_s", "drain_s", "schedule_per_s", "redis_bytes_per_pending",
    "redis_peak_mb", "redis_version", "listener_cpu_pct", "effects", "primaries",
    "listener_log_lines", "listener_log_head", "profile",
}  # fmt: skip


def _bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    env = clean_env(HOME=str(tmp_path / "home"))
    done = run_cli("bench", "--json-file", str(out), *args, env=env, cwd=tmp_path, timeout_s=240)
    assert done.returncode == 0, done.stdout + done.stderr
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def test_bench_smoke_run_fires_every_timer_once_and_reports_its_figures(tmp_path: Path) -> None:
    report = _bench(
        tmp_path, "--pending", "2000", "--rate", "300", "--duration", "1", "--naive",
        "--plot", str(tmp_path / "bench.png"),
    )  # fmt: skip
    assert set(report) == {"machine", "config", "runs", "naive_p99_ratio"}
    runs = report["runs"]
    assert isinstance(runs, list) and [r["mode"] for r in runs] == ["delayq", "naive"]
    for run in runs:
        assert set(run) == RUN_FIELDS
        assert (run["action"], run["scheduled"], run["effects"]) == ("cancel", 300, 300)
        assert set(run["lateness_ms"]) == {"p50", "p90", "p99", "max"}
    delayq = runs[0]
    assert (delayq["fired"], delayq["lost"], delayq["duplicates"], delayq["early"]) == (
        300,
        0,
        0,
        0,
    )
    assert delayq["redis_bytes_per_pending"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_bench_json_prints_the_figures_on_stdout_and_json_file_writes_the_same(
    tmp_path: Path,
) -> None:
    out = tmp_path / "bench.json"
    env = clean_env(HOME=str(tmp_path / "home"))
    done = run_cli(
        "bench", "--pending", "0", "--burst", "200", "--json", "--json-file", str(out),
        env=env, cwd=tmp_path, timeout_s=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    printed = json.loads(done.stdout)  # the figures alone: the summary went to stderr
    assert printed == json.loads(out.read_text())
    (run,) = printed["runs"]
    assert (run["scheduled"], run["fired"], run["lost"], run["duplicates"]) == (200, 200, 0, 0)
    assert "fired 200/200" in done.stderr


def _fired_each_once(run: dict[str, Any], action: str, scheduled: int) -> None:
    """Every timer fired once, its work done once on the far side, and the figures there."""
    assert set(run) == RUN_FIELDS
    assert (run["mode"], run["action"]) == ("delayq", action)
    counts = [run[k] for k in ("scheduled", "fired", "lost", "duplicates", "early", "effects")]
    assert counts == [scheduled, scheduled, 0, 0, 0, scheduled]
    assert set(run["lateness_ms"]) == {"p50", "p90", "p99", "max"}
    assert run["throughput_per_s"] > 0


def test_bench_handler_scenario_updates_another_table_once_per_timer(
    tmp_path: Path, mariadb_url: str
) -> None:
    report = _bench(
        tmp_path, "--pending", "1000", "--rate", "100", "--duration", "2",
        "--action", "handler", "--database-url", mariadb_url,
    )  # fmt: skip
    (run,) = report["runs"]
    # effects: the sum of bench_stock.touched, which the handler's UPDATE adds 1 to.
    _fired_each_once(run, "bench_touch", 200)
    assert report["config"]["action"] == "handler"


def test_bench_webhook_scenario_posts_once_per_timer_to_a_local_server(tmp_path: Path) -> None:
    report = _bench(
        tmp_path, "--pending", "1000", "--rate", "100", "--duration", "2", "--action", "webhook"
    )
    (run,) = report["runs"]
    # effects: the POSTs the bench's receiver counted.
    _fired_each_once(run, "bench_hook", 200)


def _bench_databases() -> set[str]:
    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root")
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW DATABASES LIKE 'delayq\\_bench\\_%%'")
            return {row[0] for row in cur.fetchall()}
    finally:
        conn.close()


def test_bench_on_mariadb_makes_and_drops_its_own_scratch_database(
    tmp_path: Path, mariadb_url: str
) -> None:
    before = _bench_databases()
    report = _bench(tmp_path, "--pending", "0", "--burst", "500", "--database-url", mariadb_url)
    (run,) = report["runs"]
    assert (run["fired"], run["lost"], run["duplicates"]) == (500, 0, 0)
    assert _bench_databases() == before


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--rate", "0"), "--rate and --duration > 0"),
        (("--action", "email"), "choose one of cancel, handler, webhook"),
        (("--action", "handler", "--naive"), "--naive runs the built-in cancel only"),
    ],
    ids=["no-rate", "unknown-action", "naive-with-a-handler"],
)
def test_bench_refuses_a_workload_it_cannot_run_in_one_line(
    tmp_path: Path, args: tuple[str, ...], said: str
) -> None:
    env = clean_env(HOME=str(tmp_path / "home"))
    done = run_cli("bench", *args, env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("delayq: error:") and "Traceback" not in done.stderr
    assert said in done.stderr


def test_bench_profile_samples_the_listener_during_the_run_and_says_where_its_time_went(
    tmp_path: Path,
) -> None:
    """--profile: py-spy attaches to the real `delayq listen` for the measured window and the
    report says, by thread and by library, where the listener's CPU went."""
    raw = tmp_path / "listener.raw"
    report = _bench(
        tmp_path, "--pending", "0", "--rate", "300", "--duration", "2", "--profile", str(raw)
    )
    (run,) = report["runs"]
    assert (run["fired"], run["lost"], run["duplicates"], run["early"]) == (600, 0, 0, 0)
    profile = run["profile"]
    assert profile["samples"] > 0 and profile["rate_hz"] == 250
    # The listener's own threads did the work, and its shares add up to the whole.
    assert any(t.startswith("delayq-") for t in profile["threads_pct"])
    assert 99 <= sum(profile["threads_pct"].values()) <= 101
    assert "delayq" in profile["where_pct"] or "sqlalchemy" in profile["where_pct"]
    assert raw.read_text().strip(), "py-spy's raw stacks are kept for a flame graph"
    # The listener runs at --log-level warning: a clean run logs only that the bench's
    # scratch Redis keeps nothing on disk.
    assert run["listener_log_lines"] == 1
    assert "keeps nothing on disk" in run["listener_log_head"][0]


def test_profile_summary_counts_samples_by_thread_library_and_the_delayq_caller(
    tmp_path: Path,
) -> None:
    raw = tmp_path / "p.raw"
    raw.write_text(
        "thread (0x1): delayq-applier-0;apply (delayq/actions/apply.py:10);"
        "execute (sqlalchemy/engine/base.py:1) 3\n"
        "thread (0x1): delayq-applier-0;apply (delayq/actions/apply.py:10);"
        "send (redis/connection.py:5) 1\n"
        "thread (0x2): delayq-claimer;run (delayq/listener.py:4);wait (threading.py:9) 4\n"
        "not a sample line\n"
    )
    summary = summarize(raw)
    assert summary["samples"] == 8
    assert summary["threads_pct"] == {"delayq-applier-0": 50.0, "delayq-claimer": 50.0}
    assert summary["where_pct"] == {"stdlib": 50.0, "sqlalchemy": 37.5, "redis": 12.5}
    assert summary["callers_pct"]["apply -> sqlalchemy"] == 37.5
    assert summary["callers_pct"]["run -> stdlib"] == 50.0
    (raw.parent / "empty.raw").write_text("")
    with pytest.raises(InvalidInput, match="no samples"):
        summarize(raw.parent / "empty.raw")


def test_bench_refuses_a_listener_source_tree_without_delayq_in_one_line(tmp_path: Path) -> None:
    env = clean_env(HOME=str(tmp_path / "home"), BENCH_LISTENER_FROM=str(tmp_path))
    done = run_cli("bench", "--pending", "0", "--burst", "10", env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no delayq package there" in done.stderr and "Traceback" not in done.stderr
