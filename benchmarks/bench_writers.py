"""Throughput and latency of the two writers against the raw clients' limits, in one run (chDB).

Run: ``.venv/bin/python benchmarks/bench_writers.py [--rows N] [--repeat K] [--latency-s S] [--rate R]`` with a
broker at ``$KAFKA_BOOTSTRAP`` (default 127.0.0.1:9092). The writers run in this process on the embedded engine
in a temporary directory (the engine itself in its child process, as by default; one path runs it in this
process for comparison); the topics are created for the run and deleted after it.

Throughput (rows/s): N klines are produced to each topic first, then each writer is started from the beginning
of its topic and timed from its partition assignment until every row is inserted and committed, with the default
``[persistence]`` buffer sizes. The writers run as deployed (ClickHouse parses the values as fetched and checks
the kline contract: ``services/writers/contract.py``), and the finalized writer also on its validating path alone
(every record decoded and validated in Python, rows sent as text: what it did before). Next to them, in the same
rounds, the raw limits of what a writer is made of:

* a bare aiokafka consumer reading the finalized topic (``getmany`` only, nothing decoded);
* a bare clickhouse-connect ``client.insert`` loop of the same rows, already built, ``Decimal`` columns;
* a bare ``raw_insert`` loop of the same rows as ``TabSeparated`` text, already encoded (the validating path's
  insert): the raw client limit of an insert;
* a bare loop of the writers' ``INSERT ... SELECT`` over the same klines as fetched, lines already built (the
  contract's parse and checks in ClickHouse): the limit of the path the writers take.

The inserts run in batches of ``finalized_buffer_size``. The paths run in ``--repeat`` interleaved rounds (the
machine is shared); best, median and worst are printed. For each writer path, the CPU time per row of the writer's
process and of the embedded engine's child (Linux ``/proc``) shows which one bounds the rate: one Python process
cannot store more rows per second than one core gives it. A split of the per-row cost (decode, row text, insert),
next to the full path's and clickhouse-connect's, shows where a writer's time goes, and a GIL check shows how fast
the writer's main thread runs while an insert runs in another thread, with the engine in its child process and
in this process.

Latency: klines are produced at ``--rate`` per second (the close of each kline is the moment it is produced) while
the finalized writer runs with the default configuration; a poller in the same process (an embedded directory
opens in one process only) looks for new rows every 20 ms. Reported: p50 / p99 / max from produce to queryable.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka import TopicPartition

from services.core.models import Kline
from services.shared import clickhouse
from services.shared.kafka import delete_topics, ensure_topics, make_consumer, make_producer
from services.shared.lifecycle import Shutdown
from services.shared.messages import (
    _decode_kline_fully,
    decode_kline_record,
    decode_kline_run,
    encode_kline,
    kline_key,
)
from services.shared.settings import Settings, load_settings
from services.writers import serve
from services.writers.batch import Batch, row_text
from services.writers.contract import KlineValues
from services.writers.engine import WriterEngine
from services.writers.ports import clickhouse_inserter
from services.writers.specs import FINALIZED_RULE, finalized_spec

REPO = Path(__file__).resolve().parents[1]
T0 = 1_735_689_600_000  # 2025-01-01 00:00 UTC
SYMBOLS = [f"S{k:04d}USDT" for k in range(500)]


def synthetic_kline(n: int, *, closed: bool = True) -> Kline:
    """Deterministic, realistic klines: 500 symbols x consecutive minutes, 8-decimal prices and volumes."""
    symbol = SYMBOLS[n % len(SYMBOLS)]
    t = T0 + (n // len(SYMBOLS)) * 60_000
    base = Decimal(20_000 + n % 977) + Decimal(n % 99_991) / Decimal(10**8)
    v = Decimal(1 + n % 13) + Decimal(n % 7919) / Decimal(10**8)
    c = base + Decimal("0.5")
    q = (v * c).quantize(Decimal("1E-16"))
    return Kline(symbol, "1m", t, t + 59_999, 10 * n, 10 * n + 9, base, base + 1, base - 1, c, v, 10, closed, q,
                 v / 2, q / 2)  # fmt: skip


def bench_settings(
    database: str, topics: dict[str, str], chdb_dir: Path, *, in_process: bool = False, **persistence: Any
) -> Settings:
    return load_settings(
        REPO / "config" / "klines.toml",
        kafka={"bootstrap": os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092"), "topics": topics,
               "klines_partitions": 3, "client_id": f"bench-{database}-{uuid.uuid4().hex[:6]}"},
        clickhouse={"dsn": f"chdb://{chdb_dir}", "database": database, "embedded_in_process": in_process},
        service={"writers_http_port": 0, "log_level": "WARNING"},
        persistence=persistence,
    )  # fmt: skip


async def produce(settings: Settings, topic: str, values: Sequence[tuple[bytes, bytes]]) -> None:
    producer = make_producer(settings.kafka, linger_ms=20)
    await producer.start()
    try:
        for key, value in values:
            await producer.send(topic, key=key, value=value)
        await producer.flush()
    finally:
        await producer.stop()


# --- throughput ---------------------------------------------------------------------------------------------


def bare_insert_loop(settings: Settings, rows: list[tuple[Any, ...]], batch: int) -> float:
    """rows/s of clickhouse-connect's ``client.insert`` of prebuilt rows (``Decimal`` columns): no Kafka, no JSON,
    no validation."""
    client = clickhouse.connect(settings.clickhouse)
    clickhouse.apply_schema(client, settings.clickhouse)
    columns = list(clickhouse.KLINE_COLUMNS)
    started = time.perf_counter()
    for i in range(0, len(rows), batch):
        client.insert(settings.clickhouse.finalized_table, rows[i : i + batch], database=settings.clickhouse.database,
                      column_names=columns, settings={"insert_deduplication_token": f"bare:{i}"})  # fmt: skip
    return len(rows) / (time.perf_counter() - started)


def raw_text_insert_loop(settings: Settings, bodies: list[bytes], rows: int) -> float:
    """rows/s of the write path's ``raw_insert`` of prebuilt TabSeparated batches: the raw client limit."""
    client = clickhouse.connect(settings.clickhouse)
    clickhouse.apply_schema(client, settings.clickhouse)
    started = time.perf_counter()
    for i, body in enumerate(bodies):
        clickhouse.insert_tsv(client, settings.clickhouse, settings.clickhouse.finalized_table, body, f"raw:{i}")
    return rows / (time.perf_counter() - started)


