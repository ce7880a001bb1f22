"""Steps 4-7 of the recovery protocol (:mod:`services.aggregator.engine`): write, commit and read checkpoints.

:class:`Checkpointer` writes a partition's checkpoint (its dirty symbols' records, acknowledged, then the
marker, acknowledged, then the commit) in a background task, at most one in flight per partition; waits for
the final ones at a rebalance or a stop; and installs a partition's newest checkpoint at a restore. The record
format is :mod:`services.aggregator.checkpoint`.

A checkpoint is all or nothing per partition, and it is never larger than one record may be: a symbol whose
record would exceed ``max_record_bytes`` (a burst of closed klines not yet confirmed, which the checkpoint must
carry) defers the whole partition's checkpoint to a later tick, when the burst is confirmed and its unconfirmed
set is small again (a symbol with more than :data:`MAX_UNCONFIRMED_PER_RECORD` unconfirmed klines defers it
without being encoded). Deferring is always safe: the committed offset stays at the previous marker, so a crash
meanwhile replays from there and the klines close again.

Encoding is paid for on the event loop, synchronously (the export must be one consistent picture of the books),
at about 0.4 ms a symbol (2,000 symbols x 7 intervals: ~0.75 s). When every symbol is dirty every tick (a
catch-up, or thousands of busy symbols) a checkpoint per tick would take most of the aggregator's time, so
checkpoints get a share of it, :data:`CHECKPOINT_TIME_SHARE`: each partition waits at least the last
encoding time (CPU time of the encoding thread, so a busy machine does not inflate it) of all partitions
together divided by that share (at most :data:`MAX_CHECKPOINT_INTERVAL_S`) before its next one. A wait shorter
than :data:`MIN_CHECKPOINT_SPACING_S` is no wait at all: a few dirty symbols a tick cost so little that every
tick (and every retry after a failed one) still writes one, as before. A large backlog spaces them out, which
only means a crash meanwhile replays a few seconds more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final, Protocol

from aiokafka import AIOKafkaProducer, TopicPartition

from services.aggregator.checkpoint import MARKER_KEY, PartitionCheckpoint, encode_marker, encode_symbol
from services.aggregator.state import PartitionState, Stats
from services.core.book import DEFAULT_REPAIR_HORIZON_MS, KlineBooks
from services.shared.logs import log_event

log = logging.getLogger("services.aggregator")

#: Snapshot sequence numbers a partition may use beyond the newest confirmed marker (renewed every checkpoint).
SEQ_LEASE: Final = 1 << 24
#: The largest checkpoint record (bytes before compression). The checkpoint producer's ``max_request_size``
#: and the checkpoint topic's ``max.message.bytes`` are set above it by the worker.
MAX_RECORD_BYTES: Final = 4 * 1024 * 1024
#: A symbol with more unconfirmed klines than this defers the checkpoint without encoding it: that only happens
#: during a burst (a live symbol has a handful), and encoding thousands of klines every tick while the burst is
#: delivered would take the event loop's time from the delivery itself (about 330 bytes and 20 µs a kline).
MAX_UNCONFIRMED_PER_RECORD: Final = 2_000
#: The share of the event loop's time that encoding checkpoints may take, over time (see the module docstring).
CHECKPOINT_TIME_SHARE: Final = 0.1
#: The longest a partition waits for its next checkpoint because of :data:`CHECKPOINT_TIME_SHARE`.
MAX_CHECKPOINT_INTERVAL_S: Final = 30.0
#: A shorter wait is not imposed (below the clock's tick, 1 s by default: such checkpoints are cheap).
MIN_CHECKPOINT_SPACING_S: Final = 0.5


class GroupConsumer(Protocol):
    """What the engine needs from the consumer group member (Faust's consumer in production)."""

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> bool: ...

    def highwater(self, tp: TopicPartition) -> int | None: ...

    async def seek(self, tp: TopicPartition, offset: int | None) -> None:
        """Read ``tp`` next from ``offset`` (``None``: from the start of the log)."""


class CheckpointSource(Protocol):
    """Where a restore reads checkpoints from (:class:`~services.aggregator.checkpoint.CheckpointReader`)."""

    async def read(self, partitions: Iterable[int], timeout_s: float) -> dict[int, PartitionCheckpoint]: ...


class Checkpointer:
    """Writes and reads the checkpoints of the engine's partitions (protocol steps 4-7)."""

    def __init__(
        self,
        *,
        producer: AIOKafkaProducer,
        topic: str,
        reader: CheckpointSource,
        intervals: tuple[str, ...],
        grace_ms: int,
        repair_horizon_ms: int = DEFAULT_REPAIR_HORIZON_MS,
        stats: Stats,
        restore_timeout_s: float = 60.0,
        max_record_bytes: int = MAX_RECORD_BYTES,
        time_share: float = CHECKPOINT_TIME_SHARE,
        monotonic: Callable[[], float] = time.monotonic,
        cpu_time: Callable[[], float] = time.thread_time,
    ) -> None:
        if not 0 < time_share <= 1:
            raise ValueError(f"time_share must be in (0, 1], got {time_share}")
        self.topic = topic
        self._producer = producer
        self._reader = reader
        self._intervals = intervals
        self._grace_ms = grace_ms
        self._repair_horizon_ms = repair_horizon_ms
        self._stats = stats
        self._restore_timeout = restore_timeout_s
        self._max_record_bytes = max_record_bytes
        self._time_share = time_share
        self._monotonic = monotonic
        self._cpu_time = cpu_time
        self._group: GroupConsumer | None = None
        self._deferring: set[int] = set()
        #: Per partition: seconds its last encoding took, and when its next checkpoint may start.
        self._encoding_s: dict[int, float] = {}
        self._next_at: dict[int, float] = {}

    def attach(self, group: GroupConsumer) -> None:
        """Connect the consumer group member whose offsets step 6 commits."""
        self._group = group

    # ------------------------------------------------------------------------------------------ write (4-6)

    def start(self, part: PartitionState, *, force: bool = False) -> asyncio.Task[bool] | None:
        """Step 4: export the dirty symbols now, send them (and then the marker) in the background.

        ``None`` when nothing needed writing, one is already in flight, it is deferred (a record too large), or
        the partition's time share says not yet (``force`` overrides that: a rebalance's or a stop's checkpoint).
        """
        if part.flight is not None and not part.flight.done():
            return None
        position = part.resume_offset()
        renew = part.seq_limit - part.seq < SEQ_LEASE // 2
        if not part.dirty and not force and not renew and position == part.checkpointed:
            return None
        began = self._monotonic()
        if not force and not renew and began < self._next_at.get(part.partition, began):
            self._stats.checkpoints_spaced += 1
            return None
        cpu = self._cpu_time()
        records = self._records(part)
        self._pace(part.partition, began, self._cpu_time() - cpu)
        if records is None:
            return None
        symbols = part.dirty
        part.dirty = set()
        lease = part.seq + SEQ_LEASE
        marker = encode_marker(part.partition, position, lease, len(part.next_offsets))
        part.flight = asyncio.create_task(self._fly(part, symbols, records, marker, position, lease))
        return part.flight

    def _pace(self, partition: int, began: float, encoding_s: float) -> None:
        """Note what this encoding took; the partition's next one waits for all partitions' last encoding times
        together divided by the time share (so, all partitions dirty, encoding takes that share of the time)."""
        self._encoding_s[partition] = encoding_s
        wait = min(MAX_CHECKPOINT_INTERVAL_S, sum(self._encoding_s.values()) / self._time_share)
        self._next_at[partition] = began + wait if wait >= MIN_CHECKPOINT_SPACING_S else began

    def _forget(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self._encoding_s.pop(partition, None)
            self._next_at.pop(partition, None)

    def _records(self, part: PartitionState) -> list[tuple[bytes, bytes]] | None:
        """The dirty symbols' records, or None (deferred) if one of them would be too large."""
        records = []
        for symbol in part.dirty:
            unconfirmed = part.unconfirmed.get(symbol, {})
            too_large = len(unconfirmed) > MAX_UNCONFIRMED_PER_RECORD
            if not too_large:
                book = part.books.get(symbol)  # none: a removed symbol (its record is a tombstone)
                state = None if book is None else book.export_state()
                value = encode_symbol(symbol, part.next_offsets.get(symbol, 0), state, unconfirmed.values())
                too_large = len(value) > self._max_record_bytes
            if too_large:
                self._stats.checkpoints_deferred += 1
                if part.partition not in self._deferring:
                    self._deferring.add(part.partition)
                    log_event(
                        log,
                        logging.INFO,
                        "checkpoint deferred until the burst of closed klines is confirmed (a record is too large)",
                        partition=part.partition,
                        symbol=symbol,
                        unconfirmed=len(unconfirmed),
                    )
                return None
            records.append((symbol.encode(), value))
        self._deferring.discard(part.partition)
        return records

    async def _fly(
        self,
        part: PartitionState,
        symbols: set[str],
        records: list[tuple[bytes, bytes]],
        marker: bytes,
        position: int | None,
        lease: int,
    ) -> bool:
        """Steps 4-6 for one checkpoint: symbol records, acknowledged; marker, acknowledged; commit."""
        producer = self._producer
        topic = self.topic
        try:
            futures = [await producer.send(topic, value, key=key, partition=part.partition) for key, value in records]
            await asyncio.gather(*futures)
            await (await producer.send(topic, marker, key=MARKER_KEY, partition=part.partition))
        except Exception as exc:
            part.dirty |= symbols
            self._stats.checkpoint_failures += 1
            log_event(
                log,
                logging.WARNING,
                "checkpoint not written; its symbols will be written again",
                partition=part.partition,
                symbols=len(symbols),
                error=repr(exc),
            )
            return False
        self._stats.checkpoints += 1
        part.seq_limit = max(part.seq_limit, lease)
        part.checkpointed = position
        if position is not None and self._group is not None and (part.committed is None or position > part.committed):
            try:
                if await self._group.commit({part.tp: position}):
                    part.committed = position
                    self._stats.commits += 1
            except Exception as exc:
                log_event(log, logging.WARNING, "commit failed", partition=part.partition, error=repr(exc))
        return True

    async def final(self, parts: Iterable[PartitionState], timeout_s: float) -> set[int]:
        """Await any flight in progress, then one final checkpoint per partition; the partitions that made it.

        The partitions' encoding times are forgotten (a rebalance or a stop follows: a partition given back
        starts its pacing afresh, one given away no longer spaces out the others)."""
        deadline = self._monotonic() + timeout_s
        parts = list(parts)
        done: set[int] = set()
        for part in parts:
            if part.flight is not None and not part.flight.done():
                await wait_quietly(part.flight, deadline - self._monotonic())
        flights: dict[int, asyncio.Task[bool]] = {}
        for part in parts:
            if part.flight is not None and not part.flight.done():
                continue  # still stuck after the wait: this partition's final checkpoint is lost
            flight = self.start(part, force=True)
            if flight is not None:
                flights[part.partition] = flight
            elif not part.dirty and (part.checkpointed is not None or part.position is None):
                done.add(part.partition)
        for partition, flight in flights.items():
            if await wait_quietly(flight, deadline - self._monotonic()):
                done.add(partition)
        self._forget(part.partition for part in parts)
        return done

    # ------------------------------------------------------------------------------------------ read (7)

    async def read(self, parts: Iterable[PartitionState]) -> dict[int, PartitionCheckpoint]:
        return await self._reader.read([part.partition for part in parts], self._restore_timeout)

    def install(self, part: PartitionState, checkpoint: PartitionCheckpoint) -> None:
        """Step 7: books, ``next[S]``, unconfirmed klines and the snapshot lease from ``checkpoint``."""
        books: dict[str, Any] = {}
        other_grace = 0
        for symbol, saved in checkpoint.symbols.items():
            part.next_offsets[symbol] = saved.next_offset
            if saved.unconfirmed:
                part.unconfirmed[symbol] = {(k.i, k.t, k.version): k for k in saved.unconfirmed}
            if saved.book is None:
                continue  # a removed symbol: its records below next_offset stay skipped, its book stays gone
            intervals = tuple(saved.book.get("intervals", ()))
            if set(intervals) != set(self._intervals):
                raise RuntimeError(
                    f"the checkpoint of {symbol} in {self.topic}[{part.partition}] has the intervals "
                    f"{list(intervals)} but the config (market.intervals) has {list(self._intervals)}: restore the "
                    "old setting, or delete the checkpoint topic and the group's offsets to rebuild every book "
                    "from the trades topic"
                )
            if saved.book.get("grace_ms") != self._grace_ms:
                other_grace += 1
            books[symbol] = saved.book
        if books:
            part.books = KlineBooks.restore(
                {
                    "format": 1,
                    "intervals": list(self._intervals),
                    "grace_ms": self._grace_ms,
                    "repair_horizon_ms": self._repair_horizon_ms,
                    "books": books,
                },
                repair_horizon_ms=self._repair_horizon_ms,  # the setting, not what the books were saved with
            )
        if other_grace:
            log_event(
                log,
                logging.WARNING,
                "restored books keep the grace_ms they were checkpointed with; new symbols use the configured one",
                partition=part.partition,
                symbols=other_grace,
                grace_ms=self._grace_ms,
            )
        part.restored_from = checkpoint.next_offset
        part.checkpointed = checkpoint.next_offset
        part.seq = part.seq_limit = checkpoint.seq_limit
        self._stats.restored_symbols += len(books)


async def wait_quietly(task: Awaitable[bool], timeout_s: float) -> bool:
    """Wait for a checkpoint flight up to ``timeout_s``; True if it completed successfully."""
    try:
        return bool(await asyncio.wait_for(asyncio.shield(task), max(0.0, timeout_s)))
    except TimeoutError:
        return False
