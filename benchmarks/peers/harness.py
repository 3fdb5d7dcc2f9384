"""One run of one system on one workload, with every process it starts stopped after.

A peer's run: a private redis-server (free port on 127.0.0.1, temporary directory, no
persistence), a SQLite file with the `fired` table, the peer's worker as a subprocess
(its own process group, so its children stop with it), the pending jobs pre-loaded, then
the measured jobs scheduled by the peer's own client in its own environment, and the
rows the jobs wrote read back once every job fired or the deadline passed.

delayq's run is the real `delayq bench ... --json` (which starts its own redis-server,
SQLite file and `delayq listen`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from benchmarks.peers.peers import JOBS_DIR, Peer
from benchmarks.peers.report import Workload, summarise
from delayq.bench import LEAD_S

REDIS_SERVER = "/usr/bin/redis-server"
#: Bounds: a worker's start, a pre-load (200,000 jobs, one by one for some peers), a peer
#: taking the pre-loaded jobs in (Celery), scheduling the measured jobs.
START_TIMEOUT_S = 60.0
LOAD_TIMEOUT_S = 900.0
SETTLE_TIMEOUT_S = 900.0
SCHEDULE_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
POLL_S = 0.1


@dataclass(frozen=True)
class Options:
    envs_dir: Path
    #: Seconds to wait for the measured jobs past the last one's due time.
    drain_timeout_s: float
    log: Callable[[str], None]


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(POLL_S)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stop_group(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to the process's group (it leads one of its own), SIGKILL if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout_s)
    # Children (a Celery pool, RQ's scheduler) may outlive their parent: kill what is left.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout_s)


@contextlib.contextmanager
def process(
    cmd: list[str], *, env: dict[str, str], log_path: Path, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A process in a group of its own, output to `log_path`, stopped on the way out."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop_group(proc)


@contextlib.contextmanager
def private_redis(tmp: Path) -> Iterator[str]:
    """A redis-server of its own: free port on 127.0.0.1, `tmp` as its directory."""
    port = free_port()
    cmd = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp)]
    cmd += ["--save", "", "--appendonly", "no", "--logfile", str(tmp / "redis.log")]
    url = f"redis://127.0.0.1:{port}/0"
    with process(cmd, env=dict(os.environ), log_path=tmp / "redis.out"):
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        try:
            wait_for(lambda: _pings(client), START_TIMEOUT_S, f"redis-server on port {port}")
        finally:
            client.close()
        yield url


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def redis_version() -> str:
    out = subprocess.run(
        [REDIS_SERVER, "--version"], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    # "Redis server v=7.0.15 sha=..."
    return out.split("v=", 1)[1].split()[0]


def make_database(path: Path) -> None:
    """The jobs' table; WAL, as delayq's SQLite engine uses."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE fired (job TEXT NOT NULL, due REAL, fired REAL, pid INTEGER)")
        conn.commit()


def _read(path: Path, sql: str) -> list[Any]:
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
        return conn.execute(sql).fetchall()


def measured_rows(path: Path) -> list[tuple[str, float, float]]:
    return [(r[0], r[1], r[2]) for r in _read(path, "SELECT job, due, fired FROM fired")
            if r[0].startswith("m")]  # fmt: skip


def fired_count(path: Path) -> int:
    rows = _read(path, "SELECT COUNT(DISTINCT job) FROM fired WHERE job LIKE 'm%'")
    return int(rows[0][0])


