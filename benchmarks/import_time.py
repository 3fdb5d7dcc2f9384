"""How long `import delayq` takes an order service, and that it never loads SQLAlchemy.

Each run is a fresh interpreter (this one's, so this virtualenv's delayq) that times
`import delayq` with perf_counter and reports whether SQLAlchemy ended up in sys.modules;
one run first warms the OS's file cache. Written to --json-file (README.md quotes it):

    .venv/bin/python benchmarks/import_time.py --json-file docs/bench/import-time.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import delayq
took = time.perf_counter() - t0
print(json.dumps({"import_s": took, "sqlalchemy": "sqlalchemy" in sys.modules,
                  "version": delayq.__version__}))
"""


def one_import() -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], check=True, capture_output=True, text=True
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def measure(repeat: int) -> dict[str, Any]:
    one_import()  # warm the file cache: the figure is a service's restart, not a cold boot
    runs = [one_import() for _ in range(repeat)]
    times = sorted(r["import_s"] for r in runs)
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "delayq_version": runs[0]["version"],
        "repeat": repeat,
        "import_s": {
            "median": round(statistics.median(times), 4),
            "min": round(times[0], 4),
            "max": round(times[-1], 4),
        },
        "imports_sqlalchemy": any(r["sqlalchemy"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20, help="fresh interpreters timed")
    parser.add_argument("--json-file", type=Path, help="write the figures here")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    report = measure(args.repeat)
    s = report["import_s"]
    print(
        f"import delayq: median {s['median']:.3f} s (min {s['min']:.3f}, max {s['max']:.3f}) "
        f"over {args.repeat} runs; SQLAlchemy imported: {report['imports_sqlalchemy']}"
    )
    if args.json_file:
        args.json_file.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_file}")


if __name__ == "__main__":
    main()
