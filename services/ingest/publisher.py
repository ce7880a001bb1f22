"""Drain the outbox into Kafka: per-symbol batches on ``trades``, rejected frames on the dead-letter topic.

Every ``linger_s`` (a few ms) the publisher takes what the sequencer accepted and, per symbol, in order, sends

* each run of consecutive trades as one or more :func:`~services.shared.messages.encode_trade_batch` records
  (at most ``max_batch_trades`` trades each), key = symbol;
* each gap as one :func:`~services.shared.messages.encode_gap` record, and each lifecycle record (the symbol
  left or joined the wanted set) as one :func:`~services.shared.messages.encode_symbol_event` record, in its
  place between the trades.

The producer is idempotent with ``acks=all`` and keeps records of one partition in order, so every symbol's
records land in the order the sequencer produced them: strictly increasing, contiguous ``a``.

Delivery is bounded in time. Handing a record to the producer and its acknowledgement must each finish within
``send_timeout_s`` (aiokafka waits forever for a broker that is gone). A send that fails or times out is
**fatal**: whether the broker stored the record is unknown, and sending it again could duplicate it. The
service then exits non-zero; on restart it reads the topic's tail and continues after the last stored ``a``,
which is exactly-once across the crash.

``inflight_trades`` counts trades handed to the producer and not yet acknowledged; with the outbox and the
sequencer's held trades it makes up the bounded queue that backpressure watches.

Trade times are screened before a round is sent (:meth:`TradePublisher._screen`), against the exchange's clock
(:mod:`services.ingest.exchange_time`):

1. a trade within ``[now - max_trade_age_ms, now + max_future_skew_ms]`` of the estimate is sent;
2. a trade outside it is a suspect: if the estimate comes from a ``serverTime`` asked for after the trade was
   first suspected (or it waited ``give_up_s`` for one, or this is the last round of a stop, which asks for a
   fresh ``serverTime`` first: :meth:`TradePublisher.flush`), the trade is **rejected**: dead-lettered with
   the reason (category ``time``) instead of published;
3. otherwise the symbol's entries from the suspect on wait in the outbox (its order is kept) and a fresh
   ``serverTime`` is requested; the next rounds look again.

A rejected trade's id was sequenced like any other (the exchange did publish that id; only its time is
refused), so the sequencer neither reports a gap for it nor waits for it: the ``trades`` topic simply lacks that
id, which the aggregator's books take as it takes any id that was never sent (no gap record, so empty klines
stay exact). After a restart, a rejected trade that was the symbol's last can be fetched again by the catch-up
and is then dead-lettered again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from operator import attrgetter
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from services.core.models import MAX_TIME_MS, MIN_TIME_MS
from services.ingest.exchange_time import ExchangeTime
from services.ingest.frames import batch_value, trade_time, trade_time_texts
from services.ingest.sequencer import Outbox, OutboxItem
from services.shared.messages import Gap, SymbolEvent, dead_letter_value, encode_gap, encode_symbol_event

log = logging.getLogger("services.ingest.publisher")

_FIELDS = attrgetter("fields")


class PublishFailed(Exception):
    """A send failed or was not acknowledged in time; the producer's state is unknown (fatal)."""


