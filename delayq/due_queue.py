"""The hand-off between the claimer and the appliers, holding each firing until its due time.

The claimer claims a few milliseconds ahead (DELAYQ_CLAIM_AHEAD_MS): the Redis round trip
and the thread hand-off then happen *before* the due time. An applier takes a firing
PREPARE_S before it is due, opens its transaction, and waits inside it for the due
instant (`sleep_until`) before it stamps `fired_at` and runs the action. A firing is
never applied before its due time, by both clocks that matter:

* Redis's, which decided it was due: the claim reports Redis's time (in µs), taken
  before the reply left Redis, so `claimed_at + (due - redis_now)` on this host's
  monotonic clock is never earlier than Redis's own due instant;
* this host's wall clock, which stamps `fired_at`: so `fired_at >= due_at` always.

Items are released in due order (a heap). A sleeping thread wakes up late by Linux's
timer slack (50 µs by default, more on a busy VM), so the listener asks for a slack of
1 µs (`fine_timer_slack`) and spins only the last SPIN_S of a wait. The spin holds the GIL:
at 200 µs it was a tenth of the listener's GIL time at 500 timers a second (py-spy).
With 50 µs and the fine slack, 10 alternating pairs of `delayq bench --pending 0 --rate
500 --duration 4` gave p90 0.75 -> 0.55 ms (medians; lower in 9 pairs of 10) and p99
about the same (1.5 -> 1.45 ms).
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import sys
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

#: The last stretch of a wait for a due time that is spun instead of slept.
SPIN_S = 0.00005
#: prctl(2) options, and the slack asked for (ns).
_PR_SET_TIMERSLACK, _PR_GET_TIMERSLACK = 29, 30
TIMER_SLACK_NS = 1000
#: How long before a firing's due time an applier takes it, to open its transaction.
PREPARE_S = 0.001
#: Added to every ready instant: an epoch time in seconds as a float is exact only to
#: ~0.2 µs, and "never early" must not hang on a rounding.
MARGIN_S = 0.00001


def ready_at(due_ms: int, redis_now_ms: float, claimed_mono: float, wall_now: float) -> float:
    """The monotonic instant at which a firing due at `due_ms` (Redis's clock) is due by
    both Redis's clock and this host's wall clock; `claimed_mono` and `wall_now` were read
    when the claim's reply, stamped `redis_now_ms` by Redis, arrived."""
    by_redis = claimed_mono + (due_ms - redis_now_ms) / 1000
    by_wall = claimed_mono + (due_ms / 1000 - wall_now)
    return max(by_redis, by_wall) + MARGIN_S


def _prctl(option: int, arg: int) -> int | None:
    """prctl(2)'s result, or None where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return int(ctypes.CDLL(None).prctl(option, arg, 0, 0, 0))
    except (OSError, AttributeError):
        return None


def fine_timer_slack() -> bool:
    """Ask Linux to wake this thread's sleeps within TIMER_SLACK_NS of their time (threads
    started afterwards inherit it). False where there is no prctl (not Linux)."""
    return _prctl(_PR_SET_TIMERSLACK, TIMER_SLACK_NS) == 0


def timer_slack_ns() -> int | None:
    """This thread's timer slack in ns (None where it cannot be read)."""
    slack = _prctl(_PR_GET_TIMERSLACK, 0)
    return slack if slack is not None and slack >= 0 else None


def sleep_until(ready: float, clock: Callable[[], float] = time.monotonic) -> None:
    """Return at the monotonic instant `ready` (at once if it has passed), not before."""
    left = ready - clock()
    if left > SPIN_S:
        time.sleep(left - SPIN_S)
    while clock() < ready:
        pass


class DueQueue(Generic[T]):
    """A thread-safe queue that releases each item at (never before) its ready time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._order = itertools.count()  # FIFO among items ready at the same instant
        self._cond = threading.Condition()
        self._clock = clock

    def put(self, item: T, ready: float = 0.0) -> None:
        """Queue `item`, to be released at the monotonic instant `ready` (0: at once)."""
        with self._cond:
            heapq.heappush(self._heap, (ready, next(self._order), item))
            self._cond.notify()

    def qsize(self) -> int:
        return len(self._heap)

    def take(self, limit: int, timeout_s: float, early_s: float = 0.0) -> tuple[list[T], float]:
        """Up to `limit` items and the instant they are ready: what is ready now, or, once
        the first item is `early_s` from ready, the items ready at that same instant (the
        caller prepares its work and waits for the instant: `sleep_until`). Waits at most
        `timeout_s` for an item to arrive; ([], 0.0) if none did."""
        deadline = self._clock() + timeout_s
        with self._cond:
            while True:
                now = self._clock()
                if self._heap:
                    ready = self._heap[0][0]
                    if ready - early_s <= now:
                        return self._pop(limit, max(now, ready)), ready
                    wait = ready - early_s - now
                else:
                    wait = deadline - now
                    if wait <= 0:
                        return [], 0.0
                # Woken early by a put (maybe of something due sooner): look again.
                self._cond.wait(wait)

    def _pop(self, limit: int, until: float) -> list[T]:
        out: list[T] = []
        heap = self._heap
        while heap and len(out) < limit and heap[0][0] <= until:
            out.append(heapq.heappop(heap)[2])
        if heap:
            self._cond.notify()  # another applier may take the rest, or wait for the next
        return out

    def items(self) -> list[T]:
        """Everything queued, ready or not, in ready order, left in the queue."""
        with self._cond:
            return [entry[2] for entry in sorted(self._heap)]

    def drain(self) -> list[T]:
        """Everything queued, ready or not, in ready order."""
        with self._cond:  # a Condition's lock is re-entrant: items() takes it too
            items = self.items()
            self._heap.clear()
            return items
