"""A deterministic synthetic market: realistic-looking aggTrades for any symbol, reproducible from a seed.

Per symbol, independently (so adding a symbol never changes another one's trades), from
``random.Random(f"{seed}:{symbol}")``:

* every whole minute gets a regime: **quiet** (no trade at all: Binance then publishes an empty kline), slow,
  normal or busy. At least one minute in every ten is quiet, so empty klines always occur;
* taker orders arrive as a Poisson process at the regime's rate, plus **bursts** (dozens of orders within a
  few milliseconds: many trades share one millisecond, so ordering by ``(T, a)`` matters);
* an order either fills at one price (one aggTrade) or **sweeps** several price levels (several aggTrades with
  the same ``T``, consecutive ids, prices walking in the taker's direction);
* the price is a random walk on the symbol's tick grid (never below one tick), quantities are multiples of the
  lot size; both are exact decimal strings (spot: 8 decimals like Binance spot, USD-M: the tick's decimals);
* ``a`` is contiguous; each aggTrade covers 1..n raw trades and ``f``/``l`` are contiguous across aggTrades.

A market of many symbols can instead be given **Zipf activity** (:class:`ZipfActivity`, what a whole exchange looks
like: a few symbols carry most trades, a long tail trades now and then): the symbol at rank ``k`` of the list
(the first is rank 1) trades ``1 / k**exponent`` as often as the first. Only the rate changes; everything else
is drawn exactly as above, so without the option every trade is the same as before.

Everything here is pure: no clock, no I/O.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from services.core.models import AggTrade

MINUTE_MS = 60_000
QUOTE_ASSETS = ("FDUSD", "USDT", "USDC", "TUSD", "BUSD", "BTC", "ETH", "BNB", "EUR", "TRY", "BRL", "JPY")


@dataclass(frozen=True)
class SymbolProfile:
    """What a symbol trades like: start price, tick and lot size, activity."""

    symbol: str
    base_asset: str
    quote_asset: str
    price: Decimal
    tick: Decimal
    lot: Decimal
    orders_per_s: float
    typical_qty: Decimal


_KNOWN: dict[str, tuple[str, str, str, float, str]] = {
    # symbol: (price, tick, lot, taker orders per second in a normal minute, typical quantity)
    "BTCUSDT": ("87650.00", "0.01", "0.00001", 12.0, "0.004"),
    "ETHUSDT": ("2970.00", "0.01", "0.0001", 9.0, "0.08"),
    "BNBUSDT": ("860.00", "0.01", "0.001", 3.0, "0.3"),
    "SOLUSDT": ("125.00", "0.01", "0.001", 6.0, "2"),
    "XRPUSDT": ("1.8500", "0.0001", "0.1", 5.0, "250"),
    "DOGEUSDT": ("0.12000", "0.00001", "1", 4.0, "2000"),
    "TRXUSDT": ("0.28000", "0.00001", "1", 2.0, "800"),
}


def split_symbol(symbol: str) -> tuple[str, str]:
    """``"BTCUSDT"`` → ``("BTC", "USDT")``, by the longest known quote-asset suffix (else the last 4 letters)."""
    for quote in sorted(QUOTE_ASSETS, key=len, reverse=True):
        if symbol.endswith(quote) and len(symbol) > len(quote):
            return symbol[: -len(quote)], quote
    return symbol[:-4] or symbol, symbol[-4:]


def profile_for(symbol: str) -> SymbolProfile:
    """The trading profile of ``symbol``: a built-in one for majors, else one derived from the name's hash."""
    base, quote = split_symbol(symbol)
    known = _KNOWN.get(symbol)
    if known is not None:
        price_text, tick_text, lot_text, rate, qty_text = known
        return SymbolProfile(
            symbol,
            base,
            quote,
            Decimal(price_text),
            Decimal(tick_text),
            Decimal(lot_text),
            rate,
            Decimal(qty_text),
        )
    rng = random.Random(f"profile:{symbol}")
    magnitude = rng.randint(-3, 4)  # prices from 0.001.. to 10000..
    price = Decimal(rng.randint(1000, 9999)).scaleb(magnitude - 3)
    tick = Decimal(1).scaleb(max(-8, min(0, magnitude - 5)))
    lot = Decimal(1).scaleb(max(-8, min(0, -(magnitude + 1))))
    notional = Decimal(rng.choice((50, 200, 1000)))
    qty = max(lot, (notional / price).quantize(lot))
    return SymbolProfile(symbol, base, quote, price.quantize(tick), tick, lot, rng.uniform(1.0, 6.0), qty)