class TradePublisher:
    """Moves the outbox (and dead letters) into Kafka with bounded delivery time (see the module docstring)."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        outbox: Outbox,
        *,
        trades_topic: str,
        dead_letter_topic: str,
        send_timeout_s: float,
        linger_s: float,
        max_batch_trades: int,
        clock: Callable[[], float],
        on_progress: Callable[[], None],
        on_fatal: Callable[[str], None],
        exchange_time: ExchangeTime | None = None,
        max_future_skew_ms: int | None = None,
        max_trade_age_ms: int | None = None,
        on_time_rejected: Callable[[str, str], None] | None = None,
    ) -> None:
        """``exchange_time`` and the two bounds: the trade-time window (the module docstring; None lifts a side);
        ``on_time_rejected(symbol, reason)`` is told of each trade dead-lettered for its time."""
        self.producer = producer
        self.outbox = outbox
        self.trades_topic = trades_topic
        self.dead_letter_topic = dead_letter_topic
        self.send_timeout_s = send_timeout_s
        self.linger_s = linger_s
        self.max_batch_trades = max_batch_trades
        self._clock = clock
        self._on_progress = on_progress
        self._on_fatal = on_fatal
        self._dead_letters: list[tuple[bytes | None, bytes]] = []
        self._inflight: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self.inflight_trades = 0
        self.trades_published = 0
        self.records_sent = 0
        self.gaps_published = 0
        self.symbol_events_published = 0
        self.dead_letters_published = 0
        self.failure: str | None = None
        self._stopping = False
        self._round_lock = asyncio.Lock()
        self._time = exchange_time
        self._future = max_future_skew_ms
        self._age = max_trade_age_ms
        self._on_time_rejected = on_time_rejected
        # Per symbol whose entries wait behind a suspect: when that suspect (the first entry put back) was first
        # suspected. One entry per waiting symbol, gone once its suspect is decided or found within the window.
        self._suspected: dict[str, float] = {}
        self.trades_rejected_time = 0

    # ------------------------------------------------------------------ input
    def dead_letter(self, key: bytes | None, value: bytes) -> None:
        """Queue one dead-letter record (sent with the next round)."""
        self._dead_letters.append((key, value))

    @property
    def idle(self) -> bool:
        return not self.outbox and not self._dead_letters and self.inflight_trades == 0 and not self._inflight

    # ------------------------------------------------------------------ loop
    def stop_loop(self) -> None:
        """Let :meth:`run` return after the round in progress (cancelling it could strand a taken round)."""
        self._stopping = True

    async def run(self) -> None:
        """Send a round every ``linger_s`` until :meth:`stop_loop` (or a send fails: then report and stop)."""
        try:
            while self.failure is None and not self._stopping:
                await asyncio.sleep(self.linger_s)
                if self.outbox or self._dead_letters:
                    await self.send_round()
                self._check_deadlines()
        except PublishFailed:
            return

    async def send_round(self, *, final: bool = False) -> None:
        """Hand everything waiting to the producer (raises :class:`PublishFailed`); ``final`` (the last round of a
        stop): the trade-time screen decides on every suspect by the estimate it has, nothing waits.

        A round interrupted before it handed everything over (cancelled, or failed) puts what it had not handed
        to the producer back at the front of the outbox: a stop that cancels a round strands nothing, and the
        counts of what is left stay true.
        """
        async with self._round_lock:
            items = self.outbox.take()
            if self._time is not None and items:
                items = self._screen(items, self._clock(), final=final)
            dead, self._dead_letters = self._dead_letters, []
            handed: dict[str, int] = {}  # per symbol, how many leading entries the producer holds
            dead_handed = 0
            try:
                async with asyncio.timeout(self.send_timeout_s):
                    for symbol, entries in items.items():
                        await self._send_symbol(symbol, entries, handed)
                    for key, value in dead:
                        await self._send(self.dead_letter_topic, key, value, 0)
                        dead_handed += 1
                        self.dead_letters_published += 1
            except BaseException as exc:
                self.outbox.put_back({s: entries[handed.get(s, 0) :] for s, entries in items.items()})
                self._dead_letters[:0] = dead[dead_handed:]
                if isinstance(exc, TimeoutError):
                    self._fail(f"the producer did not accept records within send_timeout_s={self.send_timeout_s:g}")
                if isinstance(exc, KafkaError):
                    self._fail(f"the producer rejected a record: {type(exc).__name__}: {exc}")
                raise

    def _window(self) -> tuple[int, int] | None:
        assert self._time is not None
        now = self._time.now_ms()
        if now is None:
            self._time.request_sync()  # no estimate yet: no window, and ask again
            return None
        high = MAX_TIME_MS if self._future is None else now + self._future
        low = MIN_TIME_MS if self._age is None else now - self._age
        return low, high

    def _screen(
        self, items: dict[str, list[OutboxItem]], taken_at: float, *, final: bool = False
    ) -> dict[str, list[OutboxItem]]:
        """Steps 1-3 of the trade-time screen (module docstring): what to send now; rejected trades become dead
        letters, a symbol's entries from an unconfirmed suspect on go back to the outbox."""
        window = self._window()
        if window is None:
            return items
        low, high = window
        assert self._time is not None
        synced_at = self._time.synced_at
        give_up = self._time.give_up_s
        out: dict[str, list[OutboxItem]] = {}
        deferred: dict[str, list[OutboxItem]] = {}
        # Every T has 13 digits, and so do the bounds once clamped to the contract's range: compared as bytes.
        low_text, high_text = str(max(low, MIN_TIME_MS)).encode(), str(min(high, MAX_TIME_MS)).encode()
        suspected = self._suspected
        for symbol, entries in items.items():
            previous = suspected.pop(symbol, None) if suspected else None
            try:
                times = trade_time_texts(map(_FIELDS, entries))
            except AttributeError:  # a gap or a symbol record among the trades: the loop below
                times = [b""]
            if not times or (low_text <= min(times) and max(times) <= high_text):
                out[symbol] = entries  # the usual round: every trade within the window
                continue
            kept: list[OutboxItem] = []
            for index, entry in enumerate(entries):
                if isinstance(entry, Gap | SymbolEvent) or low <= (t := trade_time(entry.fields)) <= high:
                    kept.append(entry)
                    continue
                # The entry put back first is the suspect of an earlier round; any other is suspected from now
                # (at the latest: a later time only asks for a fresher serverTime).
                seen = previous if index == 0 and previous is not None else taken_at
                if not final and (synced_at is None or synced_at < seen) and taken_at - seen < give_up:
                    suspected[symbol] = seen
                    deferred[symbol] = entries[index:]  # not confirmed yet: wait, in order
                    self._time.request_sync()
                    break
                self._reject_time(symbol, entry.fields, t, low, high)
            out[symbol] = kept
        if deferred:
            self.outbox.put_back(deferred)
        return out

    def _reject_time(self, symbol: str, fields: bytes, t: int, low: int, high: int) -> None:
        assert self._time is not None
        if t > high:
            reason = (
                f"trade time T={t} is {t - high} ms past the accepted window's end {high} (the exchange's time "
                f"plus ingest.max_future_skew_ms, confirmed by its serverTime)"
            )
        else:
            reason = (
                f"trade time T={t} is {low - t} ms before the accepted window's start {low} (the exchange's time "
                f"minus kafka.trades_retention_ms)"
            )
        key = symbol.encode()
        record = batch_value(key, [fields])  # what would have been published
        self._dead_letters.append((key, dead_letter_value("ingest", reason, record, category="time")))
        self.trades_rejected_time += 1
        if self._on_time_rejected is not None:
            self._on_time_rejected(symbol, reason)

    async def _send_symbol(self, symbol: str, entries: list[OutboxItem], handed: dict[str, int]) -> None:
        """Send one symbol's entries in order; ``handed[symbol]`` follows how many the producer holds."""
        key = symbol.encode()
        run: list[bytes] = []  # the trades' fields (frames.WireTrade): a batch record is their join
        limit = self.max_batch_trades
        for index, entry in enumerate(entries):
            if isinstance(entry, Gap | SymbolEvent):
                if run:
                    await self._send(self.trades_topic, key, batch_value(key, run), len(run))
                    run = []
                    handed[symbol] = index
                if isinstance(entry, Gap):
                    await self._send(self.trades_topic, key, encode_gap(entry), 0)
                    self.gaps_published += 1
                else:
                    await self._send(self.trades_topic, key, encode_symbol_event(entry), 0)
                    self.symbol_events_published += 1
                handed[symbol] = index + 1
                continue
            run.append(entry.fields)
            if len(run) >= limit:
                await self._send(self.trades_topic, key, batch_value(key, run), len(run))
                run = []
                handed[symbol] = index + 1
        if run:
            await self._send(self.trades_topic, key, batch_value(key, run), len(run))
        handed[symbol] = len(entries)

    async def _send(self, topic: str, key: bytes | None, value: bytes, trades: int) -> None:
        future = await self.producer.send(topic, value, key=key)
        self.records_sent += 1
        self.inflight_trades += trades
        self._inflight.append((self._clock() + self.send_timeout_s, future))
        future.add_done_callback(lambda f, n=trades: self._delivered(f, n))

    def _delivered(self, future: asyncio.Future[Any], trades: int) -> None:
        if future.cancelled():
            self._record_failure("a send was cancelled before it was acknowledged")
            return
        exc = future.exception()
        if exc is not None:
            self._record_failure(f"a record was not acknowledged: {type(exc).__name__}: {exc}")
            return
        self.inflight_trades -= trades
        self.trades_published += trades
        self._on_progress()

    def _check_deadlines(self) -> None:
        inflight = self._inflight
        while inflight and inflight[0][1].done():
            inflight.popleft()
        if inflight and self._clock() > inflight[0][0]:
            self._fail(f"a record was not acknowledged within send_timeout_s={self.send_timeout_s:g}")

    def _record_failure(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            self._on_fatal(reason)

    def _fail(self, reason: str) -> None:
        self._record_failure(reason)
        raise PublishFailed(reason)

    # ------------------------------------------------------------------ shutdown
    async def flush(self, timeout_s: float) -> bool:
        """Send everything waiting and wait for every acknowledgement; False if not done in ``timeout_s``.

        The last round decides on every suspect trade (nothing may stay behind), so the exchange's time is asked
        for first (within a quarter of ``timeout_s``): every trade waiting arrived before that request, so the
        decisions are confirmed ones, as in any round; only without an answer does the estimate decide alone.
        """
        deadline = self._clock() + timeout_s
        if self._time is not None and self.outbox:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s / 4):
                    await self._time.sync()
        try:
            if self.outbox or self._dead_letters:
                await self.send_round(final=True)
            while self._inflight:
                self._check_deadlines()
                if not self._inflight:
                    break
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return False
                _, future = self._inflight[0]
                with contextlib.suppress(TimeoutError, KafkaError, asyncio.CancelledError):
                    async with asyncio.timeout(min(remaining, 0.5)):
                        await asyncio.shield(future)
                if future.done():
                    self._inflight.popleft()
            self._check_deadlines()
        except PublishFailed:
            return False
        # Done callbacks (the accounting, and failures) run one loop iteration after their future completes.
        await asyncio.sleep(0)
        return self.failure is None and self.inflight_trades == 0
