"""Throughput of the kline core: KlineBooks against a naive per-trade, per-interval Decimal update.

Run: ``.venv/bin/python benchmarks/bench_core.py [--trades N] [--quick]``. One process, one core; prints a table
of trades/s for 1, 7 (the default set) and 16 (all) intervals, with one symbol and with 2,000 symbols, for
KlineBooks and for the naive peer in the same run, plus the memory of 2,000 symbols x 7 intervals. Rates are
per second of this process's CPU time (single-threaded, so equal to wall time on an idle machine, and not
distorted by other work on a shared one).

The synthetic trades are deterministic (fixed seed), 8-decimal strings as Binance spot sends them, with random
quantities (so the string-to-int cache rarely helps them):

* one symbol: spread over five hours of trade time, so klines of every interval up to 4h close during the run
  (and a 1s kline closes every second); batches of ``--batch`` trades;
* 2,000 symbols: Zipf-like popularity at ``--rate`` trades/s of trade time in total (a live Binance-like mix of
  a few busy and many quiet symbols; with 16 intervals every quiet symbol also emits an empty 1s kline every
  second, work the naive peer does not do); windows of ``--window`` trades of the global stream grouped per
  symbol, like the aggregator's per-symbol batches.

Both sides receive the same trades in the same batches. After every batch/window the clock is advanced and the
closed klines are drained (built as Kline objects), as the aggregator does; every 100,000 trades (its 1 s
snapshot tick at the 100k trades/s target) the changed in-progress klines are built too.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Callable, Sequence
from decimal import Decimal
from itertools import accumulate
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.core.book import KlineBooks
from services.core.intervals import DEFAULT_INTERVALS, INTERVALS, open_time
from services.core.models import AggTrade

START_MS = 1_735_689_600_000  # 2025-01-01 00:00 UTC
TICK_TRADES = 100_000  # snapshot tick: once per second at the aggregator's 100k trades/s target


def synthetic_trades(count: int, symbols: int, span_ms: int, seed: int = 7) -> list[AggTrade]:
    """Deterministic trades in time order: random-walk prices, Zipf-like symbol popularity."""
    rng = random.Random(seed)
    names = ["BTCUSDT"] if symbols == 1 else [f"S{k:04d}USDT" for k in range(symbols)]
    weights = list(accumulate(1 / (rank + 1) for rank in range(symbols)))
    ticks = {name: 1_000_000 + rng.randrange(1_000_000) for name in names}  # price in 1e-2 units
    next_id = dict.fromkeys(names, 1_000_000)
    trades: list[AggTrade] = []
    for k in range(count):
        name = names[0] if symbols == 1 else rng.choices(names, cum_weights=weights)[0]
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
                T=START_MS + k * span_ms // count,
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
    """The aggregator's loop: apply each symbol's batch, advance the clock, drain the closed klines; every
    TICK_TRADES trades (its 1 s clock tick at 100k trades/s) snapshot the in-progress klines that changed."""
    books = KlineBooks(intervals)
    closed = 0
    since_tick = 0
    for clock, batches in work:
        for symbol, batch in batches:
            books.apply(symbol, batch)
            since_tick += len(batch)
        books.advance(clock)
        closed += len(books.drain_closed())
        if since_tick >= TICK_TRADES:
            books.drain_changed()
            since_tick = 0
    books.drain_changed()
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
    began = time.process_time()
    closed = runner(work, intervals)
    elapsed = time.process_time() - began
    return count / elapsed, closed


def memory_of_books(symbols: int, intervals: Sequence[str]) -> float:
    """MiB held by KlineBooks with ``symbols`` symbols, each with open klines and an hour of history."""
    trades = synthetic_trades(symbols * 20, symbols, 3_600_000, seed=11)
    work = windows(trades, 5_000)
    gc.collect()
    tracemalloc.start()
    books = KlineBooks(intervals)
    for clock, batches in work:
        for symbol, batch in batches:
            books.apply(symbol, batch)
        books.advance(clock)
        books.drain_closed()
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del books
    return size / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--trades", type=int, default=400_000, help="trades per KlineBooks run")
    parser.add_argument("--naive-trades", type=int, default=40_000, help="trades per naive run (it is slow)")
    parser.add_argument("--batch", type=int, default=200, help="trades per batch with one symbol")
    parser.add_argument("--window", type=int, default=20_000, help="global window with 2,000 symbols")
    parser.add_argument("--hours", type=float, default=5.0, help="trade-time span with one symbol")
    parser.add_argument("--rate", type=int, default=5_000, help="trades/s of trade time with 2,000 symbols")
    parser.add_argument("--quick", action="store_true", help="a tenth of the trades (smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.trades //= 10
        args.naive_trades //= 10
    sets = {"1": ("1m",), "7": DEFAULT_INTERVALS, "16": INTERVALS}
    scenarios = (
        (1, int(args.hours * 3_600_000), args.batch),
        (2_000, args.trades * 1000 // args.rate, args.window),
    )
    print(
        f"kline core throughput (trades per CPU second): {args.trades:,} trades per KlineBooks run,"
        f" {args.naive_trades:,} per naive run"
    )
    header = f"{'symbols':>8} {'span':>7} {'batch':>6} {'intervals':>9} {'KlineBooks/s':>13} {'naive/s':>9}"
    print(header + f" {'speed-up':>8} {'closed klines':>13}")
    print("-" * (len(header) + 23))
    rates: dict[tuple[int, str], float] = {}
    for symbols, span, window in scenarios:
        trades = synthetic_trades(args.trades, symbols, span)
        work = windows(trades, window)
        naive_work = windows(trades[: args.naive_trades], window)
        mean_batch = len(trades) / sum(len(batches) for _, batches in work)
        for label, intervals in sets.items():
            book_rate, closed = measure(run_books, work, intervals, len(trades))
            naive_rate, _ = measure(run_naive, naive_work, intervals, args.naive_trades)
            rates[(symbols, label)] = book_rate
            shown_span = f"{span / 3_600_000:g}h" if span >= 3_600_000 else f"{span / 1000:g}s"
            print(
                f"{symbols:>8,} {shown_span:>7} {mean_batch:>6.1f} {label:>9} {book_rate:>13,.0f}"
                f" {naive_rate:>9,.0f} {book_rate / naive_rate:>7.1f}x {closed:>13,}",
                flush=True,
            )
    for symbols, _, _ in scenarios:
        ratio = rates[(symbols, "1")] / rates[(symbols, "7")]
        print(f"{symbols:>8,} symbol(s): 1-interval rate / 7-interval rate = {ratio:.2f}")
    megabytes = memory_of_books(2_000, DEFAULT_INTERVALS)
    print(f"memory: {megabytes:.1f} MiB for 2,000 symbols x 7 intervals (open klines + repair history)")


if __name__ == "__main__":
    main()
