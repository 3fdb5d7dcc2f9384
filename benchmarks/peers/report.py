"""The pure parts of the peers' benchmark: workloads, figures from fired rows, the table.

Nothing here starts a process or touches a file, so all of it is tested without servers
(tests/test_peers.py).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from delayq.bench import percentiles

#: The issue's three workloads: timers:duration_s:pending.
DEFAULT_WORKLOADS = "200:4:0,2000:4:0,2000:4:200000"
#: Column order of the table (delayq first, then the peers).
ORDER = ("delayq", "arq", "rq", "celery", "bullmq")
LABELS = {"delayq": "delayq", "arq": "arq", "rq": "RQ", "celery": "Celery", "bullmq": "BullMQ"}


@dataclass(frozen=True)
class Workload:
    timers: int
    duration_s: float
    pending: int

    @property
    def rate(self) -> int:
        """Timers falling due per second (`delayq bench --rate`)."""
        return round(self.timers / self.duration_s)

    @property
    def label(self) -> str:
        text = f"{self.timers:,} over {self.duration_s:g} s ({self.rate:,}/s)"
        return text + (f", {self.pending:,} pending" if self.pending else "")


def parse_workloads(text: str) -> list[Workload]:
    """`TIMERS:DURATION_S:PENDING[,...]` -> workloads; ValueError with one clear line."""
    workloads = []
    for item in (part.strip() for part in text.split(",")):
        fields = item.split(":")
        if len(fields) != 3:
            raise ValueError(f"workload {item!r}: expected TIMERS:DURATION_S:PENDING")
        try:
            w = Workload(int(fields[0]), float(fields[1]), int(fields[2]))
        except ValueError:
            raise ValueError(f"workload {item!r}: numbers expected") from None
        if w.timers < 1 or not (w.duration_s > 0 and math.isfinite(w.duration_s)):
            raise ValueError(f"workload {item!r}: timers and duration must be > 0")
        if w.pending < 0 or w.rate < 1 or w.rate * w.duration_s != w.timers:
            raise ValueError(
                f"workload {item!r}: pending >= 0, and TIMERS / DURATION_S a whole number "
                "of timers a second (delayq bench takes --rate and --duration)"
            )
        workloads.append(w)
    return workloads


def summarise(expected: int, rows: Iterable[tuple[str, float, float]]) -> dict[str, Any]:
    """Figures from the measured jobs' rows (job, due s, fired s), as `delayq bench` gives
    them: lateness = fired - due in ms over every row (a job run twice counts twice), lost =
    expected jobs with no row, duplicates = rows beyond the first of a job."""
    rows = list(rows)
    counts = Counter(job for job, _, _ in rows)
    late = [(fired - due) * 1000 for _, due, fired in rows]
    return {
        "scheduled": expected,
        "fired": len(counts),
        "lost": expected - len(counts),
        "duplicates": len(rows) - len(counts),
        "early": sum(1 for ms in late if ms < 0),
        "lateness_ms": percentiles(late),
    }


def median_run(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Of repeated runs, the one whose p99 is the median (the lower middle for an even
    count; a run that lost timers ranks below every complete run, by how many it lost,
    and a failed run below all), with every run's figures under `runs` when there is more
    than one."""

    def rank(run: Mapping[str, Any]) -> tuple[int, float, float]:
        if _complete(run):
            return (0, 0, run["lateness_ms"]["p99"])
        if "error" in run or not run["lateness_ms"]:
            return (2, 0, 0)
        return (1, run["lost"], run["lateness_ms"]["p99"])

    ordered = sorted(runs, key=rank)
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    if len(runs) > 1:
        chosen["runs"] = [dict(r) for r in runs]
    return chosen


def _num(ms: float) -> str:
    if abs(ms) >= 100:
        return f"{ms:,.0f}"
    return f"{ms:.1f}"


def ratio(peer_p99: float, delayq_p99: float) -> str:
    """How many times delayq's p99 the peer's is ("12x", "0.6x")."""
    if delayq_p99 <= 0:
        return "n/a"
    r = peer_p99 / delayq_p99
    return f"{r:,.0f}x" if r >= 10 else f"{r:.1f}x"


