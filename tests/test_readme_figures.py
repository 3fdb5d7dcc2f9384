"""README.md quotes only figures that a committed docs/bench/*.json holds (issue 13).

The rules of the `<!-- bench: FILE PATH ... -->` comments are in tests/readme_figures.py.
No servers: these tests read files."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from tests.readme_figures import (
    ALLOWED,
    BENCH_DIR,
    README,
    check_ties,
    find_ties,
    lint,
    matches,
    parse_numbers,
    resolve,
    unused_allowances,
    write_like,
)


def one(text: str) -> Decimal:
    """The single number written in `text`, as a value."""
    (number,) = parse_numbers(text)
    return number.value


def written(text: str) -> object:
    (number,) = parse_numbers(text)
    return number


# The README as committed.


def test_every_bench_comment_in_the_readme_names_a_committed_json_and_its_numbers_match() -> None:
    problems = check_ties(README.read_text(), BENCH_DIR)
    assert problems == [], "\n".join(problems)


def test_the_readme_ties_its_headline_figures() -> None:
    ties, _ = find_ties(README.read_text())
    tied = {(t.file, path) for t in ties for path in t.paths}
    assert ("target-1m-pending-1k-mariadb.json", "runs[0].lateness_ms.p99") in tied
    assert ("target-50-per-s-sqlite.json", "runs[0].lateness_ms.p99") in tied
    assert ("peers.json", "workloads[0].results.celery.lateness_ms.p99") in tied
    assert ("import-time.json", "import_s.median") in tied
    assert all((BENCH_DIR / t.file).is_file() for t in ties)


def test_no_measured_looking_figure_in_the_readme_is_left_untied() -> None:
    problems = lint(README.read_text())
    assert problems == [], "\n".join(problems)


def test_every_allowed_phrase_is_still_in_the_readme() -> None:
    assert unused_allowances(README.read_text()) == []


# The matcher.


def test_a_whole_number_is_the_value_rounded_half_up_to_units() -> None:
    fourteen = parse_numbers("14 ms")[0]
    assert matches(fourteen, Decimal("14.09"))
    assert matches(fourteen, Decimal("13.5"))
    assert not matches(fourteen, Decimal("14.5"))
    assert not matches(fourteen, Decimal("13.49"))


def test_a_decimal_is_the_value_rounded_half_up_to_as_many_places() -> None:
    three_nine = parse_numbers("p50 3.9 ms")[0]
    assert matches(three_nine, resolve({"v": 3.85}, "v"))  # the float 3.85, read as written
    assert matches(three_nine, Decimal("3.94"))
    assert not matches(three_nine, Decimal("3.95"))
    assert matches(parse_numbers("4.0")[0], Decimal("3.98"))  # a trailing zero is a place
    assert not matches(parse_numbers("4.0")[0], Decimal("4.06"))


def test_thousands_separators_are_read_and_every_digit_counts() -> None:
    assert one("16,659 timers/s") == Decimal("16659")
    million = parse_numbers("1,000,000 pending")[0]
    assert matches(million, Decimal(1_000_000))
    assert not matches(million, Decimal(1_000_400))
    assert matches(parse_numbers("16,659")[0], Decimal("16658.9"))


def test_a_tilde_makes_the_trailing_zeros_of_a_whole_number_not_significant() -> None:
    about = parse_numbers("~62,000 timers/s")[0]
    assert about.approx
    assert matches(about, Decimal(61_882))
    assert not matches(about, Decimal(62_600))
    assert not matches(parse_numbers("62,000")[0], Decimal(61_882))
    assert matches(parse_numbers("~0.1 s")[0], Decimal("0.086"))


def test_labels_names_versions_and_addresses_are_not_numbers() -> None:
    text = "p99 20m 1m-pending.json Redis 7.0.15 127.0.0.1 SN123 2-core 122x 5ms 33% 1.1 ms"
    assert [n.text for n in parse_numbers(text)] == ["2", "122", "5", "33", "1.1"]


def test_a_range_is_two_numbers() -> None:
    assert [n.text for n in parse_numbers("p99 3-4 ms, 1\u20133 ms")] == ["3", "4", "1", "3"]


def test_the_suggested_figure_keeps_the_written_precision_separators_and_tilde() -> None:
    assert write_like(parse_numbers("4.0")[0], Decimal("4.06")) == "4.1"
    assert write_like(parse_numbers("16,659")[0], Decimal("17210.4")) == "17,210"
    assert write_like(parse_numbers("~62,000")[0], Decimal("75910")) == "~76,000"
    assert write_like(parse_numbers("184")[0], Decimal("1840.2")) == "1,840"
    assert write_like(parse_numbers("5.9")[0], Decimal("12.55353")) == "12.6"


def test_a_path_reads_keys_and_indices_and_may_change_the_unit() -> None:
    data = {"runs": [{"lateness_ms": {"max": 5898.47}, "share": 0.334}], "config": {"n": 3}}
    assert resolve(data, "runs[0].lateness_ms.max/1000") == Decimal("5.89847")
    assert resolve(data, "runs[0].share*100") == Decimal("33.4")
    assert resolve(data, "config.n") == 3


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("runs[1].p99", "no item [1] at runs"),
        ("runs[0].p95", "no key 'p95' at runs[0]"),
        ("runs[0].lost", "is null, not a number"),
        ("runs[0].ok", "is true, not a number"),
        ("runs..p99", "is not a path like runs[0].lateness_ms.p99"),
    ],
)
def test_a_path_that_leads_nowhere_says_where_it_stopped(path: str, message: str) -> None:
    data = {"runs": [{"p99": 4.0, "lost": None, "ok": True}]}
    with pytest.raises((LookupError, TypeError), match=message.replace("[", r"\[")):
        resolve(data, path)


# Reports, on a README and bench files of the test's own.


@pytest.fixture
def bench_dir(tmp_path: Path) -> Path:
    run = {"lateness_ms": {"p50": 1.07, "p99": 3.98}, "throughput_per_s": 16658.9}
    (tmp_path / "run.json").write_text(json.dumps({"runs": [run], "config": {"pending": 1000}}))
    return tmp_path


def test_figures_that_match_their_json_give_no_problem(bench_dir: Path) -> None:
    readme = (
        "Intro.\n"
        "| 1,000 pending | 1.1 / 4.0 ms | 16,659/s <!-- bench: run.json config.pending "
        "runs[0].lateness_ms.p50 runs[0].lateness_ms.p99 runs[0].throughput_per_s --> |\n"
    )
    assert check_ties(readme, bench_dir) == []


def test_a_wrong_figure_names_the_line_file_path_what_is_written_and_what_to_write(
    bench_dir: Path,
) -> None:
    readme = (
        "Intro.\n\n"
        "p50 1.1 ms, p99 4.1 ms <!-- bench: run.json runs[0].lateness_ms.p50 "
        "runs[0].lateness_ms.p99 -->\n"
    )
    assert check_ties(readme, bench_dir) == [
        "README.md:3: README says 4.1, docs/bench/run.json runs[0].lateness_ms.p99 is 3.98: "
        "write 4.0"
    ]


def test_a_comment_ties_only_the_numbers_after_the_previous_comment_on_its_line(
    bench_dir: Path,
) -> None:
    readme = (
        "1,000 pending <!-- bench: run.json config.pending --> fire with p99 4.0 ms "
        "<!-- bench: run.json runs[0].lateness_ms.p99 -->\n"
    )
    ties, problems = find_ties(readme)
    assert problems == []
    assert [[n.text for n in t.numbers] for t in ties] == [["1,000"], ["4.0"]]
    assert check_ties(readme, bench_dir) == []


def test_other_comments_on_the_line_do_not_cut_a_tie_short(bench_dir: Path) -> None:
    readme = (
        "1,000 pending <!-- TODO wording --> fire with p99 4.0 ms "
        "<!-- bench: run.json config.pending runs[0].lateness_ms.p99 -->\n"
    )
    assert check_ties(readme, bench_dir) == []
    assert lint(readme) == []


def test_numbers_and_paths_that_do_not_pair_up_are_reported(bench_dir: Path) -> None:
    readme = "p50 1.1 ms, p99 4.0 ms <!-- bench: run.json runs[0].lateness_ms.p99 -->\n"
    assert check_ties(readme, bench_dir) == [
        "README.md:1: 2 number(s) before the comment (1.1, 4.0) but 1 path(s) in it "
        "(runs[0].lateness_ms.p99)"
    ]


def test_a_missing_file_or_path_is_reported(bench_dir: Path) -> None:
    readme = (
        "4.0 ms <!-- bench: gone.json runs[0].lateness_ms.p99 -->\n"
        "4.0 ms <!-- bench: run.json runs[0].lateness_ms.p95 -->\n"
    )
    problems = check_ties(readme, bench_dir)
    assert len(problems) == 2
    assert problems[0].startswith("README.md:1: docs/bench/gone.json: ")
    assert problems[1] == (
        "README.md:2: docs/bench/run.json runs[0].lateness_ms.p95: "
        "no key 'p95' at runs[0].lateness_ms"
    )


# The lint.


def test_an_untied_measured_figure_is_flagged_with_its_line() -> None:
    problems = lint("Intro.\nOne listener fires ~5,000 timers/s and holds 184 B/timer.\n")
    assert [p.split(": ", 1)[0] for p in problems] == ["README.md:2", "README.md:2"]
    assert "'~5,000 timers/s' looks measured" in problems[0]
    assert "'184 B/timer' looks measured" in problems[1]


@pytest.mark.parametrize(
    "figure",
    [
        "0.1 s",
        "3.9 ms",
        "12 µs",
        "184 B",
        "177 MB",
        "300 bytes",
        "51%",
        "122x",
        "4 \u00d7",
        "1,000/s",
        "2,000 rows/s",
        "5,000 timers a second",
        "750 per second",
    ],
)
def test_each_unit_of_measure_makes_a_number_look_measured(figure: str) -> None:
    assert len(lint(f"it takes {figure} here\n")) == 1


def test_settings_code_names_and_tied_figures_are_not_flagged() -> None:
    readme = (
        "polls `DELAYQ_OUTBOX_POLL_S` (5 ms), reads the topology every 2 s\n"
        "durations are `90s`, `500ms` or `20m`; HTTP 5xx; 20 minutes; exposure 1.1\n"
        "```sh\n"
        "delayq bench --duration 30 s --rate 1000/s\n"
        "```\n"
        "p99 4.0 ms <!-- bench: run.json runs[0].lateness_ms.p99 -->\n"
    )
    assert lint(readme) == []


def test_a_figure_after_the_last_comment_on_a_line_is_still_flagged() -> None:
    readme = "p99 4.0 ms <!-- bench: run.json runs[0].lateness_ms.p99 --> and max 17 ms\n"
    (problem,) = lint(readme)
    assert "'17 ms' looks measured" in problem


def test_an_allowance_no_line_uses_any_more_is_reported() -> None:
    allowed = {r"every \d+ s\b": "an interval", r"above 1 s for 10 min": "a threshold"}
    assert unused_allowances("reads it every 5 s\n", allowed) == [r"above 1 s for 10 min"]
    assert set(ALLOWED) - set(unused_allowances("", ALLOWED)) == set()
