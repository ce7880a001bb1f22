"""The Faust app: consumer group, rebalancing and lifecycle from Faust; trades handed over a batch at a time.

What Faust does here, as it is (faust-streaming 0.15, aiokafka driver): the consumer group member (its
aiokafka consumer runs in Faust's consumer thread), partition assignment, heartbeats, the rebalance callbacks
(``app.on_partitions_revoked`` / ``app.on_partitions_assigned``, which this app connects to the engine),
flow control during a rebalance (stop the flow, pause, seek to the committed offsets, resume), and start/stop.

What is replaced, and why: Faust's fetcher (``Consumer._drain_messages``) hands every record to the streams
one at a time — it awaits ``wait_first(callback(message), suspend_flow.wait())`` per message, which schedules
new tasks per message and caps a Faust agent near 13k messages/s on this kind of machine (spec §7).
:class:`BatchConsumer` keeps everything else of Faust's aiokafka consumer and overrides only that loop: it
takes the batch Faust's consumer thread fetched (``_wait_next_records``, which honours flow control and
paused partitions) and passes it whole to the aggregator's batch agent, :meth:`Aggregator.handle_batch
<services.aggregator.engine.Aggregator.handle_batch>`. :class:`AggregatorApp` plugs it in through Faust's
transport factory (``App._new_transport``).

The ``trades`` topic is registered with ``acks=False``: Faust's own commit machinery commits only acked
offsets, so it never commits a ``trades`` offset; the engine commits exactly the checkpointed offsets through
:class:`FaustGroup` (recovery protocol step 6 in :mod:`services.aggregator.engine`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, Protocol, cast

import faust
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata
from faust.transport.drivers import aiokafka as faust_aiokafka
from mode.types.signals import BaseSignalT

from services.shared.settings import Settings

log = logging.getLogger("services.aggregator")

#: Records per fetched batch (Faust's ``broker_max_poll_records``): large enough that each symbol's records
#: in it form long runs (folded at once) and the hand-off is amortised; at full load one batch is about 0.1 s
#: of work, well inside the finalized latency budget. Measured: 4,000 → 112k trades/s, 10,000 → 134k.
MAX_POLL_RECORDS = 10_000
#: Bytes fetched per partition per request (Faust's ``consumer_max_fetch_size``). aiokafka fetches a partition
#: again only once its buffer is drained, so small fetches leave the agent waiting on the network between
#: batches: 1 MiB → 42k trades/s, 4 MiB → 77k, 16 MiB → 95–134k (bench_aggregator, one core).
MAX_FETCH_BYTES = 16 * 1024 * 1024


class BatchAgent(Protocol):
    """The receiver of fetched batches (the engine)."""

    @property
    def epoch(self) -> int: ...

    async def handle_batch(
        self, records: Mapping[TopicPartition, Sequence[ConsumerRecord[Any, Any]]], epoch: int
    ) -> Mapping[TopicPartition, Sequence[ConsumerRecord[Any, Any]]] | None: ...

    def has_room(self) -> bool: ...

    async def wait_for_room(self) -> None: ...

    async def read_again(self, records: Mapping[TopicPartition, Sequence[ConsumerRecord[Any, Any]]]) -> None: ...

    async def on_revoked(self, tps: set[TopicPartition], timeout_s: float = ...) -> None: ...

    async def on_assigned(self, tps: set[TopicPartition]) -> None: ...


class BatchConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer with the per-message fetch loop replaced by one hand-off per batch."""

    async def _drain_messages(self, fetcher: Any) -> None:
        app = cast(AggregatorApp, self.app)
        agent = app.batch_agent
        topic = app.batch_topic
        consumer_stopped = self._stopped.is_set
        fetcher_stopped = fetcher._stopped.is_set
        # One fetch is always in flight while the previous batch is applied, so the consumer thread's network
        # round trips overlap the agent's work. Each fetch carries the epoch at which it started: a rebalance
        # (or a seek back) while it is in flight changes the epoch, and the agent then re-reads instead of
        # applying records that may predate the rebalance's seek.
        #
        # Flow control (recovery protocol step 3): a fetch starts only while the agent's output has room. When a
        # batch closed more klines than the producers took at once, the next fetch waits until they drained;
        # so a burst slows the input, and no output is dropped.
        next_fetch: tuple[int, asyncio.Future[Any]] | None = None
        try:
            while not (consumer_stopped() or fetcher_stopped()):
                if next_fetch is None:
                    await agent.wait_for_room()
                    next_fetch = (agent.epoch, asyncio.ensure_future(self._wait_next_records(1.0)))
                epoch, pending = next_fetch
                records, _active = await pending
                next_fetch = None
                if not records or self.should_stop or not self.flow_active:
                    # Flow stopped while fetching (a rebalance began): the batch is not applied. The rebalance
                    # seeks every partition to its committed offset, but this fetch may have run after that
                    # seek and moved past the records it returned: once the rebalance is over, the agent seeks
                    # its partitions back to where they resume, so the records are read again.
                    batch = {tp: recs for tp, recs in (records or {}).items() if tp.topic == topic and recs}
                    await self._read_again_after_rebalance(batch)
                    await asyncio.sleep(0)
                    continue
                # Not for a stale batch: the agent seeks back for it, which changes the epoch, so a fetch started
                # now would be stale too, be sought back for in turn, and so on while records keep coming (a
                # backlog after a rebalance kept the aggregator re-reading forever). The next fetch starts at
                # the top of the loop, after the seek, with the new epoch.
                if agent.has_room() and epoch == agent.epoch:
                    next_fetch = (agent.epoch, asyncio.ensure_future(self._wait_next_records(1.0)))
                batch = {tp: recs for tp, recs in records.items() if tp.topic == topic}
                if batch:
                    # A rebalance that began while the agent yielded between slices leaves the rest unapplied.
                    await self._read_again_after_rebalance(await agent.handle_batch(batch, epoch))
                await asyncio.sleep(0)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        finally:
            if next_fetch is not None:
                next_fetch[1].cancel()

    async def _read_again_after_rebalance(
        self, batch: Mapping[TopicPartition, Sequence[ConsumerRecord[Any, Any]]] | None
    ) -> None:
        """Hand records that were not applied back to the agent to be read again, once the flow resumed."""
        if not batch or self.should_stop:
            return
        if not self.flow_active:
            await self.wait(self.can_resume_flow)  # type: ignore[arg-type]  # as Faust does
        if not (self.should_stop or self._stopped.is_set()):
            await cast(AggregatorApp, self.app).batch_agent.read_again(batch)


