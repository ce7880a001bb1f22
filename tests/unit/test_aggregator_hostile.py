"""Hostile input never moves a book's clock (issue 15, item 5): the aggregator's time window and allow-list.

The ``trades`` topic takes raw Binance payloads from anyone. One payload stamped 2090 used to move its symbol's
book there, and every real trade after it was rejected as late: the symbol was poisoned. Now a trade outside
``[now - retention, now + max_future_skew_ms]`` of the clock is dead-lettered (category ``time``) before it
reaches a book, and a symbol off ``aggregator.symbols`` is dead-lettered too (category ``symbol``).

The property test feeds random mixes of valid and hostile records in every layout the topic takes and checks
that the klines are exactly those of the valid records alone (the oracle, :func:`reference_klines`), and that
every hostile record is dead-lettered once, with a reason. Duplicates (a valid record delivered again) are not
hostile: the book drops them by aggregate id, as it drops Binance's own redeliveries.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from itertools import zip_longest
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_aggregator_engine import DLQ, INTERVALS, T0, TRADES, Broker, Harness, finalized, partition_of

from services.aggregator.clock import EventClock, ManualClock
from services.core.book import DEFAULT_REPAIR_HORIZON_MS, KlineBook, KlineBooks
from services.core.intervals import open_time
from services.core.models import MAX_TIME_MS, REASON_CATEGORIES, AggTrade, Kline
from services.core.reference import reference_klines
from services.shared.messages import encode_trade_batch
from services.shared.settings import ConfigError, load_settings

pytestmark = pytest.mark.unit

MINUTE = 60_000
NOW = T0 + 30 * 24 * 3_600_000  # the clock's "now": a month after T0
YEAR_2090 = 3_786_912_000_000
SYMBOLS = ("BTCUSDT", "ETHUSDT")


def raw(trade: AggTrade, **changes: Any) -> bytes:
    """Binance's own aggTrade payload (a raw ``/ws`` stream), with ``changes`` applied."""
    payload = {"e": "aggTrade", "E": trade.T, "s": trade.s, "a": trade.a, "p": trade.p, "q": trade.q}
    payload |= {"f": trade.f, "l": trade.l, "T": trade.T, "m": trade.m, "M": True}
    return json.dumps(payload | changes, separators=(",", ":")).encode()


def envelope(trade: AggTrade, **changes: Any) -> bytes:
    """The same payload in the combined-stream envelope."""
    data = json.loads(raw(trade, **changes))
    return json.dumps({"stream": f"{trade.s.lower()}@aggTrade", "data": data}, separators=(",", ":")).encode()


def batch(trades: list[AggTrade], **changes: Any) -> bytes:
    """Ingest's batch record, with ``changes`` applied to every trade."""
    value = json.loads(encode_trade_batch(trades[0].s, trades))
    value["trades"] = [item | changes for item in value["trades"]]
    return json.dumps(value, separators=(",", ":")).encode()


def letters(broker: Broker) -> list[dict[str, Any]]:
    return [json.loads(value) for value in broker.values(DLQ)]


def expected_closed(trades: list[AggTrade]) -> dict[tuple[str, str, int], Kline]:
    """The oracle's klines of one symbol's trades that a later trade of its own closed (the last stays open)."""
    out = {}
    for interval in INTERVALS:
        last_open = open_time(interval, max(t.T for t in trades))
        for kline in reference_klines(trades, interval):
            if kline.t < last_open:
                out[(kline.s, kline.i, kline.t)] = kline
    return out


def assert_klines_of(broker: Broker, valid: dict[str, list[AggTrade]]) -> None:
    """The finalized topic holds exactly the valid trades' closed klines; the newest copy of each is exact."""
    expected: dict[tuple[str, str, int], Kline] = {}
    for trades in valid.values():
        if trades:
            expected |= expected_closed(trades)
    got = finalized(broker)
    assert set(got) == set(expected)
    for key, copies in got.items():
        newest = max(copies, key=lambda kline: kline.version)
        assert newest.same_values(expected[key]), (key, newest.differences(expected[key]))


