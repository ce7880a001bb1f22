"""The aggregator's engine: trades batches in, klines out, state checkpointed; the recovery protocol lives here.

:class:`Aggregator` owns one :class:`PartitionState` (a :class:`~services.core.book.KlineBooks` plus bookkeeping)
per assigned ``trades`` partition: it applies trades, runs the clock and orchestrates rebalances and the stop.
What it sends is :class:`~services.aggregator.output.Output`'s (step 3); checkpoints are the
:class:`~services.aggregator.checkpointer.Checkpointer`'s (steps 4-7). It is driven by three callers, all on
one event loop:

* the batch consumer (:mod:`services.aggregator.app`) calls :meth:`Aggregator.handle_batch` with every batch of
  records Faust's consumer fetched — the hot path, synchronous and never awaiting I/O — and
  :meth:`Aggregator.wait_for_room` before each fetch (flow control, step 3);
* the clock task (:meth:`Aggregator.tick`, every ``snapshot_interval_ms``) closes quiet klines, publishes
  snapshots and writes checkpoints;
* Faust's rebalance signals (:meth:`Aggregator.on_revoked`, :meth:`Aggregator.on_assigned`) and the graceful
  stop (:meth:`Aggregator.stop`).

Recovery protocol
-----------------

Per ``trades`` partition ``p``. ``next[S]`` is the offset after the last applied record of symbol ``S``;
``position`` is the offset after the last record read from ``p``.

1. **Faust commits nothing on its own.** The trades topic is registered with acks disabled, so Faust's commit
   timer (which commits only acked offsets) and its commit on stop never move a ``trades`` offset; nothing is
   acked. Offsets are committed only in step 6.
2. **Apply exactly once per symbol.** A record at offset ``o`` for symbol ``S`` is applied iff
   ``o >= next[S]``; then ``next[S] = o + 1`` and ``S`` is dirty. A fetched batch is applied in slices (a
   partition's records in offset order, at most 1 MiB of values or 10,000 records each), each in one
   synchronous call that also moves ``position`` past it; between slices the engine yields to the event loop
   once the batch has run for 20 ms, and if the assignment changed meanwhile (a rebalance) or a stop began, it
   applies no more: once the rebalance is over the rest is read again from each owned partition's resume
   offset (as a stale batch, step 8); after a stop, from the committed offset. So a cancellation (rebalance,
   stop) falls only between slices, where ``position``, ``next[S]`` and the books agree.
3. **Finalize without waiting; never drop.** A kline that closes joins ``unconfirmed[S]`` and is put into the
   finalized :class:`~services.aggregator.outbox.Outbox`, which hands it to the producer at once when the
   producer takes it without waiting, and queues it otherwise; nothing here awaits a send. The kline stays in
   ``unconfirmed[S]`` until the broker acknowledged it; a delivery that failed (timed out, connection lost)
   is put again. The ``trades`` topic is a durable log, so a full producer is never a reason to drop a
   kline: **flow control on the input** instead — the consumer starts a fetch only while the output in flight
   (finalized klines queued or unacknowledged, snapshots and dead letters waiting; :meth:`Aggregator.in_flight`)
   is at most ``persistence.max_in_flight``, and resumes as it drains. A burst of closed klines (a quiet
   stretch closing, a catch-up after downtime) therefore slows the input and loses nothing. ``DATA_LOSS``
   (an ERROR log with symbol, interval and open time, and a counter) is left for a kline the producer can
   never take (the outbox's step 4); a kline unconfirmed at a crash is in the checkpoint and sent again (7).
4. **Checkpoint the dirty symbols** (each tick; at most one checkpoint in flight per partition;
   :class:`~services.aggregator.checkpointer.Checkpointer`). Synchronously export each dirty symbol's book,
   ``next[S]`` and ``unconfirmed[S]``, and note ``N = position``. A record that would exceed the checkpoint's
   record size (a burst not yet confirmed) defers the partition's checkpoint to a later tick: the commit then
   stays at the previous marker, which is always safe. A background task sends the symbol records and awaits
   every acknowledgement. If one fails, those symbols are dirty again and the checkpoint ends here: no marker,
   no commit.
5. **Then the marker**: ``{next_offset: N, seq_limit: L}`` (``L`` = snapshot seq + a lease), sent only after
   step 4 was fully acknowledged, and awaited. So a marker ``N`` on the topic means: every symbol with a
   record below ``N`` has its state, current through that record, on the topic.
6. **Then commit ``N``** for ``p`` in the consumer group. Hence committed ``C <= N`` of the newest marker: the
   group's offset never passes the checkpoint.
7. **Restore** (on assignment, before any record of ``p`` is applied): read checkpoint partition ``p`` to its end
   and take the newest record per key. Books and ``next[S]`` come from the symbol records; snapshot sequence
   numbers continue at the marker's ``seq_limit``, and a fresh marker claims a new lease before snapshots
   resume; the unconfirmed finalized klines are sent again. Faust then seeks ``p`` to the committed ``C``.
   Nothing is lost: ``C <= N`` and every symbol with a record below ``N`` has a state current through its
   records (5), so every record not in a restored state is at or above ``C``; a symbol without a record is new
   and is read from ``C``. Nothing is applied twice: a re-read record below ``next[S]`` is skipped (2). A
   restored book also drops trades whose aggregate id it has already applied.
8. **Rebalance** (aiokafka revokes every partition on every rebalance): Faust stops the flow first; then the
   finalized producer is flushed (bounded), the in-flight checkpoint awaited, a final checkpoint written and
   committed (4-6), and the partition's state parked. If the next assignment gives ``p`` back, the parked
   state continues (it equals what was just checkpointed and committed); otherwise it is dropped and the new
   owner restores (7). A batch whose fetch was in flight across the rebalance is not applied — its records
   may come from before or after the rebalance's seek — and its partitions are sought back to their resume
   offset (after the last applied record, else the restored marker), so no record is skipped.
9. **SIGTERM**: stop applying, publish the last snapshots, flush the finalized producer, final checkpoint and
   commit for every partition, then leave the group — each step bounded by the shutdown deadline.
10. **Crash** anywhere: the restart restores (7). Klines closed after the last checkpoint close again during
    the replay and are sent again; duplicates are harmless downstream (ReplacingMergeTree by version).

Symbol lifecycle
----------------

Ingest publishes a ``{"type": "symbol"}`` record (:class:`~services.shared.messages.SymbolEvent`) in a symbol's
order: a removal after the last trade it published for the symbol, an addition before the first trade of its
next life. Applied by the rule of step 2 like any record (``next[S]`` moves past it), by
:meth:`Aggregator._end_symbol`:

1. **Removal: close, send, drop.** The klines the book closed and not yet sent, then every in-progress kline
   finalized as it stands (``source="closed"``; :meth:`KlineBook.close <services.core.book.KlineBook.close>`),
   go out as finalized klines by step 3 (unconfirmed until acknowledged, never dropped), and the book is
   dropped: the clock no longer sees it, so no empty kline follows. A removal for a symbol without a book
   changes nothing (a record read again: step 2 already skips those below ``next[S]``).
2. **The state stays a tombstone.** ``next[S]`` is kept, and the symbol stays dirty, so the next checkpoint
   writes its record with no book (``"book": null``) but with ``next_offset`` and the closed klines still
   unconfirmed (step 4). A restore (step 7) installs ``next[S]`` and re-sends those klines, but no book: the
   records of the old life below ``next[S]`` are skipped, and nothing resurrects it.
3. **A new life starts clean.** An addition record changes nothing (a book exists only if the removal never
   reached the topic, and then the symbol's stream simply goes on); the symbol's next trade creates a new book,
   whose first kline is that trade's, with empty klines only after it, as for a new symbol: nothing is made up
   for the span it was away. A symbol back within the interval it left in (a quick re-add: ingest catches up
   from the last id it published) gets a second kline for that interval, version 0 like the ``closed`` one, with
   only the new life's trades; downstream, ``FINAL`` keeps whichever was written last.

Snapshot sequence numbers are one counter per partition, so they increase per key; a restart continues above the
newest lease on the topic, which is above every number used before. The clock closes quiet klines of a
partition only when the partition is read to its high watermark, so a restart with a backlog never closes a
kline before its trades are applied.

Hostile input
-------------

The ``trades`` topic takes raw Binance payloads from anyone, so a record is checked before it reaches a book:

1. **Its symbol.** A record without a key, or with a key that is not a symbol, is dead-lettered (``symbol``);
   so is one whose symbol is not on ``aggregator.symbols`` when that allow-list is set (empty: any symbol).
2. **Its contract.** What the trade contract refuses (types, ranges, decimals, layout) is dead-lettered with
   the contract's reason, record by record.
3. **Its time, against the market's "now".** Before each batch the books' window is moved from the clock
   (:meth:`~services.core.book.KlineBooks.set_time_window`): a trade with ``T > now + max_future_skew_ms`` or
   ``T < now - kafka.trades_retention_ms`` is rejected by its book (category ``time``) before it can move the
   book's position. One trade stamped 2090 would otherwise push the book there, and every real trade after it
   would be rejected as late: the symbol would be poisoned. Past trades within the retention are normal (a
   backlog caught up after downtime). A future skew no longer than ``aggregator.repair_horizon_ms`` (the settings
   require it) bounds what an accepted future trade can do: the real trades behind it are still corrections,
   never rejections. Under the event clock (replays) there is no "now", hence no window: ingest, which checks
   every trade against the exchange's own clock, is then the guard.
4. **The book's own checks**: duplicates dropped, trades older than the repair horizon rejected (``late``).

Not covered (no Kafka transactions here): a zombie — a worker the group has already expelled (stuck for longer
than the session timeout) that then wakes up and writes one more checkpoint or snapshot for a partition that
now belongs to another worker. Fencing it would need a transactional producer per partition owner.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from itertools import accumulate, chain
from operator import le
from typing import Any, Final

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from services.aggregator.checkpointer import (
    SEQ_LEASE,
    Checkpointer,
    CheckpointSource,
    GroupConsumer,
    wait_quietly,
)
from services.aggregator.clock import Clock
from services.aggregator.decode import TradeFields, TradesDecoder
from services.aggregator.output import Output
from services.aggregator.state import PartitionState, Phase, Stats
from services.core.book import DEFAULT_REPAIR_HORIZON_MS, KlineBook, KlineBooks, TradeColumns
from services.core.models import AggTrade, InvalidInput, Kline
from services.shared.logs import log_event
from services.shared.messages import Gap, SymbolEvent, TradesRecord, encode_trade_batch
from services.shared.metrics import Distribution

__all__ = ["SEQ_LEASE", "Aggregator", "CheckpointSource", "GroupConsumer", "PartitionState", "Phase", "Stats"]

log = logging.getLogger("services.aggregator")

#: Default of ``persistence.max_in_flight``: output records (finalized klines queued or awaiting their
#: acknowledgement, snapshots waiting, dead letters queued) above which the engine stops fetching trades.
MAX_IN_FLIGHT: Final = 20_000
#: Default of ``aggregator.max_future_skew_ms``: how far past the clock's "now" a trade time may be. The repair
#: horizon: an accepted trade that far ahead moves its book no further than real trades can still correct.
MAX_FUTURE_SKEW_MS: Final = DEFAULT_REPAIR_HORIZON_MS
#: How often a paused input looks whether the output drained (and pushes waiting snapshots meanwhile).
FLOW_POLL_S: Final = 0.01
#: A fetched batch is applied in slices of at most this many bytes of values (about 10,000 trades of a REST
#: backfill page, 1,000 of ingest's live batch records, or 5,000 one-trade records: tens of ms of work) ...
SLICE_BYTES: Final = 1024 * 1024
#: ... or this many records, whichever comes first. Each symbol's records of a slice are folded as one run, so
#: longer slices mean fewer, longer runs: the book's cost per call is about that of ten trades ...
SLICE_RECORDS: Final = 10_000
#: ... and the engine yields to the event loop between two slices once the batch has run this long: a burst of
#: 10^5 closed klines never keeps health checks, metrics or a rebalance waiting for seconds.
YIELD_AFTER_S: Final = 0.02

Batch = Mapping[TopicPartition, Sequence[ConsumerRecord[Any, Any]]]


def _slices(records: Mapping[TopicPartition, Sequence[ConsumerRecord[Any, Any]]]) -> list[Batch]:
    """``records`` cut into slices of at most :data:`SLICE_BYTES` of values (or :data:`SLICE_RECORDS` records),
    each of one partition, in offset order: the units the hot path applies synchronously (protocol step 2)."""
    out: list[Batch] = []
    for tp, batch in records.items():
        # A slice ends at the record whose value reaches SLICE_BYTES, or at its SLICE_RECORDS-th record.
        ends = list(accumulate([len(record.value or b"") for record in batch]))
        start = base = 0
        while start < len(batch):
            end = min(bisect_left(ends, base + SLICE_BYTES, start), start + SLICE_RECORDS - 1, len(batch) - 1)
            out.append({tp: batch[start : end + 1]})
            base = ends[end]
            start = end + 1
    return out


def _merge_slices(slices: Sequence[Batch]) -> Batch:
    merged: dict[TopicPartition, list[ConsumerRecord[Any, Any]]] = {}
    for piece in slices:
        for tp, batch in piece.items():
            merged.setdefault(tp, []).extend(batch)
    return merged


class Aggregator:
    """Trades → klines for the partitions this worker owns; see the module docstring for the protocol."""

    def __init__(
        self,
        *,
        trades_topic: str,
        finalized_topic: str,
        snapshots_topic: str,
        dead_letter_topic: str,
        checkpoint_topic: str,
        intervals: Sequence[str],
        grace_ms: int,
        clock: Clock,
        finalized: AIOKafkaProducer,
        snapshots: AIOKafkaProducer,
        checkpoints: AIOKafkaProducer,
        reader: CheckpointSource,
        checkpoint_every_ticks: int = 1,
        flush_timeout_s: float = 5.0,
        restore_timeout_s: float = 60.0,
        max_in_flight: int = MAX_IN_FLIGHT,
        repair_horizon_ms: int = DEFAULT_REPAIR_HORIZON_MS,
        max_future_skew_ms: int | None = MAX_FUTURE_SKEW_MS,
        max_trade_age_ms: int | None = None,
        symbols: Collection[str] = (),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``max_future_skew_ms`` / ``max_trade_age_ms``: the trade-time window around the clock's "now" (hostile
        input, step 3; None lifts a side); ``symbols``: the allow-list (step 1; empty accepts any symbol)."""
        self.trades_topic = trades_topic
        self.finalized_topic = finalized_topic
        self.snapshots_topic = snapshots_topic
        self.dead_letter_topic = dead_letter_topic
        self.checkpoint_topic = checkpoint_topic
        self.intervals = tuple(intervals)
        self.grace_ms = grace_ms
        self.repair_horizon_ms = repair_horizon_ms
        self.clock = clock
        self._group: GroupConsumer | None = None
        self._checkpoint_every = max(1, checkpoint_every_ticks)
        self._flush_timeout = flush_timeout_s
        self._max_in_flight = max_in_flight
        self._future_skew = max_future_skew_ms
        self._max_age = max_trade_age_ms
        self._allowed = frozenset(symbol.upper() for symbol in symbols) or None
        self._monotonic = monotonic
        self._decoder = TradesDecoder()
        self.stats = Stats()
        self._checkpointer = Checkpointer(
            producer=checkpoints,
            topic=checkpoint_topic,
            reader=reader,
            intervals=self.intervals,
            grace_ms=grace_ms,
            repair_horizon_ms=repair_horizon_ms,
            stats=self.stats,
            restore_timeout_s=restore_timeout_s,
            monotonic=monotonic,
        )
        self._out = Output(
            finalized=finalized,
            snapshots=snapshots,
            finalized_topic=finalized_topic,
            snapshots_topic=snapshots_topic,
            dead_letter_topic=dead_letter_topic,
            stats=self.stats,
            monotonic=monotonic,
        )
        self.parts: dict[int, PartitionState] = {}
        self._parked: dict[int, PartitionState] = {}
        self._accepting = True
        self._assigned_once = False
        self._epoch = 0

    # ------------------------------------------------------------------------------------------ wiring

    def attach(self, group: GroupConsumer) -> None:
        """Connect the consumer group member whose offsets step 6 commits."""
        self._group = group
        self._checkpointer.attach(group)

    @property
    def ready(self) -> bool:
        """Assigned at least once, applying, and no partition still restoring."""
        return (
            self._accepting and self._assigned_once and all(part.phase is Phase.READY for part in self.parts.values())
        )

    # ------------------------------------------------------------------------------------------ hot path

    @property
    def epoch(self) -> int:
        """Changes with every assignment change (revoke or assign)."""
        return self._epoch

    async def handle_batch(
        self, records: Mapping[TopicPartition, Sequence[ConsumerRecord[Any, Any]]], epoch: int
    ) -> Batch | None:
        """Apply one batch whose fetch started during ``epoch`` (after any restore of its partitions finished).

        If the assignment changed since (a rebalance ran while the fetch was waiting), the records may come
        from before or after the rebalance's seek, so they are not applied: each partition of the batch this
        worker owns now is sought back to its resume offset (:meth:`PartitionState.resume_offset`) and read again.

        Applied in slices (protocol step 2). If a rebalance begins while it yields between two slices, the rest
        is not applied and is returned: the caller passes it to :meth:`read_again` once the rebalance is over.
        """
        await self._restores_of(records)
        if epoch != self._epoch:
            await self._read_again_now(records)
            return None
        self.stats.batches += 1
        stats = self.stats
        monotonic = self._monotonic
        turn = monotonic()
        slices = _slices(records)
        for index, piece in enumerate(slices):
            started = monotonic()
            self.apply_batch(piece)
            now = monotonic()
            stats.longest_apply_s = max(stats.longest_apply_s, now - started)
            if now - turn < YIELD_AFTER_S or index == len(slices) - 1:
                continue
            await asyncio.sleep(0)  # serve health checks, metrics, rebalances between slices
            turn = monotonic()
            if not self._accepting:
                return None  # stopping: the rest is read again after the restart, from the committed offset
            if epoch != self._epoch:
                return _merge_slices(slices[index + 1 :])
        return None

    # ------------------------------------------------------------------------------------------ flow control

    def in_flight(self) -> int:
        """Output not yet with the broker: finalized klines queued or unacknowledged, snapshots and dead
        letters waiting. Flow control (protocol step 3) keeps it near ``max_in_flight``."""
        return self._out.in_flight(self.parts.values())

    def has_room(self) -> bool:
        """True while the consumer may fetch more trades (the output is below ``max_in_flight``)."""
        return self.in_flight() <= self._max_in_flight

    async def wait_for_room(self) -> None:
        """Return once the output drained below ``max_in_flight`` (or the engine stops applying).

        The consumer calls this before each fetch: while it waits, no trades are read, so a burst of closed
        klines (a quiet stretch closing, a catch-up) slows the input instead of overflowing the producers.
        Waiting snapshots are pushed meanwhile, as fast as the snapshot producer takes them.
        """
        if self.has_room():
            return
        self.stats.flow_pauses += 1
        started = self._monotonic()
        while self._accepting and not self.has_room():
            for part in list(self.parts.values()):
                if part.phase is Phase.READY:
                    self._out.publish_snapshots(part)
            await asyncio.sleep(FLOW_POLL_S)
        self.stats.flow_paused_s += self._monotonic() - started

    async def read_again(self, records: Mapping[TopicPartition, Sequence[ConsumerRecord[Any, Any]]]) -> None:
        """Do not apply ``records``: seek each partition of theirs this worker owns back to its resume offset.

        For a batch fetched across a rebalance, and for one the consumer dropped because the flow stopped (a
        rebalance began) while it was fetched. That fetch may have returned records from after the rebalance's
        own seek, and moved the fetch position past them: without this seek they would never be read again.
        Call it once the rebalance is over (the flow resumed).
        """
        await self._restores_of(records)
        await self._read_again_now(records)

    async def _read_again_now(self, records: Mapping[TopicPartition, Sequence[ConsumerRecord[Any, Any]]]) -> None:
        """:meth:`read_again` once the restores of the records' partitions are over."""
        self.stats.stale_batches += 1
        log_event(
            log,
            logging.INFO,
            "a batch fetched across a rebalance is read again",
            partitions=sorted(tp.partition for tp in records),
            records=sum(len(batch) for batch in records.values()),
        )
        await self._seek_back(records)

    async def _restores_of(self, records: Mapping[TopicPartition, Sequence[ConsumerRecord[Any, Any]]]) -> None:
        for tp in records:
            part = self.parts.get(tp.partition) if tp.topic == self.trades_topic else None
            if part is not None and part.phase is Phase.RESTORING:
                await part.restored.wait()

    async def _seek_back(self, records: Mapping[TopicPartition, Sequence[ConsumerRecord[Any, Any]]]) -> None:
        if self._group is None:
            return
        self._epoch += 1  # a fetch already in flight may hold records from before this seek: re-read those too
        for tp in records:
            part = self.parts.get(tp.partition) if tp.topic == self.trades_topic else None
            if part is not None and part.phase is Phase.READY:
                try:
                    await self._group.seek(part.tp, part.resume_offset())
                except Exception as exc:  # e.g. revoked again meanwhile: the next assignment seeks anyway
                    log_event(log, logging.WARNING, "seek back failed", partition=part.partition, error=repr(exc))

    def apply_batch(self, records: Mapping[TopicPartition, Sequence[ConsumerRecord[Any, Any]]]) -> None:
        """Protocol steps 2 and 3 for one batch; synchronous, so it is applied whole or not at all."""
        if not self._accepting:
            return
        now = self.clock.now_ms()  # the trade-time window (hostile input, step 3); None: no window
        for tp, batch in records.items():
            if tp.topic != self.trades_topic or not batch:
                continue
            part = self.parts.get(tp.partition)
            if part is None or part.phase is not Phase.READY:
                continue
            if not part.guard_checked:
                self._check_start_offset(part, batch[0].offset)
            part.books.set_time_window(now, self._future_skew, self._max_age)
            self._apply_partition(part, batch)

    def _apply_partition(self, part: PartitionState, batch: Sequence[ConsumerRecord[Any, Any]]) -> None:
        """The hot loop: one partition's records, in offset order (:meth:`_apply_payloads` first).

        A symbol's consecutive records of the decoder's fast layouts (ingest's batches, and Binance's own
        aggTrade payloads, bare or in the combined-stream envelope, one trade per record) are parsed one by one
        but checked and folded as one run of columns: :meth:`_apply_run`. So a symbol's raw payloads cost the
        book what one batch of the same trades costs. Any other record first applies its symbol's run so far,
        then itself (:meth:`_apply_record`). Books are independent, so only the order within a symbol matters.
        """
        if len(batch) > 1 and self._apply_payloads(part, batch):
            return
        items_of = self._decoder.items
        allowed = self._allowed
        books = part.books
        next_offsets = part.next_offsets
        skip_below = next_offsets.get
        runs: dict[str, tuple[list[ConsumerRecord[Any, Any]], list[Sequence[TradeFields]]]] = {}
        touched: dict[str, KlineBook] = {}
        last_offset: dict[str, int] = {}
        replayed = 0
        for record in batch:
            key = record.key
            if key is None:
                self._out.dead_letter(record, "record has no key: trades must be keyed by symbol", "symbol")
                continue
            try:
                symbol = key.decode()
            except UnicodeDecodeError:
                self._out.dead_letter(record, "record key is not UTF-8", "symbol")
                continue
            if allowed is not None and symbol not in allowed:
                self._out.dead_letter(record, f"symbol {symbol[:50]!r} is not on aggregator.symbols", "symbol")
                continue
            offset = record.offset
            if offset < skip_below(symbol, 0):
                replayed += 1
                continue
            last_offset[symbol] = offset
            items = items_of(record.value, symbol)
            if items is not None:
                run = runs.get(symbol)
                if run is None:
                    runs[symbol] = ([record], [items])
                else:
                    run[0].append(record)
                    run[1].append(items)
                continue
            # Not a fast layout (or not for this key): the contract decides (and gives the reason).
            try:
                decoded = self._decoder.decode(record.value, key)
            except InvalidInput as exc:
                self._out.dead_letter(record, exc.reason, exc.category)
                continue
            run = runs.pop(symbol, None)
            if run is not None:
                self._apply_run(touched.get(symbol) or touched.setdefault(symbol, books.book(symbol)), *run)
            if isinstance(decoded, SymbolEvent):
                touched.pop(symbol, None)  # a removal drops the book: a later record starts a new one
                self._end_symbol(part, symbol, decoded)
                continue
            book = touched.get(symbol) or touched.setdefault(symbol, books.book(symbol))
            self._apply_decoded(book, record, decoded)
        for symbol, run in runs.items():
            self._apply_run(touched.get(symbol) or touched.setdefault(symbol, books.book(symbol)), *run)
        stats = self.stats
        stats.records += len(batch)
        stats.records_replayed += replayed
        part.position = batch[-1].offset + 1
        for symbol, offset in last_offset.items():
            next_offsets[symbol] = offset + 1
        part.dirty.update(last_offset)
        for symbol, book in touched.items():
            closed = book.drain_closed()
            if closed:
                self._out.finalize(part, symbol, closed)

    def _apply_payloads(self, part: PartitionState, batch: Sequence[ConsumerRecord[Any, Any]]) -> bool:
        """:meth:`_apply_partition` for a slice of Binance payloads, one per record, without a loop per record.

        Applies the slice and returns True only when every record is keyed by a symbol (on the allow-list, when
        there is one), holds one payload of that symbol in Binance's own layout (:meth:`TradesDecoder.payloads`),
        none is a re-read below its symbol's ``next[S]`` (protocol step 2), and every ``f <= l``; otherwise it
        changes nothing and returns False, and the record-by-record loop decides. The trades are sorted by
        symbol (a stable sort keeps each symbol's records in offset order; books are independent) and cut into
        columns once for the slice, so each symbol's records of the slice reach its book as one run (a stretch
        of the columns), as :meth:`_apply_run` would fold them.
        """
        try:
            symbols = [record.key.decode() for record in batch]
        except (AttributeError, UnicodeDecodeError):  # no key, not UTF-8: the loop dead-letters it
            return False
        if self._allowed is not None and not self._allowed.issuperset(symbols):
            return False  # the loop dead-letters the others
        payloads = self._decoder.payloads([record.value for record in batch], symbols)
        if payloads is None:
            return False
        offsets = [record.offset for record in batch]
        next_offsets = part.next_offsets
        skip_below = next_offsets.get
        first_offset = dict(zip(reversed(symbols), reversed(offsets), strict=True))
        if any(offset < skip_below(symbol, 0) for symbol, offset in first_offset.items()):
            return False  # a re-read after a restore or a seek back: the loop skips record by record
        # Sorted by symbol (stably: each symbol's records stay in offset order), each symbol's trades are one
        # stretch of the columns, handed to its book as list slices.
        order = sorted(range(len(symbols)), key=symbols.__getitem__)
        trades = [payloads[k] for k in order]
        firsts = [t.f for t in trades]
        lasts = [t.l for t in trades]
        if not all(map(le, firsts, lasts)):
            return False
        ids, times, makers = [t.a for t in trades], [t.T for t in trades], [t.m for t in trades]
        prices, quantities = [t.p for t in trades], [t.q for t in trades]
        books = part.books
        touched: list[tuple[str, KlineBook]] = []
        applied = start = 0
        for symbol, count in sorted(Counter(symbols).items()):
            end = start + count
            book = books.book(symbol)
            touched.append((symbol, book))
            run: TradeColumns = (
                ids[start:end], times[start:end], prices[start:end], quantities[start:end],
                firsts[start:end], lasts[start:end], makers[start:end],
            )  # fmt: skip
            try:
                folded = book.extend(run)
            except Exception as exc:  # the book rejects bad trades itself; this guards against a bug
                log.exception("the book of %s raised on a run of records", symbol)
                for k in order[start:end]:
                    self._out.dead_letter(batch[k], f"internal error applying the batch: {exc!r}", "internal")
            else:
                if folded:
                    applied += count
                else:  # not simply the next trades, or a price the book refuses: record by record
                    self._apply_run(book, [batch[k] for k in order[start:end]], [[t] for t in trades[start:end]])
            start = end
        stats = self.stats
        stats.records += len(batch)
        stats.trades_applied += applied
        part.position = offsets[-1] + 1
        last_offset = dict(zip(symbols, offsets, strict=True))
        for symbol, offset in last_offset.items():
            next_offsets[symbol] = offset + 1
        part.dirty.update(last_offset)
        for symbol, book in touched:
            closed = book.drain_closed()
            if closed:
                self._out.finalize(part, symbol, closed)
        return True

    def _apply_run(
        self, book: KlineBook, records: list[ConsumerRecord[Any, Any]], parts: list[Sequence[TradeFields]]
    ) -> None:
        """One symbol's consecutive records of the fast layouts (batches, Binance payloads, in any mix):
        checked and folded at once when they simply continue its stream (nearly always), else record by record."""
        checked = self._decoder.checked
        # Prices and quantities are checked by extend() itself (it refuses a text the contract would refuse).
        columns = self._decoder.columns_of(parts[0] if len(parts) == 1 else list(chain.from_iterable(parts)))
        if columns is not None:
            try:
                folded = book.extend(columns)
            except Exception as exc:  # the book rejects bad trades itself; this guards against a bug
                log.exception("the book of %s raised on a run of records", book.symbol)
                for record in records:
                    self._out.dead_letter(record, f"internal error applying the batch: {exc!r}", "internal")
                return
            if folded:
                self.stats.trades_applied += len(columns[0])
                return
        for record, items in zip(records, parts, strict=True):
            one = checked(items)
            if one is not None:
                self._apply_record(book, record, one)
                continue
            try:  # a check failed: the contract gives the reason (or, against expectations, accepts it)
                decoded = self._decoder.decode(record.value, record.key)
            except InvalidInput as exc:
                self._out.dead_letter(record, exc.reason, exc.category)
                continue
            self._apply_decoded(book, record, decoded)

    def _apply_decoded(self, book: KlineBook, record: ConsumerRecord[Any, Any], decoded: TradesRecord) -> None:
        """A record the contract's decoder accepted: a gap marks the book, a batch is applied (a symbol record
        never reaches a book: :meth:`_apply_partition` hands it to :meth:`_end_symbol`)."""
        if isinstance(decoded, Gap):
            book.mark_gap(decoded.to_a)  # open until the first trade past it (KlineBook.mark_gap)
            self.stats.gaps += 1
        elif isinstance(decoded, SymbolEvent):  # not a fast layout, so never inside a run of trades
            self._out.dead_letter(record, "a symbol record cannot be applied to a book", "internal")
        else:
            self._apply_record(book, record, decoded.trades)

    def _end_symbol(self, part: PartitionState, symbol: str, event: SymbolEvent) -> None:
        """Symbol lifecycle, steps 1-3 (module docstring): a removal closes the symbol's open klines as they
        stand, sends them as finalized and drops the book; ``next[S]`` stays (the caller moves it past the
        record), and the symbol is dirty, so its checkpoint becomes a tombstone. An addition changes nothing."""
        if not event.removed:
            self.stats.symbols_added += 1
            return
        book = part.books.remove(symbol)
        if book is None:
            return  # no book: nothing open (a removal read again, or a symbol that never traded here)
        self.stats.symbols_removed += 1
        closed = book.close()
        if closed:
            self._out.finalize(part, symbol, closed)
        part.dirty.add(symbol)
        log_event(
            log,
            logging.INFO,
            "symbol removed: its open klines are finalized and its book dropped",
            partition=part.partition,
            symbol=symbol,
            last_a=event.last_a,
            klines_closed=len(closed),
            reason=event.reason,
        )

    def _apply_record(
        self, book: KlineBook, record: ConsumerRecord[Any, Any], trades: list[AggTrade] | TradeColumns
    ) -> None:
        """Apply one record's trades (objects or checked columns); the book's rejections go to the DLQ."""
        rejected_before = book.rejected
        try:
            if isinstance(trades, list):
                book.apply(trades)
                count = len(trades)
            else:
                book.apply_columns(trades)
                count = len(trades[0])
        except Exception as exc:  # the book rejects bad trades itself; this guards against a bug
            log.exception("the book of %s raised on the record at offset %s", book.symbol, record.offset)
            self._out.dead_letter(record, f"internal error applying the batch: {exc!r}", "internal")
            return
        self.stats.trades_applied += count - (book.rejected - rejected_before)
        if book.rejected != rejected_before:
            for rejected in book.drain_rejected():
                self._out.dead_letter(
                    record,
                    rejected.reason,
                    rejected.category,
                    value=encode_trade_batch(rejected.trade.s, [rejected.trade]),
                )

    def _check_start_offset(self, part: PartitionState, first: int) -> None:
        """Detect (never expected) a group offset past the restored marker: trades would have been skipped."""
        part.guard_checked = True
        log_event(
            log,
            logging.INFO,
            "first trades record after a restore",
            partition=part.partition,
            offset=first,
            checkpoint_offset=part.restored_from,
        )
        if part.restored_from is not None and first > part.restored_from:
            self.stats.offset_guard_errors += 1
            log_event(
                log,
                logging.ERROR,
                "the first trades offset after a restore is past the checkpoint: records in between are skipped",
                log_type="DATA_LOSS",
                partition=part.partition,
                checkpoint_offset=part.restored_from,
                first_offset=first,
            )

    # ------------------------------------------------------------------------------------------ clock

    async def run_clock(self, interval_ms: int) -> None:
        """Call :meth:`tick` every ``interval_ms`` (monotonic schedule, no drift) until cancelled."""
        period = interval_ms / 1000
        due = self._monotonic() + period
        while True:
            await asyncio.sleep(max(0.0, due - self._monotonic()))
            due += period
            if due < self._monotonic():  # fell behind (a long pause): do not tick in a burst
                due = self._monotonic() + period
            try:
                self.tick()
            except Exception:
                log.exception("clock tick failed")

    def tick(self) -> None:
        """Close quiet klines (when caught up), publish snapshots, start checkpoints (protocol 4)."""
        stats = self.stats
        stats.ticks += 1
        now = self.clock.now_ms()
        checkpoint = stats.ticks % self._checkpoint_every == 0
        for part in list(self.parts.values()):
            if part.phase is not Phase.READY:
                continue
            if now is not None and self._caught_up(part):
                part.books.advance(now)
                for book_symbol, closed in self._drain_all_closed(part.books):
                    self._out.finalize(part, book_symbol, closed)
            self._out.publish_snapshots(part)
            if checkpoint:
                self._checkpointer.start(part)

    @staticmethod
    def _drain_all_closed(books: KlineBooks) -> list[tuple[str, list[Kline]]]:
        out: list[tuple[str, list[Kline]]] = []
        for symbol in books.symbols():
            closed = books.book(symbol).drain_closed()
            if closed:
                out.append((symbol, closed))
        return out

    def _caught_up(self, part: PartitionState) -> bool:
        if self._group is None:
            return True
        highwater = self._highwater(part.tp)
        return highwater is not None and part.read_position() >= highwater

    def _highwater(self, tp: TopicPartition) -> int | None:
        assert self._group is not None
        try:
            return self._group.highwater(tp)
        except Exception:  # not assigned (any more), consumer stopping
            return None

    # ------------------------------------------------------------------------------------------ rebalance

    async def on_revoked(self, tps: Iterable[TopicPartition], timeout_s: float = 10.0) -> None:
        """Protocol step 8 (first half): final checkpoint and commit, then park the partitions' state."""
        self._epoch += 1
        revoked = [
            self.parts.pop(tp.partition) for tp in tps if tp.topic == self.trades_topic and tp.partition in self.parts
        ]
        if not revoked:
            return
        ready = [part for part in revoked if part.phase is Phase.READY]
        for part in revoked:
            part.phase = Phase.REVOKED
            part.restored.set()  # wake a batch waiting for this restore: it is not applied (epoch changed)
        deadline = self._monotonic() + timeout_s
        await self._out.flush_finalized(min(self._flush_timeout, timeout_s / 2))
        done = await self._checkpointer.final(ready, deadline - self._monotonic())
        # The snapshot backlog too, while this member still owns the partitions: a kline closed since the last
        # tick waits there, and a new owner restores books, not the backlog, so its last snapshot would be lost.
        await self._out.flush_snapshots(ready, deadline)
        self._parked = {part.partition: part for part in ready if part.partition in done}
        self._out.disown(part for part in revoked if part.partition not in self._parked)
        log_event(
            log,
            logging.INFO,
            "partitions revoked",
            partitions=sorted(part.partition for part in revoked),
            parked=sorted(self._parked),
        )

    async def on_assigned(self, tps: Iterable[TopicPartition]) -> None:
        """Protocol steps 7 and 8 (second half): continue parked partitions, restore the others."""
        self._epoch += 1
        parked, self._parked = self._parked, {}
        restoring: list[PartitionState] = []
        for tp in tps:
            if tp.topic != self.trades_topic or tp.partition in self.parts:
                continue
            part = parked.pop(tp.partition, None)
            if part is not None:
                part.phase = Phase.READY
                part.guard_checked = True
                self.parts[tp.partition] = part
                self.stats.reused_partitions += 1
                continue
            part = PartitionState(
                tp, KlineBooks(self.intervals, self.grace_ms, repair_horizon_ms=self.repair_horizon_ms)
            )
            self.parts[tp.partition] = part
            restoring.append(part)
        self._out.disown(parked.values())
        self._assigned_once = True
        if restoring:
            await self._restore(restoring)
        log_event(
            log,
            logging.INFO,
            "partitions assigned",
            partitions=sorted(self.parts),
            restored=sorted(part.partition for part in restoring),
        )

    async def _restore(self, parts: list[PartitionState]) -> None:
        """Protocol step 7."""
        started = self._monotonic()
        checkpoints = await self._checkpointer.read(parts)
        for part in parts:
            if self.parts.get(part.partition) is not part:
                continue  # revoked again meanwhile
            self._checkpointer.install(part, checkpoints[part.partition])
        for part in parts:
            if self.parts.get(part.partition) is part:
                # Claim a fresh snapshot lease before any snapshot; a failure only delays snapshots.
                flight = self._checkpointer.start(part, force=True)
                if flight is not None:
                    await wait_quietly(flight, self._flush_timeout)
        for part in parts:
            if self.parts.get(part.partition) is not part:
                continue
            restored = [kline for pending in part.unconfirmed.values() for kline in pending.values()]
            self._out.resend(part, restored)
            part.phase = Phase.READY
            part.restored.set()
            self.stats.restores += 1
        log_event(
            log,
            logging.INFO,
            "partitions restored from the checkpoint topic",
            partitions=[part.partition for part in parts],
            symbols=sum(len(checkpoints[part.partition].symbols) for part in parts),
            checkpoint_offsets={part.partition: part.restored_from for part in parts},
            seconds=round(self._monotonic() - started, 3),
        )

    # ------------------------------------------------------------------------------------------ stop

    async def stop(self, timeout_s: float) -> None:
        """Protocol step 9 (the engine's part): stop applying, last snapshots, flush, checkpoint, commit."""
        deadline = self._monotonic() + timeout_s
        self._accepting = False
        parts = [part for part in self.parts.values() if part.phase is Phase.READY]
        await self._out.flush_finalized(min(self._flush_timeout, (deadline - self._monotonic()) / 2))
        done = await self._checkpointer.final(parts, deadline - self._monotonic())
        await self._out.flush_snapshots(parts, deadline)
        await self._out.close()
        missing = sorted({part.partition for part in parts} - done)
        log_event(
            log,
            logging.INFO if not missing else logging.WARNING,
            "aggregator stopped applying; state checkpointed",
            partitions=sorted(part.partition for part in parts),
            not_checkpointed=missing,
        )

    # ------------------------------------------------------------------------------------------ views

    def current(self, symbol: str | None = None, interval: str | None = None) -> list[Kline]:
        """In-progress klines of the ready partitions (each symbol's klines read at one instant)."""
        out: list[Kline] = []
        for part in self.parts.values():
            if part.phase is Phase.READY:
                out.extend(part.books.current(symbol, interval))
        return out

    def lag(self) -> int | None:
        """Records not yet read in the owned partitions; None while a high watermark is unknown."""
        if self._group is None:
            return None
        total = 0
        for part in self.parts.values():
            highwater = self._highwater(part.tp)
            if highwater is None or part.phase is not Phase.READY:
                return None
            total += max(0, highwater - part.read_position())
        return total

    @property
    def close_to_produced(self) -> Mapping[str, Distribution]:
        """Per interval: how long after its interval ended a finalized kline was acknowledged by the broker."""
        return self._out.close_to_produced

    def metrics(self) -> dict[str, Any]:
        stats = self.stats
        late = duplicates = rejected = 0
        for part in self.parts.values():
            late += part.books.late
            duplicates += part.books.duplicates
            rejected += part.books.rejected
        return {
            **vars(stats),
            "late_trades": late,
            "duplicate_trades": duplicates,
            "rejected_trades": rejected,
            "decoded_fast": self._decoder.fast,
            "decoded_slow": self._decoder.slow,
            "lag": self.lag(),
            "partitions": sorted(self.parts),
            "read_offsets": {p: part.read_position() for p, part in self.parts.items() if part.phase is Phase.READY},
            "partitions_restoring": sorted(p for p, part in self.parts.items() if part.phase is Phase.RESTORING),
            "unconfirmed_finalized": sum(len(v) for part in self.parts.values() for v in part.unconfirmed.values()),
            **self._out.metrics(),
            "in_flight": self.in_flight(),
            "max_in_flight": self._max_in_flight,
            "snapshot_backlog": sum(len(part.snapshot_backlog) for part in self.parts.values()),
            "ready": self.ready,
        }
