"""The replay exchange against real clients: the websockets library for streams, aiohttp for REST and control.

No Kafka or ClickHouse involved. Feeds are small (a few generated minutes, or the real recordings) and most run
at ``speed=0``, so the whole file takes seconds.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from services.core.models import AggTrade, InvalidInput, parse_agg_trade
from services.core.reference import read_klines_csv, reference_klines
from services.replay import FileFeed, GeneratorFeed, ReplayConfig, ReplayExchange
from services.replay.send_rate import measure

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

START = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MINUTE = 60_000
TRX_TRADES = "TRXUSDT-UM-aggTrades-derived-2025-03-04_000004-001644.csv"
TRX_KLINES = "TRXUSDT-UM-1m-2025-03-04_0000-0016.csv"
SPOT_KEYS = ["e", "E", "s", "a", "p", "q", "f", "l", "T", "m", "M"]


def generated(
    symbols: Sequence[str] = ("BTCUSDT", "ETHUSDT"), minutes: int = 3, speed: float = 0, **kw: Any
) -> ReplayConfig:
    feed = GeneratorFeed(symbols=tuple(symbols), seed=3, start_ms=START, duration_ms=minutes * MINUTE)
    return ReplayConfig(feed=feed, speed=speed, **kw)


def connect(url: str) -> Any:
    return websockets.connect(url, open_timeout=5, close_timeout=2, max_queue=None)


async def recv_json(ws: ClientConnection, timeout: float = 5) -> Any:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def collect(ws: ClientConnection, count: int, timeout: float = 10) -> list[Any]:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        out.append(json.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic())))
    return out


async def nothing_arrives(ws: ClientConnection, seconds: float) -> bool:
    try:
        await asyncio.wait_for(ws.recv(), seconds)
    except TimeoutError:
        return True
    return False


async def rest(url: str, path: str, **params: Any) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as session, session.get(url + path, params=params) as response:
        return response.status, await response.json(content_type=None), response.headers


async def control(ex: ReplayExchange, name: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(f"{ex.control_url}/{name}", json=body or {}) as r:
        return r.status, await r.json()


def as_row(trade: AggTrade, spot: bool = True) -> dict[str, Any]:
    row = {"a": trade.a, "p": trade.p, "q": trade.q, "f": trade.f, "l": trade.l, "T": trade.T, "m": trade.m}
    if spot:
        row["M"] = True
    return row


def numeric(row: Sequence[Any]) -> tuple[Any, ...]:
    """A REST kline row without the ignore column, decimals as Decimal so formatting does not matter."""
    return tuple(Decimal(v) if isinstance(v, str) else v for v in row[:11])


async def wait_until(predicate: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.01)


class ManualTime:
    """An injectable real-time source the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------------------------- streams


async def test_combined_stream_delivers_every_trade_as_binance_frames() -> None:
    async with ReplayExchange(generated()) as ex:
        trades = {s: ex.trades(s) for s in ex.symbols}
        total = sum(map(len, trades.values()))
        async with connect(ex.stream_url(["BTCUSDT", "ETHUSDT"])) as ws:
            frames = await collect(ws, total)
            assert await nothing_arrives(ws, 0.1)
        await ex.wait_exhausted(5)
        by_symbol: dict[str, list[dict[str, Any]]] = {"BTCUSDT": [], "ETHUSDT": []}
        for frame in frames:
            assert list(frame) == ["stream", "data"]
            data = frame["data"]
            assert frame["stream"] == data["s"].lower() + "@aggTrade"
            assert list(data) == SPOT_KEYS and data["e"] == "aggTrade" and data["M"] is True
            assert data["T"] < data["E"] <= data["T"] + 23
            by_symbol[data["s"]].append(data)
        for symbol, got in by_symbol.items():
            assert [{k: d[k] for k in ("a", "p", "q", "f", "l", "T", "m", "M")} for d in got] == [
                as_row(t) for t in trades[symbol]
            ]
        status = ex.status()
        assert status["exhausted"] and status["symbols"]["BTCUSDT"]["last_id"] == trades["BTCUSDT"][-1].a
        # frames across symbols arrive in market-time order
        times = [f["data"]["T"] for f in frames]
        assert times == sorted(times)


