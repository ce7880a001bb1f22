"""A symbol removed from ingest ends its book: its open klines are finalized as they stand (``source="closed"``),
no empty kline follows, a restore does not bring the book back, and a symbol that comes back starts clean.

The defect: the aggregator kept a removed symbol's book forever, so on the wall clock it emitted an empty 1m
kline every minute for a symbol nobody followed any more (59 in an hour without trades). Ingest now publishes a
``{"type": "symbol"}`` record after the symbol's last trade (services/shared/messages.py), and the engine applies
it (the symbol lifecycle on services/aggregator/engine.py).
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Any

import pytest
from test_aggregator_engine import DLQ, FINALIZED, T0, TRADES, Broker, Harness, finalized, partition_of

from services.aggregator.checkpoint import decode_partition, encode_symbol
from services.aggregator.clock import ManualClock
from services.core.book import KlineBook
from services.core.models import AggTrade, InvalidInput, Kline
from services.core.reference import reference_klines
from services.shared.messages import (
    SymbolEvent,
    decode_kline_record,
    decode_kline_run,
    decode_trades_value,
    encode_kline,
    encode_symbol_event,
    encode_trade_batch,
)

pytestmark = pytest.mark.unit

SYMBOL = "BTCUSDT"
MINUTE = 60_000


def trade(a: int, minute: float, price: str = "100.5") -> AggTrade:
    return AggTrade(SYMBOL, a, price, "0.25", 10 * a, 10 * a, T0 + int(minute * MINUTE), a % 2 == 0)


def removal(last_a: int | None = None) -> bytes:
    return encode_symbol_event(SymbolEvent(SYMBOL, "removed", last_a, "POST /symbols"))


def addition(last_a: int | None = None) -> bytes:
    return encode_symbol_event(SymbolEvent(SYMBOL, "added", last_a, "POST /symbols"))


def put(broker: Broker, *values: bytes) -> None:
    broker.logs[(TRADES, partition_of(SYMBOL))] += [(SYMBOL.encode(), value) for value in values]


async def wall_clock_hour(h: Harness, clock: ManualClock, start_minute: int, minutes: int = 60) -> None:
    """The clock task on a wall clock: one tick a minute, the partition read to its end."""
    await h.drain()
    for minute in range(start_minute, start_minute + minutes + 1):
        clock.set(T0 + minute * MINUTE + 1)
        h.engine.tick()
    await asyncio.sleep(0.01)  # delivery callbacks run on the loop


def klines_of(broker: Broker, interval: str) -> dict[int, list[Kline]]:
    return {t: copies for (s, i, t), copies in finalized(broker).items() if s == SYMBOL and i == interval}


BEFORE = [trade(1, 0.1), trade(2, 0.5, "101"), trade(3, 2.2, "99.75"), trade(4, 2.7, "100")]


async def test_a_removal_finalizes_the_open_klines_flagged_and_no_empty_kline_follows() -> None:
    """The reproduction: trades in minutes 0-2, the symbol removed, then an hour of wall clock without trades."""
    broker, clock = Broker(), ManualClock()
    put(broker, encode_trade_batch(SYMBOL, BEFORE), removal(4))
    h = Harness(broker, clock)  # 1m and 5m
    await h.assign()
    await wall_clock_hour(h, clock, 3)
    one = klines_of(broker, "1m")
    # Minutes 0 and 1 closed by the trades as usual; minute 2 was open at the removal: closed as it stood.
    assert sorted(one) == [T0, T0 + MINUTE, T0 + 2 * MINUTE]
    for want in reference_klines(BEFORE, "1m")[:2]:
        assert [k.source for k in one[want.t]] == [want.source] and one[want.t][0].same_values(want)
    (last,) = one[T0 + 2 * MINUTE]
    want = reference_klines(BEFORE, "1m")[-1]
    assert last.source == "closed" and last.x
    assert (last.o, last.c, last.n, last.f, last.L) == (want.o, want.c, want.n, want.f, want.L)
    # The 5m kline (minutes 0-4) was open too: one kline, the four trades, flagged.
    (five,) = klines_of(broker, "5m")[T0]
    assert five.source == "closed" and five.x and five.n == 4 and five.v == Decimal("1.00")
    # No empty kline in the hour after (the old engine emitted one a minute: 57 here, 59 from minute 0).
    assert max(one) == T0 + 2 * MINUTE and one[T0 + MINUTE][0].source == "empty"  # minute 1: between trades
    part = h.engine.parts[partition_of(SYMBOL)]
    assert SYMBOL not in part.books.symbols()
    assert part.next_offsets[SYMBOL] == 2  # kept: the records of the old life stay skipped on a re-read
    assert h.engine.stats.symbols_removed == 1 and h.engine.stats.dead_letters == 0
    assert h.engine.current(SYMBOL) == []


async def test_a_removal_in_the_same_slice_as_the_trades_and_read_again_changes_nothing() -> None:
    broker, clock = Broker(), ManualClock()
    put(broker, encode_trade_batch(SYMBOL, BEFORE[:2]), encode_trade_batch(SYMBOL, BEFORE[2:]), removal(4), removal(4))
    h = Harness(broker, clock, intervals=("1m",))
    await h.assign()
    await h.fetch(partition_of(SYMBOL), 10)  # one slice: both batches, then both removals
    await asyncio.sleep(0.01)
    first = finalized(broker)
    assert [k.source for k in klines_of(broker, "1m")[T0 + 2 * MINUTE]] == ["closed"]
    assert h.engine.stats.symbols_removed == 1  # the second removal finds no book: nothing
    h.position[partition_of(SYMBOL)] = 0  # a seek back: every record is read again
    await wall_clock_hour(h, clock, 3)
    assert finalized(broker) == first
    assert SYMBOL not in h.engine.parts[partition_of(SYMBOL)].books.symbols()


async def test_a_restore_after_the_removal_does_not_resurrect_the_book() -> None:
    broker, clock = Broker(), ManualClock()
    p = partition_of(SYMBOL)
    put(broker, encode_trade_batch(SYMBOL, BEFORE), removal(4))
    h = Harness(broker, clock, finalized_auto=False)  # the closed klines stay unconfirmed ...
    await h.assign()
    await h.drain()
    h.engine.tick()  # ... and are checkpointed with the symbol's tombstone
    await asyncio.sleep(0.01)
    assert broker.committed[p] == 2
    (record,) = [json.loads(v or b"") for k, v in broker.logs[("t.ckpt", p)] if k == SYMBOL.encode()][-1:]
    assert record["book"] is None and record["next_offset"] == 2
    assert {(k["i"], k["source"]) for k in record["unconfirmed"]} >= {("1m", "closed"), ("5m", "closed")}
    h.crash()
    assert finalized(broker) == {}

    h2 = Harness(broker, clock)
    await h2.assign()
    part = h2.engine.parts[p]
    assert SYMBOL not in part.books.symbols() and part.next_offsets[SYMBOL] == 2
    h2.position[p] = 0  # even the old life's records read again (below next[S]) are skipped
    await wall_clock_hour(h2, clock, 3)
    got = finalized(broker)
    assert {(i, t) for (_s, i, t) in got} == {("1m", T0), ("1m", T0 + MINUTE), ("1m", T0 + 2 * MINUTE), ("5m", T0)}
    assert [k.source for k in got[(SYMBOL, "1m", T0 + 2 * MINUTE)]] == ["closed"]  # re-sent once, from the state
    assert SYMBOL not in part.books.symbols() and h2.engine.current(SYMBOL) == []
    # Confirmed now: the tombstone is written again without them, and a second restore still has no book.
    h2.engine.tick()
    await asyncio.sleep(0.01)
    latest: dict[bytes | None, bytes | None] = dict(broker.logs[("t.ckpt", p)])
    restored = decode_partition("t.ckpt", p, latest).symbols[SYMBOL]
    assert restored.book is None and restored.unconfirmed == [] and restored.next_offset == 2


async def test_a_re_added_symbol_starts_a_clean_book_without_empty_klines_across_its_absence() -> None:
    broker, clock = Broker(), ManualClock()
    after = [trade(30, 30.4, "120"), trade(31, 30.8, "121.5"), trade(32, 33.1, "119")]
    put(broker, encode_trade_batch(SYMBOL, BEFORE), removal(4), addition(4), encode_trade_batch(SYMBOL, after))
    h = Harness(broker, clock, intervals=("1m",))
    await h.assign()
    await wall_clock_hour(h, clock, 34, minutes=6)  # up to minute 40
    one = klines_of(broker, "1m")
    # Nothing for minutes 3-29: the symbol was away, nothing is made up for it.
    assert not [t for t in one if T0 + 3 * MINUTE <= t < T0 + 30 * MINUTE]
    # From its first new trade on, exactly a new symbol's klines: the trades' minutes, empty minutes between
    # and after them (a continuous feed), the first one never empty.
    new = reference_klines(after, "1m")
    tail = [Kline.empty(SYMBOL, "1m", t, new[-1].c) for t in range(new[-1].t + MINUTE, T0 + 40 * MINUTE, MINUTE)]
    for want in new + tail:
        assert [k.same_values(want) for k in one[want.t]] == [True], (want.t - T0) // MINUTE
    assert max(one) == tail[-1].t
    assert h.engine.stats.symbols_added == 1 and h.engine.stats.symbols_removed == 1


async def test_an_addition_for_a_symbol_with_a_book_changes_nothing() -> None:
    """A book at an addition means its removal never reached the topic: the stream simply goes on."""
    broker, clock = Broker(), ManualClock()
    put(broker, encode_trade_batch(SYMBOL, BEFORE[:2]), addition(2), encode_trade_batch(SYMBOL, BEFORE[2:]))
    h = Harness(broker, clock, intervals=("1m",))
    await h.assign()
    await wall_clock_hour(h, clock, 3, minutes=2)
    one = klines_of(broker, "1m")
    for want in reference_klines(BEFORE, "1m"):
        assert [k.same_values(want) for k in one[want.t]] == [True]


def test_kline_book_close_finalizes_what_is_open_after_what_closed_before() -> None:
    book = KlineBook(SYMBOL, ["1m", "1h"])
    book.apply(BEFORE)
    closed = book.close()
    assert [(k.i, (k.t - T0) // MINUTE, k.source, k.x) for k in closed] == [
        ("1m", 0, "live", True),
        ("1m", 1, "empty", True),
        ("1m", 2, "closed", True),
        ("1h", 0, "closed", True),
    ]
    assert book.current() == [] and book.drain_closed() == [] and book.close() == []
    book.advance(T0 + 10 * 3_600_000)
    assert book.drain_closed() == []


def test_a_closed_kline_takes_the_writers_fast_path() -> None:
    book = KlineBook(SYMBOL, ["1m"])
    book.apply(BEFORE[:1])
    (kline,) = book.close()
    record = decode_kline_record(encode_kline(kline))
    assert record.text is not None and record.kline == kline and record.kline.source == "closed"
    run = decode_kline_run([encode_kline(kline), encode_kline(kline, seq=3)])
    assert run is not None and [w.source for w in run[0]] == ["closed", "closed"]


def test_symbol_records_round_trip() -> None:
    for event in (SymbolEvent(SYMBOL, "removed", 4, "exchangeInfo"), SymbolEvent(SYMBOL, "added", None, "")):
        assert decode_trades_value(encode_symbol_event(event), SYMBOL.encode()) == event
    assert decode_trades_value(b'{"type":"symbol","s":"BTCUSDT","event":"removed"}') == SymbolEvent(SYMBOL, "removed")


BAD_SYMBOL_RECORDS: list[tuple[dict[str, Any], str, str]] = [
    ({"event": "deleted"}, "'event' must be one of", "field"),
    ({"event": None}, "'event' must be one of", "field"),
    ({"event": "removed", "last_a": -1}, "'last_a' must be null or an id", "field"),
    ({"event": "removed", "last_a": True}, "'last_a' must be null or an id", "field"),
    ({"event": "removed", "last_a": "4"}, "'last_a' must be null or an id", "field"),
    ({"event": "removed", "last_a": 2**63}, "'last_a' must be null or an id", "field"),
    ({"event": "removed", "reason": 7}, "'reason' must be a string", "field"),
    ({"event": "removed", "at": 1}, "unknown fields ['at']", "field"),
    ({"event": "removed", "s": "ETHUSDT"}, "does not match symbol", "symbol"),
    ({"event": "removed", "s": None}, "'s' must be a symbol", "symbol"),
]


@pytest.mark.parametrize(("fields", "reason", "category"), BAD_SYMBOL_RECORDS)
def test_a_malformed_symbol_record_is_rejected_with_its_reason(
    fields: dict[str, Any], reason: str, category: str
) -> None:
    value = json.dumps({"type": "symbol", "s": SYMBOL, **fields}).encode()
    with pytest.raises(InvalidInput) as caught:
        decode_trades_value(value, SYMBOL.encode())
    assert reason in caught.value.reason and caught.value.category == category


async def test_the_engine_dead_letters_a_malformed_symbol_record_and_keeps_the_book() -> None:
    broker, clock = Broker(), ManualClock()
    bad = [json.dumps({"type": "symbol", "s": SYMBOL, **fields}).encode() for fields, _r, _c in BAD_SYMBOL_RECORDS]
    put(broker, encode_trade_batch(SYMBOL, BEFORE), *bad)
    h = Harness(broker, clock, intervals=("1m",))
    await h.assign()
    await h.drain()
    await asyncio.sleep(0.01)
    letters = [json.loads(v) for v in broker.values(DLQ)]
    assert [(d["offset"], d["category"]) for d in letters] == [
        (1 + n, c) for n, (_f, _r, c) in enumerate(BAD_SYMBOL_RECORDS)
    ]
    assert all(want in d["reason"] for d, (_f, want, _c) in zip(letters, BAD_SYMBOL_RECORDS, strict=True))
    assert SYMBOL in h.engine.parts[partition_of(SYMBOL)].books.symbols()
    assert h.engine.stats.symbols_removed == 0
    assert not [v for v in broker.values(FINALIZED) if b'"closed"' in v]


def test_a_checkpoint_tombstone_is_read_back_as_no_book() -> None:
    kline = Kline.empty(SYMBOL, "1m", T0, Decimal("1.5"))
    latest: dict[bytes | None, bytes | None] = {SYMBOL.encode(): encode_symbol(SYMBOL, 7, None, [kline])}
    saved = decode_partition("t.ckpt", 0, latest).symbols[SYMBOL]
    assert saved.book is None and saved.next_offset == 7 and saved.unconfirmed == [kline]
