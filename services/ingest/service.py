"""The ingest service: composition root wiring connections, sequencer, backfill and publisher to Kafka.

This process follows one shard of the symbol set (``[ingest] shard = "i/N"``, :mod:`services.ingest.shard`):
the configured or discovered symbols, and the ``POST /symbols`` edits, of that shard only. Its log lines
that concern symbols carry ``shard``, and ``/metrics`` exports ``shard_index``/``shard_count``.

Start-up:

1. check that Kafka answers and that the ``trades`` and dead-letter topics exist (created if missing);
2. start the idempotent producer and the REST client; read the exchange's time (``serverTime``: the reference
   of the trade-time window, :mod:`services.ingest.exchange_time`); resolve the symbols (configured or
   discovered), and keep this shard's;
3. **recover**: read each symbol's last published ``a`` from the tail of ``trades``
   (:mod:`services.ingest.recovery`);
4. open the WebSocket connections, start the publisher, the tick loop (reorder windows → backfill) and, with
   ``discover``, the ``exchangeInfo`` refresh; start a **catch-up** backfill from ``last + 1`` for every
   recovered symbol, so the trades that happened while ingest was down are published before the live ones;
5. ready (``/readyz``) once recovery is done and every connection is open.

Frames are handled synchronously on their connection's reader, all frames of a chunk read from the socket in
one call, each in order: validated (bad → dead-letter topic with the reason, counted), sequenced (duplicate /
accepted / held; a trade too far from the exchange's time is refused later, by the publisher, after the
sequencer consumed its id: :mod:`services.ingest.publisher`); then, if the bounded queue (held + outbox +
unacknowledged trades) reached ``persistence.queue_size``, the reader pauses until the queue is half empty:
backpressure reaches the exchange through TCP, nothing is dropped (a chunk can take the queue past its size by
at most the chunk's trades).

Graceful stop (SIGTERM/SIGINT), bounded by ``service.shutdown_grace_s`` (one deadline for every step).
Every trade accepted is published exactly once per ``a``, or sits behind an explicit gap record: nothing
accepted stays in memory. (Leaving held trades for the next start is not enough: a symbol that has nothing in
the topic yet, held during its first reorder window, restarts fresh from the live stream and would lose them.)

1. close every WebSocket: no more frames are accepted, so no live frame can fill a hole any more;
2. stop the tick loop and discovery; ``/symbols`` changes are refused from here on;
3. **repair what is held** while the publisher keeps sending: every reorder window ends now
   (``Sequencer.due(final=True)``: a fresh symbol starts at its lowest held id, every other hole gets a REST
   backfill, and a backfill already in flight goes on), until nothing is held or half the remaining time is
   spent;
4. cancel the remaining backfills (an open-ended catch-up with nothing held is simply cut short: the next
   start catches up from the topic again) and ``Sequencer.close``: what is still held goes to the outbox in
   ``a`` order, each hole before it as a ``{"type":"gap"}`` record, logged with ``log_type=DATA_LOSS``;
5. end the publisher loop after its round in progress (a round cut short puts what it had not handed to the
   producer back in the outbox); send the outbox and the dead letters and wait for every acknowledgement;
   log ``flushed`` with the real counts (``dropped_held``, what is still held, is 0 after step 4);
6. stop the producer, the REST client and the health server; exit 0 (1 if step 5 did not finish in time).

A fatal producer state (a send failed or timed out: the broker may or may not have stored it) exits 1 at once
without sending anything more: the next start continues from what the topic holds, exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from services.core.models import REASON_CATEGORIES, ReasonCategory
from services.ingest.backfill import Backfiller, BackfillOptions
from services.ingest.connections import ConnectionOptions, ConnectionPool, StreamConnection
from services.ingest.exchange_time import ExchangeTime
from services.ingest.frames import ControlFrame, RejectedFrame, WireTrade, fast_trade, parse_frame_general
from services.ingest.publisher import TradePublisher
from services.ingest.recovery import recover_last_ids
from services.ingest.rest import ExchangeRest, RestError
from services.ingest.sequencer import Outbox, Sequencer, Verdict
from services.ingest.shard import Shard
from services.ingest.symbols import SymbolRequestError, SymbolSelection, WrongShard, tradable
from services.shared.kafka import check_reachable, ensure_topics, make_producer, topic_specs
from services.shared.lifecycle import HealthServer, Shutdown
from services.shared.liveness import Liveness, Poller
from services.shared.logs import log_event
from services.shared.messages import Gap, SymbolEvent, dead_letter_value
from services.shared.metrics import ServiceMetrics
from services.shared.settings import Settings

log = logging.getLogger("services.ingest")

SERVICE = "ingest"
#: The figures of :meth:`IngestService.metrics` that only increase (the rest are gauges: queue, connections open,
#: backfills active, symbols).
COUNTER_FIGURES = frozenset(
    {
        "frames_rejected",
        "trades_rejected_time",
        "frames_unsubscribed",
        "control_errors",
        "backpressure_pauses",
        "data_loss_events",
        "symbol_refreshes",
        "symbol_refresh_failures",
        "trades_received",
        "trades_published",
        "records_sent",
        "gaps_published",
        "symbol_events_published",
        "dead_letters",
        "dead_letters_by_reason",
        "dead_letters_published",
        "duplicates",
        "trades_held",
        "gaps_detected",
        "gaps_repaired",
        "gaps_unrepaired",
        "ids_unrepaired",
        "trades_backfilled",
        "trades_dropped_on_remove",
        "catch_ups",
        "backfill_failed_requests",
        "rest_requests",
        "rest_rate_limited",
        "rest_bans",
        "exchange_time_syncs",
        "exchange_time_sync_failures",
        "reconnects",
        "rotations",
        "server_shutdowns",
        "stale_connections",
        "connect_failures",
        "connections_opened",
        "subscribe_messages",
        "frames",
    }
)


@dataclass(frozen=True, slots=True)
class IngestTuning:
    """Ingest's knobs beyond the shared settings; the defaults suit Binance."""

    connections: ConnectionOptions = field(default_factory=ConnectionOptions)
    backfill: BackfillOptions = field(default_factory=BackfillOptions)
    reorder_window_s: float = 0.1
    max_held_per_symbol: int = 10_000
    linger_s: float = 0.005
    max_batch_trades: int = 1000
    tick_s: float = 0.02
    resume_fraction: float = 0.5
    discover_refresh_s: float = 300.0
    recovery_max_records: int = 200_000
    recovery_chunk: int = 20_000
    rest_timeout_s: float = 10.0
    rest_budget_fraction: float = 0.5
    removed_grace_s: float = 30.0
    catch_up_after_reconnect: bool = True
    http_enabled: bool = True


