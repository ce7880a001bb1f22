"""A 2,000-symbol market with Zipf activity through the whole pipeline, as fast as this machine allows.

Run: ``KAFKA_BOOTSTRAP=127.0.0.1:9092 .venv/bin/python benchmarks/bench_scale.py [--symbols 2000] [--zipf 1.0]
[--market-duration 1h] [--intervals 1m,5m,30m,1h,4h,1d,1w] [--keep]`` (``KAFKA_BOOTSTRAP`` defaults to the local
broker). Prints a table per 5 s window and a summary.

``klines run``'s own pipeline (:class:`~services.runner.LocalPipeline`, in this process, set up by
``pipeline_runs``) replays a generated market of ``--symbols`` symbols whose activity follows Zipf's law
(``--zipf``: the k-th symbol trades 1/k**S as often as the first, which trades like BTCUSDT; the tail trades
once every minute or two) at ``--speed 0``: the exchange sends as fast as ingest reads, so every stage runs at
the highest rate it sustains here. The intervals default to the configured seven, so the aggregator holds
2,000 x 7 klines (spec §7: aggregator memory <= 200 MB at 2,000 symbols x 7 intervals).

Per 5 s window: trades published by ingest and applied by the aggregator, klines finalized by the aggregator,
finalized rows and snapshot rows stored by the writers, the aggregator's lag (records) and RSS, and how busy the
machine's CPUs were. Then each stage's overall rate; the aggregator's RSS when it was ready (before the first
trade), its peak (the kernel's high-water mark) and at the end, against the target; what the books alone take
for the same market (``tracemalloc`` of a :class:`~services.core.book.KlineBooks` fed 15 minutes of it in this
process: the books' size is bounded by the repair horizon, ten minutes, so 15 minutes reach their steady size);
and the checks: DATA_LOSS 0, finalized == stored (``count()`` of ``klines_finalized FINAL``), the run's summary
"nothing lost". The same-run limit: a bare aiokafka consumer reads the whole trades topic, and the whole snapshot
topic, after the run (services stopped), without decoding.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline_runs import (
    START,
    Run,
    Sample,
    Sampler,
    bare_consumer,
    print_cpu_seconds,
    print_verdict,
    print_windows,
    replay_options,
    symbols,
    windows,
)

from services.core.book import KlineBooks
from services.replay.config import parse_utc_ms
from services.replay.generator import ZipfActivity, generate_market
from services.runner import LocalPipeline, RunSummary

TARGET_TPS = 50_000
TARGET_RSS_MB = 200
MB = 1024 * 1024
DEFAULT_INTERVALS = "1m,5m,30m,1h,4h,1d,1w"
COUNTERS = ("published", "applied", "finalized", "stored", "snapshots_stored")


def print_scale_windows(rows: list[list[Any]]) -> None:
    heads = ("trades/s", "applied/s", "finalized/s", "stored/s", "snap rows/s")
    print_windows(rows, heads, (("lag", 9, "{:,}".format), ("RSS MB", 8, lambda rss: f"{rss / MB:.0f}")))
    print("  (trades/s: published by ingest; applied/s, finalized/s: the aggregator's; stored/s: finalized rows the")
    print("  finalized writer inserted; snap rows/s: the snapshot writer's rows; rates per second of wall time in")
    print("  each window (-: the service did not answer in it); lag (records) and RSS: the aggregator's at its end;")
    print("  CPU: share of all CPUs busy, every process of the machine)")


def books_alone(names: list[str], intervals: list[str], zipf: ZipfActivity) -> tuple[float, int]:
    """MB that :class:`KlineBooks` take for ``names`` after 15 minutes of the same market, and its trades."""
    start = parse_utc_ms(START)
    market = generate_market(names, seed=1, start_ms=start, end_ms=start + 15 * 60_000, zipf=zipf)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    books = KlineBooks(intervals, 500)
    for symbol, trades in market.items():
        for k in range(0, len(trades), 50):  # in slices, as the aggregator gets them
            books.apply(symbol, trades[k : k + 50])
        books.book(symbol).drain_closed()
        books.book(symbol).drain_changed()
    gc.collect()
    size = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return size / MB, sum(map(len, market.values()))


def report(
    run: Run,
    summary: RunSummary,
    aggregator: dict[str, Any],
    samples: list[Sample],
    limits: dict[str, tuple[int, float]],
    books: tuple[float, int],
) -> bool:
    published = summary.trades_published or 0
    finalized = summary.klines_finalized or 0
    first = next((s.t for s in samples if (s.published or 0) > 0), None)
    stored_last = next((s.t for s in samples if (s.stored or 0) >= finalized), None)
    if first is None or stored_last is None:
        print(f"  no rate: the samples never saw the first trade published or the last kline stored ({run.state})")
        return False
    gauges = ("lag", "aggregator_rss")
    print()
    print_scale_windows(windows(samples, first, stored_last, COUNTERS, gauges))

    def first_at(key: str, at_least: int) -> float | None:
        return next((s.t for s in samples if (getattr(s, key) or 0) >= at_least), None)

    def rate_row(label: str, count: int, start: float | None, end: float | None, unit: str, extra: str = "") -> None:
        if start is None or end is None or end <= start:
            print(f"  {label:<60} {count:>10,} {'-':>8} {'-':>10}")
            return
        print(f"  {label:<60} {count:>10,} {end - start:>8.1f} {count / (end - start):>10,.0f} {unit} {extra}".rstrip())

    snapshots = max((s.snapshots_stored or 0 for s in samples), default=0)
    span = stored_last - first
    print()
    print(f"  {'stage':<60} {'count':>10} {'seconds':>8} {'per s':>10}")
    print("  " + "-" * 98)
    rate_row("trades: ingest, first to last published", published, first, first_at("published", published), "trades")
    applied = summary.trades_applied or 0
    rate_row(
        "trades: aggregator, first to last applied",
        applied,
        first_at("applied", 1),
        first_at("applied", applied),
        "trades",
    )
    verdict = "meets" if span > 0 and published / span >= TARGET_TPS else "below"
    rate_row(
        "trades end to end: first published -> last stored", published, first, stored_last, "trades",
        f"({verdict} the {TARGET_TPS // 1000}k target)",
    )  # fmt: skip
    rate_row("finalized rows stored (same span)", finalized, first, stored_last, "rows")
    rate_row("snapshot rows stored (same span)", snapshots, first, stored_last, "rows")
    for label, (records, seconds) in limits.items():
        print(
            f"  {'limit: bare aiokafka consumer, ' + label + ' after the run':<60} {records:>10,} {seconds:>8.1f} "
            f"{records / max(seconds, 1e-9):>10,.0f} records"
        )
    trades_records = limits["trades topic"][0]
    if trades_records:
        print(
            f"  ({published / trades_records:.1f} trades per trades record: ingest publishes each symbol's trades of a "
            "few ms in one record)"
        )
    print_cpu_seconds(samples, published)
    ready = [s.aggregator_rss for s in samples if s.aggregator_rss is not None and s.t < first]
    during = [s for s in samples if s.aggregator_rss is not None]
    peak = max((s.aggregator_peak_rss or 0 for s in during), default=0)
    end_rss = during[-1].aggregator_rss if during else None
    lags = [s.lag for s in samples if s.lag is not None and first <= s.t <= stored_last]
    window = [s for s in samples if first <= s.t <= stored_last]
    unanswered = sum(1 for s in window if s.applied is None)
    symbols_count, intervals_count = len(run.options.symbols), len(run.options.intervals)
    print(
        f"  aggregator RSS ({symbols_count:,} symbols x {intervals_count} intervals): ready "
        f"{(ready[-1] if ready else 0) / MB:.0f} MB (before the first trade), peak {peak / MB:.0f} MB, at the end "
        f"{(end_rss or 0) / MB:.0f} MB: {'within' if 0 < peak <= TARGET_RSS_MB * MB else 'ABOVE'} the "
        f"{TARGET_RSS_MB} MB target"
    )
    books_mb, books_trades = books
    print(
        f"  the books alone: {books_mb:.1f} MB ({books_mb * MB / max(1, symbols_count) / 1024:.1f} KiB a symbol) "
        f"after 15 market minutes ({books_trades:,} trades) of the same market, tracemalloc in this process"
    )
    print(
        f"  aggregator: longest batch apply {float(aggregator.get('longest_apply_s') or 0):.3f} s, input paused "
        f"{summary.flow_pauses} times for {summary.flow_paused_s:.1f} s, max lag {max(lags, default=0):,} records, "
        f"{aggregator.get('checkpoints', '?')} checkpoints ({aggregator.get('checkpoints_spaced', '?')} spaced out, "
        f"{aggregator.get('checkpoints_deferred', '?')} deferred), {aggregator.get('ticks', '?')} ticks, /metrics "
        f"unanswered (within 5 s) in {unanswered} of {len(window)} samples"
    )
    return print_verdict(run, summary, finalized)


def main(args: argparse.Namespace) -> int:
    names = symbols(args.symbols)
    intervals = args.intervals.split(",")
    options = replay_options(
        names,
        speed=0.0,
        market_duration=args.market_duration,
        intervals=intervals,
        zipf=args.zipf,
        zipf_top=args.zipf_top,
    )
    print(
        f"bench_scale: {os.cpu_count()} CPUs (every service and the broker share them), broker "
        f"{os.environ.get('KAFKA_BOOTSTRAP', '127.0.0.1:9092')}"
    )
    run = Run.create("scale", options)
    print(
        f"\n{len(names):,} symbols with Zipf activity (exponent {args.zipf:g}, the first {args.zipf_top:g} orders/s) x "
        f"{args.market_duration} generated market at --speed 0, intervals {args.intervals}\n"
        f"   (run {run.name}; pipeline output and logs in {run.state})",
        flush=True,
    )
    started = time.monotonic()
    try:
        with (run.state / "run.out").open("w") as out:
            pipeline = LocalPipeline(run.settings, options, out)
            sampler = Sampler(pipeline)
            summary = run.play(pipeline, sampler)
            aggregator = pipeline.metrics.get("aggregator", {})
        limits = {
            "trades topic": asyncio.run(bare_consumer(run.settings)),
            "snapshot topic": asyncio.run(bare_consumer(run.settings, run.settings.kafka.topics.snapshots)),
        }
        books = books_alone(names, intervals, ZipfActivity(args.zipf, args.zipf_top))
        ok = report(run, summary, aggregator, sampler.samples, limits, books)
    finally:
        asyncio.run(run.cleanup(args.keep))
    print(f"\nbench_scale: {time.monotonic() - started:.0f} s in all (generating the market included)")
    if not ok:
        print("bench_scale: a check failed (loss, finalized != stored or a failed run): see above")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--symbols", type=int, default=2000)
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the symbols' activity")
    parser.add_argument("--zipf-top", type=float, default=20.0, help="the most active symbol's orders per second")
    # One market hour of 2,000 Zipf symbols is about a million trades: about a minute of pipeline here, after
    # 20-30 s of generating it.
    parser.add_argument("--market-duration", default="1h")
    parser.add_argument("--intervals", default=DEFAULT_INTERVALS, help="default: the configured seven")
    parser.add_argument("--keep", action="store_true", help="keep the run's topics and state directory")
    sys.exit(main(parser.parse_args()))
