"""Golden klines, the reference oracle's rules, and the data.binance.vision CSV readers."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from services.core.book import KlineBook
from services.core.intervals import close_time, open_time
from services.core.models import AggTrade, InvalidInput, Kline
from services.core.reference import read_aggtrades_csv, read_klines_csv, reference_klines

pytestmark = pytest.mark.unit

# Binance's documented REST kline row (GET /api/v3/klines): a weekly kline opening Monday 2017-07-03.
DOCUMENTED_ROW = [
    1499040000000,
    "0.01634790",
    "0.80000000",
    "0.01575800",
    "0.01577100",
    "148976.11427815",
    1499644799999,
    "2434.19055334",
    308,
    "1756.87402397",
    "28.46694368",
    "0",
]


def trade(a: int, t: int, p: str, q: str, *, m: bool = False, span: int = 0, symbol: str = "ETHBTC") -> AggTrade:
    return AggTrade(symbol, a, p, q, a * 10, a * 10 + span, t, m)


def test_documented_weekly_row_is_a_monday_week() -> None:
    t, closing = DOCUMENTED_ROW[0], DOCUMENTED_ROW[6]
    assert isinstance(t, int) and isinstance(closing, int)
    assert open_time("1w", t) == t and close_time("1w", t) == closing
    kline = Kline.from_dict(
        {
            "s": "ETHBTC", "i": "1w", "t": t, "T": closing, "f": 100, "L": 407, "o": DOCUMENTED_ROW[1],
            "h": DOCUMENTED_ROW[2], "l": DOCUMENTED_ROW[3], "c": DOCUMENTED_ROW[4], "v": DOCUMENTED_ROW[5],
            "q": DOCUMENTED_ROW[7], "n": DOCUMENTED_ROW[8], "V": DOCUMENTED_ROW[9], "Q": DOCUMENTED_ROW[10],
            "x": True,
        }
    )  # fmt: skip
    assert kline.to_rest_row() == DOCUMENTED_ROW
    # Trades anywhere in that week (Monday 00:00 .. Sunday 23:59:59.999) land in that kline, in both engines.
    trades = [
        trade(1, t, "0.01634790", "1"),
        trade(2, t + 3 * 86_400_000, "0.80000000", "2", m=True),
        trade(3, closing, "0.01577100", "3", span=2),
    ]
    (reference,) = reference_klines(trades, "1w")
    book = KlineBook("ETHBTC", ["1w"])
    book.apply(trades)
    book.advance(closing + 1)
    (closed,) = book.drain_closed()
    for kline in (reference, closed):
        assert (kline.t, kline.T, kline.o, kline.h, kline.l, kline.c) == (
            t, closing, Decimal("0.01634790"), Decimal("0.8"), Decimal("0.01577100"), Decimal("0.015771"),
        )  # fmt: skip
        assert (kline.v, kline.n, kline.V, kline.f, kline.L) == (Decimal(6), 5, Decimal(4), 10, 32)
        assert kline.q == Decimal("0.01634790") + Decimal("1.6") + Decimal("0.047313")
    assert closed.same_values(reference)


def test_reference_orders_by_time_then_id_and_fills_empties() -> None:
    t0 = 1_709_164_800_000  # 2024-02-29 00:00 UTC
    trades = [
        trade(3, t0 + 5, "12", "1"),
        trade(2, t0 + 5, "11", "1"),  # same millisecond, lower id: it comes first
        trade(1, t0 + 1, "10", "1", m=True),
        trade(4, t0 + 180_001, "13", "2"),
        trade(4, t0 + 180_001, "13", "2"),  # duplicate id: counted once
    ]
    first, empty1, empty2, last = reference_klines(trades, "1m")
    assert (first.o, first.c, first.f, first.L, first.n) == (Decimal(10), Decimal(12), 10, 30, 3)
    assert (first.V, first.Q) == (Decimal(2), Decimal(23))
    for empty, t in ((empty1, t0 + 60_000), (empty2, t0 + 120_000)):
        assert empty.to_dict() == Kline.empty("ETHBTC", "1m", t, Decimal(12)).to_dict()
        assert (empty.o, empty.h, empty.l, empty.c, empty.v, empty.n, empty.f, empty.L) == (
            Decimal(12), Decimal(12), Decimal(12), Decimal(12), Decimal(0), 0, -1, -1,
        )  # fmt: skip
    assert (last.t, last.v, last.n) == (t0 + 180_000, Decimal(2), 1)
    assert [k.t for k in reference_klines(trades, "1m", fill_empty=False)] == [t0, t0 + 180_000]
    assert reference_klines([], "1m") == []
    with pytest.raises(ValueError, match="one symbol"):
        reference_klines([trade(1, t0, "1", "1"), trade(2, t0, "1", "1", symbol="X")], "1m")


def test_month_klines_follow_the_calendar() -> None:
    feb = 1_706_745_600_000  # 2024-02-01
    trades = [trade(1, feb, "1", "1"), trade(2, feb + 29 * 86_400_000 - 1, "2", "1")]  # Feb 29, 23:59:59.999
    (kline,) = reference_klines(trades, "1M")
    assert (kline.t, kline.T, kline.n) == (feb, 1_709_251_199_999, 2)
    book = KlineBook("ETHBTC", ["1M", "1d"])
    book.apply(trades)
    book.apply([trade(3, feb + 29 * 86_400_000, "3", "1")])  # March 1st closes February
    closed = [k for k in book.drain_closed() if k.i == "1M"]
    assert len(closed) == 1 and closed[0].same_values(kline)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_aggtrades_csv_variants(tmp_path: Path) -> None:
    rows = "100,1.5,2,7,8,{t},{m}\n101,1.25,0.5,9,9,{t2},{m2}\n"
    header = "agg_trade_id,price,quantity,first_trade_id,last_trade_id,transact_time,is_buyer_maker\n"
    ms = rows.format(t=1741046404349, m="true", t2=1741046404350, m2="false")
    us = "100,1.5,2,7,8,1741046404349123,True,True\n101,1.25,0.5,9,9,1741046404350999,False,True\n"
    expected = [
        AggTrade("TRXUSDT", 100, "1.5", "2", 7, 8, 1741046404349, True),
        AggTrade("TRXUSDT", 101, "1.25", "0.5", 9, 9, 1741046404350, False),
    ]
    assert read_aggtrades_csv(write(tmp_path / "a.csv", header + ms), "TRXUSDT") == expected
    assert read_aggtrades_csv(write(tmp_path / "b.csv", ms), "TRXUSDT") == expected
    assert read_aggtrades_csv(write(tmp_path / "c.csv", us), "TRXUSDT") == expected
    with pytest.raises(InvalidInput, match=r"d.csv:2: .*'p' \(price\)"):
        read_aggtrades_csv(write(tmp_path / "d.csv", header + "1,-1,2,3,3,1741046404349,true\n"), "TRXUSDT")
    with pytest.raises(InvalidInput, match=r"e.csv:1: is_buyer_maker = 'yes'"):
        read_aggtrades_csv(write(tmp_path / "e.csv", "1,1,2,3,3,1741046404349,yes\n"), "TRXUSDT")
    with pytest.raises(InvalidInput, match=r"expected 7 or 8 columns"):
        read_aggtrades_csv(write(tmp_path / "f.csv", "1,1,2\n"), "TRXUSDT")


def test_klines_csv(tmp_path: Path, binance_data: Path) -> None:
    klines = read_klines_csv(binance_data / "TRXUSDT-UM-1m-2025-03-04_0000-0016.csv", "TRXUSDT", "1m")
    assert len(klines) == 17
    first = klines[0]
    assert first.to_rest_row() == [1741046400000, "0.23103", "0.23103", "0.23057", "0.23078", "1443073",
                                   1741046459999, "332948.24274", 714, "288873", "66656.86979", "0"]  # fmt: skip
    assert (first.f, first.L, first.x) == (-1, -1, True)
    with pytest.raises(InvalidInput, match="does not close the 1m kline"):
        read_klines_csv(write(tmp_path / "k.csv", "1741046400000,1,1,1,1,1,1741046459998,1,1,1,1,0\n"), "X", "1m")
