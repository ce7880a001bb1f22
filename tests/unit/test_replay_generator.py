"""The replay exchange's market generator: deterministic, Binance-shaped, with ties and quiet minutes."""

from __future__ import annotations

import itertools
from decimal import Decimal

import pytest

from services.core.models import parse_agg_trade
from services.replay.generator import generate_market, generate_trades, profile_for, split_symbol

pytestmark = pytest.mark.unit

START = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MINUTE = 60_000
SYMBOLS = ("BTCUSDT", "ETHUSDT", "TRXUSDT", "NEWCOINUSDT")


@pytest.fixture(scope="module")
def market() -> dict[str, list]:
    return generate_market(SYMBOLS, seed=7, start_ms=START, end_ms=START + 20 * MINUTE)


def test_same_seed_same_trades_other_seed_other_trades(market: dict[str, list]) -> None:
    again = generate_market(SYMBOLS, seed=7, start_ms=START, end_ms=START + 20 * MINUTE)
    assert again == market
    other = generate_trades("BTCUSDT", seed=8, start_ms=START, end_ms=START + 20 * MINUTE)
    assert other != market["BTCUSDT"]


def test_a_symbol_does_not_depend_on_the_others(market: dict[str, list]) -> None:
    alone = generate_trades("ETHUSDT", seed=7, start_ms=START, end_ms=START + 20 * MINUTE)
    assert alone == market["ETHUSDT"]


def test_ids_contiguous_and_times_ordered_inside_the_window(market: dict[str, list]) -> None:
    for symbol, trades in market.items():
        assert len(trades) > 100, symbol
        for before, after in itertools.pairwise(trades):
            assert after.a == before.a + 1
            assert after.f == before.l + 1
            assert after.T >= before.T
        assert all(t.f <= t.l and t.s == symbol for t in trades)
        assert START <= trades[0].T and trades[-1].T < START + 20 * MINUTE


def test_millisecond_ties_exist(market: dict[str, list]) -> None:
    for symbol, trades in market.items():
        ties = sum(1 for x, y in itertools.pairwise(trades) if x.T == y.T)
        assert ties >= 10, symbol
        # a sweep: one taker order over several price levels, same T, consecutive ids
        assert any(x.T == y.T and x.p != y.p for x, y in itertools.pairwise(trades)), symbol


def test_whole_quiet_minutes_exist(market: dict[str, list]) -> None:
    for symbol, trades in market.items():
        minutes_with_trades = {(t.T - START) // MINUTE for t in trades}
        quiet = set(range(20)) - minutes_with_trades
        assert len(quiet) >= 2, symbol  # at least one whole quiet minute in every ten


def test_prices_and_quantities_are_positive_decimal_strings_that_parse_like_binance(market: dict[str, list]) -> None:
    for symbol, trades in market.items():
        profile = profile_for(symbol)
        for t in trades:
            parsed = parse_agg_trade(
                {"e": "aggTrade", "s": t.s, "a": t.a, "p": t.p, "q": t.q, "f": t.f, "l": t.l, "T": t.T, "m": t.m}
            )
            assert parsed == t
            price, qty = Decimal(t.p), Decimal(t.q)
            assert price > 0 and qty > 0
            assert price % profile.tick == 0 and qty % profile.lot == 0
            assert len(t.p.split(".")[1]) == 8  # spot prints 8 decimals


def test_futures_prints_the_tick_precision() -> None:
    trades = generate_trades("TRXUSDT", seed=1, start_ms=START, end_ms=START + 3 * MINUTE, venue="usdm")
    assert trades and all(len(t.p.split(".")[1]) == 5 and "." not in t.q for t in trades)


def test_both_sides_trade_and_prices_move(market: dict[str, list]) -> None:
    for trades in market.values():
        assert {t.m for t in trades} == {True, False}
        assert len({t.p for t in trades}) > 20


def test_window_not_aligned_to_minutes_and_empty_window() -> None:
    trades = generate_trades("BTCUSDT", seed=1, start_ms=START + 30_500, end_ms=START + 150_250)
    assert trades and all(START + 30_500 <= t.T < START + 150_250 for t in trades)
    assert generate_trades("BTCUSDT", seed=1, start_ms=START, end_ms=START) == []


def test_symbol_split_and_profiles() -> None:
    assert split_symbol("BTCUSDT") == ("BTC", "USDT")
    assert split_symbol("ETHBTC") == ("ETH", "BTC")
    assert split_symbol("BTCFDUSD") == ("BTC", "FDUSD")
    unknown = profile_for("NEWCOINUSDT")
    assert unknown == profile_for("NEWCOINUSDT")
    assert unknown.price > 0 and unknown.price % unknown.tick == 0
