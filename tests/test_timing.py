"""Pure unit tests: durations, order ids, actions, due times, timer keys and settings.

No servers: these protect the validation that stands between a caller's typo and a
timer that cancels an order at the wrong time (or a setting that reaches SQL)."""

from __future__ import annotations

import math
import os
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from delayq.errors import InvalidInput
from delayq.keys import parse_timer_key, timer_key
from delayq.settings import Settings, mask_url
from delayq.timing import (
    from_ms,
    parse_delay_ms,
    parse_due_at,
    to_ms,
    validate_action,
    validate_order_sn,
)


@pytest.fixture(autouse=True)
def no_delayq_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's DELAYQ_* settings must not leak into the Settings tests."""
    for name in list(os.environ):
        if name.startswith("DELAYQ_"):
            monkeypatch.delenv(name)


# -- durations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected_ms"),
    [
        ("90s", 90_000),
        ("20m", 1_200_000),
        ("1h30m", 5_400_000),
        ("2d", 172_800_000),
        ("1w", 604_800_000),
        ("1200", 1_200_000),
        ("1.5s", 1_500),
        ("500ms", 500),
        ("1m30s", 90_000),
        (" 20m ", 1_200_000),
        ("20M", 1_200_000),
        ("0", 0),
        ("0s", 0),
    ],
)
def test_duration_strings_a_caller_would_write_become_exact_milliseconds(
    text: str, expected_ms: int
) -> None:
    assert parse_delay_ms(text) == expected_ms


@pytest.mark.parametrize(
    ("delay", "expected_ms"),
    [
        (timedelta(minutes=20), 1_200_000),
        (timedelta(seconds=1, milliseconds=250), 1_250),
        (1200, 1_200_000),
        (1.5, 1_500),
        (0.25, 250),
        (0, 0),
        (0.0, 0),
        (timedelta(0), 0),
    ],
)
def test_timedelta_and_numeric_seconds_are_accepted_as_delays(
    delay: timedelta | float, expected_ms: int
) -> None:
    assert parse_delay_ms(delay) == expected_ms


@pytest.mark.parametrize(
    "text",
    ["", "   ", "5x", "-1", "-5m", "1h 30m", "abc", "m", "1.s", "20 m", "1e3", "nan", "inf"],
)
def test_malformed_duration_strings_are_refused_with_a_hint(text: str) -> None:
    with pytest.raises(InvalidInput, match="invalid duration"):
        parse_delay_ms(text)


@pytest.mark.parametrize(
    "delay",
    [
        -1,
        -0.001,
        timedelta(seconds=-1),
        math.nan,
        math.inf,
        -math.inf,
        True,
        False,
        None,
        [20],
        "3700d",
        "1" + "0" * 400,
        timedelta.max,
        11 * 366 * 86400,
    ],
)
def test_negative_nan_boolean_and_absurd_delays_are_refused(delay: object) -> None:
    with pytest.raises(InvalidInput, match="invalid duration"):
        parse_delay_ms(delay)  # type: ignore[arg-type]


def test_an_integer_too_large_for_a_float_is_refused_as_invalid_input() -> None:
    # A caller's overflow (e.g. a timestamp in ns passed as seconds) must be a clear
    # InvalidInput, not an OverflowError escaping from the library.
    with pytest.raises(InvalidInput, match="invalid duration"):
        parse_delay_ms(10**400)


def test_the_longest_allowed_delay_is_ten_years() -> None:
    ten_years_s = 10 * 366 * 86400
    assert parse_delay_ms(ten_years_s) == ten_years_s * 1000
    with pytest.raises(InvalidInput):
        parse_delay_ms(ten_years_s + 1)


# -- order ids and actions ---------------------------------------------------------------


@pytest.mark.parametrize("order_sn", ["SN123", "a", "A-b_c.9", "x" * 64, "2024.11.23-0001"])
def test_order_ids_of_up_to_64_safe_characters_are_accepted(order_sn: str) -> None:
    assert validate_order_sn(order_sn) == order_sn


