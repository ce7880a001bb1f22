"""Throughput of the kline core: KlineBook(s) against a naive per-trade, per-interval Decimal update.

Run: ``.venv/bin/python benchmarks/bench_core.py [--trades N] [--quick]``. Single process, single core; prints a
table of trades/s for 1, 7 (the default set) and 16 (all) intervals, with one symbol and with 2,000 symbols.

The synthetic trades are deterministic (fixed seed) and spread over a few hours of trade time, so klines of
every interval close during the run (and, with 2,000 symbols, many quiet symbols emit empty 1s klines: the 16
interval figure includes that work, which the naive peer does not do). Both sides receive the same trades in
the same batches: one symbol in batches of ``--batch`` trades; 2,000 symbols as windows of the global stream
grouped per symbol (a few trades per batch, like the aggregator's per-symbol batches). The clock is advanced
and closed klines drained after every window, as the aggregator does.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.core.book import KlineBooks
from services.core.intervals import DEFAULT_INTERVALS, INTERVALS, open_time
from services.core.models import AggTrade

START_MS = 1_735_689_600_000  # 2025-01-01 00:00 UTC


def synthetic_trades(count: int, symbols: int, span_ms: int, seed: int = 7) -> list[AggTrade]:
    """Deterministic trades in time order: random-walk prices with 8-decimal strings, as Binance spot sends."""
    rng = random.Random(seed)
    names = ["BTCUSDT"] if symbols == 1 else [f"S{k:04d}USDT" for k in range(symbols)]
    ticks = {name: 1_000_000 + rng.randrange(1_000_000) for name in names}  # price in 1e-2 units
    next_id = dict.fromkeys(names, 1_000_000)
    trades: list[AggTrade] = []
    step = span_ms / count
    for k in range(count):
        name = names[rng.randrange(symbols)]
        ticks[name] = max(1, ticks[name] + rng.randrange(-3, 4))
        price = ticks[name]
        qty = rng.randrange(1, 5_000_000)  # in 1e-8 units
        a = next_id[name]
        next_id[name] = a + 1
        trades.append(
            AggTrade(
                s=name,
                a=a,
                p=f"{price // 100}.{price % 100:02d}000000",
                q=f"{qty // 100_000_000}.{qty % 100_000_000:08d}",
                f=a * 2,
                l=a * 2 + rng.randrange(2),
                T=START_MS + int(k * step),
                m=rng.random() < 0.5,
            )
        )
    return trades


def windows(trades: Sequence[AggTrade], size: int) -> list[tuple[int, list[tuple[str, list[AggTrade]]]]]:
    """(clock, per-symbol batches) for consecutive windows of the global stream."""
    out = []
    for start in range(0, len(trades), size):
        chunk = trades[start : start + size]
        grouped: dict[str, list[AggTrade]] = defaultdict(list)
        for trade in chunk:
            grouped[trade.s].append(trade)
        out.append((chunk[-1].T, list(grouped.items())))
    return out


def run_books(work: list[tuple[int, list[tuple[str, list[AggTrade]]]]], intervals: Sequence[str]) -> int:
    books = KlineBooks(intervals)
    closed = 0
    for clock, batches in work:
        for symbol, batch in batches:
            books.apply(symbol, batch)
        books.advance(clock)
        closed += len(books.drain_closed())
        books.drain_changed() if clock % 1000 == 0 else None
    return closed


class NaiveKline:
    """What a straightforward implementation keeps per (symbol, interval): Decimals updated per trade."""

    __slots__ = ("c", "h", "l", "n", "o", "q", "qb", "t", "v", "vb")

    def __init__(self, t: int, price: Decimal) -> None:
        self.t = t
        self.o = self.h = self.l = self.c = price
        self.v = self.q = self.vb = self.qb = Decimal(0)
        self.n = 0


def run_naive(work: list[tuple[int, list[tuple[str, list[AggTrade]]]]], intervals: Sequence[str]) -> int:
    state: dict[tuple[str, str], NaiveKline] = {}
    closed = 0
    for _clock, batches in work:
        for symbol, batch in batches:
            for trade in sorted(batch, key=lambda tr: (tr.T, tr.a)):
                price = Decimal(trade.p)
                qty = Decimal(trade.q)
                quote = price * qty
                for interval in intervals:
                    t = open_time(interval, trade.T)
                    kline = state.get((symbol, interval))
                    if kline is None or kline.t != t:
                        if kline is not None:
                            closed += 1
                        kline = state[(symbol, interval)] = NaiveKline(t, price)
                    if price > kline.h:
                        kline.h = price
                    if price < kline.l:
                        kline.l = price
                    kline.c = price
                    kline.v += qty
                    kline.q += quote
                    if not trade.m:
                        kline.vb += qty
                        kline.qb += quote
                    kline.n += trade.l - trade.f + 1
    return closed


def measure(
    runner: Callable[[list[tuple[int, list[tuple[str, list[AggTrade]]]]], Sequence[str]], int],
    work: list[tuple[int, list[tuple[str, list[AggTrade]]]]],
    intervals: Sequence[str],
    count: int,
) -> tuple[float, int]:
    gc.collect()
    began = time.perf_counter()
    closed = runner(work, intervals)
    elapsed = time.perf_counter() - began
    return count / elapsed, closed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=400_000, help="trades per KlineBook run")
    parser.add_argument("--naive-trades", type=int, default=60_000, help="trades per naive run (it is slow)")
    parser.add_argument("--batch", type=int, default=200, help="trades per batch with one symbol")
    parser.add_argument("--window", type=int, default=20_000, help="global window with 2,000 symbols")
    parser.add_argument("--hours", type=float, default=3.0, help="trade-time span of the synthetic stream")
    parser.add_argument("--quick", action="store_true", help="a tenth of the trades (smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.trades //= 10
        args.naive_trades //= 10
    span = int(args.hours * 3_600_000)
    sets = {"1": ("1m",), "7": DEFAULT_INTERVALS, "16": INTERVALS}
    rows = []
    for symbols, window in ((1, args.batch), (2_000, args.window)):
        trades = synthetic_trades(args.trades, symbols, span)
        work = windows(trades, window)
        naive_work = windows(trades[: args.naive_trades], window)
        mean_batch = len(trades) / sum(len(batches) for _, batches in work)
        for label, intervals in sets.items():
            book_rate, closed = measure(run_books, work, intervals, len(trades))
            naive_rate, _ = measure(run_naive, naive_work, intervals, args.naive_trades)
            rows.append((symbols, mean_batch, label, book_rate, naive_rate, closed))
            print(f"  ... {symbols} symbol(s), {label} intervals done", file=sys.stderr)
    print()
    print(f"kline core throughput, {args.trades:,} trades over {args.hours:g} h (naive: {args.naive_trades:,})")
    header = f"{'symbols':>8} {'batch':>7} {'intervals':>9} {'KlineBooks/s':>14} {'naive/s':>10} {'speed-up':>9}"
    print(header + f" {'closed klines':>14}")
    print("-" * (len(header) + 15))
    for symbols, batch, label, book_rate, naive_rate, closed in rows:
        print(
            f"{symbols:>8,} {batch:>7.1f} {label:>9} {book_rate:>14,.0f} {naive_rate:>10,.0f}"
            f" {book_rate / naive_rate:>8.1f}x {closed:>14,}"
        )
    for symbols in (1, 2_000):
        by_label = {row[2]: row[3] for row in rows if row[0] == symbols}
        print(f"{symbols:>8,} symbol(s): 1-interval / 7-interval ratio = {by_label['1'] / by_label['7']:.2f}")


if __name__ == "__main__":
    main()
