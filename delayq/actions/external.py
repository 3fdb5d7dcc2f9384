"""External actions run outside the database transaction, in workers of their own.

A webhook or an `external=True` handler talks to another service: it cannot commit with
the database, so it runs at least once: a call that succeeded, followed by a crash before
its outcome is committed, is made again (with the same idempotency key) when its firing
comes round again. Each action has its own threads (DELAYQ_ACTION_<NAME>_CONCURRENCY,
default DELAYQ_EXTERNAL_CONCURRENCY), so a slow or failing service holds up neither the
database actions nor the other external actions.

    claimer ──> ExternalRunner.submit ──> [action's queue] ──> worker: call
                                                              ├─ done ──> applier queue:
                                                              │           record outcome, ack
                                                              └─ raised ──> on_failed:
                                                                          retry later / dead

While a firing waits in its queue or its call runs, the listener renews its lease
(`with_held`), so no other listener calls it meanwhile.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from delayq.actions.core import (
    ALREADY_RECORDED,
    FAILED,
    SKIPPED,
    Done,
    Outcome,
    Skip,
    as_result,
    context_for,
    utcnow,
)
from delayq.actions.registry import Actions, ActionSpec
from delayq.due_queue import sleep_until
from delayq.store import Firing

log = logging.getLogger("delayq.actions")


class ExternalRunner:
    """The worker threads of every external action."""

    def __init__(
        self,
        actions: Actions,
        parse_key: Callable[[str], tuple[str, str]],
        recorded: Callable[[list[Firing]], set[str]],
        on_done: Callable[[Done], None],
        on_failed: Callable[[Outcome, ActionSpec], None],
        stopping: threading.Event,
    ) -> None:
        self.actions = actions
        self.parse_key = parse_key
        self.recorded = recorded
        self.on_done = on_done
        self.on_failed = on_failed
        self.stopping = stopping
        self.queues: dict[str, queue.Queue[Firing]] = {
            spec.name: queue.Queue() for spec in actions.external
        }
        #: Firing ids queued or being called: their leases are renewed. Guarded by `lock`,
        #: which a renewal holds too, so that no renewal lands after a firing has been
        #: handed on (and its retry time set).
        self.lock = threading.Lock()
        self._held: set[str] = set()
        self.threads: list[threading.Thread] = []

    def __bool__(self) -> bool:
        return bool(self.queues)

    def start(self, guard: Callable[[Callable[[], None]], Callable[[], None]]) -> None:
        for spec in self.actions.external:
            assert spec.policy is not None
            warm_up = getattr(spec.handler, "warm_up", None)
            if warm_up is not None:  # a webhook's client, before the first firing waits
                warm_up(spec.policy.concurrency)
            for n in range(spec.policy.concurrency):
                thread = threading.Thread(
                    target=guard(lambda spec=spec: self._work(spec)),  # type: ignore[misc]
                    name=f"delayq-{spec.name}-{n}",
                    daemon=True,
                )
                thread.start()
                self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join()
        for spec in self.actions.external:
            close = getattr(spec.handler, "close", None)
            if close is not None:
                close()

    def takes(self, action: str) -> bool:
        return action in self.queues

    def submit(self, firing: Firing, action: str) -> None:
        with self.lock:
            if firing.id in self._held:
                return  # queued or being called here already (claimed again meanwhile)
            self._held.add(firing.id)
        self.queues[action].put(firing)

    def with_held(self, use: Callable[[list[str]], object]) -> None:
        """`use(ids)` of the firings held, with none handed on meanwhile."""
        with self.lock:
            if self._held:
                use(list(self._held))

    def drain(self) -> list[str]:
        """Firing ids still queued (not yet called), taken off the queues: on stop, they
        are handed back."""
        ids: list[str] = []
        for q in self.queues.values():
            while True:
                try:
                    ids.append(q.get_nowait().id)
                except queue.Empty:
                    break
        with self.lock:
            self._held.difference_update(ids)
        return ids

    def _release(self, firing: Firing) -> None:
        with self.lock:
            self._held.discard(firing.id)

    def _work(self, spec: ActionSpec) -> None:
        q = self.queues[spec.name]
        while not self.stopping.is_set():
            try:
                firing = q.get(timeout=0.1)
            except queue.Empty:
                continue
            self.call(spec, firing)

    def call(self, spec: ActionSpec, firing: Firing) -> None:
        """Make the call of one firing and hand its outcome on."""
        assert spec.policy is not None
        order_sn, action = self.parse_key(firing.key)
        sleep_until(firing.ready)  # claimed ahead of its due time: never called early
        if firing.reclaimed:
            try:
                done_before = firing.id in self.recorded([firing])
            except Exception as exc:  # the database: the applier will report it
                log.debug("could not look up %s: %s", firing.id, exc)
                done_before = False
            if done_before:
                self._hand_on(Done(firing, ALREADY_RECORDED, None, utcnow()))
                return
        fired_at = utcnow()
        ctx = context_for(firing, order_sn, action, fired_at, timeout_s=spec.policy.timeout_s)
        try:
            result = as_result(spec.handler(ctx))
        except Skip as skip:
            self._hand_on(Done(firing, SKIPPED, skip.reason[:255] or None, fired_at))
        except Exception as exc:
            self._release(firing)
            text = (str(exc) or type(exc).__name__).splitlines()[0][:255]
            self.on_failed(
                Outcome(firing, order_sn, action, FAILED, fired_at, text, error=exc), spec
            )
        else:
            self._hand_on(Done(firing, result.outcome, result.detail, fired_at))

    def _hand_on(self, done: Done) -> None:
        self._release(done.firing)
        self.on_done(done)
