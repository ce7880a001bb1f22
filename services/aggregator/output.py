"""What the aggregator sends, and how it never drops it: finalized klines, snapshots, dead letters.

:class:`Output` holds the engine's three :class:`~services.aggregator.outbox.Outbox` es and the bookkeeping of
recovery protocol step 3 (:mod:`services.aggregator.engine`):

* a closed kline joins its partition's ``unconfirmed`` set and the finalized outbox; it leaves the set when
  the broker acknowledged it. A delivery that failed (timed out, connection lost) is put again; only a kline
  the producer can never take is ``DATA_LOSS``. A kline unconfirmed at a crash is in the checkpoint and is
  sent again after the restore (:meth:`Output.resend`);
* changed and closed klines are coalesced per kline in the partition's snapshot backlog and published with the
  partition's increasing sequence numbers, within its lease;
* a rejected trades record goes to the dead-letter topic with its reason.

:meth:`Output.in_flight` is what the engine's flow control compares with ``persistence.max_in_flight``: while
it is above, no trades are fetched. Nothing here awaits on the hot path; the awaiting methods are for a
rebalance and the stop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from functools import partial
from itertools import islice
from typing import Any, Final

from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from services.aggregator.outbox import Outbox
from services.aggregator.sending import NotEnqueued
from services.aggregator.state import KlineIdent, PartitionState, Stats
from services.core.models import REASON_CATEGORIES, Kline, ReasonCategory
from services.shared.logs import log_event
from services.shared.messages import dead_letter_value, encode_kline, kline_key
from services.shared.metrics import CLOSE_LATENCY_MS_BUCKETS, Distribution

log = logging.getLogger("services.aggregator")

SERVICE: Final = "aggregator"
#: Klines moved from a partition's snapshot backlog to the snapshot outbox in one synchronous call.
SNAPSHOTS_PER_CALL: Final = 5_000

#: A finalized kline on its way: the partition whose unconfirmed set holds it, and the kline.
Finalized = tuple[PartitionState, Kline]


class Output:
    """The engine's output (protocol step 3); see the module docstring."""

    def __init__(
        self,
        *,
        finalized: AIOKafkaProducer,
        snapshots: AIOKafkaProducer,
        finalized_topic: str,
        snapshots_topic: str,
        dead_letter_topic: str,
        stats: Stats,
        monotonic: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.stats = stats
        self._monotonic = monotonic
        self._wall_ms = wall_ms
        #: Per interval: milliseconds from a finalized kline's interval end until the broker acknowledged it.
        self.close_to_produced: dict[str, Distribution] = {}
        self.finalized: Outbox[Finalized] = Outbox(finalized, finalized_topic, _encode_finalized, name="finalized")
        self.snapshots: Outbox[tuple[Kline, int]] = Outbox(
            snapshots, snapshots_topic, _encode_snapshot, name="snapshots"
        )
        self.dead_letters: Outbox[tuple[bytes | None, bytes]] = Outbox(
            snapshots, dead_letter_topic, _encode_dead_letter, name="dead-letter"
        )
        #: Dead letters per reason category (each category from the start: a counter that appears at 1 would
        #: hide its first increase from ``rate``).
        self.dead_letters_by_reason: dict[ReasonCategory, int] = dict.fromkeys(REASON_CATEGORIES, 0)
        #: Set at the stop, once the final checkpoint carries what is still unconfirmed.
        self.closed = False

    def in_flight(self, parts: Iterable[PartitionState]) -> int:
        """Output not yet with the broker: finalized klines queued or unacknowledged, snapshots and dead letters
        waiting (in the outboxes, and in the partitions' snapshot backlogs)."""
        return (
            self.finalized.pending
            + self.snapshots.queued
            + self.dead_letters.queued
            + sum(len(part.snapshot_backlog) for part in parts)
        )

    def finalize(self, part: PartitionState, symbol: str, closed: Iterable[Kline]) -> None:
        """Protocol step 3: each closed kline joins the unconfirmed set and goes to the finalized outbox."""
        pending = part.unconfirmed.setdefault(symbol, {})
        backlog = part.snapshot_backlog
        put = self.finalized.put
        done = self._finalized_done
        count = 0
        for kline in closed:
            backlog[(symbol, kline.i, kline.t)] = kline
            pending[(kline.i, kline.t, kline.version)] = kline
            put((part, kline), done)
            count += 1
        self.stats.klines_finalized += count
        part.dirty.add(symbol)

    def resend(self, part: PartitionState, klines: Iterable[Kline]) -> None:
        """Unconfirmed klines restored from a checkpoint (step 7), sent again."""
        for kline in klines:
            part.unconfirmed.setdefault(kline.s, {})[(kline.i, kline.t, kline.version)] = kline
            self.finalized.put((part, kline), self._finalized_done)
            self.stats.resent_finalized += 1

    def _finalized_done(self, item: Finalized, future: asyncio.Future[Any]) -> None:
        """A finalized kline's delivery resolved: confirmed, sent again, or (never sendable) DATA_LOSS."""
        part, kline = item
        if not part.owned or self.closed:
            return  # the partition's checkpoint carries it (or a replay from the older one closes it again)
        error = None if future.cancelled() else future.exception()
        if future.cancelled() or (error is not None and not isinstance(error, NotEnqueued)):
            # The broker did not acknowledge it (timed out, connection lost): it stays unconfirmed, sent again.
            self.stats.finalized_resent += 1
            if self.stats.finalized_resent == 1 or self.stats.finalized_resent % 1000 == 0:
                log_event(
                    log,
                    logging.WARNING,
                    "finalized kline delivery failed; it is sent again",
                    symbol=kline.s,
                    interval=kline.i,
                    open_time=kline.t,
                    resent=self.stats.finalized_resent,
                    error="cancelled" if error is None else repr(error),
                )
            self.finalized.put(item, self._finalized_done)
            return
        ident: KlineIdent = (kline.i, kline.t, kline.version)
        pending = part.unconfirmed.get(kline.s)
        if pending is not None:
            pending.pop(ident, None)
            if not pending:
                del part.unconfirmed[kline.s]
        part.dirty.add(kline.s)
        if error is not None:  # the producer can never take it (step 4 of the outbox): really lost
            self._data_loss(kline, str(error))
            return
        self.stats.finalized_confirmed += 1
        latency = self.close_to_produced.get(kline.i)
        if latency is None:
            latency = self.close_to_produced[kline.i] = Distribution(CLOSE_LATENCY_MS_BUCKETS, scale=0.001)
        latency.observe(max(0, self._wall_ms() - kline.T - 1))  # T is the interval's last millisecond

    def _data_loss(self, kline: Kline, reason: str) -> None:
        self.stats.data_loss += 1
        log_event(
            log,
            logging.ERROR,
            "a finalized kline could not be delivered and is lost",
            log_type="DATA_LOSS",
            symbol=kline.s,
            interval=kline.i,
            open_time=kline.t,
            version=kline.version,
            reason=reason,
        )

    def dead_letter(
        self, record: ConsumerRecord[Any, Any], reason: str, category: ReasonCategory, *, value: bytes | None = None
    ) -> None:
        self.stats.dead_letters += 1
        self.dead_letters_by_reason[category] += 1
        payload = dead_letter_value(
            SERVICE,
            reason,
            record.value if value is None else value,
            category=category,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
        )
        self.dead_letters.put((record.key, payload), partial(self._dead_letter_done, record, reason))

    def _dead_letter_done(self, record: ConsumerRecord[Any, Any], reason: str, _item: Any, future: Any) -> None:
        error = None if future.cancelled() else future.exception()
        if error is None and not future.cancelled():
            return
        self.stats.dead_letters_dropped += 1
        log_event(
            log,
            logging.ERROR,
            "a rejected trades record could not be dead-lettered",
            log_type="DEAD_LETTER_DROPPED",
            partition=record.partition,
            offset=record.offset,
            reason=reason,
            send_error="cancelled" if error is None else repr(error),
        )

    def publish_snapshots(self, part: PartitionState) -> None:
        """Changed and closed klines (coalesced per kline in the backlog) to the snapshot outbox, each with the
        partition's next sequence number; only within the lease (a restore continues above it), and at most
        :data:`SNAPSHOTS_PER_CALL` a call (the rest on the next tick, or the next look of a paused input)."""
        backlog = part.snapshot_backlog
        for kline in part.books.drain_changed():
            backlog[(kline.s, kline.i, kline.t)] = kline
        if not backlog:
            return
        room = min(part.seq_limit - part.seq, SNAPSHOTS_PER_CALL)
        if part.seq_limit - part.seq <= 0:
            self.stats.snapshots_deferred += 1
            return
        if len(backlog) <= room:
            publish, part.snapshot_backlog = backlog, {}
        else:
            publish = dict(islice(backlog.items(), room))
            part.snapshot_backlog = dict(islice(backlog.items(), room, None))
            self.stats.snapshots_deferred += 1
        put = self.snapshots.put
        done = self._snapshot_done
        seq = part.seq
        for kline in publish.values():
            put((kline, seq), done)
            seq += 1
        self.stats.snapshots_sent += seq - part.seq
        part.seq = seq

    def _snapshot_done(self, item: tuple[Kline, int], future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            self.stats.snapshots_failed += 1  # a later snapshot of the same kline (higher seq) replaces it

    def disown(self, parts: Iterable[PartitionState]) -> None:
        """Partitions this worker no longer owns: their queued output is dropped (the checkpoint has it)."""
        gone = [part for part in parts if part.owned]
        for part in gone:
            part.owned = False
        if gone:
            self.finalized.drop(lambda item: item[0].owned)

    async def flush_snapshots(self, parts: list[PartitionState], deadline: float) -> None:
        """The last snapshots and the dead letters, delivered or the deadline passed."""
        for part in parts:
            self.publish_snapshots(part)
            while part.snapshot_backlog and part.seq < part.seq_limit and self._monotonic() < deadline:
                await asyncio.sleep(0)
                self.publish_snapshots(part)
        for outbox in (self.snapshots, self.dead_letters):
            if not await outbox.flush(deadline - self._monotonic()):
                log_event(log, logging.WARNING, "output not delivered in time", outbox=outbox.name)

    async def flush_finalized(self, timeout_s: float) -> None:
        """Wait until every finalized kline put so far is acknowledged, up to ``timeout_s``."""
        if not await self.finalized.flush(max(0.1, timeout_s)):
            log_event(
                log,
                logging.WARNING,
                "finalized klines still unconfirmed after the flush timeout; the checkpoint carries them",
                pending=self.finalized.pending,
            )

    async def close(self) -> None:
        """After the final checkpoint: what is still unconfirmed is in it; the outboxes stop."""
        self.closed = True
        for outbox in (self.finalized, self.snapshots, self.dead_letters):
            await outbox.close()

    def metrics(self) -> dict[str, Any]:
        return {
            "finalized_queued": self.finalized.queued,
            "finalized_longest_send_wait_s": round(self.finalized.longest_wait_s, 3),
            "snapshots_queued": self.snapshots.queued,
            "dead_letters_queued": self.dead_letters.queued,
            "dead_letters_by_reason": dict(self.dead_letters_by_reason),
        }


def _encode_finalized(item: Finalized) -> tuple[bytes | None, bytes]:
    kline = item[1]
    return kline_key(kline.s, kline.i), encode_kline(kline)


def _encode_snapshot(item: tuple[Kline, int]) -> tuple[bytes | None, bytes]:
    kline, seq = item
    return kline_key(kline.s, kline.i), encode_kline(kline, seq)


def _encode_dead_letter(item: tuple[bytes | None, bytes]) -> tuple[bytes | None, bytes]:
    return item
