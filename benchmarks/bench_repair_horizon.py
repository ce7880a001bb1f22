"""Memory of the repair horizon: what ``aggregator.repair_horizon_ms`` costs per symbol, and at 2,000 symbols.

Run: ``.venv/bin/python benchmarks/bench_repair_horizon.py [--symbols N] [--hours H]``. One process. For each
interval set (all 16, ``1s,1m,5m,1h``, the default ``1m``..``1w``) and each horizon (10 minutes, 1 hour), it
folds ``--hours`` of market time (one trade per second per symbol, so every ``1s`` kline has a trade) into
:class:`~services.core.book.KlineBooks` of ``--symbols`` symbols and prints the Python memory held per symbol
(``tracemalloc``, after the closed klines were drained, as the aggregator holds it), the memory per kept
closed kline (the difference between the two horizons over the klines the longer one keeps more), and the
figure scaled to 2,000 symbols. A horizon of the trades retention (7 days by default) is the same slope
times 168 hours.
"""

from __future__ import annotations

import argparse
import random
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.core.book import KlineBooks
from services.core.intervals import DEFAULT_INTERVALS, INTERVALS, interval_ms
from services.core.models import AggTrade

T0 = 1_700_000_000_000
HORIZONS = (600_000, 3_600_000)
SETS = {"all 16": INTERVALS, "1s,1m,5m,1h": ("1s", "1m", "5m", "1h"), "default 1m..1w": DEFAULT_INTERVALS}


def held_per_symbol(intervals: tuple[str, ...], horizon_ms: int, symbols: int, hours: float) -> float:
    """Bytes of Python memory the books hold per symbol after ``hours`` of one trade per second each."""
    rng = random.Random(7)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    books = KlineBooks(list(intervals), 0, repair_horizon_ms=horizon_ms)
    names = [f"S{k}USDT" for k in range(symbols)]
    for second in range(int(hours * 3600)):
        t = T0 + second * 1000
        for k, name in enumerate(names):
            a = second + 1
            price = f"{100 + rng.randint(0, 999) / 100:.2f}"
            books.apply(name, [AggTrade(name, a, price, "1.5", a, a, t + k, False)])
        books.drain_closed()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return held / symbols


def closed_within(intervals: tuple[str, ...], horizon_ms: int) -> float:
    """Closed klines a book keeps for a horizon, on average: the horizon over each interval's length (``1M``
    taken as 30 days)."""
    return sum(horizon_ms / (interval_ms(name) or 30 * 86_400_000) for name in intervals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--symbols", type=int, default=10)
    parser.add_argument("--hours", type=float, default=1.2, help="market time folded (longer than the horizons)")
    args = parser.parse_args()
    print(f"{args.symbols} symbols, {args.hours} h of market time, one trade per second per symbol")
    print(f"{'intervals':<16} {'horizon':>8} {'KiB/symbol':>11} {'B/closed kline':>15} {'2,000 symbols':>14}")
    for label, intervals in SETS.items():
        held = {h: held_per_symbol(tuple(intervals), h, args.symbols, args.hours) for h in HORIZONS}
        extra = closed_within(tuple(intervals), HORIZONS[1]) - closed_within(tuple(intervals), HORIZONS[0])
        per_kline = (held[HORIZONS[1]] - held[HORIZONS[0]]) / extra
        for h in HORIZONS:
            print(
                f"{label:<16} {h // 60_000:>6} m {held[h] / 1024:>11,.0f} {per_kline:>15,.0f} "
                f"{held[h] * 2000 / 2**20:>11,.0f} MiB"
            )
        per_hour = per_kline * closed_within(tuple(intervals), 3_600_000) * 2000 / 2**20
        print(f"{label:<16} each further hour of horizon at 2,000 symbols: ~{per_hour:,.0f} MiB")


if __name__ == "__main__":
    main()
