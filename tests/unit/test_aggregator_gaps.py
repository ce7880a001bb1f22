"""A gap record stops empty klines only over the span it leaves unknown, never for good (issue: one unrepairable
gap changed a symbol's output permanently, and the state carrying it was checkpointed).

Ingest publishes a gap record in the symbol's publishing order: every trade after it has ids above the gap's
``to_a`` and is contiguous again (services/ingest/sequencer.py, rule 5). So the first trade past the gap proves
the feed continuous from that trade on: the intervals between the last trade before the gap and that trade are
unknown and skipped, every later interval without trades is empty for certain and is emitted as Binance does.
"""

from __future__ import annotations

import pytest
from test_aggregator_engine import T0, TRADES, Broker, Harness, finalized, partition_of

from services.aggregator.clock import ManualClock
from services.core.models import AggTrade, Kline
from services.core.reference import reference_klines
from services.shared.messages import Gap, encode_gap, encode_trade_batch

pytestmark = pytest.mark.unit

SYMBOL = "BTCUSDT"
MINUTE = 60_000


def trade(a: int, minute: float, price: str = "100.5") -> AggTrade:
    return AggTrade(SYMBOL, a, price, "0.25", 10 * a, 10 * a, T0 + int(minute * MINUTE), a % 2 == 0)


def put(broker: Broker, *values: bytes) -> None:
    broker.logs[(TRADES, partition_of(SYMBOL))] += [(SYMBOL.encode(), value) for value in values]


async def run_to(h: Harness, clock: ManualClock, minute: int) -> None:
    await h.drain()
    clock.set(T0 + minute * MINUTE)
    h.engine.tick()


def one_minute_klines(broker: Broker) -> dict[int, list[Kline]]:
    return {t: copies for (s, i, t), copies in finalized(broker).items() if s == SYMBOL and i == "1m"}


def expected(trades: list[AggTrade], until_minute: int) -> list[Kline]:
    """Binance's 1m klines of ``trades`` on a continuous feed, up to (not including) ``until_minute``: the
    oracle's, then the empty minutes after the last trade."""
    klines = reference_klines(trades, "1m")
    last = klines[-1]
    tail = range(last.t + MINUTE, T0 + until_minute * MINUTE, MINUTE)
    return klines + [Kline.empty(SYMBOL, "1m", t, last.c) for t in tail]


async def test_the_feed_is_continuous_again_from_the_first_trade_past_the_gap() -> None:
    broker, clock = Broker(), ManualClock()
    before = [trade(1, 0.1), trade(2, 0.5), trade(3, 2.2)]
    after = [trade(21, 6.3, "101.25"), trade(22, 6.4, "100.75"), trade(23, 9.9, "99.5")]
    put(
        broker,
        encode_trade_batch(SYMBOL, before),
        encode_gap(Gap(SYMBOL, 4, 20, "backfill refused")),
        encode_trade_batch(SYMBOL, after[:1]),
        encode_trade_batch(SYMBOL, after[1:]),
    )
    h = Harness(broker, clock, intervals=("1m",))
    await h.assign()
    await run_to(h, clock, 15)
    got = one_minute_klines(broker)
    # Before the gap: minute 1 is empty between trades of minutes 0 and 2 on a continuous feed.
    for want in reference_klines(before, "1m"):
        assert got[want.t][-1].same_values(want), want.t
    # The gap's span (after minute 2, before minute 6) is unknown: nothing is made up for it.
    assert not {T0 + m * MINUTE for m in (3, 4, 5)} & got.keys()
    # From the first trade past the gap: minutes 7 and 8 are empty for certain, and so are 10 to 14.
    for want in expected(after, 15):
        assert want.t in got, f"minute {(want.t - T0) // MINUTE} missing"
        assert got[want.t][-1].same_values(want), want.t
    assert h.engine.parts[partition_of(SYMBOL)].books.book(SYMBOL).continuous
    assert h.engine.stats.data_loss == 0 and h.engine.stats.gaps == 1


async def test_a_gap_record_behind_trades_already_applied_changes_nothing() -> None:
    """A gap whose ids are all below what the book has applied is history: the feed stays continuous."""
    broker, clock = Broker(), ManualClock()
    trades = [trade(30, 0.2), trade(31, 3.4)]
    put(broker, encode_trade_batch(SYMBOL, trades), encode_gap(Gap(SYMBOL, 10, 20, "old news")))
    h = Harness(broker, clock, intervals=("1m",))
    await h.assign()
    await run_to(h, clock, 8)
    got = one_minute_klines(broker)
    for want in expected(trades, 8):
        assert want.t in got and got[want.t][-1].same_values(want), want.t
    assert h.engine.parts[partition_of(SYMBOL)].books.book(SYMBOL).continuous


async def test_a_gap_still_open_at_a_checkpoint_ends_with_the_first_trade_past_it_after_a_restore() -> None:
    """The span a gap leaves open is part of the book's state: a restart between the gap record and the
    trades past it still skips the unknown span, then emits empty klines again."""
    broker, clock = Broker(), ManualClock()
    put(broker, encode_trade_batch(SYMBOL, [trade(1, 0.1)]), encode_gap(Gap(SYMBOL, 2, 9, "backfill refused")))
    h = Harness(broker, clock, intervals=("1m",))
    await h.assign()
    await h.drain()
    await h.engine.stop(5.0)  # graceful: the final checkpoint carries the open gap
    put(broker, encode_trade_batch(SYMBOL, [trade(10, 4.5)]))
    clock2 = ManualClock()
    again = Harness(broker, clock2, intervals=("1m",))
    await again.assign()
    await run_to(again, clock2, 9)
    got = one_minute_klines(broker)
    assert not {T0 + m * MINUTE for m in (1, 2, 3)} & got.keys()
    for want in expected([trade(10, 4.5)], 9):
        assert want.t in got and got[want.t][-1].same_values(want), want.t
