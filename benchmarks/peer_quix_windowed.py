"""A peer for ``bench_aggregator.py``: 1m OHLCV the straightforward Quix Streams way.

A ``StreamingDataFrame`` on the ``trades`` topic (JSON values, keyed by symbol) expands each message into its
trades (an ingest batch's ``trades``, a bare Binance payload, or a combined-stream envelope's ``data``) and
aggregates them in a one-minute tumbling window per key, event time being the message timestamp (the benchmark
sets it to the trade time): open ``First``, high ``Max``, low ``Min``, close ``Last`` of the price, volume
``Sum`` of the quantity, trade ``Count``, emitted with ``final()``. Prices and quantities become floats: Quix's
window state must serialise them, and ``Decimal`` does not, so this peer is not exact (the aggregator is); it is
a throughput peer. One interval only (the aggregator computes six), and no changelog topics
(``use_changelog_topics=False``; the aggregator checkpoints its state to Kafka): both make the comparison
favour the peer.

Runs in a virtual environment of its own with ``quixstreams`` (``bench_aggregator.py`` creates it), so it
imports nothing of the project. Run by the benchmark as
``python benchmarks/peer_quix_windowed.py TOPIC PARTITIONS TRADES SECONDS``; prints one JSON line with what it
measured (messages and trades processed, seconds from the first message to the last, CPU seconds).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import timedelta
from typing import Any

from quixstreams import Application
from quixstreams.dataframe.windows import aggregations as agg


def trades_of(value: dict[str, Any]) -> list[dict[str, Any]]:
    """The trades of one ``trades`` message, as floats where the window needs numbers."""
    if "trades" in value:
        items = value["trades"]
    elif "data" in value:
        items = [value["data"]]
    else:
        items = [value]
    return [{"p": float(t["p"]), "q": float(t["q"]), "n": t["l"] - t["f"] + 1} for t in items]


def main() -> None:
    topic_name, _partitions, target, seconds = sys.argv[1:5]
    state_dir = tempfile.mkdtemp(prefix="bench-quix-")
    app = Application(
        broker_address=os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
        consumer_group=f"bench-quix-{topic_name}",
        auto_offset_reset="earliest",
        state_dir=state_dir,
        use_changelog_topics=False,
        auto_create_topics=False,
        loglevel="WARNING",
    )
    topic = app.topic(topic_name, key_deserializer="str", value_deserializer="json")
    state = {"messages": 0, "trades": 0, "first": 0.0, "last": 0.0, "cpu": 0.0}
    done = threading.Event()

    def expand(value: dict[str, Any]) -> list[dict[str, Any]]:
        if not state["first"]:
            state["first"], state["cpu"] = time.perf_counter(), time.process_time()
        trades = trades_of(value)
        state["messages"] += 1
        state["trades"] += len(trades)
        state["last"] = time.perf_counter()
        if not done.is_set() and (state["trades"] >= int(target) or state["last"] - state["first"] >= float(seconds)):
            done.set()
            app.stop()
        return trades

    sdf = app.dataframe(topic)
    sdf = sdf.apply(expand, expand=True)
    sdf = (
        sdf.tumbling_window(duration_ms=timedelta(minutes=1))
        .agg(
            open=agg.First("p"),
            high=agg.Max("p"),
            low=agg.Min("p"),
            close=agg.Last("p"),
            volume=agg.Sum("q"),
            trades=agg.Count(),
        )
        .final()
    )
    try:
        app.run(sdf)
    finally:
        elapsed = state["last"] - state["first"]
        cpu = time.process_time() - state["cpu"] if state["first"] else 0.0
        print(
            json.dumps({"messages": state["messages"], "trades": state["trades"], "seconds": elapsed, "cpu": cpu}),
            flush=True,
        )
        shutil.rmtree(state_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
