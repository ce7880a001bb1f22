"""Benchmark: sustained trades/s from the replay exchange (fast mode) through ingest into Kafka.

    .venv/bin/python benchmarks/bench_ingest.py [--symbols 18] [--minutes 30] [--queue-size 5000]

In one run, on one machine, against the broker at ``$KAFKA_BOOTSTRAP`` (default 127.0.0.1:9092):

1. **websocket read** - a bare ``websockets`` client (``async for`` over ``recv()``) reads the whole feed from
   the replay exchange (in its own process, ``speed=0``) without parsing; then ingest's own connection layer
   (``websockets`` with frames handed over on the read path) does the same: the ceiling on the exchange side;
2. **bare producer, 1 trade/record** - a bare aiokafka producer (idempotent, acks=all) sends every trade of the
   feed as its own record, as a naive ingest would;
3. **bare producer, batches** - the same producer sends the per-symbol batch records ingest writes: the Kafka
   side's ceiling for this topic contract;
4. **ingest** - ``IngestService`` reads the feed over the WebSocket, validates and sequences every trade and
   publishes per-symbol batches; timed from the first frame to the last acknowledgement. Exactly-once is
   checked on the way (every id published, in order).

Prints a table; the target for (4) is >= 50k trades/s. For (4) it also prints the CPU time ingest spent per
trade and the share of a core it got: on a shared machine the rate follows the CPU the process is given, and
``1e6 / (us per trade)`` is the rate one whole core sustains.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from websockets.asyncio.client import connect  # noqa: E402

from services.core.models import AggTrade  # noqa: E402
from services.ingest.connections import (  # noqa: E402
    ConnectionOptions,
    ConnectionStats,
    StreamConnection,
    stream_base,
)
from services.ingest.frames import stream_name  # noqa: E402
from services.ingest.service import IngestService, IngestTuning  # noqa: E402
from services.replay.config import GeneratorFeed, ReplayConfig  # noqa: E402
from services.replay.tape import load_tape, stream_payload  # noqa: E402
from services.shared.kafka import delete_topics, ensure_topics, make_producer  # noqa: E402
from services.shared.messages import encode_trade_batch  # noqa: E402
from services.shared.settings import Settings, load_settings  # noqa: E402

SYMBOLS = (
    "BTCUSDT",
    "ETHUSDT",
    "BNBUSDT",
    "SOLUSDT",
    "XRPUSDT",
    "DOGEUSDT",
    "TRXUSDT",
    "ADAUSDT",
    "LINKUSDT",
    "AVAXUSDT",
    "DOTUSDT",
    "LTCUSDT",
    "ATOMUSDT",
    "NEARUSDT",
    "APTUSDT",
    "ARBUSDT",
    "OPUSDT",
    "SUIUSDT",
)


def start_exchange(symbols: tuple[str, ...], minutes: int) -> tuple[subprocess.Popen[str], str, str]:
    """The replay exchange in its own process (its own core); returns (process, ws_url, rest_url)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.replay",
            "--port",
            "0",
            "--speed",
            "0",
            "--symbols",
            ",".join(symbols),
            "--duration",
            f"{minutes}m",
            "--seed",
            "11",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("replay ready"):
        proc.kill()
        raise SystemExit(f"replay exchange did not start: {line!r}")
    fields = dict(part.split("=", 1) for part in line.split()[2:])
    return proc, fields["ws_url"], fields["rest_url"]


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


async def websocket_read(ws_url: str, symbols: tuple[str, ...], total: int) -> float:
    url = f"{ws_url}/stream?streams=" + "/".join(f"{s.lower()}@aggTrade" for s in symbols)
    count = 0
    async with connect(url, max_size=1 << 22, max_queue=4096, compression=None, proxy=None) as ws:
        start = 0.0
        async for _ in ws:
            if count == 0:
                start = time.perf_counter()
            count += 1
            if count >= total:
                break
    return total / (time.perf_counter() - start)


