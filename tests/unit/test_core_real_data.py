"""Real Binance recordings: the core must reproduce Binance's own klines exactly.

* USD-M TRXUSDT, 2025-03-04 00:00:04-00:16:44: 9,999 trades and Binance's published 1m klines; minutes
  00:00-00:15 are fully covered and must match in every field (t, T, o, h, l, c, v, q, n, V, Q).
* Spot BTCUSDT, 2026-01-01 00:00-00:12: the genuine data.binance.vision file (no header, microseconds);
  minutes 00:00-00:11 are complete: the book and the reference must agree for 1m and 5m.
"""

from __future__ import annotations

import json
import random
from decimal import Decimal
from pathlib import Path

import pytest

from services.core.book import KlineBook, KlineBooks
from services.core.intervals import DEFAULT_INTERVALS
from services.core.models import AggTrade, Kline
from services.core.reference import read_aggtrades_csv, read_klines_csv, reference_klines

pytestmark = pytest.mark.unit

TRX_TRADES = "TRXUSDT-UM-aggTrades-derived-2025-03-04_000004-001644.csv"
TRX_KLINES = "TRXUSDT-UM-1m-2025-03-04_0000-0016.csv"
BTC_TRADES = "BTCUSDT-SPOT-aggTrades-2026-01-01_head5000.csv"
MINUTE = 60_000
TRX_START = 1_741_046_400_000  # 2025-03-04 00:00 UTC
BTC_START = 1_767_225_600_000  # 2026-01-01 00:00 UTC
COMPARED = ("t", "T", "o", "h", "l", "c", "v", "q", "n", "V", "Q")


@pytest.fixture(scope="module")
def trx_trades(binance_data: Path) -> list[AggTrade]:
    return read_aggtrades_csv(binance_data / TRX_TRADES, "TRXUSDT")


@pytest.fixture(scope="module")
def trx_binance(binance_data: Path) -> dict[int, Kline]:
    klines = read_klines_csv(binance_data / TRX_KLINES, "TRXUSDT", "1m")
    return {k.t: k for k in klines if k.t < TRX_START + 16 * MINUTE}


@pytest.fixture(scope="module")
def btc_trades(binance_data: Path) -> list[AggTrade]:
    return read_aggtrades_csv(binance_data / BTC_TRADES, "BTCUSDT")


def assert_binance_equal(ours: Kline, binance: Kline) -> None:
    for name in COMPARED:
        assert getattr(ours, name) == getattr(binance, name), (name, ours, binance)


def run_book(trades: list[AggTrade], intervals: tuple[str, ...], batches: list[int], now: int) -> list[Kline]:
    book = KlineBook(trades[0].s, intervals)
    start = 0
    for size in batches:
        book.apply(trades[start : start + size])
        start += size
    book.apply(trades[start:])
    book.advance(now)
    return book.drain_closed()


def split(total: int, rng: random.Random) -> list[int]:
    sizes = []
    while total > 0:
        size = min(total, rng.choice([1, 1, 2, 3, 5, 40, 400, 3000]))
        sizes.append(size)
        total -= size
    return sizes


def test_files_are_what_the_readme_says(trx_trades: list[AggTrade], btc_trades: list[AggTrade]) -> None:
    assert len(trx_trades) == 9_999 and len(btc_trades) == 5_000
    assert btc_trades[0].T == 1_767_225_600_039  # microseconds floored to milliseconds
    assert [t.a for t in btc_trades] == list(range(btc_trades[0].a, btc_trades[0].a + 5_000))


