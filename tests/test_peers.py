"""benchmarks/peers: the figures and the table from sample results (fast), the harness's
process handling, and one small real run of a peer (slow).

`benchmarks.peers` is imported from the repository root, which pytest puts on sys.path
(tests/ is a package, so its parent is the root directory).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.peers import report
from benchmarks.peers.harness import process, tree_cpu_s


def _result(p50: float, p99: float, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "scheduled": 200,
        "fired": 200,
        "lost": 0,
        "duplicates": 0,
        "early": 0,
        "lateness_ms": {"p50": p50, "p90": p99, "p99": p99, "max": p99},
    }
    return base | overrides


def _report(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "date": "2026-11-24 12:00 UTC",
        "command": ".venv/bin/python benchmarks/peers/run.py",
        "machine": {
            "cpu": "AMD EPYC", "cores": 2, "platform": "Linux", "load_average_at_start": 0.1
        },
        "versions": {
            "python": "3.11.7",
            "node": "20.20.2",
            "redis": "7.0.15",
            "delayq": "0.2.0",
            "peers": {"celery": {"celery": "5.7.0", "kombu": "5.7.0"}},
        },
        "configurations": {"delayq": "delayq bench", "celery": "apply_async(eta=...)"},
        "workloads": [
            {"label": "200 over 4 s (50/s)", "timers": 200, "duration_s": 4.0, "pending": 0,
             "rate": 50, "results": results},
        ],
    }  # fmt: skip


def test_lateness_is_fired_minus_due_and_a_job_run_twice_counts_once_as_fired() -> None:
    rows = [("m0", 10.0, 10.002), ("m1", 11.0, 11.010), ("m1", 11.0, 11.5), ("m2", 12.0, 11.9)]

    figures = report.summarise(4, rows)

    assert figures["fired"] == 3
    assert figures["lost"] == 1  # m3 never ran
    assert figures["duplicates"] == 1
    assert figures["early"] == 1  # m2 ran 100 ms before its due time
    assert figures["lateness_ms"]["max"] == pytest.approx(500.0)
    assert figures["lateness_ms"]["p50"] == pytest.approx(10.0, abs=0.01)


def test_percentiles_of_a_hundred_timers_pick_the_ranks_delayq_bench_picks() -> None:
    rows = [(f"m{i}", 0.0, (i + 1) / 1000) for i in range(100)]  # 1 .. 100 ms late

    lateness = report.summarise(100, rows)["lateness_ms"]

    assert lateness == {"p50": 51.0, "p90": 91.0, "p99": 100.0, "max": 100.0}


def test_no_row_at_all_means_every_timer_lost_and_no_lateness() -> None:
    figures = report.summarise(20, [])

    assert (figures["fired"], figures["lost"], figures["lateness_ms"]) == (0, 20, {})


def test_the_issues_workloads_parse_with_their_rates() -> None:
    workloads = report.parse_workloads(report.DEFAULT_WORKLOADS)

    assert [(w.timers, w.rate, w.pending) for w in workloads] == [
        (200, 50, 0),
        (2000, 500, 0),
        (2000, 500, 200_000),
    ]
    assert workloads[2].label == "2,000 over 4 s (500/s), 200,000 pending"


@pytest.mark.parametrize("text", ["200:4", "a:4:0", "0:4:0", "200:0:0", "10:3:0", "20:1:-1"])
def test_a_workload_that_delayq_bench_could_not_run_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="workload"):
        report.parse_workloads(text)


def test_ratio_is_the_peers_p99_over_delayqs() -> None:
    assert report.ratio(99.0, 1.1) == "90x"
    assert report.ratio(3.0, 5.0) == "0.6x"
    assert report.ratio(3.0, 0.0) == "n/a"


def test_table_gives_each_peer_its_ratio_and_names_the_best_peer() -> None:
    table = report.render_table(
        _report(
            {
                "delayq": _result(1.4, 5.0),
                "arq": _result(264, 500),
                "celery": _result(2.0, 3.0),
                "bullmq": _result(47, 99),
            }
        )
    )

    lines = table.splitlines()
    assert lines[0] == (
        "| workload | delayq | arq | Celery | BullMQ | best peer p99 / delayq p99 |"
    )
    assert lines[2] == (
        "| 200 over 4 s (50/s) | 1.4 / **5.0** | 264 / **500** (100x) | 2.0 / **3.0** (0.6x)"
        " | 47.0 / **99.0** (20x) | Celery 3.0 / 5.0 = **0.6x** |"
    )


def test_a_peer_that_lost_timers_is_not_the_best_and_failures_show_in_their_cell() -> None:
    table = report.render_table(
        _report(
            {
                "delayq": _result(1.0, 2.0),
                "rq": _result(-200, 1.0, lost=5, fired=195, early=40),
                "celery": {"error": "celery worker exited: boom"},
                "bullmq": _result(50, 100),
            }
        )
    )

    row = table.splitlines()[2]
    assert "-200 / **1.0** (5 lost, 40 early)" in row
    assert "failed: celery worker exited: boom" in row
    assert row.endswith("| BullMQ 100 / 2.0 = **50x** |")


def test_of_repeated_runs_the_table_takes_the_one_with_the_median_p99() -> None:
    runs = [_result(1.0, 9.0), _result(0.5, 2.0), _result(0.7, 4.0)]

    chosen = report.median_run(runs)

    assert chosen["lateness_ms"]["p99"] == 4.0
    assert [r["lateness_ms"]["p99"] for r in chosen["runs"]] == [9.0, 2.0, 4.0]


def test_a_failed_or_lossy_run_ranks_worst_among_repeats() -> None:
    runs = [{"error": "worker exited"}, _result(0.5, 50.0, lost=3), _result(0.5, 2.0)]

    assert report.median_run(runs)["lateness_ms"]["p99"] == 50.0
    assert report.median_run(runs[:1]) == {"error": "worker exited"}


def test_markdown_names_machine_versions_and_each_systems_configuration() -> None:
    text = report.render_markdown(_report({"delayq": _result(1.0, 2.0)}))

    assert "AMD EPYC, 2 cores" in text
    assert "Redis 7.0.15" in text and "Celery 5.7.0 (kombu 5.7.0)" in text
    assert "- **Celery**: apply_async(eta=...)" in text
    assert "| 200 over 4 s (50/s) | 1.0 / **2.0** |" in text


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_process_and_its_children_stop_when_the_run_fails(tmp_path: Path) -> None:
    # A worker that forks (Celery's pool, RQ's scheduler) must not outlive a failed run.
    cmd = ["sh", "-c", "sleep 300 & sleep 300 & wait"]
    with (
        pytest.raises(RuntimeError, match="the run failed"),
        process(cmd, env=dict(os.environ), log_path=tmp_path / "log") as proc,
    ):
        deadline = time.monotonic() + 10
        while len(_children(proc.pid)) < 2:
            assert time.monotonic() < deadline, "the children never started"
            time.sleep(0.01)
        assert tree_cpu_s(proc.pid) >= 0
        raise RuntimeError("the run failed")

    deadline = time.monotonic() + 10
    while not _group_gone(proc.pid):
        assert time.monotonic() < deadline, "a child of the worker outlived it"
        time.sleep(0.05)
    assert proc.returncode == -signal.SIGTERM


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_arq_fires_every_timer_of_a_small_run_and_each_is_measured(tmp_path: Path) -> None:
    """The whole harness on one small workload: arq's virtualenv (made, or reused), a
    private redis-server, arq's worker, 20 timers over 1 s, the JSON and the table."""
    out = tmp_path / "peers.json"
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/peers/run.py",
            "--peers", "arq", "--workloads", "20:1:0", "--json-file", str(out),
            "--drain-timeout", "20",
        ],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(out.read_text())["workloads"][0]["results"]["arq"]
    assert measured["scheduled"] == measured["fired"] == 20
    assert (measured["lost"], measured["duplicates"]) == (0, 0)
    assert set(measured["lateness_ms"]) == {"p50", "p90", "p99", "max"}
    assert "| 20 over 1 s (20/s) |" in out.with_suffix(".md").read_text()
    assert "arq_peer.WorkerSettings" not in _command_lines()


def _command_lines() -> str:
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                continue
    return "\n".join(lines)
