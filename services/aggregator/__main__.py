"""``python -m services.aggregator [--config PATH] [--clock wall|event|manual] [--instance-id ID]``.

Runs one aggregator worker.

Settings come from ``--config`` (or ``$KLINES_CONFIG``, default ``config/klines.toml``) and the environment.
Market time is ``aggregator.clock`` (``wall``: UTC now, live Binance; ``event``: the newest applied trade time,
for replays); ``--clock`` overrides it, and ``--clock manual`` sets it over HTTP (``POST /clock?now_ms=``; for
tests). ``--instance-id`` makes the worker a static consumer-group member (a restart with the same id takes
its partitions back without waiting for the session timeout). Exit codes (:mod:`services.shared.lifecycle`):
0 after a graceful stop, 1 when the worker failed, 2 for a startup error (bad setting, Kafka unreachable).
"""

from __future__ import annotations

import argparse
import sys

from services.aggregator.clock import make_clock
from services.aggregator.worker import run
from services.shared.lifecycle import Shutdown, run_service
from services.shared.settings import Settings


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clock", choices=["wall", "event", "manual"], default=None, help="market time (default: aggregator.clock)"
    )
    parser.add_argument("--instance-id", default=None, help="static group membership id (e.g. the pod name)")


async def _aggregator(settings: Settings, shutdown: Shutdown, args: argparse.Namespace) -> int:
    clock = make_clock(args.clock or settings.aggregator.clock)
    return await run(settings, clock, shutdown, instance_id=args.instance_id)


def main(argv: list[str] | None = None) -> int:
    return run_service(
        "aggregator", _aggregator, description="Run one aggregator worker.", arguments=_arguments, argv=argv
    )


if __name__ == "__main__":
    sys.exit(main())
