"""Benchmark: sustained trades/s from the replay exchange (fast mode) through ingest into Kafka.

    .venv/bin/python benchmarks/bench_ingest.py [--symbols 18] [--minutes 30] [--queue-size 5000] [--shards 2]

In one run, on one machine, against the broker at ``$KAFKA_BOOTSTRAP`` (default 127.0.0.1:9092):

1. **websocket read** - a bare ``websockets`` client (``async for`` over ``recv()``) reads the whole feed from
   the replay exchange (in its own process, ``speed=0``) without parsing; then ingest's own connection layer
   (``websockets`` with frames handed over on the read path) does the same: the ceiling on the exchange side;
2. **bare producer, 1 trade/record** - a bare aiokafka producer (idempotent, acks=all) sends every trade of the
   feed as its own record, as a naive ingest would;
3. **bare producer, batches** - the same producer sends the per-symbol batch records ingest writes: the Kafka
   side's ceiling for this topic contract;
4. **straightforward ingest** (the peer) - what a plain client does: ``websockets``' ``recv()`` loop,
   ``json.loads`` and ``parse_agg_trade`` per frame, per-symbol batches every 5 ms encoded with
   ``encode_trade_batch``, the same producer; no sequencing (so it does less than ingest);
5. **ingest** - ``IngestService`` reads the feed over the WebSocket, validates and sequences every trade and
   publishes per-symbol batches; timed from the first frame to the last acknowledgement. Exactly-once is
   checked on the way (every id published, in order);
6. **ingest, N shards** (``--shards``, 0 to skip) - N ``python -m services.ingest`` processes with
   ``KLINES_INGEST__SHARD=i/N`` on the same feed, each following its own symbols: the combined rate, from the
   first trade published to the last, and their CPU time (from ``/proc``). The exchange serves every
   connection from one process and waits for the slowest, and N processes share the machine with it and the
   broker: on 2 cores this shows that shards add up, not what N cores would do.

Prints a table; the target for (5) is >= 80k trades/s per process. For (4)-(6) it also prints the CPU time
spent per trade and the share of a core the process got: on a shared machine the rate follows the CPU the
process is given, and ``1e6 / (us per trade)`` is the rate one whole core sustains.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from websockets.asyncio.client import connect  # noqa: E402

from services.core.models import AggTrade, parse_agg_trade  # noqa: E402
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


def start_exchange(
    symbols: tuple[str, ...], minutes: int, autostart: str = "on_subscribe"
) -> tuple[subprocess.Popen[str], str, str]:
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
            "--autostart",
            autostart,
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

    def on_frames(self, raws: list[bytes], conn: StreamConnection) -> bool:
        if self.count == 0:
            self.start = time.perf_counter()
        self.count += len(raws)
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
        waiters = {asyncio.ensure_future(sink.done.wait()), asyncio.ensure_future(conn.done.wait())}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        if not sink.done.is_set():
            raise SystemExit(f"the connection ended after {sink.count} of {total} frames: {conn.close_reason}")
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


async def straightforward_ingest(
    settings: Settings, ws_url: str, symbols: tuple[str, ...], total: int
) -> tuple[float, float, float]:
    """The peer: recv() loop, json.loads + parse_agg_trade per frame, per-symbol batches every 5 ms.

    Returns (trades/s from the first frame to the last acknowledgement, us CPU per trade, share of a core).
    """
    url = f"{ws_url}/stream?streams=" + "/".join(stream_name(s) for s in symbols)
    producer = make_producer(settings.kafka, client_suffix="bench-peer")
    await producer.start()
    topic = settings.kafka.topics.trades
    pending: dict[str, list[AggTrade]] = {}
    futures: list[asyncio.Future[Any]] = []
    count = 0
    start = cpu_start = flushed_at = 0.0
    try:
        async with connect(url, max_size=1 << 22, max_queue=4096, compression=None, proxy=None) as ws:
            async for message in ws:
                trade = parse_agg_trade(json.loads(message)["data"])
                if count == 0:
                    start = flushed_at = time.perf_counter()
                    cpu_start = time.process_time()
                count += 1
                pending.setdefault(trade.s, []).append(trade)
                now = time.perf_counter()
                if now - flushed_at >= 0.005 or count >= total:
                    for symbol, trades in pending.items():
                        value = encode_trade_batch(symbol, trades)
                        futures.append(await producer.send(topic, value, key=symbol.encode()))
                    pending = {}
                    flushed_at = now
                if count >= total:
                    break
        await asyncio.gather(*futures)
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
        return total / elapsed, cpu / total * 1e6, cpu / elapsed
    finally:
        await producer.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def through_shards(
    settings: Settings, ws_url: str, rest_url: str, symbols: tuple[str, ...], total: int, shards: int
) -> tuple[float, float, float, list[int]]:
    """``shards`` ingest processes (shard i/N each) on one feed.

    Returns (combined trades/s from the first trade published to the last, us CPU per trade of all of them
    together, their CPU-seconds per second, trades published per shard).
    """
    kafka = settings.kafka
    ports = [_free_port() for _ in range(shards)]
    procs = []
    for index, port in enumerate(ports):
        env = dict(os.environ)
        env.pop("KLINES_CONFIG", None)
        env.update(
            KAFKA_BOOTSTRAP=kafka.bootstrap,
            KLINES_KAFKA__TOPICS__TRADES=kafka.topics.trades,
            KLINES_KAFKA__TOPICS__DEAD_LETTER=kafka.topics.dead_letter,
            KLINES_MARKET__WS_URL=ws_url,
            KLINES_MARKET__REST_URL=rest_url,
            KLINES_MARKET__SYMBOLS=json.dumps(list(symbols)),
            KLINES_PERSISTENCE__QUEUE_SIZE=str(settings.persistence.queue_size),
            KLINES_INGEST__SHARD=f"{index}/{shards}",
            KLINES_SERVICE__INGEST_HTTP_PORT=str(port),
            KLINES_SERVICE__LOG_LEVEL="WARNING",
        )
        command = [sys.executable, "-m", "services.ingest", "--config", str(REPO / "config" / "klines.toml")]
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL))
    published = [0] * shards
    try:
        async with aiohttp.ClientSession() as http:

            async def poll() -> None:
                for index, port in enumerate(ports):
                    if procs[index].poll() is not None:
                        raise SystemExit(f"ingest shard {index}/{shards} exited with {procs[index].returncode}")
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/metrics.json") as resp:
                            published[index] = int((await resp.json())["trades_published"])
                    except aiohttp.ClientError:
                        published[index] = 0

            deadline = time.monotonic() + 60
            while sum(published) == 0:
                if time.monotonic() > deadline:
                    raise SystemExit("the ingest shards published nothing within 60 s")
                await poll()
                await asyncio.sleep(0.005)
            start = time.perf_counter()
            cpu_start = sum(_cpu_seconds(p.pid) for p in procs)
            while sum(published) < total:
                await poll()  # an HTTP request to each process: not too often, they serve it on their own loop
                await asyncio.sleep(0.02)
            elapsed = time.perf_counter() - start
            cpu = sum(_cpu_seconds(p.pid) for p in procs) - cpu_start
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            if proc.wait(20) != 0:
                raise SystemExit(f"an ingest shard exited with {proc.returncode} after SIGTERM")
    return total / elapsed, cpu / total * 1e6, cpu / elapsed, published


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
    parser.add_argument("--shards", type=int, default=2, help="ingest processes of the sharded run (0: skip it)")
    args = parser.parse_args()
    symbols = SYMBOLS[: args.symbols]
    run = f"bench-ingest-{uuid.uuid4().hex[:6]}"
    base = load_settings(REPO / "config" / "klines.toml")
    topics = {"trades": f"{run}.trades", "dead_letter": f"{run}.dlq", "finalized": f"{run}.f", "snapshots": f"{run}.s"}
    # The peer and the sharded run write topics of their own (created like the others, deleted at the end).
    peer_topic, shards_topic = f"{run}.peer", f"{run}.shards"
    settings = load_settings(
        REPO / "config" / "klines.toml",
        kafka={"bootstrap": os.environ.get("KAFKA_BOOTSTRAP", base.kafka.bootstrap), "topics": topics},
        persistence={"queue_size": args.queue_size or base.persistence.queue_size},
        service={"log_level": "WARNING"},
    )
    await ensure_topics(settings.kafka)
    for extra in (peer_topic, shards_topic):
        await ensure_topics(settings.kafka.model_copy(update={"topics": topics_with(settings, extra)}))
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

        proc, ws_url, _ = start_exchange(symbols, args.minutes)
        try:
            peer_settings = settings.model_copy(
                update={"kafka": settings.kafka.model_copy(update={"topics": topics_with(settings, peer_topic)})}
            )
            peer_rate, peer_us, peer_share = await straightforward_ingest(peer_settings, ws_url, symbols, total)
        finally:
            stop(proc)
        rows.append(
            (
                "straightforward ingest: recv() + json.loads + batches",
                peer_rate,
                f"{peer_us:.1f} us CPU/trade, {peer_share:.0%} of a core (no sequencing)",
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

        if args.shards > 0:
            proc, ws_url, rest_url = start_exchange(symbols, args.minutes, autostart="on_all_subscribed")
            try:
                shard_settings = settings.model_copy(
                    update={"kafka": settings.kafka.model_copy(update={"topics": topics_with(settings, shards_topic)})}
                )
                shard_rate, shard_us, shard_cpu, per_shard = await through_shards(
                    shard_settings, ws_url, rest_url, symbols, total, args.shards
                )
            finally:
                stop(proc)
            rows.append(
                (
                    f"ingest, {args.shards} shards (processes), combined",
                    shard_rate,
                    f"{shard_us:.1f} us CPU/trade, {shard_cpu:.2f} cores; per shard "
                    + ", ".join(f"{i}/{args.shards}: {n}" for i, n in enumerate(per_shard)),
                )
            )

        width = max(len(r[0]) for r in rows)
        print()
        print(f"{'path':<{width}}  {'trades/s':>10}  notes")
        print(f"{'-' * width}  {'-' * 10}  -----")
        for name, value, note in rows:
            print(f"{name:<{width}}  {value:>10,.0f}  {note}")
        target = 80_000
        per_core = 1e6 / metrics["cpu_per_trade_us"]
        print(
            f"\ningest target >= {target:,} trades/s per process: {'met' if rate >= target else 'NOT met'} "
            f"({rate:,.0f}/s with {metrics['cpu_share']:.0%} of a core; one whole core: {per_core:,.0f}/s)"
        )
    finally:
        await delete_topics(settings.kafka, [*topics.values(), peer_topic, shards_topic])


def topics_with(settings: Settings, trades: str) -> Any:
    """The run's topic names with ``trades`` replaced."""
    return settings.kafka.topics.model_copy(update={"trades": trades})


if __name__ == "__main__":
    asyncio.run(main())
