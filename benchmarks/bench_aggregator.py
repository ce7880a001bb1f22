"""Aggregator throughput on one core, against the raw client limit and a Faust windowed-table peer, same run.

Run: ``KAFKA_BOOTSTRAP=127.0.0.1:9092 .venv/bin/python benchmarks/bench_aggregator.py [--trades N] [--quick]``
(``KAFKA_BOOTSTRAP`` defaults to the local broker ``deploy/kafka/kafka.sh start`` runs). Prints a table.

For each scenario one ``trades`` topic (6 partitions, no time-based retention: its records carry the synthetic
market's trade times as their Kafka timestamps) is filled once, then read by three contenders, each in its own
process pinned to the same CPU; a contender that reads nothing stops the run with a message saying so:

* **limit** — a bare aiokafka consumer reading every record of the topic (no decoding): what the client can do;
* **aggregator** — the real worker (:class:`~services.aggregator.worker.AggregatorWorker`: Faust app, batch
  consumer, fast decoder, KlineBooks, finalized/snapshot producers, per-tick checkpoints), timed from its
  first applied record to its last;
* **peer** — ``benchmarks/peer_faust_windowed.py``: a Faust agent iterating the stream per message, updating
  one tumbling-window table per interval per trade (Decimal arithmetic), the straightforward Faust design.
  It runs for at most ``--peer-seconds`` and its rate is taken over what it processed.

Scenarios: **ingest batches** — what ingest publishes: per symbol, the trades of one 5 ms slice of market time
in one message, so a busy symbol's message holds many trades and a quiet symbol's one; and **one trade per
message** — the worst case for any per-message cost. The synthetic market: ``--symbols`` symbols with Zipf
activity, random-walk prices with 2-8 decimals, quantities with 8, timestamps at ``--rate`` trades per market
second (real time for a market that busy), intervals ``1m 5m 30m 1h 4h 1d`` (the peer has no 1w/1M windows).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aiokafka import AIOKafkaConsumer, TopicPartition  # noqa: E402

from services.aggregator.app import checkpoint_topic  # noqa: E402
from services.aggregator.clock import ManualClock  # noqa: E402
from services.aggregator.worker import AggregatorWorker  # noqa: E402
from services.core.models import AggTrade  # noqa: E402
from services.shared.kafka import delete_topics, ensure_topics, make_producer  # noqa: E402
from services.shared.logs import setup_logging  # noqa: E402
from services.shared.messages import encode_trade_batch  # noqa: E402
from services.shared.settings import Settings, load_settings  # noqa: E402

INTERVALS = ("1m", "5m", "30m", "1h", "4h", "1d")
#: A contender that receives nothing for this long has stalled (see :func:`in_child`).
STALL_S = 30.0


class Stalled(RuntimeError):
    """A contender's consumer stopped receiving records before it read them all."""


class ReadNothing(RuntimeError):
    """A contender finished without reading a record, so it has no rate to report."""


PARTITIONS = 6
T0 = 1_735_689_600_000


def market(trades: int, symbols: int, rate: int, seed: int = 7) -> list[AggTrade]:
    """Synthetic trades in time order: Zipf symbol activity, random-walk prices, 8-decimal quantities."""
    rng = random.Random(seed)
    names = [f"S{k:04d}USDT" for k in range(symbols)]
    weights = [1 / (k + 1) ** 1.1 for k in range(symbols)]
    decimals = {name: rng.choice([2, 4, 6, 8]) for name in names}
    ticks = {name: rng.randrange(10**5, 10**7) for name in names}
    ids = dict.fromkeys(names, 1_000_000)
    picks = rng.choices(names, weights, k=trades)
    out = []
    for k, name in enumerate(picks):
        ticks[name] = max(1, ticks[name] + rng.randrange(-3, 4))
        d, tick = decimals[name], ticks[name]
        whole, frac = divmod(tick, 10**d)
        qty = rng.randrange(1, 10**9)
        a = ids[name]
        ids[name] = a + 1
        out.append(
            AggTrade(
                name,
                a,
                f"{whole}.{frac:0{d}d}",
                f"{qty // 10**8}.{qty % 10**8:08d}",
                2 * a,
                2 * a + rng.randrange(3),
                T0 + k * 1000 // rate,
                rng.random() < 0.5,
            )
        )
    return out


def ingest_batches(trades: list[AggTrade], slice_ms: int) -> list[tuple[str, list[AggTrade]]]:
    """Per symbol, the trades of one ``slice_ms`` slice of market time per message (0: one trade per message)."""
    if slice_ms <= 0:
        return [(t.s, [t]) for t in trades]
    out: list[tuple[str, list[AggTrade]]] = []
    open_batches: dict[str, list[AggTrade]] = {}
    current = None
    for trade in trades:
        cell = trade.T // slice_ms
        if cell != current:
            out.extend(open_batches.items())
            open_batches = {}
            current = cell
        open_batches.setdefault(trade.s, []).append(trade)
    out.extend(open_batches.items())
    return out


