"""The gateway against the real broker (and, for history, the real ClickHouse engine), with real WebSocket clients.

Klines are produced to the test's own ``klines.snapshots`` / ``klines.finalized`` topics the way the aggregator
produces them (:func:`encode_kline`, key ``SYMBOL|interval``); the gateway runs in-process on a free port and
the clients are the ``websockets`` library (a different implementation than the aiohttp server).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from services.core.intervals import close_time
from services.core.models import Kline
from services.gateway.server import Gateway, serve
from services.shared import clickhouse
from services.shared.kafka import make_producer
from services.shared.lifecycle import HealthServer, Shutdown
from services.shared.messages import encode_kline, kline_key
from services.shared.settings import Settings

pytestmark = pytest.mark.integration

T0 = 1_767_225_600_000  # 2026-01-01 00:00 UTC
BINANCE_K_ORDER = ["t", "T", "s", "i", "f", "L", "o", "c", "h", "l", "v", "n", "x", "q", "V", "Q", "B"]


def kline(
    symbol: str = "BTCUSDT",
    interval: str = "1m",
    t: int = T0,
    *,
    close: str = "100.5",
    n: int = 3,
    final: bool = False,
    version: int = 0,
) -> Kline:
    c = Decimal(close)
    return Kline(
        symbol, interval, t, close_time(interval, t), 1000 + t // 60_000 % 1000, 1000 + t // 60_000 % 1000 + n - 1,
        Decimal("100.25"), max(c, Decimal("101.75")), min(c, Decimal("99.5")), c,
        Decimal("1.5") * n, n, final, Decimal("150.75") * n, Decimal("0.5") * n, Decimal("50.25") * n, version,
    )  # fmt: skip


def expected_k(k: Kline) -> dict[str, Any]:
    d = k.to_dict()
    d.pop("version")
    d.pop("source")
    d["B"] = "0"
    return d


@dataclass
class Running:
    gateway: Gateway
    port: int
    settings: Settings

    def url(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def metrics(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{self.port}/metrics.json") as r:
            result: dict[str, Any] = await r.json()
            return result


def gateway_settings(settings: Settings, **limits: Any) -> Settings:
    gateway = settings.gateway.model_copy(update={"http_port": 0, **limits})
    return settings.model_copy(update={"gateway": gateway})


@asynccontextmanager
async def running_gateway(settings: Settings, **limits: Any) -> AsyncIterator[Running]:
    s = gateway_settings(settings, **limits)
    shutdown = Shutdown(5.0)
    started: asyncio.Future[tuple[Gateway, HealthServer]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(s, shutdown, started=lambda g, h: started.set_result((g, h))))
    try:
        gateway, health = await asyncio.wait_for(started, 30)
        deadline = time.monotonic() + 30
        while not gateway.ready():
            assert time.monotonic() < deadline, "gateway not ready within 30 s"
            await asyncio.sleep(0.05)
        yield Running(gateway, health.port, s)
    finally:
        shutdown.request("test done")
        assert await asyncio.wait_for(task, 15) == 0


class Producer:
    """Produces klines as the aggregator does; remembers each record's timestamp (the events' ``E``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.producer = make_producer(settings.kafka, client_suffix="test-gateway")
        self.seq = 0

    async def __aenter__(self) -> Producer:
        await self.producer.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.producer.stop()

    async def snapshot(self, k: Kline) -> int:
        self.seq += 1
        meta = await self.producer.send_and_wait(
            self.settings.kafka.topics.snapshots, encode_kline(k, self.seq), key=kline_key(k.s, k.i)
        )
        return int(meta.timestamp)

    async def final(self, k: Kline) -> int:
        meta = await self.producer.send_and_wait(
            self.settings.kafka.topics.finalized, encode_kline(k), key=kline_key(k.s, k.i)
        )
        return int(meta.timestamp)


async def connect(url: str, **options: Any) -> ClientConnection:
    return await websockets.connect(url, proxy=None, compression=None, open_timeout=10, **options)