def trade(a: int, t: int, price: str = "100.5", symbol: str = "BTCUSDT") -> AggTrade:
    return AggTrade(symbol, a, price, "0.25", 10 * a, 10 * a, t, a % 2 == 0)


# ------------------------------------------------------------------------------------------ focused


async def test_a_trade_stamped_2090_is_dead_lettered_and_the_symbol_keeps_its_klines() -> None:
    """The poisoning: on the old code the 2090 trade moved the book there and every later trade was 'late'."""
    broker, clock = Broker(), ManualClock(NOW)
    valid = [trade(1, NOW - 9 * MINUTE), trade(2, NOW - 7 * MINUTE)]
    later = [trade(4, NOW - 5 * MINUTE, "101"), trade(5, NOW - 3 * MINUTE, "99.5"), trade(6, NOW - MINUTE)]
    log = broker.logs[(TRADES, partition_of("BTCUSDT"))]
    log += [(b"BTCUSDT", raw(t)) for t in valid]
    log.append((b"BTCUSDT", raw(trade(3, YEAR_2090))))
    log += [(b"BTCUSDT", raw(t)) for t in later]
    h = Harness(broker, clock)
    await h.assign()
    await h.drain()
    (letter,) = letters(broker)
    assert letter["category"] == "time" and letter["offset"] == 2, letter
    assert f"T={YEAR_2090}" in letter["reason"] and "future skew" in letter["reason"]
    assert h.engine.stats.trades_applied == 5
    assert_klines_of(broker, {"BTCUSDT": valid + later})


async def test_a_batch_with_one_future_trade_loses_only_that_trade() -> None:
    broker, clock = Broker(), ManualClock(NOW)
    trades = [trade(1, NOW - 9 * MINUTE), trade(2, NOW - 8 * MINUTE), trade(4, NOW - 2 * MINUTE)]
    hostile = trade(3, NOW + 11 * MINUTE)  # past the default skew (the repair horizon, 10 minutes)
    broker.logs[(TRADES, partition_of("BTCUSDT"))] += [
        (b"BTCUSDT", encode_trade_batch("BTCUSDT", [*trades[:2], hostile])),
        (b"BTCUSDT", encode_trade_batch("BTCUSDT", trades[2:])),
    ]
    h = Harness(broker, clock)
    await h.assign()
    await h.drain()
    (letter,) = letters(broker)
    assert letter["category"] == "time" and json.loads(letter["value"])["trades"][0]["a"] == 3
    assert_klines_of(broker, {"BTCUSDT": trades})


async def test_a_trade_older_than_the_retention_never_starts_a_book() -> None:
    broker, clock = Broker(), ManualClock(NOW)
    day = 24 * 3_600_000
    trades = [trade(5, NOW - 3 * MINUTE), trade(6, NOW - MINUTE)]
    log = broker.logs[(TRADES, partition_of("BTCUSDT"))]
    log.append((b"BTCUSDT", envelope(trade(1, NOW - 2 * day))))  # a fresh book would have started there
    log += [(b"BTCUSDT", envelope(t)) for t in trades]
    h = Harness(broker, clock, max_trade_age_ms=day)
    await h.assign()
    await h.drain()
    (letter,) = letters(broker)
    assert letter["category"] == "time" and "retention" in letter["reason"]
    assert_klines_of(broker, {"BTCUSDT": trades})


async def test_a_backlog_within_the_retention_is_applied_on_the_wall_clock() -> None:
    # Catching up after downtime: trades hours behind "now" are normal, only the bounds reject.
    broker, clock = Broker(), ManualClock(NOW)
    trades = [trade(a, NOW - 6 * 3_600_000 + a * MINUTE) for a in range(1, 30)]
    broker.logs[(TRADES, partition_of("BTCUSDT"))] += [(b"BTCUSDT", raw(t)) for t in trades]
    h = Harness(broker, clock, max_trade_age_ms=24 * 3_600_000)
    await h.assign()
    await h.drain()
    assert letters(broker) == []
    assert_klines_of(broker, {"BTCUSDT": trades})


