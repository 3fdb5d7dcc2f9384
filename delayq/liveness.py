"""A running listener's liveness: no batch hangs on a dead database link, and health
answers at once.

* The watch. Each applier registers the batch it runs; a pool event attaches the database
  connection the batch checks out. A batch whose connection has been in use longer than
  DELAYQ_BATCH_TIMEOUT_S has that connection broken (its socket shut down; SQLite is
  interrupted): the driver raises a disconnect error, the pool discards the connection and
  the listener retries the batch on a fresh one. Without this, a half-open link (the server
  gone and nothing sending a RST) holds an applier until TCP gives up, hours later; TCP
  keepalive cannot tell, since a proxy or NAT in between ACKs for the server.
* The probes. Redis and the database are asked "are you there" every second, each from a
  thread of its own with short timeouts, so /healthz reads the latest answers from memory
  instead of waiting on a host that does not answer.

Breaking a connection never loses or duplicates a firing: nothing is acknowledged before
its outcome is committed, and an outcome that was committed after all is recognised by its
unique (order_sn, action, due_at) when the firing comes round again.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from sqlalchemy import event
from sqlalchemy.engine import Engine

from delayq.db import break_connection, make_engine
from delayq.observe import database_answers
from delayq.settings import Settings

log = logging.getLogger("delayq.liveness")

#: The watch looks at running batches this often.
CHECK_INTERVAL_S = 0.25
#: Seconds between two probes of the same server.
PROBE_INTERVAL_S = 1.0
#: Connect and read timeouts of a probe: well inside the 2 s a health check may take.
PROBE_TIMEOUT_S = 2.0
#: A probe without an answer for this long is a problem of its own, and its connection is
#: broken like a stuck batch's.
PROBE_STALE_S = 3.0
#: A batch running longer than this (or than the batch bound, if shorter) makes health
#: report its applier as stuck: a healthy batch takes milliseconds.
STUCK_AFTER_S = 5.0

Clock = Callable[[], float]


@dataclass
class _Work:
    """Database work in progress on one thread."""

    name: str
    #: Its connection is broken once it has been in use for longer than this.
    bound_s: float
    #: What sets the bound, for the log line.
    bound_setting: str
    started: float
    size: int
    is_batch: bool
    checked_out: float | None = None
    conn: Any = None
    record: Any = None


class Watch:
    """Database work running now, one per thread, and the connection each has checked out
    (thread-safe). `check()` breaks the connection of work past its bound."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._work: dict[int, _Work] = {}

    def attach(self, engine: Engine) -> None:
        """Follow the connections `engine`'s pool hands out to registered work."""
        event.listen(engine, "checkout", self._checkout)
        event.listen(engine, "checkin", self._checkin)

    @contextlib.contextmanager
    def running(
        self,
        name: str,
        bound_s: float,
        *,
        bound_setting: str = "",
        size: int = 0,
        is_batch: bool = True,
    ) -> Iterator[None]:
        """Register the calling thread's database work for the duration of the block."""
        ident = threading.get_ident()
        work = _Work(name, bound_s, bound_setting, self.clock(), size, is_batch)
        with self._lock:
            self._work[ident] = work
        try:
            yield
        finally:
            with self._lock:
                if self._work.get(ident) is work:
                    del self._work[ident]

    def _checkout(self, dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        with self._lock:
            work = self._work.get(threading.get_ident())
            if work is not None:
                # A retry on a fresh connection has the whole bound again.
                work.conn, work.record, work.checked_out = dbapi_conn, record, self.clock()

    def _checkin(self, _dbapi_conn: Any, record: Any) -> None:
        with self._lock:
            for work in self._work.values():
                if work.record is record:
                    work.conn = work.record = None

    def check(self) -> int:
        """Break the connection of every piece of work that has held it past its bound;
        returns how many were broken. Each is logged once."""
        now = self.clock()
        broken = 0
        with self._lock:
            # Under the lock: a connection checked in meanwhile is never broken in the pool.
            for work in self._work.values():
                if work.conn is None or work.checked_out is None:
                    continue
                held_s = now - work.checked_out
                if held_s <= work.bound_s:
                    continue
                what = f"batch of {work.size}" if work.is_batch else "round trip"
                bound = f"{work.bound_setting}={work.bound_s:g}" if work.bound_setting else ""
                log.warning(
                    "%s: %s without an answer from the database for %.1f s (%s): breaking "
                    "its connection to retry on a fresh one",
                    work.name,
                    what,
                    held_s,
                    bound or f"bound {work.bound_s:g} s",
                )
                break_connection(work.conn)
                work.conn = work.record = None
                broken += 1
        return broken

    def batches(self) -> list[tuple[str, float, int]]:
        """(name, seconds running, size) of each batch running now, oldest first."""
        now = self.clock()
        with self._lock:
            running = [(w.name, now - w.started, w.size) for w in self._work.values() if w.is_batch]
        return sorted(running, key=lambda r: -r[1])


class Probe:
    """One round trip, repeated by `run()` every `interval_s`; its latest answer and that
    answer's age are read from memory by `problem()`."""

    def __init__(
        self,
        name: str,
        round_trip: Callable[[], str | None],
        *,
        interval_s: float = PROBE_INTERVAL_S,
        stale_s: float = PROBE_STALE_S,
        clock: Clock = time.monotonic,
    ) -> None:
        self.name = name
        #: Returns None when the server answered, else the problem in one line.
        self.round_trip = round_trip
        self.interval_s, self.stale_s, self.clock = interval_s, stale_s, clock
        self._lock = threading.Lock()
        self._asking_since: float | None = None
        self._answered_at: float | None = None
        self._problem: str | None = None

    def run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            self.probe()
            stopping.wait(self.interval_s)

    def probe(self) -> None:
        with self._lock:
            self._asking_since = self.clock()
        try:
            problem = self.round_trip()
        except Exception as exc:  # a probe reports; it never takes the listener down
            problem = f"{self.name}: {type(exc).__name__}: {exc}".splitlines()[0]
        with self._lock:
            self._asking_since = None
            self._answered_at, self._problem = self.clock(), problem

    def problem(self) -> str | None:
        now = self.clock()
        with self._lock:
            if self._asking_since is not None and now - self._asking_since > self.stale_s:
                return f"{self.name} did not answer for {now - self._asking_since:.0f} s"
            if self._answered_at is None:
                return None  # the first answer is on its way
            age_s = now - self._answered_at
            if self._problem is not None:
                return f"{self._problem} (checked {age_s:.1f} s ago)"
            if self._asking_since is None and age_s > self.interval_s + self.stale_s:
                return f"{self.name} not checked for {age_s:.0f} s"
        return None


class Liveness:
    """The watch over the listener's batches and the probes of its servers, with the
    threads that run them (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        engine: Engine,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self.batch_timeout_s = settings.batch_timeout_s
        self.clock = clock
        self.watch = Watch(clock)
        self.watch.attach(engine)
        # Probes have connections of their own: they must not wait behind stuck appliers.
        self._probe_engine = make_engine(
            settings, timeout_s=PROBE_TIMEOUT_S, connect_timeout_s=PROBE_TIMEOUT_S, pool_size=1
        )
        self.watch.attach(self._probe_engine)
        self._probe_client = _probe_client(client)
        self.probes = [
            Probe("redis", self._ping_redis, clock=clock),
            Probe("database", self._ping_database, clock=clock),
        ]
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(
        self, guard: Callable[[Callable[[], None]], Callable[[], None]] = lambda loop: loop
    ) -> None:
        """Start the watch and the probes; `guard` wraps each thread's loop (the listener
        stops if one dies of a bug)."""
        self._threads = [
            threading.Thread(target=guard(self._watch_loop), name="delayq-watch", daemon=True)
        ]
        self._threads += [
            threading.Thread(
                target=guard(functools.partial(p.run, self._stopping)),
                name=f"delayq-probe-{p.name}",
                daemon=True,
            )
            for p in self.probes
        ]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Stop the threads (a probe is bounded by its timeouts) and close the probes'
        connections."""
        self._stopping.set()
        for t in self._threads:
            t.join(timeout=PROBE_STALE_S + 1)
        self._probe_engine.dispose()
        self._probe_client.close()

    def batch(self, size: int) -> contextlib.AbstractContextManager[None]:
        """Register the calling applier's batch of `size` firings while it runs."""
        name = threading.current_thread().name.removeprefix("delayq-")
        return self.watch.running(
            name, self.batch_timeout_s, bound_setting="DELAYQ_BATCH_TIMEOUT_S", size=size
        )

    def problems(self, queued: int = 0) -> list[str]:
        """Redis's and the database's latest answers, appliers stuck in a batch, and how
        long the oldest firing in hand has waited; `queued` firings wait for an applier.
        Answers from memory, at once."""
        problems = [p for p in (probe.problem() for probe in self.probes) if p]
        batches = self.watch.batches()
        stuck_after_s = min(STUCK_AFTER_S, self.batch_timeout_s)
        stuck = [(name, age, size) for name, age, size in batches if age > stuck_after_s]
        problems += [
            f"{name} stuck in a batch of {size} for {age:.0f} s" for name, age, size in stuck
        ]
        if stuck:
            problems.append(
                f"oldest claimed firing held for {stuck[0][1]:.0f} s; {queued} more waiting "
                "for an applier"
            )
        return problems

    def answering(self, name: str) -> bool:
        """Whether the latest probe of `name` ("redis" or "database") got an answer, from
        memory (true until the first answer is in)."""
        return next(p for p in self.probes if p.name == name).problem() is None

    def _watch_loop(self) -> None:
        while not self._stopping.wait(CHECK_INTERVAL_S):
            self.watch.check()

    def _ping_redis(self) -> str | None:
        try:
            self._probe_client.ping()
        except redis.RedisError as exc:
            return f"redis: {exc or type(exc).__name__}".splitlines()[0]
        return None

    def _ping_database(self) -> str | None:
        with self.watch.running("database probe", PROBE_STALE_S, is_batch=False):
            return database_answers(self._probe_engine)