@pytest.mark.parametrize(
    "order_sn",
    [
        "x" * 65,
        "",
        "SN:1",
        "SN 1",
        "SN*",
        "SN?",
        "SN[1]",
        "{delayq}",
        "SN1\n",
        "SNé",
        None,
        123,
    ],
)
def test_order_ids_that_could_break_keys_or_patterns_are_refused(order_sn: object) -> None:
    with pytest.raises(InvalidInput, match="invalid order id"):
        validate_order_sn(order_sn)  # type: ignore[arg-type]


@pytest.mark.parametrize("action", ["cancel", "complete", "remind_2", "a" * 32])
def test_lowercase_action_names_are_accepted(action: str) -> None:
    assert validate_action(action) == action


@pytest.mark.parametrize(
    "action", ["", "Cancel", "2nd", "can-cel", "can:cel", "a" * 33, "cancel ", None]
)
def test_action_names_that_are_not_lowercase_identifiers_are_refused(action: object) -> None:
    with pytest.raises(InvalidInput, match="invalid action"):
        validate_action(action)  # type: ignore[arg-type]


# -- absolute due times ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-01T10:00:00Z", datetime(2026, 12, 1, 10, 0, tzinfo=UTC)),
        ("2026-12-01T10:00:00z", datetime(2026, 12, 1, 10, 0, tzinfo=UTC)),
        ("2026-12-01T10:00Z", datetime(2026, 12, 1, 10, 0, tzinfo=UTC)),
        ("2026-12-01T10:00:00+01:00", datetime(2026, 12, 1, 9, 0, tzinfo=UTC)),
        ("2026-12-01T10:00:00-05:30", datetime(2026, 12, 1, 15, 30, tzinfo=UTC)),
        ("2026-12-01T00:30:00+02:00", datetime(2026, 11, 30, 22, 30, tzinfo=UTC)),
        ("2026-12-01T10:00:00.123456Z", datetime(2026, 12, 1, 10, 0, 0, 123456, tzinfo=UTC)),
    ],
)
def test_due_times_with_z_or_an_offset_are_converted_to_utc(text: str, expected: datetime) -> None:
    parsed = parse_due_at(text)
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)


def test_an_aware_datetime_in_another_zone_is_converted_to_utc() -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    parsed = parse_due_at(datetime(2026, 12, 1, 10, 0, tzinfo=india))
    assert parsed == datetime(2026, 12, 1, 4, 30, tzinfo=UTC)
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    "value", ["2026-12-01T10:00:00", "2026-12-01", datetime(2026, 12, 1, 10, 0)]
)
def test_due_times_without_a_zone_are_refused_rather_than_guessed(value: object) -> None:
    with pytest.raises(InvalidInput, match="no zone"):
        parse_due_at(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value", ["", "garbage", "tomorrow", "2026-13-01T10:00Z", "2026-12-01T25:00Z", "Z"]
)
def test_garbage_due_times_are_refused_with_a_hint(value: str) -> None:
    with pytest.raises(InvalidInput, match="invalid time"):
        parse_due_at(value)


@pytest.mark.parametrize("value", [date(2026, 12, 1), 1_790_000_000], ids=["date", "epoch-int"])
def test_due_times_of_the_wrong_type_are_refused_as_invalid_input(value: object) -> None:
    # at=date(...) or at=<epoch seconds> are easy mistakes; they must be InvalidInput,
    # not an AttributeError from deep inside the library.
    with pytest.raises(InvalidInput):
        parse_due_at(value)  # type: ignore[arg-type]


