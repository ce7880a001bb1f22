"""Smaller parts of ingest: symbol selection, recovery decoding, connection helpers, pings answered."""

from __future__ import annotations

import asyncio
import random

import pytest
from aiohttp import WSMsgType, web
from aiokafka.partitioner import DefaultPartitioner

from services.ingest.connections import Backoff, ConnectionOptions, ConnectionStats, StreamConnection, stream_base
from services.ingest.recovery import last_id_of, partition_for
from services.ingest.rest import SymbolInfo
from services.ingest.symbols import SymbolRequestError, SymbolSelection, tradable
from services.shared.messages import Gap, SymbolEvent, encode_gap, encode_symbol_event, encode_trade_batch

pytestmark = pytest.mark.unit


def test_symbol_selection_overlays_survive_a_new_base() -> None:
    sel = SymbolSelection(base={"BTCUSDT", "ETHUSDT"})
    sel.apply({"add": ["solusdt"], "remove": ["ETHUSDT"]})
    assert sel.wanted == {"BTCUSDT", "SOLUSDT"}
    sel.set_base({"ETHUSDT", "XRPUSDT"})  # a discovery refresh
    assert sel.wanted == {"XRPUSDT", "SOLUSDT"}
    sel.apply({"add": ["ETHUSDT"]})
    assert sel.wanted == {"XRPUSDT", "SOLUSDT", "ETHUSDT"}
    sel.apply({"symbols": ["DOGEUSDT"]})
    assert sel.wanted == {"DOGEUSDT"} and not sel.added and not sel.removed


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "empty request"),
        ({"add": "BTCUSDT"}, "must be a list"),
        ({"add": ["BTC-USDT"]}, "is not a symbol"),
        ({"add": [5]}, "is not a symbol"),
        ({"add": ["BTCUSDT"], "remove": ["btcusdt"]}, "both added and removed"),
        ({"replace": []}, "unknown keys"),
    ],
)
def test_symbol_requests_are_validated(body: dict[str, object], message: str) -> None:
    sel = SymbolSelection(base={"BTCUSDT"})
    with pytest.raises(SymbolRequestError, match=message):
        sel.apply(body)
    assert sel.wanted == {"BTCUSDT"}


def test_discovery_keeps_trading_symbols_of_the_quote_asset() -> None:
    infos = [
        SymbolInfo("BTCUSDT", "TRADING", "USDT"),
        SymbolInfo("ETHBTC", "TRADING", "BTC"),
        SymbolInfo("LUNAUSDT", "BREAK", "USDT"),
    ]
    assert tradable(infos, "usdt") == {"BTCUSDT"}
    assert tradable(infos, "") == {"BTCUSDT", "ETHBTC"}


def test_recovery_reads_the_last_id_of_each_record_kind() -> None:
    from services.core.models import AggTrade

    trades = [AggTrade("BTCUSDT", a, "1", "1", a, a, 1_767_225_600_000, True) for a in (5, 6, 7)]
    assert last_id_of(encode_trade_batch("BTCUSDT", trades)) == ("BTCUSDT", 7)
    assert last_id_of(encode_gap(Gap("BTCUSDT", 8, 12, "x"))) == ("BTCUSDT", 12)
    raw = b'{"e":"aggTrade","s":"ethusdt","a":42,"p":"1","q":"1","f":1,"l":1,"T":1767225600000,"m":true}'
    assert last_id_of(raw) == ("ETHUSDT", 42)
    removed = SymbolEvent("BTCUSDT", "removed", 12, "POST /symbols")
    assert last_id_of(encode_symbol_event(removed)) == ("BTCUSDT", 12)
    for junk in (
        None,
        b"",
        b"[]",
        b'{"type":"trades","s":"X","trades":[]}',
        b'{"type":"gap","s":"X"}',
        encode_symbol_event(SymbolEvent("BTCUSDT", "added", None, "POST /symbols")),  # nothing published before
        b'{"type":"trades","s":"BTC-USDT","trades":[{"a":1}]}',
        b"[" * 50_000,
    ):
        assert last_id_of(junk) is None


def test_partition_matches_the_producers_partitioner() -> None:
    for symbol in ("BTCUSDT", "ETHUSDT", "SOLUSDT", "1000PEPEUSDT"):
        for n in (1, 3, 6, 12):
            assert partition_for(symbol, n) == DefaultPartitioner()(symbol.encode(), list(range(n)), [])


def test_stream_base_uses_the_routed_futures_path() -> None:
    assert stream_base("wss://stream.binance.com:9443", "spot") == "wss://stream.binance.com:9443/stream"
    assert stream_base("wss://fstream.binance.com/", "usdm") == "wss://fstream.binance.com/market/stream"
    assert stream_base("wss://fstream.binance.com/market", "usdm") == "wss://fstream.binance.com/market/stream"


def test_backoff_is_jittered_and_capped() -> None:
    backoff = Backoff(0.5, 4.0, random.Random(1))
    delays = [backoff.next_delay() for _ in range(50)]
    assert all(0 <= d <= 4.0 for d in delays)
    assert max(delays[:1]) <= 0.5 and max(delays[10:]) > 1.0
    assert len(set(delays)) == len(delays)
    backoff.reset()
    assert backoff.next_delay() <= 0.5


