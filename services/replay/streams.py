"""Binance market-stream WebSocket endpoints: connections, subscriptions, pings, and fast batched sending.

Paths (``prefix`` is empty on spot and ``/market`` on USD-M futures):

* ``{prefix}/stream?streams=btcusdt@aggTrade/ethusdt@aggTrade`` — combined: ``{"stream":..., "data":...}``;
* ``{prefix}/ws/btcusdt@aggTrade[/ethusdt@aggTrade...]`` — raw payloads;
* ``{prefix}/ws`` — raw, subscriptions by control message.

On USD-M futures the unrouted paths (``/stream``, ``/ws``) behave like Binance since 2026-04: they accept
connections and subscriptions and deliver nothing.

Control messages (JSON text frames): ``SUBSCRIBE``/``UNSUBSCRIBE`` with ``params`` = stream names, answered
``{"result":null,"id":...}``; ``LIST_SUBSCRIPTIONS``; ``SET_PROPERTY``/``GET_PROPERTY`` ``combined``. Errors are
``{"error":{"code":...,"msg":...},"id":...}`` (code 2 invalid request, 3 invalid JSON). Stream names must be
lower-case (``btcusdt@aggTrade``); streams of unknown symbols or other types are accepted and stay silent. More
than ``max_streams_per_connection`` streams, or more than the venue's control messages per second, gets an
error and a close (1008).

The server pings every ``ping_interval_s`` and closes a connection whose ping stays unanswered (a pong with
the same payload) for ``pong_timeout_s``. With ``max_connection_age_s`` (Binance: 24 h) it closes connections
that old (1001), so clients can test their planned reconnection.

Sending is built for throughput: the publisher hands each connection ready-made JSON strings, and a per-connection
writer task frames a whole batch into one buffer and writes it to the transport in one call (aiohttp's
``send_str`` costs an await and a write per frame, ~5x slower). Writes happen only between awaits, so they never
interleave with the pings, pongs and close frames aiohttp writes on the same transport.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from aiohttp import WSMsgType, web

from services.replay.batch import Batch
from services.replay.config import ReplayConfig
from services.replay.tape import MarketTape

_STREAM_NAME = re.compile(r"^[a-z0-9_.\-]+@[A-Za-z0-9_@]+$")
_LEN2 = struct.Struct("!BBH").pack
_LEN3 = struct.Struct("!BBQ").pack
_WRITE_HIGH_WATER = 4 << 20  # bytes in the transport buffer before the writer waits
_MAX_FRAMES_PER_WRITE = 8192
_FAST_MODE_HIGH_FRAMES = 50_000  # fast mode: the publisher waits while a connection is this far behind
_CLOSE_TIMEOUT_S = 2.0


_HEADERS: dict[int, str] = {}


def _header(n: int) -> str:
    """The header of an unmasked, final text frame of ``n`` bytes, as a latin-1 string (one char per byte)."""
    header = _HEADERS.get(n)
    if header is None:
        if n < 126:
            raw = bytes((0x81, n))
        elif n < 65536:
            raw = _LEN2(0x81, 126, n)
        else:
            raw = _LEN3(0x81, 127, n)
        header = raw.decode("latin-1")
        if n < 65536:
            _HEADERS[n] = header
    return header


Chunk = tuple[Sequence[int] | None, list[str]]
"""Queued frames: (symbol indexes to wrap them in the combined envelope, or None for as-is; ASCII texts)."""


def encode_chunks(chunks: Iterable[Chunk], prefixes: Sequence[str]) -> bytes:
    """Unmasked WebSocket text frames (server → client) for ``chunks``, in one buffer.

    Every text is ASCII (trade payloads are checked when the tape is built; control replies come from
    ``json.dumps``, which escapes), so a character is a byte: frames are assembled as one string and encoded
    once, instead of encoding and framing each message separately.
    """
    parts: list[str] = []
    append = parts.append
    for symbols, texts in chunks:
        if symbols is None:
            for text in texts:
                append(_header(len(text)))
                append(text)
        else:
            for index, text in zip(symbols, texts, strict=True):
                prefix = prefixes[index]
                append(_header(len(prefix) + len(text) + 1))
                append(prefix)
                append(text)
                append("}")
    return "".join(parts).encode("latin-1")


def encode_text_frames(messages: list[str]) -> bytes:
    """Frames for plain ASCII ``messages`` (see :func:`encode_chunks`)."""
    return encode_chunks([(None, messages)], ())


def _error(code: int, msg: str, request_id: Any) -> str:
    return json.dumps({"error": {"code": code, "msg": msg}, "id": request_id}, separators=(",", ":"))


class ProtocolViolation(Exception):
    """The client broke a connection limit; the connection is closed with ``reason``."""

    def __init__(self, reply: str, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason


class Connection:
    """One client WebSocket: its subscriptions, its outgoing frames, and its writer and pinger tasks."""

    def __init__(
        self,
        hub: StreamHub,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport,
        *,
        combined: bool,
        silent: bool,
    ) -> None:
        self.hub = hub
        self.ws = ws
        self.transport = transport
        self.combined = combined
        self.silent = silent
        self.streams: dict[str, None] = {}  # an ordered set, for LIST_SUBSCRIPTIONS
        self.symbols: set[int] = set()
        self.pending: list[Chunk] = []
        self.pending_frames = 0
        self.sent_frames = 0
        self.stalled_until = 0.0
        self.closing = False
        self._wake = asyncio.Event()
        self._control_times: deque[float] = deque()
        self._pings: dict[bytes, float] = {}
        self._ping_seq = 0
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ outgoing
    def deliver(self, batch: Batch) -> None:
        """Queue the trade frames of the symbols this connection subscribes to (no copy when it has them all)."""
        subscribed = self.symbols
        if self.silent or not subscribed or self.closing or not len(batch):
            return
        symbols: Sequence[int]
        if len(subscribed) == len(self.hub.prefixes):
            symbols, texts = batch.symbols, batch.payloads
        else:
            pairs = [(s, p) for s, p in zip(batch.symbols, batch.payloads, strict=True) if s in subscribed]
            if not pairs:
                return
            symbols, texts = [s for s, _ in pairs], [p for _, p in pairs]
        self._queue((symbols if self.combined else None, texts))

    def send_text(self, text: str) -> None:
        """Queue one ASCII text frame (a control reply or an event), in order with the trade frames."""
        if not text.isascii():
            raise ValueError("frames must be ASCII (use json.dumps)")
        self._queue((None, [text]))

    def send_trade_text(self, symbol_index: int, payload: str) -> None:
        """Queue one trade-stream text as this connection frames it (combined envelope or raw)."""
        self._queue(([symbol_index] if self.combined else None, [payload]))

    def _queue(self, chunk: Chunk) -> None:
        if self.closing:
            return
        self.pending.append(chunk)
        self.pending_frames += len(chunk[1])
        self._wake.set()

    @property
    def stalled(self) -> bool:
        """Inside an injected stall."""
        return self.hub.monotonic() < self.stalled_until

    def _take(self, max_frames: int | None) -> list[Chunk]:
        """Dequeue whole chunks up to about ``max_frames`` frames (at least one chunk; None = everything)."""
        if max_frames is None or self.pending_frames <= max_frames:
            chunks, self.pending, self.pending_frames = self.pending, [], 0
            return chunks
        taken = 0
        count = 0
        for count, (_, texts) in enumerate(self.pending, start=1):  # noqa: B007 - count is used after the loop
            taken += len(texts)
            if taken >= max_frames:
                break
        chunks = self.pending[:count]
        del self.pending[:count]
        self.pending_frames -= taken
        return chunks

    def _write_now(self, chunks: list[Chunk]) -> None:
        if chunks and not self.transport.is_closing():
            self.transport.write(encode_chunks(chunks, self.hub.prefixes))
            self.sent_frames += sum(len(texts) for _, texts in chunks)

    async def _write_loop(self) -> None:
        while not self.closing:
            await self._wake.wait()
            self._wake.clear()
            while self.pending and not self.closing:
                delay = self.stalled_until - self.hub.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                    continue
                if self.transport.is_closing():
                    return
                # Synchronous from dequeue to write: nothing can slip in between, so order is kept.
                self._write_now(self._take(_MAX_FRAMES_PER_WRITE))
                while self.transport.get_write_buffer_size() > _WRITE_HIGH_WATER and not self.closing:
                    if self.transport.is_closing():
                        return
                    await asyncio.sleep(0.001)

    # ------------------------------------------------------------------ pings
    async def _ping_loop(self) -> None:
        config = self.hub.config
        max_age = config.max_connection_age_s
        tick = min(config.ping_interval_s, config.pong_timeout_s, max_age or math.inf) / 2
        opened = self.hub.monotonic()
        next_ping = opened + config.ping_interval_s
        while not self.closing:
            await asyncio.sleep(tick)
            now = self.hub.monotonic()
            if max_age is not None and now - opened >= max_age:
                self.hub.spawn(self.close(1001, "connection lifetime reached"))
                return
            if now < self.stalled_until:
                next_ping = max(next_ping, self.stalled_until)
                continue
            if self._pings and now - min(self._pings.values()) > config.pong_timeout_s:
                self.hub.spawn(self.close(1008, "pong timeout"))
                return
            if now >= next_ping:
                self._ping_seq += 1
                payload = str(self._ping_seq).encode()
                self._pings[payload] = now
                next_ping = now + config.ping_interval_s
                try:
                    await self.ws.ping(payload)
                except (ConnectionError, RuntimeError):
                    return

    def on_pong(self, payload: bytes) -> None:
        """A pong answers its ping and every older one; unsolicited pongs answer nothing."""
        sent = self._pings.get(payload)
        if sent is not None:
            self._pings = {p: t for p, t in self._pings.items() if t > sent}

    # ------------------------------------------------------------------ control messages
    def handle_control(self, text: str) -> str:
        """Answer one control message; raises :class:`ProtocolViolation` when the connection must close."""
        now = self.hub.monotonic()
        window = self._control_times
        window.append(now)
        while window and window[0] <= now - 1.0:
            window.popleft()
        limit = self.hub.config.control_messages_per_s
        if len(window) > limit:
            raise ProtocolViolation(
                _error(2, f"Too many requests: more than {limit} messages per second", None),
                "too many messages",
            )
        try:
            request = json.loads(text)
        except ValueError as exc:
            return _error(3, f"Invalid JSON: {exc}", None)
        if not isinstance(request, dict):
            return _error(2, "Invalid request: expected a JSON object", None)
        request_id = request.get("id")
        if "id" not in request or not (
            request_id is None or isinstance(request_id, str) or (type(request_id) is int and request_id >= 0)
        ):
            return _error(2, "Invalid request: request ID must be an unsigned integer or a string", None)
        method = request.get("method")
        params = request.get("params", [])
        if not isinstance(params, list):
            return _error(2, "Invalid request: params must be a list", request_id)
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            if not params or not all(isinstance(p, str) for p in params):
                return _error(2, "Invalid request: params must be a non-empty list of stream names", request_id)
            bad = [p for p in params if not _STREAM_NAME.match(p)]
            if bad:
                return _error(2, f"Invalid request: invalid stream name {bad[0]!r} (lower-case symbol)", request_id)
            if method == "SUBSCRIBE":
                self.subscribe(params, request_id)
            else:
                self.unsubscribe(params)
            return json.dumps({"result": None, "id": request_id}, separators=(",", ":"))
        if method == "LIST_SUBSCRIPTIONS":
            return json.dumps({"result": list(self.streams), "id": request_id}, separators=(",", ":"))
        if method in ("SET_PROPERTY", "GET_PROPERTY"):
            if not params or params[0] != "combined":
                return _error(0, "Unknown property", request_id)
            if method == "GET_PROPERTY":
                return json.dumps({"result": self.combined, "id": request_id}, separators=(",", ":"))
            if len(params) != 2 or type(params[1]) is not bool:
                return _error(1, "Invalid value type: expected Boolean", request_id)
            self.combined = params[1]
            return json.dumps({"result": None, "id": request_id}, separators=(",", ":"))
        return _error(
            2,
            f"Invalid request: unknown method {str(method)[:40]!r}, expected one of SUBSCRIBE, UNSUBSCRIBE, "
            "LIST_SUBSCRIPTIONS, SET_PROPERTY, GET_PROPERTY",
            request_id,
        )

    def subscribe(self, names: list[str], request_id: Any = None) -> None:
        """Add streams; raises :class:`ProtocolViolation` beyond the per-connection stream limit."""
        limit = self.hub.config.max_streams_per_connection
        new = [n for n in dict.fromkeys(names) if n not in self.streams]
        if len(self.streams) + len(new) > limit:
            raise ProtocolViolation(
                _error(2, f"Invalid request: too many streams; at most {limit} per connection", request_id),
                "too many streams",
            )
        for name in new:
            self.streams[name] = None
        self._refresh_symbols()

    def unsubscribe(self, names: list[str]) -> None:
        """Remove streams (unknown ones are ignored, as on Binance)."""
        for name in names:
            self.streams.pop(name, None)
        self._refresh_symbols()

    def _refresh_symbols(self) -> None:
        symbols = set()
        for name in self.streams:
            symbol, _, kind = name.partition("@")
            tape = self.hub.tape.get(symbol.upper())
            if kind == "aggTrade" and tape is not None:
                symbols.add(tape.index)
        self.symbols = symbols
        if symbols and not self.silent:
            self.hub.on_subscribed()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the writer and pinger."""
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="replay-ws-writer"),
            asyncio.create_task(self._ping_loop(), name="replay-ws-pinger"),
        ]

    async def stop_tasks(self) -> None:
        """Cancel the writer and pinger and wait for them."""
        self.closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self, code: int, reason: str, *, flush: bool = True) -> None:
        """Send what is queued (unless stalled), then a close frame; the handler's loop then ends."""
        if self.closing:
            return
        if flush and not self.stalled:
            self._write_now(self._take(None))
        self.closing = True
        self._wake.set()
        try:
            await self.ws.close(code=code, message=reason.encode())
        except (ConnectionError, RuntimeError):
            self.transport.abort()

    def abort(self) -> None:
        """Drop the TCP connection without a close frame."""
        self.closing = True
        self._wake.set()
        self.transport.abort()