async def test_raw_stream_path_sends_unwrapped_payloads_of_its_symbol_only() -> None:
    async with ReplayExchange(generated()) as ex, connect(ex.stream_url(["ETHUSDT"], combined=False)) as ws:
        eth = ex.trades("ETHUSDT")
        frames = await collect(ws, len(eth))
        assert [f["a"] for f in frames] == [t.a for t in eth]
        assert all(list(f) == SPOT_KEYS for f in frames)
        assert await nothing_arrives(ws, 0.1)


async def test_subscribe_unsubscribe_list_and_combined_property() -> None:
    config = generated(autostart="never", max_control_messages_per_s=50)
    async with ReplayExchange(config) as ex, connect(f"{ex.ws_url}/ws") as ws:

        async def call(method: str, params: list[Any] | None = None, request_id: Any = 1) -> Any:
            message: dict[str, Any] = {"method": method, "id": request_id}
            if params is not None:
                message["params"] = params
            await ws.send(json.dumps(message))
            return await recv_json(ws)

        assert await call("SUBSCRIBE", ["btcusdt@aggTrade"], 1) == {"result": None, "id": 1}
        assert await call("LIST_SUBSCRIPTIONS", None, 2) == {"result": ["btcusdt@aggTrade"], "id": 2}
        assert await call("SUBSCRIBE", ["ethusdt@aggTrade", "dogeusdt@aggTrade"], 3) == {"result": None, "id": 3}
        assert await call("UNSUBSCRIBE", ["btcusdt@aggTrade"], "four") == {"result": None, "id": "four"}
        assert (await call("LIST_SUBSCRIPTIONS", None, 5))["result"] == ["ethusdt@aggTrade", "dogeusdt@aggTrade"]
        assert await call("GET_PROPERTY", ["combined"], 6) == {"result": False, "id": 6}
        assert (await call("SUBSCRIBE", ["BTCUSDT@aggTrade"], 7))["error"]["code"] == 2
        assert (await call("FLY", [], 8))["error"]["code"] == 2
        await ws.send("{not json")
        assert (await recv_json(ws))["error"]["code"] == 3
        assert await call("SET_PROPERTY", ["combined", True], 9) == {"result": None, "id": 9}

        assert await nothing_arrives(ws, 0.1)  # autostart="never": nothing before the feed starts
        ex.start_feed()
        eth = ex.trades("ETHUSDT")
        frames = await collect(ws, len(eth))
        assert {f["stream"] for f in frames} == {"ethusdt@aggTrade"}
        assert [f["data"]["a"] for f in frames] == [t.a for t in eth]


async def test_too_many_control_messages_close_the_connection() -> None:
    async with ReplayExchange(generated(autostart="never")) as ex, connect(f"{ex.ws_url}/ws") as ws:
        for i in range(7):
            await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": i}))
        replies = []
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                replies.append(await recv_json(ws))
        assert [r["id"] for r in replies[:5]] == [0, 1, 2, 3, 4]
        assert "error" in replies[5]
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_too_many_streams_gets_an_error_and_a_close() -> None:
    async with ReplayExchange(generated(max_streams_per_connection=3, autostart="never")) as ex:
        async with connect(f"{ex.ws_url}/ws") as ws:
            names = [f"sym{i}usdt@aggTrade" for i in range(4)]
            await ws.send(json.dumps({"method": "SUBSCRIBE", "params": names, "id": 1}))
            reply = await recv_json(ws)
            assert reply["id"] == 1 and "too many streams" in reply["error"]["msg"]
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await recv_json(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        with pytest.raises(websockets.InvalidStatus):
            async with connect(f"{ex.ws_url}/stream?streams=" + "/".join(names)):
                pass


async def test_server_pings_and_drops_a_client_that_never_pongs() -> None:
    async with ReplayExchange(generated(autostart="never", ping_interval_s=0.1, pong_timeout_s=0.4)) as ex:
        async with connect(f"{ex.ws_url}/ws") as answering:
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(f"{ex.ws_url}/ws", autoping=False) as silent,
            ):
                pings = 0
                started = time.monotonic()
                while True:
                    msg = await asyncio.wait_for(silent.receive(), 3)
                    if msg.type is aiohttp.WSMsgType.PING:
                        pings += 1
                        continue
                    break
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                assert pings >= 2 and 0.3 < time.monotonic() - started < 2.5
            # the websockets client answers pings by itself and is still served
            await answering.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 1}))
            assert await recv_json(answering) == {"result": [], "id": 1}