def gil_share_during_insert(settings: Settings, bodies: list[bytes], rows: int) -> tuple[float, float]:
    """How fast a pure-Python loop runs on the main thread while another thread inserts (a fraction of its
    speed while that thread waits on an event), and the insert's rows/s meanwhile. Near 1.0 means the insert
    leaves the GIL to the main thread (a writer decodes its next batch meanwhile)."""

    def spin(thread: threading.Thread) -> float:
        count, started = 0, time.perf_counter()
        while thread.is_alive():
            count += 1
        return count / (time.perf_counter() - started)

    idle = threading.Event()
    waiting = threading.Thread(target=idle.wait)
    waiting.start()
    threading.Timer(1.0, idle.set).start()
    alone = spin(waiting)
    result: list[float] = []
    inserting = threading.Thread(target=lambda: result.append(raw_text_insert_loop(settings, bodies, rows)))
    inserting.start()
    during = spin(inserting)
    return during / alone, result[0]


async def bare_consumer(settings: Settings, topic: str, expected: int) -> float:
    """rows/s of a bare aiokafka consumer reading ``topic`` from the start (``getmany`` only, nothing decoded)."""
    consumer = make_consumer(settings.kafka, group_id=None, client_suffix="bare",
                             max_poll_records=settings.persistence.finalized_buffer_size)  # fmt: skip
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(settings.kafka.klines_partitions)])
        await consumer.seek_to_beginning()
        seen = 0
        started = time.perf_counter()
        while seen < expected:
            batches = await consumer.getmany(timeout_ms=1000, max_records=settings.persistence.finalized_buffer_size)
            if not batches:
                raise RuntimeError(f"bare consumer: nothing more after {seen} records")
            seen += sum(len(records) for records in batches.values())
        return expected / (time.perf_counter() - started)
    finally:
        await consumer.stop()