async def fill_topic(settings: Settings, batches: list[tuple[str, list[AggTrade]]]) -> None:
    producer = make_producer(settings.kafka, linger_ms=20, max_batch_size=1 << 20, compression_type=None)
    await producer.start()
    try:
        pending = []
        for symbol, chunk in batches:
            pending.append(
                await producer.send(
                    settings.kafka.topics.trades,
                    encode_trade_batch(symbol, chunk),
                    key=symbol.encode(),
                    timestamp_ms=chunk[0].T,
                )
            )
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


def bench_settings(name: str) -> Settings:
    topics = {k: f"{name}.{k}" for k in ("trades", "finalized", "snapshots", "dead_letter")}
    return load_settings(
        REPO / "config" / "klines.toml",
        kafka={
            "bootstrap": os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
            "topics": topics,
            "trades_partitions": PARTITIONS,
            "klines_partitions": PARTITIONS,
            # The records carry the synthetic market's 2025 trade times as their Kafka timestamps (the peer's
            # windows are relative to them), so a time-based retention would let the broker delete them at
            # its next retention check, before the last contender has read them.
            "trades_retention_ms": -1,
        },
        market={"intervals": list(INTERVALS)},
        service={"state_dir": str(REPO / ".state" / "bench" / name), "log_format": "text", "log_level": "WARNING"},
        aggregator={"http_port": 0},
    )


# ------------------------------------------------------------------------------------------ contenders