async def test_without_a_known_time_there_is_no_window() -> None:
    """The event clock (replays of recorded tapes, at any speed) knows no "now": a tape a year old and one
    running ahead of real time both fold exactly; ingest, on the exchange's clock, is the guard there."""
    broker = Broker()
    old = [trade(a, T0 - 365 * 24 * 3_600_000 + a * MINUTE) for a in range(1, 6)]
    ahead = [trade(a, YEAR_2090 + a * MINUTE, symbol="ETHUSDT") for a in range(1, 6)]
    broker.logs[(TRADES, partition_of("BTCUSDT"))] += [(b"BTCUSDT", raw(t)) for t in old]
    broker.logs[(TRADES, partition_of("ETHUSDT"))] += [(b"ETHUSDT", raw(t)) for t in ahead]
    h = Harness(broker, EventClock(), max_trade_age_ms=24 * 3_600_000)
    await h.assign()
    await h.drain()
    assert letters(broker) == []
    assert_klines_of(broker, {"BTCUSDT": old, "ETHUSDT": ahead})


async def test_symbols_off_the_allow_list_are_dead_lettered() -> None:
    broker, clock = Broker(), ManualClock(NOW)
    btc = [trade(a, NOW - 10 * MINUTE + a * MINUTE) for a in range(1, 5)]
    evil = [trade(a, NOW - 10 * MINUTE + a * MINUTE, symbol="EVILUSDT") for a in range(1, 5)]
    for t in [*btc, *evil]:  # raw payloads: the fast slice path, then the loop
        broker.logs[(TRADES, partition_of(t.s))].append((t.s.encode(), raw(t)))
    broker.logs[(TRADES, partition_of("EVILUSDT"))].append((b"EVILUSDT", encode_trade_batch("EVILUSDT", evil)))
    h = Harness(broker, clock, symbols=["btcusdt", "ETHUSDT"])
    await h.assign()
    await h.drain()
    found = letters(broker)
    assert len(found) == 5 and {letter["category"] for letter in found} == {"symbol"}
    assert all("'EVILUSDT' is not on aggregator.symbols" in letter["reason"] for letter in found)
    assert all(part.books.symbols() in ([], ["BTCUSDT"]) for part in h.engine.parts.values())
    assert_klines_of(broker, {"BTCUSDT": btc})


def test_the_book_window_is_shared_moved_in_place_and_kept_across_a_restore() -> None:
    books = KlineBooks(INTERVALS)
    book = books.book("BTCUSDT")
    books.set_time_window(NOW, 1_000, None)
    book.apply([trade(1, NOW), trade(2, NOW + 1_001)])
    (rejected,) = book.drain_rejected()
    assert rejected.trade.a == 2 and rejected.category == "time"
    restored = KlineBooks.restore(books.export_state())
    restored.set_time_window(NOW, 1_000, 0)
    assert restored.book("BTCUSDT").extend(([3], [NOW - 1], ["1"], ["1"], [30], [30], [True])) is False
    restored.book("BTCUSDT").apply([trade(3, NOW - 1)])
    assert [r.category for r in restored.book("BTCUSDT").drain_rejected()] == ["time"]
    restored.set_time_window(None, 1_000, 0)  # no "now": no window
    restored.book("BTCUSDT").apply([trade(3, NOW - 1), trade(4, MAX_TIME_MS)])
    assert restored.book("BTCUSDT").drain_rejected() == [] and restored.book("BTCUSDT").last_a == 4
    alone = KlineBook("ETHUSDT", INTERVALS)
    alone.set_time_window(NOW, 0, 0)
    assert alone.extend(([1, 2], [NOW, NOW + 1], ["1", "1"], ["1", "1"], [1, 2], [1, 2], [True, True])) is False


