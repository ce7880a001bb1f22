"""The publisher's batching and its bounded delivery time (a producer that hangs or fails is fatal).

The producer here is a stand-in that records what it is given and resolves (or never resolves) its delivery
futures on command: exactly the hangs aiokafka shows when the broker is gone, which the real broker cannot be
made to do on demand in a unit test.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from services.core.models import AggTrade
from services.ingest.frames import WireTrade, wire_trade
from services.ingest.publisher import TradePublisher
from services.ingest.sequencer import Outbox
from services.shared.messages import Gap, TradeBatch, decode_trades_value

pytestmark = pytest.mark.unit


class StubProducer:
    def __init__(self, *, ack: bool = True, accept: bool = True, error: Exception | None = None) -> None:
        self.ack = ack
        self.accept = accept
        self.error = error
        self.sent: list[tuple[str, bytes | None, bytes]] = []

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> asyncio.Future[Any]:
        if not self.accept:
            await asyncio.Event().wait()  # the accumulator is full and the broker is gone: forever
        self.sent.append((topic, key, value))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.error is not None:
            future.set_exception(self.error)
        elif self.ack:
            future.set_result(None)
        return future


def trade(a: int, symbol: str = "BTCUSDT") -> WireTrade:
    return wire_trade(AggTrade(symbol, a, "1.25", "0.5", a, a, 1_767_225_600_000 + a, False))


def publisher(producer: StubProducer, outbox: Outbox, fatal: list[str], **kw: Any) -> TradePublisher:
    options: dict[str, Any] = {
        "trades_topic": "trades",
        "dead_letter_topic": "dlq",
        "send_timeout_s": 0.2,
        "linger_s": 0.001,
        "max_batch_trades": 3,
        "clock": asyncio.get_running_loop().time,
        "on_progress": lambda: None,
        "on_fatal": fatal.append,
    }
    options.update(kw)
    return TradePublisher(producer, outbox, **options)  # type: ignore[arg-type]


async def test_per_symbol_batches_in_order_with_gaps_in_place() -> None:
    outbox = Outbox()
    for a in range(1, 6):
        outbox.add_trade(trade(a))
    outbox.add_gap(Gap("BTCUSDT", 6, 9, "banned"))
    outbox.add_trade(trade(10))
    outbox.add_trade(trade(7, "ETHUSDT"))
    producer = StubProducer()
    fatal: list[str] = []
    pub = publisher(producer, outbox, fatal)
    pub.dead_letter(b"BTCUSDT", b'{"reason":"x"}')
    assert await pub.flush(1.0)
    assert fatal == []
    decoded = [
        (topic, key, decode_trades_value(value, key) if topic == "trades" else json.loads(value))
        for topic, key, value in producer.sent
    ]
    shape = [
        (key, [t.a for t in r.trades] if isinstance(r, TradeBatch) else r)
        for topic, key, r in decoded
        if topic == "trades"
    ]
    assert shape == [
        (b"BTCUSDT", [1, 2, 3]),
        (b"BTCUSDT", [4, 5]),
        (b"BTCUSDT", Gap("BTCUSDT", 6, 9, "banned")),
        (b"BTCUSDT", [10]),
        (b"ETHUSDT", [7]),
    ]
    assert [(topic, key) for topic, key, _ in decoded if topic == "dlq"] == [("dlq", b"BTCUSDT")]
    assert pub.trades_published == 7 and pub.inflight_trades == 0 and pub.gaps_published == 1


async def test_unacknowledged_send_is_fatal_after_the_timeout() -> None:
    outbox = Outbox()
    outbox.add_trade(trade(1))
    fatal: list[str] = []
    pub = publisher(StubProducer(ack=False), outbox, fatal)
    task = asyncio.create_task(pub.run())
    await asyncio.wait_for(task, 2)
    assert len(fatal) == 1 and "not acknowledged within send_timeout_s" in fatal[0]
    assert pub.inflight_trades == 1 and pub.trades_published == 0


async def test_a_producer_that_never_accepts_is_fatal_after_the_timeout() -> None:
    outbox = Outbox()
    outbox.add_trade(trade(1))
    fatal: list[str] = []
    pub = publisher(StubProducer(accept=False), outbox, fatal)
    await asyncio.wait_for(pub.run(), 2)
    assert len(fatal) == 1 and "did not accept records" in fatal[0]


async def test_a_failed_delivery_is_fatal_and_flush_says_so() -> None:
    outbox = Outbox()
    outbox.add_trade(trade(1))
    fatal: list[str] = []
    pub = publisher(StubProducer(error=RuntimeError("broker said no")), outbox, fatal)
    assert not await pub.flush(1.0)
    assert len(fatal) == 1 and "broker said no" in fatal[0]


class BlockingProducer(StubProducer):
    """Accepts ``accept_first`` records, then blocks every further send until cancelled."""

    def __init__(self, accept_first: int) -> None:
        super().__init__()
        self.accept_first = accept_first
        self.blocked = asyncio.Event()

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> asyncio.Future[Any]:
        if len(self.sent) >= self.accept_first:
            self.blocked.set()
            await asyncio.Event().wait()
        return await super().send(topic, value, key)


async def test_a_cancelled_round_puts_back_what_it_had_not_handed_over() -> None:
    """A stop that cancels the round in progress strands nothing: the flush that follows sends the rest, once."""
    outbox = Outbox()
    for a in range(1, 8):
        outbox.add_trade(trade(a))
    outbox.add_gap(Gap("BTCUSDT", 8, 9, "x"))
    outbox.add_trade(trade(10))
    outbox.add_trade(trade(4, "ETHUSDT"))
    producer = BlockingProducer(accept_first=1)  # BTC [1, 2, 3] is handed over, [4, 5, 6] blocks
    fatal: list[str] = []
    pub = publisher(producer, outbox, fatal, send_timeout_s=5.0)
    pub.dead_letter(None, b'{"reason":"x"}')
    round_ = asyncio.create_task(pub.send_round())
    await asyncio.wait_for(producer.blocked.wait(), 1)
    outbox.add_trade(trade(11))  # accepted while the round was running
    round_.cancel()
    with pytest.raises(asyncio.CancelledError):
        await round_
    assert outbox.trades == 7, "BTC 4..7 and 10 put back ahead of 11, and ETH's 4"
    assert pub.inflight_trades == 0 and pub.trades_published == 3
    producer.accept_first = 1_000_000
    assert await pub.flush(1.0)
    assert fatal == []
    trades = [(key, decode_trades_value(value, key)) for topic, key, value in producer.sent if topic == "trades"]
    got = [(key, [t.a for t in r.trades] if isinstance(r, TradeBatch) else (r.from_a, r.to_a)) for key, r in trades]
    assert got == [
        (b"BTCUSDT", [1, 2, 3]),
        (b"BTCUSDT", [4, 5, 6]),
        (b"BTCUSDT", [7]),
        (b"BTCUSDT", (8, 9)),
        (b"BTCUSDT", [10, 11]),
        (b"ETHUSDT", [4]),
    ]
    assert [topic for topic, _, _ in producer.sent].count("dlq") == 1
    assert pub.trades_published == 10 and outbox.trades == 0 and not outbox
