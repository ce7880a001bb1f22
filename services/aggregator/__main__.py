"""``python -m services.aggregator [--config PATH] [--clock wall|event|manual] [--instance-id ID]``.

Runs one aggregator worker.

Settings come from ``--config`` (or ``$KLINES_CONFIG``, default ``config/klines.toml``) and the environment.
Market time is ``aggregator.clock`` (``wall``: UTC now, live Binance; ``event``: the newest applied trade time,
for replays); ``--clock`` overrides it, and ``--clock manual`` sets it over HTTP (``POST /clock?now_ms=``; for
tests). ``--instance-id`` makes the worker a static consumer-group member (a restart with the same id takes
its partitions back without waiting for the session timeout). Exit codes: 0 after a graceful stop, 1 when the
worker failed, 2 for a bad setting.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from services.aggregator.clock import make_clock
from services.aggregator.worker import run
from services.shared.kafka import KafkaUnreachable
from services.shared.logs import log_event, setup_logging
from services.shared.settings import ConfigError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.aggregator", description="Run one aggregator worker.")
    parser.add_argument("--config", type=Path, default=None, help="TOML settings file")
    parser.add_argument(
        "--clock", choices=["wall", "event", "manual"], default=None, help="market time (default: aggregator.clock)"
    )
    parser.add_argument("--instance-id", default=None, help="static group membership id (e.g. the pod name)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"aggregator: {exc}", file=sys.stderr)
        return 2
    setup_logging("aggregator", settings.service.log_level, settings.service.log_format)
    log = logging.getLogger("services.aggregator")
    try:
        return asyncio.run(
            run(settings, make_clock(args.clock or settings.aggregator.clock), instance_id=args.instance_id)
        )
    except KafkaUnreachable as exc:
        log_event(log, logging.ERROR, str(exc))
        return 1
    except Exception as exc:
        log.exception("aggregator failed: %r", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