@dataclass(frozen=True)
class ZipfActivity:
    """Taker orders per second (in a normal minute) by rank: ``top_orders_per_s / k**exponent`` at rank ``k``.

    With 2,000 symbols and the defaults the first symbol trades like BTCUSDT (about 20 orders/s), the 100th
    once every 5 s and the last about once every 100 s (so some of its minutes are empty); the whole market
    is about 160 orders (about 190 aggTrades) per market second.
    """

    exponent: float = 1.0
    top_orders_per_s: float = 20.0

    def __post_init__(self) -> None:
        if not self.exponent > 0 or not self.top_orders_per_s > 0:
            raise ValueError(f"Zipf exponent and top rate must be > 0, got {self.exponent}, {self.top_orders_per_s}")

    def orders_per_s(self, rank: int) -> float:
        """The rate of the symbol at ``rank`` (1 = the most active)."""
        return self.top_orders_per_s / math.pow(rank, self.exponent)


def _decimals(step: Decimal) -> int:
    exponent = step.normalize().as_tuple().exponent
    assert isinstance(exponent, int)
    return max(0, -exponent)


def _formatter(decimals: int, shown: int) -> tuple[int, int]:
    """(multiplier, places): an integer count of steps with ``decimals`` places, printed with ``shown`` places."""
    return 10 ** (shown - decimals), shown


def _fmt(units: int, multiplier: int, places: int) -> str:
    """Integer ``units`` of 10**-places (after scaling) as a plain decimal string, without float."""
    digits = str(units * multiplier)
    if places == 0:
        return digits
    digits = digits.rjust(places + 1, "0")
    return f"{digits[:-places]}.{digits[-places:]}"


_REGIMES = (  # (cumulative probability, rate multiplier)
    (0.05, 0.0),  # quiet minute (besides the forced one per ten minutes)
    (0.30, 0.2),  # slow: gaps of seconds
    (0.85, 1.0),
    (1.00, 3.0),  # busy
)


class _TradeMaker:
    """Builds one symbol's aggTrades: a price random walk on its tick grid, log-normal sizes on its lot grid,
    contiguous ``a`` and ``f``/``l``; both generators below drive it with their own order times."""

    def __init__(self, symbol: str, rng: random.Random, venue: str) -> None:
        profile = self.profile = profile_for(symbol)
        self.symbol = symbol
        self.rng = rng
        tick_places, lot_places = _decimals(profile.tick), _decimals(profile.lot)
        self.price_fmt = _formatter(tick_places, 8 if venue == "spot" else tick_places)
        self.qty_fmt = _formatter(lot_places, 8 if venue == "spot" else lot_places)
        self.price_ticks = max(1, int(profile.price * 10**tick_places * Decimal(rng.uniform(0.97, 1.03))))
        self.typical_lots = max(1, int(profile.typical_qty * 10**lot_places))
        self.agg_id = rng.randrange(10**8, 4 * 10**9)
        self.trade_id = rng.randrange(10**8, 6 * 10**9)
        self.trades: list[AggTrade] = []

    def fill(self, t_ms: int, ticks: int, lots: int, buyer_maker: bool) -> None:
        raw = 1
        while raw < 20 and self.rng.random() < 0.35:
            raw += 1
        self.trades.append(
            AggTrade(
                self.symbol,
                self.agg_id,
                _fmt(ticks, *self.price_fmt),
                _fmt(lots, *self.qty_fmt),
                self.trade_id,
                self.trade_id + raw - 1,
                t_ms,
                buyer_maker,
            )
        )
        self.agg_id += 1
        self.trade_id += raw

    def order(self, t_ms: int, sigma: float) -> None:
        """One taker order at ``t_ms``: one aggTrade, or a sweep of 2-5 price levels with the same ``T``."""
        rng = self.rng
        self.price_ticks = max(1, self.price_ticks + round(rng.gauss(0.0, sigma)))
        taker_sells = rng.random() < 0.5
        levels = 1 if rng.random() < 0.85 else rng.randint(2, 5)
        for level in range(levels):
            if level:  # a sweep takes the next price level in the taker's direction
                self.price_ticks = max(1, self.price_ticks - 1 if taker_sells else self.price_ticks + 1)
            lots = max(1, int(self.typical_lots * math.exp(rng.gauss(0.0, 1.0))))  # log-normal sizes
            self.fill(t_ms, self.price_ticks, lots, taker_sells)