# -- milliseconds ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "when",
    [
        datetime(2026, 12, 1, 10, 0, 0, 1, tzinfo=UTC),
        datetime(2026, 12, 1, 10, 0, 0, 999, tzinfo=UTC),
        datetime(2026, 12, 1, 10, 0, 0, 123_456, tzinfo=UTC),
        datetime(2026, 12, 1, 10, 0, 0, 999_999, tzinfo=UTC),
        datetime(2026, 12, 1, 10, 0, 0, 500, tzinfo=timezone(timedelta(hours=-7))),
    ],
)
def test_due_times_with_microseconds_round_up_so_a_timer_is_never_early(when: datetime) -> None:
    ms = to_ms(when)
    assert from_ms(ms) >= when
    assert from_ms(ms) - when < timedelta(milliseconds=1)
    # The same in integer microseconds, without datetime arithmetic.
    epoch_us = (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    assert ms * 1000 >= epoch_us > (ms - 1) * 1000


@pytest.mark.parametrize(
    "when",
    [
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(2026, 12, 1, 10, 0, tzinfo=UTC),
        datetime(2026, 12, 1, 10, 0, 0, 123_000, tzinfo=UTC),
        datetime(2099, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC),
    ],
)
def test_whole_millisecond_due_times_round_trip_exactly(when: datetime) -> None:
    assert from_ms(to_ms(when)) == when
    assert from_ms(to_ms(when)).tzinfo is UTC


def test_to_ms_counts_milliseconds_since_the_epoch() -> None:
    assert to_ms(datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)) == 1000
    assert to_ms(datetime(2026, 12, 1, 10, 0, tzinfo=UTC)) == 1_796_119_200_000


# -- timer keys --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("order_sn", "action"),
    [("SN123", "cancel"), ("a.b-c_d", "complete"), ("x" * 64, "a" * 32), ("9", "x")],
)
def test_timer_keys_round_trip_to_order_and_action(order_sn: str, action: str) -> None:
    key = timer_key(order_sn, action)
    assert key == f"{order_sn}:{action}"
    assert parse_timer_key(key) == (order_sn, action)


def test_a_legacy_setex_key_is_understood_as_a_cancel_timer() -> None:
    assert parse_timer_key("SN123:cancel") == ("SN123", "cancel")


@pytest.mark.parametrize(
    "key", ["SN123", "{delayq}:due", "SN 1:cancel", "SN1:Cancel", ":cancel", "SN1:", "a:b:c"]
)
def test_keys_that_are_not_timers_are_not_parsed_as_timers(key: str) -> None:
    with pytest.raises(InvalidInput, match="not a timer key"):
        parse_timer_key(key)


@pytest.mark.parametrize(("order_sn", "action"), [("SN:1", "cancel"), ("SN1", "Cancel")])
def test_timer_key_refuses_an_invalid_order_or_action(order_sn: str, action: str) -> None:
    with pytest.raises(InvalidInput):
        timer_key(order_sn, action)


# -- settings ----------------------------------------------------------------------------


def _env_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / ".env"
    path.write_text(text)
    return path


def test_settings_are_read_from_a_dotenv_file(tmp_path: Path) -> None:
    env_file = _env_file(
        tmp_path,
        "DELAYQ_REDIS_URL=redis://10.0.0.5:6380/3\n"
        "DELAYQ_BATCH_SIZE=250\n"
        "DELAYQ_LEASE_S=30.5\n"
        "DELAYQ_ORDERS_TABLE=shop.orders\n"
        f"DELAYQ_HOME={tmp_path / 'data'}\n",
    )
    settings = Settings.load(env_file=env_file)
    assert settings.redis_url == "redis://10.0.0.5:6380/3"
    assert settings.batch_size == 250
    assert settings.lease_s == 30.5
    assert settings.orders_table == "shop.orders"
    assert settings.home == tmp_path / "data"


def test_the_environment_wins_over_the_dotenv_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = _env_file(tmp_path, "DELAYQ_BATCH_SIZE=250\nDELAYQ_NAMESPACE=fromfile\n")
    monkeypatch.setenv("DELAYQ_BATCH_SIZE", "42")
    settings = Settings.load(env_file=env_file)
    assert settings.batch_size == 42
    assert settings.namespace == "fromfile"


def test_cli_flags_win_over_the_environment_and_the_dotenv_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = _env_file(
        tmp_path,
        "DELAYQ_REDIS_URL=redis://from-file:6379/0\nDELAYQ_DATABASE_URL=sqlite:///file.db\n",
    )
    monkeypatch.setenv("DELAYQ_REDIS_URL", "redis://from-env:6379/0")
    settings = Settings.load(
        env_file=env_file, redis_url="redis://from-flag:6379/1", database_url=None
    )
    assert settings.redis_url == "redis://from-flag:6379/1"
    # None means 'flag not given': the file's value stays.
    assert settings.database_url == "sqlite:///file.db"


