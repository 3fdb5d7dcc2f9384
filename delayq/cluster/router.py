"""Script calls of many slots, pipelined per primary.

redis-py's RedisCluster routes one command at a time; delayq needs more: a bulk schedule
or a claim of many slots in one round trip per primary, WAIT on the very connection that
wrote (WAIT counts that connection's writes), and a primary that is down failing only
its own slots' calls. Each call is retried where Redis says it may be: MOVED (the slot
moved: the topology is read again), ASK (the slot is migrating: ASKING on the target),
TRYAGAIN (a multi-key call during a migration), CLUSTERDOWN and NOSCRIPT (a promoted
replica has not loaded the scripts yet).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from functools import cache
from importlib.resources import files
from typing import Any, TypeVar

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    TryAgainError,
)

from delayq.cluster.slots import SLOTS
from delayq.store import check_replicated

log = logging.getLogger("delayq.cluster")

#: How long a call keeps being retried through a failover or a migration, by default.
RETRY_S = 10.0
#: Topology reads at most this often when calls keep being redirected.
MIN_REFRESH_S = 0.1
#: Rounds of at least this many calls send each primary's pipeline on a thread of its
#: own, so the primaries work at the same time.
PARALLEL_FROM = 64
PARALLEL_NODES = 16
#: Errors after which a call is retried (the slot's primary changes, or will).
RETRIABLE = (
    redis.ConnectionError,
    redis.TimeoutError,
    TryAgainError,
    ClusterDownError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.MasterDownError,
)


def slots_by_primary(cluster: RedisCluster) -> dict[ClusterNode, list[int]]:
    """The slots each primary serves, as the client last read the topology (a slot no
    primary serves right now is left out)."""
    by_name: dict[str, tuple[ClusterNode, list[int]]] = {}
    served = cluster.nodes_manager.slots_cache
    for slot in range(SLOTS):
        nodes = served.get(slot)
        if nodes:
            by_name.setdefault(nodes[0].name, (nodes[0], []))[1].append(slot)
    return dict(by_name.values())


@cache
def _script_text(name: str) -> str:
    return (files("delayq") / "lua" / f"{name}.lua").read_text()


def read_only_script(cluster: RedisCluster, name: str) -> Script:
    """One of the cluster's read-only, cross-slot scripts (`peek_slots`,
    `cluster_figures`), to be run on one node: `script(keys=[], args=..., client=node)`."""
    return cluster.register_script(_script_text(name))


@dataclass(frozen=True)
class Call:
    """One script call, within one slot."""

    slot: int
    script: Script
    keys: list[str]
    args: list[Any]


class Router:
    """Runs calls on the primaries of their slots. Thread-safe."""

    def __init__(
        self, cluster: RedisCluster, *, wait_replicas: int = 0, wait_timeout_ms: int = 1000
    ) -> None:
        self.cluster = cluster
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._lock = threading.Lock()
        self._refreshed_at = 0.0
        #: Bumped on every topology read: lets others notice a change.
        self.generation = 0
        self._executor: ThreadPoolExecutor | None = None

    def primary_of(self, slot: int) -> ClusterNode:
        node: ClusterNode = self.cluster.nodes_manager.get_node_from_slot(slot)
        return node

    def primaries(self) -> list[ClusterNode]:
        return list(self.cluster.get_primaries())  # type: ignore[no-untyped-call]

    def refresh_topology(self, *, force: bool = False) -> None:
        """Read the slot map again (at most every MIN_REFRESH_S unless forced)."""
        with self._lock:
            if not force and time.monotonic() - self._refreshed_at < MIN_REFRESH_S:
                return
            self._refreshed_at = time.monotonic()
            self.cluster.nodes_manager.initialize()
            self.generation += 1

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=PARALLEL_NODES, thread_name_prefix="delayq-cluster-call"
                )
            return self._executor

    def node_client(self, node: ClusterNode) -> redis.Redis:
        client: redis.Redis = self.cluster.get_redis_connection(node)
        return client

    def run(
        self,
        calls: Sequence[Call],
        *,
        wait: bool = False,
        retry_s: float = RETRY_S,
        raise_on_error: bool = True,
    ) -> list[Any]:
        """Each call's reply, in order. With `wait`, each primary's pipeline ends with
        WAIT DELAYQ_WAIT_REPLICAS (NotReplicated if too few confirm). Retriable errors are
        retried for up to `retry_s`; then, or for any other error, the error is raised,
        or with raise_on_error=False returned in the call's place (other slots' replies
        still come back)."""
        results: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        asking: dict[int, ClusterNode] = {}
        deadline = time.monotonic() + retry_s
        pause = 0.01
        while pending:
            again, refresh = self._run_once(calls, pending, asking, results, wait=wait)
            if not again:
                break
            if time.monotonic() >= deadline:
                break
            if refresh:
                try:
                    self.refresh_topology()
                except redis.RedisError as exc:
                    log.debug("cluster topology not read: %s", exc)
            time.sleep(pause)
            pause = min(pause * 2, 0.5)
            pending = again
        if raise_on_error:
            for result in results:
                if isinstance(result, Exception):
                    raise result
        return results

    def _run_once(
        self,
        calls: Sequence[Call],
        pending: list[int],
        asking: dict[int, ClusterNode],
        results: list[Any],
        *,
        wait: bool,
    ) -> tuple[list[int], bool]:
        """One round: each primary's calls in one pipeline. Returns (calls to retry,
        whether the topology should be read again)."""
        by_node: dict[str, tuple[ClusterNode, list[int]]] = {}
        again: list[int] = []
        refresh = False
        for i in pending:
            try:
                node = asking.get(i) or self.primary_of(calls[i].slot)
            except (redis.RedisError, IndexError) as exc:  # no primary known for the slot
                results[i] = (
                    exc
                    if isinstance(exc, redis.RedisError)
                    else ClusterDownError(f"no primary for slot {calls[i].slot}")
                )
                again.append(i)
                refresh = True
                continue
            by_node.setdefault(node.name, (node, []))[1].append(i)
        groups = list(by_node.values())

        def send(group: tuple[ClusterNode, list[int]]) -> list[Any] | BaseException:
            node, idxs = group
            try:
                return self._pipeline(node, [calls[i] for i in idxs], idxs, asking, wait)
            except RETRIABLE as exc:
                return exc

        if len(groups) > 1 and len(pending) >= PARALLEL_FROM:
            # Big rounds (bulk scheduling): every primary's pipeline at once.
            answers = list(self._pool().map(send, groups))
        else:
            answers = [send(group) for group in groups]
        retry, reread, load = judge(groups, answers, results, asking, self._node_at)
        for node, script in {(node, calls[i].script) for node, i in load}:  # each once
            self.node_client(node).script_load(script.script)
        return again + retry, refresh or reread

    def _pipeline(
        self,
        node: ClusterNode,
        calls: list[Call],
        idxs: list[int],
        asking: dict[int, ClusterNode],
        wait: bool,
    ) -> list[Any]:
        pipe = self.node_client(node).pipeline(transaction=False)
        for i, call in zip(idxs, calls, strict=True):
            if i in asking:
                pipe.execute_command("ASKING")  # type: ignore[no-untyped-call]
            pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        if wait:
            pipe.wait(self.wait_replicas, self.wait_timeout_ms)
        raw = pipe.execute(raise_on_error=False)
        confirmed: Any = raw.pop() if wait else None
        replies: list[Any] = []
        it = iter(raw)
        for i in idxs:
            if i in asking:
                next(it)  # ASKING's OK
            replies.append(next(it))
        # Judge WAIT only if a call ran: when every one was refused (NOSCRIPT on a promoted
        # replica, MOVED, ASK, TRYAGAIN) nothing was written, and the calls are retried.
        if wait and any(not isinstance(reply, Exception) for reply in replies):
            if isinstance(confirmed, Exception):
                raise confirmed
            check_replicated(int(confirmed), self.wait_replicas, self.wait_timeout_ms)
        return replies

    def _node_at(self, host: str, port: int | str) -> ClusterNode | None:
        node: ClusterNode | None = self.cluster.get_node(  # type: ignore[no-untyped-call]
            host=host, port=int(port)
        )
        return node


N = TypeVar("N")


def judge(
    groups: Sequence[tuple[N, list[int]]],
    answers: Sequence[Sequence[Any] | BaseException],
    results: list[Any],
    asking: dict[int, N],
    node_at: Callable[[str, int], N | None],
) -> tuple[list[int], bool, list[tuple[N, int]]]:
    """One round's answers (each node's replies, or the error that lost its pipeline)
    judged: every reply is put in `results` and `asking` is kept up to date. Returns the
    calls to retry, whether the topology should be read again, and (node, call) whose
    script the node must load first. For the blocking and the asyncio routers alike:
    `N` is either's ClusterNode."""
    again: list[int] = []
    refresh = False
    load: list[tuple[N, int]] = []
    for (node, idxs), replies in zip(groups, answers, strict=True):
        if isinstance(replies, BaseException):
            for i in idxs:
                results[i] = replies
            again += idxs
            refresh = True
            continue
        for i, reply in zip(idxs, replies, strict=True):
            results[i] = reply
            what = verdict(reply)
            if what is Verdict.DONE:
                asking.pop(i, None)
                continue
            if what is Verdict.FAILED:
                continue
            again.append(i)
            if what is Verdict.MOVED:
                asking.pop(i, None)
                refresh = True
            elif what is Verdict.ASK:
                assert isinstance(reply, AskError)
                target = node_at(reply.host, int(reply.port))
                if target is None:
                    refresh = True
                else:
                    asking[i] = target
            elif what is Verdict.NOSCRIPT:
                load.append((node, i))
            elif what is Verdict.RETRY_REFRESH:
                refresh = True
    return again, refresh, load