async def run_limit(settings: Settings, messages: int) -> dict[str, float]:
    topic = settings.kafka.topics.trades
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap,
        group_id=None,
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 << 20,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        count = 0
        started, cpu = time.perf_counter(), time.process_time()
        progress = time.monotonic()
        while count < messages:
            for records in (await consumer.getmany(timeout_ms=1000, max_records=10_000)).values():
                count += len(records)
                progress = time.monotonic()
            if time.monotonic() - progress > STALL_S:
                raise Stalled(f"the bare consumer read {count:,} of {messages:,} messages, then nothing for {STALL_S}s")
        return {"messages": count, "seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu}
    finally:
        await consumer.stop()


async def run_aggregator(settings: Settings, messages: int) -> dict[str, float]:
    worker = AggregatorWorker(settings, ManualClock())
    await worker.start()
    engine = worker.engine
    assert engine is not None
    try:
        # The clock starts once the first fetched batch is applied (the group join before it is not the
        # agent's work); that batch is then left out of the counts.
        first = last = cpu = 0.0
        first_records = first_trades = 0
        progress, seen = time.monotonic(), 0
        while engine.stats.records < messages:
            await asyncio.sleep(0.002)
            if engine.stats.records != seen:
                progress, seen = time.monotonic(), engine.stats.records
            elif time.monotonic() - progress > STALL_S:
                raise Stalled(f"the aggregator read {seen:,} of {messages:,} messages, then nothing for {STALL_S}s")
            if not first and engine.stats.records:
                first, cpu = time.perf_counter(), time.process_time()
                first_records, first_trades = engine.stats.records, engine.stats.trades_applied
        last = time.perf_counter()
        return {
            "messages": engine.stats.records - first_records,
            "trades": engine.stats.trades_applied - first_trades,
            "seconds": last - first,
            "cpu": time.process_time() - cpu,
            "klines_finalized": engine.stats.klines_finalized,
            "snapshots": engine.stats.snapshots_sent,
            "checkpoints": engine.stats.checkpoints,
            "data_loss": engine.stats.data_loss,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    finally:
        await worker.stop()


def contender_main(role: str, name: str, messages: int) -> None:
    """Child process: measure one contender and print its JSON result."""
    setup_logging("bench", "WARNING", "text")
    settings = bench_settings(name)
    run = run_limit if role == "limit" else run_aggregator
    print(json.dumps(asyncio.run(run(settings, messages))), flush=True)


def in_child(args: list[str], cpu: int) -> dict[str, Any]:
    """Run a contender in its own process pinned to ``cpu``; its last stdout line is the JSON result.

    A contender whose consumer stops receiving records (seen now and then right after a topic is filled, in
    the client's fetcher) is run once more, and says so.
    """
    for attempt in (1, 2):
        out = subprocess.run(
            ["taskset", "-c", str(cpu), sys.executable, *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode == 0 and lines:
            result: dict[str, Any] = json.loads(lines[-1])
            return result
        if attempt == 1 and "Stalled" in out.stderr:
            print(f"  {Path(args[0]).name} {' '.join(args[1:3])}: stalled, running it again", flush=True)
            continue
        raise RuntimeError(f"{args[:3]} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    raise AssertionError("unreachable")


async def scenario(title: str, batches: list[tuple[str, list[AggTrade]]], args: argparse.Namespace) -> list[Any]:
    name = f"bench-agg-{uuid.uuid4().hex[:8]}"
    settings = bench_settings(name)
    trades = sum(len(chunk) for _s, chunk in batches)
    messages = len(batches)
    await ensure_topics(settings.kafka)
    try:
        started = time.perf_counter()
        await fill_topic(settings, batches)
        print(f"  {title}: {trades:,} trades in {messages:,} messages written in {time.perf_counter() - started:.1f}s")
        me = str(Path(__file__).resolve())
        limit = in_child([me, "--role", "limit", "--name", name, "--messages", str(messages)], args.cpu)
        ours = in_child([me, "--role", "aggregator", "--name", name, "--messages", str(messages)], args.cpu)
        peer = in_child(
            [
                str(REPO / "benchmarks" / "peer_faust_windowed.py"),
                settings.kafka.topics.trades,
                str(PARTITIONS),
                str(trades),
                str(args.peer_seconds),
                ",".join(INTERVALS),
            ],
            args.cpu,
        )
        per_message = trades / messages
        rows = []
        for label, result in (
            ("limit: bare aiokafka consumer", limit),
            ("aggregator (Faust app, batch agent)", ours),
            ("peer: Faust agent + windowed tables", peer),
        ):
            check_read(label, result, settings.kafka.topics.trades)
            msgs = result["messages"] / result["seconds"]
            trades_done = result.get("trades", result["messages"] * per_message)
            tps = trades_done / result["seconds"]
            result["per_cpu_second"] = trades_done / result["cpu"]
            rows.append((label, msgs, tps, result))
        return [title, per_message, rows]
    finally:
        peer_group = f"bench-peer-{settings.kafka.topics.trades}"
        await delete_topics(
            settings.kafka,
            [
                *settings.kafka.topics.model_dump().values(),
                checkpoint_topic(settings),
                *(f"{peer_group}-kl-{i}-changelog" for i in INTERVALS),
            ],
        )


def check_read(label: str, result: dict[str, Any], topic: str) -> None:
    """Raise :class:`ReadNothing` if a contender measured no record or no time (its rate would be 0 or 0/0)."""
    if result["messages"] > 0 and result["seconds"] > 0 and result["cpu"] > 0:
        return
    raise ReadNothing(
        f"{label} read {result['messages']:,} messages of {topic} in {result['seconds']:.3f}s "
        f"({result['cpu']:.3f} CPU-s): no rate to compare. Check that the topic still holds its records "
        f"(retention) and that the contender was assigned its partitions."
    )


def print_table(results: list[list[Any]]) -> None:
    print()
    print(f"{'scenario':<30} {'contender':<37} {'msgs/s':>9} {'trades/s':>10} {'trades/CPU-s':>13} {'vs peer':>8}")
    print("-" * 112)
    for title, per_message, rows in results:
        peer_rate = rows[2][2]
        for n, (label, msgs, tps, result) in enumerate(rows):
            left = [title, f"  {per_message:.1f} trades per message", ""][n]
            ratio = "" if n != 1 else f"{tps / peer_rate:.0f}x"
            print(f"{left:<30} {label:<37} {msgs:>9,.0f} {tps:>10,.0f} {result['per_cpu_second']:>13,.0f} {ratio:>8}")
        ours = rows[1][3]
        print(
            f"{'':<30} aggregator output: {ours['klines_finalized']:,} finalized, {ours['snapshots']:,} snapshots, "
            f"{ours['checkpoints']:,} checkpoints, {ours['data_loss']} DATA_LOSS, peak RSS {ours['max_rss_mb']:.0f} MB"
        )
    print(
        "\ntrades/s: wall clock, each contender alone on the pinned CPU (a shared machine lowers it); "
        "trades/CPU-s: per second of the\nprocess's own CPU time (all its threads), i.e. what one dedicated core does."
    )


async def main(args: argparse.Namespace) -> None:
    print(
        f"bench_aggregator: {args.trades:,} trades, {args.symbols} symbols, {args.rate:,} trades per market "
        f"second, {PARTITIONS} partitions, intervals {' '.join(INTERVALS)}, every contender pinned to CPU {args.cpu}"
    )
    trades = market(args.trades, args.symbols, args.rate)
    results = [await scenario("ingest batches (5 ms)", ingest_batches(trades, 5), args)]
    single = trades[: args.single_trades]
    results.append(await scenario("one trade per message", ingest_batches(single, 0), args))
    print_table(results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trades", type=int, default=1_000_000)
    parser.add_argument("--single-trades", type=int, default=300_000, help="trades in the one-per-message run")
    parser.add_argument("--symbols", type=int, default=200)
    parser.add_argument("--rate", type=int, default=100_000, help="trades per second of market time")
    parser.add_argument("--peer-seconds", type=float, default=20.0)
    parser.add_argument("--cpu", type=int, default=1, help="the CPU every contender is pinned to")
    parser.add_argument("--quick", action="store_true", help="a smaller run (200k / 100k trades, 10 s peer)")
    parser.add_argument("--role", choices=["limit", "aggregator"], help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--messages", type=int, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.role:
        contender_main(cli.role, cli.name, cli.messages)
    else:
        if cli.quick:
            cli.trades, cli.single_trades, cli.peer_seconds = 200_000, 100_000, 10.0
        try:
            asyncio.run(main(cli))
        except ReadNothing as exc:
            sys.exit(f"bench_aggregator: {exc}")