def test_the_settings_check_the_allow_list_and_bound_the_skew_by_the_repair_horizon() -> None:
    loaded = load_settings(None, aggregator={"symbols": ["btcusdt", "ETH_USDT"]})
    assert loaded.aggregator.symbols == ("BTCUSDT", "ETH_USDT")
    assert loaded.aggregator.max_future_skew_ms == DEFAULT_REPAIR_HORIZON_MS
    with pytest.raises(ConfigError, match=r"aggregator\.symbols"):
        load_settings(None, aggregator={"symbols": ["btc-usdt"]})
    with pytest.raises(ConfigError, match=r"aggregator\.max_future_skew_ms"):
        load_settings(None, aggregator={"max_future_skew_ms": DEFAULT_REPAIR_HORIZON_MS + 1})
    # The bound is the configured horizon: a longer horizon allows a longer skew.
    longer = {"repair_horizon_ms": 3_600_000, "max_future_skew_ms": 1_800_000}
    assert load_settings(None, aggregator=longer).aggregator.max_future_skew_ms == 1_800_000
    with pytest.raises(ConfigError, match=r"aggregator\.repair_horizon_ms \(60000\)"):
        load_settings(None, aggregator={"repair_horizon_ms": 60_000, "max_future_skew_ms": 60_001})
    # Unset, the skew follows a shorter horizon down.
    assert load_settings(None, aggregator={"repair_horizon_ms": 60_000}).aggregator.max_future_skew_ms == 60_000


# ------------------------------------------------------------------------------------------ property

SKEW = 60_000
MAX_AGE = 24 * 3_600_000
BAD_DECIMALS = ["NaN", "-1", "0", "0.000", "1e5", "Infinity", "", " 1", "1" * 30, "1." + "1" * 30, 1.5, None]


@st.composite
def valid_streams(draw: st.DrawFn) -> dict[str, list[AggTrade]]:
    """Each symbol's trades: consecutive ids, times not decreasing, within the last hours before NOW."""
    streams = {}
    for symbol in SYMBOLS:
        count = draw(st.integers(1, 25))
        t = NOW - draw(st.integers(2 * 3_600_000, 20 * 3_600_000))
        trades = []
        for a in range(1, count + 1):
            t += draw(st.integers(0, 60_000))
            price = draw(st.sampled_from(["100.5", "101", "99.25", "100.125"]))
            quantity = draw(st.sampled_from(["0.5", "1", "0.001", "12.75"]))
            trades.append(AggTrade(symbol, a, price, quantity, 10 * a, 10 * a + a % 3, t, draw(st.booleans())))
        streams[symbol] = trades
    return streams


def encode_valid(trades: list[AggTrade], layout: str) -> bytes:
    if layout == "raw" and len(trades) == 1:
        return raw(trades[0])
    if layout == "envelope" and len(trades) == 1:
        return envelope(trades[0])
    return encode_trade_batch(trades[0].s, trades)


