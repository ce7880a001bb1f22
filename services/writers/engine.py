"""The writer engine shared by ``finalized_writer`` and ``snapshot_writer`` (the seed's two writer tasks).

One :class:`WriterEngine` consumes one kline topic in its own consumer group and persists it into one
ClickHouse table (the seed's ``persist_kline_data``). What differs between the two writers is a
:class:`~services.writers.specs.WriterSpec`; everything else lives here once, next to the batch and its token
(:mod:`services.writers.batch`), the edges it talks to (:mod:`services.writers.ports`) and the kline contract as
ClickHouse checks it (:mod:`services.writers.contract`).

The protocol is written down where it runs, on :meth:`WriterEngine.run` and
:meth:`WriterEngine.flush_and_commit`. What it guarantees:

* **nothing is committed that is not stored**: a batch's offsets are committed only after the insert of its
  rows (and the delivery of its dead letters) returned, and only for partitions this member still owns;
* **a retried or re-read batch adds nothing under FINAL**: every insert carries a deterministic
  ``insert_deduplication_token`` derived from the batch's partitions and offset ranges
  (:meth:`~services.writers.batch.Batch.token`), and the tables are ReplacingMergeTree by version;
* **backpressure, not rebalance**: while ClickHouse is down or slow the assigned partitions are paused and the
  engine keeps calling ``getmany`` (so ``max_poll_interval_ms`` never expires) while it retries with jittered
  exponential backoff;
* **poison never crash-loops**: a record that is not a valid kline goes to the dead-letter topic with its
  reason and is committed past like any other;
* **ClickHouse parses, Python validates only what ClickHouse refuses**: the fetched values go to ClickHouse as
  they are, one line per record, and one ``INSERT ... SELECT`` checks the kline contract exactly and stores the
  rows (:mod:`services.writers.contract`); a batch it refuses (nothing of it stored) is validated record by
  record in Python, which stores exactly the valid records under the same token and dead-letters the others
  with their reasons. Records fetched while a batch is inserted are buffered for the next one, never committed
  before their own insert.

Every piece with I/O or time is injectable (clock, insert function, commit hook, decoder, dead-letter sink),
so each step's failure can be tested exactly; :func:`make_writer` wires the real ones.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from itertools import repeat
from typing import Any

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    retry_if_not_exception_type,
    wait_exponential_jitter,
)

from services.core.models import REASON_CATEGORIES, InvalidInput, ReasonCategory
from services.shared.clickhouse import ClickHouseRejected, InsertSelectDenied, KlineEntry
from services.shared.lifecycle import Counters, Shutdown
from services.shared.logs import log_event
from services.shared.messages import dead_letter_value, decode_kline_record, decode_kline_run
from services.shared.metrics import CLOSE_LATENCY_MS_BUCKETS, Distribution
from services.writers.batch import UINT64_LIMIT, Batch, row_text
from services.writers.contract import KlineValues, closes_of, corrections_of, framed
from services.writers.ports import (
    Clock,
    CommitFn,
    ConsumerLike,
    ConsumerRecordLike,
    DeadLetter,
    DeadLetterSink,
    DecodeFn,
    InsertFn,
    SystemClock,
    clickhouse_inserter,
    run_in_worker_thread,
)
from services.writers.specs import WriterSpec

log = logging.getLogger(__name__)

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


class FlushAbandoned(Exception):
    """The shutdown deadline passed before a batch was stored; its offsets stay uncommitted (it is re-read)."""


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

    With ``parse_in_clickhouse`` (what :func:`make_writer` sets), ``insert`` first receives each batch as fetched,
    a :class:`~services.writers.contract.KlineValues`, and must raise
    :class:`~services.shared.clickhouse.ClickHouseRejected`, storing nothing, when a record breaks the kline
    contract; then the batch is validated in Python and ``insert`` receives its valid rows. Without it, records
    are validated in Python as they are polled and ``insert`` receives only rows.
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
        parse_in_clickhouse: bool = False,
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
        self._parse_in_clickhouse = parse_in_clickhouse
        # Distributions (exported as Prometheus histograms): observed once per batch, and per distinct interval
        # and close time of its rows for the close -> stored latency.
        self.insert_seconds = Distribution(INSERT_SECONDS_BUCKETS)
        self.batch_rows = Distribution(BATCH_ROWS_BUCKETS)
        self.close_to_stored: dict[str, Distribution] = {}  # interval -> latency in ms (exported in seconds)
        #: Dead letters per reason category (each category from the start: a counter that appears at 1 would
        #: hide its first increase from ``rate``).
        self.dead_letters_by_reason: dict[ReasonCategory, int] = dict.fromkeys(REASON_CATEGORIES, 0)

        self._buffer = Batch()
        self._last_rows = 0  # rows the last batch stored
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
        2. **Take** each record as fetched: one line of partition, offset and value for ClickHouse to parse and
           check (no Python per record beyond that); a tombstone on a compacted topic is skipped. Without
           ``parse_in_clickhouse``, **decode and validate** it here instead, as step 3 of
           :meth:`flush_and_commit` does for a batch ClickHouse refused.
        3. **Buffer** it with its provenance (partition, offset). Skipped and dead-lettered records still count
           as consumed, so the commit moves past them.
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
        2. **Insert as fetched**: hand the batch's lines to ClickHouse with that token in a worker thread (the
           event loop stays free); one ``INSERT ... SELECT`` parses them, checks the kline contract and stores
           the rows, as one block: all of them or nothing. On failure, retry with jittered exponential backoff
           capped at ``retry_max_s``. Raising before the rows landed or after they landed (the answer lost) is
           the same to us: the retry carries the same token, so ClickHouse stores the rows once.
        3. **Validate only what ClickHouse refused.** If ClickHouse refused the batch because a record breaks
           the contract (nothing of it was stored), decode and validate every record in Python (the spec's
           ``version_of``, column ranges): a record that fails becomes a dead letter with its reason, and the
           valid rows are inserted under the same token, retried as in step 2. An unexpected exception (a bug,
           not bad input) propagates: the process exits without committing anything of the batch.
        4. **Overlap, then backpressure.** For the first ``keepalive_s`` of steps 2-7, keep taking what the
           consumer has already fetched (``getmany`` without waiting) into the next buffer, up to
           ``buffer_size`` records, while ClickHouse parses on the other core and while the commit travels.
           Those records are the next batch's: stored and committed only with it. If the insert takes longer
           (ClickHouse slow or down), pause every assigned partition, so nothing more is fetched than can be
           stored, and call ``getmany`` every ``keepalive_s`` so the member is not evicted for exceeding
           ``max_poll_interval_ms`` (no rebalance). A quick insert never pauses: a pause would make aiokafka
           drop the records it has prefetched.
        5. **Deliver** the batch's dead letters (acknowledged by the broker), retried the same way.
        6. **Record** the batch's offsets + 1 as stored, except for partitions revoked meanwhile.
        7. **Commit** the stored offsets of the partitions this member owns, with the token as commit
           metadata. A failed commit keeps them for the next commit: the rows are stored, and a restart that
           re-reads them inserts them again under the same or another token, which ``FINAL`` collapses.
        8. **Resume** the partitions if step 4 paused them.

        A stop request bounds steps 2-5 by the shutdown deadline: past it, :class:`FlushAbandoned` is raised
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
            next_batch_error = await self._await_with_keepalive(self._inflight)  # steps 2-7
        finally:
            self._inflight = None
            self._flush_started = None
            if self._paused:
                self._resume_assigned()  # step 8
        if next_batch_error is not None:
            raise next_batch_error
        elapsed = self._clock.monotonic() - started
        self.counters.inc("batches")
        self.counters.set("last_flush_latency_ms", round(elapsed * 1000, 3))
        self.counters.set("last_batch_rows", self._last_rows)
        log_event(
            log,
            logging.DEBUG,
            "batch stored",
            component=self.spec.component,
            token=token,
            rows=self._last_rows,
            dead_letters=len(batch.dead),
            ms=round(elapsed * 1000, 1),
        )

    async def _store(self, batch: Batch, token: str) -> None:
        self._last_rows = 0
        if batch.has_values:
            values = batch.values(self.spec.rule)
            if values.rows and self._parse_in_clickhouse and framed(values.body, values.rows):
                try:
                    await self._insert_batch(values, token)  # step 2
                except InsertSelectDenied as exc:
                    # Not this batch's fault, and no batch will pass: this login may not run the INSERT ...
                    # SELECT. From now on, every record is validated in Python as it is polled.
                    self._parse_in_clickhouse = False
                    log_event(
                        log,
                        logging.ERROR,
                        "this ClickHouse login may not run INSERT ... SELECT FROM input() (a server before 26 "
                        "wants GRANT CREATE TEMPORARY TABLE ON *.* for it); records are validated in Python "
                        "from now on, which is slower",
                        component=self.spec.component,
                        error=str(exc)[:300],
                    )
                except ClickHouseRejected as exc:
                    log_event(
                        log,
                        logging.WARNING,
                        "ClickHouse refused the batch (a record breaks the kline contract); validating it record "
                        "by record",
                        component=self.spec.component,
                        token=token,
                        records=values.rows,
                        error=str(exc)[:200],
                    )
                else:
                    batch.validated((), ())
                    if self.spec.closed_klines:
                        self._observe_closes(closes_of(values.body), corrections_of(values.body, values.rows))
            if batch.has_values:
                await self._validate(batch)  # step 3
        rows = batch.rows(token)
        if rows:  # step 3: the validated rows, under the same token, retried as in step 2
            await self._insert_batch(rows, token)
            if self.spec.closed_klines:
                self._observe_stored(batch.entries)
        if batch.dead:  # step 5
            await self._retrying("dead_letter", lambda: self._dead_letters.deliver(batch.dead))
        for partition, offset in batch.next_offsets().items():  # step 6
            tp = TopicPartition(self.spec.topic, partition)
            if tp not in self._forfeit:
                self._stored[tp] = (offset, token)
        await self._commit_stored()  # step 7, a broker round trip: the next batch keeps arriving meanwhile

    async def _insert_batch(self, payload: Sequence[Any] | KlineValues, token: str) -> None:
        """Insert ``payload`` with ``token``, retried until it is stored; :class:`ClickHouseRejected` is not
        retried (the same insert would be refused again) but raised."""
        started = self._clock.monotonic()
        await self._retrying("insert", lambda: run_in_worker_thread(self._insert, payload, token))
        self.insert_seconds.observe(self._clock.monotonic() - started)
        self.batch_rows.observe(len(payload))
        self.counters.inc("rows_inserted", len(payload))
        self._last_rows = len(payload)

    async def _validate(self, batch: Batch) -> None:
        """Step 3: the validating path for a batch in its fetched form, a fetched run at a time (the event loop
        runs between runs: the consumer's membership and the overlap go on)."""
        entries: list[KlineEntry] = []
        dead: list[DeadLetter] = []
        for partition, run in batch.fetched_runs():
            run_entries, run_dead, _skipped = self._decode_records(partition, run)
            entries.extend(run_entries)
            dead.extend(run_dead)
            await asyncio.sleep(0)
        batch.validated(entries, dead)
        if dead:
            self.counters.inc("dead_letters", len(dead))

    def _observe_stored(self, entries: Sequence[KlineEntry]) -> None:
        """Each stored closed kline's close -> stored latency, from validated rows (see :meth:`_observe_closes`)."""
        closes = Counter([(entry[2].i, entry[2].T) for entry in entries])
        self._observe_closes(closes, len(entries) - [entry[3] for entry in entries].count(0))

    def _observe_closes(self, closes: Counter[tuple[str, int]], corrections: int) -> None:
        """Each stored closed kline's close -> stored latency (wall clock now minus the end of its interval),
        counted once per distinct (interval, close time): a batch holds few of them, so this stays cheap; and
        the corrections (rows of version above 0) among them."""
        now_ms = self._wall_ms()
        for (interval, close_ms), n in closes.items():
            dist = self.close_to_stored.get(interval)
            if dist is None:
                dist = self.close_to_stored[interval] = Distribution(CLOSE_TO_STORED_MS_BUCKETS, scale=0.001)
            dist.observe(max(0, now_ms - close_ms - 1), n)  # T is the interval's last millisecond
        if corrections:
            self.counters.inc("corrections", corrections)

    async def _await_with_keepalive(self, task: asyncio.Task[None]) -> BaseException | None:
        """Wait for the store ``task`` (steps 2-7) while doing step 4. Returns an error that taking the next
        batch raised (a bug): the caller commits the stored batch first, then raises it."""
        loop = asyncio.get_running_loop()
        overlap_until = loop.time() + self._keepalive_s
        next_batch_error: BaseException | None = None
        # Step 4, overlap: take the next batch while this one is inserted (not once a stop is requested).
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
            # Step 4, backpressure. Keep the membership alive: aiokafka leaves the group when getmany is not
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
            retry=retry_if_exception_type(Exception) & retry_if_not_exception_type(ClickHouseRejected),
            sleep=self._clock.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await attempt_fn()
        except ClickHouseRejected:
            raise
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
        dead_count = skipped = 0
        for tp, batch in records.items():
            if not batch:
                continue
            partition = tp.partition
            if self._parse_in_clickhouse:
                skipped += self._buffer.add_values(partition, batch, now, skip_tombstones=self.spec.skip_tombstones)
            else:
                entries, dead, run_skipped = self._decode_records(partition, batch)
                self._buffer.add_run(partition, batch, entries, dead, now)
                dead_count += len(dead)
                skipped += run_skipped
            self._position[tp] = batch[-1].offset + 1
        if dead_count:
            self.counters.inc("dead_letters", dead_count)
        if skipped:
            self.counters.inc("tombstones_skipped", skipped)

    def _decode_records(
        self, partition: int, batch: Sequence[ConsumerRecordLike]
    ) -> tuple[list[KlineEntry], list[DeadLetter], int]:
        """The validating path for consecutive records of one partition: their rows, their dead letters (with
        reasons), and how many tombstones were skipped."""
        entries = self._decode_run(partition, batch)
        if entries is not None:  # the usual case: every record valid, checked at once
            return entries, [], 0
        decode = self._decode
        version_of = self.spec.version_of
        skip_tombstones = self.spec.skip_tombstones
        entries = []
        dead: list[DeadLetter] = []
        skipped = 0
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
                dead.append(self._dead_letter(record, exc.reason, exc.category))
                continue
            entries.append((partition, record.offset, decoded.kline, version, text))
        return entries, dead, skipped

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
        if versions and not (min(versions) >= 0 and max(versions) < UINT64_LIMIT):
            return None
        offsets = [record.offset for record in batch]
        return list(zip(repeat(partition, len(offsets)), offsets, wires, versions, texts, strict=True))

    def _dead_letter(self, record: ConsumerRecordLike, reason: str, category: ReasonCategory) -> DeadLetter:
        self.dead_letters_by_reason[category] += 1
        log_event(
            log,
            logging.WARNING,
            "rejected record goes to the dead-letter topic",
            component=self.spec.component,
            reason=reason,
            category=category,
            partition=record.partition,
            offset=record.offset,
        )
        envelope = dead_letter_value(
            self.spec.component,
            reason,
            record.value,
            category=category,
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
    options.setdefault("parse_in_clickhouse", True)
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
