"""The seam between the aggregator and Faust's internals: every private name of faust-streaming, mode and aiokafka
that the aggregator relies on is used here and nowhere else.

Why a seam at all: a Faust stream hands records to agents one at a time — Faust's fetcher
(``Consumer._drain_messages``) awaits ``wait_first(callback(message), suspend_flow.wait())`` per message, which
schedules new tasks per message and caps a Faust agent near 13k messages/s on this kind of machine (spec §7).
The aggregator keeps everything else of Faust (the group member in Faust's consumer thread, assignment,
heartbeats, the rebalance signals, flow control during a rebalance, start and stop) and replaces only that loop
with one that hands whole fetched batches to the engine (:class:`services.aggregator.app.BatchFetcher`). That
takes private hooks, and private hooks change without notice between releases; so they are all here, behind
small public methods, ``faust-streaming`` is pinned to :data:`VERIFIED_VERSION` in ``pyproject.toml``, and
contract tests fail naming the hook if an upgrade changes what is relied on: ``tests/unit/test_faust_seam.py``
(signatures, the pin, and that no other aggregator module touches a private name) and
``tests/integration/test_faust_seam_behaviour.py`` (behaviour, with a running app and the real broker).

The hooks, numbered as the contract tests name them:

1. ``faust.App._new_transport()`` — overridden by :class:`SeamApp` to build a :class:`SeamTransport`, whose
   consumer class is :class:`SeamConsumer` (Faust's aiokafka consumer, one method replaced).
2. ``faust.transport.consumer.Consumer._drain_messages(fetcher)`` — Faust's ``Fetcher`` service runs it as its
   one task for as long as the consumer runs; :class:`SeamConsumer` replaces it with the app's
   :attr:`SeamApp.fetch_loop`, given a :class:`FetchSession`.
3. ``Consumer._wait_next_records(timeout)`` — the fetch Faust's own loop uses: waits while the flow is stopped
   (a rebalance), fetches from the active (not paused) partitions in Faust's consumer thread, returns
   ``(records by partition, active partitions)``; :meth:`FetchSession.next_records`.
4. ``mode.Service._stopped`` — the event set when a service (the consumer, the fetcher) stops;
   :meth:`FetchSession.stopped`.
5. ``ThreadDelegateConsumer._thread`` — the :class:`~faust.transport.drivers.aiokafka.AIOKafkaConsumerThread`
   that owns the aiokafka consumer; its public ``assignment()``, ``seek_wait()``, ``seek_to_beginning()`` and
   ``call_thread()`` are used through :class:`GroupMember`.
6. ``AIOKafkaConsumerThread._ensure_consumer()`` — the aiokafka consumer itself, whose ``commit(offsets)`` the
   engine's commits call in the consumer thread (:meth:`GroupMember.commit`): a failed commit comes back to the
   engine as an exception instead of crashing Faust's thread.

7. ``faust.transport.drivers.aiokafka.Consumer._new_consumer_thread()`` and
   ``AIOKafkaConsumerThread._create_worker_consumer(transport)`` — overridden by :class:`SeamConsumer` /
   :class:`SeamConsumerThread` to set, before the aiokafka consumer starts, its ``_fetch_max_bytes`` (aiokafka's
   ``fetch_max_bytes``, which Faust does not pass; its ``start()`` hands it to its fetcher): a bound on one fetch
   response across all partitions (:attr:`SeamApp.fetch_max_bytes`). Faust passes only the per-partition bound,
   so a lagging consumer of six partitions held six full per-partition fetches (96 MiB at 16 MiB each).

Public Faust API relied on (checked by the same tests): ``Consumer.flow_active``, ``can_resume_flow``,
``should_stop``, ``wait()``, ``consumer_stopped_errors``, ``highwater(tp)``, ``App.should_stop`` and the
``on_partitions_revoked`` / ``on_partitions_assigned`` signals.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, cast

import faust
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata
from faust.transport.drivers import aiokafka as faust_aiokafka

#: The logger of the Faust subclasses below (mode names a service's logger after its class's module).
SEAM_LOGGER: Final = __name__
#: The faust-streaming release this module is verified against (pyproject.toml pins exactly this one).
VERIFIED_VERSION: Final = "0.15.3"

Records = Mapping[TopicPartition, Sequence[ConsumerRecord[Any, Any]]]


class FetchSession:
    """What the fetch loop may do with Faust's consumer while it runs (one session per hook 2 call)."""

    def __init__(self, consumer: SeamConsumer, fetcher: Any) -> None:
        self._consumer = consumer
        self._consumer_stopped = consumer._stopped.is_set  # hook 4
        self._fetcher_stopped = fetcher._stopped.is_set  # hook 4
        #: Exceptions that mean the broker or Faust stopped the consumer (then a stopping app returns quietly).
        self.stopped_errors: tuple[type[BaseException], ...] = tuple(consumer.consumer_stopped_errors)

    def stopped(self) -> bool:
        """The consumer or the fetcher service stopped: the loop must return."""
        return bool(self._consumer_stopped() or self._fetcher_stopped())

    def consumer_stopped(self) -> bool:
        return bool(self._consumer_stopped())

    async def next_records(self, timeout_s: float) -> Records:
        """The next fetched records of the active partitions (hook 3), waiting first while the flow is stopped."""
        records, _active = await self._consumer._wait_next_records(timeout_s)
        return cast(Records, records or {})

    @property
    def flow_active(self) -> bool:
        """False from the moment a rebalance stops the flow until it resumes it."""
        return bool(self._consumer.flow_active)

    @property
    def should_stop(self) -> bool:
        return bool(self._consumer.should_stop)

    @property
    def app_stopping(self) -> bool:
        return bool(self._consumer.app.should_stop)

    async def wait_flow_resumed(self) -> None:
        """Until the flow resumes (the rebalance is over) or the consumer stops."""
        await self._consumer.wait(self._consumer.can_resume_flow)  # type: ignore[arg-type]  # as Faust does


