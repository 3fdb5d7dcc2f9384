"""delayq against arq, RQ, Celery and BullMQ on the same workloads, in one run.

    .venv/bin/python benchmarks/peers/run.py [--peers arq,rq,celery,bullmq,delayq]
        [--workloads 200:4:0,2000:4:0,2000:4:200000] [--json-file docs/bench/peers.json]

Each peer runs from its own environment, which this script makes (benchmarks/peers/.envs,
benchmarks/peers/bullmq/node_modules) and reuses while the pins match. Writes the JSON
and, beside it, the Markdown table (same name, .md), and prints the table. See
benchmarks/peers/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script: the repository root, so that `benchmarks.peers` is importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import delayq
from benchmarks.peers import envs
from benchmarks.peers.harness import Options, redis_version, run_delayq, run_peer
from benchmarks.peers.peers import PEERS
from benchmarks.peers.report import (
    DEFAULT_WORKLOADS,
    ORDER,
    Workload,
    median_run,
    parse_workloads,
    render_markdown,
)
from delayq.bench import LEAD_S, machine_info

ROOT = envs.HERE.parents[1]
DELAYQ_CONFIGURATION = (
    "`delayq bench` (the real `delayq listen` as a subprocess, defaults; its own "
    "redis-server; SQLite): lateness = the outcome's fired_at - due_at, fired_at taken in "
    "the transaction that cancels the order"
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--peers", default=",".join(ORDER), help="systems to run, comma-separated: %(default)s"
    )
    parser.add_argument(
        "--workloads",
        default=DEFAULT_WORKLOADS,
        help="TIMERS:DURATION_S:PENDING, comma-separated (default: %(default)s)",
    )
    parser.add_argument("--json-file", type=Path, default=ROOT / "docs/bench/peers.json")
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="seconds to wait past the last due time before counting a timer lost",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each system on each workload; the table shows the run with the median p99",
    )
    parser.add_argument("--envs-dir", type=Path, default=envs.DEFAULT_ENVS_DIR)
    args = parser.parse_args(argv)
    args.systems = [s.strip() for s in args.peers.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in ORDER]
    if unknown or not args.systems:
        parser.error(f"--peers: choose among {', '.join(ORDER)}")
    try:
        args.workload_list = parse_workloads(args.workloads)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.drain_timeout > 0:
        parser.error("--drain-timeout must be > 0")
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    return args


def _machine() -> dict[str, Any]:
    info = machine_info()
    return {
        "cpu": info["cpu"],
        "cores": info["cpus"],
        "platform": info["platform"],
        "load_average_at_start": round(os.getloadavg()[0], 2),
    }


def _node_version() -> str:
    out = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip().lstrip("v")


def log(text: str) -> None:
    """Progress, on stderr (stdout is the table)."""
    print(text, file=sys.stderr, flush=True)


def _stop(signum: int, _: object) -> None:
    # SIGTERM would end Python without running `finally`: unwind instead, so every
    # process and server the run started is stopped (harness.process).
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    args = _parse(given)
    signal.signal(signal.SIGTERM, _stop)
    opts = Options(envs_dir=args.envs_dir, drain_timeout_s=args.drain_timeout, log=log)
    peers = [PEERS[s] for s in args.systems if s != "delayq"]
    # Environments first: a build (npm compiles better-sqlite3) never overlaps a run.
    peer_versions: dict[str, dict[str, str]] = {}
    for peer in peers:
        log(f"environment: {peer.name}")
        try:
            where = peer.environment(args.envs_dir)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            print(f"error: {peer.name}'s environment: {exc}", file=sys.stderr)
            return 1
        installed = envs.node_versions() if peer.is_node else envs.python_versions(where)
        peer_versions[peer.name] = {p: installed[p] for p in peer.packages if p in installed}
    report: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join([".venv/bin/python", "benchmarks/peers/run.py", *given]),
        "machine": _machine(),
        "versions": {
            "python": platform.python_version(),
            "node": _node_version() if any(p.is_node for p in peers) else None,
            "redis": redis_version(),
            "delayq": delayq.__version__,
            "peers": peer_versions,
        },
        "settings": {
            "lead_s": LEAD_S,
            "drain_timeout_s": args.drain_timeout,
            "repeat": args.repeat,
            "database": "SQLite",
        },
        "configurations": {
            s: DELAYQ_CONFIGURATION if s == "delayq" else PEERS[s].configuration
            for s in args.systems
        },
        "workloads": [],
    }
    for w in args.workload_list:
        entry: dict[str, Any] = {
            "label": w.label,
            "timers": w.timers,
            "duration_s": w.duration_s,
            "rate": w.rate,
            "pending": w.pending,
            "results": {},
        }
        report["workloads"].append(entry)
        # Repeats interleave the systems, so a slow spell of the machine hits them alike.
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in args.systems}
        for attempt in range(1, args.repeat + 1):
            for system in args.systems:
                log(f"{w.label}: {system}" + (f", run {attempt}" if args.repeat > 1 else ""))
                runs[system].append(_run_one(system, w, opts))
                log(f"  {json.dumps(runs[system][-1])}")
        entry["results"] = {s: median_run(r) for s, r in runs.items()}
    args.json_file.parent.mkdir(parents=True, exist_ok=True)
    args.json_file.write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    table_file = args.json_file.with_suffix(".md")
    table_file.write_text(markdown)
    print(markdown)
    log(f"wrote {args.json_file} and {table_file}")
    return 0


def _run_one(system: str, workload: Workload, opts: Options) -> dict[str, Any]:
    """One system's figures, or what stopped it (the other systems still run)."""
    try:
        if system == "delayq":
            return run_delayq(workload, opts)
        return run_peer(PEERS[system], workload, opts)
    except (RuntimeError, TimeoutError, OSError, ValueError) as exc:
        opts.log(f"  {system} failed: {exc}")
        return {"error": str(exc).splitlines()[0][:200]}


if __name__ == "__main__":
    sys.exit(main())