class _Sink:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def on_frames(self, raws: list[bytes], conn: StreamConnection) -> bool:
        assert raws, "the sink is only called with frames"
        self.frames.extend(raws)
        return False

    async def wait_for_room(self) -> None:
        return None


async def test_server_pings_are_answered_while_reading() -> None:
    """Binance pings and drops a connection whose pong does not come: the client must answer every ping."""
    pongs: list[bytes] = []
    query: list[str] = []

    async def handler(request: web.Request) -> web.WebSocketResponse:
        query.append(request.query.get("streams", ""))
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        for i in range(3):
            await ws.ping(f"p{i}".encode())
            msg = await asyncio.wait_for(ws.receive(), 2)
            assert msg.type is WSMsgType.PONG
            pongs.append(bytes(msg.data))
            await ws.send_str(f'{{"n":{i}}}')
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/stream", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sink = _Sink()
    try:
        conn = StreamConnection(
            "test",
            f"ws://127.0.0.1:{runner.addresses[0][1]}/stream",
            {"btcusdt@aggTrade", "ethusdt@aggTrade"},
            sink,
            clock=asyncio.get_running_loop().time,
            options=ConnectionOptions(ping_interval_s=60),
            control_interval_s=0.25,
            on_event=lambda: None,
            stats=ConnectionStats(),
        )
        await conn.open()
        await asyncio.wait_for(conn.done.wait(), 5)
        await conn.close()
    finally:
        await runner.cleanup()
    assert pongs == [b"p0", b"p1", b"p2"]
    assert sink.frames == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
    assert query == ["btcusdt@aggTrade/ethusdt@aggTrade"]


def test_recovery_fast_path_agrees_with_decoding() -> None:
    from services.core.models import AggTrade

    for count in (1, 2, 1000):
        trades = [
            AggTrade("BTCUSDT", a, "87650.12", "0.004", a, a + 3, 1_767_225_600_000, a % 2 == 0)
            for a in range(10, 10 + count)
        ]
        raw = encode_trade_batch("BTCUSDT", trades)
        assert last_id_of(raw) == ("BTCUSDT", 9 + count)
    # Another layout of the same record (hand-written, other key order) falls back to decoding.
    assert last_id_of(b'{"type":"trades","s":"BTCUSDT","trades":[{"p":"1","a":5}]}') == ("BTCUSDT", 5)
    assert last_id_of(b'{"type":"trades","s":"BTCUSDT","trades":[{"a":7,"p":"1"}], "x":1}') == ("BTCUSDT", 7)


class _Letters:
    inflight_trades = 0

    def __init__(self) -> None:
        self.letters: list[tuple[bytes | None, bytes]] = []

    def dead_letter(self, key: bytes | None, value: bytes) -> None:
        self.letters.append((key, value))


def test_frames_for_symbols_not_followed() -> None:
    """Unknown symbol: dead-lettered with the reason. Just unsubscribed: frames still in flight, dropped quietly."""
    import json
    from types import SimpleNamespace

    from services.ingest.service import IngestService
    from services.shared.settings import Settings

    service = IngestService(Settings())
    letters = _Letters()
    service.publisher = letters  # type: ignore[assignment]
    conn = SimpleNamespace(last_frame_at=100.0, name="c#1", base_url="ws://x/stream")

    def frame(symbol: str, a: int) -> bytes:
        data = {
            "e": "aggTrade",
            "s": symbol,
            "a": a,
            "p": "1",
            "q": "1",
            "f": a,
            "l": a,
            "T": 1_767_225_600_000,
            "m": True,
        }
        return json.dumps({"stream": f"{symbol.lower()}@aggTrade", "data": data}).encode()

    service.sequencer.track("BTCUSDT", 0)
    service.sequencer.track("SOLUSDT", 0)
    service.on_frames([frame("BTCUSDT", 1), frame("ETHUSDT", 1)], conn)  # type: ignore[arg-type]
    service.sequencer.untrack("SOLUSDT")
    service._removed_at["SOLUSDT"] = 99.0
    service.on_frames([frame("SOLUSDT", 1), b"\x00garbage"], conn)  # type: ignore[arg-type]
    assert service.trades_received == 3 and service.sequencer.last("BTCUSDT") == 1
    assert service.counts["frames_unsubscribed"] == 1 and service.counts["frames_rejected"] == 2
    keys = [key for key, _ in letters.letters]
    reasons = [json.loads(value)["reason"] for _, value in letters.letters]
    assert keys == [b"ETHUSDT", None]
    assert reasons[0] == "symbol ETHUSDT is not subscribed" and reasons[1].startswith("not JSON")
    assert [json.loads(value)["category"] for _, value in letters.letters] == ["symbol", "malformed"]
    assert {k: n for k, n in service.dead_letters_by_reason.items() if n} == {"symbol": 1, "malformed": 1}
    assert json.loads(letters.letters[1][1])["value"] == "\x00garbage"