class Verdict(Enum):
    """What a call's reply says to do (the blocking and the asyncio routers alike)."""

    DONE = "done"
    #: An error that retrying will not cure: it is the call's answer.
    FAILED = "failed"
    #: The slot moved: retry on its new primary, after reading the topology again.
    MOVED = "moved"
    #: The slot is migrating: retry on the node named, after ASKING.
    ASK = "ask"
    #: The node does not have the script (a promoted replica): load it, retry.
    NOSCRIPT = "noscript"
    #: Retry as it is (TRYAGAIN: a multi-key call during a migration).
    RETRY = "retry"
    #: Retry after reading the topology again (the slot's primary changes, or will).
    RETRY_REFRESH = "retry-refresh"


def verdict(reply: object) -> Verdict:
    """What to do about one call's reply."""
    if isinstance(reply, MovedError):  # before AskError: redis-py's MovedError is one
        return Verdict.MOVED
    if isinstance(reply, AskError):
        return Verdict.ASK
    if isinstance(reply, NoScriptError):
        return Verdict.NOSCRIPT
    if isinstance(reply, TryAgainError):
        return Verdict.RETRY
    if isinstance(reply, RETRIABLE) or _migrating(reply):
        return Verdict.RETRY_REFRESH
    return Verdict.FAILED if isinstance(reply, Exception) else Verdict.DONE


def _migrating(reply: object) -> bool:
    """A script refused because a key it reads without declaring it (a timer key found in
    the index) has already moved with its migrating slot: Redis says so with a plain
    error, not ASK. The call is retried once the slot has moved."""
    return isinstance(reply, redis.ResponseError) and "non local key" in str(reply)
