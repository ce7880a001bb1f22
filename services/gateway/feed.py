"""The gateway's Kafka side: read both kline topics without a consumer group and hand each update on.

1. Start a consumer with no group (nothing is committed: the gateway keeps no position worth resuming from).
2. Wait until both topics exist, assign every partition, and seek each to ``end - gateway.warmup_records`` (not
   before its beginning): the read-back fills the board with the current kline of every active key (and the
   in-memory history) so a client that subscribes right after a restart is answered at once.
3. Ready once every partition has been read up to where it ended at start; from then on updates are live.
4. Loop: fetch a batch, check each record's shape (:func:`decode_record`; a record that is not a kline is
   counted and skipped, never fatal), and call ``deliver`` with an :class:`Update` whose event time ``E`` is
   the record's timestamp.
   Every second refresh the lag (high watermark - position) and every 30 s pick up new partitions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from services.core.models import InvalidInput
from services.gateway.board import Update
from services.gateway.protocol import decode_record
from services.shared.kafka import make_consumer
from services.shared.lifecycle import Counters, Shutdown
from services.shared.liveness import Liveness
from services.shared.logs import log_event
from services.shared.settings import Settings

log = logging.getLogger(__name__)

_BATCH = 2000
_YIELD_EVERY = 500
_PARTITION_CHECK_S = 30.0


class KlineFeed:
    """Consumes ``klines.snapshots`` and ``klines.finalized``; see the module docstring for the steps."""

    def __init__(
        self,
        settings: Settings,
        deliver: Callable[[Update], None],
        counters: Counters,
        *,
        clock: Callable[[], float] = time.monotonic,
        consumer_options: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.topics = (settings.kafka.topics.snapshots, settings.kafka.topics.finalized)
        self._deliver = deliver
        self._counters = counters
        self._clock = clock
        self._consumer = make_consumer(
            settings.kafka,
            group_id=None,
            client_suffix="gateway",
            auto_offset_reset="latest",
            **(consumer_options or {}),
        )
        self._names: dict[tuple[str, str], tuple[str, str]] = {}
        self._warmup: dict[TopicPartition, int] = {}
        self._lag: dict[TopicPartition, int] = {}
        self._started = False
        self.ready = False
        self.records_in = 0

    @property
    def lag(self) -> int:
        return sum(self._lag.values())

    def report_polls(self, liveness: Liveness) -> None:
        """From now on every ``getmany`` of the feed's consumer is a poll of liveness poller "gateway feed"
        (:mod:`services.shared.liveness`); called once the feed has started, so its warm-up is not judged."""
        self._consumer = liveness.observe(self._consumer, "gateway feed")

    async def start(self, shutdown: Shutdown) -> bool:
        """Steps 1-2; False when a stop was requested before the topics appeared."""
        await self._consumer.start()
        self._started = True
        partitions = await self._wait_for_partitions(shutdown)
        if partitions is None:
            return False
        await self._assign(partitions, read_back=self.settings.gateway.warmup_records)
        return True

    async def stop(self, timeout_s: float) -> None:
        if self._started:
            self._started = False
            await asyncio.wait_for(self._consumer.stop(), max(1.0, timeout_s))

    async def run(self, shutdown: Shutdown) -> None:
        """Steps 3-4 until ``shutdown``."""
        next_refresh = next_partition_check = self._clock()
        while not shutdown.requested:
            # Awaited directly (no extra task per fetch): every hop between the fetch and the send adds latency
            # when the machine is busy. The short timeout bounds how long a stop request waits.
            try:
                batches = await self._consumer.getmany(timeout_ms=250, max_records=_BATCH)
            except KafkaError as exc:
                self._counters.inc("kafka_errors")
                log_event(log, logging.WARNING, "fetch from Kafka failed; retrying", error=str(exc)[:200])
                await asyncio.sleep(1.0)
                continue
            handled = 0
            for tp, records in batches.items():
                for record in records:
                    self._handle(tp.topic, record)
                    handled += 1
                    if handled % _YIELD_EVERY == 0:
                        await asyncio.sleep(0)  # let client writers run during a big read-back
            now = self._clock()
            if self._warmup or now >= next_refresh:
                next_refresh = now + 1.0
                await self._refresh_positions()
            if now >= next_partition_check:
                next_partition_check = now + _PARTITION_CHECK_S
                await self._pick_up_new_partitions()

    def _handle(self, topic: str, record: Any) -> None:
        self.records_in += 1
        if record.value is None:
            return  # a tombstone on the compacted snapshots topic
        try:
            kline = decode_record(record.value)
        except InvalidInput as exc:
            self._counters.inc("records_invalid")
            if self._counters.get("records_invalid") <= 10 or self._counters.get("records_invalid") % 1000 == 0:
                log_event(
                    log,
                    logging.WARNING,
                    "skipped a record that is not a kline",
                    topic=topic,
                    partition=record.partition,
                    offset=record.offset,
                    reason=exc.reason[:200],
                )
            return
        names = self._names.get((kline.symbol, kline.interval))
        if names is None:
            names = (f"{kline.symbol.lower()}@kline_{kline.interval}", f"{kline.symbol}|{kline.interval}")
            self._names[(kline.symbol, kline.interval)] = names
        timestamp = int(record.timestamp)
        self._deliver(
            Update(
                names[0], names[1], kline.t, kline.final, kline.version, kline.seq, kline.event(timestamp), timestamp
            )
        )

    async def _wait_for_partitions(self, shutdown: Shutdown) -> list[TopicPartition] | None:
        warn_at = self._clock() + 5.0
        while not shutdown.requested:
            partitions = await self._partitions()
            missing = [t for t in self.topics if not any(tp.topic == t for tp in partitions)]
            if not missing:
                return partitions
            if self._clock() >= warn_at:
                log_event(log, logging.WARNING, "waiting for the kline topics to exist", missing=missing)
                warn_at = self._clock() + 60.0
            try:
                await asyncio.wait_for(shutdown.wait(), 0.25)
            except TimeoutError:
                pass
        return None

    async def _partitions(self) -> list[TopicPartition]:
        # No subscription, so metadata of these topics is not refreshed on its own: ask for it.
        await self._consumer._client.force_metadata_update()
        return [
            TopicPartition(topic, p)
            for topic in self.topics
            for p in sorted(self._consumer.partitions_for_topic(topic) or ())
        ]

    async def _assign(self, partitions: list[TopicPartition], *, read_back: int) -> None:
        self._consumer.assign(partitions)
        begins = await self._consumer.beginning_offsets(partitions)
        ends = await self._consumer.end_offsets(partitions)
        for tp in partitions:
            start = max(begins[tp], ends[tp] - read_back)
            self._consumer.seek(tp, start)
            if ends[tp] > start:
                self._warmup[tp] = ends[tp]
        log_event(
            log,
            logging.INFO,
            "reading the kline topics",
            partitions=len(partitions),
            read_back=sum(ends[tp] - max(begins[tp], ends[tp] - read_back) for tp in partitions),
        )
        self.ready = not self._warmup

    async def _refresh_positions(self) -> None:
        for tp in self._consumer.assignment():
            position = await self._consumer.position(tp)
            target = self._warmup.get(tp)
            if target is not None and position >= target:
                del self._warmup[tp]
            highwater = self._consumer.highwater(tp)
            self._lag[tp] = max(0, (highwater if highwater is not None else position) - position)
        if not self._warmup and not self.ready:
            self.ready = True
            log_event(log, logging.INFO, "read-back done: serving live updates")

    async def _pick_up_new_partitions(self) -> None:
        try:
            partitions = await self._partitions()
        except KafkaError as exc:
            log_event(log, logging.WARNING, "metadata refresh failed", error=str(exc)[:200])
            return
        assigned = self._consumer.assignment()
        new = [tp for tp in partitions if tp not in assigned]
        if new:
            # Keys may have moved to the new partitions: read them from their beginning (they are new).
            log_event(
                log, logging.INFO, "new kline partitions", partitions=[f"{tp.topic}/{tp.partition}" for tp in new]
            )
            positions = {tp: await self._consumer.position(tp) for tp in assigned}
            self._consumer.assign([*assigned, *new])
            for tp, position in positions.items():
                self._consumer.seek(tp, position)
            await self._consumer.seek_to_beginning(*new)
