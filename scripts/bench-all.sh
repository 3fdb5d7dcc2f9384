#!/usr/bin/env bash
# Reproduces every figure in BENCHMARKS.md (about 16 minutes on a 2-core machine).
# MariaDB and PostgreSQL runs make and drop their own scratch database on the server named.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=docs/bench
mkdir -p "$out"
MARIADB=${MARIADB:-mysql+pymysql://root@127.0.0.1:3306/test}
POSTGRES=${POSTGRES:-postgresql+psycopg://postgres@127.0.0.1:5432/postgres}
bench() { name=$1; shift; echo "== $name"; .venv/bin/delayq bench --json-file "$out/$name.json" --plot "$out/$name.png" "$@"; }

bench 1m-pending-mariadb --pending 1000000 --rate 1000 --duration 30 --database-url "$MARIADB"
bench 1m-pending-sqlite --pending 1000000 --rate 1000 --duration 30
bench 100k-pending-postgres --pending 100000 --rate 1000 --duration 10 --database-url "$POSTGRES"
bench burst-100k-mariadb --pending 0 --burst 100000 --database-url "$MARIADB"
bench peers-200-over-4s --pending 0 --rate 50 --duration 4 --naive --database-url "$MARIADB"
bench peers-2000-over-4s --pending 0 --rate 500 --duration 4 --naive --database-url "$MARIADB"
bench 200k-pending-naive-mariadb --pending 200000 --rate 500 --duration 4 --naive --database-url "$MARIADB"
bench handler-1m-pending-mariadb --pending 1000000 --rate 1000 --duration 30 --action handler --database-url "$MARIADB"
bench handler-burst-20k-mariadb --pending 1000000 --burst 20000 --action handler --database-url "$MARIADB"
bench webhook-1m-pending-mariadb --pending 1000000 --rate 1000 --duration 30 --action webhook --database-url "$MARIADB"
bench webhook-500-1m-pending-mariadb --pending 1000000 --rate 500 --duration 30 --action webhook --database-url "$MARIADB"
bench webhook-burst-20k-mariadb --pending 1000000 --burst 20000 --action webhook --database-url "$MARIADB"
.venv/bin/python benchmarks/import_time.py --json-file "$out/import-time.json"