def _probe_client(client: redis.Redis) -> redis.Redis:
    """A client for the same server as `client` that gives up after PROBE_TIMEOUT_S and
    does not retry: the listener's own client waits as long as a command takes. On a
    cluster, a client of the same nodes whose PING asks every primary."""
    if isinstance(client, RedisCluster):
        return _ClusterProbe(client)  # type: ignore[return-value,unused-ignore]
    pool = client.connection_pool
    kwargs = {
        **pool.connection_kwargs,
        "socket_timeout": PROBE_TIMEOUT_S,
        "socket_connect_timeout": PROBE_TIMEOUT_S,
        "retry": Retry(NoBackoff(), 0),
    }
    probe_pool = redis.ConnectionPool(
        connection_class=pool.connection_class, max_connections=1, **kwargs
    )
    return redis.Redis(connection_pool=probe_pool)


class _ClusterProbe:
    """PING every primary of a cluster, each with a probe client of its own (as
    _probe_client makes for one Redis)."""

    def __init__(self, cluster: RedisCluster) -> None:
        self.cluster = cluster
        self._clients: dict[str, redis.Redis] = {}

    def ping(self) -> bool:
        for node in self.cluster.get_primaries():  # type: ignore[no-untyped-call]
            client = self._clients.get(node.name)
            if client is None:
                client = self._clients[node.name] = _probe_client(node.redis_connection)
            try:
                client.ping()
            except redis.RedisError as exc:
                raise type(exc)(f"{node.name}: {exc}") from exc
        return True

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
