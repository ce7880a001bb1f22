"""The writer engine shared by ``finalized_writer`` and ``snapshot_writer`` (the seed's two writer tasks).

One :class:`WriterEngine` consumes one kline topic in its own consumer group and persists it into one
ClickHouse table through the one write path, :func:`services.shared.clickhouse.insert_klines` (the seed's
``persist_kline_data``). What differs between the two writers is a :class:`WriterSpec` (topic, table, group,
buffer size, flush interval, and how a row's ``version`` is chosen); everything else lives here once.

The protocol is written down where it runs, on :meth:`WriterEngine.run` and
:meth:`WriterEngine.flush_and_commit`. What it guarantees:

* **nothing is committed that is not stored**: a batch's offsets are committed only after the insert of its
  rows (and the delivery of its dead letters) returned, and only for partitions this member still owns;
* **a retried or re-read batch adds nothing under FINAL**: every insert carries a deterministic
  ``insert_deduplication_token`` derived from the batch's partitions and offset ranges (:meth:`Batch.token`),
  and the tables are ReplacingMergeTree by version;
* **backpressure, not rebalance**: while ClickHouse is down or slow the assigned partitions are paused and the
  engine keeps calling ``getmany`` (so ``max_poll_interval_ms`` never expires) while it retries with jittered
  exponential backoff;
* **poison never crash-loops**: a record that is not a valid kline goes to the dead-letter topic with its
  reason and is committed past like any other;
* **throughput without shortcuts**: records are decoded by a fast path that accepts exactly what the full
  validation accepts (:func:`~services.shared.messages.decode_kline_record`), rows go to ClickHouse as exact
  text, and the next batch is decoded while the current one is inserted (step 3 of
  :meth:`WriterEngine.flush_and_commit`), never committed before its own insert.

Every piece with I/O or time is injectable (clock, insert function, commit hook, decoder, dead-letter sink),
so each step's failure can be tested exactly; :func:`make_writer` wires the real ones.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Context, Decimal
from itertools import repeat
from typing import Any, Protocol, TypeVar

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from services.core.models import InvalidInput, Kline
from services.shared.clickhouse import Decimals, KlineEntry, KlineRows, insert_klines, kline_decimals, kline_text
from services.shared.lifecycle import Counters, Shutdown
from services.shared.logs import log_event
from services.shared.messages import DecodedKline, KlineWire, dead_letter_value, decode_kline_record, decode_kline_run
from services.shared.metrics import CLOSE_LATENCY_MS_BUCKETS, Distribution
from services.shared.settings import ClickHouseSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

#: ``Decimal(38, 18)``: 18 fractional digits, 20 integer digits. A value outside would be truncated or refused
#: by ClickHouse, so it is rejected (dead-lettered) before it can stall the batch it is in.
_MAX_SCALE = 18
_MAX_INTEGER_DIGITS = 20
_SCALE = Decimal(1).scaleb(-_MAX_SCALE)
_EXACT = Context(prec=2 * (_MAX_SCALE + _MAX_INTEGER_DIGITS))
_UINT64_LIMIT = 2**64
_DECIMAL_FIELDS = ("o", "h", "l", "c", "v", "q", "V", "Q")
#: While an insert runs and the consumer has nothing fetched, look again this often (seconds).
_OVERLAP_IDLE_S = 0.002
#: While an insert runs, decode at most this many records between two turns of the event loop.
_OVERLAP_CHUNK = 1000

#: What an engine reports (``/metrics``) that only increases: counters since start. ``corrections`` counts stored
#: rows with a version above 0 on a writer whose rows are closed klines (a kline replaced after a repair).
COUNTER_FIGURES = frozenset(
    {
        "rows_inserted",
        "batches",
        "dead_letters",
        "tombstones_skipped",
        "insert_retries",
        "dead_letter_retries",
        "commits",
        "commit_failures",
        "assignments",
        "revocations",
        "corrections",
    }
)
#: ... and its gauges (lag, paused, last flush); every figure exists from the start.
_METRICS = (*sorted(COUNTER_FIGURES), "lag", "paused", "last_flush_latency_ms", "last_batch_rows")

#: Histogram buckets: insert seconds (retries included), rows per batch, and a closed kline's close -> stored
#: milliseconds (exported in seconds).
INSERT_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_ROWS_BUCKETS = (1, 10, 100, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000)
CLOSE_TO_STORED_MS_BUCKETS = CLOSE_LATENCY_MS_BUCKETS

Row = tuple[Any, ...]
InsertFn = Callable[[Sequence[Row], str], None]
"""Blocking insert of rows with a deduplication token; runs in a worker thread. The engine passes a
:class:`~services.shared.clickhouse.KlineRows`, which the real insert encodes without building the tuples."""
CommitFn = Callable[[Mapping[Any, tuple[int, str]]], Awaitable[None]]
"""Commit ``{TopicPartition: (next offset, metadata)}``; :meth:`AIOKafkaConsumer.commit` by default."""
DecodeFn = Callable[[bytes | None], DecodedKline]
"""Decode a record's value or raise :class:`InvalidInput`; :func:`~services.shared.messages.decode_kline_record`."""


