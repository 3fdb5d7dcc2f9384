"""`delayq listen`: fires every timer once, on time, and loses none.

Three threads share one queue of claimed firings:

* the claimer sleeps until the earliest due time in the index (or a lease running out),
  then claims what is due in one Lua call. This is what makes delayq exact: Redis's own
  expiry of TTL keys can run minutes late with many keys pending.
* the subscriber listens to the keyspace events of the timer DB. `expire` (a TTL was set:
  SETEX, SET PX, EXPIRE) adopts a timer armed by a producer that does not use delayq into
  the index at its expiry time, so it fires as exactly as any other; `del` drops such a
  timer when its producer deletes it before it is due; `expired` claims a legacy timer
  whose `expire` event was missed (for indexed timers it is a harmless duplicate). It also
  listens on the wake channel, on which producers announce a timer earlier than every
  pending one.
* the sweeper SCANs the timer DB at a bounded rate, from start-up on and for ever after,
  adopting TTL keys that were set while no listener heard their `expire` event.
* the applier takes what is queued (a micro-batch that grows with load), applies it in one
  short transaction, then acknowledges it in Redis. A failed batch goes back to Redis with
  a backoff; after too many attempts, to the dead letters.

Nothing is acknowledged before its outcome is committed, so a crash at any point leaves
the firing in Redis, where a lease makes it claimable again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import socket
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from delayq import firing_stats
from delayq.actions import (
    APPLIED,
    FAILED,
    UNKNOWN_ACTION,
    UNMAPPED_FLAG,
    Actions,
    ActionSpec,
    Applier,
    Done,
    Outcome,
    Policy,
    load_actions,
)
from delayq.actions.apply import Item, firing_of
from delayq.actions.external import ExternalRunner
from delayq.actions.registry import global_policy
from delayq.db import is_transient
from delayq.due_queue import PREPARE_S, DueQueue, fine_timer_slack, ready_at
from delayq.errors import DelayqError
from delayq.figures import CachedFigures
from delayq.keys import Keys
from delayq.liveness import Liveness
from delayq.observe import Metrics, known_labels
from delayq.outbox.relay import Relay as OutboxRelay
from delayq.redis_conn import is_cluster
from delayq.sdnotify import Notifier
from delayq.settings import Settings, mask_url
from delayq.store import Claim, Firing, open_store

log = logging.getLogger("delayq.listener")

#: The claimer looks at the index at least this often even with nothing due, so a wake-up
#: that was lost (pub/sub is fire and forget) delays nothing by more than this.
IDLE_CHECK_S = 1.0
#: How long a fired timer's tombstone stops a late keyspace event from firing it again.
RECENT_WINDOW_MS = 120_000
#: Seconds between heartbeats in the listeners set (alive = seen in the last 10 s).
HEARTBEAT_S = 1.0
#: /livez fails once the claim loop (which turns at least once a second) has not turned for
#: this long: the process is wedged, and restarting it is the cure.
PULSE_STALE_S = 30.0
#: Keyspace events handled per script call.
EVENT_BATCH = 1000
#: `expire` events are adopted in batches gathered over this long (a legacy timer due
#: sooner than this after it is set fires up to this late).
ADOPT_AFTER_S = 0.02
#: `del` and `expired` events wait this long before they are handled, so that the keys of
#: this listener's own claims (deleted as they are claimed) are known to be its own.
SETTLE_S = 0.1
#: How long a thread may hold the GIL while another waits for it (Python's default: 5 ms).
SWITCH_INTERVAL_S = 0.0005
#: Refused timer keys remembered so that each is logged once.
REFUSED_KEYS_KEPT = 10_000
#: Outcomes named by handlers that get a metric label of their own (the rest: "other").
MAX_OUTCOME_LABELS = 100
#: A running listener acknowledges committed firings in batches, at least this often: at
#: 1,000 timers a second one round trip for ~5 firings instead of one each. (A firing's
#: acknowledgement only releases it from its claim: until then a cancel finds it under way.)
ACK_EVERY_S = 0.005
#: Keys the sweeper asks SCAN for per step: each step holds Redis well under a millisecond.
SWEEP_COUNT = 200


class ListenerCrashed(DelayqError):
    """A listener thread died of an unexpected error; what it held comes back to Redis
    when its lease runs out."""


class Backoff:
    """Capped exponential backoff: 0.1 s, 0.2 s, ... up to `cap_s`."""

    def __init__(self, cap_s: float, first_s: float = 0.1) -> None:
        self.cap_s, self.first_s, self.n = cap_s, first_s, 0

    def next(self) -> float:
        delay: float = min(self.cap_s, self.first_s * 2.0**self.n)
        self.n += 1
        return delay

    def reset(self) -> None:
        self.n = 0


class Outage:
    """Logs an outage once when it starts and once, with its duration, when it ends."""

    def __init__(
        self, server: str, what: str, on_recovery: Callable[[], None] = lambda: None
    ) -> None:
        #: "redis" or "database": the `server` field of the JSON log lines.
        self.server = server
        self.what = what
        self.since: float | None = None
        self.count = 0
        self.on_recovery = on_recovery

    def failed(self, exc: BaseException) -> None:
        if self.since is None:
            self.since = time.monotonic()
            self.count += 1
            log.warning(
                "%s unreachable: %s",
                self.what,
                _one_line(exc),
                extra={"event": "outage", "server": self.server},
            )

    def ok(self) -> None:
        if self.since is not None:
            took_s = time.monotonic() - self.since
            log.warning(
                "%s back after %.1f s",
                self.what,
                took_s,
                extra={"event": "recovered", "server": self.server, "outage_s": round(took_s, 3)},
            )
            self.since = None
            self.on_recovery()


class Listener:
    """Runs until `stop()`; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        engine: Engine,
        keys: Keys,
        actions: Actions | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.keys = keys
        self.store = open_store(client, keys)
        #: On a Redis Cluster: the store is a ClusterStore, events come from every primary.
        self.cluster = is_cluster(client)
        self.actions = actions if actions is not None else load_actions(settings)
        self.applier = Applier(engine, settings, self.actions)
        # Breaks a batch stuck on a dead database link; probes Redis and the database in
        # the background, so that health answers at once.
        self.liveness = Liveness(settings, client, engine)
        self.lease_ms = int(settings.lease_s * 1000)
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.wake = threading.Event()
        #: Claimed firings, each released to the appliers at its due time.
        self.queue: DueQueue[Item] = DueQueue()
        #: Claim timers this long before they are due (DELAYQ_CLAIM_AHEAD_MS).
        self.claim_ahead_ms = settings.claim_ahead_ms
        self.externals = ExternalRunner(
            self.actions,
            lambda key: self.applier.parse_key(key),
            lambda firings: self.applier.recorded(firings),
            self.queue.put,
            self._external_failed,
            self.stopping,
        )
        # Claim no more than the applier can finish well within a lease.
        self.max_backlog = settings.batch_size * 4
        #: The claimer waits for the appliers to make room (then they wake it; otherwise
        #: it sleeps to the next due time, and claims all that falls due meanwhile at once).
        self.backlogged = False
        self.metrics = Metrics(*known_labels(self.actions))
        #: Redis figures for /metrics and the dashboard, read at most every few seconds.
        self.figures = CachedFigures(client, keys)
        self.metrics.redis_up.set_function(lambda: float(self.liveness.answering("redis")))
        self.metrics.database_up.set_function(lambda: float(self.liveness.answering("database")))
        #: Moves rows producers staged in delayq_outbox (connection=) to Redis.
        self.outbox = OutboxRelay(
            settings,
            engine,
            client,
            keys,
            self.stopping,
            self.metrics.registry,
            scripts=getattr(self.store, "scripts", None),
        )
        #: Retries of what fails as a whole batch (the database), and of unknown actions.
        self.policy = global_policy(settings)
        self.notifier = Notifier()
        self.id = f"{socket.gethostname()}:{os.getpid()}"
        self.subscribed = threading.Event()
        self.redis_outage = Outage(
            "redis", f"Redis at {mask_url(settings.redis_url)}", self.metrics.redis_reconnects.inc
        )
        self.db_outage = Outage(
            "database",
            f"database at {mask_url(settings.effective_database_url)}",
            self.metrics.db_outages.inc,
        )
        # SQLite has one writer at a time, and a second one waits in its busy handler's
        # sleeps (1, 2, 5, 10 ... ms): parallel appliers there only add lateness.
        self.appliers = 1 if engine.dialect.name == "sqlite" else settings.appliers
        self.claimed_here = RecentKeys()
        #: Committed outcomes waiting for the acker thread (only while `run` runs it;
        #: otherwise, as in tests and delayq.testing, each batch is acknowledged at once).
        self._acks: list[Outcome] = []
        self._acks_lock = threading.Lock()
        self._acking = False
        self._acks_closed = threading.Event()
        #: Timer keys the Redis user may not touch, each reported once (at most
        #: REFUSED_KEYS_KEPT remembered; past that, refusals are no longer logged).
        self.refused_keys: set[str] = set()
        #: When events may last have been missed (start-up, a resubscription): the sweeper
        #: catches up until a pass that began after it is complete.
        self.sweep_requested = time.monotonic()
        self.crashed: str | None = None
        #: The loops' threads once running, and when the claim loop last turned.
        self.threads: list[threading.Thread] = []
        self.pulse = time.monotonic()

    def stop(self) -> None:
        """Ask the listener to stop: called from a signal handler, so it only sets flags."""
        self.stopping.set()
        self.wake.set()

    def run(self) -> None:
        """Run until stop(): then finish the batch in hand and give back the rest."""
        self.liveness.start(self._guarded)
        try:
            self.applier.warm_up(self.appliers)
        except sa.exc.SQLAlchemyError as exc:
            self.db_outage.failed(exc)
        # Everything loaded so far lives as long as the process: keep it out of the
        # collector's full passes, which otherwise stall the loop for tens of ms.
        gc.freeze()
        # A thread waking for a due time waits for the GIL up to the switch interval
        # while another (parsing keyspace events, sweeping) holds it: 5 ms by default,
        # which was most of a timer's lateness at 1,000 timers a second.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        # Before the threads start, which inherit it: sleeps to a due time wake on time.
        fine_timer_slack()
        feeders = [
            threading.Thread(target=self._guarded(loop), name=f"delayq-{name}", daemon=True)
            for name, loop in (
                ("subscriber", self._subscribe_loop),
                ("claimer", self._claim_loop),
                ("sweeper", self._sweep_loop),
                ("outbox", self.outbox.run),
            )
            if name != "outbox" or self.outbox.poll_s > 0  # DELAYQ_OUTBOX_POLL_S=0: off
        ]
        appliers = [
            threading.Thread(
                target=self._guarded(self._apply_loop), name=f"delayq-applier-{n}", daemon=True
            )
            for n in range(self.appliers)
        ]
        acker = threading.Thread(
            target=self._guarded(self._ack_loop), name="delayq-acker", daemon=True
        )
        self._acking = True
        for t in [*feeders, *appliers, acker]:
            t.start()
        self.pulse = time.monotonic()
        self.threads = [*feeders, *appliers, acker]  # once started: /livez looks at them
        self.externals.start(self._guarded)
        while not self.stopping.wait(0.5):
            pass
        self.notifier.stopping()
        # External calls under way finish (each within its timeout) and are recorded.
        self.externals.join()
        for t in [*feeders, *appliers]:
            t.join()
        # What the appliers committed is acknowledged before the rest is given back.
        with self._acks_lock:
            self._acking = False
        self._acks_closed.set()
        acker.join()
        self.liveness.stop()
        # Claimed while the appliers were finishing: give it back too.
        self._release_queued()
        self._give_back(self.externals.drain())
        with contextlib.suppress(redis.RedisError):
            self.client.zrem(self.keys.listeners, self.id)
        if self.crashed is not None:
            raise ListenerCrashed(self.crashed)
        log.info("stopped")

    def _guarded(self, loop: Callable[[], None]) -> Callable[[], None]:
        """A loop that dies of a bug stops the whole listener, which then exits non-zero
        (systemd restarts it), instead of running on without it."""

        def run() -> None:
            try:
                loop()
            except BaseException as exc:
                log.exception("%s crashed; stopping", threading.current_thread().name)
                self.crashed = f"{threading.current_thread().name} crashed: {_one_line(exc)}"
                self.stop()

        return run

    # -- claimer -------------------------------------------------------------------------

    def _claim_loop(self) -> None:
        backoff = Backoff(self.settings.reconnect_backoff_max_s)
        last_beat = last_renewal = 0.0
        renew_every_s = self.settings.lease_s / 3
        while not self.stopping.is_set():
            # This loop turns at least once a second: it is the listener's pulse.
            self.notifier.watchdog()
            self.pulse = time.monotonic()
            if time.monotonic() - last_beat >= HEARTBEAT_S and self._heartbeat():
                last_beat = time.monotonic()
            if self.externals and time.monotonic() - last_renewal >= renew_every_s:
                last_renewal = time.monotonic()
                self._renew_external()
            self.backlogged = self.queue.qsize() >= self.max_backlog
            if self.backlogged:
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            self.wake.clear()
            try:
                claim = self.claim_due()
            except redis.RedisError as exc:
                self.redis_outage.failed(exc)
                self.stopping.wait(backoff.next())
                continue
            self.redis_outage.ok()
            backoff.reset()
            self._hand_out(claim.firings)
            if len(claim.firings) >= self.settings.batch_size:
                continue
            next_ms = claim.next_ms
            # Wake half the claim-ahead window before the next due time: that timer has
            # the other half for the claim's round trip and the hand-off, and the claim
            # takes every timer due in the window with it (at 1,000 a second, ~5 a claim
            # rather than one).
            lead_s = self.claim_ahead_ms / 2000
            wait_s = IDLE_CHECK_S if next_ms < 0 else (next_ms - claim.now_ms) / 1000 - lead_s
            self.wake.wait(min(IDLE_CHECK_S, max(wait_s, 0.0)))

    def _hand_out(self, firings: Iterable[Firing]) -> None:
        """Queue firings for the appliers, or for the workers of their external action;
        either holds a firing claimed ahead until it is due."""
        for firing in firings:
            action = self.applier.parse_key(firing.key)[1]
            if self.externals.takes(action):
                self.externals.submit(firing, action)
            else:
                self.queue.put(firing, firing.ready)

    def _renew_external(self) -> None:
        """Keep the leases of firings waiting for, or in, an external call."""
        # On a Redis error the claim reports the outage; a lease is long enough to wait.
        with contextlib.suppress(redis.RedisError):
            self.externals.with_held(lambda ids: self.store.renew(ids, self.lease_ms))

    def _heartbeat(self) -> bool:
        try:
            self.store.heartbeat(self.id)
        except redis.RedisError:
            return False  # the claim below reports the outage
        return True

    def health_problems(self) -> list[str]:
        """Why this listener is not healthy, one line each; empty when it is. Answers from
        memory at once: the round trips to Redis and the database run in the background."""
        problems = self.liveness.problems(queued=self.queue.qsize())
        if not self.subscribed.is_set():
            problems.append(f"subscription to {self.keys.expired_channel} is not live")
        return problems

    def live_problems(self) -> list[str]:
        """Why this process is not alive (a loop died, or the claim loop stopped turning);
        empty while it is. From memory only: no Redis or database round trip, so an outage
        of either never reads as a process to restart."""
        problems = [self.crashed] if self.crashed else []
        if self.stopping.is_set():
            return problems  # finishing the batch in hand: loops end on purpose
        dead = [t.name for t in self.threads if not t.is_alive()]
        if dead:
            problems.append(f"not running: {', '.join(dead)}")
        age_s = time.monotonic() - self.pulse
        if self.threads and age_s > PULSE_STALE_S:
            problems.append(f"the claim loop has not turned for {age_s:.0f} s")
        return problems

    def retry_dead(self, names: Sequence[str]) -> int:
        """Re-queue dead-lettered firings (all if none are named) to fire now."""
        return self.store.requeue_dead(names)

    def claim_due(self) -> Claim:
        """Claim due firings (and those due within the claim-ahead window, each marked
        with the instant it is due: delayq.due_queue) and firings whose lease ran out."""
        ahead = self.claim_ahead_ms
        claim = self.store.claim_due(self.settings.batch_size, self.lease_ms, ahead)
        if claim.firings:
            claimed_mono, wall = time.monotonic(), time.time()
            self.metrics.last_event = claimed_mono
            self.claimed_here.add(f.key for f in claim.firings)
            if ahead:
                claim.firings[:] = [
                    self._held_until_due(f, claim, claimed_mono, wall) for f in claim.firings
                ]
        return claim

    @staticmethod
    def _held_until_due(f: Firing, claim: Claim, claimed_mono: float, wall: float) -> Firing:
        """`f`, marked with the instant it falls due if it was claimed ahead."""
        ready = ready_at(f.due_ms, claim.now_ms, claimed_mono, wall)
        return dataclasses.replace(f, ready=ready) if ready > claimed_mono else f

    # -- subscriber ----------------------------------------------------------------------

    def _subscribe_loop(self) -> None:
        if self.cluster:
            self._cluster_subscribe_loop()
            return
        backoff = Backoff(self.settings.reconnect_backoff_max_s)
        while not self.stopping.is_set():
            pubsub = self.client.pubsub()  # type: ignore[no-untyped-call]
            try:
                early = self._subscribe(pubsub)
                self.redis_outage.ok()
                backoff.reset()
                self.wake.set()  # events may have been missed: look at the index now
                self.sweep_requested = time.monotonic()  # and for legacy timers set meanwhile
                self._pump(pubsub, early)
            except redis.RedisError as exc:
                self.subscribed.clear()
                self.redis_outage.failed(exc)
                self.stopping.wait(backoff.next())
            finally:
                self.subscribed.clear()
                pubsub.close()

    def _cluster_subscribe_loop(self) -> None:
        """On a cluster: events from every primary, resubscribed as the topology changes
        (delayq/cluster/events.py); each (re)subscription is caught up with like a
        reconnect here, and the due view is read again in full."""
        from delayq.cluster.events import ClusterEvents

        k = self.keys
        patterns = [k.expired_channel, k.expire_channel, k.del_channel, k.wake_pattern]
        events = ClusterEvents(self.store.router, patterns)  # type: ignore[attr-defined]
        try:
            events.start()
            self._pump(events, [])
        finally:
            self.subscribed.clear()
            events.close()

    def _caught_up(self, node: str) -> None:
        """A primary's subscription was (re)made: events may have been missed there."""
        self.wake.set()
        self.sweep_requested = time.monotonic()
        self.store.request_refresh()  # type: ignore[attr-defined]
        self._announce_subscription(
            f"every primary of {mask_url(self.settings.redis_url)}",
            f"subscribed to {self.keys.expired_channel} on {node}",
        )

    def _subscribe(self, pubsub: redis.client.PubSub) -> list[dict[str, Any]]:
        """Subscribe; returns the events that arrived before every confirmation did."""
        k = self.keys
        channels = (k.expired_channel, k.expire_channel, k.del_channel)
        pubsub.psubscribe(*channels)
        pubsub.subscribe(k.wake_channel)
        early: list[dict[str, Any]] = []
        confirmed = 0
        deadline = time.monotonic() + 10
        while confirmed < len(channels) + 1:
            if time.monotonic() > deadline:
                raise redis.TimeoutError("no subscription confirmation within 10 s")
            msg = pubsub.get_message(timeout=1.0)
            if msg is None:
                continue
            if msg["type"] in ("subscribe", "psubscribe"):
                confirmed += 1
            else:
                early.append(msg)
        self.subscribed.set()
        self._announce_subscription(
            mask_url(self.settings.redis_url), f"subscribed again to {self.keys.expired_channel}"
        )
        return early

    def _announce_subscription(self, where: str, again: str) -> None:
        """The first subscription makes the listener ready (logged, and told to systemd);
        a later one is logged as `again`."""
        if self.ready.is_set():
            log.info("%s", again)
            return
        status = (
            f"listening: {self.keys.expired_channel} on {where}, "
            f"database {mask_url(self.settings.effective_database_url)}"
        )
        log.info("%s", status)
        self.ready.set()
        self.notifier.ready(status)

    def _pump(self, pubsub: Any, early: list[dict[str, Any]]) -> None:
        """Hand keyspace events on in batches: `expire` (adopt) after ADOPT_AFTER_S, `del`
        (forget) and `expired` (claim) after SETTLE_S. Batches keep the scripts' calls few;
        the settle time lets this listener's own claims, whose keys are deleted as they
        are claimed, be recognised here without asking Redis."""
        k = self.keys
        waiting = {k.expire_channel: Events(), k.del_channel: Events(), k.expired_channel: Events()}
        handlers: dict[str, tuple[float, Callable[[list[str]], object]]] = {
            k.expire_channel: (
                ADOPT_AFTER_S,
                lambda keys: self._each_allowed(self.store.adopt, keys),
            ),
            k.del_channel: (SETTLE_S, lambda keys: self._each_allowed(self.store.forget, keys)),
            k.expired_channel: (SETTLE_S, self.claim_expired),
        }
        while not self.stopping.is_set():
            busy = any(waiting.values())
            batch = early or self._read_events(pubsub, timeout_s=ADOPT_AFTER_S if busy else 0.2)
            early = []
            now = time.monotonic()
            if self.cluster:
                batch = self._cluster_messages(pubsub, batch)
            for msg in batch:
                if msg["type"] == "pmessage":
                    key = msg["data"]
                    if not k.is_own(key):
                        waiting[msg["channel"]].add(now, key)
                        self.metrics.last_event = now
                elif msg["type"] == "message":
                    self.wake.set()
            for channel, (after_s, handle) in handlers.items():
                keys = waiting[channel].take(now - after_s, EVENT_BATCH)
                if channel != k.expire_channel:
                    keys = [key for key in keys if key not in self.claimed_here]
                if keys:
                    handle(keys)

    def _cluster_messages(self, events: Any, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Handle a cluster's own messages (wake-ups of a slot, subscription markers);
        returns the keyspace events."""
        out = []
        for msg in batch:
            if msg["type"] == "subscribed":
                self._caught_up(msg["node"])
            elif msg["pattern"] == self.keys.wake_pattern:
                self.store.note_wake(msg["channel"], msg["data"])  # type: ignore[attr-defined]
                self.wake.set()
            else:
                out.append(msg)
        if events.live():
            self.subscribed.set()
        else:
            self.subscribed.clear()
        return out

    @staticmethod
    def _read_events(pubsub: Any, timeout_s: float) -> list[dict[str, Any]]:
        """Up to EVENT_BATCH messages: waits up to `timeout_s` for the first, takes what
        else is there."""
        batch: list[dict[str, Any]] = []
        msg = pubsub.get_message(timeout=timeout_s)
        while msg is not None:
            batch.append(msg)
            if len(batch) >= EVENT_BATCH:
                break
            msg = pubsub.get_message(timeout=0)
        return batch

    def claim_expired(self, expired_keys: Sequence[str]) -> None:
        """Claim the timers named by 'expired' events that nobody is firing yet."""
        self._hand_out(self.store.claim_expired(expired_keys, self.lease_ms))

    def _each_allowed(self, call: Callable[[Sequence[str]], int], keys: Sequence[str]) -> int:
        """`call(keys)`; if the Redis user may not touch one of the keys (an ACL that
        lists the actions it may touch, and a key of another action), call it key by key
        and skip, with one warning each, the keys refused."""
        try:
            return call(keys)
        except redis.exceptions.NoPermissionError:
            pass
        done = 0
        for key in keys:
            try:
                done += call([key])
            except redis.exceptions.NoPermissionError as exc:
                if key not in self.refused_keys and len(self.refused_keys) < REFUSED_KEYS_KEPT:
                    self.refused_keys.add(key)
                    log.warning(
                        "Redis refused access to timer key %s (%s): add its action to the "
                        "listener's ACL key patterns (deploy/redis/users.acl)",
                        key,
                        _one_line(exc),
                    )
        return done

    # -- sweeper -------------------------------------------------------------------------

    def _sweep_loop(self) -> None:
        """SCAN the timer DB for ever, adopting TTL keys whose `expire` event nobody heard:
        set while no listener ran, during a disconnect, or on a server that publishes no
        `expire` events (no `g` in notify-keyspace-events, a replica promoted without it).
        The pass after start-up or a reconnect catches up at half speed (each step
        holds Redis well under a millisecond, and the thread rests as long as a step
        took); the rest at DELAYQ_SWEEP_KEYS_PER_S, so its cost to Redis stays bounded."""
        cursor, adopted = 0, 0
        step_s = SWEEP_COUNT / self.settings.sweep_keys_per_s
        pass_started, covered_until = time.monotonic(), float("-inf")
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                cursor, found = self.store.scan_timers(cursor, SWEEP_COUNT)
                adopt = self.store.adopt_on_node if self.cluster else self.store.adopt  # type: ignore[attr-defined]
                n = self._each_allowed(adopt, found) if found else 0
            except redis.RedisError:
                # The claimer reports the outage; start the pass again once Redis is back.
                cursor, pass_started = 0, time.monotonic()
                self.stopping.wait(1.0)
                continue
            adopted += n
            if cursor == 0:
                if adopted:
                    log.info(
                        "sweep adopted %d timers set by other producers",
                        adopted,
                        extra={"event": "sweep", "adopted": adopted},
                    )
                adopted = 0
                covered_until, pass_started = pass_started, time.monotonic()
            took_s = time.monotonic() - started
            if self.sweep_requested <= covered_until:
                self.stopping.wait(max(0.0, step_s - took_s))
            else:
                # Catching up: half of this thread's time, so the claimer and the
                # appliers keep the GIL (and Redis) most of the time.
                self.stopping.wait(took_s)

    # -- applier -------------------------------------------------------------------------

    def _apply_loop(self) -> None:
        while True:
            # What is due, or (claimed ahead) what falls due in PREPARE_S: the transaction
            # is opened first, and waits for that instant.
            batch, ready = self.queue.take(self.settings.batch_size, 0.1, PREPARE_S)
            if not batch:
                if self.stopping.is_set():
                    return
                continue
            if self.backlogged:
                self.wake.set()  # room in the backlog again
            self.apply_batch(batch, not_before=ready)
            if self.stopping.is_set():
                self._release_queued()
                return

    def apply_batch(self, batch: Sequence[Item], not_before: float = 0.0) -> None:
        """Apply one micro-batch and acknowledge it, or send it back for a retry; nothing
        of it is applied before the monotonic instant `not_before`."""
        own: list[Item] = []
        external: list[Firing] = []
        for item in batch:
            if isinstance(item, Firing) and self._external(item):
                external.append(item)
            else:
                own.append(item)
        if external:
            # Claimed before this listener knew better (a test's direct hand-off): they
            # belong to their action's workers.
            self._hand_out(external)
            if not own:
                return
        batch = own
        started = time.monotonic()
        try:
            # A batch whose connection stops answering has it broken by the watch.
            with self.liveness.batch(len(batch)):
                try:
                    outcomes = self.applier.apply(batch, not_before)
                except sa.exc.DBAPIError as exc:
                    if not exc.connection_invalidated:
                        raise
                    # A pooled connection the server had dropped (restart, idle timeout,
                    # broken by the watch): the pool has discarded it, so one more try
                    # gets a fresh one.
                    outcomes = self.applier.apply(batch, not_before)
        except sa.exc.SQLAlchemyError as exc:
            if len(batch) > 1 and not is_transient(exc):
                # One bad firing must not hold back the rest: isolate it.
                for item in batch:
                    self.apply_batch([item])
                return
            self.db_outage.failed(exc)
            self._retry_later([firing_of(i) for i in batch], exc)
            return
        self.db_outage.ok()
        took_s = time.monotonic() - started
        self.metrics.batch.observe(took_s)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.last_batch.set_to_current_time()
        settled = [o for o in outcomes if not o.failed]
        self._ack(settled)
        for spec, failed in self._by_action([o for o in outcomes if o.failed]):
            self._handler_failed(failed, spec)
        self._log_batch(outcomes, took_s)

    def _external(self, firing: Firing) -> bool:
        return self.externals.takes(self.applier.parse_key(firing.key)[1])

    def _by_action(self, failed: list[Outcome]) -> list[tuple[ActionSpec | None, list[Outcome]]]:
        groups: dict[str, list[Outcome]] = {}
        for o in failed:
            groups.setdefault(o.action, []).append(o)
        return [(self.actions.get(a), g) for a, g in sorted(groups.items())]

    def _external_failed(self, outcome: Outcome, spec: ActionSpec) -> None:
        """An external call raised: retry it later, or dead-letter it."""
        self.metrics.observe_firing(outcome.action, FAILED, None)
        self._handler_failed([outcome], spec)

    def _handler_failed(self, failed: Sequence[Outcome], spec: ActionSpec | None) -> None:
        """Firings whose handler raised: each is tried again after the action's backoff, or
        dead-lettered after its attempts (at once for delayq.GiveUp)."""
        policy = spec.policy if spec is not None and spec.policy is not None else self.policy
        attempts = policy.max_attempts
        for o in failed:
            assert o.error is not None
            final = o.permanent or o.firing.attempt >= attempts
            log.log(
                logging.ERROR if final else logging.WARNING,
                "action %s failed for %s (attempt %d of %d%s): %s",
                o.action,
                o.firing.id,
                o.firing.attempt,
                attempts,
                ", not retried" if o.permanent else "",
                o.detail or _one_line(o.error),
                extra={
                    "event": "action_failed",
                    "action": o.action,
                    "firing": o.firing.id,
                    "attempt": o.firing.attempt,
                    "max_attempts": attempts,
                    "final": final,
                },
            )
        permanent = [o for o in failed if o.permanent]
        retryable = [o for o in failed if not o.permanent]
        for group, max_attempts in ((permanent, 1), (retryable, None)):
            if group:
                self._retry_later(
                    [o.firing for o in group],
                    group[-1].error or RuntimeError(FAILED),
                    policy=policy,
                    max_attempts=max_attempts,
                    error=group[-1].detail,
                )

    def _ack(self, outcomes: Sequence[Outcome]) -> None:
        """Acknowledge committed outcomes: through the acker while the listener runs."""
        if not outcomes:
            return
        with self._acks_lock:
            if self._acking:
                self._acks.extend(outcomes)
                return
        self._send_acks(outcomes)

    def _ack_loop(self) -> None:
        while not self._acks_closed.wait(ACK_EVERY_S):
            self._flush_acks()
        self._flush_acks()

    def _flush_acks(self) -> None:
        with self._acks_lock:
            outcomes, self._acks = self._acks, []
        if outcomes:
            self._send_acks(outcomes)

    def _send_acks(self, outcomes: Sequence[Outcome]) -> None:
        # The chart's per-minute figures (delayq.firing_stats), in the ack's round trip.
        late = [o.lateness_ms for o in outcomes if o.outcome == APPLIED]
        stats = firing_stats.record_call(self.keys, len(outcomes), late)
        try:
            self.store.ack([o.firing.id for o in outcomes], RECENT_WINDOW_MS, stats)
        except redis.RedisError as exc:
            # The outcomes are committed; when the leases run out the firings come round
            # again and are recognised as already recorded.
            self.redis_outage.failed(exc)

    def _retry_later(
        self,
        batch: Sequence[Firing],
        exc: BaseException,
        *,
        policy: Policy | None = None,
        max_attempts: int | None = None,
        error: str | None = None,
    ) -> None:
        """Count a failed attempt of each firing: retried after a backoff (the action's
        policy, else the global settings), or dead-lettered after its last attempt."""
        policy = policy or self.policy
        attempts = max_attempts or policy.max_attempts
        try:
            dead = self.store.retry_later(
                [f.id for f in batch],
                max_attempts=attempts,
                backoff_ms=int(policy.backoff_s * 1000),
                backoff_max_ms=int(policy.backoff_max_s * 1000),
                error=(error or _one_line(exc))[:300],
            )
        except redis.RedisError as redis_exc:
            # Leases will run out and the firings be claimed again: nothing is lost.
            self.redis_outage.failed(redis_exc)
            return
        if dead:
            self.metrics.dead_lettered.inc(dead)
            log.error(
                "dead-lettered %d timers after %s: %s",
                dead,
                "a failure not worth retrying"
                if attempts == 1 and max_attempts
                else f"{attempts} attempts",
                error or _one_line(exc),
                extra={"event": "dead_lettered", "dead_lettered": dead, "max_attempts": attempts},
            )

    def _release_queued(self) -> None:
        """On stop: record the external calls that have finished (else they would be made
        again), give back the firings not yet applied."""
        items = self.queue.drain()
        done = [i for i in items if isinstance(i, Done)]
        if done:
            self.apply_batch(done)
        self._give_back([i.id for i in items if isinstance(i, Firing)])

    def _give_back(self, ids: list[str]) -> None:
        if ids:
            try:
                self.store.release(ids)
                log.info(
                    "gave back %d claimed timers",
                    len(ids),
                    extra={"event": "gave_back", "released": len(ids)},
                )
            except redis.RedisError as exc:
                log.warning(
                    "could not give back %d claimed timers (%s): they are claimable "
                    "again when their lease runs out",
                    len(ids),
                    _one_line(exc),
                )

    def _log_batch(self, outcomes: Sequence[Outcome], took_s: float) -> None:
        for o in outcomes:
            # Outcomes a handler names: counted under their own label, up to a bound.
            if (
                o.outcome not in self.metrics.outcomes
                and o.action in self.actions
                and len(self.metrics.outcomes) < MAX_OUTCOME_LABELS
            ):
                self.metrics.allow(outcomes=[o.outcome])
            applied = o.outcome == APPLIED
            self.metrics.observe_firing(o.action, o.outcome, o.lateness_ms if applied else None)
        level = logging.INFO
        if any(o.outcome in ("unknown_action", "malformed_key") for o in outcomes):
            level = logging.WARNING
        unknown = sorted({o.action for o in outcomes if o.outcome == UNKNOWN_ACTION})
        if unknown:
            log.warning(
                "no handler or webhook here for actions %s: their firings are recorded as "
                "unknown_action (load their module with DELAYQ_APP, or set "
                "DELAYQ_WEBHOOK_<ACTION>)",
                ", ".join(unknown),
            )
        unmapped = sorted({o.action for o in outcomes if o.outcome == UNMAPPED_FLAG})
        if unmapped:
            log.warning(
                "timer keys end in flags %s, which name no action: map them with "
                "DELAYQ_FLAG_ACTIONS (e.g. DELAYQ_FLAG_ACTIONS=1=cancel)",
                ", ".join(unmapped),
            )
        if not log.isEnabledFor(level):
            return  # at 1,000 batches a second, building an unused line is CPU spent
        counts = Counter((o.action, o.outcome) for o in outcomes)
        late = [o.lateness_ms for o in outcomes if o.outcome == APPLIED]
        summary = ", ".join(f"{a} {o} {n}" for (a, o), n in sorted(counts.items()))
        lateness = f"; lateness max {max(late):.1f} ms" if late else ""
        by_outcome: Counter[str] = Counter()
        by_action: Counter[str] = Counter()
        for (action, outcome), n in counts.items():
            by_outcome[outcome] += n
            by_action[action] += n
        fields = {
            "event": "batch",
            "batch_size": len(outcomes),
            "duration_ms": round(took_s * 1000, 3),
            "outcomes": dict(sorted(by_outcome.items())),
            "actions": dict(sorted(by_action.items())),
            "lateness_max_ms": round(max(late), 3) if late else None,
        }
        log.log(
            level,
            "fired %d in %.1f ms: %s%s",
            len(outcomes),
            took_s * 1000,
            summary,
            lateness,
            extra=fields,
        )


class Events:
    """Keys named by keyspace events of one kind, oldest first, until handled."""

    def __init__(self) -> None:
        self._queue: deque[tuple[float, str]] = deque()

    def __bool__(self) -> bool:
        return bool(self._queue)

    def add(self, at: float, key: str) -> None:
        self._queue.append((at, key))

    def take(self, until: float, limit: int) -> list[str]:
        """Keys that arrived at or before `until` (all of them once `limit` are waiting)."""
        q = self._queue
        if len(q) >= limit:
            until = float("inf")
        keys: list[str] = []
        while q and q[0][0] <= until and len(keys) < limit:
            keys.append(q.popleft()[1])
        return keys


class RecentKeys:
    """Keys this listener claimed in the last `window_s` seconds (thread-safe)."""

    def __init__(self, window_s: float = 30.0) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._since: dict[str, float] = {}
        self._order: deque[tuple[float, str]] = deque()

    def add(self, keys: Iterable[str]) -> None:
        now = time.monotonic()
        with self._lock:
            for key in keys:
                self._since[key] = now
                self._order.append((now, key))
            while self._order and self._order[0][0] < now - self.window_s:
                t, key = self._order.popleft()
                if self._since.get(key) == t:
                    del self._since[key]

    def __contains__(self, key: object) -> bool:
        return key in self._since


def _one_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc) or type(exc).__name__
    return text.splitlines()[0]
