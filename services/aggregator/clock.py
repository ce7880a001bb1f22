"""The aggregator's market clock: what "now" means when quiet symbols' klines are closed.

A clock is anything with ``now_ms() -> int | None`` (milliseconds since the Unix epoch, ``None`` while unknown).
Nothing in the aggregator reads the system time directly; the worker is given one of these:

* :class:`WallClock` (``aggregator.clock = "wall"``, live Binance): the system's UTC time, through an injectable
  ``time_s`` function, guarded against steps of the system clock (below);
* :class:`ManualClock` (tests, and ``--clock manual``): market time set by hand, or over HTTP
  (``POST /clock?now_ms=...``), so a test decides exactly when a quiet kline may close;
* :class:`EventClock` (``aggregator.clock = "event"``, for replays at any speed): no time at all, so a kline
  closes only when a later trade of its own symbol arrives, exactly as ``klines replay`` folds a file.

The aggregator only advances a partition's books by the clock once it has read that partition up to its end
(see :mod:`services.aggregator.engine`), so a clock ahead of a backlog never closes a kline early.

What the wall clock drives, and what it does not
------------------------------------------------

Only one thing: each clock tick hands ``now_ms()`` to the books, which close every kline whose close time plus
``aggregator.grace_ms`` has passed (a quiet symbol's kline, and the empty klines of a continuous feed). The tick
cadence, and with it the snapshots and the checkpoints, runs on the monotonic clock
(:meth:`~services.aggregator.engine.Aggregator.run_clock`), as do flow control and every timeout; trades are
bucketed by their own ``T``. So a step of the system clock can only move *when* quiet klines close:

* forward (an NTP step, a wrong manual setting, a VM resumed): a clock that followed it would close open klines
  before their trades arrived. Those trades would come late: corrected versions at best (``source=repaired``),
  rejections past the repair horizon at worst, plus a run of empty klines up to the wrong "now";
* backward: a clock that followed it would close nothing until the system time caught up again (no wrong
  output, but klines late by the size of the step).

So :class:`WallClock` follows the system time only while it moves like the monotonic clock: within
``step_tolerance_ms`` of where the monotonic clock says it should be. A step beyond that is not followed: the
clock goes on from its last reading at the monotonic clock's pace, and logs the step once (WARNING, its size);
it follows the system time again as soon as that comes back within the tolerance (a step undone). It never
goes backwards. A lasting correction of the system clock therefore reaches the aggregator at its next start;
NTP slews small offsets (which the monotonic clock follows too), and steps usually happen at boot, before it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from services.shared.logs import log_event

log = logging.getLogger("services.aggregator")


class Clock(Protocol):
    """Market time in milliseconds, or ``None`` while it is unknown."""

    def now_ms(self) -> int | None: ...


class WallClock:
    """The system's UTC time, guarded against steps of the system clock (see the module docstring).

    ``time_s`` (the system time, seconds) and ``monotonic`` (seconds) are injectable for tests.
    """

    def __init__(
        self,
        time_s: Callable[[], float] = time.time,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        step_tolerance_ms: int = 1_000,
    ) -> None:
        if step_tolerance_ms < 0:
            raise ValueError(f"step_tolerance_ms must be >= 0, got {step_tolerance_ms}")
        self._time_s = time_s
        self._monotonic = monotonic
        self._tolerance = step_tolerance_ms
        # Where the system time was last seen in step, and the monotonic time then: while the system clock is
        # out of step, "now" is that reading plus the monotonic time since (one anchor, so nothing accumulates).
        self._anchor_ms = int(time_s() * 1000)
        self._anchor_at = monotonic()
        self._now = self._anchor_ms
        self._stepped = False
        self.steps = 0
        """How often the system clock stepped out of step (a step back into step is not counted)."""

    @property
    def time_source(self) -> Callable[[], float]:
        """Where the system time is read (a :class:`SystemTime` in the service)."""
        return self._time_s

    def now_ms(self) -> int:
        system = int(self._time_s() * 1000)
        at = self._monotonic()
        expected = self._anchor_ms + round((at - self._anchor_at) * 1000)
        if abs(system - expected) <= self._tolerance:
            now, self._anchor_ms, self._anchor_at = system, system, at
            if self._stepped:
                self._stepped = False
                log_event(log, logging.WARNING, "the system clock is back in step", now_ms=system)
        else:
            now = expected
            if not self._stepped:
                self._stepped = True
                self.steps += 1
                log_event(
                    log,
                    logging.WARNING,
                    "the system clock stepped: the aggregator's clock goes on at the monotonic clock's pace",
                    step_ms=system - expected,
                    system_ms=system,
                    clock_ms=expected,
                )
        self._now = max(now, self._now)
        return self._now


class SystemTime:
    """The system's UTC time in seconds plus an offset that only a test moves (:meth:`step`): a stand-in for a
    step of the machine's clock under a running :class:`WallClock` (the aggregator's ``POST /clock?step_ms=``)."""

    def __init__(self, time_s: Callable[[], float] = time.time) -> None:
        self._time_s = time_s
        self.offset_ms = 0

    def __call__(self) -> float:
        return self._time_s() + self.offset_ms / 1000

    def step(self, delta_ms: int) -> None:
        self.offset_ms += delta_ms


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
        return WallClock(SystemTime())
    if kind == "event":
        return EventClock()
    if kind == "manual":
        return ManualClock()
    raise ValueError(f"unknown clock {kind!r}: expected wall, event or manual")
