"""Crash loop for the aggregator: SIGKILL a worker at random points many times, then check every kline.

Run: ``KAFKA_BOOTSTRAP=127.0.0.1:9092 .venv/bin/python benchmarks/aggregator_crash_loop.py [--rounds 20]
[--seed N] [--minutes 60]``. Uses the broker named by ``KAFKA_BOOTSTRAP`` (default ``127.0.0.1:9092``) and its
own topics (deleted at the end). One run feeds a scripted multi-symbol trade stream in chunks while a worker
process (``python -m services.aggregator --clock manual``) is killed with SIGKILL at a random moment in each
round — during start-up, a restore, the stream, a checkpoint or idle time — then restarts one last worker,
lets it read everything, moves market time past the end, and verifies that every kline the oracle
(``reference_klines``) computes is on ``klines.finalized`` with exactly the oracle's values in every copy, and
that snapshot sequence numbers only increase per key. The worker logs go to ``.state/crash-loop/``.

The round logic is :func:`crash_rounds` in ``tests/integration/test_aggregator_processes.py`` (the test suite
runs three rounds of it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "integration")]

from test_aggregator_processes import crash_rounds  # noqa: E402

from services.aggregator.app import checkpoint_topic  # noqa: E402
from services.shared.kafka import delete_topics, ensure_topics  # noqa: E402
from services.shared.settings import load_settings  # noqa: E402


async def main(rounds: int, seed: int, minutes: int) -> int:
    name = f"crash-loop-{uuid.uuid4().hex[:8]}"
    state = REPO / ".state" / "crash-loop" / name
    state.mkdir(parents=True, exist_ok=True)
    topics = {k: f"{name}.{k}" for k in ("trades", "finalized", "snapshots", "dead_letter")}
    settings = load_settings(
        REPO / "config" / "klines.toml",
        kafka={
            "bootstrap": os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
            "topics": topics,
            "trades_partitions": 3,
            "klines_partitions": 3,
        },
        market={"intervals": ["1m", "5m"]},
        aggregator={"snapshot_interval_ms": 200},
        service={"state_dir": str(state)},
    )
    await ensure_topics(settings.kafka)
    started = time.monotonic()
    try:
        with open(state / "workers.log", "wb") as log:
            result = await crash_rounds(settings, rounds, seed, log, minutes=minutes, dense=True)
    except AssertionError as exc:
        print(f"FAILED after {time.monotonic() - started:.0f}s (seed {seed}, logs in {state}): {exc}")
        return 1
    finally:
        await delete_topics(settings.kafka, [*topics.values(), checkpoint_topic(settings)])
    print(f"seed {seed}: {rounds} SIGKILLs (phase, seconds, records the worker had read):")
    for phase, delay, read in result["kills"]:
        print(f"  {phase:8s} {delay:5.2f}s  {read}")
    print(
        f"OK in {time.monotonic() - started:.0f}s: {result['trades_records']} trade records, "
        f"all {result['klines']} oracle klines finalized exactly ({result['records']} records incl. replays)"
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="SIGKILL the aggregator at random points, then verify")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    parser.add_argument("--minutes", type=int, default=60, help="market minutes in the scripted stream")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.rounds, args.seed, args.minutes)))
