"""What every Python peer shares, run inside the peer's own virtualenv (stdlib only).

- `record(job, due)`: a job's work. It takes its fired time first (`time.time()`), then
  writes one row into the run's SQLite file through this process's own connection.
- `pending_plan` / `measured_plan`: the due times, the same pattern as `delayq bench`
  (pending: a day ahead and later, one per 100 ms; measured: `--lead` seconds after the
  start of scheduling, the harness passes `delayq.bench.LEAD_S`, `--rate` a second).
- `main(load, schedule)`: the `load` and `schedule` subcommands each peer module offers;
  `schedule` prints one JSON line (t0, seconds spent enqueueing) for the harness.

The run's settings come from the environment the harness sets: PEER_REDIS_URL, PEER_DB,
PEER_READY_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

#: Pending jobs fall due a day ahead and later, one per 100 ms (as `delayq bench`).
PENDING_AHEAD_S = 86_400.0
PENDING_STEP_S = 0.1

Plan = list[tuple[str, float]]

_conn: sqlite3.Connection | None = None
_conn_pid = 0


def redis_url() -> str:
    return os.environ["PEER_REDIS_URL"]


def _connection() -> sqlite3.Connection:
    # One connection per process; a forked child (an RQ work horse) opens its own, as a
    # SQLite connection must not cross fork().
    global _conn, _conn_pid
    if _conn is None or _conn_pid != os.getpid():
        _conn = sqlite3.connect(os.environ["PEER_DB"], timeout=30, isolation_level=None)
        _conn.execute("PRAGMA busy_timeout=30000")
        _conn_pid = os.getpid()
    return _conn


def record(job: str, due: float) -> None:
    """The job's work: its fired time, then one INSERT committed on its own."""
    fired = time.time()
    # Autocommit: the INSERT is its own transaction.
    _connection().execute(
        "INSERT INTO fired (job, due, fired, pid) VALUES (?, ?, ?, ?)",
        (job, due, fired, os.getpid()),
    )


def mark_ready() -> None:
    """Tell the harness this worker process is up (a file per process)."""
    ready_dir = Path(os.environ["PEER_READY_DIR"])
    (ready_dir / f"ready-{os.getpid()}").write_text("ready\n")


def pending_plan(count: int, now: float) -> Plan:
    return [(f"p{j}", now + PENDING_AHEAD_S + PENDING_STEP_S * j) for j in range(count)]


def measured_plan(count: int, rate: float, lead_s: float, t0: float) -> Plan:
    return [(f"m{i}", t0 + lead_s + i / rate) for i in range(count)]


def main(load: Callable[[Plan], None], schedule: Callable[[Plan], None]) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("load").add_argument("--count", type=int, required=True)
    sched = sub.add_parser("schedule")
    sched.add_argument("--count", type=int, required=True)
    sched.add_argument("--rate", type=float, required=True)
    sched.add_argument("--lead", type=float, required=True)
    args = parser.parse_args()
    if args.command == "load":
        load(pending_plan(args.count, time.time()))
        return
    t0 = time.time()
    schedule(measured_plan(args.count, args.rate, args.lead, t0))
    print(json.dumps({"t0": t0, "enqueue_s": time.time() - t0}), flush=True)
