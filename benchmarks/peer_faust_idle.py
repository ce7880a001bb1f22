"""A peer for ``bench_aggregator.py``: a Faust agent that does nothing with the messages.

One agent iterates the ``trades`` stream (Faust's default fetcher and stream, raw keys and values) and only
counts: the ceiling of any aggregation written as a plain Faust agent on this topic, with Faust's
per-message hand-off (spec §7) and nothing else. Trades are counted from each value's shape without parsing the
JSON (one per bare payload or envelope; for an ingest batch, its ``"a":`` fields).

Run by the benchmark as ``python benchmarks/peer_faust_idle.py TOPIC PARTITIONS TRADES SECONDS``; prints one
JSON line with what it measured.
"""

from __future__ import annotations

import sys
from typing import Any

from peer_faust_common import Measured, peer_app, run_measured


def main() -> None:
    topic, partitions, target, seconds = sys.argv[1:5]
    app, datadir = peer_app("bench-faust-idle", topic, int(partitions))
    source = app.topic(topic, key_serializer="raw", value_serializer="raw")
    measured = Measured(int(target), float(seconds))

    @app.agent(source)
    async def count(stream: Any) -> None:
        async for value in stream:
            measured.count(value.count(b'"a":') if value.startswith(b'{"type"') else 1)

    run_measured(app, measured, datadir)


if __name__ == "__main__":
    main()
