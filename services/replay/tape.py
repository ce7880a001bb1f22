"""The tape: every trade the exchange will ever publish, loaded up front, with its wire payload prebuilt.

A :class:`SymbolTape` holds one symbol's trades ordered by ``a`` and a ``published`` count: trades
``[0, published)`` are public (WebSocket already sent them, REST serves them), the rest are the future.
:class:`MarketTape` merges all symbols into one timeline ordered by ``(T, symbol order)``, which the publisher
walks with a cursor.

Payloads are built once here, not per connection and not per send: the publisher only slices lists of
ready-made JSON strings. ``E`` (event time) is ``T`` plus a small deterministic delay (1–23 ms, from ``a``), as
on Binance where ``E >= T``; the delay sometimes crosses a kline boundary, which catches clients that bucket by
``E`` instead of ``T``.
"""

from __future__ import annotations

import itertools
from array import array
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

from services.core.models import AggTrade
from services.core.reference import read_aggtrades_csv
from services.replay.config import FileFeed, GeneratorFeed, ReplayConfig, Venue
from services.replay.generator import ZipfActivity, generate_market, split_symbol


def event_time(trade: AggTrade) -> int:
    """The ``E`` the exchange stamps on ``trade``'s frame: ``T`` + 1..23 ms, fixed per ``a``."""
    return trade.T + 1 + trade.a % 23


def stream_payload(trade: AggTrade, venue: Venue) -> str:
    """The exact aggTrade stream payload (spot has ``M``; USD-M futures does not)."""
    return _stream_payloads([trade], venue)[0]


def _stream_payloads(trades: list[AggTrade], venue: Venue) -> list[str]:
    tail = ',"M":true}' if venue == "spot" else "}"
    return [
        f'{{"e":"aggTrade","E":{t.T + 1 + t.a % 23},"s":"{t.s}","a":{t.a},"p":"{t.p}","q":"{t.q}",'
        f'"f":{t.f},"l":{t.l},"T":{t.T},"m":{"true" if t.m else "false"}{tail}'
        for t in trades
    ]


def rest_payload(trade: AggTrade, venue: Venue) -> str:
    """One element of the REST ``aggTrades`` answer."""
    tail = ',"M":true}' if venue == "spot" else "}"
    return (
        f'{{"a":{trade.a},"p":"{trade.p}","q":"{trade.q}","f":{trade.f},"l":{trade.l},'
        f'"T":{trade.T},"m":{"true" if trade.m else "false"}{tail}'
    )


@dataclass
class SymbolTape:
    """One symbol's trades ordered by ``a``, their prebuilt stream payloads, and how many are public."""

    symbol: str
    index: int
    trades: list[AggTrade]
    payloads: list[str]
    times: array[int] = field(default_factory=lambda: array("q"))  # T, ordered like trades
    ids: array[int] = field(default_factory=lambda: array("q"))  # a, strictly increasing
    published: int = 0

    @property
    def base_asset(self) -> str:
        """``BTC`` of ``BTCUSDT``."""
        return split_symbol(self.symbol)[0]

    @property
    def quote_asset(self) -> str:
        """``USDT`` of ``BTCUSDT``."""
        return split_symbol(self.symbol)[1]

    @property
    def exhausted(self) -> bool:
        """Every trade has been published."""
        return self.published >= len(self.trades)

    @property
    def last_published_id(self) -> int | None:
        """``a`` of the newest public trade, or None before the first."""
        return self.ids[self.published - 1] if self.published else None

    def published_trades(self) -> list[AggTrade]:
        """The public trades, oldest first (a copy)."""
        return self.trades[: self.published]

    def index_from_id(self, from_id: int) -> int:
        """Index of the first trade with ``a >= from_id`` (may be ``len``)."""
        return bisect_left(self.ids, from_id)

    def index_from_time(self, ms: int, hi: int) -> int:
        """Index of the first trade with ``T >= ms`` among the first ``hi``."""
        return bisect_left(self.times, ms, 0, hi)

    def index_after_time(self, ms: int, hi: int) -> int:
        """Index of the first trade with ``T > ms`` among the first ``hi``."""
        return bisect_right(self.times, ms, 0, hi)


