#!/usr/bin/env bash
# Every performance target of issue 13 and the peers, measured in one run on this machine
# (about 50 minutes on 2 cores; keep the machine otherwise idle). Writes docs/bench/*.json
# (and .png) that BENCHMARKS.md and README.md quote; tests/test_readme_figures.py checks
# the README's numbers against them.
#
#   bash scripts/bench-targets.sh            # everything
#   ONLY="low burst" bash scripts/bench-targets.sh   # some steps: peers low sustained burst
#                                             # scale schedule cpu
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=docs/bench
mkdir -p "$out"
MARIADB=${MARIADB:-mysql+pymysql://root@127.0.0.1:3306/test}
ONLY=${ONLY:-peers low sustained burst scale schedule cpu}
PY=.venv/bin/python
want() { [[ " $ONLY " == *" $1 "* ]]; }
bench() { name=$1; shift; echo "== $name: delayq bench $*"; .venv/bin/delayq bench --json-file "$out/$name.json" "$@"; }

echo "machine: $(nproc) cores, $(uptime)"

if want peers; then
  # arq, RQ, Celery, BullMQ and delayq (SQLite) on the issue's three workloads.
  # Each system 3 times, interleaved; the table shows each one's run with the median p99.
  $PY benchmarks/peers/run.py --repeat "${PEERS_REPEAT:-3}" --json-file "$out/peers.json"
fi
if want low; then
  # 50 timers a second for a minute: p99 <= 2 ms, never early.
  bench target-50-per-s-sqlite --pending 0 --rate 50 --duration 60 --plot "$out/target-50-per-s-sqlite.png"
  bench target-50-per-s-mariadb --pending 0 --rate 50 --duration 60 --database-url "$MARIADB"
fi
if want sustained; then
  # 10,000 a second for 60 s with 1,000,000 pending, MariaDB: p99 <= 10 ms, max <= 50 ms.
  bench target-10k-per-s-1m-mariadb --pending 1000000 --rate 10000 --duration 60 \
    --database-url "$MARIADB" --plot "$out/target-10k-per-s-1m-mariadb.png"
fi
if want burst; then
  # 100,000 due at one instant, MariaDB: all committed within 4 s.
  bench target-burst-100k-mariadb --pending 0 --burst 100000 --database-url "$MARIADB" \
    --plot "$out/target-burst-100k-mariadb.png"
fi
if want scale; then
  # 10,000,000 pending: <= 200 B a timer with stock Redis settings, and claim lateness
  # as with 1,000,000 (the same 1,000/s for 30 s on each). At 10M the index has 131,072
  # shards, as `delayq reshard` makes it (what `delayq check` says to run at that size).
  bench target-1m-pending-1k-mariadb --pending 1000000 --rate 1000 --duration 30 --database-url "$MARIADB"
  bench target-10m-pending-1k-mariadb --pending 10000000 --rate 1000 --duration 30 \
    --database-url "$MARIADB" --shards "${SHARDS_10M:-131072}"
fi
if want schedule; then
  # schedule_many: >= 150,000 timers a second.
  $PY benchmarks/schedule_rate.py --timers 1000000 --json-file "$out/schedule-rate.json"
fi
if want cpu; then
  # Listener CPU per 1,000 timers/s, before (the listener as of BEFORE, the last commit
  # before issue 13's changes) and after, on the same bench, each sampled with py-spy for
  # the measured window. DELAYQ_BENCH_LISTENER_FROM runs the listener from BEFORE's tree.
  BEFORE=${BEFORE:-3797b73}
  wt=$(mktemp -d /tmp/delayq-before-XXXXXX)
  trap 'git worktree remove --force "$wt" >/dev/null 2>&1 || true' EXIT
  git worktree add --detach "$wt" "$BEFORE" >/dev/null
  for when in before after; do
    from=$([ "$when" = before ] && echo "$wt" || echo "")
    echo "== cpu-$when: delayq bench, listener from ${from:-this tree}"
    DELAYQ_BENCH_LISTENER_FROM=$from .venv/bin/delayq bench --pending 1000000 --rate 1000 \
      --duration 30 --database-url "$MARIADB" --json-file "$out/cpu-1k-$when.json" \
      --profile "$out/cpu-1k-$when.raw"
    gzip -f "$out/cpu-1k-$when.raw"  # py-spy's stacks, for a flame graph (speedscope)
  done
fi
echo "done: $(uptime)"
