"""The wall clock under steps of the system clock, alone and driving the engine's clock ticks.

What the clock drives (see :mod:`services.aggregator.clock`): only when quiet klines close. Ticks, snapshots
and checkpoints run on the monotonic clock. So the engine cases step the system time forward and back between
ticks and require the oracle's klines exactly, none closed early (no late trade, no corrected version), and a
snapshot publication and a checkpoint on every tick as before. The last case shows what the guard prevents: a
clock that follows a forward step closes klines before their trades arrive.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from test_aggregator_engine import (
    FINALIZED,
    PARTITIONS,
    SNAPSHOTS,
    T0,
    TRADES,
    Broker,
    Harness,
    assert_exact,
    end_of,
    interleave,
    make_trades,
    produce,
)

from services.aggregator.clock import ManualClock, SystemTime, WallClock, make_clock
from services.core.models import AggTrade
from services.shared.messages import decode_kline

pytestmark = pytest.mark.unit

HOUR_MS = 3_600_000


class FakeTime:
    """A monotonic clock (seconds) and a system clock (ms) that moves with it, plus a step offset."""

    def __init__(self, system_ms: int) -> None:
        self.mono = 100.0
        self.base_ms = system_ms
        self.offset_ms = 0

    def monotonic(self) -> float:
        return self.mono

    def time_s(self) -> float:
        return (self.base_ms + (self.mono - 100.0) * 1000 + self.offset_ms) / 1000

    def advance_to(self, market_ms: int) -> None:
        """Real time passes until the (unstepped) system time is ``market_ms``."""
        self.mono = max(self.mono, 100.0 + (market_ms - self.base_ms) / 1000)


# ------------------------------------------------------------------------------------------------ the clock


def test_follows_the_system_time_while_it_moves_like_the_monotonic_clock() -> None:
    fake = FakeTime(T0)
    clock = WallClock(fake.time_s, monotonic=fake.monotonic)
    assert clock.now_ms() == T0
    fake.mono += 1.5
    assert clock.now_ms() == T0 + 1500
    fake.offset_ms = 700  # within the tolerance (an NTP slew, a small correction): followed
    assert clock.now_ms() == T0 + 2200
    assert clock.steps == 0


def test_a_forward_step_is_not_followed_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeTime(T0)
    clock = WallClock(fake.time_s, monotonic=fake.monotonic)
    fake.mono += 10
    fake.offset_ms = HOUR_MS
    with caplog.at_level(logging.WARNING, logger="services.aggregator"):
        assert clock.now_ms() == T0 + 10_000
        fake.mono += 5
        assert clock.now_ms() == T0 + 15_000  # on at the monotonic pace
    steps = [r for r in caplog.records if "stepped" in r.getMessage()]
    assert len(steps) == 1 and clock.steps == 1
    fake.offset_ms = 0  # the step is undone: followed again
    fake.mono += 1
    assert clock.now_ms() == T0 + 16_000


def test_a_backward_step_never_takes_the_clock_back() -> None:
    fake = FakeTime(T0)
    clock = WallClock(fake.time_s, monotonic=fake.monotonic)
    fake.mono += 60
    assert clock.now_ms() == T0 + 60_000
    fake.offset_ms = -2 * HOUR_MS
    readings = []
    for _ in range(5):
        fake.mono += 1
        readings.append(clock.now_ms())
    assert readings == [T0 + 61_000 + k * 1000 for k in range(5)]
    assert clock.steps == 1
    fake.offset_ms = -500  # back within the tolerance, but behind the last reading: the clock waits
    fake.mono += 0.2
    assert clock.now_ms() == T0 + 65_000


def test_the_services_wall_clock_reads_a_steppable_system_time() -> None:
    clock = make_clock("wall")
    assert isinstance(clock, WallClock) and isinstance(clock.time_source, SystemTime)
    before = clock.now_ms()
    clock.time_source.step(HOUR_MS)
    assert before <= clock.now_ms() < before + HOUR_MS and clock.steps == 1
    with pytest.raises(ValueError, match="step_tolerance_ms"):
        WallClock(step_tolerance_ms=-1)


# ------------------------------------------------------------------------------------------------ the engine


def streams_of() -> dict[str, list[AggTrade]]:
    return {s: make_trades(s, 80, seed) for seed, s in enumerate(["BTCUSDT", "ETHUSDT", "XRPUSDT"])}


async def read_all(h: Harness) -> None:
    """Read every partition to its end (the clock closes klines only in a partition that is caught up)."""
    for p in range(PARTITIONS):
        while h.position[p] < len(h.broker.logs[(TRADES, p)]):
            await h.fetch(p, 50)


async def play(h: Harness, fake: FakeTime, streams: dict[str, list[AggTrade]], steps: dict[int, int]) -> list[int]:
    """Feed the trades in market-time order, real time moving with them, a tick after each chunk; before chunk
    ``k`` in ``steps`` the system clock steps by ``steps[k]`` ms. Returns the checkpoint count after each tick."""
    await h.assign()
    checkpoints = []
    for index, (symbol, trades) in enumerate(interleave(streams, 3)):
        fake.offset_ms += steps.get(index, 0)
        fake.advance_to(trades[0].T)
        produce(h.broker, [(symbol, trades)])  # the trades arrive as their time comes
        await read_all(h)
        h.engine.tick()
        for _ in range(5):
            await asyncio.sleep(0)  # the tick's checkpoint completes in background tasks
        checkpoints.append(h.engine.stats.checkpoints)
    fake.advance_to(end_of(streams))
    h.engine.tick()
    h.engine.tick()
    await h.engine.stop(5.0)
    return checkpoints


async def test_steps_forward_and_back_between_ticks_close_nothing_early_and_lose_nothing() -> None:
    streams = streams_of()
    broker = Broker()
    fake = FakeTime(T0)
    clock = WallClock(fake.time_s, monotonic=fake.monotonic)
    h = Harness(broker, clock)
    ticks_before = h.engine.stats.ticks
    # +1 h, undone; -2 h, undone; +1 day, kept to the end.
    steps = {10: HOUR_MS, 20: -HOUR_MS, 30: -2 * HOUR_MS, 40: 2 * HOUR_MS, 50: 24 * HOUR_MS}
    checkpoints = await play(h, fake, streams, steps)
    assert clock.steps == 3
    assert_exact(broker, streams)
    klines = [decode_kline(value)[0] for value in broker.values(FINALIZED)]
    assert klines and all(k.version == 0 and k.source in ("live", "empty") for k in klines), [
        (k.s, k.i, k.t, k.version, k.source) for k in klines if k.version or k.source not in ("live", "empty")
    ]
    assert max(k.t for k in klines if k.i == "1m") < end_of(streams)  # no empty klines up to a wrong "now"
    metrics = h.engine.metrics()
    assert metrics["late_trades"] == 0 and metrics["rejected_trades"] == 0 and metrics["data_loss"] == 0
    # Snapshots and checkpoints go on every tick, steps or not (the ticks run on the monotonic clock).
    assert h.engine.stats.ticks - ticks_before == len(checkpoints) + 2
    assert checkpoints == sorted(checkpoints) and checkpoints[-1] > checkpoints[50] > checkpoints[10] > 0, checkpoints
    assert broker.values(SNAPSHOTS)


async def test_a_clock_that_followed_a_forward_step_would_close_klines_before_their_trades() -> None:
    # Why the guard exists: the same stream with a clock set one hour ahead mid-stream (as an unguarded wall
    # clock would read it) emits klines that later trades must correct.
    streams = streams_of()
    broker = Broker()
    clock = ManualClock()
    h = Harness(broker, clock)
    await h.assign()
    for index, (symbol, trades) in enumerate(interleave(streams, 3)):
        clock.set(trades[0].T + (HOUR_MS if index >= 10 else 0))
        produce(broker, [(symbol, trades)])
        await read_all(h)
        h.engine.tick()
    await h.engine.stop(5.0)
    metrics = h.engine.metrics()
    assert metrics["late_trades"] + metrics["rejected_trades"] > 0, metrics
    with pytest.raises(AssertionError):
        assert_exact(broker, streams)
