"""Start, serve and stop one or both writers: startup checks, Kafka clients, health endpoints, signals.

Startup applies nothing: it checks that Kafka and ClickHouse answer and that each writer's table exists with a version
column and insert deduplication (``klines schema apply`` creates them), and refuses to start otherwise with
one line on stderr and exit code 2. Exit code 0 means every buffered batch was stored and committed before the
process ended; 1 means a writer failed or its last batch could not be stored within the shutdown grace period
(nothing of that batch was committed, so the next start re-reads it).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from clickhouse_connect.driver.exceptions import ClickHouseError

from services.core.models import REASON_CATEGORIES
from services.shared import clickhouse
from services.shared.embedded import EmbeddedClient
from services.shared.kafka import check_reachable, make_consumer, make_producer
from services.shared.lifecycle import DependencyUnreachable, HealthServer, Shutdown, run_service
from services.shared.liveness import Liveness
from services.shared.logs import log_event
from services.shared.metrics import Observed, ServiceMetrics
from services.shared.settings import Settings
from services.writers.engine import COUNTER_FIGURES, WriterEngine, make_writer
from services.writers.ports import InsertFn, KafkaDeadLetters, clickhouse_inserter
from services.writers.specs import (
    FINALIZED_COMPONENT,
    SNAPSHOT_COMPONENT,
    WriterSpec,
    finalized_spec,
    snapshot_spec,
)

log = logging.getLogger(__name__)

#: Writer kind -> (log component, spec from the settings).
WRITER_KINDS: Mapping[str, tuple[str, Callable[[Settings], WriterSpec]]] = {
    "finalized": (FINALIZED_COMPONENT, finalized_spec),
    "snapshot": (SNAPSHOT_COMPONENT, snapshot_spec),
}


def _component(kinds: Sequence[str]) -> str:
    return WRITER_KINDS[kinds[0]][0] if len(kinds) == 1 else "writers"


async def serve(
    settings: Settings,
    kinds: Sequence[str],
    shutdown: Shutdown,
    *,
    consumer_options: Mapping[str, Any] | None = None,
    engine_options: Mapping[str, Any] | None = None,
    wrap_insert: Callable[[str, InsertFn], InsertFn] | None = None,
    started: Callable[[list[WriterEngine], HealthServer], None] | None = None,
) -> int:
    """Run the writers named in ``kinds`` until ``shutdown`` is requested; return the process exit code.

    Raises :class:`KafkaUnreachable`, :class:`DependencyUnreachable` (ClickHouse) or
    :class:`clickhouse.SchemaError` before anything starts when a startup check fails. ``consumer_options`` /
    ``engine_options`` / ``wrap_insert`` exist for tests and benchmarks (small timeouts, an insert that fails on
    purpose); ``started`` is called once everything runs.
    """
    specs = [WRITER_KINDS[kind][1](settings) for kind in kinds]
    await check_reachable(settings.kafka)
    try:
        client = clickhouse.connect(settings.clickhouse)  # one client per process, shared by the writers
    except ClickHouseError as exc:
        raise DependencyUnreachable(
            f"cannot reach ClickHouse at {settings.clickhouse.dsn} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); check clickhouse.dsn "
            "in the config or CLICKHOUSE_DSN"
        ) from None
    for spec in specs:
        clickhouse.check_table(client, settings.clickhouse, spec.table)
    if not isinstance(client, EmbeddedClient):  # an embedded engine's own process warms itself up
        _warm_up_insert_path()
    _tune_garbage_collector()

    producer = make_producer(settings.kafka, client_suffix="writers-dead-letter")
    await producer.start()
    dead_letters = KafkaDeadLetters(producer, settings.kafka.topics.dead_letter, settings.kafka.send_timeout_s)
    consumers: list[Any] = []
    engines: list[WriterEngine] = []
    health: HealthServer | None = None
    liveness = Liveness.from_settings(settings.service)  # every getmany of a writer is a poll of its own
    clean = False
    try:
        for spec in specs:
            options: dict[str, Any] = {"max_poll_records": spec.buffer_size, **(consumer_options or {})}
            consumer = make_consumer(settings.kafka, group_id=spec.group_id, client_suffix=spec.component, **options)
            await consumer.start()
            consumers.append(consumer)
            insert = clickhouse_inserter(client, settings.clickhouse, spec.table)
            if wrap_insert is not None:
                insert = wrap_insert(spec.name, insert)
            max_poll_s = options.get("max_poll_interval_ms", 300_000) / 1000
            engines.append(
                make_writer(
                    spec,
                    liveness.observe(consumer, spec.component),
                    client=client,
                    settings=settings,
                    dead_letters=dead_letters,
                    shutdown=shutdown,
                    insert=insert,
                    **{"keepalive_s": min(1.0, max_poll_s / 4), **(engine_options or {})},
                )
            )

        health = HealthServer(
            settings.service.http_host,
            settings.service.writers_http_port,
            ready=lambda: all(e.ready for e in engines),
            metrics=lambda: combined_metrics(engines),
            exporter=writers_exporter(engines),
            liveness=liveness,
            liveness_port=settings.service.liveness_port,
        )
        await health.start()
        log_event(
            log,
            logging.INFO,
            "writers running",
            writers=[e.spec.component for e in engines],
            http_port=health.port,
            clickhouse=settings.clickhouse.dsn,
        )
        if started is not None:
            started(engines, health)
        clean = await _run_all(engines, shutdown)
    finally:
        for consumer in consumers:
            try:
                await asyncio.wait_for(consumer.stop(), max(1.0, shutdown.remaining()))
            except Exception as exc:  # a broker gone at shutdown must not turn a clean stop into a crash
                log_event(log, logging.WARNING, "consumer did not stop cleanly", error=str(exc)[:200])
        try:
            await asyncio.wait_for(producer.stop(), max(1.0, shutdown.remaining()))
        except Exception as exc:
            log_event(log, logging.WARNING, "dead-letter producer did not stop cleanly", error=str(exc)[:200])
        if health is not None:
            await health.stop()
        if clean:
            # Release the embedded directory (after an abandoned flush a worker thread may still use it).
            clickhouse.close(settings.clickhouse)
    return 0 if clean else 1


def _warm_up_insert_path() -> None:
    """Import now what clickhouse-connect imports on its first insert (pandas, to test for a DataFrame).

    Otherwise the first batch after every start pays for it while its partitions wait: 0.5 s on an idle
    machine, several seconds on a busy one (measured 3.4 s), which is the first batch's queryable latency.
    """
    from clickhouse_connect.driver import options

    getattr(options, "pd", None)


#: Allocations of container objects between two young-generation collections (CPython's default: 700).
GC_YOUNG_THRESHOLD = 20_000


def _tune_garbage_collector() -> None:
    """Keep CPython's cyclic garbage collector from costing a writer a quarter of its CPU.

    A writer allocates a few container objects per row (a kline, tuples, the consumer's record) that live until
    their batch is stored, so with the default thresholds a collection runs every ~100 rows and a full one
    (which walks every object of every imported module: aiokafka, chDB, pandas) every few thousand; measured at
    5-8 us per row. Everything that exists after startup lives as long as the process, so it is frozen out of
    the collections (``gc.freeze``), and the young generation is collected every ``GC_YOUNG_THRESHOLD``
    allocations. Garbage is still freed at once by reference counting; only cycles wait a little longer.
    """
    gc.collect()
    gc.freeze()
    _young, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


#: Gauges where the process-wide figure is the worst writer's, not a sum.
_WORST_OF = {"last_flush_latency_ms": max, "flush_age_s": max, "buffer_age_s": max, "paused": max, "ready": min}


def combined_metrics(engines: Sequence[WriterEngine]) -> dict[str, Any]:
    """``/metrics.json``: process-wide figures at the top level (``rows_inserted``, ``lag``, ``dead_letters`` ...
    summed over the writers; latency and flush age the worst writer's), ``dead_letters_by_reason`` (per reason
    category, summed over the writers), and each writer's own under ``writers``.
    """
    per_writer = {e.spec.component: e.metrics() for e in engines}
    combined: dict[str, Any] = {}
    for values in per_writer.values():
        for key, value in values.items():
            if key in combined:
                combined[key] = _WORST_OF.get(key, sum)((combined[key], value))
            else:
                combined[key] = value
    combined["dead_letters_by_reason"] = {
        category: sum(e.dead_letters_by_reason[category] for e in engines) for category in REASON_CATEGORIES
    }
    combined["writers"] = per_writer
    return combined


def writers_exporter(engines: Sequence[WriterEngine]) -> ServiceMetrics:
    """``/metrics``: each writer's figures as ``klines_writers_*{writer=...}`` (the process-wide sums are left to
    PromQL), the process's dead letters per reason category as
    ``klines_writers_dead_letters_by_reason_total{reason=...}`` (a family has one label here: the split by writer
    is ``klines_writers_dead_letters_total``), and its histograms: insert duration, rows per batch, and
    close -> stored latency per interval."""
    return ServiceMetrics(
        "writers",
        lambda: combined_metrics(engines),
        counters=COUNTER_FIGURES | {"dead_letters_by_reason"},
        labels={"writers": "writer", "dead_letters_by_reason": "reason"},
        histograms=lambda: _writer_histograms(engines),
    )


def _writer_histograms(engines: Sequence[WriterEngine]) -> Iterator[Observed]:
    for engine in engines:
        writer = {"writer": engine.spec.component}
        yield Observed(
            "insert_duration_seconds",
            "Seconds from a batch's first insert attempt until ClickHouse accepted it (retries included)",
            writer,
            engine.insert_seconds,
        )
        yield Observed("batch_rows", "Rows per inserted batch", writer, engine.batch_rows)
        for interval, dist in sorted(engine.close_to_stored.items()):
            yield Observed(
                "close_to_stored_seconds",
                "Seconds from a closed kline's interval end until its row was stored (wall clock at insert)",
                {**writer, "interval": interval},
                dist,
            )


async def _run_all(engines: list[WriterEngine], shutdown: Shutdown) -> bool:
    """Run every engine; when one fails, stop the others (they flush and commit) and report failure."""
    tasks = {asyncio.create_task(e.run(), name=e.spec.component): e for e in engines}
    clean = True
    pending = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            engine = tasks[task]
            error = task.exception()
            if error is None:
                continue
            clean = False
            log_event(
                log,
                logging.ERROR,
                "writer failed",
                component=engine.spec.component,
                error=f"{type(error).__name__}: {error}"[:500],
                exc_info=error,
            )
            shutdown.request(f"{engine.spec.component} failed")
    return clean


def main(kinds: Sequence[str], argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m services.{writers,finalized_writer,snapshot_writer}`` (exit codes: see the module
    docstring and :mod:`services.shared.lifecycle`)."""

    async def writers(settings: Settings, shutdown: Shutdown, _args: argparse.Namespace) -> int:
        return await serve(settings, kinds, shutdown)

    return run_service(
        _component(kinds),
        writers,
        description=f"Persist {' and '.join(kinds)} klines from Kafka into ClickHouse.",
        argv=argv,
    )
