"""A symbol's removal record through the aggregator worker on the real broker, across a restart.

The reproduction of the defect: a symbol removed from ingest went on getting an empty 1m kline every minute of
the wall clock, forever. Here the worker reads a removal record after the symbol's trades, the clock runs an
hour, the worker restarts (restoring from the real checkpoint topic) and the clock runs another hour: the
symbol's open klines were finalized once, flagged ``closed``, and nothing followed; a control symbol on the
same clock keeps its empty klines. Added back, the symbol starts afresh at its first new trade.
"""

from __future__ import annotations

import asyncio

import pytest
from test_aggregator_stream import T0, agg_settings, eventually, produce, read_topic, run_worker

from services.aggregator.clock import ManualClock
from services.aggregator.worker import AggregatorWorker
from services.core.models import AggTrade, Kline
from services.core.reference import reference_klines
from services.shared.messages import SymbolEvent, decode_kline, encode_symbol_event, encode_trade_batch
from services.shared.settings import Settings

pytestmark = pytest.mark.integration

__all__ = ["agg_settings"]  # the fixture, imported for this module's tests

MINUTE = 60_000
REMOVED, CONTROL = "BTCUSDT", "ETHUSDT"


def trades(symbol: str, first_a: int, minutes: list[float], price: str) -> list[AggTrade]:
    return [
        AggTrade(
            symbol, first_a + n, price, "0.5", 3 * (first_a + n), 3 * (first_a + n), T0 + int(m * MINUTE), n % 2 == 0
        )
        for n, m in enumerate(minutes)
    ]


async def finalized(settings: Settings, symbol: str) -> list[Kline]:
    return [
        k
        for k in (decode_kline(v)[0] for _k, v in await read_topic(settings, settings.kafka.topics.finalized))
        if k.s == symbol
    ]


async def run_clock_to(worker: AggregatorWorker, clock: ManualClock, minute: int) -> None:
    """Move the market clock to ``minute`` and wait until the worker's ticks closed the control's minutes."""
    engine = worker.engine
    assert engine is not None
    clock.set(T0 + minute * MINUTE + worker.settings.aggregator.grace_ms + 1)
    confirmed = engine.stats.finalized_confirmed
    await eventually(lambda: engine.stats.finalized_confirmed > confirmed, 15, "the clock's klines")
    await asyncio.sleep(0.5)  # a few more ticks: whatever they would close, they close now


async def test_a_removed_symbol_gets_no_empty_klines_across_an_hour_and_a_restart(agg_settings: Settings) -> None:
    s = agg_settings.model_copy(update={"market": agg_settings.market.model_copy(update={"intervals": ("1m",)})})
    first = trades(REMOVED, 1, [0.1, 0.6, 2.3, 2.8], "100.5")
    control = trades(CONTROL, 1, [0.2, 2.5], "10")
    records = [
        (REMOVED.encode(), encode_trade_batch(REMOVED, first)),
        (CONTROL.encode(), encode_trade_batch(CONTROL, control)),
        (REMOVED.encode(), encode_symbol_event(SymbolEvent(REMOVED, "removed", 4, "POST /symbols"))),
    ]
    clock = ManualClock()

    async def hour_after_removal(worker: AggregatorWorker) -> None:
        engine = worker.engine
        assert engine is not None
        await produce(s, records)
        await eventually(lambda: engine.ready and engine.lag() == 0 and engine.stats.records == 3, 30, "records")
        assert engine.stats.symbols_removed == 1 and engine.current(REMOVED) == []
        await run_clock_to(worker, clock, 60)

    await run_worker(s, clock, hour_after_removal)
    removed = await finalized(s, REMOVED)
    want = reference_klines(first, "1m")  # minutes 0, 1 (empty) and 2
    assert [(k.t, k.source) for k in removed] == [(T0, "live"), (T0 + MINUTE, "empty"), (T0 + 2 * MINUTE, "closed")]
    for got, expected in zip(removed[:2], want[:2], strict=True):
        assert got.same_values(expected)
    assert (removed[2].n, removed[2].c, removed[2].x) == (2, want[2].c, True)
    # The control symbol on the same clock: an empty kline every minute after its last trade (as Binance).
    assert len([k for k in await finalized(s, CONTROL) if k.source == "empty"]) >= 55

    async def hour_after_restart(worker: AggregatorWorker) -> None:
        engine = worker.engine
        assert engine is not None
        await eventually(lambda: engine.ready, 30, "the restore")
        assert all(REMOVED not in part.books.symbols() for part in engine.parts.values())
        assert any(REMOVED in part.next_offsets for part in engine.parts.values())
        await run_clock_to(worker, clock, 120)
        # Added back: a new life from its first new trade, no empty kline made up for minutes 3..124.
        again = trades(REMOVED, 500, [125.4, 127.2], "120")
        await produce(
            s,
            [
                (REMOVED.encode(), encode_symbol_event(SymbolEvent(REMOVED, "added", 4, "POST /symbols"))),
                (REMOVED.encode(), encode_trade_batch(REMOVED, again)),
            ],
        )
        await eventually(lambda: engine.stats.records >= 2, 30, "the new life's records")
        await run_clock_to(worker, clock, 130)

    await run_worker(s, clock, hour_after_restart)
    later = [k for k in await finalized(s, REMOVED) if k.t > T0 + 2 * MINUTE]
    opens = [(k.t - T0) // MINUTE for k in later]
    assert opens == list(range(125, 130)), opens  # 125 (trade), 126 (empty), 127 (trade), 128, 129 (empty)
    assert [k.source for k in later] == ["live", "empty", "live", "empty", "empty"]
