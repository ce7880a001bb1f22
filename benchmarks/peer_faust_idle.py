"""A peer for ``bench_aggregator.py``: a Faust agent that does nothing with the messages.

One agent iterates the ``trades`` stream (Faust's default fetcher and stream, raw keys and values) and only
counts: the ceiling of any aggregation written as a plain Faust agent on this topic, with Faust's
per-message hand-off (spec §7) and nothing else. Trades are counted from each value's shape without parsing the
JSON (one per bare payload or envelope; for an ingest batch, its ``"a":`` fields).

Run by the benchmark as ``python benchmarks/peer_faust_idle.py TOPIC PARTITIONS TRADES SECONDS``; prints one
JSON line with what it measured.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import faust


def main() -> None:
    topic, partitions, target, seconds = sys.argv[1:5]
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    datadir = tempfile.mkdtemp(prefix="bench-faust-idle-")
    app = faust.App(
        f"bench-faust-idle-{topic}",
        broker=f"kafka://{bootstrap}",
        store="memory://",
        web_enabled=False,
        topic_disable_leader=True,
        topic_partitions=int(partitions),
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=10.0,
        stream_recovery_delay=0.0,
        autodiscover=False,
        datadir=datadir,
    )
    source = app.topic(topic, key_serializer="raw", value_serializer="raw")
    state = {"messages": 0, "trades": 0, "first": 0.0, "last": 0.0, "cpu": 0.0}
    done = asyncio.Event()

    @app.agent(source)
    async def count(stream: Any) -> None:
        async for value in stream:
            if not state["first"]:
                state["first"], state["cpu"] = time.perf_counter(), time.process_time()
            state["messages"] += 1
            state["trades"] += value.count(b'"a":') if value.startswith(b'{"type"') else 1
            state["last"] = time.perf_counter()
            if state["trades"] >= int(target) or state["last"] - state["first"] >= float(seconds):
                done.set()

    async def run() -> None:
        try:
            await app.start()
            await asyncio.wait_for(done.wait(), float(seconds) + float(os.environ.get("PEER_STARTUP_S", "120")))
        except BaseException as exc:
            print(f"peer failed: {exc!r}", file=sys.stderr, flush=True)
            raise
        finally:
            elapsed = state["last"] - state["first"]
            cpu = time.process_time() - state["cpu"]
            result = {"messages": state["messages"], "trades": state["trades"], "seconds": elapsed, "cpu": cpu}
            print(json.dumps(result), flush=True)
            shutil.rmtree(datadir, ignore_errors=True)
            os._exit(0)  # the measurement is taken; do not wait for Faust to wind down

    asyncio.run(run())


if __name__ == "__main__":
    main()
