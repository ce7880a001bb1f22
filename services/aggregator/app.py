"""The Faust app: consumer group, rebalancing and lifecycle from Faust; trades handed over a batch at a time.

What Faust does here, as it is (faust-streaming, aiokafka driver): the consumer group member (its aiokafka
consumer runs in Faust's consumer thread), partition assignment, heartbeats, the rebalance callbacks
(``app.on_partitions_revoked`` / ``app.on_partitions_assigned``, which this app connects to the engine),
flow control during a rebalance (stop the flow, pause, seek to the committed offsets, resume), and start/stop.

What is replaced: Faust's per-message fetch loop, which caps a Faust agent near 13k messages/s (spec §7).
:class:`BatchFetcher` takes each batch Faust's consumer thread fetched (honouring flow control and paused
partitions) and passes it whole to the aggregator's batch agent, :meth:`Aggregator.handle_batch
<services.aggregator.engine.Aggregator.handle_batch>`. The private Faust hooks that make this possible are all in
:mod:`services.aggregator.faust_seam` (pinned version, contract tests); this module uses only the seam's public
names (a unit test checks that no other aggregator module touches a private Faust name).

The ``trades`` topic is registered with ``acks=False``: Faust's own commit machinery commits only acked
offsets, so it never commits a ``trades`` offset; the engine commits exactly the checkpointed offsets through
:class:`FaustGroup` (recovery protocol step 6 in :mod:`services.aggregator.engine`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from services.aggregator.faust_seam import SEAM_LOGGER, FetchSession, GroupMember, SeamApp, on_rebalance
from services.shared.liveness import Liveness, Poller
from services.shared.settings import Settings

__all__ = ["AggregatorApp", "BatchAgent", "BatchFetcher", "FaustGroup", "checkpoint_topic", "group_id", "make_app"]

log = logging.getLogger("services.aggregator")

#: The aggregator's Faust app: Faust's app with the batch fetch loop (:class:`BatchFetcher`) plugged in.
AggregatorApp = SeamApp

#: Records per fetched batch (Faust's ``broker_max_poll_records``): large enough that each symbol's records
#: in it form long runs (folded at once) and the hand-off is amortised; at full load one batch is about 0.1 s
#: of work, well inside the finalized latency budget. Measured: 4,000 → 112k trades/s, 10,000 → 134k.
MAX_POLL_RECORDS = 10_000
#: Bytes fetched per partition per request (Faust's ``consumer_max_fetch_size``). aiokafka fetches a partition
#: again only once its buffer is drained, so small fetches leave the agent waiting on the network between
#: batches: 1 MiB → 42k trades/s, 4 MiB → 77k, 16 MiB → 95–134k (bench_aggregator, one core).
MAX_FETCH_BYTES = 16 * 1024 * 1024
#: Bytes one fetch response carries across all partitions (aiokafka's ``fetch_max_bytes``). aiokafka keeps a
#: partition's fetched records until they are read and fetches it again only then, so what the consumer holds
#: is bounded by about two responses; without this bound, a lagging consumer of six partitions held six full
#: per-partition fetches (96 MiB of responses, and the RSS that stays with the allocator after them).
MAX_FETCH_TOTAL_BYTES = 16 * 1024 * 1024


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


class BatchFetcher:
    """The consumer's fetch loop: one hand-off to the agent per fetched batch of ``topic``.

    1. Before each fetch, wait until the agent's output has room (flow control, recovery protocol step 3):
       when a batch closed more klines than the producers took at once, the next fetch waits until they
       drained, so a burst slows the input and no output is dropped.
    2. Keep one fetch in flight while the previous batch is applied, so the consumer thread's network round
       trips overlap the agent's work. Each fetch carries the agent's epoch at its start: a rebalance (or a
       seek back) while it is in flight changes the epoch, and the agent then re-reads instead of applying
       records that may predate the rebalance's seek.
    3. A batch fetched while the flow stopped (a rebalance began) is not applied. The rebalance seeks every
       partition to its committed offset, but the fetch may have run after that seek and moved past the records
       it returned: once the flow resumes, the agent seeks its partitions back to where they resume, so the
       records are read again. The same holds for the rest of a batch the agent left unapplied because a
       rebalance began while it yielded between slices.
    4. Return when the consumer or the fetcher stops; a consumer stopped by the broker or a cancellation while
       the app is stopping ends the loop quietly, else it propagates (Faust restarts or crashes the app).

    Liveness (:mod:`services.shared.liveness`): with ``liveness``, every fetch that returned is a poll of the
    poller ``aggregator fetch``; waiting for room (step 1) and a stopped flow (a rebalance, step 3) are pauses
    on purpose, which :meth:`pause_reason` names to the heartbeat: live while the event loop turns.
    """

    def __init__(self, agent: BatchAgent, topic: str, liveness: Liveness | None = None) -> None:
        self.agent = agent
        self.topic = topic
        self.waiting_for_room = False
        self._session: FetchSession | None = None
        self.poller: Poller | None = None
        if liveness is not None:
            self.poller = liveness.poller("aggregator fetch", paused=self.pause_reason)

    def pause_reason(self) -> str | None:
        """Why the loop does not fetch right now on purpose (None: it should be fetching)."""
        if self.waiting_for_room:
            return "flow control: waiting for the output in flight to drain (persistence.max_in_flight)"
        session = self._session
        if session is not None and not session.flow_active:
            return "rebalance: the consumer's flow is stopped"
        return None

    async def run(self, session: FetchSession) -> None:
        agent = self.agent
        topic = self.topic
        next_fetch: tuple[int, asyncio.Future[Any]] | None = None
        polled = self.poller.polled if self.poller is not None else _nothing
        self._session = session
        try:
            while not session.stopped():
                if next_fetch is None:
                    self.waiting_for_room = True
                    try:
                        await agent.wait_for_room()
                    finally:
                        self.waiting_for_room = False
                    next_fetch = (agent.epoch, asyncio.ensure_future(session.next_records(1.0)))
                epoch, pending = next_fetch
                records = await pending
                polled()
                next_fetch = None
                if not records or session.should_stop or not session.flow_active:
                    batch = {tp: recs for tp, recs in records.items() if tp.topic == topic and recs}
                    await self._read_again_after_rebalance(session, batch)
                    await asyncio.sleep(0)
                    continue
                # Not for a stale batch: the agent seeks back for it, which changes the epoch, so a fetch started
                # now would be stale too, be sought back for in turn, and so on while records keep coming (a
                # backlog after a rebalance kept the aggregator re-reading forever). The next fetch starts at
                # the top of the loop, after the seek, with the new epoch.
                if agent.has_room() and epoch == agent.epoch:
                    next_fetch = (agent.epoch, asyncio.ensure_future(session.next_records(1.0)))
                batch = {tp: recs for tp, recs in records.items() if tp.topic == topic}
                if batch:
                    await self._read_again_after_rebalance(session, await agent.handle_batch(batch, epoch))
                await asyncio.sleep(0)
        except session.stopped_errors:
            if session.app_stopping:
                return
            raise
        except asyncio.CancelledError:
            if session.app_stopping:
                return
            raise
        finally:
            self._session = None
            if next_fetch is not None:
                next_fetch[1].cancel()

    async def _read_again_after_rebalance(
        self, session: FetchSession, batch: Mapping[TopicPartition, Sequence[ConsumerRecord[Any, Any]]] | None
    ) -> None:
        """Hand records that were not applied back to the agent to be read again, once the flow resumed."""
        if not batch or session.should_stop:
            return
        if not session.flow_active:
            await session.wait_flow_resumed()
        if not (session.should_stop or session.consumer_stopped()):
            await self.agent.read_again(batch)


class FaustGroup:
    """The engine's view of the group member: commit offsets and read high watermarks (Faust's consumer).

    Commits go to the aiokafka consumer in Faust's consumer thread directly, so a failed commit comes back to
    the engine as an exception (it retries with the next checkpoint) instead of crashing Faust's thread.
    """

    def __init__(self, app: AggregatorApp) -> None:
        self._member = GroupMember(app)

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> bool:
        owned = self._member.assignment()
        to_commit = {tp: offset for tp, offset in offsets.items() if tp in owned}
        if not to_commit:
            return False
        await self._member.commit(to_commit)
        return True

    def highwater(self, tp: TopicPartition) -> int | None:
        return self._member.highwater(tp)

    async def seek(self, tp: TopicPartition, offset: int | None) -> None:
        await self._member.seek(tp, offset)


def _nothing() -> None:
    pass


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
    liveness: Liveness | None = None,
) -> AggregatorApp:
    """The Faust app of one aggregator worker, wired to ``agent``.

    ``instance_id`` makes the worker a static group member (KIP-345; e.g. a StatefulSet pod name): restarted
    with the same id after a crash, it takes its partitions back at once instead of waiting for the session
    timeout to expire the old member; it also does not leave the group on a graceful stop. ``liveness`` gets the
    fetch loop's poller (see :class:`BatchFetcher`).
    """
    kafka = settings.kafka
    # mode logs every service start/stop at INFO under the module of the Faust subclasses (the seam's).
    logging.getLogger(SEAM_LOGGER).setLevel(max(logging.WARNING, logging.getLogger().level))
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
    app.fetch_loop = BatchFetcher(agent, kafka.topics.trades, liveness).run
    app.fetch_max_bytes = MAX_FETCH_TOTAL_BYTES
    app.topics.add(app.topic(kafka.topics.trades, acks=False, key_serializer="raw", value_serializer="raw"))
    on_rebalance(app, lambda tps: agent.on_revoked(tps, rebalance_timeout_s), agent.on_assigned)
    return app
