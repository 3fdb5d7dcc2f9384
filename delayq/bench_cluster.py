"""`delayq bench` on a Redis Cluster: a scratch cluster, and each primary's share.

`--cluster N` starts N cluster-enabled redis-servers (no replicas) in a temporary
directory and joins them with `redis-cli --cluster create`; `--redis-url
redis+cluster://...` uses a cluster that is already running. Either way the run reports,
per primary, its share of the commands delayq sent during the run (from `INFO
commandstats`) and of the memory it holds (`used_memory`), which is what shows whether the
timers spread evenly.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import redis
from redis.cluster import RedisCluster

from delayq.cluster.url import connect_cluster, is_cluster_url
from delayq.errors import InvalidInput, ServiceUnavailable


def bench_client(url: str) -> redis.Redis:
    """A decoded client for one Redis or a cluster."""
    if is_cluster_url(url):
        return connect_cluster(url, decode_responses=True)  # type: ignore[return-value]
    client: redis.Redis = redis.Redis.from_url(url, decode_responses=True)
    return client


def _primaries(client: Any) -> list[tuple[str, redis.Redis]]:
    if isinstance(client, RedisCluster):
        return [
            (n.name, client.get_redis_connection(n))
            for n in client.get_primaries()  # type: ignore[no-untyped-call]
        ]
    return [("redis", client)]


def flush(client: redis.Redis) -> None:
    """FLUSHDB on one Redis, or on every primary of a cluster."""
    for _, node in _primaries(client):
        node.flushdb()


def info_sum(client: redis.Redis, section: str, field: str) -> int:
    """An INFO field, summed over the primaries."""
    return sum(int(node.info(section)[field]) for _, node in _primaries(client))


def server_version(client: redis.Redis) -> str:
    return str(_primaries(client)[0][1].info("server")["redis_version"])


def subscribed(url: str) -> bool:
    """Whether a listener has subscribed (on every primary of a cluster)."""
    client = bench_client(url)
    with contextlib.closing(client):
        return all(int(node.pubsub_numpat()) > 0 for _, node in _primaries(client))


class PrimaryShares:
    """Each primary's commands and memory, taken before and after a run."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.before = self._commands()

    def _commands(self) -> dict[str, int]:
        out = {}
        for name, node in _primaries(self.client):
            stats = node.info("commandstats")
            out[name] = sum(
                int(v["calls"]) for k, v in stats.items() if not k.endswith(("info", "ping"))
            )
        return out

    def report(self) -> list[dict[str, Any]]:
        """Per primary: commands during the run and their share, memory and its share."""
        after = self._commands()
        memory = {name: int(node.info("memory")["used_memory"]) for name, node in
                  _primaries(self.client)}  # fmt: skip
        calls = {name: after.get(name, 0) - self.before.get(name, 0) for name in after}
        total_calls = max(1, sum(calls.values()))
        total_memory = max(1, sum(memory.values()))
        return [
            {
                "node": name,
                "commands": calls[name],
                "commands_share": round(calls[name] / total_calls, 3),
                "used_memory": memory[name],
                "memory_share": round(memory[name] / total_memory, 3),
            }
            for name in sorted(after)
        ]


@contextlib.contextmanager
def scratch_cluster(
    primaries: int,
    binary: str,
    free_port: Callable[[], int],
    wait: Callable[[Callable[[], bool], float, str], None],
    terminate: Callable[[subprocess.Popen[bytes], float], None],
) -> Iterator[str]:
    """`primaries` cluster-enabled redis-servers joined by `redis-cli --cluster create`;
    yields the cluster's URL, stops every server at the end."""
    cli = shutil.which("redis-cli")
    if cli is None:
        raise InvalidInput("--cluster needs redis-cli on PATH (apt-get install redis-tools)")
    if not 3 <= primaries <= 16:
        raise InvalidInput("--cluster: a Redis Cluster needs 3 to 16 primaries here")
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="delayq-bench-cluster-") as tmp:
        ports = [free_port() for _ in range(primaries)]
        try:
            for port in ports:
                node_dir = Path(tmp) / str(port)
                node_dir.mkdir()
                procs.append(
                    subprocess.Popen(
                        [
                            binary,
                            *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir)),
                            *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                            # Its bus port, by default port + 10000, may not exist (> 65535).
                            *("--cluster-port", str(free_port())),
                            *("--save", "", "--appendonly", "no"),
                            *("--notify-keyspace-events", "Egx"),
                            *("--logfile", str(node_dir / "redis.log")),
                        ],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            for port in ports:
                wait(partial(_pings, port), 15, f"the bench's redis-server on port {port}")
            created = subprocess.run(
                [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes"],
                capture_output=True,
                timeout=60,
            )
            if created.returncode != 0:
                raise ServiceUnavailable(
                    f"redis-cli --cluster create failed: {created.stderr.decode()[-300:]}"
                )
            wait(lambda: all(_cluster_ok(p) for p in ports), 30, "the bench's cluster")
            yield "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
        finally:
            for proc in procs:
                terminate(proc, 10)


def _pings(port: int) -> bool:
    try:
        with contextlib.closing(redis.Redis(port=port, socket_connect_timeout=1)) as c:
            return bool(c.ping())
    except redis.RedisError:
        return False


def _cluster_ok(port: int) -> bool:
    with contextlib.closing(redis.Redis(port=port, decode_responses=True)) as c:
        # redis-py parses CLUSTER INFO into a dict; the caller's wait polls.
        return c.cluster("info").get("cluster_state") == "ok"  # type: ignore[no-any-return]