def _frame(payload: bytes, opcode: int = 0x1, fin: bool = True) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        return head + bytes([n]) + payload
    if n < 65536:
        return head + bytes([126]) + n.to_bytes(2, "big") + payload
    return head + bytes([127]) + n.to_bytes(8, "big") + payload


async def test_frames_split_anywhere_fragmented_or_large_arrive_whole_and_in_order() -> None:
    """ingest splits the byte stream into frames itself: every way a server can cut and mix frames."""
    big = b'{"x":"' + b"y" * 70_000 + b'"}'
    medium = b'{"x":"' + b"z" * 300 + b'"}'
    stream = (
        _frame(b'{"n":1}')
        + _frame(b"p1", opcode=0x9)  # ping: the library answers it
        + _frame(medium)
        + _frame(b'{"n":', fin=False)  # a fragmented text message ...
        + _frame(b"p2", opcode=0x9)  # ... with a ping between its fragments
        + _frame(b"2}", opcode=0x0)
        + _frame(big)
        + _frame(b'{"n":3}')
    )
    pongs: list[bytes] = []

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        transport = request.transport
        assert transport is not None
        for cut in range(0, len(stream), 7919):  # a prime: cuts land in headers, lengths and payloads
            transport.write(stream[cut : cut + 7919])
            await asyncio.sleep(0.001)
        transport.write(stream[:3])  # a lone partial header, completed below
        await asyncio.sleep(0.01)
        transport.write(stream[3:9])
        for _ in range(2):
            msg = await asyncio.wait_for(ws.receive(), 2)
            assert msg.type is WSMsgType.PONG
            pongs.append(bytes(msg.data))
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/stream", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sink = _Sink()
    try:
        conn = StreamConnection(
            "test",
            f"ws://127.0.0.1:{runner.addresses[0][1]}/stream",
            {"btcusdt@aggTrade"},
            sink,
            clock=asyncio.get_running_loop().time,
            options=ConnectionOptions(ping_interval_s=60),
            control_interval_s=0.25,
            on_event=lambda: None,
            stats=ConnectionStats(),
        )
        await conn.open()
        await asyncio.wait_for(conn.done.wait(), 5)
        await conn.close()
    finally:
        await runner.cleanup()
    assert pongs == [b"p1", b"p2"]
    assert sink.frames == [b'{"n":1}', medium, b'{"n":2}', big, b'{"n":3}', b'{"n":1}']
    assert conn.close_reason.startswith("closed by the server (1000")


def _binance_frame(symbol: str, a: int) -> bytes:
    """A frame in Binance's exact combined-stream layout (the parser's fast path)."""
    return (
        f'{{"stream":"{symbol.lower()}@aggTrade","data":{{"e":"aggTrade","E":1767225600123,"s":"{symbol}",'
        f'"a":{a},"p":"87650.12","q":"0.004","f":{a},"l":{a},"T":1767225600100,"m":true,"M":true}}}}'
    ).encode()


def test_a_chunk_of_frames_is_sequenced_in_order_whatever_path_each_takes() -> None:
    """One call per chunk: fast-path frames, a frame in another layout, a control reply and a frame of a symbol
    not followed, in one list; trades reach the outbox in order, the rest is handled as one by one; the answer
    says whether the queue is full."""
    import dataclasses
    import json
    from types import SimpleNamespace

    from services.ingest.frames import WireTrade
    from services.ingest.service import IngestService
    from services.shared.settings import Settings

    settings = Settings()
    service = IngestService(
        settings.model_copy(update={"persistence": settings.persistence.model_copy(update={"queue_size": 4})})
    )
    letters = _Letters()
    service.publisher = letters  # type: ignore[assignment]
    conn = SimpleNamespace(last_frame_at=100.0, name="c#1", base_url="ws://x/stream")
    service.sequencer.track("BTCUSDT", 0)
    spaced = json.dumps(json.loads(_binance_frame("BTCUSDT", 2)), indent=1).encode()  # the general path
    chunk = [_binance_frame("BTCUSDT", 1), spaced, b'{"result":null,"id":1}', _binance_frame("ETHUSDT", 7)]
    assert service.on_frames(chunk, conn) is False  # type: ignore[arg-type]
    assert service.on_frames([_binance_frame("BTCUSDT", 3)], conn) is False  # type: ignore[arg-type]
    assert service.trades_received == 4 and service.depth == 3
    items = service.outbox.take()["BTCUSDT"]
    assert [i.a for i in items if isinstance(i, WireTrade)] == [1, 2, 3]
    first, second = items[0].trade(), items[1].trade()  # type: ignore[union-attr]
    assert second == dataclasses.replace(first, a=2, f=2, l=2), "the general path publishes the same fields"
    assert [key for key, _ in letters.letters] == [b"ETHUSDT"]
    assert json.loads(letters.letters[0][1])["reason"] == "symbol ETHUSDT is not subscribed"
    full = [_binance_frame("BTCUSDT", a) for a in range(4, 8)]
    assert service.on_frames(full, conn) is True, "queue_size 4 reached: the connection must stop reading"  # type: ignore[arg-type]