@st.composite
def hostile_records(draw: st.DrawFn) -> tuple[bytes | None, bytes | None]:
    """One record that must be dead-lettered, exactly once."""
    symbol = draw(st.sampled_from(SYMBOLS))
    a = draw(st.integers(1, 40))
    base = AggTrade(symbol, a, "100", "1", 10 * a, 10 * a, NOW - 3_600_000, False)
    layout = draw(st.sampled_from([raw, envelope, lambda t, **c: batch([t], **c)]))
    kind = draw(
        st.sampled_from(
            ["future", "past", "beyond", "decimal", "type", "unknown", "mismatch", "garbage", "giant", "no key"]
        )
    )
    key: bytes | None = symbol.encode()
    if kind == "future":
        value = layout(base, T=draw(st.integers(NOW + SKEW + 1, MAX_TIME_MS)))
    elif kind == "past":
        value = layout(base, T=draw(st.integers(1_262_304_000_000, NOW - MAX_AGE - 1)))
    elif kind == "beyond":  # outside the contract's own range (microseconds, negative, 2100+)
        value = layout(base, T=draw(st.sampled_from([-1, MAX_TIME_MS + 1, NOW * 1000, 2**70])))
    elif kind == "decimal":
        field = draw(st.sampled_from(["p", "q"]))
        value = layout(base, **{field: draw(st.sampled_from(BAD_DECIMALS))})
    elif kind == "type":
        field, bad = draw(st.sampled_from([("a", "5"), ("a", -1), ("T", 1.5e12), ("m", "true"), ("f", 10**6)]))
        value = layout(base, **{field: bad})
    elif kind == "unknown":
        key, value = b"EVILUSDT", raw(AggTrade("EVILUSDT", 1, "1", "1", 1, 1, NOW - 1_000, False))
    elif kind == "mismatch":
        other = "ETHUSDT" if symbol == "BTCUSDT" else "BTCUSDT"
        value = raw(AggTrade(other, 1, "1", "1", 1, 1, NOW - 1_000, False))
    elif kind == "garbage":
        value = draw(st.sampled_from([b"{", b"[]", b"null", b"\xff\xfe", b"", b'{"type":"trades"}', None]))
    elif kind == "giant":
        value = layout(base, p="1" * draw(st.sampled_from([100, 60_000])))
    else:
        key, value = None, raw(base)
    return key, value


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    streams=valid_streams(),
    layouts=st.lists(st.sampled_from(["raw", "envelope", "batch"]), min_size=60, max_size=60),
    sizes=st.lists(st.integers(1, 3), min_size=60, max_size=60),
    swaps=st.lists(st.booleans(), min_size=60, max_size=60),
    duplicates=st.lists(st.integers(0, 59), max_size=4),
    hostile=st.lists(st.tuples(st.integers(0, 80), hostile_records()), max_size=25),
    fetch=st.integers(1, 40),
)
def test_hostile_records_change_nothing_but_the_dead_letter_topic(
    streams: dict[str, list[AggTrade]],
    layouts: list[str],
    sizes: list[int],
    swaps: list[bool],
    duplicates: list[int],
    hostile: list[tuple[int, tuple[bytes | None, bytes | None]]],
    fetch: int,
) -> None:
    # The valid records: each symbol's trades in records of 1-3 trades in a random layout, the symbols' records
    # interleaved; a record may swap places with the one before it (out of order, within the repair horizon).
    per_symbol: dict[str, list[tuple[bytes, bytes]]] = {}
    k = 0
    for symbol, trades in streams.items():
        start, records = 0, []
        while start < len(trades):
            layout = layouts[k % 60]
            size = sizes[k % 60] if layout == "batch" else 1
            records.append(encode_valid(trades[start : start + size], layout))
            if len(records) > 2 and swaps[k % 60]:  # never the first: nothing before a book's start is known
                records[-1], records[-2] = records[-2], records[-1]
            start += size
            k += 1
        per_symbol[symbol] = [(symbol.encode(), value) for value in records]
    valid = [record for group in zip_longest(*per_symbol.values()) for record in group if record is not None]
    for index in duplicates:
        if index < len(valid):
            valid.append(valid[index])  # redelivered later: dropped by id, never dead-lettered
    mixed: list[tuple[bytes | None, bytes | None, bool]] = [(key, value, False) for key, value in valid]
    for position, (key, value) in sorted(hostile, key=lambda item: item[0]):
        mixed.insert(min(position, len(mixed)), (key, value, True))

    async def run() -> None:
        broker = Broker()
        expected_offsets: Counter[tuple[int, int]] = Counter()
        for key, value, is_hostile in mixed:
            partition = partition_of((key or b"BTCUSDT").decode())
            log = broker.logs[(TRADES, partition)]
            if is_hostile:
                expected_offsets[(partition, len(log))] += 1
            log.append((key, value))
        h = Harness(broker, ManualClock(NOW), max_future_skew_ms=SKEW, max_trade_age_ms=MAX_AGE, symbols=SYMBOLS)
        await h.assign()
        for p in h.position:
            while await h.fetch(p, fetch):
                pass
        found = letters(broker)
        assert Counter((letter["partition"], letter["offset"]) for letter in found) == expected_offsets
        assert all(letter["reason"] and letter["category"] in REASON_CATEGORIES for letter in found)
        assert_klines_of(broker, streams)

    asyncio.run(run())