def contract_insert_loop(settings: Settings, bodies: list[bytes], rows: int) -> float:
    """rows/s of the writers' ``INSERT ... SELECT`` (ClickHouse parses and checks) over prebuilt lines."""
    client = clickhouse.connect(settings.clickhouse)
    clickhouse.apply_schema(client, settings.clickhouse)
    insert = clickhouse_inserter(client, settings.clickhouse, settings.clickhouse.finalized_table)
    per_body = rows // len(bodies)
    started = time.perf_counter()
    for i, body in enumerate(bodies):
        insert(KlineValues(body, per_body, FINALIZED_RULE), f"contract:{i}")
    return rows / (time.perf_counter() - started)


def value_batches(values: list[bytes], batch: int) -> list[bytes]:
    """The lines a writer sends for ``values`` as fetched (partition 0), in batches of ``batch`` records."""
    records = [_Record(n, v) for n, v in enumerate(values)]
    out = []
    for i in range(0, len(records), batch):
        b = Batch()
        b.add_values(0, records[i : i + batch], 0.0, skip_tombstones=False)
        out.append(b.values(FINALIZED_RULE).body)
    return out


@dataclass(frozen=True)
class _Record:
    offset: int
    value: bytes
    topic: str = "bench"
    partition: int = 0
    key: bytes | None = None


def tsv_batches(klines: list[Kline], batch: int) -> list[bytes]:
    """The writers' text for ``klines`` (decoded as a writer decodes them), in batches of ``batch`` rows."""
    entries = []
    for offset, k in enumerate(klines):
        record = decode_kline_record(encode_kline(k))
        entries.append((0, offset, record.kline, k.version, row_text(record, k.version)))
    return [clickhouse.KlineRows(entries[i : i + batch], f"raw:{i}").tsv() for i in range(0, len(entries), batch)]


def cost_split(
    values: list[bytes], topics: dict[str, str], chdb_dir: Path, batch: int, consumer_rate: float
) -> dict[str, float]:
    """Microseconds per row of each stage of a writer's work, one stage at a time (the best of three); the Kafka
    stage is the bare consumer's median from the throughput table."""
    n = len(values)

    def best(stage: Any) -> float:
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            stage()
            timings.append(time.perf_counter() - started)
        return min(timings) / n * 1e6

    records = [decode_kline_record(v) for v in values]
    entries = [(0, i, r.kline, 0, row_text(r, 0)) for i, r in enumerate(records)]
    bodies = [clickhouse.KlineRows(entries[i : i + batch], "t").tsv() for i in range(0, n, batch)]
    rows = [clickhouse.kline_row(r.kline, version=0, partition=0, offset=i, token="t") for i, r in enumerate(records)]
    fetched = [_Record(i, v) for i, v in enumerate(values)]
    lines = value_batches(values, batch)

    def take_as_fetched() -> None:
        b = Batch()
        for i in range(0, n, 500):  # one getmany list at a time, as the engine takes them
            b.add_values(0, fetched[i : i + 500], 0.0, skip_tombstones=False)
        b.values(FINALIZED_RULE)

    split = {
        "Kafka: aiokafka getmany (bare consumer, median)": 1e6 / consumer_rate,
        "lines as fetched (Batch.add_values, the batch's body)": best(take_as_fetched),
        "insert: INSERT ... SELECT of the lines (ClickHouse parses and checks)": 1e6
        / contract_insert_loop(bench_settings("bench_split_contract", topics, chdb_dir), lines, n),
    }
    before = {
        "decode + validate: a fetched run at once (decode_kline_run)": best(
            lambda: [decode_kline_run(values[i : i + 500]) for i in range(0, n, 500)]
        ),
        "row text (KlineRows.tsv)": best(
            lambda: [clickhouse.KlineRows(entries[i : i + batch], "t").tsv() for i in range(0, n, batch)]
        ),
        "insert: raw_insert of the text (ClickHouse parses)": 1e6
        / raw_text_insert_loop(bench_settings("bench_split_raw", topics, chdb_dir), bodies, n),
        "decode + validate: one record at a time (decode_kline_record)": best(
            lambda: [decode_kline_record(v) for v in values]
        ),
        "decode + validate: full path (json.loads + Kline.from_dict)": best(
            lambda: [_decode_kline_fully(v) for v in values]
        ),
        "insert: clickhouse-connect client.insert (Decimal columns)": 1e6
        / bare_insert_loop(bench_settings("bench_split_cc", topics, chdb_dir), rows, batch),
    }
    return {
        **split,
        "total (ClickHouse parses)": sum(split.values()),
        **{f"validating path: {k}": v for k, v in before.items()},
    }


