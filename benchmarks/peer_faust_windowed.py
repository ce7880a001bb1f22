"""The peer for ``bench_aggregator.py``: the same klines the straightforward Faust way.

One Faust agent iterates the ``trades`` stream message by message (Faust's default fetcher and stream), reads
each message's trades (an ingest batch, a bare Binance payload or a combined-stream envelope), and for every
trade updates one tumbling-window table per interval keyed by symbol (``Table.tumbling(size)``,
windows relative to the message timestamp, which the benchmark sets to the batch's trade time; batches never
straddle a minute, so every trade lands in its Binance window), with Decimal arithmetic: open/high/low/close,
base and quote volume, taker-buy volumes, trade count, first and last trade id. Every update is a table write,
so a changelog record, as Faust tables do. Fixed-size intervals only (Faust's windows are epoch-aligned, so
``1w`` and ``1M`` have no tumbling equivalent).

Run by the benchmark as ``python benchmarks/peer_faust_windowed.py TOPIC PARTITIONS TRADES SECONDS INTERVALS``;
prints one JSON line with what it measured.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from decimal import Decimal
from typing import Any

import faust

WINDOW_SECONDS = {
    "1m": 60,
    "3m": 180,
    "5m": 300,
    "15m": 900,
    "30m": 1800,
    "1h": 3600,
    "2h": 7200,
    "4h": 14_400,
    "1d": 86_400,
}


def fold(state: dict[str, Any] | None, trade: dict[str, Any]) -> dict[str, Any]:
    """One trade into one window's kline state (decimal strings, so the state is JSON for the changelog)."""
    p, q = Decimal(trade["p"]), Decimal(trade["q"])
    buy = not trade["m"]
    if state is None:
        return {
            "o": trade["p"], "h": trade["p"], "l": trade["p"], "c": trade["p"],
            "v": str(q), "q": str(p * q), "V": str(q if buy else 0), "Q": str(p * q if buy else 0),
            "n": trade["l"] - trade["f"] + 1, "f": trade["f"], "L": trade["l"],
        }  # fmt: skip
    return {
        "o": state["o"],
        "h": str(max(Decimal(state["h"]), p)),
        "l": str(min(Decimal(state["l"]), p)),
        "c": trade["p"],
        "v": str(Decimal(state["v"]) + q),
        "q": str(Decimal(state["q"]) + p * q),
        "V": str(Decimal(state["V"]) + (q if buy else 0)),
        "Q": str(Decimal(state["Q"]) + (p * q if buy else 0)),
        "n": state["n"] + trade["l"] - trade["f"] + 1,
        "f": state["f"],
        "L": trade["l"],
    }


def trades_of(value: dict[str, Any]) -> list[dict[str, Any]]:
    """The trades of one ``trades`` message: an ingest batch, a bare Binance payload or an envelope."""
    if "trades" in value:
        return list(value["trades"])
    return [value["data"] if "data" in value else value]


def main() -> None:
    topic, partitions, target, seconds, intervals = sys.argv[1:6]
    names = intervals.split(",")
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    datadir = tempfile.mkdtemp(prefix="bench-peer-")  # Faust's table directory, removed at exit (not the cwd)
    app = faust.App(
        f"bench-peer-{topic}",
        broker=f"kafka://{bootstrap}",
        store="memory://",
        web_enabled=False,
        topic_disable_leader=True,
        table_standby_replicas=0,
        topic_partitions=int(partitions),
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=10.0,
        stream_recovery_delay=0.0,
        autodiscover=False,
        datadir=datadir,
    )
    source = app.topic(topic, key_serializer="raw", value_serializer="raw")
    tables = [
        app.Table(f"kl-{name}", default=dict, partitions=int(partitions))
        .tumbling(WINDOW_SECONDS[name], expires=2 * WINDOW_SECONDS[name])
        .relative_to_stream()
        for name in names
    ]
    state = {"messages": 0, "trades": 0, "first": 0.0, "last": 0.0, "cpu": 0.0}
    done = asyncio.Event()

    @app.agent(source)
    async def aggregate(stream: Any) -> None:
        async for event in stream.events():
            if not state["first"]:
                state["first"], state["cpu"] = time.perf_counter(), time.process_time()
            trades = trades_of(json.loads(event.value))
            symbol = event.key.decode()
            for trade in trades:
                for table in tables:
                    table[symbol] = fold(table[symbol].current() or None, trade)
            state["messages"] += 1
            state["trades"] += len(trades)
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
            os._exit(0)  # the measurement is taken; do not wait for Faust to wind down its tables

    if os.environ.get("PEER_DEBUG"):
        import logging

        logging.basicConfig(level=logging.INFO)
    asyncio.run(run())


if __name__ == "__main__":
    main()