async def test_connections_are_closed_at_their_maximum_age() -> None:
    async with ReplayExchange(generated(autostart="never", max_connection_age_s=0.3)) as ex:
        async with connect(f"{ex.ws_url}/ws") as ws:
            started = time.monotonic()
            with pytest.raises(websockets.ConnectionClosedOK) as closed:
                await recv_json(ws, timeout=3)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
            assert 0.25 < time.monotonic() - started < 2


# --------------------------------------------------------------------------------------------- REST


async def test_rest_agg_trades_paging_selection_and_errors() -> None:
    async with ReplayExchange(generated(autostart="immediately")) as ex:
        await ex.wait_exhausted(5)
        btc = ex.trades("BTCUSDT")
        assert ex.published_trades("BTCUSDT") == btc
        url = ex.rest_url
        pages: list[dict[str, Any]] = []
        from_id = btc[0].a
        while True:
            status, page, headers = await rest(url, "/api/v3/aggTrades", symbol="BTCUSDT", fromId=from_id, limit=1000)
            assert status == 200 and len(page) <= 1000 and headers["X-MBX-USED-WEIGHT-1M"]
            if not page:
                break
            pages.extend(page)
            from_id = page[-1]["a"] + 1
        assert pages == [as_row(t) for t in btc]

        status, newest, _ = await rest(url, "/api/v3/aggTrades", symbol="BTCUSDT")
        assert status == 200 and newest == [as_row(t) for t in btc[-500:]]
        start, end = btc[100].T, btc[100].T + 20_000
        _, window, _ = await rest(url, "/api/v3/aggTrades", symbol="BTCUSDT", startTime=start, endTime=end)
        assert window == [as_row(t) for t in btc if start <= t.T <= end][:500]
        _, upto, _ = await rest(url, "/api/v3/aggTrades", symbol="BTCUSDT", endTime=end, limit=3)
        assert upto == [as_row(t) for t in btc if t.T <= end][-3:]
        _, clamped, _ = await rest(url, "/api/v3/aggTrades", symbol="BTCUSDT", fromId=btc[0].a, limit=5000)
        assert len(clamped) == min(1000, len(btc))

        status, body, _ = await rest(url, "/api/v3/aggTrades", symbol="NOPEUSDT")
        assert (status, body) == (400, {"code": -1121, "msg": "Invalid symbol."})
        errors = [
            ({"symbol": "btcusdt"}, -1100),
            ({}, -1102),
            ({"symbol": "BTCUSDT", "startTime": start, "endTime": start + 3_600_001}, -1127),
            ({"symbol": "BTCUSDT", "fromId": 1, "startTime": start}, -1128),
            ({"symbol": "BTCUSDT", "fromId": "x"}, -1100),
        ]
        for params, code in errors:
            status, body, _ = await rest(url, "/api/v3/aggTrades", **params)
            assert status == 400 and body["code"] == code, params


