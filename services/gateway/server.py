"""The gateway process: aiohttp WebSocket fan-out of live klines, the chart page, health, and shutdown.

One aiohttp app on ``gateway.http_port`` serves everything: ``/`` (the chart page) and ``/static/*``,
``/api/streams`` (what can be subscribed to), ``/api/snapshot`` (every current kline, across all aggregator
workers), the WebSockets ``/ws``, ``/ws/<streams>`` and ``/stream``,
and ``/healthz``, ``/readyz`` (the feed has read back and is live), ``/metrics``.

Fan-out (:meth:`Gateway.deliver`, called by the feed for each record) never awaits: the board decides whether
the update is news, then it is offered to each subscriber's outbox. One dispatcher task then sends, inline,
to every client whose socket takes the bytes at once (no task switch per client per message); a client whose
socket buffer is filling is handed to its own writer task, which waits for that socket alone. A client that
stops reading keeps its writer waiting, its outbox coalesces, and it is disconnected (1008, with the reason)
when the outbox overflows or its oldest update is older than ``gateway.slow_client_timeout_s``. No client can
hold up the feed or another client.

Admission: at most ``gateway.max_connections`` clients (then HTTP 503) and ``max_connections_per_ip`` per
address (HTTP 429); frames up to ``max_message_bytes`` (larger: close 1009); ``max_messages_per_s`` control
messages per connection (the excess is answered with an error, and the third excess closes with 1008).

Stop (SIGTERM): readiness goes false, the feed stops, every client is closed with 1001 "server shutting down",
the HTTP server stops; nothing is stored here, so nothing can be lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from services.core.models import Kline
from services.gateway import COMPONENT
from services.gateway.board import KlineBoard, Update, merge_for_subscribe
from services.gateway.feed import KlineFeed
from services.gateway.history import ClickHouseHistory, HistorySource, history_source
from services.gateway.outbox import Offer, Outbox, TokenBucket
from services.gateway.protocol import (
    Catalog,
    ProtocolError,
    Stream,
    combined,
    error_reply,
    kline_event,
    origin_allowed,
    parse_request,
    result_reply,
    streams_from_url,
)
from services.shared.kafka import check_reachable
from services.shared.lifecycle import Counters, HealthServer, Shutdown, StartupError, run_service
from services.shared.liveness import Liveness
from services.shared.logs import log_event
from services.shared.metrics import AllExcept, Distribution, Observed, ServiceMetrics
from services.shared.settings import Settings

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_FILES: Mapping[str, str] = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "lightweight-charts.standalone.production.js": "text/javascript",
    "LICENSE-lightweight-charts.txt": "text/plain",
    "THIRD_PARTY.md": "text/markdown",
}
#: Seconds a close handshake may take before the connection is dropped.
CLOSE_TIMEOUT_S = 3.0
#: Rejected messages over the rate limit before the connection is closed.
RATE_STRIKES = 3
#: Userspace bytes buffered for a client before a send waits (the socket's SO_SNDBUF comes on top). Small, so
#: that a client that stops reading is noticed early and its updates coalesce in the outbox instead.
WRITE_BUFFER = 16 * 1024
#: At or below this many buffered bytes the transport is not paused (it resumes at its low-water mark, which is
#: this), so a send of one kline frame cannot wait: the dispatcher sends inline.
INLINE_SEND_LIMIT = WRITE_BUFFER // 4
LATENCY_WINDOW = 10_000
#: Delivery latency histogram buckets, in milliseconds (exported in seconds).
DELIVERY_MS_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000)
#: The figures of :meth:`Gateway.metrics` that can go down; every other number only increases (a counter).
GAUGE_FIGURES = frozenset(
    {
        "clients",
        "subscriptions",
        "streams",
        "keys",
        "symbols",
        "outbox_pending",
        "lag",
        "delivery_latency_ms_p50",
        "delivery_latency_ms_p99",
        "outbox_wait_ms_p50",
        "outbox_wait_ms_p99",
    }
)
HISTORY_CONCURRENCY = 4


class ListenError(Exception):
    """The gateway cannot listen on its address (port taken, address not local); the message names the setting."""


class Client:
    """One WebSocket connection: its subscriptions, outbox, rate limit and, once kicked, why."""

    def __init__(self, ws: web.WebSocketResponse, ip: str, combined: bool, outbox: Outbox, bucket: TokenBucket) -> None:
        self.ws = ws
        self.ip = ip
        self.combined = combined
        self.outbox = outbox
        self.bucket = bucket
        self.streams: set[str] = set()
        self.transport: asyncio.Transport | None = None
        self.pumping = False  # its own writer task is draining (the socket was congested)
        self.wake = asyncio.Event()
        self.kicked = asyncio.Event()
        self.close_code: int = WSCloseCode.OK
        self.close_reason = ""
        self.flush_before_close = False
        self.strikes = 0


class Gateway:
    """Subscriptions, fan-out and the HTTP handlers; the feed calls :meth:`deliver`."""

    def __init__(
        self,
        settings: Settings,
        counters: Counters,
        *,
        source: HistorySource,
        history: ClickHouseHistory | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.settings = settings
        self.limits = settings.gateway
        self.counters = counters
        self.source = source
        self.history = history
        self.clock = clock
        self.wall_ms = wall_ms
        self.board = KlineBoard(self.limits.recent_klines if source == "memory" else 0)
        self.catalog = Catalog(settings.market.intervals, set(settings.market.symbols))
        self.subscribers: dict[str, set[Client]] = {}
        self.clients: set[Client] = set()
        self.per_ip: dict[str, int] = {}
        self.latencies: deque[int] = deque(maxlen=LATENCY_WINDOW)  # record timestamp -> handed to the socket
        self.outbox_waits: deque[int] = deque(maxlen=LATENCY_WINDOW)  # first enqueue of the slot -> sent
        self.delivery_ms = Distribution(DELIVERY_MS_BUCKETS, scale=0.001)  # the same latency, since start
        self.accepting = True
        self.feed: KlineFeed | None = None
        self._seen_keys: set[str] = set()
        # Per-update and per-message counts are plain attributes (the hot path); the rest live in ``counters``.
        self.updates_published = 0
        self.updates_stale = 0
        self.updates_coalesced = 0
        self.messages_out = 0
        self.bytes_out = 0
        self._history_gate = asyncio.Semaphore(HISTORY_CONCURRENCY)
        self._ready: dict[Client, None] = {}  # clients with new messages, for the dispatcher (ordered set)
        self._dispatch_wake = asyncio.Event()
        self._handlers: set[asyncio.Task[Any]] = set()

    # -- fan-out ----------------------------------------------------------------------------------------------

    def deliver(self, update: Update) -> None:
        """Record ``update`` and offer it to its subscribers. Never awaits, never blocks on a client."""
        if update.key not in self._seen_keys:
            self._seen_keys.add(update.key)
            self.catalog.symbols.add(update.key.partition("|")[0])
        if not self.board.apply(update):
            self.updates_stale += 1
            return
        self.updates_published += 1
        subscribers = self.subscribers.get(update.stream)
        if not subscribers:
            return
        wrapped: str | None = None
        slot = (update.stream, update.t)
        for client in subscribers:
            if client.combined:
                if wrapped is None:
                    wrapped = combined(update.stream, update.event)
                self._offer(client, slot, wrapped, update.origin_ms)
            else:
                self._offer(client, slot, update.event, update.origin_ms)

    def _offer(self, client: Client, slot: tuple[str, int], text: str, origin_ms: int) -> None:
        if client.kicked.is_set():
            return
        result = client.outbox.offer(slot, text, origin_ms)
        if result is Offer.QUEUED:
            self._schedule(client)
        elif result is Offer.COALESCED:
            self.updates_coalesced += 1
        else:
            self._kick(
                client,
                WSCloseCode.POLICY_VIOLATION,
                f"too slow: {client.outbox.capacity} updates pending (gateway.queue_size)",
                "clients_disconnected_slow",
            )

    def _reply(self, client: Client, text: str) -> None:
        if client.kicked.is_set():
            return
        if client.outbox.offer_control(text) is Offer.OVERFLOW:
            self._kick(
                client,
                WSCloseCode.POLICY_VIOLATION,
                "too slow: replies are not being read",
                "clients_disconnected_slow",
            )
        else:
            self._schedule(client)

    def _schedule(self, client: Client) -> None:
        if client.pumping:
            client.wake.set()
        else:
            self._ready[client] = None
            self._dispatch_wake.set()

    async def dispatch(self) -> None:
        """Send what the last updates queued, inline, for every client whose socket takes it at once.

        One task serves all clients that keep up (no task switch per client per message); a client whose
        socket buffer is filling is handed to its own writer task (:meth:`_pump`), which may wait for the socket
        without holding up anyone else.
        """
        while True:
            await self._dispatch_wake.wait()
            self._dispatch_wake.clear()
            ready, self._ready = self._ready, {}
            for client in ready:
                if client.pumping or client.kicked.is_set():
                    continue
                try:
                    await self._send_inline(client)
                except (ConnectionError, RuntimeError):
                    continue  # closing under us: its handler ends it

    async def _send_inline(self, client: Client) -> None:
        transport = client.transport
        while len(client.outbox):
            if transport is None or transport.get_write_buffer_size() > INLINE_SEND_LIMIT:
                client.pumping = True  # congested: its own writer waits for the socket
                client.wake.set()
                return
            item = client.outbox.pop()
            if item is None:
                return
            # At most INLINE_SEND_LIMIT bytes buffered: the transport is not paused and one frame cannot pause it,
            # so send_str returns without suspending and this loop never waits on one client.
            await client.ws.send_str(item[0])
            self._sent(item)

    def _sent(self, item: tuple[str, int, float]) -> None:
        text, origin_ms, waited_s = item
        self.messages_out += 1
        self.bytes_out += len(text)
        if origin_ms:
            latency_ms = self.wall_ms() - origin_ms
            self.latencies.append(latency_ms)
            self.delivery_ms.observe(latency_ms)
            self.outbox_waits.append(int(waited_s * 1000))

    def _kick(self, client: Client, code: int, reason: str, counter: str, *, flush: bool = False) -> None:
        """Close ``client`` with ``code`` and ``reason``; pending messages are dropped unless ``flush``."""
        if client.kicked.is_set():
            return
        client.close_code = code
        client.close_reason = reason
        client.flush_before_close = flush
        if not flush:
            self.counters.inc("updates_dropped", client.outbox.clear())
        self.counters.inc(counter)
        client.kicked.set()
        if code != WSCloseCode.GOING_AWAY:
            log_event(log, logging.WARNING, "disconnecting a client", client=client.ip, code=int(code), reason=reason)

    async def sweep(self, shutdown: Shutdown) -> None:
        """Disconnect clients whose oldest pending update waited longer than the slow-client timeout."""
        timeout = self.limits.slow_client_timeout_s
        while not shutdown.requested:
            await asyncio.sleep(min(0.5, timeout / 4))
            for client in list(self.clients):
                age = client.outbox.oldest_age()
                if age > timeout:
                    self._kick(
                        client,
                        WSCloseCode.POLICY_VIOLATION,
                        f"too slow: an update waited {age:.1f}s to be sent (limit {timeout:g}s)",
                        "clients_disconnected_slow",
                    )

    # -- subscriptions ----------------------------------------------------------------------------------------

    def _subscribe(
        self, client: Client, streams: Sequence[Stream], history: Mapping[str, list[Update]], n: int
    ) -> None:
        """Subscribe and queue, per stream, its history (``n`` > 0) and current kline, before any later update."""
        for stream in streams:
            client.streams.add(stream.name)
            self.subscribers.setdefault(stream.name, set()).add(client)
            if n:
                past = history.get(stream.name)
                if past is None and self.source == "memory":
                    past = self.board.recent(stream.key)[-n:]
                items = merge_for_subscribe(past or [], self.board, stream.key)
                self.counters.inc("history_klines_sent", max(0, len(items) - 1))
            else:
                current = self.board.current(stream.key)
                items = [] if current is None else [current]
            for update in items:
                text = combined(update.stream, update.event) if client.combined else update.event
                self._offer(client, (update.stream, update.t), text, 0)

    def _unsubscribe(self, client: Client, name: str) -> None:
        client.streams.discard(name)
        subscribers = self.subscribers.get(name)
        if subscribers is not None:
            subscribers.discard(client)
            if not subscribers:
                del self.subscribers[name]

    async def _fetch_history(self, streams: Sequence[Stream], n: int) -> dict[str, list[Update]]:
        if self.history is None or n <= 0:
            return {}
        self.counters.inc("history_requests")
        history = self.history
        result: dict[str, list[Update]] = {}
        async with self._history_gate:
            for stream in streams:
                try:
                    klines: list[Kline] = await asyncio.to_thread(history.fetch, stream, n)
                except Exception as exc:  # ClickHouse down: subscribe anyway, live updates still flow
                    self.counters.inc("history_errors")
                    log_event(log, logging.WARNING, "history read failed", stream=stream.name, error=str(exc)[:200])
                    continue
                now = self.wall_ms()
                result[stream.name] = [
                    Update(stream.name, stream.key, k.t, True, k.version, None, kline_event(k, now), 0) for k in klines
                ]
        return result

    async def _handle_request(self, client: Client, text: str) -> None:
        self.counters.inc("requests")
        try:
            request = parse_request(text, self.catalog, history_limit=self._history_limit())
            if request.method == "LIST_SUBSCRIPTIONS":
                self._reply(client, result_reply(sorted(client.streams), request.id))
                return
            if request.method == "UNSUBSCRIBE":
                for stream in request.streams:
                    self._unsubscribe(client, stream.name)
                self._reply(client, result_reply(None, request.id))
                return
            new = [s for s in request.streams if s.name not in client.streams]
            if len(client.streams) + len(new) > self.limits.max_subscriptions:
                raise ProtocolError(
                    4,
                    f"Limit exceeded: {len(client.streams) + len(new)} subscriptions would exceed "
                    f"{self.limits.max_subscriptions} per connection",
                    request.id,
                )
            budget = self.limits.queue_size // 2
            if request.history * len(new) > budget:
                raise ProtocolError(
                    4,
                    f"Limit exceeded: history {request.history} x {len(new)} streams is more than {budget} klines "
                    "per request; subscribe to fewer streams at a time",
                    request.id,
                )
        except ProtocolError as exc:
            self.counters.inc("request_errors")
            self._reply(client, exc.reply())
            return
        self._reply(client, result_reply(None, request.id))
        history = await self._fetch_history(new, request.history)
        if not client.kicked.is_set():
            self._subscribe(client, new, history, request.history)

    def _history_limit(self) -> int:
        if self.source == "clickhouse":
            return self.limits.history_limit
        if self.source == "memory":
            return min(self.limits.history_limit, self.limits.recent_klines)
        return 0

    # -- connections ------------------------------------------------------------------------------------------

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        if not self.accepting:
            return web.json_response({"error": "server shutting down"}, status=503)
        origin = request.headers.get("Origin")
        if not origin_allowed(origin, request.headers.get("Host"), self.limits.allowed_origins):
            self.counters.inc("connections_rejected")
            return web.json_response({"error": f"origin {origin} is not allowed (gateway.allowed_origins)"}, status=403)
        if len(self.clients) >= self.limits.max_connections:
            self.counters.inc("connections_rejected")
            return web.json_response(
                {"error": f"too many connections (limit {self.limits.max_connections})"}, status=503
            )
        ip = request.remote or "unknown"
        if self.per_ip.get(ip, 0) >= self.limits.max_connections_per_ip:
            self.counters.inc("connections_rejected")
            return web.json_response(
                {"error": f"too many connections from {ip} (limit {self.limits.max_connections_per_ip})"}, status=429
            )
        try:
            initial = streams_from_url(request.match_info.get("tail", ""), request.query, self.catalog)
            if len(initial) > self.limits.max_subscriptions:
                raise ProtocolError(4, f"Limit exceeded: more than {self.limits.max_subscriptions} streams")
        except ProtocolError as exc:
            self.counters.inc("connections_rejected")
            return web.json_response({"error": {"code": exc.code, "msg": exc.msg}}, status=400)

        ws = web.WebSocketResponse(
            heartbeat=self.limits.heartbeat_s,
            max_msg_size=self.limits.max_message_bytes,
            compress=False,  # per-client deflate would cost CPU per client per update; klines are small
            timeout=CLOSE_TIMEOUT_S,
            writer_limit=WRITE_BUFFER,
        )
        await ws.prepare(request)
        self._tune_socket(request)
        client = Client(
            ws,
            ip,
            request.path.startswith("/stream"),
            Outbox(self.limits.queue_size, self.clock),
            TokenBucket(self.limits.max_messages_per_s, max(1.0, self.limits.max_messages_per_s), self.clock),
        )
        client.transport = request.transport
        self.clients.add(client)
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        self.counters.inc("connections_accepted")
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        try:
            if initial:
                self._subscribe(client, initial, {}, 0)
            await self._serve_client(client)
        finally:
            for name in list(client.streams):
                self._unsubscribe(client, name)
            self.clients.discard(client)
            self._ready.pop(client, None)
            self.per_ip[ip] -= 1
            if not self.per_ip[ip]:
                del self.per_ip[ip]
            if handler is not None:
                self._handlers.discard(handler)
            transport = request.transport
            if transport is not None:
                # A peer that never reads would keep a closing socket (and its buffer) forever: drop it.
                asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, transport.abort)
        return ws

    async def _serve_client(self, client: Client) -> None:
        writer = asyncio.create_task(self._pump(client))
        reader = asyncio.create_task(self._read(client))
        kicked = asyncio.create_task(client.kicked.wait())
        tasks = {writer, reader, kicked}
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if client.flush_before_close and not client.ws.closed:
            try:
                await asyncio.wait_for(self._flush(client), CLOSE_TIMEOUT_S)
            except (TimeoutError, ConnectionError):
                pass
        if not client.ws.closed:
            try:
                await asyncio.wait_for(
                    client.ws.close(code=client.close_code, message=client.close_reason.encode()[:123], drain=False),
                    CLOSE_TIMEOUT_S + 1,
                )
            except (TimeoutError, ConnectionError):
                pass

    async def _pump(self, client: Client) -> None:
        """The client's own writer, for when its socket is congested: waits for the socket, then hands back."""
        while True:
            await client.wake.wait()
            client.wake.clear()
            while (item := client.outbox.pop()) is not None:
                await client.ws.send_str(item[0])  # may wait for the socket: only this client waits
                self._sent(item)
            client.pumping = False  # caught up: back to the shared dispatcher

    async def _flush(self, client: Client) -> None:
        while (item := client.outbox.pop()) is not None:
            await client.ws.send_str(item[0])
            self._sent(item)

    async def _read(self, client: Client) -> None:
        rate = self.limits.max_messages_per_s
        async for message in client.ws:
            if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                continue
            if not client.bucket.take():
                client.strikes += 1
                self.counters.inc("requests_rate_limited")
                if client.strikes >= RATE_STRIKES:
                    self._kick(
                        client,
                        WSCloseCode.POLICY_VIOLATION,
                        f"too many messages: more than {rate:g} per second",
                        "clients_disconnected_rate",
                        flush=True,  # the client reads: let it see the replies and errors before the close
                    )
                    return
                self._reply(client, error_reply(4, f"Limit exceeded: more than {rate:g} messages/s; message ignored"))
                continue
            if message.type is WSMsgType.BINARY:
                self.counters.inc("request_errors")
                self._reply(client, error_reply(3, "Invalid JSON: binary frames are not accepted; send JSON text"))
                continue
            await self._handle_request(client, message.data)

    def _tune_socket(self, request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            transport.set_write_buffer_limits(high=WRITE_BUFFER, low=INLINE_SEND_LIMIT)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None and self.limits.socket_send_buffer:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.limits.socket_send_buffer)
            except OSError:
                pass

    async def close_all(self, timeout_s: float) -> None:
        """Close every client with 1001 and wait (up to ``timeout_s``) for their handlers to finish."""
        self.accepting = False
        for client in list(self.clients):
            self._kick(client, WSCloseCode.GOING_AWAY, "server shutting down", "clients_closed_at_shutdown")
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=max(0.1, timeout_s))

    # -- HTTP -------------------------------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self._index),
            web.get("/static/{name}", self._static),
            web.get("/api/streams", self._streams),
            web.get("/api/snapshot", self._snapshot),
            web.get("/ws", self.websocket),
            web.get("/ws/{tail:.+}", self.websocket),
            web.get("/stream", self.websocket),
        ]

    async def _index(self, _request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in STATIC_FILES:
            raise web.HTTPNotFound()
        return web.FileResponse(STATIC_DIR / name, headers={"Content-Type": STATIC_FILES[name]})

    async def _streams(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {
                "symbols": sorted(self.catalog.symbols),
                "intervals": list(self.catalog.intervals),
                "history": self.source,
                "history_limit": self._history_limit(),
            }
        )

    async def _snapshot(self, request: web.Request) -> web.Response:
        """``/api/snapshot[?symbol=&interval=]``: the full current snapshot, whichever worker owns each symbol.

        An aggregator worker's own ``/snapshot`` answers only for the partitions assigned to it; the gateway's
        feed reads every partition of ``klines.snapshots`` and ``klines.finalized``, so its board holds the newest
        kline of every ``symbol|interval`` however many workers share the ``trades`` partitions. Each kline is as
        of the last snapshot tick (``aggregator.snapshot_interval_ms``) or its final, in Binance's kline shape
        (the ``k`` object of the stream event); ``as_of_ms`` is the newest record time among them.
        """
        symbol = request.query.get("symbol", "").upper() or None
        interval = request.query.get("interval") or None
        if interval is not None and interval not in self.catalog.intervals:
            return web.json_response(
                {"error": f"unknown interval {interval!r}; known: {', '.join(self.catalog.intervals)}"}, status=400
            )
        picked: list[Update] = []
        for key in sorted(self.board.keys()):
            key_symbol, _, key_interval = key.partition("|")
            if (symbol is None or key_symbol == symbol) and (interval is None or key_interval == interval):
                update = self.board.current(key)
                if update is not None:
                    picked.append(update)
        klines = [json.loads(update.event)["k"] for update in picked]
        as_of = max((update.origin_ms for update in picked), default=None)
        return web.json_response({"ready": self.ready(), "count": len(klines), "as_of_ms": as_of, "klines": klines})

    def ready(self) -> bool:
        return self.accepting and self.feed is not None and self.feed.ready

    def metrics(self) -> dict[str, Any]:
        latencies = sorted(self.latencies)
        waits = sorted(self.outbox_waits)
        values: dict[str, Any] = dict(self.counters.snapshot())
        values.update(
            updates_published=self.updates_published,
            updates_stale=self.updates_stale,
            updates_coalesced=self.updates_coalesced,
            messages_out=self.messages_out,
            bytes_out=self.bytes_out,
            records_in=self.feed.records_in if self.feed is not None else 0,
            ready=self.ready(),
            clients=len(self.clients),
            subscriptions=sum(len(c.streams) for c in self.clients),
            streams=len(self.subscribers),
            keys=len(self.board),
            symbols=len(self.catalog.symbols),
            outbox_pending=sum(len(c.outbox) for c in self.clients),
            lag=self.feed.lag if self.feed is not None else None,
            history_source=self.source,
            delivery_latency_ms_p50=_percentile(latencies, 0.50),
            delivery_latency_ms_p99=_percentile(latencies, 0.99),
            outbox_wait_ms_p50=_percentile(waits, 0.50),
            outbox_wait_ms_p99=_percentile(waits, 0.99),
        )
        return values

    def exporter(self) -> ServiceMetrics:
        """``/metrics``: the figures as ``klines_gateway_*`` and the delivery latency histogram."""
        delivery = Observed(
            "delivery_latency_seconds",
            "Seconds from a kline record's timestamp until its update was handed to a client's socket",
            {},
            self.delivery_ms,
        )
        return ServiceMetrics(COMPONENT, self.metrics, counters=AllExcept(GAUGE_FIGURES), histograms=lambda: [delivery])


def _percentile(ordered: Sequence[int], q: float) -> int | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def serve(
    settings: Settings,
    shutdown: Shutdown,
    *,
    started: Callable[[Gateway, HealthServer], None] | None = None,
    consumer_options: dict[str, Any] | None = None,
) -> int:
    """Run the gateway until ``shutdown``; return the exit code.

    Raises :class:`KafkaUnreachable` or :class:`ListenError` before anything is served.
    """
    await check_reachable(settings.kafka)
    counters = Counters()
    source = history_source(settings)
    history = ClickHouseHistory(settings.clickhouse) if source == "clickhouse" else None
    gateway = Gateway(settings, counters, source=source, history=history)
    health = HealthServer(
        settings.service.http_host,
        settings.gateway.http_port,
        ready=gateway.ready,
        metrics=gateway.metrics,
        exporter=gateway.exporter(),
        routes=gateway.routes(),
        liveness=Liveness.from_settings(settings.service),
        liveness_port=settings.service.liveness_port,
    )
    try:
        await health.start()
    except OSError as exc:
        raise ListenError(
            f"cannot listen on {settings.service.http_host}:{settings.gateway.http_port} "
            f"(service.http_host, gateway.http_port): {exc.strerror or exc}"
        ) from None
    feed = KlineFeed(settings, gateway.deliver, counters, consumer_options=consumer_options)
    gateway.feed = feed
    log_event(
        log,
        logging.INFO,
        "gateway running",
        url=f"http://{settings.service.http_host}:{health.port}/",
        history=source,
        topics=list(feed.topics),
    )
    code = 0
    sweeper: asyncio.Task[None] | None = None
    dispatcher = asyncio.create_task(gateway.dispatch())
    try:
        if await feed.start(shutdown):
            feed.report_polls(health.liveness)
            sweeper = asyncio.create_task(gateway.sweep(shutdown))
            if started is not None:
                started(gateway, health)
            await feed.run(shutdown)
    except Exception as exc:
        code = 1
        log_event(log, logging.ERROR, "gateway failed", error=f"{type(exc).__name__}: {exc}"[:500], exc_info=exc)
    finally:
        await gateway.close_all(max(0.5, shutdown.remaining() - 1))
        if sweeper is not None:
            sweeper.cancel()
        dispatcher.cancel()
        try:
            await feed.stop(shutdown.remaining())
        except Exception as exc:  # a broker gone at shutdown must not turn a clean stop into a crash
            log_event(log, logging.WARNING, "consumer did not stop cleanly", error=str(exc)[:200])
        await health.stop()
        if history is not None:
            history.close()
        log_event(log, logging.INFO, "gateway stopped", messages_out=gateway.messages_out)
    return code


async def _main_async(settings: Settings, shutdown: Shutdown, _args: argparse.Namespace) -> int:
    try:
        return await serve(settings, shutdown)
    except ListenError as exc:
        raise StartupError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m services.gateway`` (exit codes: :mod:`services.shared.lifecycle`)."""
    return run_service(
        COMPONENT, _main_async, description="Push live klines from Kafka to WebSocket clients.", argv=argv
    )
