"""The front page's chart, drawn on the server as SVG: lateness p50/p99 and firings per
minute over the last hour (delayq.firing_stats.last_hour, shared by every listener).

Only geometry is computed here; the template draws it, and the stylesheet colours it (no
inline style, so the Content-Security-Policy needs no exception)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: Drawing area of each panel, in SVG units, and the margins for the axis labels.
WIDTH, HEIGHT = 720, 160
LEFT, RIGHT, TOP, BOTTOM = 56, 8, 26, 22


@dataclass(frozen=True)
class Panel:
    """One panel: a value axis from 0 to `top`, lines (lateness) or bars (firings)."""

    title: str
    unit: str
    top: float
    ticks: list[tuple[float, str]]
    #: Each line: its CSS class and its runs of consecutive points ("x,y x,y ...");
    #: minutes without firings break a line.
    lines: list[tuple[str, list[str]]] = field(default_factory=list)
    #: Each bar: x, y, width, height, and its tooltip.
    bars: list[tuple[float, float, float, float, str]] = field(default_factory=list)
    #: Points standing alone (a minute between two empty ones): CSS class, x, y.
    dots: list[tuple[str, float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    left: int
    bottom: int
    #: x and "HH:MM" of the time axis labels.
    times: list[tuple[float, str]]
    panels: list[Panel]
    fired: int
    p99_max_ms: float | None


def nice_top(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^n at or above `value` (1 for nothing)."""
    if value <= 0:
        return 1.0
    scale = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * scale >= value:
            return float(step * scale)
    return float(10 * scale)  # pragma: no cover (10 x scale always reaches value)


def _label(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 or value == int(value) else f"{value:g}"


def _x(i: int, n: int) -> float:
    step = (WIDTH - LEFT - RIGHT) / max(n, 1)
    return round(LEFT + step * i + step / 2, 1)


def _y(value: float, top: float) -> float:
    return round(TOP + (HEIGHT - TOP - BOTTOM) * (1 - min(value, top) / top), 1)


def _ticks(top: float) -> list[tuple[float, str]]:
    return [(_y(v, top), _label(v)) for v in (0, top / 2, top)]


def build(rows: Sequence[dict[str, Any]]) -> Chart:
    """The chart of `rows` (oldest minute first), as last_hour returns them."""
    n = len(rows)
    late = [v for r in rows for v in (r.get("p50_ms"), r.get("p99_ms")) if v is not None]
    late_top = nice_top(max(late, default=0.0))
    lateness = Panel("lateness", "ms", late_top, _ticks(late_top))
    for name in ("p50_ms", "p99_ms"):
        runs: list[list[tuple[float, float]]] = [[]]
        for i, row in enumerate(rows):
            value = row.get(name)
            if value is None:
                runs.append([])
            else:
                runs[-1].append((_x(i, n), _y(float(value), late_top)))
        css = name.removesuffix("_ms")
        lateness.lines.append(
            (css, [" ".join(f"{x},{y}" for x, y in run) for run in runs if len(run) > 1])
        )
        lateness.dots.extend((css, *run[0]) for run in runs if len(run) == 1)
    fired_top = nice_top(max((int(r.get("fired") or 0) for r in rows), default=0))
    firings = Panel("firings per minute", "", fired_top, _ticks(fired_top))
    bar_w = round((WIDTH - LEFT - RIGHT) / max(n, 1) * 0.7, 1)
    for i, row in enumerate(rows):
        count = int(row.get("fired") or 0)
        if count:
            y = _y(count, fired_top)
            tip = f"{_minute(row)}: {count:,} fired"
            p50, p99 = row.get("p50_ms"), row.get("p99_ms")
            if p99 is not None:
                tip += f", lateness p50 {p50:g} ms, p99 {p99:g} ms"
            firings.bars.append(
                (round(_x(i, n) - bar_w / 2, 1), y, bar_w, round(HEIGHT - BOTTOM - y, 1), tip)
            )
    times = [(_x(i, n), _minute(row)) for i, row in enumerate(rows) if i % 15 == 0 or i == n - 1]
    return Chart(
        width=WIDTH,
        height=HEIGHT,
        left=LEFT,
        bottom=HEIGHT - BOTTOM,
        times=times,
        panels=[lateness, firings],
        fired=sum(int(r.get("fired") or 0) for r in rows),
        p99_max_ms=max(
            (float(r["p99_ms"]) for r in rows if r.get("p99_ms") is not None), default=None
        ),
    )


def _minute(row: dict[str, Any]) -> str:
    """'2026-01-01T10:07:00+00:00' -> '10:07'."""
    return str(row.get("minute", ""))[11:16]