class FlushAbandoned(Exception):
    """The shutdown deadline passed before a batch was stored; its offsets stay uncommitted (it is re-read)."""


class Clock(Protocol):
    """Monotonic time and sleeping, injected so tests can jump time."""

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ConsumerRecordLike(Protocol):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class ConsumerLike(Protocol):
    """The part of :class:`aiokafka.AIOKafkaConsumer` the engine uses."""

    async def getmany(
        self, *partitions: Any, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[Any, list[Any]]: ...

    def assignment(self) -> set[Any]: ...

    def pause(self, *partitions: Any) -> None: ...

    def resume(self, *partitions: Any) -> None: ...

    def highwater(self, partition: Any) -> int | None: ...

    async def commit(self, offsets: Any = None) -> None: ...


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A rejected record on its way to the dead-letter topic: its key, the JSON envelope, and where it was."""

    key: bytes | None
    value: bytes
    partition: int
    offset: int
    reason: str


class DeadLetterSink(Protocol):
    async def deliver(self, letters: Sequence[DeadLetter]) -> None:
        """Return only when every letter is acknowledged by the broker; raise otherwise."""
        ...


class KafkaDeadLetters:
    """Delivers dead letters to the dead-letter topic with the (idempotent, ``acks=all``) producer."""

    def __init__(self, producer: Any, topic: str, timeout_s: float) -> None:
        self._producer = producer
        self._topic = topic
        self._timeout_s = timeout_s

    async def deliver(self, letters: Sequence[DeadLetter]) -> None:
        async def send_all() -> None:
            futures = [await self._producer.send(self._topic, key=d.key, value=d.value) for d in letters]
            await asyncio.gather(*futures)

        await asyncio.wait_for(send_all(), self._timeout_s)


@dataclass(frozen=True, slots=True)
class WriterSpec:
    """What tells the two writers apart; everything else is the shared engine.

    ``version_of(kline, seq)`` returns the row's ReplacingMergeTree version or raises
    :class:`~services.core.models.InvalidInput` (the record is then dead-lettered with that reason).
    """

    name: str
    component: str
    topic: str
    table: str
    group_id: str
    buffer_size: int
    flush_interval_ms: int
    version_of: Callable[[Kline | KlineWire, int | None], int]
    skip_tombstones: bool = False
    #: Rows are closed klines: observe each one's close -> stored latency and count corrections (version > 0).
    closed_klines: bool = False

    def __post_init__(self) -> None:
        if self.buffer_size < 1 or self.flush_interval_ms < 1:
            raise ValueError(f"{self.component}: buffer_size and flush_interval_ms must be positive")


def check_fits_table(kline: Kline, version: int) -> Decimals:
    """Raise :class:`InvalidInput` unless every value fits its column exactly (Decimal(38, 18), UInt64); return
    the decimals' exact text for the insert."""
    for name in _DECIMAL_FIELDS:
        value: Decimal = getattr(kline, name)
        if not _fits_decimal_38_18(value):
            raise InvalidInput(f"field {name!r} = {value} does not fit Decimal(38, 18) exactly")
    _check_version(version)
    return kline_decimals(kline)


def row_text(record: DecodedKline, version: int) -> str:
    """The start of the record's row (:func:`~services.shared.clickhouse.kline_text`), once every value is
    known to fit its column: the fast decoder verified its text already, leaving only the version to check."""
    if record.text is None:
        return kline_text(record.kline, check_fits_table(record.kline, version))
    _check_version(version)
    return record.text


def _check_version(version: int) -> None:
    if not 0 <= version < _UINT64_LIMIT:
        raise InvalidInput(f"version {version} does not fit UInt64")


def _fits_decimal_38_18(value: Decimal) -> bool:
    # Fast path on the plain text (what a decoded kline's decimals are): a few times cheaper than as_tuple(),
    # and this runs eight times per row.
    text = str(value)
    if "E" not in text and text[0].isdigit():
        dot = text.find(".")
        integer_digits, fraction_digits = (len(text), 0) if dot < 0 else (dot, len(text) - dot - 1)
        if integer_digits <= _MAX_INTEGER_DIGITS and fraction_digits <= _MAX_SCALE:
            return True
    # Exponent notation, a sign, or more digits than the column has: decide exactly. Extra fractional digits
    # are fine when they are zeros (1.50000000000000000000).
    if not value.is_finite() or value < 0 or value.adjusted() >= _MAX_INTEGER_DIGITS:
        return False
    return value.quantize(_SCALE, context=_EXACT) == value


class Batch:
    """What was consumed since the last flush: rows to insert, dead letters to deliver, offsets to commit.

    Pure data, no I/O. A partition's offset range covers every record consumed from it (rows, dead letters,
    skipped tombstones), so committing ``last + 1`` after the flush moves past all of them.
    """

    __slots__ = ("_crc", "consumed", "dead", "entries", "opened_at", "ranges")

    def __init__(self) -> None:
        self.entries: list[KlineEntry] = []  # (partition, offset, kline, version, row text)
        self.dead: list[DeadLetter] = []
        self.ranges: dict[int, tuple[int, int]] = {}  # partition -> (first offset, last offset)
        self._crc: dict[int, int] = {}  # partition -> running CRC-32 of the consumed values
        self.consumed = 0
        self.opened_at: float | None = None

    def __len__(self) -> int:
        return self.consumed

    def _track(self, partition: int, offset: int, value: bytes | None, now: float) -> None:
        first_last = self.ranges.get(partition)
        self.ranges[partition] = (offset, offset) if first_last is None else (first_last[0], offset)
        self._crc[partition] = zlib.crc32(value or b"", self._crc.get(partition, 0))
        self.consumed += 1
        if self.opened_at is None:
            self.opened_at = now

    def add_row(
        self,
        partition: int,
        offset: int,
        value: bytes | None,
        kline: Kline,
        version: int,
        now: float,
        text: str | None = None,
    ) -> None:
        self._track(partition, offset, value, now)
        self.entries.append((partition, offset, kline, version, text if text is not None else kline_text(kline)))

    def add_dead(self, letter: DeadLetter, value: bytes | None, now: float) -> None:
        self._track(letter.partition, letter.offset, value, now)
        self.dead.append(letter)

    def add_skipped(self, partition: int, offset: int, now: float) -> None:
        self._track(partition, offset, None, now)

    def add_run(
        self,
        partition: int,
        records: Sequence[ConsumerRecordLike],
        entries: Iterable[KlineEntry],
        dead: Iterable[DeadLetter],
        now: float,
    ) -> None:
        """Add consecutive ``records`` of one partition at once (one ``getmany`` list): the rows and dead letters
        made of them, and the offsets and values they cover, skipped tombstones included. The same as adding
        them one by one (the CRC of concatenated values is the running CRC), in a few calls instead of many."""
        if not records:
            return
        first_last = self.ranges.get(partition)
        first = records[0].offset if first_last is None else first_last[0]
        self.ranges[partition] = (first, records[-1].offset)
        values = b"".join([r.value or b"" for r in records])
        self._crc[partition] = zlib.crc32(values, self._crc.get(partition, 0))
        self.consumed += len(records)
        if self.opened_at is None:
            self.opened_at = now
        self.entries.extend(entries)
        self.dead.extend(dead)

    def due(self, now: float, buffer_size: int, flush_interval_s: float) -> bool:
        """Flush when ``buffer_size`` records are buffered or ``flush_interval_s`` passed since the first."""
        if self.consumed >= buffer_size:
            return True
        return self.opened_at is not None and now - self.opened_at >= flush_interval_s

    def token(self, prefix: str) -> str:
        """The batch's ``insert_deduplication_token``, e.g. ``finalized:p0=100-199,p2=40-80#1c291ca3``.

        Offset ranges identify the batch: re-reading the same offsets after a retry gives the same token, so
        ClickHouse drops the repeat. The checksum of the values is there so that a topic deleted and
        re-created (offsets restarting at 0) can never have a new batch silently dropped as a "repeat" of an
        old one.
        """
        parts = ",".join(f"p{p}={first}-{last}" for p, (first, last) in sorted(self.ranges.items()))
        digest = 0
        for partition in sorted(self._crc):
            digest = zlib.crc32(f"{partition}:{self._crc[partition]};".encode(), digest)
        return f"{prefix}:{parts}#{digest:08x}"

    def rows(self, token: str) -> KlineRows:
        """The rows in :data:`~services.shared.clickhouse.KLINE_COLUMNS` order, with provenance."""
        return KlineRows(self.entries, token)

    def next_offsets(self) -> dict[int, int]:
        """``{partition: last offset + 1}``: what to commit once the batch is stored."""
        return {p: last + 1 for p, (_first, last) in self.ranges.items()}

    def drop_partitions(self, partitions: Iterable[int]) -> int:
        """Forget what was consumed from revoked ``partitions`` (the new owner re-reads it); return the count."""
        gone = set(partitions) & set(self.ranges)
        if not gone:
            return 0
        before = self.consumed
        self.entries = [e for e in self.entries if e[0] not in gone]
        self.dead = [d for d in self.dead if d.partition not in gone]
        for p in gone:
            del self.ranges[p]
            del self._crc[p]
        # Skipped tombstones are not kept individually; recount from what is left.
        self.consumed = len(self.entries) + len(self.dead)
        if not self.ranges:
            self.opened_at = None
        return before - self.consumed


async def run_in_worker_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking call in a daemon thread and await its result; the event loop stays free meanwhile.

    Why not :func:`asyncio.to_thread`: its executor threads are joined at interpreter exit, so an insert hung
    on an unreachable server would hold the process past its shutdown grace period. A daemon thread is
    abandoned instead (its batch was not committed, so nothing is lost).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            outcome: tuple[T | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    threading.Thread(target=target, name=f"insert-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return await future


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(self, engine: WriterEngine) -> None:
        self._engine = engine

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._engine.on_partitions_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._engine.on_partitions_assigned(set(assigned))


class WriterEngine:
    """Consumes one kline topic and persists it into one table; see :meth:`run` for the protocol.

    ``consumer`` must be subscribed to ``spec.topic`` with :attr:`listener` as its rebalance listener (see
    :func:`make_writer`). ``insert(rows, token)`` is blocking and runs in a worker thread; ``commit`` defaults
    to ``consumer.commit``. ``keepalive_s`` must be well below the consumer's ``max_poll_interval_ms``.
    """

    def __init__(
        self,
        spec: WriterSpec,
        consumer: ConsumerLike,
        *,
        insert: InsertFn,
        dead_letters: DeadLetterSink,
        shutdown: Shutdown,
        clock: Clock | None = None,
        commit: CommitFn | None = None,
        decode: DecodeFn = decode_kline_record,
        counters: Counters | None = None,
        retry_max_s: float = 5.0,
        retry_initial_s: float = 0.05,
        keepalive_s: float = 1.0,
        poll_timeout_s: float = 0.2,
        revoke_wait_s: float = 5.0,
        stuck_after_s: float = 30.0,
        commit_retry_s: float = 1.0,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        if retry_max_s <= 0 or retry_initial_s <= 0 or keepalive_s <= 0 or poll_timeout_s <= 0:
            raise ValueError("retry_max_s, retry_initial_s, keepalive_s and poll_timeout_s must be positive")
        self.spec = spec
        self.counters = counters if counters is not None else Counters()
        self.listener = _Listener(self)
        self._consumer = consumer
        self._insert = insert
        self._dead_letters = dead_letters
        self._shutdown = shutdown
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._commit: CommitFn = commit if commit is not None else consumer.commit
        self._decode = decode
        # The run-at-once fast path is the default decoder's; an injected decoder is used record by record.
        self._decode_values = decode_kline_run if decode is decode_kline_record else None
        self._retry_max_s = retry_max_s
        self._retry_initial_s = retry_initial_s
        self._keepalive_s = keepalive_s
        self._poll_timeout_s = poll_timeout_s
        self._revoke_wait_s = revoke_wait_s
        self._stuck_after_s = stuck_after_s
        self._commit_retry_s = commit_retry_s
        self._flush_interval_s = spec.flush_interval_ms / 1000
        self._wall_ms = wall_ms
        # Distributions (exported as Prometheus histograms): observed once per batch, and per distinct interval
        # and close time of its rows for the close -> stored latency.
        self.insert_seconds = Distribution(INSERT_SECONDS_BUCKETS)
        self.batch_rows = Distribution(BATCH_ROWS_BUCKETS)
        self.close_to_stored: dict[str, Distribution] = {}  # interval -> latency in ms (exported in seconds)

        self._buffer = Batch()
        # Offsets whose rows are stored but not yet committed: {TopicPartition: (next offset, batch token)}.
        self._stored: dict[Any, tuple[int, str]] = {}
        self._commit_retry_at = 0.0
        self._position: dict[Any, int] = {}  # next offset to be consumed, per partition (for lag)
        self._inflight: asyncio.Task[None] | None = None
        self._flush_started: float | None = None
        # Partitions revoked while a flush was in flight and could not wait for it: their offsets are not ours
        # to commit any more, whenever that flush completes.
        self._forfeit: set[Any] = set()
        self._assigned = False
        self._paused = False
        for name in _METRICS:  # every figure exists from the start: /metrics has a stable shape
            self.counters.set(name, self.counters.get(name))

    # --- the protocol --------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume, persist and commit until a stop is requested, then flush and commit what is left.

        The write protocol, one batch at a time:

        1. **Poll** (``getmany``) at most ``buffer_size - buffered`` records from the assigned, unpaused
           partitions, waiting no longer than the flush deadline of the current buffer.
        2. **Decode and validate** each record (``decode_kline_record``, the spec's ``version_of``, column
           ranges). A record that fails becomes a dead letter carrying the reason; a tombstone on a compacted
           topic is skipped. Both still count as consumed, so the commit moves past them. An unexpected exception (a
           bug, not bad input) propagates: the process exits without committing anything of the batch.
        3. **Buffer**: append the row with its provenance (partition, offset) to the buffer.
        4. **Flush when due**: the buffer holds ``buffer_size`` records, or ``flush_interval_ms`` passed since
           its first record, or a stop was requested: :meth:`flush_and_commit` (insert with the batch's
           deduplication token, then commit exactly its offsets + 1).
        5. **Retry a failed commit** of already stored offsets at most every ``commit_retry_s`` while idle.
        6. **Stop**: on a stop request (SIGTERM), stop polling, flush and commit within the shutdown deadline
           and return; if the deadline passes first, raise :class:`FlushAbandoned` with nothing of the
           unstored batch committed.
        """
        log_event(
            log,
            logging.INFO,
            "writer started",
            component=self.spec.component,
            topic=self.spec.topic,
            table=self.spec.table,
            group=self.spec.group_id,
        )
        while not self._shutdown.requested:
            await self._poll_once()  # steps 1-3
            now = self._clock.monotonic()
            if self._buffer.due(now, self.spec.buffer_size, self._flush_interval_s):
                await self.flush_and_commit()  # step 4
            elif self._stored and now >= self._commit_retry_at:
                await self._commit_stored()  # step 5
        # Step 6.
        log_event(
            log,
            logging.INFO,
            "stopping: flushing the buffer",
            component=self.spec.component,
            buffered=len(self._buffer),
            deadline_s=round(self._shutdown.remaining(), 3),
        )
        await self.flush_and_commit()
        if self._stored:
            await self._commit_stored()
        log_event(log, logging.INFO, "writer stopped", component=self.spec.component, uncommitted=len(self._stored))

    async def flush_and_commit(self) -> None:
        """Store the buffered batch, then commit exactly its offsets. Each step, and what its failure means:

        1. **Detach** the buffer (records polled from now on go to a fresh one) and derive the batch's
           ``insert_deduplication_token`` from its partitions' offset ranges (:meth:`Batch.token`).
        2. **Insert** the rows with that token in a worker thread (the event loop stays free). On failure,
           retry with jittered exponential backoff capped at ``retry_max_s``. Raising before the rows landed or
           after they landed is the same to us: the retry carries the same token, so ClickHouse stores the
           rows once.
        3. **Overlap, then backpressure.** For the first ``keepalive_s`` of steps 2-6, keep taking what the
           consumer has already fetched (``getmany`` without waiting) and decode it into the next buffer, up to
           ``buffer_size`` records: decoding runs while ClickHouse parses, on the other core, and while the
           commit travels. Those records are the next batch's: stored and committed only with it. If the insert
           takes longer (ClickHouse slow or down), pause every assigned partition, so nothing more is fetched
           than can be stored, and call ``getmany`` every ``keepalive_s`` so the member is not evicted for
           exceeding ``max_poll_interval_ms`` (no rebalance). A quick insert never pauses: a pause would make
           aiokafka drop the records it has prefetched.
        4. **Deliver** the batch's dead letters (acknowledged by the broker), retried the same way.
        5. **Record** the batch's offsets + 1 as stored, except for partitions revoked meanwhile.
        6. **Commit** the stored offsets of the partitions this member owns, with the token as commit
           metadata. A failed commit keeps them for the next commit: the rows are stored, and a restart that
           re-reads them inserts them again under the same or another token, which ``FINAL`` collapses.
        7. **Resume** the partitions if step 3 paused them.

        A stop request bounds steps 2-4 by the shutdown deadline: past it, :class:`FlushAbandoned` is raised
        and none of the batch's offsets is committed.
        """
        batch, self._buffer = self._buffer, Batch()  # step 1
        if not batch.consumed:
            return
        token = batch.token(self.spec.name)
        started = self._clock.monotonic()
        self._flush_started = started
        self._forfeit = set()
        self._inflight = asyncio.create_task(self._store(batch, token), name=f"{self.spec.component}-store")
        try:
            next_batch_error = await self._await_with_keepalive(self._inflight)  # steps 2-6
        finally:
            self._inflight = None
            self._flush_started = None
            if self._paused:
                self._resume_assigned()  # step 7
        if next_batch_error is not None:
            raise next_batch_error
        elapsed = self._clock.monotonic() - started
        self.counters.inc("batches")
        self.counters.set("last_flush_latency_ms", round(elapsed * 1000, 3))
        self.counters.set("last_batch_rows", len(batch.entries))
        log_event(
            log,
            logging.DEBUG,
            "batch stored",
            component=self.spec.component,
            token=token,
            rows=len(batch.entries),
            dead_letters=len(batch.dead),
            ms=round(elapsed * 1000, 1),
        )

    async def _store(self, batch: Batch, token: str) -> None:
        rows = batch.rows(token)
        if rows:  # step 3
            started = self._clock.monotonic()
            await self._retrying("insert", lambda: run_in_worker_thread(self._insert, rows, token))
            self.insert_seconds.observe(self._clock.monotonic() - started)
            self.batch_rows.observe(len(rows))
            self.counters.inc("rows_inserted", len(rows))
            if self.spec.closed_klines:
                self._observe_stored(batch.entries)
        if batch.dead:  # step 4
            await self._retrying("dead_letter", lambda: self._dead_letters.deliver(batch.dead))
        for partition, offset in batch.next_offsets().items():  # step 5
            tp = TopicPartition(self.spec.topic, partition)
            if tp not in self._forfeit:
                self._stored[tp] = (offset, token)
        await self._commit_stored()  # step 6, a broker round trip: the next batch keeps decoding meanwhile

    def _observe_stored(self, entries: Sequence[KlineEntry]) -> None:
        """Each stored closed kline's close -> stored latency (wall clock now minus the end of its interval),
        counted once per distinct (interval, close time): a batch holds few of them, so this stays cheap."""
        now_ms = self._wall_ms()
        closes = Counter([(entry[2].i, entry[2].T) for entry in entries])
        for (interval, close_ms), n in closes.items():
            dist = self.close_to_stored.get(interval)
            if dist is None:
                dist = self.close_to_stored[interval] = Distribution(CLOSE_TO_STORED_MS_BUCKETS, scale=0.001)
            dist.observe(max(0, now_ms - close_ms - 1), n)  # T is the interval's last millisecond
        corrections = len(entries) - [entry[3] for entry in entries].count(0)
        if corrections:
            self.counters.inc("corrections", corrections)

    async def _await_with_keepalive(self, task: asyncio.Task[None]) -> BaseException | None:
        """Wait for the store ``task`` (steps 2-6) while doing step 3. Returns an error that decoding the next
        batch raised (a bug): the caller commits the stored batch first, then raises it."""
        loop = asyncio.get_running_loop()
        overlap_until = loop.time() + self._keepalive_s
        next_batch_error: BaseException | None = None
        # Step 3, overlap: decode the next batch while this one is inserted (not once a stop is requested).
        while not task.done() and not self._shutdown.requested and loop.time() < overlap_until:
            # getmany returns fetched records without yielding to the event loop: yield between chunks, so the
            # store task starts its insert at once, and the consumer's fetcher keeps fetching.
            await asyncio.sleep(0)
            room = min(self.spec.buffer_size - len(self._buffer), _OVERLAP_CHUNK)
            if room > 0:
                records = await self._consumer.getmany(timeout_ms=0, max_records=room)
                if records:
                    try:
                        self._accept(records)
                    except Exception as exc:  # not this batch's fault: store and commit it, then fail
                        next_batch_error = exc
                        break
                    continue
            await asyncio.wait({task}, timeout=min(_OVERLAP_IDLE_S, max(0.0, overlap_until - loop.time())))
        wait_s = max(0.0, overlap_until - loop.time())  # what is left of the first keepalive_s
        reported_stuck = False
        while True:
            if not task.done():
                await asyncio.wait({task}, timeout=wait_s)
            if task.done():
                task.result()  # re-raise FlushAbandoned or a bug
                return next_batch_error
            wait_s = self._keepalive_s
            if self._shutdown.requested and self._shutdown.remaining() <= 0:
                task.cancel()
                raise FlushAbandoned(f"{self.spec.component}: shutdown deadline passed while storing a batch")
            # Step 3, backpressure. Keep the membership alive: aiokafka leaves the group when getmany is not
            # called within max_poll_interval_ms. Everything assigned is paused first, so only a partition
            # assigned by a rebalance during this flush could return records; they belong to the next batch.
            self._pause_assigned()
            records = await self._consumer.getmany(timeout_ms=0)
            self._accept(records)
            if self.stuck and not reported_stuck:
                reported_stuck = True  # once per batch: /readyz and flush_age_s carry it from here on
                log_event(
                    log,
                    logging.ERROR,
                    "ClickHouse has not accepted a batch for a long time; not ready until it does",
                    component=self.spec.component,
                    seconds=round(self._flush_age(), 1),
                )

    async def _retrying(self, what: str, attempt_fn: Callable[[], Awaitable[None]]) -> None:
        base_wait = wait_exponential_jitter(
            multiplier=self._retry_initial_s, max=self._retry_max_s, jitter=self._retry_initial_s
        )

        def wait(state: RetryCallState) -> float:
            seconds = float(base_wait(state))
            if self._shutdown.requested:
                seconds = min(seconds, self._shutdown.remaining())
            return seconds

        def give_up(_state: RetryCallState) -> bool:
            return self._shutdown.requested and self._shutdown.remaining() <= 0

        def before_sleep(state: RetryCallState) -> None:
            self.counters.inc("insert_retries" if what == "insert" else "dead_letter_retries")
            error = state.outcome.exception() if state.outcome is not None else None
            log_event(
                log,
                logging.WARNING,
                f"{what} failed; retrying (partitions paused)",
                component=self.spec.component,
                attempt=state.attempt_number,
                error=str(error)[:300],
                next_wait_s=round(state.upcoming_sleep, 3),
            )

        retrying = AsyncRetrying(
            wait=wait,
            stop=give_up,
            retry=retry_if_exception_type(Exception),
            sleep=self._clock.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await attempt_fn()
        except Exception as exc:
            # Only reachable once give_up() said so: the deadline passed with the batch unstored.
            raise FlushAbandoned(
                f"{self.spec.component}: {what} still failing at the shutdown deadline: {exc}"
            ) from exc

    async def _commit_stored(self) -> None:
        owned = self._consumer.assignment()
        for tp in [tp for tp in self._stored if tp not in owned]:
            del self._stored[tp]  # never commit a partition no longer owned; its new owner re-reads it
        offsets = dict(self._stored)
        if not offsets:
            return
        try:
            await self._commit(offsets)
        except KafkaError as exc:
            self.counters.inc("commit_failures")
            self._commit_retry_at = self._clock.monotonic() + self._commit_retry_s
            log_event(
                log,
                logging.WARNING,
                "commit failed; the rows are stored, the commit will be retried",
                component=self.spec.component,
                error=f"{type(exc).__name__}: {exc}"[:300],
            )
            return
        self.counters.inc("commits")
        for tp, committed in offsets.items():
            if self._stored.get(tp) == committed:
                del self._stored[tp]

    # --- polling -------------------------------------------------------------------------------------------

    async def _poll_once(self) -> None:
        if len(self._buffer) >= self.spec.buffer_size:
            return  # filled while the last batch was stored (step 3): flush it first
        timeout_s = self._poll_timeout_s
        opened = self._buffer.opened_at
        if opened is not None:
            timeout_s = max(0.0, min(timeout_s, opened + self._flush_interval_s - self._clock.monotonic()))
        room = max(1, self.spec.buffer_size - len(self._buffer))
        # Rounded up: waking a fraction of a millisecond early would find the buffer not yet due.
        records = await self._consumer.getmany(timeout_ms=math.ceil(timeout_s * 1000), max_records=room)
        self._accept(records)
        self._update_lag()

    def _accept(self, records: Mapping[Any, Sequence[ConsumerRecordLike]]) -> None:
        if not records:
            return
        now = self._clock.monotonic()
        decode = self._decode
        version_of = self.spec.version_of
        skip_tombstones = self.spec.skip_tombstones
        dead_count = skipped = 0
        for tp, batch in records.items():
            if not batch:
                continue
            partition = tp.partition
            entries = self._decode_run(partition, batch)
            if entries is not None:  # the usual case: every record valid, checked at once
                self._buffer.add_run(partition, batch, entries, (), now)
                self._position[tp] = batch[-1].offset + 1
                continue
            entries = []
            dead: list[DeadLetter] = []
            for record in batch:
                value = record.value
                if value is None and skip_tombstones:
                    skipped += 1
                    continue
                try:
                    decoded = decode(value)
                    version = version_of(decoded.kline, decoded.seq)
                    text = row_text(decoded, version)
                except InvalidInput as exc:
                    dead.append(self._dead_letter(record, exc.reason))
                    continue
                entries.append((partition, record.offset, decoded.kline, version, text))
            self._buffer.add_run(partition, batch, entries, dead, now)
            dead_count += len(dead)
            self._position[tp] = batch[-1].offset + 1
        if dead_count:
            self.counters.inc("dead_letters", dead_count)
        if skipped:
            self.counters.inc("tombstones_skipped", skipped)

    def _decode_run(self, partition: int, batch: Sequence[ConsumerRecordLike]) -> list[KlineEntry] | None:
        """Step 2 for a whole fetched run of one partition when every record passes the fast path's checks
        (:func:`~services.shared.messages.decode_kline_run`) and gets a valid version; else None: decode one by
        one. Rows keep the parsed fields (:class:`~services.shared.messages.KlineWire`), not a :class:`Kline`."""
        if self._decode_values is None:
            return None
        run = self._decode_values([record.value for record in batch])
        if run is None:
            return None
        wires, texts = run
        version_of = self.spec.version_of
        try:
            versions = [version_of(wire, wire.seq) for wire in wires]
        except InvalidInput:
            return None
        if versions and not (min(versions) >= 0 and max(versions) < _UINT64_LIMIT):
            return None
        offsets = [record.offset for record in batch]
        return list(zip(repeat(partition, len(offsets)), offsets, wires, versions, texts, strict=True))

    def _dead_letter(self, record: ConsumerRecordLike, reason: str) -> DeadLetter:
        log_event(
            log,
            logging.WARNING,
            "rejected record goes to the dead-letter topic",
            component=self.spec.component,
            reason=reason,
            partition=record.partition,
            offset=record.offset,
        )
        envelope = dead_letter_value(
            self.spec.component,
            reason,
            record.value,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
        )
        return DeadLetter(record.key, envelope, record.partition, record.offset, reason)

    def _update_lag(self) -> None:
        lag = 0
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            position = self._position.get(tp)
            if high is not None and position is not None:
                lag += max(0, high - position)
        self.counters.set("lag", lag)

    def _pause_assigned(self) -> None:
        assigned = self._consumer.assignment()
        if assigned:
            self._consumer.pause(*assigned)
        self._paused = True
        self.counters.set("paused", 1)

    def _resume_assigned(self) -> None:
        assigned = self._consumer.assignment()
        if assigned:
            self._consumer.resume(*assigned)
        self._paused = False
        self.counters.set("paused", 0)

    # --- rebalancing ---------------------------------------------------------------------------------------

    async def on_partitions_revoked(self, revoked: set[Any]) -> None:
        """Settle what belongs to ``revoked`` while this member still owns it, then let it go.

        1. An in-flight flush gets up to ``revoke_wait_s`` to finish, so its offsets can still be committed;
           if it does not, those partitions are forfeited (the rows may land later: harmless duplicates).
        2. Stored-but-uncommitted offsets of the revoked partitions are committed now (we still own them).
        3. Buffered, unstored records of the revoked partitions are dropped: the new owner re-reads them from
           the last commit.
        """
        mine = {tp for tp in revoked if tp.topic == self.spec.topic}
        if not mine:
            return
        self.counters.inc("revocations")
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            await asyncio.wait({inflight}, timeout=self._revoke_wait_s)
            if not inflight.done():
                self._forfeit |= mine
        offsets = {tp: self._stored.pop(tp) for tp in mine if tp in self._stored}
        if offsets:
            try:
                await self._commit(offsets)
            except KafkaError as exc:
                self.counters.inc("commit_failures")
                log_event(
                    log,
                    logging.WARNING,
                    "commit on revoke failed; the new owner re-reads (harmless)",
                    component=self.spec.component,
                    error=f"{type(exc).__name__}: {exc}"[:300],
                )
        dropped = self._buffer.drop_partitions(tp.partition for tp in mine)
        for tp in mine:
            self._position.pop(tp, None)
        log_event(
            log,
            logging.INFO,
            "partitions revoked",
            component=self.spec.component,
            partitions=sorted(tp.partition for tp in mine),
            committed=len(offsets),
            dropped=dropped,
        )

    async def on_partitions_assigned(self, assigned: set[Any]) -> None:
        self._assigned = True
        self.counters.inc("assignments")
        mine = [tp for tp in assigned if tp.topic == self.spec.topic]
        if self._paused and mine:
            self._consumer.pause(*mine)  # backpressure is on: it covers the new partitions too
        log_event(
            log,
            logging.INFO,
            "partitions assigned",
            component=self.spec.component,
            partitions=sorted(tp.partition for tp in mine),
        )

    # --- health --------------------------------------------------------------------------------------------

    def _flush_age(self) -> float:
        return 0.0 if self._flush_started is None else self._clock.monotonic() - self._flush_started

    @property
    def stuck(self) -> bool:
        """A batch has been waiting for ClickHouse longer than ``stuck_after_s``."""
        return self._flush_age() > self._stuck_after_s

    @property
    def ready(self) -> bool:
        """Joined its group (an assignment arrived, possibly empty) and not stuck on ClickHouse."""
        return self._assigned and not self.stuck

    @property
    def uncommitted(self) -> dict[Any, tuple[int, str]]:
        """Stored offsets whose commit has not succeeded yet (normally empty between batches)."""
        return dict(self._stored)

    def metrics(self) -> dict[str, float]:
        values = self.counters.snapshot()
        values["buffered"] = len(self._buffer)
        opened = self._buffer.opened_at
        values["buffer_age_s"] = 0.0 if opened is None else round(self._clock.monotonic() - opened, 3)
        values["flush_age_s"] = round(self._flush_age(), 3)
        values["ready"] = 1 if self.ready else 0
        return values


def clickhouse_inserter(client: Any, settings: ClickHouseSettings, table: str) -> InsertFn:
    """The real insert: the shared write path into ``table`` (blocking; the engine runs it in a worker
    thread)."""

    def insert_rows(rows: Sequence[Row], token: str) -> None:
        insert_klines(client, settings, table, rows, token)

    return insert_rows


def make_writer(
    spec: WriterSpec,
    consumer: Any,
    *,
    client: Any,
    settings: Any,
    dead_letters: DeadLetterSink,
    shutdown: Shutdown,
    insert: InsertFn | None = None,
    **options: Any,
) -> WriterEngine:
    """Wire an engine to a started consumer (subscribed here, with the engine's rebalance listener) and to the
    shared ClickHouse write path. ``settings`` is the service's :class:`~services.shared.settings.Settings`.
    ``insert`` replaces the write path (tests wrap the real one to inject failures); ``options`` go to
    :class:`WriterEngine`.
    """
    options.setdefault("retry_max_s", settings.persistence.insert_retry_max_s)
    options.setdefault("stuck_after_s", max(30.0, 4 * settings.persistence.insert_retry_max_s))
    engine = WriterEngine(
        spec,
        consumer,
        insert=insert if insert is not None else clickhouse_inserter(client, settings.clickhouse, spec.table),
        dead_letters=dead_letters,
        shutdown=shutdown,
        **options,
    )
    consumer.subscribe([spec.topic], listener=engine.listener)
    return engine
