"""The peers: how each one's worker is started, how jobs reach it, and when it is ready.

Every peer runs with its documented defaults; `configuration` says which ones matter for
lateness, and it is copied into the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from benchmarks.peers import envs

JOBS_DIR = envs.HERE / "jobs"


@dataclass(frozen=True)
class Peer:
    name: str
    label: str
    configuration: str
    #: Packages whose versions the report names.
    packages: tuple[str, ...]
    #: The worker's command line, given the environment's directory (bin or node_modules)
    #: and the Redis URL (the workers also find it in PEER_REDIS_URL).
    worker: Callable[[Path, str], list[str]]
    #: `load --count N` / `schedule --count N --rate R`, same arguments after these.
    driver: Callable[[Path], list[str]]
    #: Whether the worker has started (its ready files, or what it wrote in Redis).
    ready: Callable[[redis.Redis, Path], bool]
    #: Whether `pending` pre-loaded jobs are where the peer keeps them while they wait.
    settled: Callable[[redis.Redis, int], bool]

    @property
    def is_node(self) -> bool:
        return self.name == "bullmq"

    def environment(self, envs_dir: Path) -> Path:
        """Build or reuse the peer's environment."""
        return envs.node_modules() if self.is_node else envs.python_env(self.name, envs_dir)


def _ready_file(_: redis.Redis, ready_dir: Path) -> bool:
    return any(ready_dir.glob("ready-*"))


def _rq_ready(client: redis.Redis, _: Path) -> bool:
    # The worker has registered, and its scheduler process holds the queue's lock.
    return bool(client.scard("rq:workers")) and bool(client.exists("rq:scheduler-lock:default"))


def _in_redis(_: redis.Redis, __: int) -> bool:
    # arq, RQ and BullMQ keep delayed jobs in a sorted set until due: loaded is settled.
    return True


def _celery_settled(client: redis.Redis, pending: int) -> bool:
    # The worker takes ETA tasks off the `celery` list as they come and keeps them in its
    # memory; kombu's Redis transport notes each taken message in the `unacked` hash.
    return client.llen("celery") == 0 and client.hlen("unacked") >= pending


def _python_driver(module: str) -> Callable[[Path], list[str]]:
    return lambda bin_dir: [str(bin_dir / "python"), str(JOBS_DIR / f"{module}.py")]


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer(
            name="arq",
            label="arq",
            configuration=(
                "one worker (`arq arq_peer.WorkerSettings`), defaults: max_jobs 10, "
                "poll_delay 0.5 s; `enqueue_job(..., _defer_until=due)`"
            ),
            packages=("arq", "redis"),
            worker=lambda b, _: [str(b / "arq"), "arq_peer.WorkerSettings"],
            driver=_python_driver("arq_peer"),
            ready=_ready_file,
            settled=_in_redis,
        ),
        Peer(
            name="rq",
            label="RQ",
            configuration=(
                "one worker (`rq worker --with-scheduler`), defaults: a forked work horse "
                "per job, the scheduler moves due jobs every 1 s; `Queue.enqueue_at(due, ...)`"
                " (RQ keeps the scheduled time in whole seconds)"
            ),
            packages=("rq", "redis"),
            # --url: without it `rq worker` uses localhost:6379.
            worker=lambda b, url: [str(b / "rq"), "worker", "--with-scheduler", "--url", url],
            driver=_python_driver("rq_peer"),
            ready=_rq_ready,
            settled=_in_redis,
        ),
        Peer(
            name="celery",
            label="Celery",
            configuration=(
                "one worker (`celery -A celery_peer worker`), Redis broker, defaults: prefork "
                "pool of 2 (the CPU count), prefetch multiplier 4; `apply_async(eta=due)`: "
                "the worker holds ETA tasks in its own memory until due"
            ),
            packages=("celery", "kombu", "redis"),
            worker=lambda b, _: [
                str(b / "celery"),
                "-A",
                "celery_peer",
                "worker",
                "--loglevel",
                "WARNING",
            ],
            driver=_python_driver("celery_peer"),
            ready=_ready_file,
            settled=_celery_settled,
        ),
        Peer(
            name="bullmq",
            label="BullMQ",
            configuration=(
                "one Worker, defaults: concurrency 1 (the worker promotes delayed jobs "
                "itself); `queue.add(name, data, {delay})`"
            ),
            packages=("bullmq", "ioredis", "better-sqlite3"),
            worker=lambda m, _: ["node", str(m.parent / "peer.mjs"), "worker"],
            driver=lambda m: ["node", str(m.parent / "peer.mjs")],
            ready=_ready_file,
            settled=_in_redis,
        ),
    )
}
