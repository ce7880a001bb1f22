"""The checkpointer never writes a record larger than one may be, whatever the book holds; a burst defers it.
Encoding checkpoints takes at most its share of the time, however many symbols are dirty."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest
from aiokafka import TopicPartition

from services.aggregator.checkpoint import MARKER_KEY
from services.aggregator.checkpointer import (
    MAX_CHECKPOINT_INTERVAL_S,
    MAX_RECORD_BYTES,
    MAX_UNCONFIRMED_PER_RECORD,
    Checkpointer,
)
from services.aggregator.state import PartitionState, Stats
from services.core.book import MAX_ID_RANGES, KlineBooks
from services.core.intervals import INTERVALS
from services.core.models import AggTrade, Kline

pytestmark = pytest.mark.unit

T0 = 1_735_689_600_000
ALL = tuple(INTERVALS)  # all 16, 1s included


class Producer:
    """Acknowledges at once and keeps what was sent; refuses a record over ``limit`` as the broker would."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sent: list[tuple[bytes | None, bytes]] = []

    async def send(self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None) -> Any:
        assert len(value) <= self.limit, f"a {len(value)}-byte record would be refused"
        self.sent.append((key, value))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


class Reader:
    async def read(self, partitions: Any, timeout_s: float) -> Any:
        raise AssertionError("not read here")


def checkpointer(producer: Producer, stats: Stats) -> Checkpointer:
    return Checkpointer(producer=producer, topic="ckpt", reader=Reader(), intervals=ALL, grace_ms=0, stats=stats)


def heavy_books(symbols: int) -> tuple[KlineBooks, PartitionState]:
    """``symbols`` books of all 16 intervals; the first one as full as a book gets: ten minutes of a trade every
    second (a full 1s repair horizon) with every other id missing (the most id ranges it keeps)."""
    books = KlineBooks(ALL, 0)
    part = PartitionState(TopicPartition("trades", 0), books)
    heavy = "AAAUSDT"
    trades = [
        AggTrade(heavy, 2 * k, f"{100 + k % 97}.{k % 100:02d}", "0.5", 2 * k, 2 * k, T0 + 1000 * k, k % 2 == 0)
        for k in range(max(601, MAX_ID_RANGES + 10))
    ]
    books.apply(heavy, trades)
    for n in range(1, symbols):
        symbol = f"S{n:04d}USDT"
        books.apply(symbol, [AggTrade(symbol, k, "1.5", "2", k, k, T0 + 45_000 * k, False) for k in range(1, 4)])
    for symbol in books.symbols():
        books.book(symbol).drain_closed()
        part.next_offsets[symbol] = 1
    part.dirty = set(books.symbols())
    part.position = 1
    return books, part


async def test_2000_symbols_by_16_intervals_write_records_that_all_fit() -> None:
    producer, stats = Producer(MAX_RECORD_BYTES), Stats()
    _books, part = heavy_books(2000)
    flight = checkpointer(producer, stats).start(part)
    assert flight is not None and await flight
    assert len(producer.sent) == 2001 and producer.sent[-1][0] == MARKER_KEY
    heaviest = max(len(value) for _key, value in producer.sent)
    assert 100_000 < heaviest <= MAX_RECORD_BYTES  # the heavy book is big, and still well inside
    assert stats.checkpoints == 1 and stats.checkpoints_deferred == 0 and not part.dirty


async def test_a_burst_of_unconfirmed_klines_defers_the_checkpoint_until_they_are_confirmed() -> None:
    producer, stats = Producer(MAX_RECORD_BYTES), Stats()
    _books, part = heavy_books(3)
    symbol = "S0001USDT"
    burst = {
        ("1m", T0 + 60_000 * k, 0): Kline.empty(symbol, "1m", T0 + 60_000 * k, Decimal("1.5"))
        for k in range(MAX_UNCONFIRMED_PER_RECORD + 1)
    }
    part.unconfirmed[symbol] = burst
    ckpt = checkpointer(producer, stats)
    assert ckpt.start(part) is None  # deferred: no record, no marker, no commit
    assert producer.sent == [] and stats.checkpoints_deferred == 1 and symbol in part.dirty
    assert await ckpt.final([part], 1.0) == set()  # a final checkpoint is deferred the same way
    del part.unconfirmed[symbol]  # the burst was delivered
    flight = ckpt.start(part)
    assert flight is not None and await flight and stats.checkpoints == 1


