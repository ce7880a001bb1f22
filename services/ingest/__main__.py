"""``python -m services.ingest [--config PATH]``: run the ingest service until SIGTERM/SIGINT.

Exit status: 0 after a graceful stop that flushed everything, 1 on a fatal error (Kafka unreachable, a send
not acknowledged in time, ...), 2 for a bad setting (one line naming the key).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from services.ingest.service import IngestService
from services.shared.lifecycle import Shutdown
from services.shared.logs import setup_logging
from services.shared.settings import ConfigError, Settings, load_settings


async def _main(settings: Settings) -> int:
    shutdown = Shutdown(settings.service.shutdown_grace_s)
    shutdown.install()
    return await IngestService(settings, shutdown=shutdown).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=None, help="TOML file (default $KLINES_CONFIG)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 2
    setup_logging("ingest", settings.service.log_level, settings.service.log_format)
    return asyncio.run(_main(settings))


if __name__ == "__main__":
    sys.exit(main())
