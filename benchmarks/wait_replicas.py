"""What DELAYQ_WAIT_REPLICAS=1 costs a producer: schedule_expiry latency and
schedule_many throughput with and without WAIT, on a 3-primary/3-replica cluster of
redis-server and of valkey-server, and on one redis-server with one replica.

    .venv/bin/python benchmarks/wait_replicas.py [redis] [valkey] [single]

(no argument: all three). Starts and stops its own servers on loopback
(tests/cluster.py, tests/servers.py: run it from a checkout with the dev extra).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from delayq.producer import Producer
from delayq.settings import Settings
from tests.cluster import ServerCluster
from tests.servers import RedisServer, wait_for

CALLS = 500
BULK = 20_000


def measure(url: str, wait: int) -> str:
    producer = Producer.from_settings(Settings(redis_url=url, wait_replicas=wait))
    took = []
    for i in range(CALLS):
        started = time.perf_counter()
        producer.schedule(f"W{wait}-{i}", 3600)
        took.append((time.perf_counter() - started) * 1000)
    took.sort()
    started = time.perf_counter()
    producer.schedule_many([(f"M{wait}-{i}", 3600) for i in range(BULK)])
    bulk = BULK / (time.perf_counter() - started)
    p50, p99 = took[len(took) // 2], took[int(len(took) * 0.99)]
    return (
        f"WAIT_REPLICAS={wait}: schedule_expiry p50 {p50:.2f} ms p99 {p99:.2f} ms; "
        f"schedule_many {bulk:,.0f}/s"
    )


def main(which: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("redis", "valkey"):
            if kind not in which:
                continue
            cluster = ServerCluster(Path(tmp) / kind, kind=kind)  # type: ignore[arg-type]
            cluster.start()
            try:
                for wait in (0, 1):
                    print(f"{kind} cluster 3+3 {measure(cluster.url, wait)}")
            finally:
                cluster.stop()
        if "single" in which:
            primary = RedisServer(Path(tmp) / "primary")
            primary.start()
            replica = RedisServer(
                Path(tmp) / "replica", extra={"replicaof": f"127.0.0.1 {primary.port}"}
            )
            replica.start()
            try:
                wait_for(
                    lambda: replica.client().info("replication")["master_link_status"] == "up",
                    20,
                    what="the replica to sync",
                )
                for wait in (0, 1):
                    print(f"redis primary+replica {measure(primary.url(), wait)}")
            finally:
                replica.stop()
                primary.stop()


if __name__ == "__main__":
    main(sys.argv[1:] or ["redis", "valkey", "single"])
