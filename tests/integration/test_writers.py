"""Both writers against the real Kafka broker and the real ClickHouse engine (chDB): no mocks of either.

The oracle is the scripted stream itself: the expected FINAL table is the highest version (finalized) or the
highest seq (snapshots) of every kline produced. Provenance columns (kafka_partition, kafka_offset) let each test
prove the writer's invariant directly: every offset below a committed offset is stored as a row or was
dead-lettered. Failures are injected only by wrapping the real insert / commit / decode, and processes are
stopped with real signals (SIGTERM, SIGKILL) in the subprocess tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CommitFailedError

from services.core.models import Kline
from services.finalized_writer import finalized_spec
from services.shared import clickhouse
from services.shared.clickhouse import ClickHouseUnavailable, SchemaError
from services.shared.kafka import make_consumer, make_producer
from services.shared.lifecycle import HealthServer, Shutdown
from services.shared.messages import DecodedKline, decode_kline, encode_kline, kline_key
from services.shared.settings import Settings
from services.snapshot_writer import snapshot_spec
from services.writers import serve
from services.writers.engine import WriterEngine, make_writer
from services.writers.ports import InsertFn, KafkaDeadLetters, clickhouse_inserter
from services.writers.specs import WriterSpec

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_040_000
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT")
VALUE_COLUMNS = (
    "symbol, interval, open_time, close_time, first_trade_id, last_trade_id, open, high, low, close, volume, "
    "quote_volume, trade_count, taker_buy_volume, taker_buy_quote_volume, version, source"
)


# --- the scripted stream and its oracle -------------------------------------------------------------------


def make_kline(i: int, *, version: int = 0, x: bool = True, step: int = 3) -> Kline:
    """The i-th kline of the script: 1m klines round-robin over the symbols, distinct 8-decimal prices."""
    symbol = SYMBOLS[i % len(SYMBOLS)]
    t = T0 + (i // len(SYMBOLS)) * 60_000
    base = Decimal(20_000 + i) + Decimal(i % 97) / Decimal(10**8)
    o, h, low, c = base, base + 2, base - 1, base + Decimal(step) / 4 - Decimal(version) / 8
    v = Decimal("1.23456789") + Decimal(step)
    q = v * c
    return Kline(symbol, "1m", t, t + 59_999, 1000 + i, 1000 + i + step, o, h, low, c, v, 10 + step, x, q,
                 v / 2, q / 2, version, "repaired" if version else "live")  # fmt: skip


def finalized_script(count: int) -> list[Kline]:
    """``count`` closed klines; every fifth is later corrected (version 1), which must win under FINAL."""
    klines = [make_kline(i) for i in range(count)]
    klines += [make_kline(i, version=1) for i in range(0, count, 5)]
    return klines


def snapshot_script(count: int) -> list[tuple[Kline, int]]:
    """Three snapshots (seq 0, 1, 2) of each of ``count`` in-progress klines; the last must win."""
    return [(make_kline(i, x=False, step=step), step) for step in range(3) for i in range(count)]


def expected_final(klines: Sequence[Kline]) -> dict[tuple[str, str, int], tuple[Any, ...]]:
    best: dict[tuple[str, str, int], Kline] = {}
    for k in klines:
        key = (k.s, k.i, k.t)
        if key not in best or k.version >= best[key].version:
            best[key] = k
    return {key: value_tuple(k, k.version) for key, k in best.items()}


def value_tuple(k: Kline, version: int) -> tuple[Any, ...]:
    return (k.s, k.i, k.t, k.T, k.f, k.L, k.o, k.h, k.l, k.c, k.v, k.q, k.n, k.V, k.Q, version, k.source)


# --- Kafka and ClickHouse helpers -------------------------------------------------------------------------


async def produce(settings: Settings, topic: str, values: Sequence[tuple[bytes, bytes | None]]) -> None:
    producer = make_producer(settings.kafka)
    await producer.start()
    try:
        for key, value in values:
            await producer.send(topic, key=key, value=value)
        await producer.flush()
    finally:
        await producer.stop()


def finalized_records(klines: Sequence[Kline]) -> list[tuple[bytes, bytes | None]]:
    return [(kline_key(k.s, k.i), encode_kline(k)) for k in klines]


def snapshot_records(snapshots: Sequence[tuple[Kline, int]]) -> list[tuple[bytes, bytes | None]]:
    return [(kline_key(k.s, k.i), encode_kline(k, seq)) for k, seq in snapshots]


async def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    parts = [TopicPartition(topic, p) for p in range(settings.kafka.klines_partitions)]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap, enable_auto_commit=False)
    # Assigned before start: aiokafka 0.14 raises CancelledError from stop() on a consumer that never had a
    # subscription or an assignment.
    consumer.assign(parts)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(parts)
        return {tp.partition: offset for tp, offset in ends.items() if offset > 0}
    finally:
        await consumer.stop()


async def committed_offsets(settings: Settings, group: str, topic: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset >= 0}


async def read_topic(settings: Settings, topic: str, idle_s: float = 1.0) -> list[Any]:
    consumer = make_consumer(settings.kafka, topic, group_id=None, client_suffix="test-reader")
    await consumer.start()
    records: list[Any] = []
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=int(idle_s * 1000))
            if not batch:
                return records
            for part in batch.values():
                records.extend(part)
    finally:
        await consumer.stop()


async def dead_letters(settings: Settings) -> list[dict[str, Any]]:
    return [json.loads(r.value) for r in await read_topic(settings, settings.kafka.topics.dead_letter, 0.5)]


def chdb_client(settings: Settings) -> Any:
    return clickhouse.connect(settings.clickhouse)


def apply_schema(settings: Settings) -> None:
    """The project's schema, with background merges off so raw rows show exactly what was inserted.

    A ReplacingMergeTree merge collapses rows of one kline (that is its job), which would hide a duplicate
    insert from ``count()``; with merges off, every row ever inserted stays visible next to ``FINAL``.
    """
    client = chdb_client(settings)
    clickhouse.apply_schema(client, settings.clickhouse)
    for table in clickhouse.table_names(settings.clickhouse):
        client.command(
            f"ALTER TABLE {settings.clickhouse.database}.{table} MODIFY SETTING "
            "max_bytes_to_merge_at_max_space_in_pool = 1, max_bytes_to_merge_at_min_space_in_pool = 1"
        )


def table_final(settings: Settings, table: str) -> dict[tuple[str, str, int], tuple[Any, ...]]:
    rows = clickhouse.query_rows(
        chdb_client(settings), f"SELECT {VALUE_COLUMNS} FROM {settings.clickhouse.database}.{table} FINAL"
    )
    return {(r[0], r[1], r[2]): tuple(r) for r in rows}


def covered_by_stored_batches(settings: Settings, table: str) -> set[tuple[int, int]]:
    """Every (partition, offset) inside the ranges of a batch whose rows are in ``table``.

    The batch token names the batch's offset ranges, and an insert lands whole, so a stored token proves that
    every record of its batch was stored, including one whose row ClickHouse dropped on insert because a higher
    version of the same kline came in the same block (ReplacingMergeTree's ``optimize_on_insert``).
    """
    tokens = clickhouse.query_rows(
        chdb_client(settings), f"SELECT DISTINCT batch_token FROM {settings.clickhouse.database}.{table}"
    )
    covered: set[tuple[int, int]] = set()
    for (token,) in tokens:
        ranges = str(token).split(":", 1)[1].split("#")[0]
        for part in ranges.split(","):
            name, span = part.split("=")
            first, last = span.split("-")
            covered.update((int(name[1:]), o) for o in range(int(first), int(last) + 1))
    return covered


def assert_no_duplicates(settings: Settings, table: str) -> None:
    """No record stored twice (provenance) and no kline version stored twice (content)."""
    db = settings.clickhouse.database
    client = chdb_client(settings)
    twice = clickhouse.query_rows(
        client, f"SELECT kafka_partition, kafka_offset FROM {db}.{table} GROUP BY 1, 2 HAVING count() > 1 LIMIT 5"
    )
    assert twice == [], f"records stored twice: {twice}"
    twice = clickhouse.query_rows(
        client,
        f"SELECT symbol, interval, open_time, version FROM {db}.{table} GROUP BY 1, 2, 3, 4 HAVING count() > 1 LIMIT 5",
    )
    assert twice == [], f"kline versions stored twice: {twice}"


def provenance(settings: Settings, table: str) -> list[tuple[int, int]]:
    return [
        (int(p), int(o))
        for p, o in clickhouse.query_rows(
            chdb_client(settings), f"SELECT kafka_partition, kafka_offset FROM {settings.clickhouse.database}.{table}"
        )
    ]


def assert_nothing_committed_unstored(
    committed: Mapping[int, int], stored: set[tuple[int, int]], dead: Sequence[dict[str, Any]] = ()
) -> None:
    """Every offset below a committed one is covered by a stored batch, or was dead-lettered."""
    settled = stored | {(d["partition"], d["offset"]) for d in dead}
    for partition, offset in committed.items():
        missing = [o for o in range(offset) if (partition, o) not in settled]
        assert not missing, f"p{partition} committed at {offset} but offsets {missing[:10]} are not stored"


def unique_client(settings: Settings) -> Settings:
    """The same settings with a client id (hence consumer groups) of this test's own."""
    kafka = settings.kafka.model_copy(update={"client_id": f"t-{uuid.uuid4().hex[:10]}"})
    service = settings.service.model_copy(update={"writers_http_port": 0})
    return settings.model_copy(update={"kafka": kafka, "service": service})


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def drained(settings: Settings, spec: WriterSpec) -> bool:
    ends = await end_offsets(settings, spec.topic)
    return await committed_offsets(settings, spec.group_id, spec.topic) == ends


@dataclass
class Served:
    task: asyncio.Task[int]
    shutdown: Shutdown
    engines: list[WriterEngine]
    health: HealthServer

    async def stop(self) -> int:
        self.shutdown.request("test")
        return await asyncio.wait_for(self.task, 30)


async def start_serving(settings: Settings, kinds: Sequence[str], **options: Any) -> Served:
    """``serve()`` in this process (embedded chDB shared by the writers), returned once it runs."""
    shutdown = Shutdown(settings.service.shutdown_grace_s)
    ready: asyncio.Future[tuple[list[WriterEngine], HealthServer]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve(settings, kinds, shutdown, started=lambda e, h: ready.set_result((e, h)), **options)
    )
    done, _ = await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
        raise AssertionError("serve() returned before it started")
    engines, health = ready.result()
    return Served(task, shutdown, engines, health)


# --- a clean run, end to end in one process ---------------------------------------------------------------


async def test_clean_run_final_equals_the_script_without_duplicates_and_health_reports_it(
    settings: Settings,
) -> None:
    settings = unique_client(settings)
    apply_schema(settings)
    finals = finalized_script(300)
    snaps = snapshot_script(200)
    await produce(settings, settings.kafka.topics.finalized, finalized_records(finals))
    await produce(settings, settings.kafka.topics.snapshots, snapshot_records(snaps))
    fin, snap = finalized_spec(settings), snapshot_spec(settings)

    served = await start_serving(settings, ["finalized", "snapshot"])
    await until(lambda: drained(settings, fin), 30, "the finalized writer to commit everything")
    await until(lambda: drained(settings, snap), 30, "the snapshot writer to commit everything")
    base = f"http://127.0.0.1:{served.health.port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as r:
            assert r.status == 200
        async with http.get(f"{base}/readyz") as r:
            assert r.status == 200 and (await r.json())["ready"] is True
        async with http.get(f"{base}/metrics.json") as r:
            metrics = await r.json()
    assert await served.stop() == 0

    writers = metrics["writers"]
    assert writers["finalized_writer"]["rows_inserted"] == len(finals)
    assert writers["snapshot_writer"]["rows_inserted"] == len(snaps)
    for name in ("batches", "lag", "last_flush_latency_ms", "insert_retries", "dead_letters", "assignments"):
        assert name in writers["finalized_writer"], name
    # Process-wide figures at the top level (what `klines run` reads): sums, worst latency.
    assert metrics["rows_inserted"] == len(finals) + len(snaps)
    assert metrics["lag"] == 0 and metrics["ready"] == 1
    assert metrics["last_flush_latency_ms"] == max(w["last_flush_latency_ms"] for w in writers.values())

    assert table_final(settings, fin.table) == expected_final(finals)
    assert table_final(settings, snap.table) == {
        key: value_tuple(k, seq) for (k, seq) in snaps for key in [(k.s, k.i, k.t)] if seq == 2
    }
    # A clean run inserts every record exactly once: no record, no kline version twice.
    for spec in (fin, snap):
        assert_no_duplicates(settings, spec.table)
        committed = await committed_offsets(settings, spec.group_id, spec.topic)
        assert_nothing_committed_unstored(committed, covered_by_stored_batches(settings, spec.table))


# --- backpressure -----------------------------------------------------------------------------------------


async def test_clickhouse_down_longer_than_the_poll_interval_and_session_causes_no_rebalance(
    settings: Settings,
) -> None:
    settings = unique_client(settings)
    apply_schema(settings)
    outage_until = [0.0]
    attempts = [0]

    def flaky(_kind: str, real: InsertFn) -> InsertFn:
        def insert(rows: Sequence[tuple[Any, ...]], token: str) -> None:
            attempts[0] += 1
            if time.monotonic() < outage_until[0]:
                raise ClickHouseUnavailable("injected: ClickHouse is down")
            real(rows, token)

        return insert

    fin = finalized_spec(settings)
    served = await start_serving(
        settings,
        ["finalized"],
        wrap_insert=flaky,
        consumer_options={"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "max_poll_interval_ms": 3000},
        engine_options={"retry_max_s": 0.5},
    )
    [engine] = served.engines
    first = finalized_script(100)
    await produce(settings, fin.topic, finalized_records(first))
    await until(lambda: drained(settings, fin), 20, "the first batch")
    coordinator = engine._consumer._coordinator  # the member's generation: a rebalance would bump it
    generation = coordinator.generation

    outage_until[0] = time.monotonic() + 8.0  # > max_poll_interval (3 s) and > session timeout (6 s)
    before = attempts[0]
    more = [make_kline(i) for i in range(100, 400)]
    await produce(settings, fin.topic, finalized_records(more))
    await asyncio.sleep(4.0)
    assert engine.metrics()["paused"] == 1 and attempts[0] > before + 2
    committed_during = await committed_offsets(settings, fin.group_id, fin.topic)
    assert_nothing_committed_unstored(committed_during, covered_by_stored_batches(settings, fin.table))
    await until(lambda: drained(settings, fin), 30, "the backlog after the outage")
    assert coordinator.generation == generation  # (read before the stop, which leaves the group)
    assert await served.stop() == 0

    assert engine.counters.get("revocations") == 0 and engine.counters.get("assignments") == 1
    assert engine.counters.get("insert_retries") >= 5
    assert table_final(settings, fin.table) == expected_final(first + more)
    assert_no_duplicates(settings, fin.table)  # every retry carried the same token: stored once


# --- a failure at each step of the protocol ---------------------------------------------------------------


@dataclass
class Injected:
    """The real writer (real consumer, real chDB insert, real commit) with one step made to fail."""

    settings: Settings
    spec: WriterSpec
    commit_failures_left: int = 0
    insert_failures_before: int = 0
    insert_failures_after: int = 0
    decode_fail_at: int = 0
    decodes: int = 0
    commits_checked: int = 0
    client: Any = None  # the ClickHouse client the writer uses: the real one, or a fault hook around it

    def insert(self, real: InsertFn) -> InsertFn:
        def insert(rows: Sequence[tuple[Any, ...]], token: str) -> None:
            if self.insert_failures_before > 0:
                self.insert_failures_before -= 1
                raise ClickHouseUnavailable("injected: refused before the rows landed")
            real(rows, token)
            if self.insert_failures_after > 0:
                self.insert_failures_after -= 1
                raise ClickHouseUnavailable("injected: timed out after the rows landed")

        return insert

    def decode(self, raw: bytes | None) -> DecodedKline:
        from services.shared.messages import decode_kline_record

        self.decodes += 1
        if self.decodes == self.decode_fail_at:
            raise RuntimeError("injected: a bug while decoding")
        return decode_kline_record(raw)

    def commit(self, real: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
        async def commit(offsets: Mapping[Any, tuple[int, str]]) -> None:
            # At the moment of every commit, each offset below it must already be a row in the table.
            stored = await asyncio.to_thread(covered_by_stored_batches, self.settings, self.spec.table)
            assert_nothing_committed_unstored({tp.partition: off for tp, (off, _m) in offsets.items()}, stored)
            self.commits_checked += 1
            if self.commit_failures_left > 0:
                self.commit_failures_left -= 1
                raise CommitFailedError("injected: the coordinator refused the commit")
            await real(offsets)

        return commit

    async def run(self, until_drained: bool = True) -> None:
        """Run one writer instance; return when everything is committed (or when it fails)."""
        s = self.settings
        shutdown = Shutdown(5.0)
        client = self.client if self.client is not None else chdb_client(s)
        producer = make_producer(s.kafka)
        await producer.start()
        consumer = make_consumer(s.kafka, group_id=self.spec.group_id, max_poll_records=self.spec.buffer_size)
        await consumer.start()
        try:
            engine = make_writer(
                self.spec, consumer, client=client, settings=s,
                dead_letters=KafkaDeadLetters(producer, s.kafka.topics.dead_letter, 10), shutdown=shutdown,
                insert=self.insert(clickhouse_inserter(client, s.clickhouse, self.spec.table)),
                commit=self.commit(consumer.commit), decode=self.decode, retry_initial_s=0.02, retry_max_s=0.2,
            )  # fmt: skip
            task = asyncio.create_task(engine.run())
            while not task.done():
                if until_drained and await drained(s, self.spec):
                    shutdown.request("drained")
                await asyncio.wait({task}, timeout=0.2)
            task.result()
        finally:
            await consumer.stop()
            await producer.stop()


def small_batches(settings: Settings) -> Settings:
    persistence = settings.persistence.model_copy(
        update={"finalized_buffer_size": 25, "finalized_flush_interval_ms": 100}
    )
    return unique_client(settings).model_copy(update={"persistence": persistence})


@pytest.mark.parametrize("step", ["validate", "insert_before_landing", "insert_after_landing", "commit"])
async def test_a_failure_at_each_step_never_leaves_a_committed_but_unstored_offset(
    settings: Settings, step: str
) -> None:
    settings = small_batches(settings)
    apply_schema(settings)
    spec = finalized_spec(settings)
    script = finalized_script(150)
    records = finalized_records(script)
    if step == "validate":
        # A poison record mid-stream: ClickHouse refuses its batch, which is then validated in Python.
        records = [*records[:90], (b"BTCUSDT|1m", b"{not json"), *records[90:]]
    await produce(settings, spec.topic, records)

    rig = Injected(settings, spec)
    if step == "validate":
        rig.decode_fail_at = 1  # a bug in the validating path: batches before it committed, this one not
        with pytest.raises(RuntimeError, match="injected"):
            await rig.run()
        committed = await committed_offsets(settings, spec.group_id, spec.topic)
        assert 0 < sum(committed.values()) < len(records)
        assert_nothing_committed_unstored(committed, covered_by_stored_batches(settings, spec.table))
        rig = Injected(settings, spec)  # restart with a healthy decoder: the rest is re-read from the commits
    elif step == "insert_before_landing":
        rig.insert_failures_before = 3
    elif step == "insert_after_landing":
        rig.insert_failures_after = 3
    else:
        rig.commit_failures_left = 3
    await rig.run()

    assert rig.commits_checked > 0
    committed = await committed_offsets(settings, spec.group_id, spec.topic)
    assert committed == await end_offsets(settings, spec.topic)
    letters = await dead_letters(settings)
    assert [d["reason"][:8] for d in letters] == (["not JSON"] if step == "validate" else [])
    assert_nothing_committed_unstored(committed, covered_by_stored_batches(settings, spec.table), letters)
    assert table_final(settings, spec.table) == expected_final(script)
    # A retried insert carries the same token: ClickHouse stored the rows once. (After the validating path's
    # failure the restart re-reads that batch from the last commit, under a token of its own.)
    if step != "validate":
        assert_no_duplicates(settings, spec.table)


async def test_an_insert_whose_answer_is_lost_is_retried_with_its_token_and_stored_exactly_once(
    settings: Settings,
) -> None:
    """The ambiguous insert: ClickHouse stored the batch but the writer never heard so (the connection dropped
    after the server answered). The fault is in the client path, around the real engine: the insert runs."""
    settings = small_batches(settings)
    apply_schema(settings)
    spec = finalized_spec(settings)
    script = finalized_script(150)
    await produce(settings, spec.topic, finalized_records(script))

    client = clickhouse.LoseAnswers(chdb_client(settings))
    client.lose_next(2)  # the first batch's insert, and its first retry, are stored but unanswered
    rig = Injected(settings, spec, client=client)
    await rig.run()

    tokens = [re.search(r"insert_deduplication_token = '([^']+)'", sql) for sql in client.lost]
    assert len(tokens) == 2 and all(tokens)
    token = tokens[0].group(1)  # type: ignore[union-attr]
    assert tokens[1].group(1) == token, "the retry carried another token"  # type: ignore[union-attr]
    db, table = settings.clickhouse.database, spec.table
    [(rows,)] = clickhouse.query_rows(
        chdb_client(settings), f"SELECT count() FROM {db}.{table} WHERE batch_token = {{t:String}}", {"t": token}
    )
    # Once, though inserted three times: a row per kline of the batch (a kline and its correction in one batch
    # are one row, ReplacingMergeTree collapses them on insert), and no record twice (below).
    ranges = [span[1:].replace("=", "-").split("-") for span in token.split(":", 1)[1].split("#")[0].split(",")]
    batch = {
        (k.s, k.i, k.t)
        for r in await read_topic(settings, spec.topic)
        for p, first, last in [tuple(map(int, span)) for span in ranges]
        if r.partition == p and first <= r.offset <= last
        for k in [decode_kline(r.value)[0]]
    }
    assert rows == len(batch) > 0
    assert_no_duplicates(settings, table)
    # Committed after it was stored (checked at every commit by the rig), and nothing lost.
    assert rig.commits_checked > 0
    committed = await committed_offsets(settings, spec.group_id, spec.topic)
    assert committed == await end_offsets(settings, spec.topic)
    assert_nothing_committed_unstored(committed, covered_by_stored_batches(settings, table))
    assert table_final(settings, table) == expected_final(script)


# --- poison -----------------------------------------------------------------------------------------------


async def test_poison_records_reach_the_dead_letter_topic_with_reasons_and_are_committed_past(
    settings: Settings,
) -> None:
    settings = unique_client(settings)
    apply_schema(settings)
    fin, snap = finalized_spec(settings), snapshot_spec(settings)
    good = [make_kline(i) for i in range(10)]
    too_precise = make_kline(50)
    too_precise.q, too_precise.Q = Decimal("1.0000000000000000001"), Decimal("0.5")
    fin_values: list[tuple[bytes, bytes | None]] = [
        (b"BTCUSDT|1m", b"{not json"),
        (b"BTCUSDT|1m", json.dumps({**make_kline(51).to_dict(), "h": "1"}).encode()),  # h below o
        (b"BTCUSDT|1m", encode_kline(make_kline(52, x=False))),  # open kline on the finalized topic
        (b"BTCUSDT|1m", b"\xff\xfe binary"),
        (b"BTCUSDT|1m", encode_kline(too_precise)),
        (b"BTCUSDT|1m", None),
    ]
    await produce(settings, fin.topic, finalized_records(good[:5]) + fin_values + finalized_records(good[5:]))
    snaps = [(make_kline(i, x=False), 1) for i in range(5)]
    await produce(
        settings,
        snap.topic,
        [*snapshot_records(snaps), (b"BTCUSDT|1m", encode_kline(make_kline(60, x=False)))],  # no seq
    )

    served = await start_serving(settings, ["finalized", "snapshot"])
    await until(lambda: drained(settings, fin), 30, "finalized committed past the poison")
    await until(lambda: drained(settings, snap), 30, "snapshots committed past the poison")
    engines = {e.spec.component: e for e in served.engines}
    assert await served.stop() == 0

    letters = await dead_letters(settings)
    reasons = sorted((d["service"], d["reason"]) for d in letters)
    assert len(letters) == 7, reasons
    by_service: dict[str, list[str]] = {}
    for service, reason in reasons:
        by_service.setdefault(service, []).append(reason)
    fin_reasons = " | ".join(by_service["finalized_writer"])
    for expected in ("not JSON", "inconsistent prices", "not closed", "Decimal(38, 18)", "null value"):
        assert expected in fin_reasons, (expected, fin_reasons)
    assert by_service["snapshot_writer"] == [
        "snapshot without 'seq' (the per-key snapshot sequence that versions its row)"
    ]
    assert sorted((d["service"], d["category"]) for d in letters) == [
        *[("finalized_writer", c) for c in ("field", "inconsistent", "malformed", "malformed", "malformed", "topic")],
        ("snapshot_writer", "topic"),
    ]
    binary = next(d for d in letters if d["value"] and d["value"].startswith("base64:"))
    assert binary["topic"] == fin.topic and binary["offset"] >= 0
    assert engines["finalized_writer"].counters.get("dead_letters") == 6
    assert {k: n for k, n in engines["finalized_writer"].dead_letters_by_reason.items() if n} == {
        "malformed": 3, "inconsistent": 1, "topic": 1, "field": 1}  # fmt: skip
    assert table_final(settings, fin.table) == expected_final(good)
    assert len(provenance(settings, snap.table)) == 5


# --- startup checks ---------------------------------------------------------------------------------------


async def test_startup_refuses_a_missing_table_or_one_without_deduplication(settings: Settings) -> None:
    settings = unique_client(settings)
    shutdown = Shutdown(5)
    with pytest.raises(SchemaError, match="does not exist; apply the schema first: klines schema apply"):
        await serve(settings, ["finalized"], shutdown)
    client = chdb_client(settings)
    ddl = clickhouse.render_ddl(clickhouse.schema_files()[0], settings.clickhouse)
    client.command(ddl.split("SETTINGS")[0])  # the same table without non_replicated_deduplication_window
    with pytest.raises(SchemaError, match="deduplication"):
        await serve(settings, ["finalized"], shutdown)


# --- real processes, real signals -------------------------------------------------------------------------


def process_env(settings: Settings, **persistence: int) -> dict[str, str]:
    t = settings.kafka.topics
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLINES_")}
    env.update(
        KLINES_CONFIG=str(REPO / "config" / "klines.toml"),
        KAFKA_BOOTSTRAP=settings.kafka.bootstrap,
        KLINES_KAFKA__CLIENT_ID=settings.kafka.client_id,
        KLINES_KAFKA__TOPICS__TRADES=t.trades,
        KLINES_KAFKA__TOPICS__FINALIZED=t.finalized,
        KLINES_KAFKA__TOPICS__SNAPSHOTS=t.snapshots,
        KLINES_KAFKA__TOPICS__DEAD_LETTER=t.dead_letter,
        CLICKHOUSE_DSN=settings.clickhouse.dsn,
        KLINES_SERVICE__WRITERS_HTTP_PORT="0",
        KLINES_SERVICE__LOG_FORMAT="text",
        PYTHONUNBUFFERED="1",
    )
    for key, value in persistence.items():
        env[f"KLINES_PERSISTENCE__{key.upper()}"] = str(value)
    return env


@dataclass
class Processes:
    """Writer processes started by a test (killed at teardown if still running), logs in files."""

    log_dir: Path
    started: list[tuple[subprocess.Popen[bytes], Path]]

    def start(self, module: str, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        log_path = self.log_dir / f"{module}-{len(self.started)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", module], env=dict(env), cwd=REPO, stderr=log)
        self.started.append((proc, log_path))
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return next(path for p, path in self.started if p is proc).read_text()

    async def assigned(self, proc: subprocess.Popen[bytes]) -> bool:
        assert proc.poll() is None, self.log(proc)
        return "partitions assigned" in self.log(proc)

    async def metrics(self, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
        port = re.search(r"writers running .* http_port=(\d+)", self.log(proc))
        assert port is not None, self.log(proc)
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port.group(1)}/metrics.json") as r:
            return dict(await r.json())


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path, [])
    yield procs
    for proc, _log in procs.started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


async def produce_paced(settings: Settings, topic: str, klines: Sequence[Kline], per_s: float) -> None:
    """Produce at a steady rate, as the aggregator does when klines close."""
    producer = make_producer(settings.kafka)
    await producer.start()
    try:
        started = time.monotonic()
        for n, k in enumerate(klines):
            await producer.send(topic, key=kline_key(k.s, k.i), value=encode_kline(k))
            ahead = n / per_s - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
        await producer.flush()
    finally:
        await producer.stop()


async def wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the writer did not exit in time"
        await asyncio.sleep(0.05)
    return proc.returncode


async def test_sigterm_mid_stream_then_restart_loses_and_duplicates_nothing(
    settings: Settings, processes: Processes
) -> None:
    settings = unique_client(settings)
    apply_schema(settings)
    clickhouse.close(settings.clickhouse)  # the writer process owns the chDB directory from here on
    spec = finalized_spec(settings)
    env = process_env(settings, finalized_buffer_size=5000, finalized_flush_interval_ms=1000)
    script = finalized_script(2000)

    first = processes.start("services.finalized_writer", env)
    await until(lambda: processes.assigned(first), 30, "the writer to join its group")
    producing = asyncio.create_task(produce_paced(settings, spec.topic, script, per_s=500))
    await until(lambda: _some_committed(settings, spec), 30, "the first commits")

    async def batch_half_full() -> bool:  # asked on the process's own /metrics.json
        metrics = await processes.metrics(first)
        return bool(metrics["buffered"] > 0 and metrics["buffer_age_s"] < 0.5)

    await until(batch_half_full, 10, "klines in the writer's buffer, well before its next flush")
    first.send_signal(signal.SIGTERM)  # mid-stream, mid-batch: klines keep arriving
    assert await wait_exit(first, settings.service.shutdown_grace_s + 2) == 0
    flushed_at_stop = re.search(r"stopping: flushing the buffer buffered=(\d+)", processes.log(first))
    assert flushed_at_stop is not None and int(flushed_at_stop.group(1)) > 0, processes.log(first)
    stopped_at = await committed_offsets(settings, spec.group_id, spec.topic)
    await producing
    assert sum(stopped_at.values()) < len(script)
    second = processes.start("services.finalized_writer", env)
    await until(lambda: drained(settings, spec), 40, "the restarted writer to drain")
    second.send_signal(signal.SIGTERM)
    assert await wait_exit(second, settings.service.shutdown_grace_s + 2) == 0

    assert_no_duplicates(settings, spec.table)  # nothing twice ...
    assert table_final(settings, spec.table) == expected_final(script)  # ... nothing lost


async def _some_committed(settings: Settings, spec: WriterSpec) -> bool:
    return sum((await committed_offsets(settings, spec.group_id, spec.topic)).values()) > 0


async def test_sigkill_mid_batch_then_restart_gives_the_same_final_result(
    settings: Settings, processes: Processes
) -> None:
    settings = unique_client(settings)
    apply_schema(settings)
    clickhouse.close(settings.clickhouse)
    spec = finalized_spec(settings)
    env = process_env(settings, finalized_buffer_size=150, finalized_flush_interval_ms=400)
    script = finalized_script(1000)

    first = processes.start("services.finalized_writer", env)
    await until(lambda: processes.assigned(first), 30, "the writer to join its group")
    producing = asyncio.create_task(produce_paced(settings, spec.topic, script, per_s=500))
    await until(lambda: _some_committed(settings, spec), 30, "the first commits")
    await asyncio.sleep(0.25)  # into the next batch: buffered or being inserted, not committed
    first.kill()
    assert await wait_exit(first, 5) == -signal.SIGKILL
    killed_at = await committed_offsets(settings, spec.group_id, spec.topic)
    await producing
    assert sum(killed_at.values()) < len(script)
    second = processes.start("services.finalized_writer", env)
    await until(lambda: drained(settings, spec), 60, "the restarted writer to drain")
    second.send_signal(signal.SIGTERM)
    assert await wait_exit(second, settings.service.shutdown_grace_s + 2) == 0

    covered = covered_by_stored_batches(settings, spec.table)
    assert covered >= {(p, o) for p, end in (await end_offsets(settings, spec.topic)).items() for o in range(end)}
    assert_nothing_committed_unstored(killed_at, covered)
    assert table_final(settings, spec.table) == expected_final(script)  # duplicates, if any, vanish here


async def test_a_writer_process_without_its_table_exits_2_with_one_line(
    settings: Settings, processes: Processes
) -> None:
    settings = unique_client(settings)
    clickhouse.close(settings.clickhouse)
    proc = processes.start("services.snapshot_writer", process_env(settings))
    assert await wait_exit(proc, 30) == 2
    lines = processes.log(proc).strip().splitlines()
    assert lines[-1].startswith("snapshot_writer: table klines.klines_snapshots")
    assert lines[-1].endswith("klines schema apply")