def generate_trades(
    symbol: str,
    *,
    seed: int,
    start_ms: int,
    end_ms: int,
    venue: str = "spot",
    orders_per_s: float | None = None,
) -> list[AggTrade]:
    """All aggTrades of ``symbol`` with ``start_ms <= T < end_ms``, ordered by ``a`` (and so by ``T``).

    ``orders_per_s`` replaces the profile's taker orders per second in a normal minute (a Zipf rank's rate).
    """
    if end_ms <= start_ms:
        return []
    rng = random.Random(f"{seed}:{symbol}")
    maker = _TradeMaker(symbol, rng, venue)
    base_rate = maker.profile.orders_per_s if orders_per_s is None else orders_per_s
    forced_quiet = rng.randrange(10)  # one whole quiet minute in every ten, at a per-symbol position
    minute = start_ms - start_ms % MINUTE_MS
    while minute < end_ms:
        window_start, window_end = max(minute, start_ms), min(minute + MINUTE_MS, end_ms)
        minute_index = minute // MINUTE_MS
        draw = rng.random()
        multiplier = next(m for p, m in _REGIMES if draw <= p)
        if minute_index % 10 == forced_quiet:
            multiplier = 0.0
        minute += MINUTE_MS
        if multiplier == 0.0:
            continue
        rate_per_ms = base_rate * multiplier / 1000.0
        expected_orders = max(1.0, rate_per_ms * MINUTE_MS)
        # ~0.04% price move per minute whatever the activity: spread it over the expected orders.
        sigma = max(0.3, maker.price_ticks * 0.0004 / math.sqrt(expected_orders))
        events: list[int] = []
        t = float(window_start)
        while True:
            t += rng.expovariate(rate_per_ms)
            if t >= window_end:
                break
            events.append(int(t))
            if rng.random() < 0.01:  # a burst: many orders within a few milliseconds
                span = rng.randint(0, 40)
                base = int(t)
                events.extend(min(window_end - 1, base + rng.randint(0, span)) for _ in range(rng.randint(5, 60)))
        events.sort()
        for t_ms in events:
            maker.order(t_ms, sigma)
    return maker.trades


DAY_MS = 86_400_000


def _boundaries(start_ms: int, end_ms: int) -> list[tuple[int, str]]:
    """Every UTC day start in ``(start_ms, end_ms)``, tagged ``month``, ``week`` (a Monday) or ``day``."""
    out = []
    day = start_ms - start_ms % DAY_MS + DAY_MS
    while day < end_ms:
        when = datetime.fromtimestamp(day / 1000, tz=UTC)
        out.append((day, "month" if when.day == 1 else "week" if when.weekday() == 0 else "day"))
        day += DAY_MS
    return out


def generate_sparse_trades(
    symbol: str, *, seed: int, start_ms: int, end_ms: int, venue: str = "spot"
) -> list[AggTrade]:
    """A sparse market for ``symbol`` over weeks: what stresses the closing of klines, not the trade rate.

    Short active stretches (1-12 minutes of slow trading) alternate with quiet stretches of minutes, hours
    (at least one longer than an hour in every few stretches) and up to a day and a half, so closing one
    trade can close thousands of empty klines at once. Around every week start (Monday 00:00 UTC) and month
    start, and around about half of the other midnights, a dense burst: dozens of orders in the last and first
    few milliseconds, with millisecond ties exactly at ``boundary - 1`` and ``boundary``, so the ordering by
    ``(T, a)`` and the kline a trade belongs to are tested where 1d, 1w and 1M klines meet. Deterministic per
    ``(seed, symbol)``, like :func:`generate_trades`.
    """
    if end_ms <= start_ms:
        return []
    rng = random.Random(f"sparse:{seed}:{symbol}")
    maker = _TradeMaker(symbol, rng, venue)
    sigma = max(0.3, maker.price_ticks * 0.0005)
    events: list[int] = []
    t = start_ms + rng.randrange(MINUTE_MS)
    stretch = 0
    while t < end_ms:
        active_end = min(end_ms, t + rng.randint(1, 12) * MINUTE_MS)
        while t < active_end:
            events.append(t)
            t += int(rng.expovariate(1 / 8_000)) + 1  # an order every ~8 s
        stretch += 1
        draw = rng.random()
        if stretch % 4 == 0 or draw < 0.25:
            quiet = rng.randint(61, 360) * MINUTE_MS  # more than an hour
        elif draw < 0.3:
            quiet = rng.randint(6, 36) * 60 * MINUTE_MS
        else:
            quiet = rng.randint(2, 45) * MINUTE_MS
        t = active_end + quiet
    for boundary, kind in _boundaries(start_ms, end_ms):
        if kind == "day" and rng.random() < 0.5:
            continue
        for _ in range(rng.randint(20, 60)):
            events.append(boundary + rng.randint(-40, 40))
        events.extend([boundary - 1] * rng.randint(2, 6) + [boundary] * rng.randint(2, 6))
    events = sorted(e for e in events if start_ms <= e < end_ms)
    for t_ms in events:
        maker.order(t_ms, sigma)
    return maker.trades


def generate_market(
    symbols: tuple[str, ...] | list[str],
    *,
    seed: int,
    start_ms: int,
    end_ms: int,
    venue: str = "spot",
    zipf: ZipfActivity | None = None,
) -> dict[str, list[AggTrade]]:
    """:func:`generate_trades` for each symbol; with ``zipf``, each at the rate of its rank in ``symbols``."""
    if zipf is None:
        return {s: generate_trades(s, seed=seed, start_ms=start_ms, end_ms=end_ms, venue=venue) for s in symbols}
    return {
        s: generate_trades(
            s, seed=seed, start_ms=start_ms, end_ms=end_ms, venue=venue, orders_per_s=zipf.orders_per_s(rank)
        )
        for rank, s in enumerate(symbols, start=1)
    }