async def test_rest_klines_equal_the_reference_oracle() -> None:
    async with ReplayExchange(generated(minutes=70, symbols=("TRXUSDT",), autostart="immediately")) as ex:
        await ex.wait_exhausted(10)
        trx = ex.trades("TRXUSDT")
        for interval in ("1m", "3m", "5m", "1h"):
            expected = [numeric(k.to_rest_row()) for k in reference_klines(trx, interval)]
            status, rows, _ = await rest(ex.rest_url, "/api/v3/klines", symbol="TRXUSDT", interval=interval, limit=1000)
            assert status == 200
            got = [numeric(r) for r in rows]
            assert got[: len(expected)] == expected, interval
            for row in got[len(expected) :]:  # quiet tail up to market time: empty klines at the last close
                assert row[1:5] == (expected[-1][4],) * 4 and row[8] == 0 and row[5] == 0
        # selection: startTime inclusive (open times), endTime, limit; newest first without startTime
        _, rows, _ = await rest(
            ex.rest_url, "/api/v3/klines", symbol="TRXUSDT", interval="1m", startTime=START + 90_000, limit=3
        )
        assert [r[0] for r in rows] == [START + 2 * MINUTE, START + 3 * MINUTE, START + 4 * MINUTE]
        _, rows, _ = await rest(ex.rest_url, "/api/v3/klines", symbol="TRXUSDT", interval="1m", limit=2)
        assert [r[0] for r in rows] == [START + 68 * MINUTE, START + 69 * MINUTE]
        _, rows, _ = await rest(
            ex.rest_url, "/api/v3/klines", symbol="TRXUSDT", interval="1m", endTime=START + 10 * MINUTE, limit=2
        )
        assert [r[0] for r in rows] == [START + 9 * MINUTE, START + 10 * MINUTE]
        assert isinstance(rows[0][1], str) and len(rows[0][1].split(".")[1]) == 8  # spot formatting
        for params, code in [({"interval": "7m"}, -1120), ({}, -1102)]:
            status, body, _ = await rest(ex.rest_url, "/api/v3/klines", symbol="TRXUSDT", **params)
            assert status == 400 and body["code"] == code
        status, info, _ = await rest(ex.rest_url, "/api/v3/exchangeInfo")
        assert status == 200
        assert info["symbols"] == [{"symbol": "TRXUSDT", "status": "TRADING", "baseAsset": "TRX", "quoteAsset": "USDT"}]
        _, clock, _ = await rest(ex.rest_url, "/api/v3/time")
        assert clock == {"serverTime": START + 70 * MINUTE - 1} and ex.market_time_ms() == START + 70 * MINUTE - 1


async def test_rest_klines_show_the_kline_in_progress_at_market_time() -> None:
    t0 = START + 10_000
    trades = [
        AggTrade("BTCUSDT", 1, "100.00", "1.0", 10, 10, t0, False),
        AggTrade("BTCUSDT", 2, "101.00", "2.0", 11, 12, START + 50_000, True),
        AggTrade("BTCUSDT", 3, "99.00", "1.5", 13, 13, START + 65_000, False),
        AggTrade("BTCUSDT", 4, "98.00", "1.0", 14, 14, START + 90_000, True),
        AggTrade("BTCUSDT", 5, "97.00", "1.0", 15, 15, START + 200_000, True),
    ]
    real = ManualTime()
    config = ReplayConfig(speed=1, autostart="immediately")
    async with ReplayExchange(config, trades={"BTCUSDT": trades}, monotonic=real) as ex:

        async def rows() -> list[tuple[Any, ...]]:
            _, body, _ = await rest(ex.rest_url, "/api/v3/klines", symbol="BTCUSDT", interval="1m")
            return [numeric(r) for r in body]

        assert ex.market_time_ms() == t0
        await wait_until(lambda: len(ex.published_trades("BTCUSDT")) == 1)
        real.now += 60  # market 00:01:10
        await wait_until(lambda: len(ex.published_trades("BTCUSDT")) == 3)
        expected = [numeric(k.to_rest_row()) for k in reference_klines(trades[:3], "1m")]
        assert await rows() == expected and expected[-1][8] == 1  # 00:01 so far holds one trade
        assert (await rest(ex.rest_url, "/api/v3/time"))[1] == {"serverTime": START + 70_000}

        real.now += 80  # market 00:02:30: minute 00:02 has no trade yet
        await wait_until(lambda: len(ex.published_trades("BTCUSDT")) == 4)
        got = await rows()
        assert got[:2] == [numeric(k.to_rest_row()) for k in reference_klines(trades[:4], "1m")]
        assert got[2][0] == START + 2 * MINUTE and got[2][1:5] == (Decimal("98.00"),) * 4 and got[2][8] == 0

        ex.faults.pause_feed()
        real.now += 1000
        await asyncio.sleep(0.1)
        assert ex.market_time_ms() == START + 150_000 and len(ex.published_trades("BTCUSDT")) == 4
        ex.faults.resume_feed()
        real.now += 50  # market 00:03:20 = the last trade and the end of the recording
        await ex.wait_exhausted(2)
        assert [numeric(r) for r in await rows()] == [numeric(k.to_rest_row()) for k in reference_klines(trades, "1m")]


