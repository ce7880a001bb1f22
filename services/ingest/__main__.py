"""``python -m services.ingest [--config PATH]``: run the ingest service until SIGTERM/SIGINT.

Exit status (:mod:`services.shared.lifecycle`): 0 after a graceful stop that flushed everything, 1 on a fatal
error while running (a send not acknowledged in time, ...), 2 for a startup error (a bad setting, Kafka
unreachable: one line naming the key or the address).
"""

from __future__ import annotations

import argparse
import sys

from services.ingest.service import IngestService
from services.shared.lifecycle import Shutdown, run_service
from services.shared.settings import Settings


async def _ingest(settings: Settings, shutdown: Shutdown, _args: argparse.Namespace) -> int:
    return await IngestService(settings, shutdown=shutdown).run()


def main(argv: list[str] | None = None) -> int:
    return run_service("ingest", _ingest, description="Run the ingest service until SIGTERM/SIGINT.", argv=argv)


if __name__ == "__main__":
    sys.exit(main())