async def recv_json(ws: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    return result


async def request(ws: ClientConnection, message: dict[str, Any] | str) -> dict[str, Any]:
    await ws.send(message if isinstance(message, str) else json.dumps(message))
    return await recv_json(ws)


async def wait_for(condition: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------------------------------------------


async def test_klines_reach_a_websocket_client_in_order_with_binance_fields(settings: Settings) -> None:
    async with running_gateway(settings) as gw, Producer(settings) as produce:
        ws = await connect(gw.url())
        assert await request(ws, {"method": "SUBSCRIBE", "params": ["btcusdt@kline_1m"], "id": 1}) == {
            "result": None,
            "id": 1,
        }
        # The aggregator's life of two minutes: snapshots of minute 0, its final, snapshots of minute 1, a
        # correction of minute 0 (version 1), another symbol (not subscribed), the final of minute 1.
        script: list[tuple[str, Kline]] = [
            ("snapshot", kline(close="100.5", n=1)),
            ("snapshot", kline(close="101.0", n=2)),
            ("other", kline("ETHUSDT", close="3000.5")),
            ("snapshot", kline(close="99.75", n=3)),
            ("final", kline(close="99.75", n=3, final=True)),
            ("snapshot", kline(t=T0 + 60_000, close="102.0", n=1)),
            ("final", kline(close="99.8", n=4, final=True, version=1)),
            ("snapshot", kline(t=T0 + 60_000, close="102.5", n=2)),
            ("final", kline(t=T0 + 60_000, close="102.5", n=2, final=True)),
        ]
        for kind, k in script:
            if kind == "final":
                timestamp = await produce.final(k)
            else:
                timestamp = await produce.snapshot(k)
            if kind == "other":
                continue
            event = await recv_json(ws)
            assert list(event) == ["e", "E", "s", "k"]
            assert event["e"] == "kline" and event["s"] == "BTCUSDT" and event["E"] == timestamp
            assert list(event["k"]) == BINANCE_K_ORDER
            assert event["k"] == expected_k(k), kind

        # Stale input is not news: an old snapshot of minute 0 after its final, a repeated final.
        await produce.snapshot(kline(close="1.0"))
        await produce.final(kline(t=T0 + 60_000, close="102.5", n=2, final=True))
        # A burst of snapshots of minute 2: the client sees a rising subsequence that ends with the last one.
        closes = [f"{103 + i / 100:.2f}" for i in range(40)]
        for close in closes:
            await produce.snapshot(kline(t=T0 + 120_000, close=close))
        seen: list[str] = []
        while not seen or seen[-1] != closes[-1]:
            event = await recv_json(ws)
            assert event["k"]["t"] == T0 + 120_000, "a stale update was delivered"
            seen.append(event["k"]["c"])
        assert seen == sorted(seen, key=float) and len(set(seen)) == len(seen)
        metrics = await gw.metrics()
        assert metrics["updates_stale"] >= 2
        assert metrics["messages_out"] >= 8 + len(seen)
        await ws.close()


async def test_current_kline_at_once_combined_streams_and_url_subscriptions(settings: Settings) -> None:
    async with running_gateway(settings) as gw, Producer(settings) as produce:
        btc, eth = kline(close="100.5"), kline("ETHUSDT", close="3000.25")
        await produce.snapshot(btc)
        await produce.snapshot(eth)
        await wait_for(lambda: gw.gateway.board.current("ETHUSDT|1m") is not None, what="both klines in the board")

        # Binance's combined form, subscribed in the URL: the current klines arrive without a request.
        combined = await connect(gw.url("/stream?streams=btcusdt@kline_1m/ethusdt@kline_1m"))
        got = {(m := await recv_json(combined))["stream"]: m["data"]["k"] for _ in range(2)}
        assert got == {"btcusdt@kline_1m": expected_k(btc), "ethusdt@kline_1m": expected_k(eth)}
        # /ws/<stream> form, bare events.
        raw = await connect(gw.url("/ws/ethusdt@kline_1m"))
        assert (await recv_json(raw))["k"] == expected_k(eth)
        # SUBSCRIBE answers first, then the current kline; LIST_SUBSCRIPTIONS lists both.
        assert await request(raw, {"method": "SUBSCRIBE", "params": ["btcusdt@kline_1m"], "id": "a"}) == {
            "result": None,
            "id": "a",
        }
        assert (await recv_json(raw))["k"] == expected_k(btc)
        listed = await request(raw, {"method": "LIST_SUBSCRIPTIONS", "id": 2})
        assert listed == {"result": ["btcusdt@kline_1m", "ethusdt@kline_1m"], "id": 2}
        assert await request(raw, {"method": "UNSUBSCRIBE", "params": ["btcusdt@kline_1m"], "id": 3}) == {
            "result": None,
            "id": 3,
        }
        newer = kline(close="100.75", n=4)
        await produce.snapshot(newer)
        wrapped = await recv_json(combined)
        assert wrapped == {"stream": "btcusdt@kline_1m", "data": wrapped["data"]}
        assert wrapped["data"]["k"] == expected_k(newer)
        with pytest.raises(TimeoutError):  # unsubscribed: nothing for btcusdt on the raw connection
            await recv_json(raw, timeout=1.0)
        metrics = await gw.metrics()
        assert metrics["clients"] == 2 and metrics["subscriptions"] == 3 and metrics["streams"] == 2
        await combined.close()
        await raw.close()


async def test_records_that_are_not_klines_are_counted_and_skipped(settings: Settings) -> None:
    async with running_gateway(settings) as gw, Producer(settings) as produce:
        ws = await connect(gw.url("/ws/btcusdt@kline_1m"))
        topic, key = settings.kafka.topics.snapshots, kline_key("BTCUSDT", "1m")
        for value in (
            b"not json",
            b'{"s":"BTCUSDT","i":"1m"}',
            encode_kline(kline()).replace(b'"c":"100.5"', b'"c":"NaN"'),
            None,
        ):
            await produce.producer.send_and_wait(topic, value, key=key)
        good = kline(close="100.5")
        await produce.snapshot(good)
        assert (await recv_json(ws))["k"] == expected_k(good)
        metrics = await gw.metrics()
        assert metrics["records_invalid"] == 3 and metrics["records_in"] == 5
        await ws.close()


async def test_a_restarted_gateway_answers_with_the_current_kline_from_the_read_back(settings: Settings) -> None:
    async with Producer(settings) as produce:
        for close in ("100.5", "100.6", "100.7"):
            await produce.snapshot(kline(close=close))
    async with running_gateway(settings) as gw:
        ws = await connect(gw.url("/ws/btcusdt@kline_1m"))
        assert (await recv_json(ws))["k"]["c"] == "100.7"
        await ws.close()


async def test_bad_requests_get_clear_errors_and_limits_hold(settings: Settings) -> None:
    async with running_gateway(settings, max_subscriptions=2, max_messages_per_s=20.0) as gw:
        ws = await connect(gw.url())
        cases: list[tuple[str | dict[str, Any], int, str]] = [
            ("{not json", 3, "Invalid JSON"),
            ("[1, 2]", 2, "expected a JSON object"),
            ({"method": "SUBSCRIBE", "params": ["btcusdt@kline_1m"], "id": -1}, 2, "'id' must be"),
            ({"method": "PUBLISH", "params": [], "id": 1}, 2, "unknown method 'PUBLISH'"),
            ({"method": "SUBSCRIBE", "params": "btcusdt@kline_1m", "id": 2}, 1, "'params' must be a list"),
            ({"method": "SUBSCRIBE", "params": [], "id": 3}, 2, "at least one stream"),
            ({"method": "SUBSCRIBE", "params": ["dogeusdt@kline_1m"], "id": 4}, 2, "unknown symbol 'DOGEUSDT'"),
            ({"method": "SUBSCRIBE", "params": ["btcusdt@kline_2m"], "id": 5}, 2, "unknown interval '2m'"),
            ({"method": "SUBSCRIBE", "params": ["btcusdt@aggTrade"], "id": 6}, 2, "unsupported stream"),
            ({"method": "SUBSCRIBE", "params": ["btc usdt"], "id": 7}, 2, "malformed stream name"),
            ({"method": "SUBSCRIBE", "params": [42], "id": 8}, 1, "stream names must be strings"),
            ({"method": "SUBSCRIBE", "params": ["btcusdt@kline_1m"], "id": 9, "x": 1}, 2, "unknown field 'x'"),
            ({"method": "SUBSCRIBE", "params": ["btcusdt@kline_1m"], "id": 10, "history": "5"}, 1, "'history'"),
            (
                {
                    "method": "SUBSCRIBE",
                    "params": ["btcusdt@kline_1m", "btcusdt@kline_5m", "ethusdt@kline_1m"],
                    "id": 11,
                },
                4,
                "3 subscriptions would exceed 2",
            ),
        ]
        for message, code, text in cases:
            reply = await request(ws, message)
            assert reply["error"]["code"] == code, (message, reply)
            assert text in reply["error"]["msg"], (message, reply)
            if isinstance(message, dict) and type(message.get("id")) is int and message["id"] >= 0:
                assert reply["id"] == message["id"]
        # A failed SUBSCRIBE subscribed to nothing; the connection is still usable.
        assert await request(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 12}) == {"result": [], "id": 12}
        await ws.send(b"\x00binary")
        assert (await recv_json(ws))["error"]["code"] == 3
        # A frame larger than gateway.max_message_bytes closes the connection with 1009.
        await ws.send(json.dumps({"method": "SUBSCRIBE", "params": ["x" * 5000], "id": 13}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await recv_json(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        metrics = await gw.metrics()
        assert metrics["request_errors"] >= len(cases) + 1


async def test_message_rate_and_connection_limits(settings: Settings) -> None:
    async with running_gateway(settings, max_messages_per_s=2.0, max_connections_per_ip=3, max_connections=5) as gw:
        ws = await connect(gw.url())
        replies = []
        for i in range(6):  # a burst: 2 allowed, then rejected with an error, the 3rd rejection closes
            await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": i}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                replies.append(await recv_json(ws))
        assert [r.get("result") for r in replies[:2]] == [[], []]
        errors = [r["error"] for r in replies if "error" in r]
        assert len(errors) == 2 and all(e["code"] == 4 and "messages/s" in e["msg"] for e in errors)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert "too many messages" in closed.value.rcvd.reason

        with pytest.raises(websockets.InvalidStatus) as bad:
            await connect(gw.url("/stream?streams=nosuch@kline_1m"))
        assert bad.value.response.status_code == 400 and b"unknown symbol" in bad.value.response.body
        await wait_for(lambda: not gw.gateway.clients, what="the closed client to be gone")
        clients = [await connect(gw.url()) for _ in range(3)]
        with pytest.raises(websockets.InvalidStatus) as refused:
            await connect(gw.url())
        assert refused.value.response.status_code == 429
        assert b"too many connections from 127.0.0.1" in refused.value.response.body
        for client in clients:
            await client.close()
        assert (await gw.metrics())["connections_rejected"] >= 2


def _small_receive_buffer_socket(port: int) -> socket.socket:
    # A client that stops reading: its kernel receive buffer is small, so the server's buffers fill quickly.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def test_a_slow_client_is_coalesced_then_disconnected_while_a_normal_client_keeps_its_latency(
    settings: Settings,
) -> None:
    async with (
        running_gateway(settings, slow_client_timeout_s=2.0, socket_send_buffer=4096, queue_size=64) as gw,
        Producer(settings) as produce,
    ):
        stream = {"method": "SUBSCRIBE", "params": ["btcusdt@kline_1m"], "id": 1}
        normal = await connect(gw.url())
        assert (await request(normal, stream))["result"] is None
        slow = await connect(gw.url(), sock=_small_receive_buffer_socket(gw.port), max_queue=1)
        assert (await request(slow, stream))["result"] is None  # ... and from now on it reads nothing

        latencies: list[float] = []
        received: list[dict[str, Any]] = []

        async def read_normal() -> None:
            while True:
                event = await recv_json(normal)
                latencies.append(time.time() * 1000 - event["E"])
                received.append(event["k"])

        async def slow_catches_up() -> tuple[float, websockets.ConnectionClosed]:
            # Stalled until the gateway gives up on it, then it reads again: what was buffered, then the close.
            await wait_for(lambda: gw.gateway.counters.get("clients_disconnected_slow"), 30, "the slow client's kick")
            kicked_at = time.monotonic() - start
            try:
                while True:
                    await recv_json(slow, timeout=10)
            except websockets.ConnectionClosed as closed:
                return kicked_at, closed

        start = time.monotonic()
        reader = asyncio.create_task(read_normal())
        watcher = asyncio.create_task(slow_catches_up())
        produced: list[Kline] = []
        minutes = 20
        for minute in range(minutes):  # 20 klines x (25 snapshots + final), ~80 updates/s
            t = T0 + minute * 60_000
            for i in range(25):
                k = kline(t=t, close=f"{100 + minute + i / 100:.2f}", n=i + 1)
                await produce.snapshot(k)
                await asyncio.sleep(0.01)
            final = kline(t=t, close=f"{100 + minute + 0.24:.2f}", n=25, final=True)
            await produce.final(final)
            produced.append(final)
        produced_for = time.monotonic() - start
        await wait_for(lambda: received and received[-1] == expected_k(produced[-1]), what="the last final")
        reader.cancel()
        kicked_at, closed = await asyncio.wait_for(watcher, 30)

        metrics = await gw.metrics()
        print(f"\nslow client disconnected {kicked_at:.1f} s into {produced_for:.1f} s of updates; metrics {metrics}")
        assert kicked_at < produced_for, "the slow client was not disconnected while the feed ran"
        assert metrics.get("clients_disconnected_slow") == 1, metrics
        assert metrics["updates_coalesced"] > 0, metrics
        # The slow client got the close frame with the reason.
        assert closed.rcvd is not None, "no close frame: the connection was dropped without a reason"
        assert closed.rcvd.code == 1008 and "too slow" in closed.rcvd.reason, closed.rcvd

        # The normal client: every final, in order, and every snapshot of a kline in order; low latency throughout.
        finals = [k for k in received if k["x"]]
        assert finals == [expected_k(k) for k in produced]
        order = [(k["t"], k["x"], k["n"]) for k in received]
        assert order == sorted(order)
        assert len(received) >= 0.5 * minutes * 26, "the normal client was coalesced heavily"
        latencies.sort()
        p99 = latencies[int(0.99 * (len(latencies) - 1))]
        print(f"normal client: {len(received)} updates, p50 {latencies[len(latencies) // 2]:.1f} ms, p99 {p99:.1f} ms")
        assert p99 < 1000, f"normal client p99 latency {p99:.0f} ms while a slow client stalled"
        assert metrics["clients"] == 1
        await normal.close()


async def test_history_on_subscribe_from_clickhouse(settings: Settings) -> None:
    client = clickhouse.connect(settings.clickhouse)
    clickhouse.apply_schema(client, settings.clickhouse)
    stored = [kline(t=T0 + m * 60_000, close=f"{100 + m}.5", n=m + 1, final=True) for m in range(8)]
    rows = [clickhouse.kline_row(k, version=0, partition=0, offset=m, token="t") for m, k in enumerate(stored)]
    clickhouse.insert_klines(client, settings.clickhouse, settings.clickhouse.finalized_table, rows, "history-test")
    async with running_gateway(settings, history="on") as gw, Producer(settings) as produce:
        current = kline(t=T0 + 8 * 60_000, close="109.25")
        await produce.snapshot(current)
        await wait_for(lambda: gw.gateway.board.current("BTCUSDT|1m") is not None, what="the current kline")
        ws = await connect(gw.url())
        reply = await request(ws, {"method": "SUBSCRIBE", "params": ["btcusdt@kline_1m"], "id": 1, "history": 5})
        assert reply == {"result": None, "id": 1}
        events = [(await recv_json(ws))["k"] for _ in range(6)]
        # The last 5 stored klines, oldest first (numerically equal: ClickHouse keeps Decimal(38, 18)), then now.
        for got, want in zip(events[:5], stored[-5:], strict=True):
            assert got["t"] == want.t and got["x"] is True
            assert Kline.from_dict({**got, "x": True}).same_values(want)
        assert events[5] == expected_k(current)
        too_many = await request(
            ws, {"method": "SUBSCRIBE", "params": ["ethusdt@kline_1m"], "id": 2, "history": 100_000}
        )
        assert too_many["error"]["code"] == 4
        metrics = await gw.metrics()
        assert metrics["history_source"] == "clickhouse" and metrics["history_requests"] == 1
        await ws.close()


async def test_history_from_memory_when_clickhouse_is_not_readable(settings: Settings) -> None:
    # The default for embedded chDB: the writers' process owns the directory, the gateway keeps recent finals.
    async with running_gateway(settings, recent_klines=3) as gw, Producer(settings) as produce:
        assert gw.gateway.source == "memory"
        finals = [kline(t=T0 + m * 60_000, close=f"{100 + m}.5", final=True) for m in range(5)]
        for k in finals:
            await produce.final(k)
        current = kline(t=T0 + 5 * 60_000, close="105.25")
        await produce.snapshot(current)
        await wait_for(lambda: gw.gateway.board.current("BTCUSDT|1m") is not None, what="the current kline")
        await wait_for(
            lambda: (gw.gateway.board.current("BTCUSDT|1m") or kline()).t == current.t, what="the latest kline"
        )
        ws = await connect(gw.url())
        await request(ws, {"method": "SUBSCRIBE", "params": ["btcusdt@kline_1m"], "id": 1, "history": 3})
        events = [(await recv_json(ws))["k"] for _ in range(4)]
        assert events == [expected_k(k) for k in finals[-3:]] + [expected_k(current)]
        await ws.close()


async def test_page_health_and_shutdown(settings: Settings) -> None:
    async with running_gateway(settings) as gw:
        base = f"http://127.0.0.1:{gw.port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/") as r:
                assert r.status == 200 and "lightweight-charts.standalone.production.js" in await r.text()
            async with http.get(base + "/static/lightweight-charts.standalone.production.js") as r:
                assert r.status == 200 and "TradingView Lightweight Charts" in await r.text()
            async with http.get(base + "/static/..%2Fserver.py") as r:
                assert r.status == 404
            async with http.get(base + "/api/streams") as r:
                catalog = await r.json()
                assert catalog["symbols"] == ["BTCUSDT", "ETHUSDT"] and "1m" in catalog["intervals"]
            async with http.get(base + "/healthz") as r:
                assert r.status == 200
            async with http.get(base + "/readyz") as r:
                assert r.status == 200 and (await r.json())["ready"] is True
            metrics = await gw.metrics()
            for name in ("clients", "subscriptions", "lag", "delivery_latency_ms_p99", "outbox_pending"):
                assert name in metrics
        ws = await connect(gw.url("/ws/btcusdt@kline_1m"))
        await wait_for(lambda: gw.gateway.clients, what="the client to be registered")
        # Leaving the block requests the stop: the client is closed with 1001.
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await recv_json(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert closed.value.rcvd.reason == "server shutting down"


# --- hardening: Origin allow-list, fuzzing ----------------------------------------------------------------------


async def test_origin_allow_list(settings: Settings) -> None:
    async with running_gateway(settings) as gw:
        own = f"http://127.0.0.1:{gw.port}"
        for origin in (own, None):  # the page's own origin; no Origin (a program, not a browser)
            ws = await connect(gw.url(), origin=origin)
            assert await request(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 1}) == {"result": [], "id": 1}
            await ws.close()
        for foreign in ("https://evil.example", f"http://127.0.0.1:{gw.port + 1}", "null"):
            with pytest.raises(websockets.InvalidStatus) as refused:
                await connect(gw.url("/stream?streams=btcusdt@kline_1m"), origin=foreign)
            assert refused.value.response.status_code == 403, foreign
            assert b"not allowed" in refused.value.response.body
    async with running_gateway(settings, allowed_origins=("https://Charts.Example",)) as gw:
        ws = await connect(gw.url(), origin="https://charts.example")
        await ws.close()
        with pytest.raises(websockets.InvalidStatus) as refused:
            await connect(gw.url(), origin=f"http://127.0.0.1:{gw.port}")  # listed origins only, once set
        assert refused.value.response.status_code == 403


def _frame(opcode: int, payload: bytes, *, fin: bool = True, length: int | None = None) -> bytes:
    """A masked client frame; ``length`` may claim more than ``payload`` holds."""
    import os as _os

    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    mask = _os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _raw_socket(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    status = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert status.startswith(b"HTTP/1.1 101"), status
    return reader, writer


async def test_fuzzed_clients_leave_the_gateway_serving_a_well_behaved_one(settings: Settings) -> None:
    import random

    rng = random.Random(20261203)
    async with running_gateway(settings, max_message_bytes=1024) as gw, Producer(settings) as produce:
        good = await connect(gw.url())
        assert await request(good, {"method": "SUBSCRIBE", "params": ["btcusdt@kline_1m"], "id": 1}) == {
            "result": None,
            "id": 1,
        }

        async def raw(frames: list[bytes], *, abort: bool, read: bool = True) -> None:
            try:
                reader, writer = await _raw_socket(gw.port)
                for frame in frames:
                    writer.write(frame)
                await writer.drain()
                if read:
                    with contextlib.suppress(TimeoutError, ConnectionError, asyncio.IncompleteReadError):
                        await asyncio.wait_for(reader.read(65536), 0.5)
                if abort:
                    writer.transport.abort()
                else:
                    writer.close()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass  # the gateway closed first: allowed

        def junk(n: int) -> bytes:
            return bytes(rng.getrandbits(8) for _ in range(n))

        cases: list[Any] = [
            raw([_frame(0x1, b"\xff\xfe\xfd invalid utf-8")], abort=False),
            raw([_frame(0x1, b"x" * 5000)], abort=False),  # over max_message_bytes
            raw([_frame(0x2, junk(300)) for _ in range(3)], abort=False),  # binary frames
            raw([_frame(0x1, b"{}", length=2**40)], abort=True),  # claims a 1 TB frame
            raw([junk(rng.randint(1, 400))], abort=True),  # bytes that are no frame at all
            raw([_frame(0x1, b'{"method": "SUBSCRIBE", "params": [', fin=False)], abort=True),  # cut mid-message
            raw([_frame(0x9, b"p" * 200)], abort=False),  # ping over 125 bytes: a protocol error
            raw([_frame(0x1, json.dumps({"method": "SUBSCRIBE", "id": i}).encode()) for i in range(200)], abort=False),
            raw([_frame(0x8, b"\x03\xe8bye")], abort=False),  # a close frame
            raw([], abort=True, read=False),  # upgrade, then gone
        ]
        for _ in range(30):  # random text and binary frames, random (also invalid) opcodes, sizes and cuts
            frames = [_frame(rng.choice([0x0, 0x1, 0x2, 0x3, 0xA, 0xF]), junk(rng.randint(0, 2000))) for _ in range(5)]
            cases.append(raw(frames, abort=rng.random() < 0.5))

        async def flood() -> None:
            ws = await connect(gw.url())
            with contextlib.suppress(websockets.ConnectionClosed):
                for i in range(500):
                    await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": i}))
                await ws.wait_closed()

        cases += [flood() for _ in range(5)]
        await asyncio.wait_for(asyncio.gather(*cases), 60)

        t = T0 + 5 * 60_000
        await produce.snapshot(kline("BTCUSDT", "1m", t, close="100.5"))
        while (event := await recv_json(good))["k"]["t"] != t:
            pass
        assert event["k"]["c"] == "100.5"
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{gw.port}/healthz") as health:
            assert health.status == 200
        await wait_for(lambda: len(gw.gateway.clients) == 1, 20, what="every fuzzing client to be gone")
        await good.close()


async def test_the_full_snapshot_holds_the_newest_kline_of_every_key(settings: Settings) -> None:
    """``/api/snapshot``: per symbol|interval the newest kline (a final beats its snapshots), filters, errors."""
    async with running_gateway(settings) as gw, Producer(settings) as produce, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{gw.port}/api/snapshot"
        btc_old = kline(close="100.1", n=1)
        btc_final = kline(close="100.2", n=2, final=True)
        btc_now = kline(t=T0 + 60_000, close="100.3", n=1)
        eth = kline(symbol="ETHUSDT", close="2000.5", n=4)
        eth_5m = kline(symbol="ETHUSDT", interval="5m", close="2000.5", n=4)
        await produce.snapshot(btc_old)
        await produce.final(btc_final)
        await produce.snapshot(btc_old)  # stale: its final is known
        newest = [await produce.snapshot(k) for k in (btc_now, eth, eth_5m)]

        async def full() -> dict[str, Any]:
            async with http.get(base) as r:
                assert r.status == 200
                body: dict[str, Any] = await r.json()
                return body

        await wait_for(lambda: len(gw.gateway.board) == 3, what="three keys on the board")
        body = await full()
        assert body["ready"] is True and body["count"] == 3
        assert body["as_of_ms"] == max(newest)
        assert body["klines"] == [expected_k(btc_now), expected_k(eth), expected_k(eth_5m)]

        async with http.get(base, params={"symbol": "ethusdt", "interval": "5m"}) as r:
            assert (await r.json())["klines"] == [expected_k(eth_5m)]
        async with http.get(base, params={"symbol": "BTCUSDT", "interval": "1m"}) as r:
            assert (await r.json())["klines"] == [expected_k(btc_now)]
        async with http.get(base, params={"interval": "7m"}) as r:
            assert r.status == 400 and "unknown interval '7m'" in (await r.json())["error"]
        await produce.final(kline(t=T0 + 60_000, close="100.4", n=2, final=True))
        await wait_for(lambda: _final_of(gw, "BTCUSDT|1m", T0 + 60_000), what="the final of minute 2")
        async with http.get(base, params={"symbol": "BTCUSDT", "interval": "1m"}) as r:
            [k] = (await r.json())["klines"]
            assert k == expected_k(kline(t=T0 + 60_000, close="100.4", n=2, final=True))


def _final_of(gw: Running, key: str, t: int) -> bool:
    current = gw.gateway.board.current(key)
    return current is not None and current.final and current.t == t
