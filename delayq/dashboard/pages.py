"""What each dashboard page shows, read from Redis (bounded reads, through delayq.browse
and delayq.figures) and from delayq_outcomes; and the checks of what a request asks for.

Each function returns plain data for a template, raises InvalidInput for a request that
cannot be answered (400, one line), and lets redis.RedisError or ServiceUnavailable say
that a server is out (the page says so)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import redis

from delayq import browse, firing_stats
from delayq.dashboard.chart import Chart, build
from delayq.db import last_outcome, outcome_history, outcomes_page
from delayq.errors import InvalidInput
from delayq.introspect import timer_info
from delayq.keys import parse_firing_id, timer_key
from delayq.timing import ACTION_RE, ORDER_SN_RE

if TYPE_CHECKING:
    from delayq.listener import Listener

#: Rows on one page of a list.
PAGE_ROWS = 50
#: Longest cursor accepted from a URL (browse's cursors are far shorter).
MAX_CURSOR = 512
#: Most dead letters one form may name.
MAX_SELECTED = 1000
#: The lists, by URL path: title and the browse function that reads one page.
LISTS = {
    "pending": ("Pending", browse.pending_page),
    "in-flight": ("In flight", browse.in_flight_page),
    "dead": ("Dead letters", browse.dead_page),
}
_OUTCOME_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def front(listener: Listener) -> dict[str, Any]:
    """The summary: figures of every listener (Redis), this listener's recent firings, the
    listeners alive, a cluster's primaries, and the chart of the last hour."""
    problems = list(listener.health_problems())
    figures: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    try:
        # Shared with /metrics: Redis is read at most every FIGURES_CACHE_S per listener.
        figures = listener.figures.get(dead_limit=0)
        rows = firing_stats.last_hour(listener.client, listener.keys)
    except redis.RedisError as exc:
        problems.append(f"Redis: {one_line(exc)}")
    chart: Chart | None = build(rows) if any(r["fired"] for r in rows) else None
    return {
        "figures": figures,
        "window": listener.metrics.window(),
        "problems": problems,
        "chart": chart,
    }


def order_sn_of(text: str) -> str:
    text = text.strip()
    if not ORDER_SN_RE.fullmatch(text):
        raise InvalidInput(f"order id {text[:80]!r}: use 1-64 of A-Z a-z 0-9 _ . -")
    return text


def action_of(text: str) -> str:
    if not ACTION_RE.fullmatch(text):
        raise InvalidInput(f"action {text[:40]!r}: use 1-32 of a-z 0-9 _, starting with a letter")
    return text


@dataclass
class Hit:
    """One timer of a searched order: in Redis now, and/or with recorded outcomes."""

    action: str
    in_redis: bool = False
    outcomes: int = 0
    last_outcome: str | None = None


def search(listener: Listener, order_sn: str) -> tuple[list[Hit], list[str]]:
    """The timers of one order (pending, in flight or dead in Redis, or with outcomes in
    the database), by action; and what could not be read."""
    problems: list[str] = []
    hits: dict[str, Hit] = {}
    actions = sorted({spec.name for spec in listener.actions})
    try:
        for key in browse.timers_of_order(listener.client, listener.keys, order_sn, actions):
            action = key.rpartition(":")[2]
            hits.setdefault(action, Hit(action)).in_redis = True
    except redis.RedisError as exc:
        problems.append(f"Redis: {one_line(exc)}")
    try:
        history = outcome_history(_engine(listener), listener.settings, order_sn)
    except Exception as exc:  # the database: whatever the driver raises, one line
        problems.append(f"database: {one_line(exc)}")
        history = []
    for row in history:  # latest due first
        hit = hits.setdefault(row["action"], Hit(row["action"]))
        hit.outcomes += 1
        hit.last_outcome = hit.last_outcome or row["outcome"]
    return sorted(hits.values(), key=lambda h: h.action), problems


def timer(listener: Listener, order_sn: str, action: str) -> dict[str, Any]:
    """Everything `delayq inspect` knows about one timer, and its outcome history."""
    key = timer_key(order_sn, action)
    problems: list[str] = []
    info: dict[str, Any] = {"timer": key, "state": "unknown", "claims": [], "dead_letters": []}
    try:
        info = timer_info(listener.store.timer_state(key))
    except redis.RedisError as exc:
        problems.append(f"Redis: {one_line(exc)}")
    history: list[dict[str, Any]] = []
    try:
        info["last_outcome"] = last_outcome(_engine(listener), listener.settings, order_sn, action)
        history = outcome_history(_engine(listener), listener.settings, order_sn, action)
    except Exception as exc:
        problems.append(f"database: {one_line(exc)}")
        info["last_outcome"] = None
    return {"info": info, "history": history, "problems": problems}


