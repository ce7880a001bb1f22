"""The replay exchange's playback clock, driven by a hand-moved real-time source."""

from __future__ import annotations

import pytest

from services.replay.clock import PlaybackClock

pytestmark = pytest.mark.unit


class ManualTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_stands_still_until_started_then_runs_at_speed() -> None:
    real = ManualTime()
    clock = PlaybackClock(real, start_ms=10_000, end_ms=1_000_000, speed=60)
    real.now += 5
    assert clock.now_ms() == 10_000 and not clock.started
    clock.start()
    real.now += 0.5
    assert clock.now_ms() == 10_000 + 30_000
    assert clock.real_seconds_until(10_000 + 90_000) == pytest.approx(1.0)
    assert clock.real_seconds_until(5_000) == 0.0


def test_pause_freezes_and_resume_continues_without_a_jump() -> None:
    real = ManualTime()
    clock = PlaybackClock(real, start_ms=0, end_ms=10**9, speed=1)
    clock.start()
    real.now += 2
    clock.pause()
    assert not clock.running and clock.real_seconds_until(5_000) is None
    real.now += 100
    assert clock.now_ms() == 2_000
    clock.resume()
    real.now += 1
    assert clock.now_ms() == 3_000


def test_never_passes_the_end() -> None:
    real = ManualTime()
    clock = PlaybackClock(real, start_ms=0, end_ms=5_000, speed=1000)
    clock.start()
    real.now += 60
    assert clock.now_ms() == 5_000


def test_fast_mode_moves_only_by_jumps_forward() -> None:
    real = ManualTime()
    clock = PlaybackClock(real, start_ms=100, end_ms=900, speed=0)
    clock.start()
    real.now += 50
    assert clock.fast and clock.now_ms() == 100
    clock.jump_to(500)
    clock.jump_to(300)
    assert clock.now_ms() == 500
    assert clock.real_seconds_until(600) is None
    clock.finish()
    assert clock.now_ms() == 900


def test_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="speed"):
        PlaybackClock(ManualTime(), start_ms=0, end_ms=1, speed=-1)
    with pytest.raises(ValueError, match="before"):
        PlaybackClock(ManualTime(), start_ms=10, end_ms=1, speed=1)
