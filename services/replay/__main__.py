"""Command line of the replay exchange.

Generated market::

    python -m services.replay --port 9443 --symbols BTCUSDT,ETHUSDT --speed 60 --seed 1 \\
        --start 2026-01-01T00:00:00Z --duration 15m

With ``--zipf 1`` the symbols trade at Zipf rates by their position in ``--symbols`` (a whole exchange's
shape: the first trades ``--zipf-top`` orders a second, the k-th 1/k as often).

Recorded files (data.binance.vision aggTrades CSV; ``--file PATH:SYMBOL`` may repeat; a bare path takes the
symbol from ``--symbol`` or from the file name's first dash-separated part)::

    python -m services.replay --file TRXUSDT-aggTrades.csv --symbol TRXUSDT --venue usdm --speed 0

When it is ready it prints one line: ``replay ready ws_url=... rest_url=... control_url=... venue=...``.
SIGTERM or SIGINT stops it cleanly (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import sys
from pathlib import Path

from pydantic import ValidationError

from services.replay.config import (
    FileFeed,
    GeneratorFeed,
    ReplayConfig,
    parse_duration_ms,
    parse_utc_ms,
)
from services.replay.exchange import ReplayExchange


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.replay", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9443, help="0 = any free port (default 9443)")
    p.add_argument("--venue", choices=("spot", "usdm"), default="spot")
    p.add_argument("--speed", type=float, default=1.0, help="market time per real time; 0 = as fast as possible")
    p.add_argument(
        "--autostart",
        choices=("on_subscribe", "on_all_subscribed", "immediately", "never"),
        default="on_subscribe",
        help="when market time starts: at the first subscription, once every symbol is subscribed, at once, or "
        "never (on POST /_control/resume)",
    )
    gen = p.add_argument_group("generated market")
    gen.add_argument("--symbols", default="BTCUSDT,ETHUSDT", help="comma-separated")
    gen.add_argument("--seed", type=int, default=1)
    gen.add_argument("--start", default="2026-01-01T00:00:00Z", help="ISO 8601 UTC or epoch ms")
    gen.add_argument("--duration", default="15m", help="like 90s, 15m, 2h, 1d")
    gen.add_argument(
        "--zipf",
        type=float,
        default=None,
        metavar="S",
        help="Zipf activity: the k-th symbol trades 1/k**S as often as the first (default: each symbol's profile)",
    )
    gen.add_argument(
        "--zipf-top", type=float, default=20.0, metavar="RATE", help="with --zipf: the first symbol's orders per second"
    )
    rec = p.add_argument_group("recorded files")
    rec.add_argument("--file", action="append", default=[], metavar="PATH[:SYMBOL]")
    rec.add_argument("--symbol", help="symbol of a single --file given without :SYMBOL")
    conn = p.add_argument_group("connections")
    conn.add_argument("--ping-interval", type=float, default=20.0, help="seconds between server pings")
    conn.add_argument("--pong-timeout", type=float, default=60.0)
    conn.add_argument("--max-connection-age", type=float, default=None, help="seconds (Binance: 86400)")
    conn.add_argument("--rate-limit", type=int, default=None, help="REST weight per minute (default: unlimited)")
    p.add_argument("--log-level", default="WARNING")
    return p


def _file_feed(spec: str, symbol: str | None) -> FileFeed:
    path_text, sep, tail = spec.rpartition(":")
    if sep and re.fullmatch(r"[A-Za-z0-9]{2,30}", tail) and not Path(spec).exists():
        return FileFeed(path=Path(path_text), symbol=tail.upper())
    if symbol is None:
        symbol = Path(spec).name.split("-")[0].upper()
    return FileFeed(path=Path(spec), symbol=symbol.upper())


def config_from_args(argv: list[str] | None = None) -> ReplayConfig:
    """Parse the command line into a :class:`ReplayConfig` (raises ``SystemExit`` with a message on errors)."""
    parser = _parser()
    return _config(parser, parser.parse_args(argv))


def _config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ReplayConfig:
    try:
        feed: GeneratorFeed | tuple[FileFeed, ...]
        if args.file:
            if args.symbol is not None and len(args.file) > 1:
                parser.error("--symbol applies to a single --file; use --file PATH:SYMBOL for several")
            feed = tuple(_file_feed(spec, args.symbol) for spec in args.file)
        else:
            feed = GeneratorFeed(
                symbols=tuple(s.strip().upper() for s in args.symbols.split(",") if s.strip()),
                seed=args.seed,
                start_ms=parse_utc_ms(args.start),
                duration_ms=parse_duration_ms(args.duration),
                zipf=args.zipf,
                zipf_top_orders_per_s=args.zipf_top,
            )
        return ReplayConfig(
            feed=feed,
            venue=args.venue,
            speed=args.speed,
            autostart=args.autostart,
            host=args.host,
            port=args.port,
            ping_interval_s=args.ping_interval,
            pong_timeout_s=args.pong_timeout,
            max_connection_age_s=args.max_connection_age,
            rest_weight_limit=args.rate_limit,
        )
    except (ValidationError, ValueError) as exc:
        parser.error(str(exc))


async def serve(config: ReplayConfig) -> None:
    """Run the exchange until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with ReplayExchange(config) as ex:
        print(
            f"replay ready ws_url={ex.ws_url} rest_url={ex.rest_url} control_url={ex.control_url} "
            f"venue={config.venue} speed={config.speed:g} symbols={','.join(ex.symbols)}",
            flush=True,
        )
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    config = _config(parser, args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        asyncio.run(serve(config))
    except FileNotFoundError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
