"""``klines replay FILE[:SYMBOL]...``: rebuild klines from recorded aggTrade files straight into ClickHouse.

For history that never went through the live pipeline (data.binance.vision daily files, one's own recordings):
each file is read (with or without header, millisecond or microsecond times), folded through the same
:class:`~services.core.KlineBooks` the aggregator runs, and every closed kline is stored in the finalized table
through the one write path (:func:`services.shared.clickhouse.insert_klines`), in chunks whose deduplication
token names the file, its size and the chunk, so running the same replay twice stores nothing new. A progress
bar on stderr shows the trades folded (:class:`services.console.Progress`). ``--compare KLINES_CSV`` checks
the result against Binance's own kline file for the same symbol, field by field.

The last kline of a file is still open when the file ends (the next trade is not in the file): it is stored
only with ``--close-last``, for files known to end exactly at a kline boundary.

A file holds trades only: the ``trades`` topic's gap and symbol lifecycle records (a removal ends a symbol's
book in the aggregator) cannot appear in it, and ``klines run --file`` never changes its symbols while the files
play, so the pipeline's klines of a tape are the klines this command folds.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

from services.commands import command
from services.console import Progress
from services.core import Kline, KlineBooks, read_aggtrades_csv, read_klines_csv
from services.shared import clickhouse
from services.shared.settings import Settings

CHUNK_TRADES = 20_000
INSERT_ROWS = 5_000


def parse_file_spec(spec: str) -> tuple[Path, str]:
    """``PATH:SYMBOL``, or ``PATH`` whose name starts with the symbol (``BTCUSDT-aggTrades-2026-01-01.csv``)."""
    path_text, sep, symbol = spec.rpartition(":")
    if sep and symbol.isalnum() and not Path(spec).exists():
        return Path(path_text), symbol.upper()
    return Path(spec), Path(spec).name.split("-")[0].upper()


def rebuild(
    settings: Settings,
    files: Sequence[tuple[Path, str]],
    intervals: Sequence[str],
    *,
    close_last: bool = False,
    store: bool = True,
    err: TextIO | None = None,
) -> dict[str, list[Kline]]:
    """Fold every file; store (and return, per symbol) the klines that closed."""
    err = err or sys.stderr
    client = clickhouse.connect(settings.clickhouse) if store else None
    if client is not None:
        clickhouse.apply_schema(client, settings.clickhouse)
        clickhouse.check_table(client, settings.clickhouse, settings.clickhouse.finalized_table)
    closed_by_symbol: dict[str, list[Kline]] = {}
    for path, symbol in files:
        if not path.is_file():
            raise FileNotFoundError(f"no such aggTrades file: {path}")
        trades = read_aggtrades_csv(path, symbol)
        books = KlineBooks(intervals, repair_horizon_ms=settings.aggregator.repair_horizon_ms)
        closed: list[Kline] = []
        progress = Progress(len(trades), f"{path.name} ({symbol})", err)
        for start in range(0, len(trades), CHUNK_TRADES):
            chunk = trades[start : start + CHUNK_TRADES]
            books.apply(symbol, chunk)
            closed.extend(books.drain_closed())
            progress.advance(len(chunk))
        if close_last and trades:
            books.advance(max(t.T for t in trades) + 10**12)
            closed.extend(k for k in books.drain_closed() if k.T <= trades[-1].T)
        progress.finish()
        closed_by_symbol.setdefault(symbol, []).extend(closed)
        if client is not None:
            _store(client, settings, path, closed)
    return closed_by_symbol


def _store(client: Any, settings: Settings, path: Path, klines: Sequence[Kline]) -> None:
    stat = path.stat()
    ident = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    ch = settings.clickhouse
    for n, start in enumerate(range(0, len(klines), INSERT_ROWS)):
        token = f"replay:{ident}:{n}"
        rows = [
            clickhouse.kline_row(k, version=k.version, partition=-1, offset=start + i, token=token)
            for i, k in enumerate(klines[start : start + INSERT_ROWS])
        ]
        clickhouse.insert_klines(client, ch, ch.finalized_table, rows, token)


def compare(mine: Sequence[Kline], reference: Sequence[Kline]) -> list[str]:
    """Differences in the fields of Binance's kline file (REST row order; decimals compared numerically).

    The file has no first/last trade ids, so those are not compared here (``klines verify`` compares them).
    """
    by_t = {k.t: k for k in mine}
    problems = []
    for ref in reference:
        got = by_t.get(ref.t)
        if got is None:
            problems.append(f"{ref.t}: missing")
            continue
        fields = ("t", "o", "h", "l", "c", "v", "T", "q", "n", "V", "Q")
        diffs = [
            f"{name} {a} != {b}"
            for name, a, b in zip(fields, got.to_rest_row(), ref.to_rest_row(), strict=False)
            if Decimal(str(a)) != Decimal(str(b))
        ]
        if diffs:
            problems.append(f"{ref.t}: " + "; ".join(diffs))
    return problems


@command("replay", "rebuild klines from recorded aggTrade files (data.binance.vision CSV) into ClickHouse")
def _replay_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE[:SYMBOL]", help="aggTrades CSV files")
    p.add_argument("--intervals", help="comma-separated (default: market.intervals)")
    p.add_argument("--close-last", action="store_true", help="also store each file's last (open) kline")
    p.add_argument("--dry-run", action="store_true", help="compute and report, store nothing")
    p.add_argument("--compare", metavar="KLINES_CSV", help="Binance kline CSV to compare with (one symbol, interval)")
    p.add_argument("--compare-interval", default="1m", help="interval of the --compare file (default 1m)")
    p.set_defaults(handler=_replay)


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from services.core import validate_interval

    intervals = (
        [validate_interval(i.strip()) for i in args.intervals.split(",")]
        if args.intervals
        else list(settings.market.intervals)
    )
    files = [parse_file_spec(spec) for spec in args.files]
    try:
        result = rebuild(settings, files, intervals, close_last=args.close_last, store=not args.dry_run)
    except FileNotFoundError as exc:
        print(f"klines: {exc}", file=sys.stderr)
        return 2
    for symbol, klines in sorted(result.items()):
        counts: dict[str, int] = {}
        for k in klines:
            counts[k.i] = counts.get(k.i, 0) + 1
        summary = ", ".join(f"{counts.get(i, 0)} × {i}" for i in intervals)
        print(f"{symbol}: {summary} closed klines{' (not stored: --dry-run)' if args.dry_run else ' stored'}")
    if args.compare:
        symbol = files[0][1]
        reference = read_klines_csv(args.compare, symbol, args.compare_interval)
        mine = [k for k in result.get(symbol, []) if k.i == args.compare_interval]
        reference = [r for r in reference if r.t <= max((k.t for k in mine), default=-1)]
        problems = compare(mine, reference)
        for line in problems[:20]:
            print(f"  mismatch: {line}")
        print(
            f"compare {'OK' if not problems else 'FAILED'}: {len(reference)} reference klines, {len(problems)} differ"
        )
        return 0 if not problems else 1
    return 0
