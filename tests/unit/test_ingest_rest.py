"""The REST client's rate-limit behaviour (429 Retry-After, 418 ban, weight budget) and backfill's reactions.

A tiny local HTTP server stands in for the exchange's REST endpoint, answering exactly the statuses under test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from services.core.models import AggTrade
from services.ingest.backfill import Backfiller, BackfillOptions
from services.ingest.frames import WireTrade, wire_trade
from services.ingest.rest import Banned, ExchangeRest, RateLimited, RestError, WeightBudget
from services.ingest.sequencer import Outbox, Sequencer
from services.shared.messages import Gap

pytestmark = pytest.mark.unit

Handler = Callable[[web.Request], Any]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def server() -> AsyncIterator[Callable[[Handler], Any]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_get("/api/v3/aggTrades", handler)
        app.router.add_get("/api/v3/exchangeInfo", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


def rows(first: int, count: int) -> list[dict[str, Any]]:
    return [
        {"a": a, "p": "1.00", "q": "2", "f": a, "l": a, "T": 1_767_225_600_000 + a, "m": False, "M": True}
        for a in range(first, first + count)
    ]


def test_weight_budget_waits_for_the_window() -> None:
    clock = FakeClock()
    budget = WeightBudget(10, clock)
    for _ in range(2):
        assert budget.delay_for(4) == 0
        budget.spend(4)
    assert budget.delay_for(4) == pytest.approx(60.0)
    clock.now += 30
    assert budget.delay_for(4) == pytest.approx(30.0)
    clock.now += 30
    assert budget.delay_for(4) == 0
    budget.pause(5)
    assert budget.delay_for(1) == pytest.approx(5)
    budget.observe_used(10_000)
    assert budget.delay_for(1) >= 1


async def test_agg_trades_validates_and_orders_rows(server: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        assert request.query["symbol"] == "BTCUSDT" and request.query["limit"] == "1000"
        first = int(request.query["fromId"])
        return web.json_response(list(reversed(rows(first, 3))), headers={"X-MBX-USED-WEIGHT-1M": "4"})

    rest = ExchangeRest(await server(handler), "spot", clock=FakeClock())
    try:
        trades = await rest.agg_trades("BTCUSDT", 10)
        assert [t.a for t in trades] == [10, 11, 12] and trades[0].s == "BTCUSDT"
    finally:
        await rest.close()


async def test_bad_rows_and_statuses_are_rest_errors(server: Any) -> None:
    answers = [web.json_response([{"a": 1}]), web.json_response({"code": -1121, "msg": "Invalid symbol."}, status=400)]

    async def handler(request: web.Request) -> web.Response:
        return answers.pop(0)

    rest = ExchangeRest(await server(handler), "spot", clock=FakeClock())
    try:
        with pytest.raises(RestError, match="row 0: missing field 'f'"):
            await rest.agg_trades("BTCUSDT", 1)
        with pytest.raises(RestError, match=r"HTTP 400.*Invalid symbol"):
            await rest.agg_trades("BTCUSDT", 1)
    finally:
        await rest.close()


async def test_429_pauses_for_retry_after(server: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"code": -1003}, status=429, headers={"Retry-After": "7"})

    clock = FakeClock()
    rest = ExchangeRest(await server(handler), "spot", clock=clock)
    try:
        with pytest.raises(RateLimited) as info:
            await rest.agg_trades("BTCUSDT", 1)
        assert info.value.retry_after_s == 7
        assert rest.budget.delay_for(4) == pytest.approx(7)
        assert rest.rate_limited == 1
    finally:
        await rest.close()


async def test_418_bans_without_further_requests(server: Any) -> None:
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.json_response({"code": -1003}, status=418, headers={"Retry-After": "100"})

    clock = FakeClock()
    rest = ExchangeRest(await server(handler), "spot", clock=clock)
    try:
        with pytest.raises(Banned):
            await rest.agg_trades("BTCUSDT", 1)
        assert rest.banned and rest.bans == 1
        with pytest.raises(Banned, match="banned"):
            await rest.agg_trades("BTCUSDT", 1)
        assert calls == 1, "no request during the ban"
        clock.now += 101
        assert not rest.banned
    finally:
        await rest.close()


async def test_exchange_info_lists_symbols(server: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "symbols": [
                    {"symbol": "BTCUSDT", "status": "TRADING", "quoteAsset": "USDT"},
                    {"symbol": "ETHBTC", "status": "TRADING", "quoteAsset": "BTC"},
                    {"symbol": "OLDUSDT", "status": "BREAK", "quoteAsset": "USDT"},
                    "junk",
                ]
            }
        )

    rest = ExchangeRest(await server(handler), "spot", clock=FakeClock())
    try:
        infos = await rest.exchange_info()
    finally:
        await rest.close()
    assert [i.symbol for i in infos] == ["BTCUSDT", "ETHBTC", "OLDUSDT"]


# --------------------------------------------------------------------------------------------------- backfill


async def run_backfill(
    base: str, *, held: list[int], last: int = 9, catch_up: bool = False
) -> tuple[Sequencer, list[Gap]]:
    clock = FakeClock()
    seq = Sequencer(Outbox(), reorder_window_s=0.0, max_held_per_symbol=1000)
    seq.track("BTCUSDT", last)
    for a in held:
        seq.offer(wire_trade(AggTrade("BTCUSDT", a, "1", "1", a, a, 1_767_225_600_000, False)), clock())
    gaps: list[Gap] = []

    async def room() -> None:
        return None

    rest = ExchangeRest(base, "spot", clock=clock)
    backfiller = Backfiller(
        seq, rest, clock=clock, options=BackfillOptions(retry_s=0.0, max_attempts=3), room=room, on_gap=gaps.append
    )
    try:
        if catch_up:
            backfiller.catch_up("BTCUSDT")
        else:
            assert seq.due(clock.now + 1) == ["BTCUSDT"]
            backfiller.repair("BTCUSDT")
        for _ in range(200):
            if not backfiller.active:
                break
            await asyncio.sleep(0.01)
        assert not backfiller.active
    finally:
        await rest.close()
    return seq, gaps


async def test_backfill_repairs_across_pages(server: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        first = int(request.query["fromId"])
        return web.json_response(rows(first, min(1000, 2600 - first)))

    seq, gaps = await run_backfill(await server(handler), held=[2500, 2501])
    assert gaps == [] and seq.last("BTCUSDT") == 2599  # the last page ran past the held trades
    assert seq.stats.gaps_repaired == 1 and seq.stats.backfilled == 2590
    items = seq.outbox.take()["BTCUSDT"]
    got = [i.a for i in items if isinstance(i, WireTrade)]
    assert got == list(range(10, len(got) + 10))


async def test_backfill_catch_up_stops_at_a_short_page(server: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        first = int(request.query["fromId"])
        return web.json_response(rows(first, max(0, min(1000, 1500 - first))))

    seq, gaps = await run_backfill(await server(handler), held=[], catch_up=True)
    assert gaps == [] and seq.last("BTCUSDT") == 1499
    assert seq.stats.gaps_repaired == 0, "a catch-up is not a gap"


async def test_backfill_gives_up_with_a_gap_when_ids_are_not_served(server: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response([])

    seq, gaps = await run_backfill(await server(handler), held=[20, 21])
    assert [(g.from_a, g.to_a) for g in gaps] == [(10, 19)]
    assert "does not serve" in gaps[0].reason
    assert seq.last("BTCUSDT") == 21


async def test_backfill_gives_up_after_repeated_failures(server: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=503, text="maintenance")

    _, gaps = await run_backfill(await server(handler), held=[30])
    assert [(g.from_a, g.to_a) for g in gaps] == [(10, 29)]
    assert "503" in gaps[0].reason


async def test_backfill_after_a_ban_publishes_the_gap_at_once(server: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=418, headers={"Retry-After": "60"})

    _, gaps = await run_backfill(await server(handler), held=[12])
    assert [(g.from_a, g.to_a) for g in gaps] == [(10, 11)]
    assert "418" in gaps[0].reason