class _CountingSink:
    """Counts frames; never blocks (for the connection-layer ceiling)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.count = 0
        self.start = 0.0
        self.done = asyncio.Event()

    def on_frame(self, raw: bytes, conn: StreamConnection) -> bool:
        if self.count == 0:
            self.start = time.perf_counter()
        self.count += 1
        if self.count >= self.total:
            self.done.set()
        return False

    async def wait_for_room(self) -> None:
        return None


async def connection_read(ws_url: str, symbols: tuple[str, ...], total: int) -> float:
    sink = _CountingSink(total)
    conn = StreamConnection(
        "bench",
        stream_base(ws_url, "spot"),
        {stream_name(s) for s in symbols},
        sink,
        clock=time.monotonic,
        options=ConnectionOptions(),
        control_interval_s=0.25,
        on_event=lambda: None,
        stats=ConnectionStats(),
    )
    await conn.open()
    try:
        await sink.done.wait()
        return total / (time.perf_counter() - sink.start)
    finally:
        await conn.close()


async def bare_producer(settings: Settings, topic: str, records: list[tuple[bytes, bytes]], trades: int) -> float:
    producer = make_producer(settings.kafka, client_suffix="bench")
    await producer.start()
    try:
        start = time.perf_counter()
        futures = [await producer.send(topic, value, key=key) for key, value in records]
        await asyncio.gather(*futures)
        return trades / (time.perf_counter() - start)
    finally:
        await producer.stop()


async def through_ingest(settings: Settings, tape_ids: dict[str, list[int]], total: int) -> tuple[float, Any]:
    service = IngestService(settings, IngestTuning(http_enabled=False))
    task = asyncio.create_task(service.run())
    while service.trades_received == 0:
        if task.done():
            raise SystemExit(f"ingest exited with {task.result()}")
        await asyncio.sleep(0.001)
    start = time.perf_counter()
    cpu_start = time.process_time()
    while service.publisher is None or service.publisher.trades_published < total:
        if task.done():
            raise SystemExit(f"ingest exited with {task.result()}")
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - start
    metrics = service.metrics()
    metrics["cpu_per_trade_us"] = (time.process_time() - cpu_start) / total * 1e6
    metrics["cpu_share"] = (time.process_time() - cpu_start) / elapsed
    for symbol, ids in tape_ids.items():
        assert service.sequencer.last(symbol) == ids[-1], f"{symbol}: not every id published"
    service.shutdown.request("benchmark over")
    assert await task == 0
    return total / elapsed, metrics


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--symbols", type=int, default=18)
    parser.add_argument("--minutes", type=int, default=30)
    parser.add_argument("--queue-size", type=int, default=None, help="persistence.queue_size (default: config)")
    args = parser.parse_args()
    symbols = SYMBOLS[: args.symbols]
    run = f"bench-ingest-{uuid.uuid4().hex[:6]}"
    base = load_settings(REPO / "config" / "klines.toml")
    topics = {"trades": f"{run}.trades", "dead_letter": f"{run}.dlq", "finalized": f"{run}.f", "snapshots": f"{run}.s"}
    settings = load_settings(
        REPO / "config" / "klines.toml",
        kafka={"bootstrap": os.environ.get("KAFKA_BOOTSTRAP", base.kafka.bootstrap), "topics": topics},
        persistence={"queue_size": args.queue_size or base.persistence.queue_size},
        service={"log_level": "WARNING"},
    )
    await ensure_topics(settings.kafka)
    try:
        # The same feed the exchange process generates (same seed, symbols and window).
        config = ReplayConfig(feed=GeneratorFeed(symbols=symbols, seed=11, duration_ms=args.minutes * 60_000), speed=0)
        tape = load_tape(config)
        trades: dict[str, list[AggTrade]] = {t.symbol: t.trades for t in tape.by_index}
        total = sum(len(v) for v in trades.values())
        single = [(t.s.encode(), stream_payload(t, "spot").encode()) for ts in trades.values() for t in ts]
        batches = [
            (symbol.encode(), encode_trade_batch(symbol, ts[i : i + 200]))
            for symbol, ts in trades.items()
            for i in range(0, len(ts), 200)
        ]
        print(
            f"feed: {len(symbols)} symbols, {args.minutes} min, {total} trades; queue_size "
            f"{settings.persistence.queue_size}; broker {settings.kafka.bootstrap}; {os.cpu_count()} cores"
        )

        rows: list[tuple[str, float, str]] = []
        proc, ws_url, _ = start_exchange(symbols, args.minutes)
        try:
            rows.append(
                ("websockets recv() loop (no parsing, no Kafka)", await websocket_read(ws_url, symbols, total), "")
            )
        finally:
            stop(proc)
        proc, ws_url, _ = start_exchange(symbols, args.minutes)
        try:
            rate = await connection_read(ws_url, symbols, total)
            rows.append(("ingest's connection layer (no parsing, no Kafka)", rate, "frames on the read path"))
        finally:
            stop(proc)
        rows.append(
            (
                "bare aiokafka producer, 1 trade/record",
                await bare_producer(settings, f"{run}.f", single, total),
                f"{len(single)} records",
            )
        )
        rows.append(
            (
                "bare aiokafka producer, per-symbol batches",
                await bare_producer(settings, f"{run}.s", batches, total),
                f"{len(batches)} records",
            )
        )

        proc, ws_url, rest_url = start_exchange(symbols, args.minutes)
        try:
            ingest_settings = settings.model_copy(
                update={
                    "market": settings.market.model_copy(
                        update={"ws_url": ws_url, "rest_url": rest_url, "symbols": symbols}
                    )
                }
            )
            rate, metrics = await through_ingest(
                ingest_settings, {s: [t.a for t in ts] for s, ts in trades.items()}, total
            )
        finally:
            stop(proc)
        rows.append(
            (
                "ingest: websocket -> validate -> sequence -> Kafka",
                rate,
                f"{metrics['records_sent']} records, {metrics['backpressure_pauses']} backpressure pauses, "
                f"{metrics['cpu_per_trade_us']:.1f} us CPU/trade, {metrics['cpu_share']:.0%} of a core",
            )
        )

        width = max(len(r[0]) for r in rows)
        print()
        print(f"{'path':<{width}}  {'trades/s':>10}  notes")
        print(f"{'-' * width}  {'-' * 10}  -----")
        for name, value, note in rows:
            print(f"{name:<{width}}  {value:>10,.0f}  {note}")
        target = 50_000
        print(f"\ningest target >= {target:,} trades/s: {'met' if rate >= target else 'NOT met'}")
    finally:
        await delete_topics(settings.kafka, list(topics.values()))


if __name__ == "__main__":
    asyncio.run(main())
