"""Script calls of many slots from an event loop: what router.Router does for the
blocking producer, on redis.asyncio's RedisCluster, for the asyncio producer's writes.

Each primary's calls go out in one pipeline on one of its connections, the primaries at
the same time; with `wait_replicas`, WAIT ends each pipeline, so it counts that very
connection's writes. Replies are judged as Router judges them (router.verdict): MOVED
reads the topology again, ASK sends ASKING to the target, NOSCRIPT loads the script on
the node, TRYAGAIN, CLUSTERDOWN, READONLY and lost connections are retried, for up to
`retry_s`, with pauses on the loop (asyncio.sleep), never a blocking one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.commands.core import AsyncScript

from delayq.cluster.router import MIN_REFRESH_S, RETRIABLE, RETRY_S, judge
from delayq.cluster.slots import slot_of
from delayq.store import check_replicated


@dataclass(frozen=True)
class AsyncCall:
    """One script call, within one slot."""

    slot: int
    script: AsyncScript
    keys: list[str]
    args: list[Any]


class AsyncRouter:
    """Runs calls on the primaries of their slots. Use it from one event loop."""

    def __init__(
        self, cluster: RedisCluster, *, wait_replicas: int = 0, wait_timeout_ms: int = 1000
    ) -> None:
        self.cluster = cluster
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._refreshed_at = 0.0

    async def run(self, calls: Sequence[AsyncCall], *, retry_s: float = RETRY_S) -> list[Any]:
        """Each call's reply, in order (as Router.run, raising the first error left)."""
        await self.cluster.initialize()  # the first call reads the topology
        loop = asyncio.get_running_loop()
        results: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        asking: dict[int, ClusterNode] = {}
        deadline = loop.time() + retry_s
        pause = 0.01
        while pending:
            again, refresh = await self._round(calls, pending, asking, results)
            if not again or loop.time() >= deadline:
                break
            if refresh and loop.time() - self._refreshed_at >= MIN_REFRESH_S:
                self._refreshed_at = loop.time()
                # Failing, the next round tries the nodes it knows, and reads again.
                with contextlib.suppress(redis.RedisError):
                    await self.cluster.nodes_manager.initialize()
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)
            pending = again
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    async def _round(
        self,
        calls: Sequence[AsyncCall],
        pending: list[int],
        asking: dict[int, ClusterNode],
        results: list[Any],
    ) -> tuple[list[int], bool]:
        """One round: each primary's calls in one pipeline, all primaries at once.
        Returns (calls to retry, whether the topology should be read again)."""
        by_node: dict[str, tuple[ClusterNode, list[int]]] = {}
        again: list[int] = []
        refresh = False
        for i in pending:
            try:
                node = asking.get(i) or self.cluster.nodes_manager.get_node_from_slot(calls[i].slot)
            except redis.RedisError as exc:  # no primary known for the slot
                results[i] = exc
                again.append(i)
                refresh = True
                continue
            by_node.setdefault(node.name, (node, []))[1].append(i)
        groups = list(by_node.values())
        answers = await asyncio.gather(
            *(self._send(node, calls, idxs, asking) for node, idxs in groups)
        )
        retry, reread, load = judge(groups, answers, results, asking, self._node_at)
        for node, script in {(node, calls[i].script) for node, i in load}:  # each once
            await node.execute_command("SCRIPT", "LOAD", script.script)
        return again + retry, refresh or reread

    def _node_at(self, host: str, port: int) -> ClusterNode | None:
        node: ClusterNode | None = self.cluster.get_node(host=host, port=port)
        return node

    async def _send(
        self,
        node: ClusterNode,
        calls: Sequence[AsyncCall],
        idxs: list[int],
        asking: dict[int, ClusterNode],
    ) -> list[Any] | BaseException:
        """The node's calls (and WAIT) in one pipeline on one connection; each call's
        reply or error, or the error that lost the connection."""
        commands: list[PipelineCommand] = []
        mine: list[PipelineCommand] = []
        for i in idxs:
            call = calls[i]
            if i in asking:
                commands.append(PipelineCommand(len(commands), "ASKING"))
            command = PipelineCommand(
                len(commands), "EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args
            )
            commands.append(command)
            mine.append(command)
        if self.wait_replicas:
            commands.append(
                PipelineCommand(len(commands), "WAIT", self.wait_replicas, self.wait_timeout_ms)
            )
        try:
            await node.execute_pipeline(commands)
            replies = [command.result for command in mine]
            # As Router: WAIT is judged only if a call ran (a refused one wrote nothing).
            if self.wait_replicas and any(not isinstance(r, Exception) for r in replies):
                confirmed = commands[-1].result
                if isinstance(confirmed, Exception):
                    raise confirmed
                check_replicated(int(confirmed), self.wait_replicas, self.wait_timeout_ms)
        except RETRIABLE as exc:
            return exc
        return replies


def per_slot(timer_keys: Sequence[str]) -> dict[int, list[int]]:
    """The positions of `timer_keys` grouped by hash slot, in order."""
    groups: dict[int, list[int]] = {}
    for n, key in enumerate(timer_keys):
        groups.setdefault(slot_of(key), []).append(n)
    return groups