class BatchTransport(faust_aiokafka.Transport):
    Consumer = BatchConsumer


class AggregatorApp(faust.App):
    """A Faust app whose consumer hands fetched batches of ``batch_topic`` to ``batch_agent``."""

    batch_agent: BatchAgent
    batch_topic: str

    def _new_transport(self) -> Any:
        return BatchTransport(self.conf.broker_consumer, self)


class FaustGroup:
    """The engine's view of the group member: commit offsets and read high watermarks (Faust's consumer).

    Commits go to the aiokafka consumer in Faust's consumer thread directly, so a failed commit comes back to
    the engine as an exception (it retries with the next checkpoint) instead of crashing Faust's thread.
    """

    def __init__(self, app: faust.App) -> None:
        self._app = app

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> bool:
        thread = cast(faust_aiokafka.Consumer, self._app.consumer)._thread
        owned = thread.assignment()
        to_commit = {
            TopicPartition(tp.topic, tp.partition): OffsetAndMetadata(offset, "")
            for tp, offset in offsets.items()
            if tp in owned
        }
        if not to_commit:
            return False
        await thread.call_thread(thread._ensure_consumer().commit, to_commit)
        return True

    def highwater(self, tp: TopicPartition) -> int | None:
        value = self._app.consumer.highwater(tp)
        return None if value is None else int(value)

    async def seek(self, tp: TopicPartition, offset: int | None) -> None:
        thread = cast(faust_aiokafka.Consumer, self._app.consumer)._thread
        target = TopicPartition(tp.topic, tp.partition)
        if offset is None:
            await thread.seek_to_beginning(target)
        else:
            await thread.seek_wait({target: offset})


def group_id(settings: Settings) -> str:
    """The aggregator's consumer group (and Faust app id): one per trades topic."""
    return f"{settings.kafka.client_id}-aggregator-{settings.kafka.topics.trades}"


def checkpoint_topic(settings: Settings) -> str:
    """The compacted topic holding the aggregator's checkpoints (see :mod:`services.aggregator.checkpoint`)."""
    return f"{group_id(settings)}-checkpoint"


def make_app(
    settings: Settings,
    agent: BatchAgent,
    *,
    rebalance_timeout_s: float = 10.0,
    max_poll_records: int = MAX_POLL_RECORDS,
    instance_id: str | None = None,
) -> AggregatorApp:
    """The Faust app of one aggregator worker, wired to ``agent``.

    ``instance_id`` makes the worker a static group member (KIP-345; e.g. a StatefulSet pod name): restarted
    with the same id after a crash, it takes its partitions back at once instead of waiting for the session
    timeout to expire the old member; it also does not leave the group on a graceful stop.
    """
    kafka = settings.kafka
    app = AggregatorApp(
        group_id(settings),
        broker=[f"kafka://{server.strip()}" for server in kafka.bootstrap.split(",")],
        broker_client_id=f"{kafka.client_id}-aggregator",
        store="memory://",
        datadir=str(settings.service.state_dir / "faust"),
        autodiscover=False,
        web_enabled=False,
        topic_disable_leader=True,
        topic_allow_declare=False,
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        broker_rebalance_timeout=30.0,
        broker_max_poll_records=max_poll_records,
        consumer_max_fetch_size=MAX_FETCH_BYTES,
        stream_recovery_delay=0.0,
        stream_wait_empty=False,
        consumer_group_instance_id=instance_id,
    )
    app.batch_agent = agent
    app.batch_topic = kafka.topics.trades
    app.topics.add(app.topic(kafka.topics.trades, acks=False, key_serializer="raw", value_serializer="raw"))

    # Faust sends these signals as receiver(app, partitions, signal=...).
    def revoked(_app: Any, /, *partitions: Any, signal: BaseSignalT[Any], **_kwargs: Any) -> Awaitable[None]:
        return agent.on_revoked(set(partitions[0]), rebalance_timeout_s)

    def assigned(_app: Any, /, *partitions: Any, signal: BaseSignalT[Any], **_kwargs: Any) -> Awaitable[None]:
        return agent.on_assigned(set(partitions[0]))

    app.on_partitions_revoked.connect(revoked)
    app.on_partitions_assigned.connect(assigned)
    return app
