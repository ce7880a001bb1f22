"""Binance kline interval calendars, in integer milliseconds since the Unix epoch (UTC).

Fixed-size intervals (``1s`` … ``3d``) are aligned to the epoch. ``1w`` runs Monday 00:00 UTC to Sunday
23:59:59.999: the epoch (1970-01-01) was a Thursday, so weeks are offset by four days (345,600,000 ms) from it
— several peers get this wrong. ``1M`` is the calendar month in UTC.

All functions are pure integer arithmetic (no ``datetime``, no float), so they are exact for any timestamp.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from math import gcd

INTERVALS: tuple[str, ...] = (
    "1s",
    "1m",
    "3m",
    "5m",
    "15m",
    "30m",
    "1h",
    "2h",
    "4h",
    "6h",
    "8h",
    "12h",
    "1d",
    "3d",
    "1w",
    "1M",
)
DEFAULT_INTERVALS: tuple[str, ...] = ("1m", "5m", "30m", "1h", "4h", "1d", "1w")

SECOND_MS = 1_000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
WEEK_MS = 7 * DAY_MS
#: Monday 1970-01-05 00:00 UTC: weeks start four days after the epoch.
WEEK_OFFSET_MS = 4 * DAY_MS

_FIXED_MS: dict[str, int] = {
    "1s": SECOND_MS,
    "1m": MINUTE_MS,
    "3m": 3 * MINUTE_MS,
    "5m": 5 * MINUTE_MS,
    "15m": 15 * MINUTE_MS,
    "30m": 30 * MINUTE_MS,
    "1h": HOUR_MS,
    "2h": 2 * HOUR_MS,
    "4h": 4 * HOUR_MS,
    "6h": 6 * HOUR_MS,
    "8h": 8 * HOUR_MS,
    "12h": 12 * HOUR_MS,
    "1d": DAY_MS,
    "3d": 3 * DAY_MS,
    "1w": WEEK_MS,
}
_OFFSET_MS: dict[str, int] = {"1w": WEEK_OFFSET_MS}
_RANK: dict[str, int] = {name: rank for rank, name in enumerate(INTERVALS)}


def validate_interval(name: str) -> str:
    """Return ``name`` if it is a Binance kline interval, else raise ``ValueError`` naming the valid ones."""
    if name not in _RANK:
        raise ValueError(f"unknown interval {name!r}; expected one of {', '.join(INTERVALS)}")
    return name


def interval_rank(name: str) -> int:
    """Position of ``name`` in :data:`INTERVALS` (shorter intervals first); used to order output."""
    return _RANK[validate_interval(name)]


def sort_intervals(names: Iterable[str]) -> tuple[str, ...]:
    """Validated, de-duplicated intervals from shortest to longest."""
    return tuple(sorted({validate_interval(n) for n in names}, key=_RANK.__getitem__))


def interval_ms(interval: str) -> int | None:
    """Length of ``interval`` in milliseconds, or ``None`` for ``1M`` (months differ in length)."""
    validate_interval(interval)
    return _FIXED_MS.get(interval)


# Howard Hinnant's proleptic Gregorian day-number algorithms (public domain), exact for every integer day.
def _civil_from_days(days: int) -> tuple[int, int]:
    """(year, month) of the day ``days`` after 1970-01-01."""
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1_460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month


def _days_from_civil(year: int, month: int) -> int:
    """Days from 1970-01-01 to the first day of ``year``-``month``."""
    y = year - (month <= 2)
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146_097 + doe - 719_468


def month_start(year: int, month: int) -> int:
    """Milliseconds at 00:00 UTC on the first day of ``year``-``month`` (``month`` 1..12)."""
    return _days_from_civil(year, month) * DAY_MS


def open_time(interval: str, ts_ms: int) -> int:
    """Open time of the ``interval`` kline that contains the instant ``ts_ms``."""
    size = _FIXED_MS.get(interval)
    if size is not None:
        offset = _OFFSET_MS.get(interval, 0)
        return (ts_ms - offset) // size * size + offset
    validate_interval(interval)
    year, month = _civil_from_days(ts_ms // DAY_MS)
    return month_start(year, month)


def is_kline_span(interval: str, open_ms: int, close_ms: int) -> bool:
    """True when ``open_ms`` is an open time of ``interval`` and ``close_ms`` its close time (cheap for the
    fixed-size intervals: it runs for every kline a writer stores)."""
    size = _FIXED_MS.get(interval)
    if size is not None:
        return (open_ms - _OFFSET_MS.get(interval, 0)) % size == 0 and close_ms == open_ms + size - 1
    return open_time(interval, open_ms) == open_ms and close_time(interval, open_ms) == close_ms


def next_open(interval: str, open_ms: int) -> int:
    """Open time of the kline after the one that opens at (or contains) ``open_ms``."""
    size = _FIXED_MS.get(interval)
    if size is not None:
        return open_time(interval, open_ms) + size
    validate_interval(interval)
    year, month = _civil_from_days(open_ms // DAY_MS)
    return month_start(year + 1, 1) if month == 12 else month_start(year, month + 1)


def close_time(interval: str, open_ms: int) -> int:
    """Binance close time of the kline opening at ``open_ms``: the next open minus one millisecond."""
    return next_open(interval, open_ms) - 1


def iter_opens(interval: str, start_ms: int, end_ms: int) -> Iterator[int]:
    """Consecutive open times from the kline containing ``start_ms`` up to the one containing ``end_ms``."""
    t = open_time(interval, start_ms)
    while t <= end_ms:
        yield t
        t = next_open(interval, t)


def common_grain(intervals: Iterable[str]) -> tuple[int, int]:
    """The coarsest (size, offset) grid whose cells never straddle a boundary of any of ``intervals``.

    Every open time of every given interval is ``offset + k * size`` for some integer ``k``, so trades can be
    folded per grid cell and the cells merged into each interval later (``1M`` and the week offset need
    whole days).
    """
    size = 0
    offset: int | None = None
    for name in intervals:
        validate_interval(name)
        fixed = _FIXED_MS.get(name)
        if fixed is None:
            size = gcd(size, DAY_MS)
            this_offset = 0
        else:
            size = gcd(size, fixed)
            this_offset = _OFFSET_MS.get(name, 0)
        if offset is None:
            offset = this_offset
        else:
            size = gcd(size, abs(this_offset - offset))
    if offset is None:
        raise ValueError("at least one interval is required")
    return size, offset % size