async def test_rest_rate_limit_answers_429_with_retry_after() -> None:
    real = ManualTime()
    async with ReplayExchange(generated(autostart="immediately"), monotonic=real) as ex:
        ex.faults.set_rate_limit(10, window_s=60)
        statuses = []
        for _ in range(3):
            status, body, headers = await rest(ex.rest_url, "/api/v3/aggTrades", symbol="BTCUSDT", limit=1)
            statuses.append(status)
        assert statuses == [200, 200, 429]
        assert body["code"] == -1003 and 1 <= int(headers["Retry-After"]) <= 60
        real.now += 60  # the next window
        assert (await rest(ex.rest_url, "/api/v3/time"))[0] == 200
        assert await control(ex, "rate_limit", {"weight_limit": None}) == (200, {"ok": True})
        for _ in range(5):
            assert (await rest(ex.rest_url, "/api/v3/aggTrades", symbol="BTCUSDT", limit=1))[0] == 200


# --------------------------------------------------------------------------------------------- faults


async def test_drop_connections_closes_abruptly() -> None:
    async with ReplayExchange(generated(speed=20)) as ex, connect(ex.stream_url(["BTCUSDT"])) as ws:
        await collect(ws, 3)
        assert await control(ex, "drop_connections") == (200, {"ok": True, "dropped": 1})
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            await collect(ws, 100_000)
        assert closed.value.rcvd is None  # no close frame: the TCP connection just went away
        await wait_until(lambda: ex.status()["connections"] == 0)


async def test_stall_stops_sending_without_closing_then_resumes_without_loss() -> None:
    async with ReplayExchange(generated(symbols=("BTCUSDT",), speed=30)) as ex:
        async with connect(ex.stream_url(["BTCUSDT"])) as ws:
            frames = await collect(ws, 5)
            assert ex.faults.stall(1.5) == 1
            while True:  # what was already on the wire still arrives
                try:
                    frames.append(json.loads(await asyncio.wait_for(ws.recv(), 0.1)))
                except TimeoutError:
                    break
            assert await nothing_arrives(ws, 0.4)
            frames += await collect(ws, 20, timeout=3)  # held frames arrive, then live ones
            ids = [f["data"]["a"] for f in frames]
            assert ids == list(range(ids[0], ids[0] + len(ids)))


async def test_skip_trades_leaves_a_gap_that_rest_repairs() -> None:
    async with ReplayExchange(generated(autostart="never")) as ex:
        btc = ex.trades("BTCUSDT")
        first = btc[0].a
        assert await control(ex, "skip", {"symbol": "BTCUSDT", "first_id": first + 5, "last_id": first + 9}) == (
            200,
            {"ok": True},
        )
        async with connect(ex.stream_url(["BTCUSDT"])) as ws:
            ex.start_feed()
            frames = await collect(ws, len(btc) - 5)
            assert await nothing_arrives(ws, 0.1)
        ids = [f["data"]["a"] for f in frames]
        assert ids == [t.a for t in btc if not first + 5 <= t.a <= first + 9]
        _, repaired, _ = await rest(ex.rest_url, "/api/v3/aggTrades", symbol="BTCUSDT", fromId=first + 5, limit=5)
        assert repaired == [as_row(t) for t in btc[5:10]]
        assert (await control(ex, "skip", {"symbol": "NOPE", "first_id": 1, "last_id": 2}))[0] == 400


async def test_duplicate_and_reorder_frames() -> None:
    async with ReplayExchange(generated(autostart="never")) as ex:
        btc = [t.a for t in ex.trades("BTCUSDT")]
        assert (await control(ex, "duplicate", {"count": 2, "symbol": "BTCUSDT"}))[0] == 200
        ex.faults.reorder_frames(2, "BTCUSDT")
        async with connect(ex.stream_url(["BTCUSDT"], combined=False)) as ws:
            ex.start_feed()
            ids = [f["a"] for f in await collect(ws, len(btc) + 2)]
            assert await nothing_arrives(ws, 0.1)
        assert ids[:8] == [btc[0], btc[0], btc[1], btc[1], btc[3], btc[2], btc[5], btc[4]]
        assert ids[8:] == btc[6:]


