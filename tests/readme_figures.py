"""Every measured figure in README.md is tied to a committed JSON in docs/bench/.

The tie is an HTML comment on the same line as the figures (invisible on the rendered
page, in plain sight for whoever edits the source):

    p99 4.0 ms <!-- bench: 1m-pending-mariadb.json runs[0].lateness_ms.p99 -->

Rules:

- `<!-- bench: FILE PATH [PATH ...] -->` names a file in docs/bench/ and one path per
  number. It ties the numbers written before it on its line, back to the previous
  `bench:` comment on that line or else to the line's start, in order: first number to
  first path. A table row carries one comment at the end of its last cell for the whole
  row. Numbers inside `code spans` are not figures and are not counted.
- A path is JSON keys and list indices: `runs[0].lateness_ms.p99`, `config.pending`. It
  may end in `/N` or `*N` to change the unit: `runs[0].lateness_ms.max/1000` for seconds,
  `runs[0].primaries[0].commands_share*100` for a percentage.
- A number is written as precisely as it is meant: `14` must be the value rounded to a
  whole number (14.09 is written `14`), `3.9` rounded to one decimal (half up: 3.85 is
  `3.9`), `4.0` too. Thousands separators are allowed (`16,659`). With a leading `~` the
  trailing zeros of a whole number are not significant: `~62,000` is any value that
  rounds to 62,000 at the thousands (61,882 is; 62,600 is not). A range (`3-4 ms`) is
  two numbers; prefer one figure.
- A "number" is digits not glued to a word on the left (`p99` is a label) nor to letters
  on the right other than a unit (`20m` and `1m-pending` are names; `122x` and `5ms` are
  figures); versions and addresses (`7.0.15`, `127.0.0.1`) are not numbers.
- The lint: outside fenced code blocks, HTML comments and code spans, a number followed
  by a unit of measure (ms, µs, s, B, bytes, KB/MB/GB, %, x or the multiplication sign,
  /s, "things/s", "things a second") that no `bench:` comment ties is reported, unless
  it is part of a phrase in ALLOWED (settings, defaults, limits: not measurements).
  Words ("a minute late") are not numbers and are not checked.

`check_readme` returns one line per problem, each naming the README line, the figure, the
file and path, and what to write instead: after a new benchmark run, change the figures
it names (or the JSON paths) until it returns nothing:

    .venv/bin/python -m tests.readme_figures
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BENCH_DIR = REPO / "docs" / "bench"

#: Phrases of README.md whose numbers are settings, defaults or limits, not measurements.
ALLOWED: dict[str, str] = {
    r"every \d+ s\b": "fixed intervals of the listener (topology read, full due view)",
    r"in the last \d+ s\b": "windows of /livez and delayq_listeners_alive",
    r"`DELAYQ_OUTBOX_POLL_S` \(5 ms\)": "a setting's default",
    r"`DELAYQ_CLAIM_AHEAD_MS` \(5 ms\)": "a setting's default",
    r"`DELAYQ_SWEEP_KEYS_PER_S` \(2,000 keys/s": "a setting's default",
    r"1 ms to 5 min buckets": "the histogram's buckets",
    r"above 1 s for 10 min": "an alert's threshold",
}

_COMMENT = re.compile(r"<!--(.*?)-->")
_CODE_SPAN = re.compile(r"`[^`]*`")
_UNIT = "(?:ms|µs|us|s|x|\u00d7|%|B|KB|MB|GB|KiB|MiB|GiB)"
# A number: not glued to a word, a dot or another number on the left, nor part of a
# version or an address on the right (7.0.15, 127.0.0.1).
_NUMBER = re.compile(
    r"(?<![\w.,])(?P<approx>~)?(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?P<frac>\.\d+)?(?!\d|[,.]\d)"
)
_GLUED_UNIT = re.compile(rf"{_UNIT}(?!\w)")
_MEASURE_AFTER = re.compile(
    rf"\s?(?:{_UNIT}(?![\w/])|B/\w+|bytes\b|/s\b)"
    r"|(?:\s[a-zA-Z]+)?(?:/s\b|\s(?:a|per)\s(?:second|s)\b)"
)
_PATH = re.compile(r"[A-Za-z_]\w*(?:\[\d+\]|\.[A-Za-z_]\w*)*")
_PATH_STEP = re.compile(r"([A-Za-z_]\w*)|\[(\d+)\]")
_SCALE = re.compile(r"(?P<path>.*?)(?:(?P<op>[*/])(?P<factor>\d+(?:\.\d+)?))?$")


@dataclass(frozen=True)
class Written:
    """A number as the README writes it."""

    text: str
    value: Decimal
    exponent: int  # the power of ten of its last significant digit: 14 -> 0, 3.9 -> -1
    approx: bool
    commas: bool
    end: int  # offset just after the number in the text it was found in


@dataclass(frozen=True)
class Tie:
    """One `bench:` comment and the numbers it ties."""

    line_no: int
    file: str
    paths: tuple[str, ...]
    numbers: tuple[Written, ...]


def parse_numbers(text: str) -> list[Written]:
    """The numbers in `text` (code spans already removed), in order."""
    found = []
    for m in _NUMBER.finditer(text):
        after = text[m.end() :]
        if after[:1].isalpha() and not _GLUED_UNIT.match(after):
            continue  # `20m`, `1m-pending`: a name, not a figure
        int_part, frac = m["int"], m["frac"] or ""
        digits = int_part.replace(",", "")
        exponent = -(len(frac) - 1) if frac else 0
        if m["approx"] and not frac:
            exponent = len(digits) - len(digits.rstrip("0")) if digits.strip("0") else 0
        found.append(
            Written(
                text=m.group(0),
                value=Decimal(digits + frac),
                exponent=exponent,
                approx=bool(m["approx"]),
                commas="," in int_part,
                end=m.end(),
            )
        )
    return found


def rounded(value: Decimal, exponent: int) -> Decimal:
    return value.quantize(Decimal(1).scaleb(exponent), rounding=ROUND_HALF_UP)


def matches(written: Written, value: Decimal) -> bool:
    """Whether `value`, rounded the way `written` is written, is `written`."""
    return rounded(value, written.exponent) == written.value


def write_like(written: Written, value: Decimal) -> str:
    """`value` written the way `written` is: same precision, separators and `~`."""
    r = rounded(value, written.exponent)
    decimals = max(-written.exponent, 0)
    commas = written.commas or (abs(written.value) < 1000 <= abs(r))
    text = f"{r:,.{decimals}f}" if commas else f"{r:.{decimals}f}"
    return ("~" if written.approx else "") + text


def _blank(pattern: re.Pattern[str] | str, text: str) -> str:
    """`text` with what `pattern` matches turned to spaces (offsets stay meaningful)."""
    return re.sub(pattern, lambda m: " " * len(m.group(0)), text)


def _strip_code(text: str) -> str:
    return _blank(_CODE_SPAN, text)  # a code span holds no figures


def _bench_comments(line: str) -> list[re.Match[str]]:
    return [m for m in _COMMENT.finditer(line) if m.group(1).strip().startswith("bench:")]


def _prose_lines(readme: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fenced = [], False
    for no, line in enumerate(readme.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((no, line))
    return lines


def find_ties(readme: str) -> tuple[list[Tie], list[str]]:
    """Every `bench:` comment with its numbers, and problems of form (count mismatches)."""
    ties, problems = [], []
    for no, line in _prose_lines(readme):
        start = 0
        for m in _bench_comments(line):
            segment = _blank(_COMMENT, line[start : m.start()])  # other comments hold no figures
            start = m.end()
            words = m.group(1).strip().removeprefix("bench:").split()
            numbers = parse_numbers(_strip_code(segment))
            if not words:
                problems.append(f"README.md:{no}: `bench:` comment names no file")
                continue
            file, paths = words[0], tuple(words[1:])
            if len(numbers) != len(paths):
                written = ", ".join(n.text for n in numbers) or "none"
                problems.append(
                    f"README.md:{no}: {len(numbers)} number(s) before the comment "
                    f"({written}) but {len(paths)} path(s) in it ({' '.join(paths) or 'none'})"
                )
                continue
            ties.append(Tie(no, file, paths, tuple(numbers)))
    return ties, problems


def resolve(data: Any, path: str) -> Decimal:
    """The number at `path` in `data`, scaled by a trailing `/N` or `*N`.

    Raises LookupError (naming the step that failed) or TypeError (not a number)."""
    m = _SCALE.fullmatch(path)
    assert m is not None  # the pattern matches any string
    key_path = m["path"]
    if not _PATH.fullmatch(key_path):
        raise LookupError(f"{key_path!r} is not a path like runs[0].lateness_ms.p99")
    node, walked = data, "the top"
    for step in _PATH_STEP.finditer(key_path):
        key, index = step.group(1), step.group(2)
        if key is not None:
            if not isinstance(node, dict) or key not in node:
                raise LookupError(f"no key {key!r} at {walked}")
            node = node[key]
        else:
            if not isinstance(node, list) or int(index) >= len(node):
                raise LookupError(f"no item [{index}] at {walked}")
            node = node[int(index)]
        walked = key_path[: step.end()]
    if isinstance(node, bool) or not isinstance(node, int | float):
        raise TypeError(f"is {json.dumps(node)}, not a number")
    value = Decimal(repr(node))
    if m["op"] == "/":
        value /= Decimal(m["factor"])
    elif m["op"] == "*":
        value *= Decimal(m["factor"])
    return value


def check_ties(readme: str, bench_dir: Path) -> list[str]:
    """Problems with the `bench:` comments: missing files or paths, numbers that differ."""
    ties, problems = find_ties(readme)
    loaded: dict[str, Any] = {}
    for tie in ties:
        where = f"README.md:{tie.line_no}"
        if tie.file not in loaded:
            try:
                loaded[tie.file] = json.loads((bench_dir / tie.file).read_text())
            except (OSError, ValueError) as exc:
                problems.append(f"{where}: docs/bench/{tie.file}: {exc}")
                continue
        for written, path in zip(tie.numbers, tie.paths, strict=True):
            source = f"docs/bench/{tie.file} {path}"
            try:
                value = resolve(loaded[tie.file], path)
            except (LookupError, TypeError) as exc:
                problems.append(f"{where}: {source}: {exc}")
                continue
            if not matches(written, value):
                problems.append(
                    f"{where}: README says {written.text}, {source} is {value.normalize():f}: "
                    f"write {write_like(written, value)}"
                )
    return problems


def lint(readme: str, allowed: dict[str, str] = ALLOWED) -> list[str]:
    """Measurement-looking numbers that no `bench:` comment ties and ALLOWED does not cover."""
    problems = []
    for no, line in _prose_lines(readme):
        ties = _bench_comments(line)
        rest = _blank(_COMMENT, line[ties[-1].end() :] if ties else line)
        for pattern in allowed:
            rest = _blank(pattern, rest)
        rest = _strip_code(rest)
        for number in parse_numbers(rest):
            unit = _MEASURE_AFTER.match(rest, number.end)
            if unit:
                figure = (number.text + unit.group(0)).strip()
                problems.append(
                    f"README.md:{no}: {figure!r} looks measured: tie it with a `bench:` "
                    f"comment (a setting or limit: add its phrase to ALLOWED in "
                    f"tests/readme_figures.py): {line.strip()[:80]}"
                )
    return problems


def unused_allowances(readme: str, allowed: dict[str, str] = ALLOWED) -> list[str]:
    """ALLOWED phrases no README line has any more: the list stays short and current."""
    text = "\n".join(line for _, line in _prose_lines(readme))
    return [p for p in allowed if not re.search(p, text)]


def check_readme(readme_path: Path = README, bench_dir: Path = BENCH_DIR) -> list[str]:
    """Every problem with README.md's figures: ties, the lint, stale allowances."""
    readme = readme_path.read_text()
    return (
        check_ties(readme, bench_dir)
        + lint(readme)
        + [f"ALLOWED phrase {p!r} matches no README line" for p in unused_allowances(readme)]
    )


if __name__ == "__main__":
    problems = check_readme()
    print("\n".join(problems) or "README.md: every figure matches docs/bench/")
    raise SystemExit(1 if problems else 0)
