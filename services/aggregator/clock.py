"""The aggregator's market clock: what "now" means when quiet symbols' klines are closed.

A clock is anything with ``now_ms() -> int | None`` (milliseconds since the Unix epoch, ``None`` while unknown).
Nothing in the aggregator reads the system time directly; the worker is given one of these:

* :class:`WallClock` (``aggregator.clock = "wall"``, live Binance): the system's UTC time, through an injectable
  ``time_s`` function;
* :class:`ManualClock` (tests, and ``--clock manual``): market time set by hand, or over HTTP
  (``POST /clock?now_ms=...``), so a test decides exactly when a quiet kline may close;
* :class:`EventClock` (``aggregator.clock = "event"``, for replays at any speed): no time at all, so a kline
  closes only when a later trade of its own symbol arrives, exactly as ``klines replay`` folds a file.

The aggregator only advances a partition's books by the clock once it has read that partition up to its end
(see :mod:`services.aggregator.engine`), so a clock ahead of a backlog never closes a kline early.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol


class Clock(Protocol):
    """Market time in milliseconds, or ``None`` while it is unknown."""

    def now_ms(self) -> int | None: ...


class WallClock:
    """The system's UTC time (``time_s`` is injectable for tests)."""

    def __init__(self, time_s: Callable[[], float] = time.time) -> None:
        self._time_s = time_s

    def now_ms(self) -> int:
        return int(self._time_s() * 1000)


class ManualClock:
    """Market time that moves only when told to; never backwards."""

    def __init__(self, now_ms: int | None = None) -> None:
        self._now = now_ms

    def now_ms(self) -> int | None:
        return self._now

    def set(self, now_ms: int) -> None:
        """Move to ``now_ms``; a value in the past of the current time is ignored (time is monotonic)."""
        if self._now is None or now_ms > self._now:
            self._now = now_ms

    def advance(self, delta_ms: int) -> None:
        if delta_ms < 0:
            raise ValueError(f"a clock cannot go back (delta_ms={delta_ms})")
        self._now = (self._now or 0) + delta_ms


class EventClock:
    """No time at all (``aggregator.clock = "event"``, for replays): klines close only by trades.

    A kline closes when a later trade of its own symbol arrives, exactly as ``klines replay`` folds a file, and
    never by a clock. Replays run at any speed, and symbols do not reach the aggregator in market-time order
    (ingest publishes each symbol at its own pace, a partition may be read ahead of another): another symbol's
    newer trade says nothing about whether this symbol's feed has caught up, so closing this symbol's quiet
    klines by it would emit empty klines for minutes whose trades are still on their way (and then reject
    those trades as late). So, like a replay, the last kline of each symbol stays open until its next trade.
    """

    def now_ms(self) -> None:
        return None


def make_clock(kind: str) -> WallClock | ManualClock | EventClock:
    """The clock named by ``aggregator.clock`` or ``--clock``: ``wall``, ``event`` or ``manual``."""
    if kind == "wall":
        return WallClock()
    if kind == "event":
        return EventClock()
    if kind == "manual":
        return ManualClock()
    raise ValueError(f"unknown clock {kind!r}: expected wall, event or manual")
