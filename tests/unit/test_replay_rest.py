"""The replay exchange's REST kline selection against a naive oracle (no HTTP: the pure row builder)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.core.intervals import close_time, open_time
from services.core.models import AggTrade, Kline
from services.core.reference import reference_klines
from services.replay.clock import PlaybackClock
from services.replay.rest import RestApi, WeightLimiter
from services.replay.tape import MarketTape

pytestmark = pytest.mark.unit

START = 1_767_225_600_000
INTERVALS = ("1m", "3m", "5m", "1h", "1d", "1w", "1M")


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    gaps = draw(st.lists(st.integers(0, 40 * 60_000), min_size=1, max_size=40))
    trades = []
    t = START + draw(st.integers(0, 10 * 86_400_000))
    for i, gap in enumerate(gaps):
        t += gap
        price = f"{draw(st.integers(1, 500))}.{draw(st.integers(0, 99)):02d}"
        trades.append(AggTrade("BTCUSDT", 100 + i, price, f"{draw(st.integers(1, 9))}.5", i, i, t, i % 3 == 0))
    published = draw(st.integers(1, len(trades)))
    upper = trades[published].T - 1 if published < len(trades) else trades[-1].T + 3 * 86_400_000
    now = draw(st.integers(trades[published - 1].T, max(upper, trades[published - 1].T)))
    start = draw(st.none() | st.integers(trades[0].T - 86_400_000, now + 3_600_000))
    end = draw(st.none() | st.integers(trades[0].T - 86_400_000, now + 3_600_000))
    return {
        "trades": trades,
        "published": published,
        "now": now,
        "interval": draw(st.sampled_from(INTERVALS)),
        "start": start,
        "end": end,
        "limit": draw(st.integers(1, 30)),
    }


def expected_rows(s: dict[str, Any]) -> list[tuple[Any, ...]]:
    interval = s["interval"]
    klines = reference_klines(s["trades"][: s["published"]], interval)
    while klines[-1].t < open_time(interval, s["now"]):  # empty klines up to the one in progress
        klines.append(Kline.empty("BTCUSDT", interval, close_time(interval, klines[-1].t) + 1, klines[-1].c))
    chosen = [k for k in klines if (s["start"] is None or k.t >= s["start"]) and (s["end"] is None or k.t <= s["end"])]
    chosen = chosen[: s["limit"]] if s["start"] is not None else chosen[-s["limit"] :]
    return [numeric(k.to_rest_row()) for k in chosen]


def numeric(row: list[Any]) -> tuple[Any, ...]:
    return tuple(Decimal(v) if isinstance(v, str) else v for v in row)


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_kline_rows_select_like_binance(s: dict[str, Any]) -> None:
    trades = s["trades"]
    tape = MarketTape({"BTCUSDT": trades}, venue="spot", start_ms=trades[0].T, end_ms=trades[-1].T + 10**10)
    btc = tape.symbols["BTCUSDT"]
    btc.published = s["published"]
    clock = PlaybackClock(lambda: 0.0, start_ms=tape.start_ms, end_ms=tape.end_ms, speed=0)
    clock.start()
    clock.jump_to(s["now"])
    api = RestApi(tape, clock, "spot", WeightLimiter(lambda: 0.0, None, 60))
    rows = api.kline_rows(btc, s["interval"], s["start"], s["end"], s["limit"])
    assert [numeric(r) for r in rows] == expected_rows(s)
    assert all(isinstance(r[1], str) and len(r[1].split(".")[1]) == 8 for r in rows)  # spot prints 8 decimals


def test_nothing_published_nothing_to_show() -> None:
    trade = AggTrade("BTCUSDT", 1, "1.00", "1.0", 1, 1, START, False)
    tape = MarketTape({"BTCUSDT": [trade]}, venue="usdm", start_ms=START, end_ms=START)
    clock = PlaybackClock(lambda: 0.0, start_ms=START, end_ms=START, speed=0)
    api = RestApi(tape, clock, "usdm", WeightLimiter(lambda: 0.0, None, 60))
    assert api.kline_rows(tape.symbols["BTCUSDT"], "1m", None, None, 500) == []


def test_weight_limiter_windows() -> None:
    now = [0.0]
    limiter = WeightLimiter(lambda: now[0], 10, 60)
    assert limiter.charge(4) is None and limiter.charge(4) is None
    assert limiter.charge(4) == pytest.approx(60.0)
    now[0] = 59.5
    assert limiter.charge(1) is None and limiter.charge(2) == pytest.approx(0.5)
    now[0] = 60.0
    assert limiter.charge(10) is None and limiter.used == 10
    limiter.configure(None)
    assert all(limiter.charge(1000) is None for _ in range(5))