@dataclass(frozen=True)
class WriterPath:
    """A throughput path that runs the real writers: which ones, how many rows they store in all, and where the
    embedded engine runs."""

    kinds: list[str]
    rows: int
    in_process: bool = False
    parse_in_clickhouse: bool = True


@dataclass(frozen=True)
class WriterRun:
    """One timed writer run: rows/s, and the CPU each process spent per row meanwhile (microseconds)."""

    rate: float
    writer_cpu_us: float
    engine_cpu_us: float | None  # the embedded engine's child process; None when not measured


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) that process ``pid`` has used so far, from ``/proc``; None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_writers(
    settings: Settings, kinds: list[str], expected: int, *, parse_in_clickhouse: bool = True
) -> WriterRun:
    """Start ``kinds`` from the beginning of their topics; rows/s from the first assignment to the last row."""
    client = clickhouse.connect(settings.clickhouse)
    clickhouse.apply_schema(client, settings.clickhouse)
    engine_pid = getattr(client, "pid", None)  # an EmbeddedClient's child
    shutdown = Shutdown(30)
    holder: list[list[WriterEngine]] = []
    task = asyncio.create_task(
        serve(settings, kinds, shutdown, started=lambda e, _h: holder.append(e),
              engine_options={"parse_in_clickhouse": parse_in_clickhouse})
    )  # fmt: skip
    while not holder:
        await asyncio.sleep(0.005)
    engines = holder[0]
    while not all(e.counters.get("assignments") for e in engines):
        await asyncio.sleep(0.005)
    started, writer_cpu = time.perf_counter(), time.process_time()
    engine_cpu = None if engine_pid is None else process_cpu_s(engine_pid)
    while sum(e.counters.get("rows_inserted") for e in engines) < expected or any(e.uncommitted for e in engines):
        if task.done():
            task.result()
            raise RuntimeError("writers stopped early")
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started
    writer_cpu = time.process_time() - writer_cpu
    engine_after = None if engine_pid is None else process_cpu_s(engine_pid)
    shutdown.request("benchmark done")
    if await task != 0:
        raise RuntimeError("writers did not stop cleanly")
    engine_us = None if engine_cpu is None or engine_after is None else (engine_after - engine_cpu) / expected * 1e6
    return WriterRun(expected / elapsed, writer_cpu / expected * 1e6, engine_us)


# --- latency ------------------------------------------------------------------------------------------------


