"""Interval calendars: epoch-aligned fixed sizes, Monday weeks, calendar months (against ``datetime``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.core.intervals import (
    DEFAULT_INTERVALS,
    INTERVALS,
    WEEK_OFFSET_MS,
    close_time,
    common_grain,
    interval_ms,
    is_kline_span,
    iter_opens,
    next_open,
    open_time,
    validate_interval,
)

pytestmark = pytest.mark.unit

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return int((datetime(year, month, day, hour, minute, second, tzinfo=UTC) - EPOCH) / timedelta(milliseconds=1))


def as_datetime(value: int) -> datetime:
    return EPOCH + timedelta(milliseconds=value)


def test_interval_names_and_defaults() -> None:
    assert INTERVALS == (
        "1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d", "1w", "1M",
    )  # fmt: skip
    assert DEFAULT_INTERVALS == ("1m", "5m", "30m", "1h", "4h", "1d", "1w")
    assert all(validate_interval(name) == name for name in INTERVALS)


@pytest.mark.parametrize("bad", ["2m", "1y", "1W", "", "1mo", "60s"])
def test_unknown_interval_names_the_valid_ones(bad: str) -> None:
    with pytest.raises(ValueError, match=r"unknown interval .*expected one of 1s, 1m, .*1w, 1M"):
        validate_interval(bad)
    with pytest.raises(ValueError, match="unknown interval"):
        open_time(bad, 0)


def test_sizes() -> None:
    assert interval_ms("1s") == 1_000
    assert interval_ms("3d") == 259_200_000
    assert interval_ms("1w") == 604_800_000
    assert interval_ms("1M") is None


def test_week_starts_on_monday_not_on_the_epoch_thursday() -> None:
    # Binance's documented weekly kline: opens Monday 2017-07-03, closes Sunday 2017-07-09 23:59:59.999.
    assert open_time("1w", 1_499_040_000_000) == 1_499_040_000_000
    assert open_time("1w", 1_499_644_799_999) == 1_499_040_000_000
    assert close_time("1w", 1_499_040_000_000) == 1_499_644_799_999
    assert next_open("1w", 1_499_040_000_000) == 1_499_644_800_000
    assert as_datetime(open_time("1w", ms(2024, 8, 1, 12))).date().isoformat() == "2024-07-29"
    assert WEEK_OFFSET_MS == 345_600_000
    assert open_time("1w", 0) == -3 * 86_400_000  # 1970-01-01 (Thu) lies in the week of Mon 1969-12-29


def test_three_days_align_to_the_epoch() -> None:
    assert open_time("3d", 0) == 0
    assert open_time("3d", 259_200_000 - 1) == 0
    assert open_time("3d", ms(2024, 3, 1)) % 259_200_000 == 0


def test_calendar_months() -> None:
    assert open_time("1M", ms(2024, 2, 29, 23, 59, 59) + 999) == ms(2024, 2, 1)
    assert next_open("1M", ms(2024, 2, 1)) == ms(2024, 3, 1)
    assert (next_open("1M", ms(2024, 2, 1)) - ms(2024, 2, 1)) // 86_400_000 == 29  # leap year
    assert (next_open("1M", ms(2023, 2, 1)) - ms(2023, 2, 1)) // 86_400_000 == 28
    assert next_open("1M", ms(2024, 12, 1)) == ms(2025, 1, 1)
    assert close_time("1M", ms(2024, 12, 1)) == ms(2025, 1, 1) - 1
    assert open_time("1M", ms(1969, 12, 31, 23)) == ms(1969, 12, 1)
    assert next_open("1M", ms(2000, 2, 10)) == ms(2000, 3, 1)  # next_open accepts any instant in the kline


def test_iter_opens_covers_both_ends() -> None:
    opens = list(iter_opens("1M", ms(2024, 1, 15), ms(2024, 4, 1)))
    assert opens == [ms(2024, 1, 1), ms(2024, 2, 1), ms(2024, 3, 1), ms(2024, 4, 1)]
    assert list(iter_opens("1m", 59_999, 60_000)) == [0, 60_000]
    assert list(iter_opens("1m", 60_000, 59_999)) == []


@settings(max_examples=300, deadline=None)
@given(st.integers(ms(1900, 1, 1), ms(2200, 1, 1)), st.sampled_from(INTERVALS))
def test_open_time_agrees_with_datetime(value: int, interval: str) -> None:
    moment = as_datetime(value)
    opened = open_time(interval, value)
    closing = close_time(interval, opened)
    assert opened <= value <= closing
    assert open_time(interval, opened) == opened
    assert open_time(interval, closing + 1) == closing + 1
    start = as_datetime(opened)
    if interval == "1M":
        assert start == datetime(moment.year, moment.month, 1, tzinfo=UTC)
    elif interval == "1w":
        assert start.weekday() == 0 and start.time().isoformat() == "00:00:00"
        assert timedelta(0) <= moment - start < timedelta(days=7)
    else:
        size = interval_ms(interval)
        assert size is not None and opened % size == 0 and closing - opened == size - 1


def test_common_grain() -> None:
    assert common_grain(["1m"]) == (60_000, 0)
    assert common_grain(["3m", "5m"]) == (60_000, 0)
    assert common_grain(list(DEFAULT_INTERVALS)) == (60_000, 0)
    assert common_grain(["1w"]) == (604_800_000, 345_600_000)
    assert common_grain(["3d", "1w"]) == (86_400_000, 0)
    assert common_grain(["1M"]) == (86_400_000, 0)
    assert common_grain(list(INTERVALS)) == (1_000, 0)
    with pytest.raises(ValueError):
        common_grain([])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(INTERVALS), min_size=1, max_size=5, unique=True), st.integers(0, 4 * 10**12))
def test_every_boundary_is_on_the_common_grain(intervals: list[str], value: int) -> None:
    size, offset = common_grain(intervals)
    for interval in intervals:
        assert (open_time(interval, value) - offset) % size == 0


@given(
    st.sampled_from(INTERVALS),
    st.integers(0, 4_102_444_800_000),
    st.integers(-2, 2),
    st.sampled_from([-1, 0, 1]),
)
@settings(max_examples=500)
def test_is_kline_span_agrees_with_open_and_close_times(interval: str, ts: int, shift: int, off: int) -> None:
    t = open_time(interval, ts) + shift * (ts % 3)  # an open time, or (often) not
    close = close_time(interval, t) + off
    assert is_kline_span(interval, t, close) == (open_time(interval, t) == t and close_time(interval, t) == close)
