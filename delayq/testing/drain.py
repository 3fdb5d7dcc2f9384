"""Fire what is due now, in the calling thread, with the listener's own machinery.

`Drain` is a `Listener` whose threads are never started: the test calls its outbox relay,
its claim, its apply-and-acknowledge step and, for external actions, the worker's call,
one after the other until nothing is due. A firing goes through exactly what it would go through in
`delayq listen`: the same claim script, the same Applier and transaction, the same
outcome row, acknowledgement, retry backoff and dead letters. Only the scheduling of that
work (threads, queues, wake-ups) is left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from delayq.actions import Actions, ActionSpec, Outcome
from delayq.actions.apply import Item
from delayq.errors import ServiceUnavailable
from delayq.keys import Keys
from delayq.listener import Listener, Outage
from delayq.settings import Settings, mask_url
from delayq.store import Firing

#: Rounds of claims one drain makes at most: a handler that schedules its own timer due at
#: once would otherwise keep a drain going for ever.
MAX_ROUNDS = 1000


class _Failure(Outage):
    """An Outage that also keeps the error, so that the drain can raise it."""

    error: BaseException | None = None

    def failed(self, exc: BaseException) -> None:
        self.error = exc
        super().failed(exc)


class Drain(Listener):
    """A listener driven by hand: `drain()` fires everything due now and returns what
    became of each firing."""

    def __init__(
        self, settings: Settings, client: redis.Redis, engine: Engine, keys: Keys, actions: Actions
    ) -> None:
        super().__init__(settings, client, engine, keys, actions)
        self.db_outage = _Failure(self.db_outage.server, self.db_outage.what)
        self.redis_outage = _Failure(self.redis_outage.server, self.redis_outage.what)
        self._outcomes: list[Outcome] = []
        # Fires what is due now, applied at once: nothing is claimed ahead to wait for.
        self.claim_ahead_ms = 0

    def drain(self) -> list[Outcome]:
        """Claim what is due, apply it and acknowledge it, round after round, until nothing
        is due. Handler failures are outcomes (FAILED, retried after their backoff like in
        a listener); a database or Redis that fails raises ServiceUnavailable."""
        self._outcomes = []
        for _ in range(MAX_ROUNDS):
            # In due order (the claim's is the index shards'), so that runs repeat.
            firings = sorted(self.claim_due().firings, key=lambda f: (f.due_ms, f.key))
            if not firings:
                break
            own: list[Item] = []
            for firing in firings:
                spec = self._external_spec(firing)
                if spec is None:
                    own.append(firing)
                else:
                    # What the action's worker thread does; its Done lands in the queue.
                    self.externals.call(spec, firing)
            own += self._queued()
            if own:
                self.apply_batch(own)
            self._raise_failure()
        return self._outcomes

    def relay_outbox(self) -> int:
        """Move the timers staged in delayq_outbox (schedule_expiry(..., connection=)) by
        committed transactions to Redis, as the listener's relay does; returns how many."""
        relayed = 0
        for _ in range(MAX_ROUNDS):
            try:
                n = self.outbox.relay_once()
            except (sa.exc.SQLAlchemyError, redis.RedisError) as exc:
                self.outbox._close()
                first = str(getattr(exc, "orig", None) or exc).splitlines()
                raise ServiceUnavailable(
                    f"fire_due: relaying delayq_outbox failed: {type(exc).__name__}: "
                    f"{first[0] if first else ''}"
                ) from exc
            relayed += n
            if not n:
                break
        return relayed

    def close(self) -> None:
        """Release what the listener opened (the relay's and the health probes'
        connections, webhook clients, the watch on the engine's pool)."""
        self.outbox._close()
        self.externals.join()  # no worker thread was started: this closes their clients
        self.liveness.stop()
        watch, engine = self.liveness.watch, self.applier.engine
        for name, fn in (("checkout", watch._checkout), ("checkin", watch._checkin)):
            if sa.event.contains(engine, name, fn):
                sa.event.remove(engine, name, fn)

    def _external_spec(self, firing: Firing) -> ActionSpec | None:
        action = self.applier.parse_key(firing.key)[1]
        return self.actions.get(action) if self.externals.takes(action) else None

    def _queued(self) -> list[Item]:
        return self.queue.drain()

    def _raise_failure(self) -> None:
        for outage, what in (
            (self.db_outage, f"the database at {mask_url(self.settings.effective_database_url)}"),
            (self.redis_outage, f"Redis at {mask_url(self.settings.redis_url)}"),
        ):
            assert isinstance(outage, _Failure)
            error, outage.error, outage.since = outage.error, None, None
            if error is not None:
                # Its firings are back in Redis with a retry time, as in a listener.
                first = str(getattr(error, "orig", None) or error).splitlines()
                raise ServiceUnavailable(
                    f"fire_due: {what} failed: {type(error).__name__}: {first[0] if first else ''}"
                ) from error

    # -- what the listener reports, kept for the caller ------------------------------------

    def _log_batch(self, outcomes: Sequence[Outcome], took_s: float) -> None:
        self._outcomes += outcomes
        super()._log_batch(outcomes, took_s)

    def _external_failed(self, outcome: Outcome, spec: ActionSpec) -> None:
        self._outcomes.append(outcome)
        super()._external_failed(outcome, spec)
