"""``klines tape OUT_DIR``: write a seeded tape of aggTrades as data.binance.vision CSV files, one per symbol.

A tape is what the pipeline-equals-replay invariant is checked on: the same files are played through the whole
pipeline (``klines run --file DIR/SYMBOL.csv:SYMBOL ...``) and folded by ``klines replay`` straight into
ClickHouse, and the two finalized tables must be equal field by field. Two kinds, both deterministic per
``(seed, symbol)`` (:mod:`services.replay.generator`):

* ``market``: the replay exchange's own generated market (busy, quiet and burst minutes);
* ``sparse``: weeks of short active stretches between quiet stretches of minutes to a day and a half, with
  dense bursts and millisecond ties at midnights, week starts and month starts (closing one trade closes
  thousands of empty klines at once: what catch-up and backfill bursts look like).

The command prints the ``--file`` arguments that play the tape.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from services.commands import command
from services.core.models import AggTrade
from services.core.reference import write_aggtrades_csv
from services.replay.config import parse_duration_ms, parse_utc_ms
from services.replay.generator import generate_sparse_trades, generate_trades
from services.shared.settings import Settings

Generator = Callable[..., list[AggTrade]]
KINDS: dict[str, Generator] = {"market": generate_trades, "sparse": generate_sparse_trades}


def write_tape(
    out_dir: Path,
    symbols: list[str],
    *,
    kind: str,
    seed: int,
    start_ms: int,
    end_ms: int,
    venue: str = "spot",
) -> dict[str, Path]:
    """Generate and write one CSV per symbol; ``{symbol: path}``."""
    if kind not in KINDS:
        raise ValueError(f"tape kind {kind!r} is not one of {', '.join(KINDS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for symbol in symbols:
        trades = KINDS[kind](symbol, seed=seed, start_ms=start_ms, end_ms=end_ms, venue=venue)
        path = out_dir / f"{symbol}.csv"
        write_aggtrades_csv(path, trades)
        paths[symbol] = path
    return paths


@command("tape", "write a seeded tape of aggTrades (CSV per symbol) to play with run --file and replay")
def _tape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", type=Path, help="directory for SYMBOL.csv files")
    p.add_argument("--symbols", default="BTCUSDT,ETHUSDT", help="comma-separated symbols")
    p.add_argument("--kind", choices=sorted(KINDS), default="sparse", help="market or sparse (default)")
    p.add_argument("--start", default="2024-12-29T00:00:00Z", help="first trade time (UTC)")
    p.add_argument("--duration", default="35d", help="tape length (e.g. 10m, 6h, 35d)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--venue", choices=["spot", "usdm"], default="spot")
    p.set_defaults(handler=_tape)


def _tape(args: argparse.Namespace, settings: Settings) -> int:
    start = parse_utc_ms(args.start)
    symbols = [s.strip().upper() for s in args.symbols.split(",") if s.strip()]
    paths = write_tape(
        args.out_dir,
        symbols,
        kind=args.kind,
        seed=args.seed,
        start_ms=start,
        end_ms=start + parse_duration_ms(args.duration),
        venue=args.venue,
    )
    print(" ".join(f"--file {path}:{symbol}" for symbol, path in paths.items()))
    return 0