def _complete(result: Mapping[str, Any] | None) -> TypeGuard[Mapping[str, Any]]:
    """Every timer fired, and there are figures to compare."""
    if not result or "error" in result:
        return False
    return result["lost"] == 0 and bool(result["lateness_ms"])


def cell(result: Mapping[str, Any] | None, delayq_p99: float | None) -> str:
    """One system's `p50 / p99` for one workload, with what went wrong and the ratio."""
    if result is None:
        return "-"
    if "error" in result:
        return f"failed: {result['error']}"
    lat = result["lateness_ms"]
    if not lat:
        return f"none of {result['scheduled']:,} fired"
    text = f"{_num(lat['p50'])} / **{_num(lat['p99'])}**"
    notes = []
    if result["lost"]:
        notes.append(f"{result['lost']:,} lost")
    if result["duplicates"]:
        notes.append(f"{result['duplicates']:,} twice")
    if result["early"]:
        notes.append(f"{result['early']:,} early")
    if delayq_p99 is not None and not result["lost"]:
        notes.append(ratio(lat["p99"], delayq_p99))
    return text + (f" ({', '.join(notes)})" if notes else "")


def render_table(report: Mapping[str, Any]) -> str:
    """The Markdown table: a row per workload, delayq's and each peer's p50 / p99 (ms),
    each peer's p99 as a multiple of delayq's, and the best peer's (lowest p99 among
    the peers that fired every timer) against delayq's."""
    systems = [s for s in ORDER if any(s in w["results"] for w in report["workloads"])]
    peers = [s for s in systems if s != "delayq"]
    head = ["workload", *(LABELS[s] for s in systems)]
    if "delayq" in systems and peers:
        head.append("best peer p99 / delayq p99")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w in report["workloads"]:
        results: Mapping[str, Any] = w["results"]
        mine = results.get("delayq")
        delayq_p99 = mine["lateness_ms"]["p99"] if _complete(mine) else None
        row = [w["label"]]
        row += [cell(results.get(s), None if s == "delayq" else delayq_p99) for s in systems]
        if "delayq" in systems and peers:
            row.append(_best(results, peers, delayq_p99))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _best(results: Mapping[str, Any], peers: Sequence[str], delayq_p99: float | None) -> str:
    complete = [(results[p]["lateness_ms"]["p99"], p) for p in peers if _complete(results.get(p))]
    if not complete or delayq_p99 is None:
        return "n/a"
    p99, best = min(complete)
    return f"{LABELS[best]} {_num(p99)} / {_num(delayq_p99)} = **{ratio(p99, delayq_p99)}**"


def _versions(label: str, packages: Mapping[str, str]) -> str:
    """ "Celery 5.7.0 (kombu 5.7.0, redis 8.1.0)": the peer's own package first
    (`peers.Peer.packages`), what it runs on in brackets."""
    own, *rest = packages.items()
    return f"{label} {own[1]}" + (
        f" ({', '.join(f'{k} {ver}' for k, ver in rest)})" if rest else ""
    )


def render_markdown(report: Mapping[str, Any]) -> str:
    """The table with what it was measured on and how each system was configured."""
    m = report["machine"]
    v = report["versions"]
    peer_versions = ", ".join(
        _versions(LABELS.get(name, name), pkgs) for name, pkgs in v["peers"].items() if pkgs
    )
    lines = [
        f"# delayq and its peers, {report['date']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; load average "
        f"{m['load_average_at_start']} at the start. Python {v['python']}, "
        + (f"Node {v['node']}, " if v.get("node") else "")
        + f"Redis {v['redis']}, delayq {v['delayq']}; {peer_versions}.",
        "",
        "Lateness (fired - due) p50 / **p99** in ms; each peer's p99 as a multiple of "
        "delayq's in brackets (above 1x: delayq is ahead). Every timer's work is one "
        "write into SQLite."
        + (
            f" Each cell is the run with the median p99 of {repeat} runs (all in the JSON)."
            if (repeat := report.get("settings", {}).get("repeat", 1)) > 1
            else ""
        ),
        "",
        render_table(report),
    ]
    configs = report.get("configurations", {})
    if configs:
        lines.append("How each system ran:\n")
        lines += [f"- **{LABELS.get(s, s)}**: {text}" for s, text in configs.items()]
        lines.append("")
    return "\n".join(lines)