def test_a_missing_dotenv_file_means_defaults() -> None:
    settings = Settings.load(env_file="/nonexistent/dir/.env")
    assert settings == Settings(home=settings.home)
    assert settings.embedded_redis


def test_repr_masks_the_passwords_of_both_urls() -> None:
    settings = Settings(
        redis_url="redis://:r3dispw@cache:6379/2",
        database_url="mysql+pymysql://shop:dbs3cret@db:3306/shop",
    )
    text = repr(settings)
    assert "r3dispw" not in text
    assert "dbs3cret" not in text
    assert "redis://:***@cache:6379/2" in text
    assert "mysql+pymysql://shop:***@db:3306/shop" in text


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DELAYQ_ORDERS_TABLE", "orders; drop table x"),
        ("DELAYQ_ORDERS_TABLE", "a.b.c"),
        ("DELAYQ_STATUS_COLUMN", "status--"),
        ("DELAYQ_ORDER_KEY_COLUMN", ""),
        ("DELAYQ_CANCELLED_AT_COLUMN", "x y"),
        ("DELAYQ_BATCH_SIZE", "abc"),
        ("DELAYQ_BATCH_SIZE", "1.5"),
        ("DELAYQ_BATCH_SIZE", "0"),
        ("DELAYQ_BATCH_SIZE", "10001"),
        ("DELAYQ_LEASE_S", "soon"),
        ("DELAYQ_LEASE_S", "0.5"),
        ("DELAYQ_MAX_ATTEMPTS", "0"),
        ("DELAYQ_NAMESPACE", "my queue"),
        ("DELAYQ_NAMESPACE", "a{b}"),
        ("DELAYQ_STATUS_UNPAID", "x" * 33),
        ("DELAYQ_REDIS_URL", "http://cache:6379"),
        ("DELAYQ_RECONNECT_BACKOFF_MAX_S", "-1"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidInput) as caught:
        Settings.load(env_file=None)
    assert name in str(caught.value)


def test_bad_settings_in_the_dotenv_file_are_refused_naming_the_setting(tmp_path: Path) -> None:
    env_file = _env_file(tmp_path, "DELAYQ_BATCH_SIZE=lots\n")
    with pytest.raises(InvalidInput, match="DELAYQ_BATCH_SIZE"):
        Settings.load(env_file=env_file)


@pytest.mark.parametrize("name", ["DELAYQ_LEASE_S", "DELAYQ_RETRY_BACKOFF_S"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_not_a_number_or_infinite_durations_in_settings_are_refused(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # float('nan') passes every '<' check, so a NaN lease or backoff would slip through.
    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidInput, match=name):
        Settings.load(env_file=None)


def test_an_empty_column_setting_turns_the_optional_column_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DELAYQ_CANCELLED_AT_COLUMN", "")
    assert Settings.load(env_file=None).cancelled_at_column == ""


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://default:s3cret@cache/0", "redis://default:***@cache/0"),
        (
            "mysql+pymysql://root:s3cret@127.0.0.1:3306/x?charset=utf8mb4",
            "mysql+pymysql://root:***@127.0.0.1:3306/x?charset=utf8mb4",
        ),
        ("postgresql+psycopg://u:p%40ss%2Fw@db/x", "postgresql+psycopg://u:***@db/x"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("sqlite:////var/lib/delayq.db", "sqlite:////var/lib/delayq.db"),
        (None, "(embedded)"),
        ("", "(embedded)"),
    ],
)
def test_mask_url_hides_passwords_and_keeps_the_rest(url: str | None, masked: str) -> None:
    assert mask_url(url) == masked


def test_mask_url_hides_a_password_given_as_a_query_parameter() -> None:
    # redis-py honours redis://host/0?password=...; a log line must not show it.
    assert "s3cret" not in mask_url("redis://127.0.0.1:6379/0?password=s3cret")


def test_mask_url_of_a_url_with_a_bad_port_still_hides_the_password() -> None:
    # Used while reporting a malformed URL: it must not raise on that very URL.
    masked = mask_url("mysql+pymysql://root:s3cret@127.0.0.1:xx/db")
    assert "s3cret" not in masked
