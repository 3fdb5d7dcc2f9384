"""Outbox relay lateness: from a producer's COMMIT returning to the timer being in Redis.

    .venv/bin/python benchmarks/outbox_relay.py [sqlite] [mariadb] [postgres]
        [--rate 1000] [--seconds 20] [--producers 4] [--poll-s 0.005]

(no database named: all three; MariaDB and PostgreSQL as the tests reach them, see
tests/conftest.py.) Producer threads commit `rate` orders a second in all, each an
INSERT INTO orders and a staged 20-minute schedule (`schedule_expiry(...,
connection=conn)`) in one transaction. `delayq listen` runs as a subprocess, as in
production, and relays the rows. A subscriber to the private Redis's `set` keyspace
events notes when each timer key is written; lateness = that moment minus the moment the
producer's commit returned, both on this host's monotonic clock.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg
import pymysql
import sqlalchemy as sa

import delayq
from delayq import migrate
from delayq.db import make_engine
from delayq.settings import Settings
from tests.conftest import MARIADB_HOST, MARIADB_PORT, POSTGRES_HOST, POSTGRES_PORT
from tests.harness import ListenerProcess, clean_env
from tests.servers import RedisServer

ORDER_DELAY = "20m"


@contextlib.contextmanager
def database(kind: str, tmp: Path) -> Iterator[str]:
    name = f"delayq_bench_{uuid.uuid4().hex[:8]}"
    if kind == "sqlite":
        yield f"sqlite:///{tmp}/bench.db"
    elif kind == "mariadb":
        admin = pymysql.connect(host=MARIADB_HOST, port=MARIADB_PORT, user="root", autocommit=True)
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}`")
        try:
            yield f"mysql+pymysql://root@{MARIADB_HOST}:{MARIADB_PORT}/{name}"
        finally:
            with admin.cursor() as cur:
                cur.execute(f"DROP DATABASE `{name}`")
            admin.close()
    else:
        opts = {"host": POSTGRES_HOST, "port": POSTGRES_PORT, "user": "postgres"}
        with psycopg.connect(**opts, dbname="postgres", autocommit=True) as admin:  # type: ignore[arg-type]
            admin.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        try:
            yield f"postgresql+psycopg://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/{name}"
        finally:
            with psycopg.connect(**opts, dbname="postgres", autocommit=True) as admin:  # type: ignore[arg-type]
                admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def produce(
    url: str, rate: float, seconds: float, worker: int, workers: int, committed: dict[str, float]
) -> None:
    """This worker's share of `rate` orders a second, each committed with its timer."""
    engine = sa.create_engine(url)
    insert = sa.text("INSERT INTO orders (order_sn) VALUES (:sn)")
    interval = workers / rate
    start = time.monotonic() + worker * interval / workers
    n = 0
    with engine.connect() as conn:
        while (due := start + n * interval) < start + seconds:
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            sn = f"B{worker}-{n}"
            with conn.begin():
                conn.execute(insert, {"sn": sn})
                delayq.schedule_expiry(sn, ORDER_DELAY, connection=conn)
            committed[f"{sn}:cancel"] = time.monotonic()
            n += 1
    engine.dispose()


def run(kind: str, args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory() as tmp_name, database(kind, Path(tmp_name)) as url:
        tmp = Path(tmp_name)
        server = RedisServer(tmp / "redis", notify="Egx$")
        server.start()
        settings = Settings(redis_url=server.url(0), database_url=url)
        engine = make_engine(settings)
        migrate.upgrade(engine, settings)
        engine.dispose()
        env = clean_env(
            REDIS_URL=server.url(0),
            DATABASE_URL=url,
            HOME=str(tmp),
            OUTBOX_POLL_S=str(args.poll_s),
        )
        listener = ListenerProcess(env, tmp / "listener.log").start()
        written: dict[str, float] = {}
        committed: dict[str, float] = {}
        pubsub = server.client().pubsub()
        pubsub.subscribe("__keyevent@0__:set")
        stop = threading.Event()

        def listen() -> None:
            while not stop.is_set():
                msg = pubsub.get_message(timeout=0.1)
                if msg and msg["type"] == "message":
                    key = msg["data"]
                    written.setdefault(
                        key.decode() if isinstance(key, bytes) else key, time.monotonic()
                    )

        subscriber = threading.Thread(target=listen, daemon=True)
        subscriber.start()
        producers = [
            threading.Thread(
                target=produce, args=(url, args.rate, args.seconds, w, args.producers, committed)
            )
            for w in range(args.producers)
        ]
        started = time.monotonic()
        for t in producers:
            t.start()
        for t in producers:
            t.join()
        took = time.monotonic() - started
        assert listener.proc is not None
        listener_cpu = cpu_seconds(listener.proc.pid)
        own_cpu = time.process_time()
        deadline = time.monotonic() + 30
        while len(written) < len(committed) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        subscriber.join()
        listener.stop()
        server.stop()
        late = sorted((written[k] - committed[k]) * 1000 for k in committed if k in written)
        missing = len(committed) - len(late)

        def q(p: float) -> float:
            return late[min(len(late) - 1, int(p * len(late)))]

        return (
            f"{kind}: {len(committed)} orders in {took:.1f} s ({len(committed) / took:,.0f}/s), "
            f"relay lateness p50 {q(0.5):.1f} ms, p90 {q(0.9):.1f} ms, p99 {q(0.99):.1f} ms, "
            f"max {late[-1]:.1f} ms, mean {statistics.fmean(late):.1f} ms; missing {missing}; "
            f"CPU: listener {listener_cpu / took:.0%} of a core, producers and subscriber "
            f"{own_cpu / took:.0%}"
        )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("databases", nargs="*", default=["sqlite", "mariadb", "postgres"])
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--poll-s", type=float, default=Settings.outbox_poll_s)
    args = parser.parse_args()
    for kind in args.databases:
        print(run(kind, args), flush=True)


if __name__ == "__main__":
    main()