def tree_cpu_s(root: int) -> float:
    """CPU seconds of `root` and its living descendants, plus their reaped children's."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        times[pid] = sum(int(f) for f in fields[11:15]) / tick
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += times.get(pid, 0.0)
        stack += [child for child, parent in parents.items() if parent == pid]
    return total


def _last_error(log: Path) -> str:
    """The last unindented lines of a log (an error's message, not its stack)."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return " | ".join([ln for ln in lines if not ln[0].isspace()][-2:])[-300:]


def _redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _driver(
    peer: Peer, where: Path, env: dict[str, str], args: list[str], timeout_s: float, log: Path
) -> str:
    with log.open("ab") as err:
        proc = subprocess.Popen(
            [*peer.driver(where), *args],
            env=env,
            cwd=JOBS_DIR,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{peer.name} {args[0]} took over {timeout_s:.0f} s") from None
        finally:
            stop_group(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"{peer.name} {args[0]} exited {proc.returncode}: {_last_error(log)}")
    return out.decode()


def run_peer(peer: Peer, workload: Workload, opts: Options) -> dict[str, Any]:
    """One peer on one workload: its figures (see `report.summarise`) and timings."""
    where = peer.environment(opts.envs_dir)
    with (
        tempfile.TemporaryDirectory(prefix=f"delayq-peers-{peer.name}-") as tmp_name,
        contextlib.ExitStack() as stack,
    ):
        tmp = Path(tmp_name)
        url = stack.enter_context(private_redis(tmp))
        client = redis.Redis.from_url(url)
        stack.callback(client.close)
        db = tmp / "fired.db"
        make_database(db)
        ready_dir = tmp / "ready"
        ready_dir.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PEER_", "PYTHON"))}
        env |= {"PEER_REDIS_URL": url, "PEER_DB": str(db), "PEER_READY_DIR": str(ready_dir)}
        env["PYTHONPATH"] = str(JOBS_DIR)
        worker_log = tmp / "worker.log"
        worker = stack.enter_context(
            process(peer.worker(where, url), env=env, log_path=worker_log, cwd=JOBS_DIR)
        )

        def started() -> bool:
            if worker.poll() is not None:
                raise RuntimeError(f"{peer.name} worker exited: {_last_error(worker_log)}")
            return peer.ready(client, ready_dir)

        wait_for(started, START_TIMEOUT_S, f"the {peer.name} worker to start")
        driver_log = tmp / "driver.log"
        began = time.monotonic()
        if workload.pending:
            opts.log(f"  {peer.name}: pre-loading {workload.pending:,} pending jobs")
            count = ["--count", str(workload.pending)]
            _driver(peer, where, env, ["load", *count], LOAD_TIMEOUT_S, driver_log)
        loaded = time.monotonic()
        wait_for(
            lambda: peer.settled(client, workload.pending),
            SETTLE_TIMEOUT_S,
            f"{peer.name} to take in the pending jobs",
        )
        settled = time.monotonic()

        cpu0, redis_cpu0, wall0 = tree_cpu_s(worker.pid), _redis_cpu_s(client), time.monotonic()
        args = ["schedule", "--count", str(workload.timers), "--rate", str(workload.rate)]
        args += ["--lead", str(LEAD_S)]
        plan = json.loads(_driver(peer, where, env, args, SCHEDULE_TIMEOUT_S, driver_log))
        last_due = plan["t0"] + LEAD_S + (workload.timers - 1) / workload.rate
        deadline_s = max(0.0, last_due - time.time()) + opts.drain_timeout_s
        with contextlib.suppress(TimeoutError):
            wait_for(
                lambda: fired_count(db) >= workload.timers,
                deadline_s,
                f"{peer.name}'s measured jobs",
            )
        wall = time.monotonic() - wall0
        cpu, redis_cpu = tree_cpu_s(worker.pid) - cpu0, _redis_cpu_s(client) - redis_cpu0
        figures = summarise(workload.timers, measured_rows(db))
    return figures | {
        "enqueue_s": round(plan["enqueue_s"], 3),
        "preload_s": round(loaded - began, 1),
        "settle_s": round(settled - loaded, 1),
        "workers_cpu_pct": round(cpu / wall * 100, 1),
        "redis_cpu_pct": round(redis_cpu / wall * 100, 1),
    }


def run_delayq(workload: Workload, opts: Options) -> dict[str, Any]:
    """The real `delayq bench` on the same workload (SQLite, its own redis-server)."""
    cmd = [sys.executable, "-m", "delayq.cli", "bench", "--json"]
    cmd += ["--pending", str(workload.pending), "--rate", str(workload.rate)]
    cmd += ["--duration", f"{workload.duration_s:g}"]
    cmd += ["--drain-timeout", f"{opts.drain_timeout_s:g}"]
    timeout_s = LOAD_TIMEOUT_S + workload.duration_s + opts.drain_timeout_s + 120
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
            start_new_session=True,
        )  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"delayq bench took over {timeout_s:.0f} s") from None
        finally:
            stop_group(proc, timeout_s=30)
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"delayq bench exited {proc.returncode}: {' '.join(tail)}")
    run = json.loads(out)["runs"][0]
    keys = ("scheduled", "fired", "lost", "duplicates", "early", "lateness_ms")
    return {k: run[k] for k in keys} | {
        "workers_cpu_pct": run["listener_cpu_pct"],
        "redis_version": run["redis_version"],
        "schedule_per_s": run["schedule_per_s"],
    }