class StreamHub:
    """All live connections; fans published frames out to them."""

    def __init__(
        self,
        config: ReplayConfig,
        tape: MarketTape,
        *,
        monotonic: Callable[[], float],
        on_first_subscription: Callable[[], None],
    ) -> None:
        self.config = config
        self.tape = tape
        self.monotonic = monotonic
        self.connections: set[Connection] = set()
        self.prefixes = [f'{{"stream":"{t.symbol.lower()}@aggTrade","data":' for t in tape.by_index]
        self._on_first_subscription: Callable[[], None] | None = on_first_subscription
        self._background: set[asyncio.Task[None]] = set()

    def on_subscribed(self) -> None:
        """A connection subscribed to a listed symbol: start the feed if it waits for that (with
        ``autostart="on_all_subscribed"``, for every listed symbol to be subscribed by some connection)."""
        if self._on_first_subscription is None:
            return
        if self.config.autostart == "on_all_subscribed":
            covered: set[int] = set()
            for conn in self.connections:
                if not conn.silent:
                    covered |= conn.symbols
            if len(covered) < len(self.tape.by_index):
                return
        callback, self._on_first_subscription = self._on_first_subscription, None
        if callback is not None:
            callback()

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background, keeping a reference until it finishes."""
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ fan-out
    def broadcast(self, batch: Batch) -> None:
        """Hand published frames to every connection; in real-time mode drop a hopelessly slow one."""
        limit = self.config.max_pending_frames
        for conn in list(self.connections):
            conn.deliver(batch)
            if conn.pending_frames > limit and self.config.speed != 0 and not conn.closing:
                self.spawn(conn.close(1008, "slow consumer", flush=False))

    async def wait_for_room(self) -> None:
        """Fast mode: wait while a (non-stalled) connection is far behind, so it loses nothing."""
        while True:
            behind = [
                c
                for c in self.connections
                if not c.closing and c.pending_frames > _FAST_MODE_HIGH_FRAMES and not c.stalled
            ]
            if not behind:
                return
            await asyncio.sleep(0.001)

    # ------------------------------------------------------------------ faults
    def drop_all(self) -> int:
        """Abort every connection."""
        conns = list(self.connections)
        for conn in conns:
            conn.abort()
        return len(conns)

    def stall_all(self, seconds: float) -> int:
        """Stall every current connection for ``seconds``."""
        until = self.monotonic() + seconds
        for conn in self.connections:
            conn.stalled_until = max(conn.stalled_until, until)
        return len(self.connections)

    def send_malformed(self, payloads: dict[int, str]) -> int:
        """Queue one malformed frame per connection, for a symbol it subscribes to."""
        sent = 0
        for conn in self.connections:
            if conn.silent:
                continue
            for symbol_index, payload in payloads.items():
                if symbol_index in conn.symbols:
                    conn.send_trade_text(symbol_index, payload)
                    sent += 1
                    break
        return sent

    def server_shutdown(self, market_time_ms: int, close_after_s: float | None) -> int:
        """``serverShutdown`` to every connection, then close them after the delay."""
        delay = self.config.server_shutdown_close_after_s if close_after_s is None else close_after_s
        event = json.dumps({"e": "serverShutdown", "E": market_time_ms}, separators=(",", ":"))
        conns = list(self.connections)
        for conn in conns:
            conn.send_text(event)

        async def close_later() -> None:
            await asyncio.sleep(delay)
            await asyncio.gather(*(c.close(1001, "server shutdown") for c in conns), return_exceptions=True)

        self.spawn(close_later())
        return len(conns)

    async def close_all(self) -> None:
        """Close every connection (going away) and wait for their tasks; used by ``stop()``."""
        conns = list(self.connections)
        await asyncio.gather(*(c.close(1001, "exchange stopping") for c in conns), return_exceptions=True)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    # ------------------------------------------------------------------ aiohttp handler
    def handler(self, *, silent: bool) -> Callable[[web.Request], Any]:
        """The aiohttp handler for ``/stream``, ``/ws`` and ``/ws/{streams}`` (one prefix)."""

        async def handle(request: web.Request) -> web.StreamResponse:
            path = request.match_info.get("streams", "")
            combined = request.path.endswith("/stream")
            names: list[str] = []
            if combined:
                raw = request.query.get("streams", "")
                names = [n for n in raw.split("/") if n]
            elif path:
                names = [n for n in path.split("/") if n]
            bad = [n for n in names if not _STREAM_NAME.match(n)]
            if bad:
                return web.json_response({"code": 2, "msg": f"Invalid stream name {bad[0]!r}"}, status=400)
            limit = self.config.max_streams_per_connection
            if len(set(names)) > limit:
                return web.json_response({"code": 2, "msg": f"Too many streams; at most {limit}"}, status=400)
            return await self._serve(request, names, combined=combined, silent=silent)

        return handle

    async def _serve(
        self, request: web.Request, names: list[str], *, combined: bool, silent: bool
    ) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False, compress=False, timeout=_CLOSE_TIMEOUT_S, max_msg_size=1 << 20)
        await ws.prepare(request)
        transport = request.transport
        if transport is None:
            return ws
        conn = Connection(self, ws, transport, combined=combined, silent=silent)
        self.connections.add(conn)
        conn.start()
        try:
            if names:
                conn.subscribe(names)
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    try:
                        conn.send_text(conn.handle_control(msg.data))
                    except ProtocolViolation as violation:
                        conn.send_text(violation.reply)
                        await conn.close(1008, violation.reason)
                        break
                elif msg.type is WSMsgType.PING:
                    await ws.pong(msg.data)
                elif msg.type is WSMsgType.PONG:
                    conn.on_pong(bytes(msg.data))
                elif msg.type is WSMsgType.BINARY:
                    conn.send_text(_error(3, "Invalid JSON: binary frames are not accepted", None))
        except ConnectionError:
            pass  # the client vanished; nothing to tell it
        finally:
            self.connections.discard(conn)
            await conn.stop_tasks()
        return ws
