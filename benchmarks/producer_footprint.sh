#!/usr/bin/env bash
# What `pip install delayq` brings into an order service, and what `import delayq` costs:
# packages installed, site-packages size, and import time (best of 7 wall times, and
# python -X importtime's cumulative figure), for a git ref (default: the last release
# before the producer/listener split, f224bbd) and for the working tree.
#   bash benchmarks/producer_footprint.sh [REF]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ref=${1:-f224bbd}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/before" "$work/after"
git archive "$ref" | tar -x -C "$work/before"
git ls-files -co --exclude-standard | grep -v '^\.venv' | tar -cf - -T - | tar -x -C "$work/after"
for v in before after; do
    python3 -m venv "$work/venv_$v"
    "$work/venv_$v/bin/pip" install -q --disable-pip-version-check "$work/$v" >/dev/null 2>&1
    n=$("$work/venv_$v/bin/pip" list --format=freeze 2>/dev/null | grep -v -E '^(pip|setuptools)==' | wc -l)
    size=$(du -sm "$work/venv_$v/lib/"python3*/site-packages | cut -f1)
    best=999
    for _ in 1 2 3 4 5 6 7; do
        t=$({ /usr/bin/time -f %e "$work/venv_$v/bin/python" -c 'import delayq'; } 2>&1)
        best=$(python3 -c "print(min($best, $t))")
    done
    cumulative=$("$work/venv_$v/bin/python" -X importtime -c 'import delayq' 2>&1 | grep -E '\| delayq$' | awk -F'|' '{print $2}' | tr -d ' ')
    echo "$v ($([ $v = before ] && echo "$ref" || echo 'working tree')): packages=$n site-packages=${size}MB import_delayq=${cumulative}us (importtime) best_wall=${best}s"
done