class IngestService:
    """Binance aggTrades → ``trades`` topic, exactly once per ``a`` or an explicit gap (see the module)."""

    def __init__(
        self,
        settings: Settings,
        tuning: IngestTuning | None = None,
        *,
        shutdown: Shutdown | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.tuning = tuning or IngestTuning()
        self.shutdown = shutdown or Shutdown(settings.service.shutdown_grace_s, clock)
        self._clock = clock
        market = settings.market
        self.queue_size = settings.persistence.queue_size
        self._resume_level = int(self.queue_size * self.tuning.resume_fraction)
        self.outbox = Outbox()
        self.sequencer = Sequencer(
            self.outbox,
            reorder_window_s=self.tuning.reorder_window_s,
            max_held_per_symbol=self.tuning.max_held_per_symbol,
        )
        self.rest = ExchangeRest(
            market.rest_url,
            market.venue,
            clock=clock,
            timeout_s=self.tuning.rest_timeout_s,
            budget_fraction=self.tuning.rest_budget_fraction,
        )
        self.exchange_time = ExchangeTime(self.rest.server_time, clock=clock)
        self.backfiller = Backfiller(
            self.sequencer,
            self.rest,
            clock=clock,
            options=self.tuning.backfill,
            room=self._backfill_room,
            on_gap=self._on_gap,
        )
        self.pool = ConnectionPool(
            market.ws_url,
            market.venue,
            self,
            clock=clock,
            options=self.tuning.connections,
            rng=rng,
            on_reconnect=self._after_reconnect,
        )
        self.shard = Shard(settings.ingest.shard_index, settings.ingest.shard_count)
        self.selection = SymbolSelection(base=set(market.symbols), shard=self.shard)
        self.publisher: TradePublisher | None = None
        self.health: HealthServer | None = None
        self._tick_poller: Poller | None = None
        self.fatal: str | None = None
        self.recovered: dict[str, int] = {}
        self.started = False
        self.stopped = False
        self.trades_received = 0
        self.counts: dict[str, int] = {
            "frames_rejected": 0,
            "trades_rejected_time": 0,
            "frames_unsubscribed": 0,
            "control_errors": 0,
            "backpressure_pauses": 0,
            "data_loss_events": 0,
            "symbol_refreshes": 0,
            "symbol_refresh_failures": 0,
        }
        #: Frames rejected per reason category (each category from the start: a counter that appears at 1 would
        #: hide its first increase from ``rate``).
        self.dead_letters_by_reason: dict[ReasonCategory, int] = dict.fromkeys(REASON_CATEGORIES, 0)
        self._known_last: dict[str, int] = {}
        self._removed_at: dict[str, float] = {}
        self._room = asyncio.Event()
        self._waiting_readers = 0
        self._fatal_event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._symbols_lock = asyncio.Lock()

    # ------------------------------------------------------------------ queue
    @property
    def depth(self) -> int:
        """Trades in memory: held by the sequencer, in the outbox, or sent and not yet acknowledged."""
        inflight = self.publisher.inflight_trades if self.publisher is not None else 0
        return self.sequencer.held_total + self.outbox.trades + inflight

    async def wait_for_room(self) -> None:
        """Pause a reader until the queue is down to ``resume_fraction`` of its size (or we stop)."""
        self.counts["backpressure_pauses"] += 1
        self._waiting_readers += 1
        try:
            while self.depth > self._resume_level and not self.shutdown.requested and self.fatal is None:
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.tuning.tick_s * 5):
                        await self._room.wait()
        finally:
            self._waiting_readers -= 1

    def _on_progress(self) -> None:
        if self._waiting_readers and self.depth <= self._resume_level:
            self._room.set()

    async def _backfill_room(self) -> None:
        """Backfill waits while what is already on its way to Kafka fills the queue (held trades excluded:
        they wait for the backfill itself)."""
        while True:
            inflight = self.publisher.inflight_trades if self.publisher is not None else 0
            if self.outbox.trades + inflight < self.queue_size or self.shutdown.requested:
                return
            await asyncio.sleep(self.tuning.linger_s)

    # ------------------------------------------------------------------ frames
    def on_frames(self, raws: list[bytes], conn: StreamConnection) -> bool:
        """Validate and sequence a chunk's frames (on the connection's read path, synchronously); True when the
        queue is full and the connection must stop reading.

        The per-trade path: the fast parser, one sequencer call; everything else (other layouts, control
        frames, rejections, symbols no longer wanted) leaves the loop for :meth:`_other_frame`.
        """
        offer = self.sequencer.offer
        now = conn.last_frame_at  # read once per chunk by the connection
        trades = 0
        for raw in raws:
            frame = fast_trade(raw)
            if frame is None:
                self._other_frame(raw, conn, now)
                continue
            trades += 1
            if offer(frame, now) is Verdict.UNKNOWN_SYMBOL:
                self._unknown_symbol(frame, raw, conn, now)
        self.trades_received += trades
        return self.depth >= self.queue_size

    def _other_frame(self, raw: bytes, conn: StreamConnection, now: float) -> None:
        frame = parse_frame_general(raw)
        if type(frame) is WireTrade:
            self.trades_received += 1
            if self.sequencer.offer(frame, now) is Verdict.UNKNOWN_SYMBOL:
                self._unknown_symbol(frame, raw, conn, now)
        elif type(frame) is ControlFrame:
            if frame.kind == "server_shutdown":
                log_event(log, logging.INFO, "serverShutdown received", connection=conn.name)
                conn.on_server_shutdown()
            elif frame.kind == "error":
                self.counts["control_errors"] += 1
                log_event(log, logging.WARNING, "exchange answered an error", connection=conn.name, error=frame.detail)
        else:
            assert type(frame) is RejectedFrame
            self._reject(frame.reason, frame.category, frame.symbol, raw, conn)

    def _unknown_symbol(self, trade: WireTrade, raw: bytes, conn: StreamConnection, now: float) -> None:
        removed = self._removed_at.get(trade.s)
        if removed is not None and now - removed < self.tuning.removed_grace_s:
            self.counts["frames_unsubscribed"] += 1
        else:
            self._reject(f"symbol {trade.s} is not subscribed", "symbol", trade.s, raw, conn)

    def _reject(
        self, reason: str, category: ReasonCategory, symbol: str | None, raw: bytes, conn: StreamConnection
    ) -> None:
        self.counts["frames_rejected"] += 1
        self.dead_letters_by_reason[category] += 1
        if self.publisher is not None:
            self.publisher.dead_letter(
                symbol.encode() if symbol else None,
                dead_letter_value(SERVICE, reason, raw, category=category, topic=f"websocket {conn.base_url}"),
            )
        log_event(
            log,
            logging.WARNING,
            "frame rejected",
            reason=reason,
            category=category,
            symbol=symbol,
            connection=conn.name,
        )

    def _on_time_rejected(self, symbol: str, reason: str) -> None:
        """The publisher dead-lettered a trade for its time (services/ingest/publisher.py)."""
        self.counts["trades_rejected_time"] += 1
        self.dead_letters_by_reason["time"] += 1
        log_event(log, logging.WARNING, "trade rejected", reason=reason, category="time", symbol=symbol)

    def _on_gap(self, gap: Gap) -> None:
        self.counts["data_loss_events"] += 1
        log_event(
            log,
            logging.ERROR,
            "unrepairable gap published",
            log_type="DATA_LOSS",
            shard=str(self.shard),
            symbol=gap.symbol,
            from_a=gap.from_a,
            to_a=gap.to_a,
            ids=gap.to_a - gap.from_a + 1,
            reason=gap.reason,
        )

    def _after_reconnect(self, symbols: set[str]) -> None:
        """Trades missed during an outage show up at the symbol's next frame; a quiet symbol may have none
        for a long time, so check every symbol of the reconnected connection by REST now."""
        if not self.tuning.catch_up_after_reconnect:
            return
        for symbol in sorted(symbols):
            self.backfiller.catch_up(symbol)

    def _on_fatal(self, reason: str) -> None:
        if self.fatal is None:
            self.fatal = reason
            log_event(log, logging.CRITICAL, "fatal producer state: exiting", reason=reason)
            self._fatal_event.set()
            self._room.set()

    # ------------------------------------------------------------------ symbols
    async def apply_symbols(self, reason: str) -> frozenset[str]:
        """Make sequencer and connections follow ``selection.wanted``; returns the wanted set.

        Every change of the set goes through here (``POST /symbols``, the ``exchangeInfo`` refresh, the start),
        and a change while running is published as a lifecycle record on ``trades``
        (:class:`~services.shared.messages.SymbolEvent`, ``reason`` says which), in the symbol's order:

        1. **Removal.** The symbol's backfill is cancelled and the sequencer stops tracking it (its held trades are
           dropped). From then on nothing adds to its outbox entries: the sequencer refuses its live frames
           (``UNKNOWN_SYMBOL``; for ``removed_grace_s`` they are only counted as ``frames_unsubscribed``, not
           published), its REST pages and its gaps. So the removal record, put in the outbox now, lands after
           the last trade ingest will ever publish for this life of the symbol, and the aggregator ends its book
           there (its open klines finalized, no empty klines after).
        2. **Addition** (only once started: the symbols of the start are no news). The record goes to the outbox
           before anything the sequencer accepts for the symbol, so it precedes the new life's first trade.
        """
        async with self._symbols_lock:
            wanted = self.selection.wanted
            if self.stopped:
                return wanted  # connections are closed and held trades are being drained: change nothing
            current = self.sequencer.symbols
            now = self._clock()
            for symbol in sorted(current - wanted):
                self.backfiller.cancel(symbol)
                last = self.sequencer.untrack(symbol)
                if last is not None:
                    self._known_last[symbol] = last
                self._removed_at[symbol] = now
                self.outbox.add_symbol_event(SymbolEvent(symbol, "removed", last, reason))
                log_event(
                    log,
                    logging.INFO,
                    "symbol removed",
                    symbol=symbol,
                    last_a=last,
                    reason=reason,
                    shard=str(self.shard),
                )
            for symbol in sorted(wanted - current):
                self._removed_at.pop(symbol, None)
                last = self._known_last.get(symbol)
                if self.started:
                    self.outbox.add_symbol_event(SymbolEvent(symbol, "added", last, reason))
                self.sequencer.track(symbol, last)
                if last is not None and self.started:
                    self.backfiller.catch_up(symbol)
                log_event(
                    log, logging.INFO, "symbol added", symbol=symbol, last_a=last, reason=reason, shard=str(self.shard)
                )
            self.pool.update(wanted)
            return wanted

    async def _discover(self) -> None:
        infos = await self.rest.exchange_info()
        symbols = tradable(infos, self.settings.market.quote_asset)
        self.counts["symbol_refreshes"] += 1
        if not symbols:
            raise RestError(f"exchangeInfo lists no TRADING symbol quoted in {self.settings.market.quote_asset}")
        self.selection.set_base(symbols)
        self._log_share("exchangeInfo", len(symbols))

    def _log_share(self, source: str, total: int) -> None:
        own = len(self.selection.base)
        level = logging.WARNING if total and not own else logging.INFO
        log_event(
            log,
            level,
            "symbols of this shard" if own else "no symbol of this shard: this process publishes nothing",
            shard=str(self.shard),
            source=source,
            symbols=own,
            other_shards=total - own,
        )

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.tuning.discover_refresh_s)
            try:
                await self._discover()
            except RestError as exc:
                self.counts["symbol_refresh_failures"] += 1
                log_event(log, logging.WARNING, "exchangeInfo refresh failed", error=str(exc))
                continue
            await self.apply_symbols("exchangeInfo")

    async def _post_symbols(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.text() or "{}")
            if not isinstance(body, dict):
                raise SymbolRequestError("the body must be a JSON object")
            self.selection.apply(body)
        except WrongShard as exc:
            # 409: the request is well-formed, but another process follows these symbols.
            owners = {symbol: str(owner) for symbol, owner in sorted(exc.owners.items())}
            log_event(log, logging.WARNING, "POST /symbols for another shard", shard=str(self.shard), owners=owners)
            body = {"ok": False, "error": str(exc), "shard": str(self.shard), "owners": owners}
            return web.json_response(body, status=409)
        except (ValueError, SymbolRequestError) as exc:
            return web.json_response({"ok": False, "error": str(exc)}, status=400)
        wanted = await self.apply_symbols("POST /symbols")
        return web.json_response(
            {
                "ok": True,
                "symbols": sorted(wanted),
                "shard": str(self.shard),
                "other_shards": self.selection.elsewhere,
            }
        )

    async def _get_symbols(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {
                "symbols": sorted(self.selection.wanted),
                "added": sorted(self.selection.added),
                "removed": sorted(self.selection.removed),
                "discover": self.settings.market.discover,
                "shard": str(self.shard),
                "other_shards": self.selection.elsewhere,
            }
        )

    # ------------------------------------------------------------------ health
    def ready(self) -> bool:
        return self.started and self.fatal is None and not self.shutdown.requested and self.pool.connected

    def metrics(self) -> dict[str, Any]:
        seq = self.sequencer.stats
        conns = self.pool.stats
        pub = self.publisher
        out: dict[str, Any] = dict(self.counts)
        out.update(
            trades_received=self.trades_received,
            trades_published=pub.trades_published if pub else 0,
            records_sent=pub.records_sent if pub else 0,
            gaps_published=pub.gaps_published if pub else 0,
            symbol_events_published=pub.symbol_events_published if pub else 0,
            dead_letters=self.counts["frames_rejected"] + self.counts["trades_rejected_time"],
            dead_letters_by_reason=dict(self.dead_letters_by_reason),
            dead_letters_published=pub.dead_letters_published if pub else 0,
            duplicates=seq.duplicates,
            trades_held=seq.held,
            gaps_detected=seq.gaps_detected,
            gaps_repaired=seq.gaps_repaired,
            gaps_unrepaired=seq.gaps_unrepaired,
            ids_unrepaired=seq.ids_unrepaired,
            trades_backfilled=seq.backfilled,
            trades_dropped_on_remove=seq.dropped_on_untrack,
            catch_ups=self.backfiller.catch_ups,
            backfills_active=self.backfiller.active,
            backfill_failed_requests=self.backfiller.failed_requests,
            rest_requests=self.rest.requests,
            rest_rate_limited=self.rest.rate_limited,
            rest_bans=self.rest.bans,
            exchange_time_syncs=self.exchange_time.syncs,
            exchange_time_sync_failures=self.exchange_time.sync_failures,
            reconnects=conns.reconnects,
            rotations=conns.rotations,
            server_shutdowns=conns.server_shutdowns,
            stale_connections=conns.stale,
            connect_failures=conns.connect_failures,
            connections_opened=conns.opened,
            subscribe_messages=conns.subscribe_messages,
            connections_open=self.pool.open_connections,
            frames=conns.frames,
            queue_depth=self.depth,
            queue_held=self.sequencer.held_total,
            queue_inflight=pub.inflight_trades if pub else 0,
            queue_size=self.queue_size,
            symbols=len(self.sequencer.symbols),
            symbols_other_shards=self.selection.elsewhere,
            shard=str(self.shard),
            shard_index=self.shard.index,
            shard_count=self.shard.count,
            ready=self.ready(),
            fatal=self.fatal,
        )
        return out

    def exporter(self) -> ServiceMetrics:
        """``/metrics``: the figures of :meth:`metrics` as ``klines_ingest_*``, the dead letters per reason category
        labelled."""
        return ServiceMetrics(
            SERVICE,
            self.metrics,
            counters=COUNTER_FIGURES,
            labels={"dead_letters_by_reason": "reason"},
        )

    # ------------------------------------------------------------------ run
    async def run(self) -> int:
        """Run until a stop is requested (exit code 0) or a fatal error (1).

        Raises :class:`~services.shared.kafka.KafkaUnreachable` when no broker answers at start (a startup
        error, exit code 2 in :func:`services.shared.lifecycle.run_service`).
        """
        kafka = self.settings.kafka
        await check_reachable(kafka, timeout_s=min(10.0, kafka.send_timeout_s * 2))
        try:
            wanted_topics = {kafka.topics.trades, kafka.topics.dead_letter}
            await ensure_topics(kafka, [s for s in topic_specs(kafka) if s.name in wanted_topics])
        except Exception as exc:
            log_event(log, logging.CRITICAL, "cannot start: Kafka", error=str(exc))
            return 1
        producer = make_producer(kafka, client_suffix="ingest")
        try:
            await asyncio.wait_for(producer.start(), kafka.send_timeout_s * 3)
        except Exception as exc:
            log_event(log, logging.CRITICAL, "cannot start the producer", error=f"{type(exc).__name__}: {exc}")
            return 1
        self.publisher = TradePublisher(
            producer,
            self.outbox,
            trades_topic=kafka.topics.trades,
            dead_letter_topic=kafka.topics.dead_letter,
            send_timeout_s=kafka.send_timeout_s,
            linger_s=self.tuning.linger_s,
            max_batch_trades=self.tuning.max_batch_trades,
            clock=self._clock,
            on_progress=self._on_progress,
            on_fatal=self._on_fatal,
            exchange_time=self.exchange_time,
            max_future_skew_ms=self.settings.ingest.max_future_skew_ms,
            # No lower bound here: the exchange's clock can run far ahead of the trades in flight (a replay at
            # --speed 0 is weeks ahead within seconds), so "older than the retention" by it would refuse valid
            # trades; the future bound is what keeps a hostile time off the books (module exchange_time).
            max_trade_age_ms=None,
            on_time_rejected=self._on_time_rejected,
        )
        await self.rest.start()
        await self.exchange_time.sync()  # the trade-time window's reference; without it, no window until it answers
        code = 0
        try:
            code = await self._serve()
        except Exception as exc:
            log.exception("ingest failed")
            log_event(log, logging.CRITICAL, "ingest failed", error=f"{type(exc).__name__}: {exc}")
            code = 1
        finally:
            code = await self._stop(producer, code)
        return code

    async def _serve(self) -> int:
        market = self.settings.market
        if market.discover:
            try:
                await self._discover()
            except RestError as exc:
                log_event(log, logging.CRITICAL, "cannot discover symbols from exchangeInfo", error=str(exc))
                return 1
        else:
            self._log_share("market.symbols", len(set(market.symbols)))
        wanted = self.selection.wanted
        recovery = await recover_last_ids(
            self.settings.kafka,
            wanted,
            max_records=self.tuning.recovery_max_records,
            chunk=self.tuning.recovery_chunk,
        )
        self.recovered = dict(recovery.last)
        self._known_last.update(recovery.last)
        log_event(
            log,
            logging.INFO,
            "recovered last ids from the topic",
            shard=str(self.shard),
            recovered=len(recovery.last),
            fresh=sorted(recovery.not_found)[:50],
            records_read=recovery.records_read,
            unreadable=recovery.unreadable,
        )
        if self.tuning.http_enabled:
            service = self.settings.service
            self.health = HealthServer(
                service.http_host,
                service.ingest_http_port,
                ready=self.ready,
                metrics=self.metrics,
                exporter=self.exporter(),
                routes=[web.post("/symbols", self._post_symbols), web.get("/symbols", self._get_symbols)],
                admin_token=service.admin_token(),  # POST /symbols needs it (services/shared/admin.py)
                liveness=Liveness.from_settings(service, self._clock),
                liveness_port=service.liveness_port,
            )
            await self.health.start()
            # Liveness: the tick loop (reorder windows -> backfill) must keep turning (services/shared/liveness.py).
            self._tick_poller = self.health.liveness.poller("ingest tick")
            # ... and so must each stream group's supervisor (services/ingest/connections.py, "liveness").
            self.pool.liveness = self.health.liveness
        assert self.publisher is not None
        self._spawn(self.publisher.run(), "ingest-publisher")
        self._spawn(self._tick_loop(), "ingest-tick")
        if market.discover:
            self._spawn(self._refresh_loop(), "ingest-discovery")
        await self.apply_symbols("start")
        self.started = True
        for symbol in sorted(self.sequencer.symbols):
            if self.sequencer.last(symbol) is not None:
                self.backfiller.catch_up(symbol)
        log_event(
            log,
            logging.INFO,
            "ingest running",
            shard=str(self.shard),
            symbols=len(wanted),
            venue=market.venue,
            ws_url=market.ws_url,
        )
        stop = asyncio.create_task(self.shutdown.wait())
        fatal = asyncio.create_task(self._fatal_event.wait())
        try:
            await asyncio.wait({stop, fatal}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            fatal.cancel()
        return 1 if self.fatal is not None else 0

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """A background task whose unexpected end is fatal: a dead tick loop would silently stop gap repair."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)

        def done(t: asyncio.Task[None]) -> None:
            if t.cancelled() or self.stopped:
                return
            exc = t.exception()
            if exc is not None:
                log.error("task %s failed", name, exc_info=exc)
                self._on_fatal(f"task {name} failed: {type(exc).__name__}: {exc}")
            elif name != "ingest-publisher" or self.fatal is None:
                self._on_fatal(f"task {name} ended unexpectedly")

        task.add_done_callback(done)

    async def _tick_loop(self) -> None:
        seq = self.sequencer
        while True:
            await asyncio.sleep(self.tuning.tick_s)
            if self._tick_poller is not None:
                self._tick_poller.polled()
            for symbol in seq.due(self._clock()):
                held = seq.held(symbol)
                missing = seq.backfill_range(symbol)
                log_event(log, logging.INFO, "gap detected: backfilling", symbol=symbol, missing=missing, held=held)
                self.backfiller.repair(symbol)
            if self._waiting_readers and self.depth <= self._resume_level:
                self._room.set()

    async def _stop(self, producer: Any, code: int) -> int:
        """The graceful stop of the module docstring (steps 1-6)."""
        if self.stopped:
            return code
        self.stopped = True
        self.shutdown.request("stopping")
        self._room.set()
        held_at_stop = self.sequencer.held_total
        # 1. No more frames.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.pool.stop(), max(0.5, self.shutdown.remaining() / 4))
        # 2. No more ticks, discovery (the publisher, the first task, keeps running).
        publisher_task = self._tasks[0] if self._tasks else None
        for task in self._tasks[1:]:
            task.cancel()
        await asyncio.gather(*self._tasks[1:], return_exceptions=True)
        # 3-4. Nothing accepted stays held (not after a fatal error: nothing more may be sent).
        stop_gaps: list[Gap] = []
        if self.fatal is None and publisher_task is not None:
            await self._repair_held(max(0.0, self.shutdown.remaining() / 2))
            await self.backfiller.stop()
            stop_gaps = self.sequencer.close("ingest stopped before backfill repaired the hole", self._clock())
            for gap in stop_gaps:
                self._on_gap(gap)
        else:
            await self.backfiller.stop()
        # 5. Everything accepted, acknowledged (not after a fatal error: sending more could duplicate).
        if publisher_task is not None and self.publisher is not None:
            self.publisher.stop_loop()  # finish the round in progress rather than cut it short
            try:
                await asyncio.wait_for(asyncio.shield(publisher_task), max(0.1, self.shutdown.remaining() / 2))
            except TimeoutError:
                publisher_task.cancel()  # the round puts back what it had not handed over
            await asyncio.gather(publisher_task, return_exceptions=True)
        publisher = self.publisher
        if publisher is not None and self.fatal is None:
            flushed = await publisher.flush(max(0.1, self.shutdown.remaining() - 0.5))
            counts: dict[str, Any] = {
                "trades_received": self.trades_received,
                "trades_published": publisher.trades_published,
                "gaps_published": publisher.gaps_published,
                "held_at_stop": held_at_stop,
                "gaps_at_stop": len(stop_gaps),
                "ids_gap_marked_at_stop": sum(g.to_a - g.from_a + 1 for g in stop_gaps),
                "dropped_held": self.sequencer.held_total,
                "unacknowledged": publisher.inflight_trades + self.outbox.trades,
            }
            counts["shard"] = str(self.shard)
            if flushed:
                log_event(log, logging.INFO, "flushed", **counts)
            else:
                code = 1
                log_event(
                    log,
                    logging.ERROR,
                    "not everything was acknowledged before the deadline; the next start recovers from the topic",
                    reason=publisher.failure,
                    **counts,
                )
        # 6. Release the clients.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), max(0.5, self.shutdown.remaining()))
        await self.exchange_time.close()
        await self.rest.close()
        if self.health is not None:
            await self.health.stop()
        if self.fatal is not None:
            code = 1
        log_event(
            log, logging.INFO, "ingest stopped", shard=str(self.shard), exit_code=code, reason=self.shutdown.reason
        )
        return code

    async def _repair_held(self, budget_s: float) -> None:
        """Stop step 3: backfill every hole in front of held trades, for at most ``budget_s``.

        Waits on the backfill tasks themselves, waking every ``tick_s`` to start the repair of a further hole
        a finished task left behind (the tick loop that would do it is stopped).
        """
        seq = self.sequencer
        deadline = self._clock() + budget_s
        while seq.held_total and self.fatal is None:
            for symbol in seq.due(self._clock(), final=True):
                log_event(
                    log,
                    logging.INFO,
                    "stopping: backfilling a hole before held trades",
                    symbol=symbol,
                    missing=seq.backfill_range(symbol),
                    held=seq.held(symbol),
                )
                self.backfiller.repair(symbol)
            running = self.backfiller.running(seq.holding)
            remaining = deadline - self._clock()
            if not running or remaining <= 0:
                return
            await asyncio.wait(running, timeout=min(remaining, self.tuning.tick_s), return_when=asyncio.FIRST_COMPLETED)