@pytest.mark.parametrize("kind", ["bad_json", "missing_field", "wrong_type", "negative_price"])
async def test_malformed_frames(kind: str) -> None:
    async with ReplayExchange(generated(symbols=("BTCUSDT",), minutes=1)) as ex:
        btc = ex.trades("BTCUSDT")
        async with connect(ex.stream_url(["BTCUSDT"])) as ws:
            first = await recv_json(ws)
            await ex.wait_exhausted(5)
            await collect(ws, len(btc) - 1)
            assert await control(ex, "malformed", {"kind": kind, "symbol": "BTCUSDT"}) == (
                200,
                {"ok": True, "sent": 1},
            )
            text = await asyncio.wait_for(ws.recv(), 5)
        if kind == "bad_json":
            with pytest.raises(ValueError):
                json.loads(text)
            return
        frame = json.loads(text)
        assert frame["stream"] == "btcusdt@aggTrade" and first["stream"] == "btcusdt@aggTrade"
        with pytest.raises(InvalidInput):
            parse_agg_trade(frame["data"])
        assert frame["data"]["a"] in (btc[-1].a, str(btc[-1].a))  # never the id of a trade still to come


async def test_malformed_frame_before_the_first_trade_uses_an_id_before_it() -> None:
    async with ReplayExchange(generated(symbols=("BTCUSDT",), minutes=1, autostart="never")) as ex:
        async with connect(ex.stream_url(["BTCUSDT"], combined=False)) as ws:
            assert ex.faults.send_malformed("negative_price") == 1
            frame = await recv_json(ws)
        assert frame["a"] == ex.trades("BTCUSDT")[0].a - 1 and frame["p"].startswith("-")


async def test_server_shutdown_event_then_close() -> None:
    async with ReplayExchange(generated(autostart="never")) as ex, connect(ex.stream_url(["BTCUSDT"])) as ws:
        assert await control(ex, "server_shutdown", {"close_after_s": 0.2}) == (200, {"ok": True, "notified": 1})
        event = await recv_json(ws)
        assert event == {"e": "serverShutdown", "E": ex.market_time_ms()}
        with pytest.raises(websockets.ConnectionClosedOK) as closed:
            await recv_json(ws, timeout=3)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


async def test_pause_and_resume_the_feed() -> None:
    async with ReplayExchange(generated(symbols=("BTCUSDT",), speed=30)) as ex:
        async with connect(ex.stream_url(["BTCUSDT"])) as ws:
            await collect(ws, 3)
            assert await control(ex, "pause") == (200, {"ok": True})
            published, market = len(ex.published_trades("BTCUSDT")), ex.market_time_ms()
            await asyncio.sleep(0.3)
            assert (len(ex.published_trades("BTCUSDT")), ex.market_time_ms()) == (published, market)
            status = (await rest(ex.control_url, "/status"))[1]
            assert status["running"] is False and status["symbols"]["BTCUSDT"]["published"] == published
            assert await control(ex, "resume") == (200, {"ok": True})
            await wait_until(lambda: len(ex.published_trades("BTCUSDT")) > published + 5)
            assert ex.market_time_ms() > market


async def test_control_status_wait_exhausted_and_bad_requests() -> None:
    async with ReplayExchange(generated(autostart="immediately")) as ex:
        status, body, _ = await rest(ex.control_url, "/wait_exhausted", timeout=5)
        assert status == 200 and body["exhausted"] is True
        assert all(s["exhausted"] and s["published"] == s["total"] for s in body["symbols"].values())
        assert (await control(ex, "stall", {"seconds": "long"}))[0] == 400
        assert (await control(ex, "malformed", {"kind": "nonsense"}))[0] == 400
    async with ReplayExchange(generated(autostart="never")) as ex:
        status, body, _ = await rest(ex.control_url, "/wait_exhausted", timeout=0.1)
        assert status == 504 and body["exhausted"] is False and body["started"] is False


# --------------------------------------------------------------------------------------------- futures