FetchLoop = Callable[[FetchSession], Awaitable[None]]


class SeamConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread whose aiokafka consumer fetches at most :attr:`SeamApp.fetch_max_bytes` per
    response across its partitions (hook 7)."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        limit = cast(SeamApp, self.app).fetch_max_bytes
        if limit is not None:
            consumer._fetch_max_bytes = limit  # hook 7: read by AIOKafkaConsumer.start() for its fetcher
        return consumer


class SeamConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer whose fetch loop is the app's :attr:`SeamApp.fetch_loop` (hook 2) and whose
    thread is a :class:`SeamConsumerThread` (hook 7)."""

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return SeamConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _drain_messages(self, fetcher: Any) -> None:
        await cast(SeamApp, self.app).fetch_loop(FetchSession(self, fetcher))


class SeamTransport(faust_aiokafka.Transport):
    Consumer = SeamConsumer


class SeamApp(faust.App):
    """A Faust app whose consumer runs :attr:`fetch_loop` instead of Faust's per-message loop (hook 1)."""

    fetch_loop: FetchLoop
    #: Bytes one fetch response may carry across all partitions (aiokafka's ``fetch_max_bytes``; None: its
    #: default, 50 MiB). Set before the app starts.
    fetch_max_bytes: int | None = None

    def _new_transport(self) -> Any:
        return SeamTransport(self.conf.broker_consumer, self)


class GroupMember:
    """The group member in Faust's consumer thread: assignment, commits, seeks, high watermarks (hooks 5, 6)."""

    def __init__(self, app: SeamApp) -> None:
        self._app = app

    def _thread(self) -> Any:
        return cast(faust_aiokafka.Consumer, self._app.consumer)._thread  # hook 5

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(tp.topic, tp.partition) for tp in self._thread().assignment()}

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit ``offsets`` (the next offset to read, per partition) in the consumer thread; raises on failure."""
        thread = self._thread()
        to_commit = {
            TopicPartition(tp.topic, tp.partition): OffsetAndMetadata(offset, "") for tp, offset in offsets.items()
        }
        await thread.call_thread(thread._ensure_consumer().commit, to_commit)  # hook 6

    async def seek(self, tp: TopicPartition, offset: int | None) -> None:
        """Move the fetch position of ``tp`` to ``offset`` (None: the partition's first offset) and wait for it."""
        thread = self._thread()
        target = TopicPartition(tp.topic, tp.partition)
        if offset is None:
            await thread.seek_to_beginning(target)
        else:
            await thread.seek_wait({target: offset})

    def highwater(self, tp: TopicPartition) -> int | None:
        value = self._app.consumer.highwater(tp)
        return None if value is None else int(value)


def on_rebalance(
    app: SeamApp,
    revoked: Callable[[set[TopicPartition]], Awaitable[None]],
    assigned: Callable[[set[TopicPartition]], Awaitable[None]],
) -> None:
    """Call ``revoked`` / ``assigned`` with the partitions from Faust's rebalance signals, which Faust sends as
    ``receiver(app, partitions, signal=...)`` and awaits (the flow is stopped meanwhile)."""

    def on_revoked(_app: Any, /, *partitions: Any, **_kwargs: Any) -> Awaitable[None]:
        return revoked(set(partitions[0]))

    def on_assigned(_app: Any, /, *partitions: Any, **_kwargs: Any) -> Awaitable[None]:
        return assigned(set(partitions[0]))

    app.on_partitions_revoked.connect(on_revoked)
    app.on_partitions_assigned.connect(on_assigned)
