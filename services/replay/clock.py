"""The playback clock: market time as a function of injected real time.

Market time starts at the feed's first instant, stands still until the feed is started, then advances at
``speed`` × real time (``speed=1`` is real time, ``60`` is one market minute per real second). It freezes while
the feed is paused and resumes from where it stopped, so a pause never produces a burst. It never passes the
feed's end: once the recording (or generated window) is over, market time stays at its end.

``speed=0`` means "as fast as possible": there is no relation to real time at all. The publisher moves the
clock forward to each batch of trades it publishes (:meth:`PlaybackClock.jump_to`), so market time is always
the time of the newest published trade.

Real time is read only through the ``monotonic`` callable given at construction (seconds, like
``time.monotonic`` or ``loop.time``), so tests can drive the clock by hand.
"""

from __future__ import annotations

from collections.abc import Callable


class PlaybackClock:
    """Market time in milliseconds, driven by a monotonic real-time source."""

    def __init__(self, monotonic: Callable[[], float], *, start_ms: int, end_ms: int, speed: float) -> None:
        if speed < 0:
            raise ValueError(f"speed must be >= 0 (0 = as fast as possible), got {speed}")
        if end_ms < start_ms:
            raise ValueError(f"end_ms {end_ms} is before start_ms {start_ms}")
        self._monotonic = monotonic
        self._speed = speed
        self._start_ms = start_ms
        self._end_ms = end_ms
        # Market time at the last anchor, and the real time of that anchor while running (None = not running).
        self._anchor_market_ms = float(start_ms)
        self._anchor_real: float | None = None
        self._started = False

    @property
    def speed(self) -> float:
        """Market milliseconds per real millisecond; 0 = as fast as possible."""
        return self._speed

    @property
    def fast(self) -> bool:
        """True when market time is driven by publishing, not by real time (``speed=0``)."""
        return self._speed == 0

    @property
    def start_ms(self) -> int:
        """The market instant the clock starts at."""
        return self._start_ms

    @property
    def end_ms(self) -> int:
        """The market instant the clock never passes."""
        return self._end_ms

    @property
    def started(self) -> bool:
        """Whether :meth:`start` has been called (a paused clock stays started)."""
        return self._started

    @property
    def running(self) -> bool:
        """Started and not paused."""
        return self._anchor_real is not None

    def start(self) -> None:
        """Start market time; idempotent (a second call neither restarts nor resumes)."""
        if self._started:
            return
        self._started = True
        self._anchor_real = self._monotonic()

    def pause(self) -> None:
        """Freeze market time where it is."""
        if self._anchor_real is None:
            return
        self._anchor_market_ms = self._market_ms_unclamped()
        self._anchor_real = None

    def resume(self) -> None:
        """Let market time run again from where it was frozen (also starts a clock never started)."""
        self._started = True
        if self._anchor_real is None:
            self._anchor_real = self._monotonic()

    def jump_to(self, market_ms: int) -> None:
        """Move market time forward to ``market_ms`` (fast mode); never backward, never past the end."""
        self._anchor_market_ms = float(max(self._anchor_market_ms, min(market_ms, self._end_ms)))

    def finish(self) -> None:
        """Put market time at the end of the feed (fast mode, after the last trade)."""
        self.jump_to(self._end_ms)

    def now_ms(self) -> int:
        """Current market time in milliseconds since the epoch."""
        return min(int(self._market_ms_unclamped()), self._end_ms)

    def real_seconds_until(self, market_ms: int) -> float | None:
        """Real seconds until market time reaches ``market_ms``: 0 if already there, None if it cannot advance."""
        now = self._market_ms_unclamped()
        if now >= market_ms:
            return 0.0
        if self._anchor_real is None or self._speed == 0:
            return None
        return (market_ms - now) / self._speed / 1000.0

    def _market_ms_unclamped(self) -> float:
        if self._anchor_real is None or self._speed == 0:
            return self._anchor_market_ms
        elapsed_s = self._monotonic() - self._anchor_real
        return self._anchor_market_ms + elapsed_s * 1000.0 * self._speed
