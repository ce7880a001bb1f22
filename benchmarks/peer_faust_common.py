"""What the two Faust peers of ``bench_aggregator.py`` share: the app on the benchmark's topic, and the run that
times the agent from its first message and prints the one JSON line the benchmark reads.

Each peer is a standalone script run in a process of its own (``peer_faust_idle.py``, ``peer_faust_windowed.py``);
it imports this module from its own directory, which Python puts first on ``sys.path``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import faust


@dataclass
class Measured:
    """What an agent counts: messages and trades, and when (wall and CPU) its first and last message came."""

    target: int
    seconds: float
    messages: int = 0
    trades: int = 0
    first: float = 0.0
    last: float = 0.0
    cpu: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def count(self, trades: int) -> None:
        """One message with ``trades`` trades; ``done`` is set at the target or after ``seconds``."""
        if not self.first:
            self.first, self.cpu = time.perf_counter(), time.process_time()
        self.messages += 1
        self.trades += trades
        self.last = time.perf_counter()
        if self.trades >= self.target or self.last - self.first >= self.seconds:
            self.done.set()


def peer_app(name: str, topic: str, partitions: int, **options: Any) -> tuple[faust.App, str]:
    """A Faust app reading ``topic`` from the start with in-memory tables, and its data directory (removed by
    :func:`run_measured`, not left in the working directory)."""
    datadir = tempfile.mkdtemp(prefix=f"{name}-")
    app = faust.App(
        f"{name}-{topic}",
        broker=f"kafka://{os.environ.get('KAFKA_BOOTSTRAP', '127.0.0.1:9092')}",
        store="memory://",
        web_enabled=False,
        topic_disable_leader=True,
        topic_partitions=partitions,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=10.0,
        stream_recovery_delay=0.0,
        autodiscover=False,
        datadir=datadir,
        **options,
    )
    return app, datadir


def run_measured(app: faust.App, measured: Measured, datadir: str) -> None:
    """Start ``app``, wait until the agent is done (or the startup allowance ``PEER_STARTUP_S`` plus its seconds
    passed), print the JSON result and leave at once: the measurement is taken, Faust need not wind down."""

    async def run() -> None:
        try:
            await app.start()
            startup_s = float(os.environ.get("PEER_STARTUP_S", "120"))
            await asyncio.wait_for(measured.done.wait(), measured.seconds + startup_s)
        except BaseException as exc:
            print(f"peer failed: {exc!r}", file=sys.stderr, flush=True)
            raise
        finally:
            result = {
                "messages": measured.messages,
                "trades": measured.trades,
                "seconds": measured.last - measured.first,
                "cpu": time.process_time() - measured.cpu,
            }
            print(json.dumps(result), flush=True)
            shutil.rmtree(datadir, ignore_errors=True)
            os._exit(0)

    if os.environ.get("PEER_DEBUG"):
        import logging

        logging.basicConfig(level=logging.INFO)
    asyncio.run(run())
