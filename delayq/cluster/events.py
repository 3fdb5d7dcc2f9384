"""Keyspace events and wake-ups from every primary of a cluster, as one stream.

Keyspace events are node-local: each primary publishes only its own keys' events, so a
listener subscribes to every primary. The set of primaries is read again every
TOPOLOGY_S (and whenever a subscription breaks), not only after an error: a failover
promotes a replica silently, and a primary added to the cluster has no connection that
could fail. Each primary has a subscriber thread of its own; a subscription (re)made
puts a `subscribed` marker in the stream, so that the listener catches up with what it
may have missed (a sweep, and a full read of the due view).

redis-py 8's ClusterKeyspaceNotifications subscribes every primary too, but refreshes
the topology only after a connection error, drops messages of channels that are not
keyspace notifications (our wake-ups), polls the nodes round-robin in 100 ms slices, and
does not say when it subscribed again; hence this module.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import redis
from redis.cluster import ClusterNode

from delayq.cluster.router import Router

log = logging.getLogger("delayq.cluster")

#: Seconds between reads of the cluster's primaries.
TOPOLOGY_S = 2.0
#: How long a subscriber waits for one message before looking at its stop flag.
POLL_S = 0.2
#: Cap of the wait between a subscriber's reconnect attempts.
RECONNECT_MAX_S = 2.0


class ClusterEvents:
    """Subscribes `patterns` on every primary; `get_message` returns what any of them
    published (pubsub message dicts), plus `{"type": "subscribed", "node": NAME}` each
    time a primary's subscription is made or made again."""

    def __init__(self, router: Router, patterns: list[str]) -> None:
        self.router = router
        self.patterns = patterns
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self._subscribers: dict[str, _NodeSubscriber] = {}
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher = threading.Thread(
            target=self._watch, name="delayq-cluster-topology", daemon=True
        )

    def start(self) -> None:
        self.sync()
        self._watcher.start()

    def sync(self) -> None:
        """Read the primaries again; subscribe new ones, drop the ones no longer primary."""
        try:
            self.router.refresh_topology(force=True)
        except redis.RedisError as exc:
            log.debug("cluster topology not read: %s", exc)
        primaries = {node.name: node for node in self.router.primaries()}
        with self._lock:
            for name in list(self._subscribers):
                if name not in primaries:
                    log.info("%s is no longer a primary: unsubscribed", name)
                    self._subscribers.pop(name).stop()
            for name, node in primaries.items():
                if name not in self._subscribers and not self._stopping.is_set():
                    sub = _NodeSubscriber(self, node)
                    self._subscribers[name] = sub
                    sub.start()

    def _watch(self) -> None:
        while not self._stopping.wait(TOPOLOGY_S):
            self.sync()

    def get_message(self, timeout: float = 0.0) -> dict[str, Any] | None:
        try:
            if timeout <= 0:
                return self.messages.get_nowait()
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def live(self) -> bool:
        """Every primary known is subscribed."""
        with self._lock:
            subs = list(self._subscribers.values())
        return bool(subs) and all(s.subscribed.is_set() for s in subs)

    def nodes(self) -> dict[str, bool]:
        """Each primary and whether its subscription is live."""
        with self._lock:
            return {name: s.subscribed.is_set() for name, s in self._subscribers.items()}

    def close(self) -> None:
        self._stopping.set()
        with self._lock:
            subs, self._subscribers = list(self._subscribers.values()), {}
        for sub in subs:
            sub.stop()
        if self._watcher.is_alive():
            self._watcher.join(timeout=5)
        for sub in subs:
            sub.join(timeout=5)


class _NodeSubscriber(threading.Thread):
    """The subscription to one primary, made again after every error until stopped."""

    def __init__(self, events: ClusterEvents, node: ClusterNode) -> None:
        super().__init__(name=f"delayq-events-{node.name}", daemon=True)
        self.events = events
        self.node = node
        self.subscribed = threading.Event()
        self._stop_flag = threading.Event()

    def stop(self) -> None:
        self._stop_flag.set()

    def run(self) -> None:
        pause = 0.1
        while not self._stop_flag.is_set():
            pubsub = self.events.router.node_client(self.node).pubsub()  # type: ignore[no-untyped-call]
            try:
                pubsub.psubscribe(*self.events.patterns)
                self._confirm(pubsub)
                pause = 0.1
                self.events.messages.put({"type": "subscribed", "node": self.node.name})
                while not self._stop_flag.is_set():
                    msg = pubsub.get_message(timeout=POLL_S)
                    if msg is not None and msg["type"] == "pmessage":
                        self.events.messages.put(msg)
            except redis.RedisError as exc:
                if self.subscribed.is_set():
                    log.warning("subscription to %s lost: %s", self.node.name, exc)
                self.subscribed.clear()
                # The node may have failed over: the topology says who to ask now.
                threading.Thread(target=self.events.sync, daemon=True).start()
                self._stop_flag.wait(pause)
                pause = min(pause * 2, RECONNECT_MAX_S)
            finally:
                self.subscribed.clear()
                pubsub.close()

    def _confirm(self, pubsub: redis.client.PubSub) -> None:
        confirmed = 0
        deadline = time.monotonic() + 10
        while confirmed < len(self.events.patterns):
            if time.monotonic() > deadline:
                raise redis.TimeoutError("no subscription confirmation within 10 s")
            msg = pubsub.get_message(timeout=1.0)
            if msg is None:
                continue
            if msg["type"] == "psubscribe":
                confirmed += 1
            elif msg["type"] == "pmessage":
                self.events.messages.put(msg)
        self.subscribed.set()
