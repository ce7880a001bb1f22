"""Aggregator throughput on one core, against the raw client limit and three peers, all in the same run.

Run: ``KAFKA_BOOTSTRAP=127.0.0.1:9092 .venv/bin/python benchmarks/bench_aggregator.py [--trades N] [--quick]``
(``KAFKA_BOOTSTRAP`` defaults to the local broker ``deploy/kafka/kafka.sh start`` runs). Prints a table.

For each scenario one ``trades`` topic (6 partitions, no time-based retention: its records carry the synthetic
market's trade times as their Kafka timestamps) is filled once, then read by each contender in turn, each in its
own process pinned to the same CPU; a contender that reads nothing stops the run with a message saying so:

* **limit** — a bare aiokafka consumer reading every record of the topic (no decoding): what the client can do;
* **aggregator** — the real worker (:class:`~services.aggregator.worker.AggregatorWorker`: Faust app, batch
  fetch loop, fast decoder, KlineBooks, finalized/snapshot producers, per-tick checkpoints), timed from its
  first applied record to its last;
* **Faust windowed** — ``benchmarks/peer_faust_windowed.py``: a Faust agent iterating the stream per message,
  updating one tumbling-window table per interval per trade (Decimal arithmetic), the straightforward Faust
  design;
* **Quix Streams** — ``benchmarks/peer_quix_windowed.py``: a StreamingDataFrame with a one-minute tumbling
  window OHLCV per symbol (First/Max/Min/Last/Sum/Count on floats, no changelog topics), in a virtual
  environment of its own that this script creates (``--quix-venv``, ``pip install quixstreams==--quix-version``)
  and reuses while it has that version;
* **Faust idle** — ``benchmarks/peer_faust_idle.py``: a Faust agent that only counts the messages, the ceiling
  of any per-message Faust agent on this topic.

Each peer runs for at most ``--peer-seconds`` and its rate is taken over what it processed.

Scenarios (``--scenarios``): **batches** — what ingest publishes: per symbol, the trades of one 5 ms slice of
market time in one message, so a busy symbol's message holds many trades and a quiet symbol's one; **raw** —
Binance's own aggTrade payload (``{"e":"aggTrade",...}``, as a raw ``/ws`` stream sends it), one trade per
message, the worst case for any per-message cost; **envelope** — the same in the combined-stream envelope
(``{"stream":"btcusdt@aggTrade","data":{...}}``). The synthetic market: ``--symbols`` symbols with Zipf
activity, random-walk prices with 2-8 decimals, quantities with 8, timestamps at ``--rate`` trades per market
second (real time for a market that busy), intervals ``1m 5m 30m 1h 4h 1d`` (the Faust peer has no 1w/1M
windows; the Quix peer computes 1m only).
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

from pipeline_runs import bare_consumer  # noqa: E402

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


#: One message of a scenario: key (the symbol), value, Kafka timestamp (its first trade's time), trades in it.
Message = tuple[str, bytes, int, int]


def binance_payload(trade: AggTrade, envelope: bool = False) -> bytes:
    """``trade`` as Binance sends it on a raw stream (``e E s a p q f l T m M``), or in a combined-stream envelope."""
    m = "true" if trade.m else "false"
    payload = (
        f'{{"e":"aggTrade","E":{trade.T + 2},"s":"{trade.s}","a":{trade.a},"p":"{trade.p}","q":"{trade.q}",'
        f'"f":{trade.f},"l":{trade.l},"T":{trade.T},"m":{m},"M":true}}'
    )
    return (f'{{"stream":"{trade.s.lower()}@aggTrade","data":{payload}}}' if envelope else payload).encode()


def scenario_messages(kind: str, trades: list[AggTrade]) -> list[Message]:
    """The messages of scenario ``kind`` (``batches``, ``raw`` or ``envelope``) for ``trades``."""
    if kind == "batches":
        return [(s, encode_trade_batch(s, chunk), chunk[0].T, len(chunk)) for s, chunk in ingest_batches(trades, 5)]
    return [(t.s, binance_payload(t, envelope=kind == "envelope"), t.T, 1) for t in trades]


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


async def fill_topic(settings: Settings, messages: list[Message]) -> None:
    producer = make_producer(settings.kafka, linger_ms=20, max_batch_size=1 << 20, compression_type=None)
    await producer.start()
    try:
        pending = []
        for symbol, value, timestamp_ms, _trades in messages:
            pending.append(
                await producer.send(settings.kafka.topics.trades, value, key=symbol.encode(), timestamp_ms=timestamp_ms)
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
    """The limit: ``pipeline_runs.bare_consumer`` reads the whole trades topic without decoding."""
    cpu = time.process_time()
    try:
        count, seconds = await bare_consumer(settings)
    except RuntimeError as exc:  # it read nothing for a while: in_child runs it once more
        raise Stalled(str(exc)) from None
    if count != messages:
        raise RuntimeError(f"the bare consumer read {count:,} messages, the topic was filled with {messages:,}")
    return {"messages": count, "seconds": seconds, "cpu": time.process_time() - cpu}


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


def in_child(args: list[str], cpu: int, python: str = sys.executable) -> dict[str, Any]:
    """Run a contender in its own process pinned to ``cpu``; its last stdout line is the JSON result.

    A contender whose consumer stops receiving records (seen now and then right after a topic is filled, in
    the client's fetcher) is run once more, and says so.
    """
    for attempt in (1, 2):
        out = subprocess.run(
            ["taskset", "-c", str(cpu), python, *args],
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


def ensure_quix_venv(path: Path, version: str) -> str:
    """The Python of a virtual environment with ``quixstreams==version`` (created, or reused if it has it)."""
    python = path / "bin" / "python"
    check = [str(python), "-c", "import importlib.metadata as m; print(m.version('quixstreams'))"]
    if python.exists():
        found = subprocess.run(check, capture_output=True, text=True, check=False).stdout.strip()
        if found == version:
            return str(python)
    print(f"  creating the Quix Streams environment in {path} (quixstreams=={version})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"quixstreams=={version}"],
        check=True,
    )
    return str(python)


#: Contenders in table order: (role, label).
CONTENDERS = (
    ("limit", "limit: bare aiokafka consumer"),
    ("aggregator", "aggregator (Faust app, batch loop)"),
    ("faust-windowed", "peer: Faust agent + windowed tables"),
    ("quix", "peer: Quix Streams 1m OHLCV window"),
    ("faust-idle", "peer: Faust agent doing nothing"),
)


async def scenario(title: str, messages: list[Message], args: argparse.Namespace) -> list[Any]:
    name = f"bench-agg-{uuid.uuid4().hex[:8]}"
    settings = bench_settings(name)
    trades = sum(count for *_rest, count in messages)
    topic = settings.kafka.topics.trades
    await ensure_topics(settings.kafka)
    try:
        started = time.perf_counter()
        await fill_topic(settings, messages)
        print(
            f"  {title}: {trades:,} trades in {len(messages):,} messages written "
            f"in {time.perf_counter() - started:.1f}s"
        )
        me = str(Path(__file__).resolve())
        own = ["--name", name, "--messages", str(len(messages))]
        peer = [topic, str(PARTITIONS), str(trades), str(args.peer_seconds)]
        runs = {
            "limit": lambda: in_child([me, "--role", "limit", *own], args.cpu),
            "aggregator": lambda: in_child([me, "--role", "aggregator", *own], args.cpu),
            "faust-windowed": lambda: in_child(
                [str(REPO / "benchmarks" / "peer_faust_windowed.py"), *peer, ",".join(INTERVALS)], args.cpu
            ),
            "quix": lambda: in_child([str(REPO / "benchmarks" / "peer_quix_windowed.py"), *peer], args.cpu, args.quix),
            "faust-idle": lambda: in_child([str(REPO / "benchmarks" / "peer_faust_idle.py"), *peer], args.cpu),
        }
        per_message = trades / len(messages)
        rows = []
        for role, label in CONTENDERS:
            if role not in args.contenders:
                continue
            result = runs[role]()
            check_read(label, result, topic)
            msgs = result["messages"] / result["seconds"]
            trades_done = result.get("trades", result["messages"] * per_message)
            result["per_cpu_second"] = trades_done / result["cpu"]
            rows.append((role, label, msgs, trades_done / result["seconds"], result))
            print(f"    {label}: {trades_done / result['seconds']:,.0f} trades/s", flush=True)
        return [title, per_message, rows]
    finally:
        await delete_topics(
            settings.kafka,
            [
                *settings.kafka.topics.model_dump().values(),
                checkpoint_topic(settings),
                *(f"bench-peer-{topic}-kl-{i}-changelog" for i in INTERVALS),
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
    header = (
        f"{'scenario':<32} {'contender':<37} {'msgs/s':>9} {'trades/s':>10} {'trades/CPU-s':>13} {'aggregator':>11}"
    )
    print(header)
    print("-" * len(header))
    for title, per_message, rows in results:
        ours = next((row for row in rows if row[0] == "aggregator"), None)
        for n, (role, label, msgs, tps, result) in enumerate(rows):
            left = [title, f"  {per_message:.1f} trades per message"][n] if n < 2 else ""
            ratio = "" if ours is None or role == "aggregator" else f"{ours[3] / tps:.2f}x"
            print(f"{left:<32} {label:<37} {msgs:>9,.0f} {tps:>10,.0f} {result['per_cpu_second']:>13,.0f} {ratio:>11}")
        if ours is not None:
            r = ours[4]
            print(
                f"{'':<32} aggregator output: {r['klines_finalized']:,} finalized, {r['snapshots']:,} snapshots, "
                f"{r['checkpoints']:,} checkpoints, {r['data_loss']} DATA_LOSS, peak RSS {r['max_rss_mb']:.0f} MB"
            )
    print(
        "\ntrades/s: wall clock, each contender alone on the pinned CPU (a shared machine lowers it); "
        "trades/CPU-s: per second of the\nprocess's own CPU time (all its threads), i.e. what one dedicated core does; "
        "aggregator: the aggregator's trades/s\ndivided by the row's (below 1x for the limit: the share of the "
        "client's limit the aggregator reaches)."
    )


async def main(args: argparse.Namespace) -> None:
    print(
        f"bench_aggregator: {args.trades:,} trades ({args.single_trades:,} one per message), {args.symbols} symbols, "
        f"{args.rate:,} trades per market second, {PARTITIONS} partitions, intervals {' '.join(INTERVALS)}, "
        f"every contender pinned to CPU {args.cpu}"
    )
    if "quix" in args.contenders:
        args.quix = ensure_quix_venv(args.quix_venv, args.quix_version)
    trades = market(args.trades, args.symbols, args.rate)
    titles = {
        "batches": "ingest batches (5 ms)",
        "raw": "raw aggTrade payloads",
        "envelope": "combined-stream envelopes",
    }
    results = []
    for kind in args.scenarios:
        chosen = trades if kind == "batches" else trades[: args.single_trades]
        results.append(await scenario(titles[kind], scenario_messages(kind, chosen), args))
    print_table(results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trades", type=int, default=1_000_000, help="trades in the batches scenario")
    parser.add_argument("--single-trades", type=int, default=300_000, help="trades in the one-per-message scenarios")
    parser.add_argument("--symbols", type=int, default=200)
    parser.add_argument("--rate", type=int, default=100_000, help="trades per second of market time")
    parser.add_argument("--peer-seconds", type=float, default=15.0)
    parser.add_argument("--cpu", type=int, default=1, help="the CPU every contender is pinned to")
    parser.add_argument(
        "--scenarios", type=lambda text: text.split(","), default=["batches", "raw", "envelope"],
        help="comma-separated: batches, raw, envelope",
    )  # fmt: skip
    parser.add_argument(
        "--contenders", type=lambda text: text.split(","), default=[role for role, _label in CONTENDERS],
        help="comma-separated: " + ", ".join(role for role, _label in CONTENDERS),
    )  # fmt: skip
    parser.add_argument("--quix-venv", type=Path, default=REPO / ".state" / "bench" / "quix-venv")
    parser.add_argument("--quix-version", default="3.28.1")
    parser.add_argument("--quick", action="store_true", help="a smaller run (200k / 100k trades, 10 s peers)")
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