async def latency(settings: Settings, rate: float, seconds: float, first: int) -> list[float]:
    """Seconds from produce (the kline's close) to queryable, for every kline produced at ``rate`` per second."""
    client = clickhouse.connect(settings.clickhouse)
    clickhouse.apply_schema(client, settings.clickhouse)
    shutdown = Shutdown(30)
    holder: list[list[WriterEngine]] = []
    task = asyncio.create_task(serve(settings, ["finalized"], shutdown, started=lambda e, _h: holder.append(e)))
    while not holder or not holder[0][0].counters.get("assignments"):
        await asyncio.sleep(0.005)
    spec = finalized_spec(settings)
    produced_at: dict[tuple[str, int], float] = {}
    seen_at: dict[tuple[str, int], float] = {}
    count = int(rate * seconds)

    async def producing() -> None:
        producer = make_producer(settings.kafka)
        await producer.start()
        try:
            begin = time.monotonic()
            for n in range(first, first + count):
                k = synthetic_kline(n)
                produced_at[(k.s, k.t)] = time.time()
                await producer.send(spec.topic, key=kline_key(k.s, k.i), value=encode_kline(k))
                ahead = (n - first + 1) / rate - (time.monotonic() - begin)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            await producer.flush()
        finally:
            await producer.stop()

    async def polling() -> None:
        # Rows inserted in the last few seconds: each row is seen by the first poll after its insert.
        sql = (
            f"SELECT symbol, open_time FROM {settings.clickhouse.database}.{spec.table} "
            "WHERE inserted_at >= now64(3) - INTERVAL 5 SECOND"
        )
        while len(seen_at) < count:
            rows = await asyncio.to_thread(clickhouse.query_rows, client, sql)
            now = time.time()
            for symbol, open_time in rows:
                if (symbol, open_time) in produced_at:
                    seen_at.setdefault((symbol, open_time), now)
            await asyncio.sleep(0.02)

    await asyncio.gather(producing(), asyncio.wait_for(polling(), seconds + 30))
    shutdown.request("benchmark done")
    await task
    return sorted(seen_at[key] - produced_at[key] for key in produced_at)


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [list(header)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rows",
        type=int,
        default=300_000,
        help="klines per topic for the throughput runs: a multiple of both buffer sizes (no batch waits for its "
        "flush interval), and a backlog long enough that the first and last batches, which nothing overlaps, "
        "weigh little",
    )
    parser.add_argument("--latency-s", type=float, default=10.0, help="seconds of paced production per run")
    parser.add_argument("--rate", type=float, default=1000.0, help="klines per second in the latency runs")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the throughput runs (best/median/worst)")
    args = parser.parse_args()

    name = f"bench-writers-{uuid.uuid4().hex[:8]}"
    topics = {"trades": f"{name}.trades", "finalized": f"{name}.finalized", "snapshots": f"{name}.snapshots",
              "dead_letter": f"{name}.dead-letter"}  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="bench-writers-"))
    chdb_dir = tmp / "chdb"
    extra_topics: list[str] = []
    base = bench_settings("bench_setup", topics, chdb_dir)
    await ensure_topics(base.kafka)
    try:
        klines = [synthetic_kline(n) for n in range(args.rows)]
        finals = [(kline_key(k.s, k.i), encode_kline(k)) for k in klines]
        snaps = [(kline_key(k.s, k.i), encode_kline(synthetic_kline(n, closed=False), seq=n)) for n, k in
                 enumerate(klines)]  # fmt: skip
        t = time.perf_counter()
        await produce(base, topics["finalized"], finals)
        await produce(base, topics["snapshots"], snaps)
        print(f"produced {2 * args.rows} klines in {time.perf_counter() - t:.1f}s", file=sys.stderr)

        bare_rows = [clickhouse.kline_row(k, version=0, partition=0, offset=i, token="bare") for i, k in
                     enumerate(klines)]  # fmt: skip
        batch = base.persistence.finalized_buffer_size
        bodies = tsv_batches(klines, batch)
        lines = value_batches([v for _k, v in finals], batch)
        # Interleaved repeats (the machine is shared): each path runs once per round, in fresh tables and groups.
        rates: dict[str, list[float]] = {}
        cpu: dict[str, list[WriterRun]] = {}
        paths: dict[str, Any] = {
            "bare aiokafka consumer (getmany only)": "consumer",
            "bare clickhouse-connect client.insert loop (prebuilt rows, Decimal columns)": "client.insert",
            "bare raw_insert loop (prebuilt TabSeparated): raw client limit": "raw_insert",
            "bare INSERT ... SELECT loop (prebuilt lines; ClickHouse parses and checks)": "contract",
            "finalized_writer (Kafka -> lines -> ClickHouse parses -> commit)": WriterPath(["finalized"], args.rows),
            "finalized_writer, validating path (before: Python decodes)": WriterPath(
                ["finalized"], args.rows, parse_in_clickhouse=False
            ),
            "finalized_writer, chDB in the writer's process": WriterPath(["finalized"], args.rows, in_process=True),
            "snapshot_writer": WriterPath(["snapshot"], args.rows),
            "both writers in one process (sum)": WriterPath(["finalized", "snapshot"], 2 * args.rows),
        }
        for round_ in range(args.repeat):
            for n, (label, run) in enumerate(paths.items()):
                in_process = isinstance(run, WriterPath) and run.in_process
                settings = bench_settings(f"bench_r{round_}_p{n}", topics, chdb_dir, in_process=in_process)
                clickhouse.close(settings.clickhouse)  # the directory's engine opens as this path wants it
                if run == "consumer":
                    rate = await bare_consumer(settings, topics["finalized"], args.rows)
                elif run == "client.insert":
                    rate = bare_insert_loop(settings, bare_rows, batch)
                elif run == "raw_insert":
                    rate = raw_text_insert_loop(settings, bodies, args.rows)
                elif run == "contract":
                    rate = contract_insert_loop(settings, lines, args.rows)
                else:
                    result = await run_writers(
                        settings, run.kinds, run.rows, parse_in_clickhouse=run.parse_in_clickhouse
                    )
                    rate = result.rate
                    cpu.setdefault(label, []).append(result)
                rates.setdefault(label, []).append(rate)
        results = [
            (label, f"{max(r):,.0f}", f"{statistics.median(r):,.0f}", f"{min(r):,.0f}") for label, r in rates.items()
        ]
        print(
            f"\nThroughput, {args.rows:,} klines per topic, batches of {batch:,}, {args.repeat} rounds "
            "(2 cores shared, chDB)\n"
        )
        print_table(["path", "best rows/s", "median", "worst"], results)

        print("\nCPU per row during the writer runs (the round with the median rate). With the engine in its child,")
        print("the writer's process runs Python on one core: X us per row caps it at 1,000,000 / X rows/s. With the")
        print("engine in the writer's process, that process also runs the engine's threads, so no such cap follows.\n")
        usage = []
        for label, runs in cpu.items():
            run = sorted(runs, key=lambda r: r.rate)[len(runs) // 2]
            engine = "-" if run.engine_cpu_us is None else f"{run.engine_cpu_us:.1f}"
            if paths[label].in_process:
                usage.append((label, f"{run.writer_cpu_us:.1f}", "-", "(in the writer's process)"))
            else:
                usage.append((label, f"{run.writer_cpu_us:.1f}", f"{1e6 / run.writer_cpu_us:,.0f}", engine))
        print_table(["path", "writer process us/row", "one-core cap rows/s", "engine child us/row"], usage)

        sample = min(20_000, args.rows)
        consumer_rate = statistics.median(rates["bare aiokafka consumer (getmany only)"])
        split = cost_split([v for _k, v in finals[:sample]], topics, chdb_dir, batch, consumer_rate)
        print("\nWhere a writer's time goes, per row (one stage at a time)\n")
        print_table(["stage", "us/row"], [(k, f"{v:.1f}") for k, v in split.items()])

        print("\nchDB and the GIL: the speed of a Python loop on the main thread while another thread inserts\n")
        checks = []
        for where, in_process in (("child process (default)", False), ("in process", True)):
            settings = bench_settings(f"bench_gil_{int(in_process)}", topics, chdb_dir, in_process=in_process)
            share, insert_rate = gil_share_during_insert(settings, bodies, args.rows)
            clickhouse.close(settings.clickhouse)
            checks.append((where, f"{share:.0%}", f"{insert_rate:,.0f}"))
        print_table(["embedded engine", "main thread speed", "insert rows/s meanwhile"], checks)

        defaults = base.persistence
        print(f"\nLatency, produce (kline close) -> queryable, {args.rate:,.0f} klines/s for {args.latency_s:g}s, "
              "default configuration\n")  # fmt: skip
        # A topic of its own, so the writer starts on an empty topic and only the paced klines count.
        lat_topics = {**topics, "finalized": f"{name}.latency"}
        settings = bench_settings("bench_lat", lat_topics, chdb_dir)
        await ensure_topics(settings.kafka)
        extra_topics.append(lat_topics["finalized"])
        values = await latency(settings, args.rate, args.latency_s, 0)
        print_table(
            ["config", "klines", "p50 ms", "p99 ms", "max ms"],
            [(f"finalized_flush_interval_ms={defaults.finalized_flush_interval_ms}, "
              f"finalized_buffer_size={defaults.finalized_buffer_size}", len(values),
              f"{statistics.median(values) * 1000:.0f}", f"{percentile(values, 0.99) * 1000:.0f}",
              f"{values[-1] * 1000:.0f}")],
        )  # fmt: skip
    finally:
        clickhouse.close(base.clickhouse)
        await delete_topics(base.kafka, [*topics.values(), *extra_topics])


if __name__ == "__main__":
    asyncio.run(main())
