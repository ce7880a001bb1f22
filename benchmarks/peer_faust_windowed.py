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

import json
import sys
from decimal import Decimal
from typing import Any

from peer_faust_common import Measured, peer_app, run_measured

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
    app, datadir = peer_app("bench-peer", topic, int(partitions), table_standby_replicas=0)
    source = app.topic(topic, key_serializer="raw", value_serializer="raw")
    tables = [
        app.Table(f"kl-{name}", default=dict, partitions=int(partitions))
        .tumbling(WINDOW_SECONDS[name], expires=2 * WINDOW_SECONDS[name])
        .relative_to_stream()
        for name in names
    ]
    measured = Measured(int(target), float(seconds))

    @app.agent(source)
    async def aggregate(stream: Any) -> None:
        async for event in stream.events():
            trades = trades_of(json.loads(event.value))
            symbol = event.key.decode()
            for trade in trades:
                for table in tables:
                    table[symbol] = fold(table[symbol].current() or None, trade)
            measured.count(len(trades))

    run_measured(app, measured, datadir)


if __name__ == "__main__":
    main()
