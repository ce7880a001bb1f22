"""Ingest's trade-time window on the exchange's clock (issue 15, item 5): a trade too far past the exchange's
``serverTime`` (or older than the retention) is dead-lettered, never published; a suspect is confirmed by a
fresh ``serverTime`` first, so a replay running ahead of real time loses nothing.

The publisher's producer is the stand-in of ``test_ingest_publisher``; the exchange's clock is a function the
test moves by hand.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_ingest_publisher import StubProducer, publisher

from services.core.models import MAX_TIME_MS, MIN_TIME_MS, AggTrade
from services.ingest.exchange_time import ExchangeTime
from services.ingest.frames import fast_trade, trade_time, trade_time_texts, wire_trade
from services.ingest.sequencer import Outbox
from services.shared.messages import Gap, decode_trades_value

pytestmark = pytest.mark.unit

NOW = 1_767_225_600_000
YEAR_2090 = 3_786_912_000_000


class Exchange:
    """A ``serverTime`` the test sets; counts the requests."""

    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms
        self.requests = 0

    async def server_time(self) -> int:
        self.requests += 1
        return self.now_ms


def trade(a: int, t: int, symbol: str = "BTCUSDT") -> Any:
    return wire_trade(AggTrade(symbol, a, "1.25", "0.5", a, a, t, a % 2 == 0))


def published(producer: StubProducer) -> list[int]:
    records = [decode_trades_value(value, key) for topic, key, value in producer.sent if topic == "trades"]
    return [t.a for record in records if not isinstance(record, Gap) for t in record.trades]


def dead(producer: StubProducer) -> list[dict[str, Any]]:
    return [json.loads(value) for topic, _key, value in producer.sent if topic == "dlq"]


@given(st.integers(MIN_TIME_MS, MAX_TIME_MS), st.integers(0, 2**63 - 1), st.booleans())
def test_trade_time_reads_t_from_the_published_fields(t: int, a: int, m: bool) -> None:
    fields = wire_trade(AggTrade("BTCUSDT", a, "1.5", "2", a, a, t, m)).fields
    assert trade_time(fields) == t
    assert trade_time_texts([fields, fields]) == [str(t).encode()] * 2
    frame = (
        '{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","E":1,"s":"BTCUSDT","a":1,"p":"1.5","q":"2",'
        f'"f":1,"l":1,"T":{t},"m":{"true" if m else "false"},"M":true}}}}'
    ).encode()
    fast = fast_trade(frame)
    assert fast is not None and trade_time(fast.fields) == t and trade_time_texts([fast.fields]) == [str(t).encode()]


async def test_a_future_trade_is_confirmed_by_a_fresh_server_time_then_dead_lettered() -> None:
    loop = asyncio.get_running_loop()
    exchange = Exchange(NOW)
    clock = ExchangeTime(exchange.server_time, clock=loop.time, min_interval_s=0.0)
    assert await clock.sync()
    outbox, producer, fatal = Outbox(), StubProducer(), []
    pub = publisher(producer, outbox, fatal, exchange_time=clock, max_future_skew_ms=60_000, max_trade_age_ms=None)
    rejected: list[tuple[str, str]] = []
    pub._on_time_rejected = lambda symbol, reason: rejected.append((symbol, reason))
    for a, t in ((1, NOW - 5_000), (2, YEAR_2090), (3, NOW - 1_000)):
        outbox.add_trade(trade(a, t))
    outbox.add_trade(trade(7, NOW, "ETHUSDT"))
    await pub.send_round()  # 2 is a suspect: BTCUSDT waits from it on, ETHUSDT goes
    assert published(producer) == [1, 7] and dead(producer) == []
    await asyncio.sleep(0.01)  # the fresh serverTime arrives: still 2090 is far ahead
    await pub.send_round()
    assert published(producer) == [1, 7, 3]
    (letter,) = dead(producer)
    assert letter["category"] == "time" and f"T={YEAR_2090}" in letter["reason"]
    assert json.loads(letter["value"])["trades"][0]["a"] == 2
    assert exchange.requests == 2 and rejected == [("BTCUSDT", letter["reason"])]
    assert pub.trades_rejected_time == 1 and not outbox and pub._suspected == {}


async def test_a_replay_running_ahead_of_real_time_loses_nothing() -> None:
    """At --speed 0 the replay's market time runs far ahead of the estimate: the suspects are confirmed valid by
    the next serverTime and published in order."""
    loop = asyncio.get_running_loop()
    exchange = Exchange(NOW)
    clock = ExchangeTime(exchange.server_time, clock=loop.time, min_interval_s=0.0)
    await clock.sync()
    outbox, producer, fatal = Outbox(), StubProducer(), []
    pub = publisher(producer, outbox, fatal, exchange_time=clock, max_future_skew_ms=60_000, max_trade_age_ms=3_600_000)
    for a in range(1, 6):
        outbox.add_trade(trade(a, NOW + a * 600_000))  # 10 market minutes a trade
    exchange.now_ms = NOW + 5 * 600_000  # the exchange published them all: its time is past them
    await pub.send_round()
    assert published(producer) == []
    await asyncio.sleep(0.01)
    await pub.send_round()
    assert published(producer) == [1, 2, 3, 4, 5] and dead(producer) == []
    assert pub._suspected == {}  # nothing is remembered of a suspect found within the window


async def test_trades_older_than_the_retention_and_the_final_round() -> None:
    loop = asyncio.get_running_loop()
    exchange = Exchange(NOW)
    clock = ExchangeTime(exchange.server_time, clock=loop.time, min_interval_s=10.0)
    await clock.sync()
    outbox, producer, fatal = Outbox(), StubProducer(), []
    pub = publisher(producer, outbox, fatal, exchange_time=clock, max_future_skew_ms=60_000, max_trade_age_ms=3_600_000)
    outbox.add_trade(trade(1, NOW - 2 * 3_600_000))
    outbox.add_trade(trade(2, NOW - 1_000))
    outbox.add_trade(trade(3, NOW + 600_000))  # a replay ahead of real time: true by the exchange's clock below
    await pub.send_round()  # 1 is suspected; the rate limit forbids a new request now
    assert published(producer) == [] and exchange.requests == 1
    exchange.now_ms = NOW + 600_000
    assert await pub.flush(1.0)  # a stop: a fresh serverTime, then every suspect is decided
    assert published(producer) == [2, 3] and exchange.requests == 2
    (letter,) = dead(producer)
    assert letter["category"] == "time" and "retention" in letter["reason"]


async def test_without_an_exchange_time_there_is_no_window() -> None:
    async def down() -> int:
        raise OSError("unreachable")

    clock = ExchangeTime(down, clock=asyncio.get_running_loop().time)
    assert not await clock.sync() and clock.now_ms() is None and clock.sync_failures == 1
    outbox, producer, fatal = Outbox(), StubProducer(), []
    pub = publisher(producer, outbox, fatal, exchange_time=clock, max_future_skew_ms=0, max_trade_age_ms=0)
    outbox.add_trade(trade(1, YEAR_2090))
    assert await pub.flush(1.0)
    assert published(producer) == [1]
    await clock.close()


async def test_a_gap_among_the_trades_keeps_its_place_and_the_screen_still_applies() -> None:
    loop = asyncio.get_running_loop()
    exchange = Exchange(NOW)
    clock = ExchangeTime(exchange.server_time, clock=loop.time)
    await clock.sync()
    outbox, producer, fatal = Outbox(), StubProducer(), []
    pub = publisher(producer, outbox, fatal, exchange_time=clock, max_future_skew_ms=60_000, max_trade_age_ms=None)
    outbox.add_trade(trade(1, NOW))
    outbox.add_gap(Gap("BTCUSDT", 2, 4, "test"))
    outbox.add_trade(trade(5, NOW + 1))
    outbox.add_trade(trade(6, YEAR_2090))
    assert await pub.flush(1.0)
    kinds = [decode_trades_value(value, key) for topic, key, value in producer.sent if topic == "trades"]
    assert [type(k).__name__ for k in kinds] == ["TradeBatch", "Gap", "TradeBatch"]
    assert published(producer) == [1, 5] and [letter["category"] for letter in dead(producer)] == ["time"]
