"""Many calls of one script on one Redis, in pipelined rounds that overlap.

A round is one pipelined round trip (its calls and, with `wait_replicas`, a WAIT). Round
n+1 is sent before round n's replies are read, so the caller packs the next round while
Redis runs the last one: on two cores Python and Redis work at the same time instead of
in turn. Everything goes over one connection, so Redis runs the calls in the order given
(the last schedule of a timer wins, as with one pipeline).

A round found to need redoing is redone with every round sent after it, in order: after
NOSCRIPT (the script is then loaded; Redis restarted or SCRIPT FLUSH), or after the
connection broke (a fresh one). A script call redone is one that may have run already,
which a schedule tolerates (scheduling a timer again to the same time changes nothing;
a delay is counted again from the retry).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

#: Recoveries (NOSCRIPT, a broken connection) allowed in a row before giving up.
RECOVERIES = 2

#: One script call: its keys and its arguments.
Call = tuple[Sequence[str], Sequence[Any]]


@dataclass(frozen=True)
class _Round:
    packed: list[bytes | memoryview]
    replies: int


class _Redo(Exception):
    """The rounds not yet confirmed must be sent again (after `load`ing the script)."""

    def __init__(self, cause: Exception, *, load: bool) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.load = load


def run_rounds(
    client: redis.Redis,
    script: Script,
    rounds: Iterable[Sequence[Call]],
    *,
    wait_replicas: int = 0,
    wait_timeout_ms: int = 1000,
) -> None:
    """Run `script` on every call of every round, in order, one round trip a round; the
    rounds may be a generator (each is built while Redis runs the one before). Raises the
    first error a round's replies hold (the calls of that round and the next may have
    run), or NotReplicated when WAIT saw fewer than `wait_replicas` replicas."""
    source = iter(rounds)
    first = next(source, None)
    if first is None:
        return  # nothing to write: no connection taken (Redis may be down)
    pool = client.connection_pool
    conn = _connection(pool)
    try:
        _Rounds(client, conn, script, wait_replicas, wait_timeout_ms).run(chain([first], source))
    except BaseException:
        # Replies of a round sent ahead may be unread: this connection is not reusable.
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


def _connection(pool: redis.ConnectionPool) -> Any:
    try:
        return pool.get_connection()
    except TypeError:  # redis-py before 5.3 wants a command name
        return pool.get_connection("EVALSHA")  # type: ignore[call-arg,unused-ignore]


class _Rounds:
    def __init__(
        self,
        client: redis.Redis,
        conn: Any,
        script: Script,
        wait_replicas: int,
        wait_timeout_ms: int,
    ) -> None:
        self.client = client
        self.conn = conn
        self.script = script
        self.wait: tuple[Any, ...] = ()
        if wait_replicas:
            self.wait = ("WAIT", wait_replicas, wait_timeout_ms)
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms

    def run(self, rounds: Iterable[Sequence[Call]]) -> None:
        # Sent and not yet confirmed, oldest first: at most the one whose replies are read
        # next and the one sent behind it.
        sent: deque[_Round] = deque()
        source = iter(rounds)
        recoveries = 0
        resend = False
        while True:
            try:
                if resend:
                    for n, again in enumerate(sent):
                        self.conn.send_packed_command(again.packed, check_health=n == 0)
                    resend = False
                calls = next(source, None)
                if calls is not None:
                    packed = self._pack(calls)
                    sent.append(packed)
                    # A health check reads a reply: only when no other reply is pending.
                    self.conn.send_packed_command(packed.packed, check_health=len(sent) == 1)
                    if len(sent) < 2:
                        continue
                if not sent:
                    return
                self._confirm(sent[0])
                sent.popleft()
                recoveries = 0
            except (_Redo, redis.ConnectionError, redis.TimeoutError) as exc:
                recoveries += 1
                cause = exc.cause if isinstance(exc, _Redo) else exc
                if recoveries > RECOVERIES:
                    raise cause from None
                if isinstance(exc, _Redo):
                    self._drain(list(sent)[1:])
                    if exc.load:
                        self.client.script_load(self.script.script)
                else:
                    self.conn.disconnect()
                resend = True

    def _pack(self, calls: Sequence[Call]) -> _Round:
        sha = self.script.sha
        commands: list[tuple[Any, ...]] = [
            ("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls
        ]
        if self.wait:
            commands.append(self.wait)
        return _Round(self.conn.pack_commands(commands), len(commands))

    def _replies(self, n: int) -> list[Any]:
        out: list[Any] = []
        for _ in range(n):
            try:
                out.append(self.conn.read_response())
            except redis.ResponseError as exc:
                out.append(exc)
        return out

    def _confirm(self, sent: _Round) -> None:
        """Read a round's replies; raise its first error (NOSCRIPT: _Redo)."""
        replies = self._replies(sent.replies)
        errors = [r for r in replies if isinstance(r, redis.ResponseError)]
        if any(isinstance(e, NoScriptError) for e in errors):
            raise _Redo(next(e for e in errors if isinstance(e, NoScriptError)), load=True)
        if errors:
            raise errors[0]
        if self.wait:
            from delayq.store import check_replicated  # store runs this module

            check_replicated(int(replies[-1]), self.wait_replicas, self.wait_timeout_ms)

    def _drain(self, rounds: list[_Round]) -> None:
        """Read and drop the replies of rounds that will be sent again."""
        for r in rounds:
            self._replies(r.replies)
