"""The aggregator's engine: trades batches in, klines out, state checkpointed; the recovery protocol lives here.

:class:`Aggregator` owns one :class:`PartitionState` (a :class:`~services.core.book.KlineBooks` plus bookkeeping)
per assigned ``trades`` partition. It is driven by three callers, all on one event loop:

* the batch consumer (:mod:`services.aggregator.app`) calls :meth:`Aggregator.handle_batch` with every batch of
  records Faust's consumer fetched — the hot path, synchronous and never awaiting I/O;
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
   ``o >= next[S]``; then ``next[S] = o + 1`` and ``S`` is dirty. A fetched batch is applied in one synchronous
   call, so a cancellation (rebalance, stop) can only fall between batches, never inside one.
3. **Finalize without waiting.** A kline that closes is handed to the producer of ``klines.finalized`` with
   :func:`~services.aggregator.sending.try_send`; its delivery future is not awaited. Until the future resolves
   the kline stays in ``unconfirmed[S]``. A full buffer (or a failed delivery) is one ERROR log with
   ``log_type=DATA_LOSS`` and a counter — no retry queue.
4. **Checkpoint the dirty symbols** (each tick; at most one checkpoint in flight per partition). Synchronously
   export each dirty symbol's book, ``next[S]`` and ``unconfirmed[S]``, and note ``N = position``. A background
   task sends the symbol records and awaits every acknowledgement. If one fails, those symbols are dirty again
   and the checkpoint ends here: no marker, no commit.
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

Snapshot sequence numbers are one counter per partition, so they increase per key; a restart continues above the
newest lease on the topic, which is above every number used before. The clock closes quiet klines of a
partition only when the partition is read to its high watermark, so a restart with a backlog never closes a
kline before its trades are applied.

Not covered (no Kafka transactions here): a zombie — a worker the group has already expelled (stuck for longer
than the session timeout) that then wakes up and writes one more checkpoint or snapshot for a partition that
now belongs to another worker. Fencing it would need a transactional producer per partition owner.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from typing import Any, Final, Protocol

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from services.aggregator.checkpoint import (
    MARKER_KEY,
    PartitionCheckpoint,
    encode_marker,
    encode_symbol,
)
from services.aggregator.clock import Clock, TradeTimeClock
from services.aggregator.decode import Trade, TradesDecoder
from services.aggregator.sending import NotEnqueued, try_send
from services.core.book import KlineBook, KlineBooks, TradeColumns
from services.core.models import AggTrade, InvalidInput, Kline
from services.shared.logs import log_event
from services.shared.messages import Gap, TradeBatch, dead_letter_value, encode_kline, encode_trade_batch, kline_key

log = logging.getLogger("services.aggregator")

SERVICE: Final = "aggregator"
#: Snapshot sequence numbers a partition may use beyond the newest confirmed marker (renewed every checkpoint).
SEQ_LEASE: Final = 1 << 24
#: At most this many klines wait for a snapshot per partition (the oldest closed ones go first).
SNAPSHOT_BACKLOG_LIMIT: Final = 200_000


class GroupConsumer(Protocol):
    """What the engine needs from the consumer group member (Faust's consumer in production)."""

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> bool: ...

    def highwater(self, tp: TopicPartition) -> int | None: ...

    async def seek(self, tp: TopicPartition, offset: int | None) -> None:
        """Read ``tp`` next from ``offset`` (``None``: from the start of the log)."""


class CheckpointSource(Protocol):
    """Where a restore reads checkpoints from (:class:`~services.aggregator.checkpoint.CheckpointReader`)."""

    async def read(self, partitions: Iterable[int], timeout_s: float) -> dict[int, PartitionCheckpoint]: ...


class Phase(enum.Enum):
    RESTORING = "restoring"
    READY = "ready"
    REVOKED = "revoked"


@dataclass(eq=False)
class PartitionState:
    """One trades partition's books and the bookkeeping of the recovery protocol."""

    tp: TopicPartition
    books: KlineBooks
    phase: Phase = Phase.RESTORING
    restored: asyncio.Event = field(default_factory=asyncio.Event)
    next_offsets: dict[str, int] = field(default_factory=dict)
    position: int | None = None
    restored_from: int | None = None
    dirty: set[str] = field(default_factory=set)
    unconfirmed: dict[str, dict[tuple[str, int, int], Kline]] = field(default_factory=dict)
    snapshot_backlog: dict[tuple[str, str, int], Kline] = field(default_factory=dict)
    seq: int = 0
    seq_limit: int = 0
    flight: asyncio.Task[bool] | None = None
    checkpointed: int | None = None
    committed: int | None = None
    guard_checked: bool = False

    @property
    def partition(self) -> int:
        return int(self.tp.partition)

    def read_position(self) -> int:
        if self.position is not None:
            return self.position
        return self.restored_from if self.restored_from is not None else 0


@dataclass
class Stats:
    """Counters of the hot path (plain ints: the hot path must not pay for a metrics library)."""

    records: int = 0
    batches: int = 0
    trades_applied: int = 0
    records_replayed: int = 0
    gaps: int = 0
    dead_letters: int = 0
    dead_letters_dropped: int = 0
    klines_finalized: int = 0
    finalized_confirmed: int = 0
    data_loss: int = 0
    snapshots_sent: int = 0
    snapshots_deferred: int = 0
    snapshots_dropped: int = 0
    checkpoints: int = 0
    checkpoint_failures: int = 0
    commits: int = 0
    restores: int = 0
    restored_symbols: int = 0
    reused_partitions: int = 0
    resent_finalized: int = 0
    ticks: int = 0
    offset_guard_errors: int = 0
    stale_batches: int = 0


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
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.trades_topic = trades_topic
        self.finalized_topic = finalized_topic
        self.snapshots_topic = snapshots_topic
        self.dead_letter_topic = dead_letter_topic
        self.checkpoint_topic = checkpoint_topic
        self.intervals = tuple(intervals)
        self.grace_ms = grace_ms
        self.clock = clock
        self._observe = clock.observe if isinstance(clock, TradeTimeClock) else None
        self._finalized = finalized
        self._snapshots = snapshots
        self._checkpoints = checkpoints
        self._reader = reader
        self._group: GroupConsumer | None = None
        self._checkpoint_every = max(1, checkpoint_every_ticks)
        self._flush_timeout = flush_timeout_s
        self._restore_timeout = restore_timeout_s
        self._monotonic = monotonic
        self._decoder = TradesDecoder()
        self.parts: dict[int, PartitionState] = {}
        self._parked: dict[int, PartitionState] = {}
        self._accepting = True
        self._assigned_once = False
        self.stats = Stats()
        self._epoch = 0

    # ------------------------------------------------------------------------------------------ wiring

    def attach(self, group: GroupConsumer) -> None:
        """Connect the consumer group member whose offsets step 6 commits."""
        self._group = group

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
    ) -> None:
        """Apply one batch whose fetch started during ``epoch`` (after any restore of its partitions finished).

        If the assignment changed since (a rebalance ran while the fetch was waiting), the records may come
        from before or after the rebalance's seek, so they are not applied: each partition of the batch this
        worker owns now is sought back to its resume offset (:meth:`resume_offset`) and read again from there.
        """
        await self._restores_of(records)
        if epoch != self._epoch:
            await self._read_again_now(records)
            return
        self.apply_batch(records)

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

    def resume_offset(self, part: PartitionState) -> int | None:
        """Where reading may resume without a gap: after the last applied record, else the restored marker.

        ``None`` means "from the start of the log" (no marker: nothing of this partition was ever committed).
        """
        return part.position if part.position is not None else part.restored_from

    async def _seek_back(self, records: Mapping[TopicPartition, Sequence[ConsumerRecord[Any, Any]]]) -> None:
        if self._group is None:
            return
        self._epoch += 1  # a fetch already in flight may hold records from before this seek: re-read those too
        for tp in records:
            part = self.parts.get(tp.partition) if tp.topic == self.trades_topic else None
            if part is not None and part.phase is Phase.READY:
                try:
                    await self._group.seek(part.tp, self.resume_offset(part))
                except Exception as exc:  # e.g. revoked again meanwhile: the next assignment seeks anyway
                    log_event(log, logging.WARNING, "seek back failed", partition=part.partition, error=repr(exc))

    def apply_batch(self, records: Mapping[TopicPartition, Sequence[ConsumerRecord[Any, Any]]]) -> None:
        """Protocol steps 2 and 3 for one batch; synchronous, so it is applied whole or not at all."""
        if not self._accepting:
            return
        self.stats.batches += 1
        for tp, batch in records.items():
            if tp.topic != self.trades_topic or not batch:
                continue
            part = self.parts.get(tp.partition)
            if part is None or part.phase is not Phase.READY:
                continue
            if not part.guard_checked:
                self._check_start_offset(part, batch[0].offset)
            self._apply_partition(part, batch)

    def _apply_partition(self, part: PartitionState, batch: Sequence[ConsumerRecord[Any, Any]]) -> None:
        """The hot loop: one partition's records, in offset order.

        A symbol's consecutive batch records (ingest's layout) are parsed one by one but checked and folded as
        one run: :meth:`_apply_run`. Any other record first applies its symbol's run so far, then itself
        (:meth:`_apply_record`). Books are independent, so only the order within a symbol matters.
        """
        items_of = self._decoder.items
        books = part.books
        next_offsets = part.next_offsets
        skip_below = next_offsets.get
        runs: dict[str, tuple[list[ConsumerRecord[Any, Any]], list[list[Trade]]]] = {}
        touched: dict[str, KlineBook] = {}
        last_offset: dict[str, int] = {}
        replayed = 0
        for record in batch:
            key = record.key
            if key is None:
                self._dead_letter(record, "record has no key: trades must be keyed by symbol")
                continue
            try:
                symbol = key.decode()
            except UnicodeDecodeError:
                self._dead_letter(record, "record key is not UTF-8")
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
            # Not ingest's batch layout: the contract decides (and gives the reason).
            try:
                decoded = self._decoder.decode(record.value, key)
            except InvalidInput as exc:
                self._dead_letter(record, exc.reason)
                continue
            book = touched.get(symbol) or touched.setdefault(symbol, books.book(symbol))
            run = runs.pop(symbol, None)
            if run is not None:
                self._apply_run(book, *run)
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
                self._finalize(part, symbol, closed)

    def _apply_run(self, book: KlineBook, records: list[ConsumerRecord[Any, Any]], parts: list[list[Trade]]) -> None:
        """One symbol's consecutive batch records: checked and folded at once when they simply continue its
        stream (nearly always), else record by record."""
        checked = self._decoder.checked
        # Prices and quantities are checked by extend() itself (it refuses a text the contract would refuse).
        columns = self._decoder.columns_of(parts[0] if len(parts) == 1 else list(chain.from_iterable(parts)))
        if columns is not None:
            try:
                folded = book.extend(columns)
            except Exception as exc:  # the book rejects bad trades itself; this guards against a bug
                log.exception("the book of %s raised on a run of records", book.symbol)
                for record in records:
                    self._dead_letter(record, f"internal error applying the batch: {exc!r}")
                return
            if folded:
                self.stats.trades_applied += len(columns[0])
                if self._observe is not None:
                    self._observe(columns[1][-1])
                return
        for record, items in zip(records, parts, strict=True):
            one = checked(items)
            if one is not None:
                self._apply_record(book, record, one)
                continue
            try:  # a check failed: the contract gives the reason (or, against expectations, accepts it)
                decoded = self._decoder.decode(record.value, record.key)
            except InvalidInput as exc:
                self._dead_letter(record, exc.reason)
                continue
            self._apply_decoded(book, record, decoded)

    def _apply_decoded(self, book: KlineBook, record: ConsumerRecord[Any, Any], decoded: TradeBatch | Gap) -> None:
        """A record the contract's decoder accepted: a gap marks the book, a batch is applied."""
        if isinstance(decoded, Gap):
            book.mark_gap()
            self.stats.gaps += 1
        else:
            self._apply_record(book, record, decoded.trades)

    def _apply_record(
        self, book: KlineBook, record: ConsumerRecord[Any, Any], trades: list[AggTrade] | TradeColumns
    ) -> None:
        """Apply one record's trades (objects or checked columns); the book's rejections go to the DLQ."""
        rejected_before = book.rejected
        try:
            if isinstance(trades, list):
                book.apply(trades)
                count, last_time = len(trades), trades[-1].T
            else:
                book.apply_columns(trades)
                count, last_time = len(trades[0]), trades[1][-1]
        except Exception as exc:  # the book rejects bad trades itself; this guards against a bug
            log.exception("the book of %s raised on the record at offset %s", book.symbol, record.offset)
            self._dead_letter(record, f"internal error applying the batch: {exc!r}")
            return
        self.stats.trades_applied += count
        if book.rejected != rejected_before:
            for rejected in book.drain_rejected():
                self._dead_letter(record, rejected.reason, value=encode_trade_batch(rejected.trade.s, [rejected.trade]))
        if self._observe is not None:
            self._observe(last_time)

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

    # ------------------------------------------------------------------------------------------ output

    def _finalize(self, part: PartitionState, symbol: str, closed: Iterable[Kline]) -> None:
        """Protocol step 3: hand each closed kline to the finalized producer, never waiting."""
        pending = part.unconfirmed.setdefault(symbol, {})
        backlog = part.snapshot_backlog
        for kline in closed:
            backlog[(symbol, kline.i, kline.t)] = kline
            self._send_finalized(part, pending, kline)
        part.dirty.add(symbol)

    def _send_finalized(self, part: PartitionState, pending: dict[tuple[str, int, int], Kline], kline: Kline) -> None:
        try:
            future = try_send(
                self._finalized,
                self.finalized_topic,
                encode_kline(kline),
                key=kline_key(kline.s, kline.i),
            )
        except NotEnqueued as exc:
            self._data_loss(kline, exc.reason)
            return
        self.stats.klines_finalized += 1
        ident = (kline.i, kline.t, kline.version)
        pending[ident] = kline
        future.add_done_callback(partial(self._finalized_done, part, kline, ident))

    def _finalized_done(
        self, part: PartitionState, kline: Kline, ident: tuple[str, int, int], future: asyncio.Future[Any]
    ) -> None:
        pending = part.unconfirmed.get(kline.s)
        if pending is not None:
            pending.pop(ident, None)
            if not pending:
                del part.unconfirmed[kline.s]
        part.dirty.add(kline.s)
        if future.cancelled():
            self._data_loss(kline, "delivery cancelled")
        elif future.exception() is not None:
            self._data_loss(kline, f"delivery failed: {future.exception()!r}")
        else:
            self.stats.finalized_confirmed += 1

    def _data_loss(self, kline: Kline, reason: str) -> None:
        self.stats.data_loss += 1
        log_event(
            log,
            logging.ERROR,
            "a finalized kline was dropped: the finalized producer's buffer is full or delivery failed",
            log_type="DATA_LOSS",
            symbol=kline.s,
            interval=kline.i,
            open_time=kline.t,
            version=kline.version,
            reason=reason,
        )

    def _dead_letter(self, record: ConsumerRecord[Any, Any], reason: str, *, value: bytes | None = None) -> None:
        self.stats.dead_letters += 1
        payload = dead_letter_value(
            SERVICE,
            reason,
            record.value if value is None else value,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
        )
        try:
            try_send(self._snapshots, self.dead_letter_topic, payload, key=record.key)
        except NotEnqueued as exc:
            self.stats.dead_letters_dropped += 1
            log_event(
                log,
                logging.ERROR,
                "a rejected trades record could not be dead-lettered",
                log_type="DEAD_LETTER_DROPPED",
                partition=record.partition,
                offset=record.offset,
                reason=reason,
                send_error=exc.reason,
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
                    self._finalize(part, book_symbol, closed)
            self._publish_snapshots(part)
            if checkpoint:
                self._start_checkpoint(part)

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

    def _publish_snapshots(self, part: PartitionState) -> None:
        backlog = part.snapshot_backlog
        for kline in part.books.drain_changed():
            backlog[(kline.s, kline.i, kline.t)] = kline
        if not backlog:
            return
        sent: list[tuple[str, str, int]] = []
        for ident, kline in backlog.items():
            if part.seq >= part.seq_limit:
                self.stats.snapshots_deferred += 1
                break
            try:
                try_send(
                    self._snapshots,
                    self.snapshots_topic,
                    encode_kline(kline, part.seq),
                    key=kline_key(kline.s, kline.i),
                )
            except NotEnqueued:
                self.stats.snapshots_deferred += 1
                break
            part.seq += 1
            sent.append(ident)
        for ident in sent:
            del backlog[ident]
        self.stats.snapshots_sent += len(sent)
        overflow = len(backlog) - SNAPSHOT_BACKLOG_LIMIT
        if overflow > 0:
            for ident in list(backlog)[:overflow]:
                del backlog[ident]
            self.stats.snapshots_dropped += overflow

    # ------------------------------------------------------------------------------------------ checkpoints

    def _start_checkpoint(self, part: PartitionState, *, force: bool = False) -> asyncio.Task[bool] | None:
        """Protocol step 4: export the dirty symbols now, send them (and then the marker) in the background."""
        if part.flight is not None and not part.flight.done():
            return None
        position = part.position if part.position is not None else part.restored_from
        renew = part.seq_limit - part.seq < SEQ_LEASE // 2
        if not part.dirty and not force and not renew and position == part.checkpointed:
            return None
        symbols = part.dirty
        part.dirty = set()
        records = []
        for symbol in symbols:
            unconfirmed = part.unconfirmed.get(symbol, {})
            state = part.books.book(symbol).export_state()
            value = encode_symbol(symbol, part.next_offsets.get(symbol, 0), state, unconfirmed.values())
            records.append((symbol.encode(), value))
        lease = part.seq + SEQ_LEASE
        marker = encode_marker(part.partition, position, lease, len(part.next_offsets))
        part.flight = asyncio.create_task(self._fly(part, symbols, records, marker, position, lease))
        return part.flight

    async def _fly(
        self,
        part: PartitionState,
        symbols: set[str],
        records: list[tuple[bytes, bytes]],
        marker: bytes,
        position: int | None,
        lease: int,
    ) -> bool:
        """Protocol steps 4-6 for one checkpoint: symbol records, acknowledged; marker, acknowledged; commit."""
        producer = self._checkpoints
        topic = self.checkpoint_topic
        try:
            futures = [await producer.send(topic, value, key=key, partition=part.partition) for key, value in records]
            await asyncio.gather(*futures)
            await (await producer.send(topic, marker, key=MARKER_KEY, partition=part.partition))
        except Exception as exc:
            part.dirty |= symbols
            self.stats.checkpoint_failures += 1
            log_event(
                log,
                logging.WARNING,
                "checkpoint not written; its symbols will be written again",
                partition=part.partition,
                symbols=len(symbols),
                error=repr(exc),
            )
            return False
        self.stats.checkpoints += 1
        part.seq_limit = max(part.seq_limit, lease)
        part.checkpointed = position
        if position is not None and self._group is not None and (part.committed is None or position > part.committed):
            try:
                if await self._group.commit({part.tp: position}):
                    part.committed = position
                    self.stats.commits += 1
            except Exception as exc:
                log_event(log, logging.WARNING, "commit failed", partition=part.partition, error=repr(exc))
        return True

    async def _checkpoint_now(self, parts: Iterable[PartitionState], timeout_s: float) -> set[int]:
        """Await any flight in progress, then one final checkpoint per partition; the partitions that made it."""
        deadline = self._monotonic() + timeout_s
        parts = list(parts)
        done: set[int] = set()
        for part in parts:
            if part.flight is not None and not part.flight.done():
                await _wait_quietly(part.flight, deadline - self._monotonic())
        flights: dict[int, asyncio.Task[bool]] = {}
        for part in parts:
            if part.flight is not None and not part.flight.done():
                continue  # still stuck after the wait: this partition's final checkpoint is lost
            flight = self._start_checkpoint(part, force=True)
            if flight is not None:
                flights[part.partition] = flight
            elif part.checkpointed is not None or part.position is None:
                done.add(part.partition)
        for partition, flight in flights.items():
            if await _wait_quietly(flight, deadline - self._monotonic()):
                done.add(partition)
        return done

    async def _flush_finalized(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._finalized.flush(), max(0.1, timeout_s))
        except Exception as exc:
            log_event(log, logging.WARNING, "finalized producer did not flush in time", error=repr(exc))

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
        await self._flush_finalized(min(self._flush_timeout, timeout_s / 2))
        done = await self._checkpoint_now(ready, deadline - self._monotonic())
        self._parked = {part.partition: part for part in ready if part.partition in done}
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
            part = PartitionState(tp, KlineBooks(self.intervals, self.grace_ms))
            self.parts[tp.partition] = part
            restoring.append(part)
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
        checkpoints = await self._reader.read([part.partition for part in parts], self._restore_timeout)
        for part in parts:
            if self.parts.get(part.partition) is not part:
                continue  # revoked again meanwhile
            self._install(part, checkpoints[part.partition])
        for part in parts:
            if self.parts.get(part.partition) is part:
                # Claim a fresh snapshot lease before any snapshot; a failure only delays snapshots.
                flight = self._start_checkpoint(part, force=True)
                if flight is not None:
                    await _wait_quietly(flight, self._flush_timeout)
        for part in parts:
            if self.parts.get(part.partition) is not part:
                continue
            for symbol, pending in list(part.unconfirmed.items()):
                resend = list(pending.values())
                pending.clear()
                for kline in resend:
                    self.stats.resent_finalized += 1
                    self._send_finalized(part, pending, kline)
                if not pending:
                    part.unconfirmed.pop(symbol, None)
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

    def _install(self, part: PartitionState, checkpoint: PartitionCheckpoint) -> None:
        books: dict[str, Any] = {}
        other_grace = 0
        for symbol, saved in checkpoint.symbols.items():
            intervals = tuple(saved.book.get("intervals", ()))
            if set(intervals) != set(self.intervals):
                raise RuntimeError(
                    f"the checkpoint of {symbol} in {self.checkpoint_topic}[{part.partition}] has the intervals "
                    f"{list(intervals)} but the config (market.intervals) has {list(self.intervals)}: restore the "
                    "old setting, or delete the checkpoint topic and the group's offsets to rebuild every book "
                    "from the trades topic"
                )
            if saved.book.get("grace_ms") != self.grace_ms:
                other_grace += 1
            books[symbol] = saved.book
            part.next_offsets[symbol] = saved.next_offset
            if saved.unconfirmed:
                part.unconfirmed[symbol] = {(k.i, k.t, k.version): k for k in saved.unconfirmed}
        if books:
            part.books = KlineBooks.restore(
                {
                    "format": 1,
                    "intervals": list(self.intervals),
                    "grace_ms": self.grace_ms,
                    "repair_horizon_ms": next(iter(books.values())).get("repair_horizon_ms"),
                    "books": books,
                }
            )
        if other_grace:
            log_event(
                log,
                logging.WARNING,
                "restored books keep the grace_ms they were checkpointed with; new symbols use the configured one",
                partition=part.partition,
                symbols=other_grace,
                grace_ms=self.grace_ms,
            )
        part.restored_from = checkpoint.next_offset
        part.checkpointed = checkpoint.next_offset
        part.seq = part.seq_limit = checkpoint.seq_limit
        self.stats.restored_symbols += len(books)

    # ------------------------------------------------------------------------------------------ stop

    async def stop(self, timeout_s: float) -> None:
        """Protocol step 9 (the engine's part): stop applying, last snapshots, flush, checkpoint, commit."""
        deadline = self._monotonic() + timeout_s
        self._accepting = False
        parts = [part for part in self.parts.values() if part.phase is Phase.READY]
        for part in parts:
            self._publish_snapshots(part)
        await self._flush_finalized(min(self._flush_timeout, (deadline - self._monotonic()) / 2))
        done = await self._checkpoint_now(parts, deadline - self._monotonic())
        try:
            await asyncio.wait_for(self._snapshots.flush(), max(0.1, deadline - self._monotonic()))
        except Exception as exc:
            log_event(log, logging.WARNING, "snapshot producer did not flush in time", error=repr(exc))
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
            "partitions_restoring": sorted(p for p, part in self.parts.items() if part.phase is Phase.RESTORING),
            "unconfirmed_finalized": sum(len(v) for part in self.parts.values() for v in part.unconfirmed.values()),
            "snapshot_backlog": sum(len(part.snapshot_backlog) for part in self.parts.values()),
            "ready": self.ready,
        }


async def _wait_quietly(task: Awaitable[bool], timeout_s: float) -> bool:
    """Wait for a checkpoint flight up to ``timeout_s``; True if it completed successfully."""
    try:
        return bool(await asyncio.wait_for(asyncio.shield(task), max(0.0, timeout_s)))
    except TimeoutError:
        return False
