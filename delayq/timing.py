"""Parsing and validation of order ids, actions, durations and due times."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from delayq.errors import InvalidInput

ORDER_SN_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
ACTION_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

Delay = float | int | timedelta | str
#: The longest delay accepted: ten years.
MAX_DELAY_S = 10 * 366 * 86400
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def validate_order_sn(order_sn: str) -> str:
    """Return `order_sn` if it is 1-64 characters of A-Za-z0-9_.- (no ':' or glob characters)."""
    if not isinstance(order_sn, str) or not ORDER_SN_RE.fullmatch(order_sn):
        raise InvalidInput(
            f"invalid order id {order_sn!r}: use 1-64 characters of A-Z a-z 0-9 _ . -"
        )
    return order_sn


def validate_action(action: str) -> str:
    """Return `action` if it is a lowercase identifier (a-z, 0-9, _; at most 32)."""
    if not isinstance(action, str) or not ACTION_RE.fullmatch(action):
        raise InvalidInput(
            f"invalid action {action!r}: use a lowercase name like 'cancel' (a-z, 0-9, _)"
        )
    return action


def parse_delay_ms(delay: Delay) -> int:
    """Turn seconds, a timedelta or a duration string ('90s', '20m', '1h30m', '2d', '1200')
    into whole milliseconds. Negative delays are refused; zero means 'fire now'."""
    if isinstance(delay, bool):
        raise InvalidInput(f"invalid duration {delay!r}")
    if isinstance(delay, timedelta):
        seconds = delay.total_seconds()
    elif isinstance(delay, int | float):
        try:
            seconds = float(delay)
        except OverflowError:
            raise InvalidInput(
                f"invalid duration {delay!r}: must be between 0 and 10 years"
            ) from None
    elif isinstance(delay, str):
        seconds = _parse_duration_string(delay)
    else:
        raise InvalidInput(f"invalid duration {delay!r}")
    if not 0 <= seconds <= MAX_DELAY_S:  # NaN, negative, >10y
        raise InvalidInput(f"invalid duration {delay!r}: must be between 0 and 10 years")
    return round(seconds * 1000)


def _parse_duration_string(text: str) -> float:
    s = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", s):
        return float(s)
    pos, total = 0, 0.0
    for m in _DURATION_PART_RE.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    if not s or pos != len(s):
        raise InvalidInput(
            f"invalid duration {text!r}: use e.g. 90s, 20m, 1h30m, 2d or plain seconds (1200)"
        )
    return total


def parse_due_at(value: datetime | str) -> datetime:
    """Parse an absolute due time. Strings are ISO 8601; a time without zone is refused,
    because guessing the zone of an order deadline is how orders get cancelled early."""
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise InvalidInput(
                f"invalid time {value!r}: use ISO 8601 with a zone, e.g. 2026-12-01T10:00:00Z"
            ) from None
    if not isinstance(value, datetime):
        raise InvalidInput(f"invalid time {value!r}: give an aware datetime or an ISO 8601 string")
    if value.tzinfo is None:
        raise InvalidInput(f"time {value.isoformat()} has no zone: add Z or an offset like +01:00")
    return value.astimezone(UTC)


def to_ms(when: datetime) -> int:
    """Milliseconds since the epoch for an aware datetime, rounded up so a timer is never early."""
    return -((_EPOCH - when) // timedelta(milliseconds=1))


def from_ms(ms: int) -> datetime:
    """Aware UTC datetime for milliseconds since the epoch."""
    return _EPOCH + timedelta(milliseconds=ms)