async def test_usdm_routed_market_path_and_silent_unrouted_path() -> None:
    async with ReplayExchange(generated(venue="usdm")) as ex:
        btc = ex.trades("BTCUSDT")
        assert ex.stream_url(["BTCUSDT"]).startswith(f"{ex.ws_url}/market/stream?streams=")
        async with connect(f"{ex.ws_url}/stream?streams=btcusdt@aggTrade") as unrouted:
            async with connect(ex.stream_url(["BTCUSDT"])) as routed:
                frames = await collect(routed, len(btc))
            assert await nothing_arrives(unrouted, 0.2)
        assert all(list(f["data"]) == SPOT_KEYS[:-1] for f in frames)  # no "M" on futures
        assert [f["data"]["a"] for f in frames] == [t.a for t in btc]
        async with connect(f"{ex.ws_url}/market/ws") as ws:
            await ws.send(json.dumps({"method": "SUBSCRIBE", "params": ["btcusdt@aggTrade"], "id": 1}))
            assert await recv_json(ws) == {"result": None, "id": 1}
        status, page, _ = await rest(ex.rest_url, "/fapi/v1/aggTrades", symbol="BTCUSDT", fromId=btc[0].a, limit=2)
        assert status == 200 and page == [as_row(t, spot=False) for t in btc[:2]]
        assert (await rest(ex.rest_url, "/fapi/v1/klines", symbol="BTCUSDT", interval="1s"))[1]["code"] == -1120
        assert (await rest(ex.rest_url, "/fapi/v1/exchangeInfo"))[1]["symbols"][0]["contractType"] == "PERPETUAL"
        async with aiohttp.ClientSession() as session, session.get(f"{ex.rest_url}/api/v3/time") as response:
            assert response.status == 404


async def test_trx_recording_at_speed_zero_reproduces_binance_1m_klines(data_dir: Path) -> None:
    feed = (FileFeed(path=data_dir / TRX_TRADES, symbol="TRXUSDT"),)
    config = ReplayConfig(feed=feed, venue="usdm", speed=0, autostart="immediately")
    async with ReplayExchange(config) as ex:
        await ex.wait_exhausted(10)
        status, rows, _ = await rest(
            ex.rest_url, "/fapi/v1/klines", symbol="TRXUSDT", interval="1m", startTime=1_741_046_400_000, limit=16
        )
        assert status == 200 and len(rows) == 16
    binance = read_klines_csv(data_dir / TRX_KLINES, "TRXUSDT", "1m")[:16]  # 00:00-00:15
    assert [numeric(r) for r in rows] == [numeric(k.to_rest_row()) for k in binance]


async def test_spot_btc_recording_replays_over_rest(data_dir: Path) -> None:
    feed = (FileFeed(path=data_dir / "BTCUSDT-SPOT-aggTrades-2026-01-01_head5000.csv", symbol="BTCUSDT"),)
    async with ReplayExchange(ReplayConfig(feed=feed, speed=0, autostart="immediately")) as ex:
        await ex.wait_exhausted(10)
        btc = ex.trades("BTCUSDT")
        _, page, _ = await rest(ex.rest_url, "/api/v3/aggTrades", symbol="BTCUSDT", fromId=btc[0].a, limit=1000)
        assert page == [as_row(t) for t in btc[:1000]]
        _, rows, _ = await rest(ex.rest_url, "/api/v3/klines", symbol="BTCUSDT", interval="1m")
        assert [numeric(r) for r in rows] == [numeric(k.to_rest_row()) for k in reference_klines(btc, "1m")]


# --------------------------------------------------------------------------------------------- entry points


async def test_command_line_serves_until_sigterm(data_dir: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.replay", "--port", "0", "--venue", "usdm", "--speed", "0",
        "--file", f"{data_dir / TRX_TRADES}:TRXUSDT", "--autostart", "immediately",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        fields = dict(part.split("=", 1) for part in line.split()[2:])
        assert line.startswith("replay ready ") and fields["venue"] == "usdm" and fields["symbols"] == "TRXUSDT"
        assert fields["ws_url"].startswith("ws://127.0.0.1:")
        status, body, _ = await rest(fields["control_url"], "/wait_exhausted", timeout=10)
        assert status == 200 and body["symbols"]["TRXUSDT"]["published"] == 9_999
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_send_rate_tool_runs() -> None:
    result = await measure(3_000, 3, "websockets")
    assert result["frames"] == 3_000 and result["rate"] > 0
