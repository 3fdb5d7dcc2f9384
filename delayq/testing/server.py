"""TimerTestServer: a private Redis for one test, your code pointed at it, and due timers
fired on demand by the listener's own machinery.

    with delayq.testing.running(database_url=url) as server, server.use():
        create_order("SN1")                  # calls delayq.schedule_expiry("SN1", "20m")
        fired = server.fire_due()            # the 20 minutes pass at once
        assert fired[0].outcome == "applied" # SN1 is cancelled in your database

Nothing is mocked: the timers are in a real redis-server, the firings are claimed by the
same Lua scripts, applied by the same Applier in one database transaction with their
outcome row, and acknowledged, as `delayq listen` does. What `fire_due` changes is time:
the timers it is asked to fire are rescheduled to fire now (with the schedule script, so
the index stays consistent), so a handler sees the moment it was fired as `ctx.due_at`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from delayq import producer as producer_module
from delayq.actions import APPLIED, Outcome, load_actions
from delayq.actions.registry import _registered
from delayq.context import Delayq
from delayq.errors import DelayqError
from delayq.introspect import PendingTimer
from delayq.keys import firing_id
from delayq.layout import read_layout
from delayq.producer import Producer
from delayq.settings import ENV_PREFIX, Settings
from delayq.store import schedule_call
from delayq.testing.drain import Drain
from delayq.testing.redis_process import PrivateRedis, short_temp_dir
from delayq.timing import Delay, from_ms, parse_delay_ms

#: Timers rescheduled per script call by fire_due.
_CHUNK = 100
#: Attempts at rescheduling while other clients keep changing the same index shards.
_WATCH_ATTEMPTS = 20


@dataclass(frozen=True)
class Fired:
    """What became of one firing in `fire_due`."""

    order_sn: str
    action: str
    #: `applied`, `skipped_not_unpaid`, `not_found`, your handler's own outcome,
    #: `unknown_action`, or `failed` (the handler raised: retried after its backoff).
    outcome: str
    #: The detail stored with the outcome, or the error of a failed handler.
    detail: str | None
    #: When the timer was scheduled to fire (before fire_due made it due now), aware UTC.
    due_at: datetime
    #: When it was fired, aware UTC.
    fired_at: datetime
    attempt: int = 1
    #: What the handler raised (failed, or delayq.Skip for a skip).
    error: BaseException | None = field(default=None, compare=False, repr=False)

    @property
    def applied(self) -> bool:
        return self.outcome == APPLIED


class TimerTestServer:
    """A private redis-server with keyspace events, settings pointing at it, and fire_due.

    `database_url`: your test database (any SQLAlchemy URL; default: an SQLite file in the
    server's temporary directory, `server.settings.effective_database_url`). `app`: the
    modules of your @delayq.action handlers, as DELAYQ_APP (handlers already imported are
    known anyway). Other keyword arguments are Settings fields (orders_table=...). Settings
    not given come from the environment and `env_file`, like your code's, except that
    Redis, the database and the data directory are always the test's own."""

    def __init__(
        self,
        *,
        database_url: str | None = None,
        app: str | None = None,
        env_file: str | Path | None = ".env",
        **overrides: Any,
    ) -> None:
        self.dir = short_temp_dir()
        try:
            self._given = {**overrides, "app": app, "wait_replicas": 0}
            self.settings = Settings.load(
                env_file,
                **self._given,
                redis_url=f"unix://{self.dir / 'redis.sock'}?db=0",
                database_url=database_url or f"sqlite:///{self.dir / 'delayq.db'}",
                home=self.dir / "home",
            )
            self.redis_process = PrivateRedis(self.settings, self.dir)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        #: Every firing fire_due has seen so far, in order.
        self.fired: list[Fired] = []
        self._delayq: Delayq | None = None
        self._drain: Drain | None = None
        self._drain_actions: dict[str, Any] = {}
        self._migrated = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> TimerTestServer:
        """Start the redis-server; stop() (or the with block's end) stops it."""
        try:
            self.redis_process.start()
            self._delayq = Delayq(self.settings)
            self._delayq.redis.ping()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Close every connection, stop the redis-server and wait for it to exit, remove
        the temporary directory. Safe to call more than once."""
        try:
            if self._drain is not None:
                self._drain.close()
                self._drain = None
            if self._delayq is not None:
                ctx, self._delayq = self._delayq, None
                if "engine" in ctx.__dict__:
                    ctx.engine.dispose()
                if "redis" in ctx.__dict__:
                    ctx.redis.close()
        finally:
            self.redis_process.stop()
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> TimerTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what your code is given -----------------------------------------------------------

    @property
    def url(self) -> str:
        """The test Redis's URL (a unix socket)."""
        assert self.settings.redis_url is not None
        return self.settings.redis_url

    @property
    def env(self) -> dict[str, str]:
        """DELAYQ_* variables pointing code that reads the environment at the test's
        Redis and database (`use()` sets them; or monkeypatch.setenv each)."""
        env = {
            f"{ENV_PREFIX}{name.upper()}": str(value)
            for name, value in self._given.items()
            if value is not None
        }
        env.update(
            {
                f"{ENV_PREFIX}REDIS_URL": self.url,
                f"{ENV_PREFIX}DATABASE_URL": self.settings.effective_database_url,
                f"{ENV_PREFIX}HOME": str(self.settings.home),
            }
        )
        return env

    @property
    def delayq(self) -> Delayq:
        """The connections for these settings: `.redis`, `.store`, `.engine`, `.inspect()`,
        `.status()`, as the CLI uses them."""
        if self._delayq is None:
            raise DelayqError("the test Redis is not running: use `with running(...)`")
        return self._delayq

    @property
    def redis(self) -> redis.Redis:
        return self.delayq.redis

    def producer(self) -> Producer:
        """A new producer for the test Redis (close its `.client` when done)."""
        return Producer.from_settings(self.settings)

    @contextlib.contextmanager
    def use(self) -> Iterator[TimerTestServer]:
        """For the block: the DELAYQ_* variables of `env` set in os.environ, and delayq's
        process-wide default producers (what delayq.schedule_expiry and cancel_expiry use,
        and their delayq.aio twins) talking to the test Redis. Everything is put back as it
        was afterwards."""
        ours = self.producer()
        saved = {name: os.environ.get(name) for name in self.env}
        os.environ.update(self.env)
        with producer_module._default_lock:
            previous, producer_module._default = producer_module._default, ours
        # The async default is made from the environment on first use in each event loop.
        previous_aio = _swap_aio_default(None)
        _forget_cached_settings()
        try:
            yield self
        finally:
            with producer_module._default_lock:
                producer_module._default = previous
            _swap_aio_default(previous_aio)
            ours.client.close()
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            _forget_cached_settings()

    # -- looking and firing ----------------------------------------------------------------

    def pending(self) -> list[PendingTimer]:
        """Every pending timer, earliest due first (timers staged with `connection=` by
        committed transactions included: they are relayed to Redis first)."""
        self._relay_outbox()
        return [
            PendingTimer(*_split(key), from_ms(due)) for key, due in sorted(self._index(), key=_due)
        ]

    def fire_due(self, within: Delay | None = None) -> list[Fired]:
        """Fire now, in this thread, every timer due within `within` ('20m', seconds or a
        timedelta; default: every timer pending now), and everything already due; returns
        what became of each firing, in due order. Each is claimed, applied in the database
        (your @delayq.action handlers included) and acknowledged as a listener would; a
        handler that raises gives a `failed` outcome and its firing is retried after its
        backoff. Raises ServiceUnavailable if the database or Redis fails.

        Time order is kept where it matters: timers are fired in waves, in due order, and
        two timers of one order are never in the same wave (an order's reminder at 15
        minutes is applied before its cancel at 20). Timers that handlers schedule while
        this runs are left pending: call fire_due again."""
        limit_ms = None if within is None else parse_delay_ms(within)
        self._relay_outbox()
        self._adopt_ttl_keys()
        now_ms = _redis_now_ms(self.redis)
        limit = None if limit_ms is None else now_ms + limit_ms
        fired: list[Fired] = []
        wanted = [(key, due) for key, due in self._index() if limit is None or due <= limit]
        for wave in _waves(sorted(wanted, key=_due)):
            originals = {firing_id(key, due): due for key, due in wave if due <= now_ms}
            later = [(key, due) for key, due in wave if due > now_ms]
            for start in range(0, len(later), _CHUNK):
                made_due = self._make_due(later[start : start + _CHUNK])
                for key, (was, due) in made_due.items():
                    originals[firing_id(key, due)] = was
            wave_fired = sorted(
                (_fired(o, originals) for o in self._drainer().drain()),
                key=lambda f: (f.due_at, f.order_sn, f.action),
            )
            self.fired += wave_fired
            fired += wave_fired
        if not wanted:  # nothing pending, but maybe firings whose retry time has come
            fired = [_fired(o, {}) for o in self._drainer().drain()]
            self.fired += fired
        return fired

    def migrate(self) -> None:
        """Create delayq's tables (delayq_outcomes, delayq_outbox; and the standard
        `orders` table if the database has none and orders_table is left at its default)
        in the test database. fire_due and pending do this the first time they run."""
        self.delayq.migrate()
        self._migrated = True

    def reset(self) -> None:
        """Empty the test Redis (every timer, claim and dead letter) and forget `fired`:
        for a server shared by several tests."""
        self.redis.flushdb()
        self.fired.clear()

    # -- the parts ---------------------------------------------------------------------------

    def _index(self) -> list[tuple[str, int]]:
        """(timer key, due ms) of every entry in the due index: the shards `heads` names."""
        k = self.delayq.keys
        shards: list[str] = self.redis.zrange(k.heads, 0, -1)  # type: ignore[assignment]
        pipe = self.redis.pipeline(transaction=False)
        for shard in shards:
            pipe.zrange(f"{k.shard_prefix}{shard}", 0, -1, withscores=True)
        return [(str(key), int(due)) for entries in pipe.execute() for key, due in entries]

    def _relay_outbox(self) -> None:
        """What the listener's relay does within milliseconds of a commit: timers staged
        in delayq_outbox are written to Redis."""
        if not self._migrated:
            self.migrate()
        self._drainer().relay_outbox()

    def _adopt_ttl_keys(self) -> None:
        """Index TTL keys set by code that does not use delayq (SETEX SN1:cancel 1200 x),
        as the listener's sweeper would."""
        store, cursor = self.delayq.store, 0
        while True:
            cursor, found = store.scan_timers(cursor, 1000)
            if found:
                store.adopt(found)
            if cursor == 0:
                return

    def _make_due(self, timers: list[tuple[str, int]]) -> dict[str, tuple[int, int]]:
        """Reschedule `timers` to now, each only if it is still pending at the due time it
        was read with: a timer cancelled or moved meanwhile is left as it is. Returns
        {timer key: (due before, due now)}."""
        k = self.delayq.keys
        with self.redis.pipeline(transaction=True) as pipe:
            for _ in range(_WATCH_ATTEMPTS):
                try:
                    # The layout too: a resize that starts moves entries between shards.
                    pipe.watch(k.layout)  # type: ignore[no-untyped-call]
                    layout = read_layout(pipe, k)
                    candidates = [(key, k.shards_of(key, layout)) for key, _ in timers]
                    shards = sorted({s for _, names in candidates for s in names})
                    pipe.watch(*shards)  # type: ignore[no-untyped-call]
                    scores = [
                        next(
                            (s for s in (pipe.zscore(n, key) for n in names) if s is not None), None
                        )
                        for key, names in candidates
                    ]
                    still = [
                        (key, due)
                        for (key, due), score in zip(timers, scores, strict=True)
                        if score is not None and int(score) == due
                    ]
                    if not still:
                        return {}
                    pipe.multi()
                    keys, args = schedule_call(k, [(key, "in", 0) for key, _ in still])
                    self.delayq.scripts.schedule(keys=keys, args=args, client=pipe)
                    (dues,) = pipe.execute()
                except redis.WatchError:
                    continue
                return {key: (was, int(d)) for (key, was), d in zip(still, dues, strict=True)}
        raise DelayqError("fire_due: the due index kept changing while timers were made due")

    def _drainer(self) -> Drain:
        """The hand-driven listener, made again when @delayq.action handlers were
        registered since the last one (a module imported after it)."""
        if self._drain is not None and self._drain_actions == _registered:
            return self._drain
        if self._drain is not None:
            self._drain.close()
        ctx = self.delayq
        actions = load_actions(self.settings)  # imports the app modules: registers more
        self._drain = Drain(self.settings, ctx.redis, ctx.engine, ctx.keys, actions)
        self._drain_actions = dict(_registered)
        return self._drain


@contextlib.contextmanager
def running(
    *, database_url: str | None = None, app: str | None = None, **overrides: Any
) -> Iterator[TimerTestServer]:
    """A started TimerTestServer for the block (see its docstring); its redis-server is
    stopped when the block ends, also when it raises."""
    with TimerTestServer(database_url=database_url, app=app, **overrides) as server:
        yield server


def _fired(o: Outcome, originals: dict[str, int]) -> Fired:
    due_ms = originals.get(o.firing.id, o.firing.due_ms)
    return Fired(
        order_sn=o.order_sn,
        action=o.action,
        outcome=o.outcome,
        detail=o.detail,
        due_at=from_ms(due_ms),
        fired_at=o.fired_at.replace(tzinfo=UTC),
        attempt=o.firing.attempt,
        error=o.error,
    )


def _waves(timers: list[tuple[str, int]]) -> Iterator[list[tuple[str, int]]]:
    """`timers` (in due order) cut where an order comes round again."""
    wave: list[tuple[str, int]] = []
    orders: set[str] = set()
    for key, due in timers:
        order_sn = _split(key)[0]
        if order_sn in orders:
            yield wave
            wave, orders = [], set()
        wave.append((key, due))
        orders.add(order_sn)
    if wave:
        yield wave


def _split(key: str) -> tuple[str, str]:
    order_sn, _, action = key.rpartition(":")
    return order_sn, action


def _due(entry: tuple[str, int]) -> tuple[int, str]:
    return entry[1], entry[0]


def _redis_now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _swap_aio_default(value: Any) -> Any:
    """Set delayq.aio's default producer (if delayq.aio is loaded); returns the one before."""
    aio = sys.modules.get("delayq.aio")
    if aio is None:
        return None
    previous = getattr(aio, "_default", None)
    aio._default = value  # type: ignore[attr-defined]
    return previous


def _forget_cached_settings() -> None:
    """delayq.inspect / status / pending keep the settings and engine they first built:
    make them read the environment again."""
    introspect = sys.modules.get("delayq.introspect")
    engine = getattr(introspect, "_engine", None)
    if engine is not None and engine.cache_info().currsize:
        made = engine()
        if made is not None:
            made.dispose()
    for name in ("_settings", "_engine"):
        clear = getattr(getattr(introspect, name, None), "cache_clear", None)
        if clear is not None:
            clear()
