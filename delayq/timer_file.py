"""Timers read from a file for `delayq schedule --from-file`: CSV or JSON lines.

CSV, with a header naming its columns (`order_sn` first; then `in` or `delay`, and/or
`at`, and optionally `action`) or without one (`order_sn,delay_or_time[,action]`, where a
value starting with a year, like 2026-12-01T10:00Z, is a time and anything else a delay).
JSON lines: one object a line, `{"order_sn": "SN1", "in": "20m", "action": "cancel"}` or
with `"at": "2026-12-01T10:00:00Z"`. Blank lines are skipped in both.

The file is read twice: a first pass validates every row (a bad row fails the command
naming its line before anything is written) and counts them, the second schedules them in
chunks, so a file of any size is never held in memory. Standard input is spooled to a
temporary file for the second pass."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import IO, Any

from delayq.errors import InvalidInput
from delayq.keys import timer_key
from delayq.timing import parse_delay_ms, parse_due_at

#: Names a column (CSV header) or a field (JSON lines) may have; `delay` is `in`.
FIELDS = ("order_sn", "in", "delay", "at", "action")
_TIME_RE = re.compile(r"\s*\d{4}-")
_JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
#: Rows per schedule_many call (each makes pipelined round trips of 100-timer Lua calls).
CHUNK_ROWS = 10_000
#: Standard input is kept in memory up to this size, then in a temporary file.
_SPOOL_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Row:
    """One validated timer of the file; `line` is where it starts (1-based)."""

    line: int
    order_sn: str
    when: timedelta | datetime
    action: str

    @property
    def item(self) -> tuple[str, timedelta | datetime, str]:
        """As Producer.schedule_many takes it."""
        return (self.order_sn, self.when, self.action)


class TimerFile:
    """A file of timers that can be read (and validated) as often as needed."""

    def __init__(
        self,
        name: str,
        *,
        action: str,
        default: timedelta | datetime | None = None,
    ) -> None:
        #: What error messages and the summary call it: the path, or "stdin" for "-".
        self.name = "stdin" if name == "-" else name
        self._path = None if name == "-" else Path(name)
        self._action = action
        self._default = default
        self._spool: IO[bytes] | None = None
        timer_key("x", action)  # a bad --action is refused before the file is read

    def __enter__(self) -> TimerFile:
        if self._path is None:
            spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)
            for chunk in iter(lambda: sys.stdin.buffer.read(1 << 16), b""):
                spool.write(chunk)
            self._spool = spool
        elif not self._path.is_file():
            raise InvalidInput(f"{self.name}: no such file")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._spool is not None:
            self._spool.close()

    def rows(self) -> Iterator[Row]:
        """Every row, validated; the first bad one raises InvalidInput naming its line."""
        with self._open() as text:
            first = text.readline()
            text.seek(0)
            try:
                if self._is_json_lines(first):
                    yield from self._json_rows(text)
                else:
                    yield from self._csv_rows(text)
            except UnicodeDecodeError:
                raise InvalidInput(f"{self.name}: not UTF-8 text") from None
            except csv.Error as exc:
                raise InvalidInput(f"{self.name}: not valid CSV ({exc})") from None

    def count(self) -> int:
        """Validate the whole file; the number of timers in it."""
        return sum(1 for _ in self.rows())

    @contextmanager
    def _open(self) -> Iterator[IO[str]]:
        if self._spool is not None:
            self._spool.seek(0)
            spooled = io.TextIOWrapper(self._spool, encoding="utf-8-sig", newline="")
            try:
                yield spooled
            finally:
                spooled.detach()  # the spool stays open for the next pass
            return
        assert self._path is not None
        try:
            # utf-8-sig: a spreadsheet's byte order mark is not part of the first order id.
            with self._path.open(encoding="utf-8-sig", newline="") as text:
                yield text
        except OSError as exc:
            raise InvalidInput(f"{self.name}: {exc.strerror or exc}") from None

    def _is_json_lines(self, first_line: str) -> bool:
        if self._path is not None and self._path.suffix.lower() in _JSON_SUFFIXES:
            return True
        if self._path is not None and self._path.suffix.lower() == ".csv":
            return False
        # An order id never starts with '{' (A-Z a-z 0-9 _ . -), so a CSV row never does.
        return first_line.lstrip("\ufeff \t").startswith("{")

    def _row(self, line: int, order_sn: Any, when: Any, at: Any, action: Any) -> Row:
        try:
            if not isinstance(order_sn, str) or not order_sn.strip():
                raise InvalidInput("no order_sn")
            order_sn = order_sn.strip()
            action = action.strip() if isinstance(action, str) and action.strip() else None
            action = action or self._action
            timer_key(order_sn, action)
            return Row(line, order_sn, self._when(when, at), action)
        except InvalidInput as exc:
            raise InvalidInput(f"{self.name} line {line}: {exc}") from None

    def _when(self, delay: Any, at: Any) -> timedelta | datetime:
        given = [v for v in (delay, at) if v is not None and v != ""]
        if len(given) > 1:
            raise InvalidInput("give a delay (in) or a time (at), not both")
        if not given:
            if self._default is None:
                raise InvalidInput("no delay (in) or time (at), and no --in or --at to use")
            return self._default
        if at is not None and at != "":
            if not isinstance(at, str):
                raise InvalidInput(f"invalid time {at!r}: use ISO 8601 with a zone")
            return parse_due_at(at)
        if isinstance(delay, str) and _TIME_RE.match(delay):
            return parse_due_at(delay)  # a headerless CSV row's time
        if not isinstance(delay, str | int | float) or isinstance(delay, bool):
            raise InvalidInput(f"invalid duration {delay!r}")
        return timedelta(milliseconds=parse_delay_ms(delay))

    def _json_rows(self, text: IO[str]) -> Iterator[Row]:
        for line, raw in enumerate(text, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                raise InvalidInput(f"{self.name} line {line}: not a JSON object") from None
            if not isinstance(obj, dict):
                raise InvalidInput(f"{self.name} line {line}: not a JSON object")
            unknown = sorted(set(obj) - set(FIELDS))
            if unknown:
                raise InvalidInput(
                    f"{self.name} line {line}: unknown field {unknown[0]!r} "
                    "(use order_sn, in or at, action)"
                )
            if "in" in obj and "delay" in obj:
                raise InvalidInput(f"{self.name} line {line}: give in or delay, not both")
            delay = obj.get("in", obj.get("delay"))
            yield self._row(line, obj.get("order_sn"), delay, obj.get("at"), obj.get("action"))

    def _csv_rows(self, text: IO[str]) -> Iterator[Row]:
        reader = csv.reader(text, skipinitialspace=True)
        header: list[str] | None = None
        first = True
        line = 1  # where the next row starts
        for cells in reader:
            start, line = line, reader.line_num + 1
            cells = [c.strip() for c in cells]
            if not any(cells):
                continue
            if first:
                first = False
                if cells[0].lower() == "order_sn":
                    header = _header(self.name, start, cells)
                    continue
            if header is None:
                if len(cells) > 3:
                    raise InvalidInput(
                        f"{self.name} line {start}: {len(cells)} values; without a header "
                        "a row is order_sn,delay_or_time[,action]"
                    )
                order_sn, when, action = [*cells, "", ""][:3]
                yield self._row(start, order_sn, when, None, action)
                continue
            if len(cells) > len(header):
                raise InvalidInput(
                    f"{self.name} line {start}: {len(cells)} values, the header has {len(header)}"
                )
            row = dict(zip(header, cells, strict=False))
            delay = row.get("in", row.get("delay"))
            yield self._row(start, row.get("order_sn"), delay, row.get("at"), row.get("action"))


def _header(name: str, line: int, cells: list[str]) -> list[str]:
    columns = [c.lower() for c in cells]
    for column in columns:
        if column not in FIELDS:
            raise InvalidInput(
                f"{name} line {line}: unknown column {column!r} (use order_sn, in or delay, "
                "at, action)"
            )
    if len(set(columns)) != len(columns):
        raise InvalidInput(f"{name} line {line}: a column is named twice")
    if "in" in columns and "delay" in columns:
        raise InvalidInput(f"{name} line {line}: give an in or a delay column, not both")
    return columns


def batched(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    """`rows` in lists of `size` (itertools.batched is Python 3.12+)."""
    it = iter(rows)
    while chunk := list(islice(it, size)):
        yield chunk


@contextmanager
def progress_bar(total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr when it is a terminal (gone when done); nothing otherwise.
    Yields the function to call with the rows done since the last call."""
    if not sys.stderr.isatty():
        yield lambda _n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(what, total=total)
        yield lambda n: progress.advance(task, n)