def cursor_of(args: Mapping[str, str]) -> str | None:
    after = args.get("after") or None
    if after is not None and (len(after) > MAX_CURSOR or not after.isprintable()):
        raise InvalidInput("invalid cursor: start again from the first page")
    return after


def listing(listener: Listener, kind: str, after: str | None) -> browse.Page:
    """One page of the pending, in-flight or dead-letter list (InvalidInput for a bad
    cursor, from browse)."""
    read = LISTS[kind][1]
    return read(listener.client, listener.keys, after=after, limit=PAGE_ROWS)


def firings_of(values: Sequence[str]) -> list[str]:
    """The ticked dead letters of a form, checked to be firing ids."""
    firings = [v for v in values if v]
    if len(firings) > MAX_SELECTED:
        raise InvalidInput(f"at most {MAX_SELECTED} dead letters at a time")
    for firing in firings:
        parse_firing_id(firing)
    return firings


def requeue_dead(listener: Listener, firings: Sequence[str]) -> int:
    """Re-queue these dead letters ([]: all of them) to fire now."""
    return listener.retry_dead(firings)


def delete_dead(listener: Listener, firings: Sequence[str]) -> int:
    """Delete these dead letters ([]: all of them)."""
    return browse.delete_dead(listener.client, listener.keys, firings)


@dataclass(frozen=True)
class OutcomeFilter:
    """The outcomes page's filters, as given (for the form and the links) and as parsed."""

    action: str = ""
    outcome: str = ""
    since: str = ""
    until: str = ""

    def query(self) -> dict[str, str]:
        return {k: v for k, v in vars(self).items() if v}


def outcome_filter(args: Mapping[str, str]) -> OutcomeFilter:
    """The filters of a request, checked (InvalidInput names the bad one)."""
    f = OutcomeFilter(
        **{k: args.get(k, "").strip() for k in ("action", "outcome", "since", "until")}
    )
    if f.action:
        action_of(f.action)
    if f.outcome and not _OUTCOME_RE.fullmatch(f.outcome):
        raise InvalidInput(f"outcome {f.outcome[:40]!r}: use 1-32 of a-z 0-9 _")
    since, until = _time(f.since, "since"), _time(f.until, "until")
    if since and until and since >= until:
        raise InvalidInput("since must be before until")
    return f


def _time(text: str, name: str) -> datetime | None:
    """'2026-01-01T10:00' (UTC), or with seconds, or with an offset -> naive UTC."""
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"{name} {text[:40]!r}: use YYYY-MM-DDTHH:MM (UTC)") from None
    if when.tzinfo is not None:
        when = when.astimezone(UTC)
    return when.replace(tzinfo=None)


def outcomes(listener: Listener, f: OutcomeFilter, after: str | None) -> dict[str, Any]:
    """One page of delayq_outcomes under the filters `f`, latest fired first, and the cursor
    of the next page."""
    rows, following = outcomes_page(
        _engine(listener),
        listener.settings,
        action=f.action or None,
        outcome=f.outcome or None,
        since=_time(f.since, "since"),
        until=_time(f.until, "until"),
        after=_outcome_cursor(after),
        limit=PAGE_ROWS,
    )
    return {
        "rows": rows,
        "next": None if following is None else f"{following[0].isoformat()}~{following[1]}",
    }


def _outcome_cursor(after: str | None) -> tuple[datetime, int] | None:
    if after is None:
        return None
    when, sep, row_id = after.partition("~")
    try:
        if not sep or not (row_id.isascii() and row_id.isdigit()) or len(row_id) > 19:
            raise ValueError
        return datetime.fromisoformat(when).replace(tzinfo=None), int(row_id)
    except ValueError:
        raise InvalidInput("invalid cursor: start again from the first page") from None


def known_actions(listener: Listener) -> list[str]:
    return sorted(spec.name for spec in listener.actions)


def _engine(listener: Listener) -> Any:
    return listener.applier.engine