class MarketTape:
    """All symbols' tapes plus the merged timeline the publisher walks."""

    def __init__(self, trades_by_symbol: dict[str, list[AggTrade]], *, venue: Venue, start_ms: int, end_ms: int):
        self.venue: Venue = venue
        self.symbols: dict[str, SymbolTape] = {}
        for index, (symbol, trades) in enumerate(trades_by_symbol.items()):
            ordered = sorted(trades, key=lambda t: t.a)
            if any(t.s != symbol for t in ordered):
                ordered = [AggTrade(symbol, t.a, t.p, t.q, t.f, t.l, t.T, t.m) for t in ordered]
            for before, after in itertools.pairwise(ordered):
                if after.a == before.a:
                    raise ValueError(f"{symbol}: aggregate trade id {after.a} appears twice")
            payloads = _stream_payloads(ordered, venue)
            # Every frame is ASCII (symbols, digits, json.dumps escapes): one character is one byte on the wire.
            if not all(p.isascii() for p in payloads):
                raise ValueError(f"{symbol}: trade fields must be ASCII")
            self.symbols[symbol] = SymbolTape(
                symbol,
                index,
                ordered,
                payloads,
                array("q", (t.T for t in ordered)),
                array("q", (t.a for t in ordered)),
            )
        self.by_index: list[SymbolTape] = list(self.symbols.values())
        # The timeline: one entry per trade, ordered by (scheduled time, symbol order); per symbol in `a` order.
        # A recording whose T ever steps back is scheduled at the running maximum, so `a` order is kept. Each
        # symbol's entries are already sorted, so the sort only merges runs.
        merged = sorted(
            itertools.chain.from_iterable(
                zip(itertools.accumulate(tape.times, max), itertools.repeat(tape.index), strict=False)
                for tape in self.by_index
            )
        )
        self.timeline_times: array[int] = array("q", (ms for ms, _ in merged))
        self.timeline_symbols: array[int] = array("H", (index for _, index in merged))
        # The payloads in timeline order (references, not copies): publishing a batch is a slice.
        cursors = [iter(tape.payloads) for tape in self.by_index]
        self.timeline_payloads: list[str] = [next(cursors[index]) for index in self.timeline_symbols]
        first = self.timeline_times[0] if self.timeline_times else start_ms
        last = self.timeline_times[-1] if self.timeline_times else start_ms
        self.start_ms = min(start_ms, first)
        self.end_ms = max(end_ms, last)

    def __len__(self) -> int:
        return len(self.timeline_times)

    def get(self, symbol: str) -> SymbolTape | None:
        """The tape of ``symbol`` (upper-case), or None if the exchange does not list it."""
        return self.symbols.get(symbol)

    @property
    def exhausted(self) -> bool:
        """Every trade of every symbol has been published."""
        return all(t.exhausted for t in self.by_index)


def load_tape(config: ReplayConfig) -> MarketTape:
    """Generate or read every trade the config describes (this is the only place a feed touches a disk)."""
    feed = config.feed
    if isinstance(feed, GeneratorFeed):
        end_ms = feed.start_ms + feed.duration_ms
        zipf = None if feed.zipf is None else ZipfActivity(feed.zipf, feed.zipf_top_orders_per_s)
        trades = generate_market(
            feed.symbols, seed=feed.seed, start_ms=feed.start_ms, end_ms=end_ms, venue=config.venue, zipf=zipf
        )
        # The generated window ends at its last millisecond: market time stops there.
        return MarketTape(trades, venue=config.venue, start_ms=feed.start_ms, end_ms=end_ms - 1)
    trades_by_symbol = {f.symbol: _read_file(f) for f in feed}
    times = [t.T for trades in trades_by_symbol.values() for t in trades]
    if not times:
        raise ValueError("the recorded files hold no trades")
    return MarketTape(trades_by_symbol, venue=config.venue, start_ms=min(times), end_ms=max(times))


def _read_file(feed: FileFeed) -> list[AggTrade]:
    if not feed.path.is_file():
        raise FileNotFoundError(f"aggTrades file {feed.path} (for {feed.symbol}) does not exist")
    return list(read_aggtrades_csv(feed.path, feed.symbol))