@pytest.mark.parametrize("batching", ["one batch", "single trades", "random"])
def test_book_reproduces_binance_trxusdt_1m(
    trx_trades: list[AggTrade], trx_binance: dict[int, Kline], batching: str
) -> None:
    rng = random.Random(7)
    batches = {
        "one batch": [len(trx_trades)],
        "single trades": [1] * len(trx_trades),
        "random": split(len(trx_trades), rng),
    }[batching]
    closed = run_book(trx_trades, DEFAULT_INTERVALS, batches, TRX_START + 16 * MINUTE)
    ours = {k.t: k for k in closed if k.i == "1m"}
    assert sorted(ours) == sorted(trx_binance)  # 00:00 .. 00:15, nothing else closed yet
    for t, binance in trx_binance.items():
        assert_binance_equal(ours[t], binance)
        assert ours[t].x and ours[t].version == 0 and ours[t].source == "live"


def test_reference_reproduces_binance_trxusdt_1m(trx_trades: list[AggTrade], trx_binance: dict[int, Kline]) -> None:
    reference = {k.t: k for k in reference_klines(trx_trades, "1m")}
    for t, binance in trx_binance.items():
        assert_binance_equal(reference[t], binance)


def test_five_minute_klines_sum_binance_minutes(trx_trades: list[AggTrade], trx_binance: dict[int, Kline]) -> None:
    closed = run_book(trx_trades, ("1m", "5m", "15m"), [500] * 20, TRX_START + 15 * MINUTE)
    five = {k.t: k for k in closed if k.i == "5m"}
    assert sorted(five) == [TRX_START, TRX_START + 5 * MINUTE, TRX_START + 10 * MINUTE]
    (quarter,) = [k for k in closed if k.i == "15m"]
    for window in (*five.values(), quarter):
        minutes = [trx_binance[t] for t in range(window.t, window.T, MINUTE)]
        assert window.o == minutes[0].o and window.c == minutes[-1].c
        assert window.h == max(m.h for m in minutes) and window.l == min(m.l for m in minutes)
        for name in ("v", "q", "V", "Q"):
            assert getattr(window, name) == sum((getattr(m, name) for m in minutes), Decimal(0)), name
        assert window.n == sum(m.n for m in minutes)


def test_restore_midway_on_real_data(trx_trades: list[AggTrade], trx_binance: dict[int, Kline]) -> None:
    book = KlineBook("TRXUSDT", DEFAULT_INTERVALS)
    book.apply(trx_trades[:4_321])
    emitted = book.drain_closed()
    book = KlineBook.restore(json.loads(json.dumps(book.export_state())))
    book.apply(trx_trades[4_000:])  # a replay overlap: the first 321 are duplicates
    book.advance(TRX_START + 16 * MINUTE)
    emitted += book.drain_closed()
    assert book.duplicates == 321
    ours = {k.t: k for k in emitted if k.i == "1m"}
    for t, binance in trx_binance.items():
        assert_binance_equal(ours[t], binance)


def test_btcusdt_spot_book_equals_reference(btc_trades: list[AggTrade]) -> None:
    books = KlineBooks(["1m", "5m"])
    for start in range(0, len(btc_trades), 250):
        books.apply("BTCUSDT", btc_trades[start : start + 250])
    books.advance(BTC_START + 12 * MINUTE)
    closed = books.drain_closed()
    current = books.current("BTCUSDT")
    for interval, complete_until in (("1m", BTC_START + 12 * MINUTE), ("5m", BTC_START + 10 * MINUTE)):
        reference = [k for k in reference_klines(btc_trades, interval) if k.t < BTC_START + 12 * MINUTE]
        ours = [k for k in closed if k.i == interval]
        assert [k.t for k in ours] == [k.t for k in reference if k.T < complete_until]
        for kline in ours:
            (expected,) = [k for k in reference if k.t == kline.t]
            assert kline.same_values(expected), kline.differences(expected)
            assert kline.f == expected.f and kline.L == expected.L
    (open_five,) = [k for k in current if k.i == "5m"]
    (expected_five,) = [k for k in reference_klines(btc_trades, "5m") if k.t == BTC_START + 10 * MINUTE]
    expected_five.x = False
    assert open_five.same_values(expected_five)
    first = next(k for k in closed if k.i == "1m")
    assert first.to_dict()["o"] == "87648.21000000"  # the spot format: eight decimals
