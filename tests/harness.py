"""delayq-specific test helpers: the CLI and `delayq listen` as real subprocesses, and
small readers of the orders and outcomes tables."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from delayq.db import make_engine
from delayq.keys import Keys
from delayq.settings import Settings
from tests.servers import log_tail, start_process, stop_process, wait_for

DELAYQ = str(Path(sys.executable).parent / "delayq")


def clean_env(**delayq: str) -> dict[str, str]:
    """The environment without the developer's DELAYQ_* settings, plus `delayq`'s
    (given as REDIS_URL=..., DATABASE_URL=...)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELAYQ_")}
    env.update({f"DELAYQ_{k}": v for k, v in delayq.items()})
    return env


def run_cli(
    *args: str, env: dict[str, str], cwd: Path | None = None, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DELAYQ, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )


@dataclass
class ListenerProcess:
    """`delayq listen` as a real subprocess, stopped by `stop()` (the fixture always does)."""

    env: dict[str, str]
    log: Path
    args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self, *, wait_ready: bool = True) -> ListenerProcess:
        self.proc = start_process([DELAYQ, "listen", *self.args], self.env, self.log)
        if wait_ready:
            wait_for(self._ready_or_dead, 30, what=f"listener ready ({self.log})")
            assert self.proc.poll() is None, f"listener exited:\n{log_tail(self.log)}"
        return self

    def _ready_or_dead(self) -> bool:
        assert self.proc is not None
        return self.proc.poll() is not None or "listening:" in self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        return stop_process(self.proc, timeout_s=30)


def engine_for(database_url: str) -> Engine:
    return make_engine(Settings(database_url=database_url))


def migrate_cli(env: dict[str, str]) -> None:
    done = run_cli("migrate", env=env)
    assert done.returncode == 0, done.stderr


def create_orders(engine: Engine, order_sns: Iterable[str], status: str = "unpaid") -> None:
    rows = [{"sn": sn, "st": status} for sn in order_sns]
    with engine.begin() as conn:
        # The plain INSERT an order service does: no other columns.
        conn.execute(sa.text("INSERT INTO orders (order_sn, status) VALUES (:sn, :st)"), rows)


def set_status(engine: Engine, order_sn: str, status: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE orders SET status = :st WHERE order_sn = :sn"),
            {"st": status, "sn": order_sn},
        )


def statuses(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT order_sn, status FROM orders")).all())  # type: ignore[arg-type]


@dataclass(frozen=True)
class OutcomeRow:
    order_sn: str
    action: str
    due_at: datetime
    fired_at: datetime
    outcome: str

    @property
    def lateness_ms(self) -> float:
        return (self.fired_at - self.due_at).total_seconds() * 1000


def outcome_rows(engine: Engine) -> list[OutcomeRow]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT order_sn, action, due_at, fired_at, outcome FROM delayq_outcomes")
        ).all()
    return [OutcomeRow(*_as_datetimes(r)) for r in rows]


def _as_datetimes(row: sa.Row[tuple[object, ...]]) -> tuple[object, ...]:
    # SQLite hands back strings through text(); the other databases datetimes.
    return tuple(
        datetime.fromisoformat(v) if i in (2, 3) and isinstance(v, str) else v
        for i, v in enumerate(row)
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def index_score(client: redis.Redis, key: str) -> float | None:
    """The due time (ms) of `key` in delayq's due index, or None."""
    score: float | None = client.zscore(Keys().shard(key), key)
    return score


def index_members(client: redis.Redis) -> list[str]:
    """Every timer key in the due index, earliest first."""
    keys = Keys()
    entries: list[tuple[str, float]] = []
    for shard_id in client.zrange(keys.heads, 0, -1):
        entries += client.zrange(f"{keys.shard_prefix}{shard_id}", 0, -1, withscores=True)
    return [member for member, _ in sorted(entries, key=lambda e: (e[1], e[0]))]


def index_size(client: redis.Redis) -> int:
    """Timers in the due index; checks that `heads` names exactly the non-empty shards,
    each with its earliest due time."""
    keys = Keys()
    heads = dict(client.zrange(keys.heads, 0, -1, withscores=True))
    shard_keys = set(client.scan_iter(match=f"{keys.shard_prefix}*", count=10_000))
    shard_keys.discard(keys.layout)
    assert shard_keys == {f"{keys.shard_prefix}{s}" for s in heads}, "heads names every shard"
    size = 0
    for shard_id, head in heads.items():
        first = client.zrange(f"{keys.shard_prefix}{shard_id}", 0, 0, withscores=True)
        assert first and first[0][1] == head, f"head of shard {shard_id} is its earliest"
        size += client.zcard(f"{keys.shard_prefix}{shard_id}")
    return size
