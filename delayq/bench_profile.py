"""`delayq bench --profile FILE`: where the listener's CPU goes, sampled by py-spy.

py-spy attaches to the running `delayq listen` for the measured window only (not the
pre-load), samples the thread holding the GIL (`--gil`: the listener's Python work; time
spent waiting on a socket or a lock is not counted) without pausing the process
(`--nonblocking`, so sampling does not add lateness), and writes the stacks it saw in
py-spy's "raw" (collapsed) format to FILE. `summarize` then tells the share of samples:

* by thread (`delayq-claimer`, `delayq-applier-0`, `delayq-subscriber`, ...);
* by *where* the innermost frame is: a library (redis-py, SQLAlchemy, PyMySQL, ...),
  delayq's own code, or the standard library;
* by the innermost delayq function and that library, which says who asked for the work.

Open FILE with https://www.speedscope.app or flamegraph.pl to see the whole picture.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from delayq.errors import InvalidInput

#: Samples a second: enough for a 30 s window, cheap for py-spy's own process.
RATE_HZ = 250
#: Libraries named in the summary; any other frame counts as the standard library's.
LIBRARIES = (
    "sqlalchemy",
    "pymysql",
    "psycopg",
    "redis",
    "hiredis",
    "httpx",
    "httpcore",
    "prometheus_client",
    "pythonjsonlogger",
    "delayq",
)
_FRAME_FILE = re.compile(r"\(([^():]+)(?::\d+)?\)$")


def py_spy() -> str:
    """The py-spy binary; one clear line when it is missing."""
    # pip puts it next to the interpreter, which need not be on PATH (.venv/bin).
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if found is None:
        raise InvalidInput("--profile needs py-spy: pip install 'delayq[bench]'")
    return found


@contextlib.contextmanager
def sampling(pid: int, out: Path) -> Iterator[None]:
    """py-spy records `pid` while the block runs, then writes `out`."""
    proc = subprocess.Popen(
        [
            py_spy(),
            "record",
            "--pid",
            str(pid),
            "--gil",
            "--threads",
            "--nonblocking",
            "--rate",
            str(RATE_HZ),
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield
    finally:
        # SIGINT: py-spy stops sampling and writes what it has.
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            err = b""
    if not out.exists():
        last = (err or b"").decode(errors="replace").strip().splitlines()
        raise InvalidInput(f"py-spy wrote no profile: {last[-1] if last else 'no output'}")


def _where(frame: str) -> str:
    """The library a frame's file belongs to (py-spy names files relative to sys.path)."""
    m = _FRAME_FILE.search(frame)
    path = m.group(1) if m else frame
    top = path.split("/", 1)[0].split(".", 1)[0]
    return top if top in LIBRARIES else "stdlib"


def _thread(frame: str) -> str:
    """`thread (0x7f..): delayq-applier-0` -> `delayq-applier-0`."""
    return frame.split(": ", 1)[1] if ": " in frame else frame


def summarize(raw: Path, top: int = 15) -> dict[str, Any]:
    """Shares of the samples in a py-spy raw profile (see the module docstring)."""
    threads: Counter[str] = Counter()
    places: Counter[str] = Counter()
    callers: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        threads[_thread(frames[0])] += n
        where = _where(frames[-1])
        places[where] += n
        own = [f for f in frames[1:] if _where(f) == "delayq"]
        caller = own[-1].rsplit(" (", 1)[0] if own else "(outside delayq)"
        callers[f"{caller} -> {where}"] += n
    if not total:
        raise InvalidInput(f"{raw}: no samples (did the listener run?)")

    def shares(c: Counter[str], limit: int | None = None) -> dict[str, float]:
        return {k: round(v / total * 100, 1) for k, v in c.most_common(limit)}

    return {
        "samples": total,
        "rate_hz": RATE_HZ,
        "threads_pct": shares(threads),
        "where_pct": shares(places),
        "callers_pct": shares(callers, top),
    }


def describe(summary: dict[str, Any]) -> list[str]:
    """The summary as a few lines for the terminal."""
    lines = [f"py-spy: {summary['samples']:,} samples of the GIL holder at {summary['rate_hz']} Hz"]
    for title, key in (
        ("by thread", "threads_pct"),
        ("by library", "where_pct"),
        ("by caller", "callers_pct"),
    ):
        parts = ", ".join(f"{k} {v:.1f}%" for k, v in summary[key].items())
        lines.append(f"  {title}: {parts}")
    return lines