async def test_a_record_over_the_byte_limit_defers_even_under_the_kline_count() -> None:
    producer, stats = Producer(MAX_RECORD_BYTES), Stats()
    _books, part = heavy_books(2)
    ckpt = Checkpointer(
        producer=producer,
        topic="ckpt",
        reader=Reader(),
        intervals=ALL,
        grace_ms=0,
        stats=stats,
        max_record_bytes=50_000,
    )
    assert ckpt.start(part) is None and producer.sent == [] and stats.checkpoints_deferred == 1


class TimedCheckpointer(Checkpointer):
    """Encoding a partition's dirty symbols takes ``cost_s`` of its clock per symbol."""

    def __init__(self, producer: Producer, stats: Stats, cost_s: float) -> None:
        self.now = 0.0
        self.cost_s = cost_s
        super().__init__(
            producer=producer,
            topic="ckpt",
            reader=Reader(),
            intervals=ALL,
            grace_ms=0,
            stats=stats,
            time_share=0.1,
            monotonic=lambda: self.now,
            cpu_time=lambda: self.now,
        )

    def _records(self, part: PartitionState) -> Any:
        self.now += self.cost_s * len(part.dirty)
        return super()._records(part)


def dirty_partition(partition: int, symbols: int) -> PartitionState:
    books = KlineBooks(("1m", "1h"), 0)
    part = PartitionState(TopicPartition("trades", partition), books)
    for n in range(symbols):
        symbol = f"P{partition}S{n:03d}USDT"
        books.apply(symbol, [AggTrade(symbol, 1, "1.5", "2", 1, 1, T0, False)])
        part.next_offsets[symbol] = n + 1
    part.dirty = set(books.symbols())
    part.position = symbols
    return part


async def test_checkpoints_of_many_dirty_symbols_take_their_share_of_the_time_and_no_more() -> None:
    stats = Stats()
    ckpt = TimedCheckpointer(Producer(MAX_RECORD_BYTES), stats, cost_s=0.001)
    parts = [dirty_partition(p, 100) for p in range(2)]  # 0.1 s to encode each partition
    encoded = 0.0
    for tick in range(60):  # a tick a second, every symbol dirty again every tick (a catch-up)
        ckpt.now = max(ckpt.now, float(tick))
        for part in parts:
            before = ckpt.now
            flight = ckpt.start(part)
            encoded += ckpt.now - before
            if flight is not None:
                assert await flight
            part.dirty = set(part.books.symbols())
            part.position = (part.position or 0) + 1
    # Both partitions: 0.2 s of encoding together, so each waits 2 s (3 ticks, as the ticks fall) between its
    # checkpoints: about 20 each, not 60; neither is starved.
    assert encoded == pytest.approx(0.1 * stats.checkpoints)
    assert 40 <= stats.checkpoints <= 62 and stats.checkpoints_spaced >= 55
    assert encoded / 60 <= 0.1  # the share, not the 20% a checkpoint per tick would take
    assert all(p.checkpointed is not None and p.checkpointed >= p.position - 3 for p in parts)


async def test_a_few_dirty_symbols_are_checkpointed_every_time_as_before() -> None:
    stats = Stats()
    ckpt = TimedCheckpointer(Producer(MAX_RECORD_BYTES), stats, cost_s=0.0004)
    part = dirty_partition(0, 100)  # 40 ms: a wait of 0.4 s, under the least spacing imposed
    for attempt in range(10):  # back to back, as a retry after a failed checkpoint comes
        part.dirty = set(part.books.symbols())
        part.position = attempt + 100
        flight = ckpt.start(part)
        assert flight is not None and await flight
    assert stats.checkpoints == 10 and stats.checkpoints_spaced == 0


async def test_the_wait_between_checkpoints_is_capped() -> None:
    stats = Stats()
    ckpt = TimedCheckpointer(Producer(MAX_RECORD_BYTES), stats, cost_s=0.1)
    part = dirty_partition(0, 100)  # 10 s to encode: 100 s at a 10% share, capped
    flight = ckpt.start(part)
    assert flight is not None and await flight
    part.dirty, part.position = set(part.books.symbols()), 500
    ckpt.now = MAX_CHECKPOINT_INTERVAL_S - 0.5
    assert ckpt.start(part) is None
    ckpt.now = MAX_CHECKPOINT_INTERVAL_S
    flight = ckpt.start(part)
    assert flight is not None and await flight and part.checkpointed == 500
    part.dirty, part.position = set(part.books.symbols()), 600
    assert ckpt.start(part) is None  # spaced out again ...
    assert await ckpt.final([part], 60.0) == {0}  # ... but a rebalance's or a stop's checkpoint is written now
    assert part.checkpointed == 600
