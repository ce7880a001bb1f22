"""The aggregator worker: the composition root that wires the engine to Kafka, Faust, HTTP and the clock.

Start order: Kafka reachable → topics (the project's, plus the checkpoint topic with as many partitions as
``trades``) → producers (metadata warmed, so a send never waits) → checkpoint reader → engine → HTTP → Faust
app (joins the group; assignments restore partitions) → clock task.

Stop order (SIGTERM; recovery protocol step 9 in :mod:`services.aggregator.engine`), every step bounded by
the one shutdown deadline: engine stops applying, publishes the last snapshots, flushes the finalized
producer, writes the final checkpoints and commits → clock task → Faust app (leaves the group) → producers →
HTTP.

Producers: ``klines.finalized`` has its own producer (its buffer is the seed's high-priority channel; nothing
else can fill it); snapshots and dead letters share one; checkpoints have their own (compressed, awaited in
background tasks only). All are idempotent with ``acks=all`` (:func:`services.shared.kafka.make_producer`).

HTTP (``aggregator.http_port``): ``/healthz``, ``/readyz``, ``/metrics``, ``/snapshot?symbol=&interval=`` (the
in-progress klines now, each symbol read at one instant), and for tests ``POST /clock``: with ``--clock manual``
``?now_ms=`` sets market time (``&tick=1`` also runs one clock tick at once); with the wall clock ``?step_ms=``
steps the system time the clock reads, as an NTP step would (the clock does not follow it; see
:mod:`services.aggregator.clock`). ``POST /clock`` needs the admin bearer token (``service.admin_token_file``;
without one it is served on a loopback ``http_host`` only, see :mod:`services.shared.admin`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from services.aggregator.app import AggregatorApp, FaustGroup, checkpoint_topic, make_app
from services.aggregator.checkpoint import CheckpointReader
from services.aggregator.checkpointer import MAX_RECORD_BYTES
from services.aggregator.clock import Clock, ManualClock, SystemTime, WallClock
from services.aggregator.engine import Aggregator
from services.aggregator.sending import warm_metadata
from services.aggregator.state import Stats
from services.shared.kafka import TopicSpec, check_reachable, ensure_topics, make_producer
from services.shared.lifecycle import HealthServer, Shutdown
from services.shared.liveness import Liveness
from services.shared.logs import log_event
from services.shared.memory import release_periodically
from services.shared.metrics import Observed, ServiceMetrics
from services.shared.settings import Settings

log = logging.getLogger("services.aggregator")
#: How often the worker hands memory it freed back to the system (:mod:`services.shared.memory`): after a
#: catch-up, RSS falls back to what the books and buffers use instead of staying at the burst's peak.
RELEASE_MEMORY_EVERY_S = 5.0

#: The producers' per-partition batch. aiokafka keeps one open batch per partition and nothing else; what does
#: not fit waits in the engine's outbox (:mod:`services.aggregator.outbox`), and flow control stops the input
#: meanwhile. It must stay below the broker's message.max.bytes (1 MiB by default).
FINALIZED_BATCH_BYTES = 1_000_000
#: The checkpoint producer's request limit and the checkpoint topic's max.message.bytes: above the largest
#: record the checkpointer writes (a larger one defers the checkpoint instead, see its module).
CHECKPOINT_REQUEST_BYTES = MAX_RECORD_BYTES + 64 * 1024
#: The engine's figures that only increase: its hot-path counters (``Stats``, but the longest apply, a maximum),
#: what each partition's books count, and the dead letters per reason category.
COUNTER_FIGURES = frozenset(
    {f.name for f in dataclasses.fields(Stats) if f.name != "longest_apply_s"}
    | {"late_trades", "duplicate_trades", "rejected_trades", "decoded_fast", "decoded_slow", "dead_letters_by_reason"}
)


def aggregator_exporter(engine: Aggregator) -> ServiceMetrics:
    """``/metrics``: the engine's figures as ``klines_aggregator_*``; each partition's read offset and the dead
    letters per reason category labelled; the close -> acknowledged latency of finalized klines per interval as a
    histogram."""

    def histograms() -> Iterator[Observed]:
        for interval, dist in sorted(engine.close_to_produced.items()):
            yield Observed(
                "close_to_produced_seconds",
                "Seconds from a finalized kline's interval end until the broker acknowledged it (wall clock)",
                {"interval": interval},
                dist,
            )

    return ServiceMetrics(
        "aggregator",
        engine.metrics,
        counters=COUNTER_FIGURES,
        labels={"read_offsets": "partition", "dead_letters_by_reason": "reason"},
        histograms=histograms,
    )


class AggregatorWorker:
    """One aggregator worker process (or an in-process instance in tests)."""

    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        *,
        shutdown: Shutdown | None = None,
        http_port: int | None = None,
        finalized_producer_options: dict[str, Any] | None = None,
        checkpoint_every_ticks: int = 1,
        instance_id: str | None = None,
    ) -> None:
        self.settings = settings
        self._instance_id = instance_id
        self.clock = clock
        self.shutdown = shutdown or Shutdown(settings.service.shutdown_grace_s)
        self._http_port = settings.aggregator.http_port if http_port is None else http_port
        self._finalized_options = {"max_batch_size": FINALIZED_BATCH_BYTES, **(finalized_producer_options or {})}
        self._checkpoint_every = checkpoint_every_ticks
        self.engine: Aggregator | None = None
        self.app: AggregatorApp | None = None
        self.http: HealthServer | None = None
        self._producers: list[AIOKafkaProducer] = []
        self._reader: CheckpointReader | None = None
        self._clock_task: asyncio.Task[None] | None = None
        self._release_task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return self.http.port if self.http is not None else self._http_port

    async def start(self) -> None:
        settings = self.settings
        kafka = settings.kafka
        topics = kafka.topics
        await check_reachable(kafka)
        (settings.service.state_dir / "faust").mkdir(parents=True, exist_ok=True)
        await ensure_topics(kafka)
        ckpt_topic = checkpoint_topic(settings)
        partitions = await _partition_count(settings, topics.trades)
        await ensure_topics(
            kafka,
            [
                TopicSpec(
                    ckpt_topic,
                    partitions,
                    {
                        "cleanup.policy": "compact",
                        "segment.ms": "60000",
                        "min.cleanable.dirty.ratio": "0.1",
                        "max.message.bytes": str(CHECKPOINT_REQUEST_BYTES),
                    },
                )
            ],
        )
        checkpoint_partitions = await _partition_count(settings, ckpt_topic)
        if checkpoint_partitions != partitions:
            # Checkpoint partition p holds trades partition p: with another count the mapping is wrong.
            raise RuntimeError(
                f"the checkpoint topic {ckpt_topic} has {checkpoint_partitions} partitions but {topics.trades} has "
                f"{partitions}; after changing the trades partitions, delete {ckpt_topic} and the group's offsets "
                "so the aggregator rebuilds its state from the trades topic"
            )
        finalized = make_producer(kafka, client_suffix="aggregator-finalized", **self._finalized_options)
        snapshots = make_producer(kafka, client_suffix="aggregator-snapshots", max_batch_size=FINALIZED_BATCH_BYTES)
        checkpoints = make_producer(
            kafka,
            client_suffix="aggregator-checkpoints",
            compression_type="gzip",
            max_batch_size=FINALIZED_BATCH_BYTES,
            max_request_size=CHECKPOINT_REQUEST_BYTES,
        )
        for producer in (finalized, snapshots, checkpoints):
            await producer.start()
            self._producers.append(producer)
        await warm_metadata(finalized, [topics.finalized])
        await warm_metadata(snapshots, [topics.snapshots, topics.dead_letter])
        await warm_metadata(checkpoints, [ckpt_topic])
        self._reader = CheckpointReader(kafka, ckpt_topic)
        await self._reader.start()
        engine = self.engine = Aggregator(
            trades_topic=topics.trades,
            finalized_topic=topics.finalized,
            snapshots_topic=topics.snapshots,
            dead_letter_topic=topics.dead_letter,
            checkpoint_topic=ckpt_topic,
            intervals=settings.market.intervals,
            grace_ms=settings.aggregator.grace_ms,
            repair_horizon_ms=settings.aggregator.repair_horizon_ms,
            clock=self.clock,
            finalized=finalized,
            snapshots=snapshots,
            checkpoints=checkpoints,
            reader=self._reader,
            checkpoint_every_ticks=self._checkpoint_every,
            flush_timeout_s=min(5.0, settings.service.shutdown_grace_s / 2),
            max_in_flight=settings.persistence.max_in_flight,
            max_future_skew_ms=settings.aggregator.max_future_skew_ms,
            max_trade_age_ms=None if settings.kafka.trades_retention_ms < 0 else settings.kafka.trades_retention_ms,
            symbols=settings.aggregator.symbols,
        )
        self.liveness = Liveness.from_settings(settings.service)
        self.app = make_app(settings, engine, instance_id=self._instance_id, liveness=self.liveness)
        engine.attach(FaustGroup(self.app))
        routes = [web.get("/snapshot", self._snapshot)]
        if isinstance(self.clock, ManualClock) or self._steppable() is not None:
            routes.append(web.post("/clock", self._set_clock))
        self.http = HealthServer(
            settings.service.http_host,
            self._http_port,
            ready=lambda: engine.ready,
            metrics=self._metrics,
            exporter=aggregator_exporter(engine),
            routes=routes,
            admin_token=settings.service.admin_token(),
            liveness=self.liveness,
            liveness_port=settings.service.liveness_port,
        )
        await self.http.start()
        await self.app.start()
        self._clock_task = asyncio.create_task(engine.run_clock(settings.aggregator.snapshot_interval_ms))
        self._release_task = asyncio.create_task(release_periodically(RELEASE_MEMORY_EVERY_S))
        log_event(
            log,
            logging.INFO,
            "aggregator started",
            group=self.app.conf.id,
            trades=topics.trades,
            checkpoint_topic=ckpt_topic,
            http_port=self.port,
            clock=type(self.clock).__name__,
        )

    async def wait(self) -> int:
        """Until a stop is requested (0) or the Faust app crashed (1)."""
        assert self.app is not None
        while not self.shutdown.requested:
            if self.app.crashed:
                log_event(log, logging.ERROR, "the Faust app crashed", reason=repr(self.app.crash_reason))
                return 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.shutdown.wait(), 0.5)
        return 0

    async def stop(self) -> None:
        """Graceful stop within the shutdown deadline (recovery protocol step 9)."""
        shutdown = self.shutdown
        shutdown.request("stop")
        started = time.monotonic()
        if self.engine is not None and self.app is not None and not self.app.crashed:
            await self.engine.stop(max(0.5, shutdown.remaining() - 1.5))
        if self._release_task is not None:
            self._release_task.cancel()
        if self._clock_task is not None:
            self._clock_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._clock_task
        if self.app is not None:
            try:
                await asyncio.wait_for(self.app.stop(), max(0.5, shutdown.remaining() - 0.5))
            except Exception as exc:
                log_event(log, logging.WARNING, "Faust app did not stop cleanly", error=repr(exc))
        for producer in self._producers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), max(0.2, shutdown.remaining() - 0.3))
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader.stop()
        if self.http is not None:
            await self.http.stop()
        log_event(log, logging.INFO, "aggregator stopped", seconds=round(time.monotonic() - started, 3))

    async def _snapshot(self, request: web.Request) -> web.Response:
        assert self.engine is not None
        symbol = request.query.get("symbol") or None
        interval = request.query.get("interval") or None
        klines = self.engine.current(symbol.upper() if symbol else None, interval)
        return web.json_response(
            {"ready": self.engine.ready, "count": len(klines), "klines": [k.to_dict() for k in klines]}
        )

    def _metrics(self) -> dict[str, Any]:
        assert self.engine is not None
        figures = self.engine.metrics()
        if isinstance(self.clock, WallClock):
            figures["clock_steps"] = self.clock.steps  # steps of the system clock the clock did not follow
        return figures

    def _steppable(self) -> SystemTime | None:
        source = self.clock.time_source if isinstance(self.clock, WallClock) else None
        return source if isinstance(source, SystemTime) else None

    async def _set_clock(self, request: web.Request) -> web.Response:
        system = self._steppable()
        if system is not None:
            try:
                step_ms = int(request.query["step_ms"])
            except (KeyError, ValueError):
                return web.json_response({"error": "step_ms=<integer milliseconds> is required"}, status=400)
            system.step(step_ms)
            assert isinstance(self.clock, WallClock)
            now = self.clock.now_ms()
            return web.json_response({"system_offset_ms": system.offset_ms, "now_ms": now, "steps": self.clock.steps})
        assert isinstance(self.clock, ManualClock)
        try:
            now_ms = int(request.query["now_ms"])
        except (KeyError, ValueError):
            return web.json_response({"error": "now_ms=<integer milliseconds> is required"}, status=400)
        self.clock.set(now_ms)
        if request.query.get("tick") and self.engine is not None:
            self.engine.tick()
        return web.json_response({"now_ms": self.clock.now_ms()})


async def _partition_count(settings: Settings, topic: str, wait_s: float = 10.0) -> int:
    """The topic's partition count; waits up to ``wait_s`` for a topic just created to show its partitions."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka.bootstrap, request_timeout_ms=settings.kafka.request_timeout_ms
    )
    await admin.start()
    try:
        deadline = time.monotonic() + wait_s
        while True:
            described = await admin.describe_topics([topic])
            partitions = described[0].get("partitions") or [] if described else []
            if partitions:
                return len(partitions)
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {topic} has no partitions (does it exist? see kafka.topics)")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def run(settings: Settings, clock: Clock, shutdown: Shutdown, *, instance_id: str | None = None) -> int:
    """Run one worker until ``shutdown`` is requested; the process exit code (0 stopped, 1 the app crashed).

    Raises :class:`~services.shared.kafka.KafkaUnreachable` when Kafka does not answer at start.
    """
    worker = AggregatorWorker(settings, clock, shutdown=shutdown, instance_id=instance_id)
    try:
        await worker.start()
        code = await worker.wait()
    finally:
        await worker.stop()
    return code
