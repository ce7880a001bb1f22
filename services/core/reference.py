"""The obviously-correct kline computation (test oracle, replay exchange's REST klines) and CSV readers.

:func:`reference_klines` is deliberately naive: Decimal arithmetic in an exact context, sort by ``(T, a)``,
group by open time. It shares nothing with :mod:`services.core.book` except the models and interval calendar,
so the two can check each other.

The readers accept the data.binance.vision layouts: aggTrades CSV with or without header, 7 or 8 columns,
millisecond or microsecond timestamps (spot files use microseconds since 2025-01-01); kline CSV likewise.
"""

from __future__ import annotations

import csv
import decimal
from collections.abc import Iterable
from decimal import Decimal
from itertools import groupby
from pathlib import Path

from services.core.intervals import close_time, iter_opens, open_time, validate_interval
from services.core.models import AggTrade, InvalidInput, Kline, parse_agg_trade

#: Timestamps above this are microseconds (10^14 ms is the year 5138).
_MICROSECONDS_ABOVE = 10**14

# Exact arithmetic: a precision no kline sum can reach, and Inexact trapped so a rounding would raise.
_EXACT = decimal.Context(prec=1_000, traps=[decimal.Inexact, decimal.InvalidOperation, decimal.Overflow])


def reference_klines(trades: Iterable[AggTrade], interval: str, *, fill_empty: bool = True) -> list[Kline]:
    """Closed klines of ``interval`` for ``trades`` (one symbol), oldest first.

    Trades are de-duplicated by aggregate id ``a`` (first occurrence wins), ordered by ``(T, a)`` and grouped
    by the open time of their ``T``. With ``fill_empty``, every interval without trades between the first and
    the last kline is an empty kline (o=h=l=c=previous close, zero volumes, n=0, f=L=-1), as Binance publishes
    while its feed is continuous.
    """
    validate_interval(interval)
    unique: dict[int, AggTrade] = {}
    for trade in trades:
        unique.setdefault(trade.a, trade)
    ordered = sorted(unique.values(), key=lambda tr: (tr.T, tr.a))
    symbols = {tr.s for tr in ordered}
    if len(symbols) > 1:
        raise ValueError(f"reference_klines needs trades of one symbol, got {sorted(symbols)}")
    klines: list[Kline] = []
    with decimal.localcontext(_EXACT):
        for start, group in groupby(ordered, key=lambda tr: open_time(interval, tr.T)):
            bucket = list(group)
            if fill_empty and klines:
                previous = klines[-1]
                for t in iter_opens(interval, previous.T + 1, start - 1):
                    klines.append(Kline.empty(previous.s, interval, t, previous.c))
            klines.append(_kline_of(bucket, interval, start))
    return klines


def _kline_of(bucket: list[AggTrade], interval: str, start: int) -> Kline:
    prices = [Decimal(tr.p) for tr in bucket]
    quantities = [Decimal(tr.q) for tr in bucket]
    quotes = [p * q for p, q in zip(prices, quantities, strict=True)]
    taker_buys = [not tr.m for tr in bucket]
    return Kline(
        s=bucket[0].s,
        i=interval,
        t=start,
        T=close_time(interval, start),
        f=bucket[0].f,
        L=bucket[-1].l,
        o=prices[0],
        h=max(prices),
        l=min(prices),
        c=prices[-1],
        v=sum(quantities, Decimal(0)),
        n=sum(tr.l - tr.f + 1 for tr in bucket),
        x=True,
        q=sum(quotes, Decimal(0)),
        V=sum((q for q, buy in zip(quantities, taker_buys, strict=True) if buy), Decimal(0)),
        Q=sum((pq for pq, buy in zip(quotes, taker_buys, strict=True) if buy), Decimal(0)),
        version=0,
        source="live",
    )


def _milliseconds(value: int) -> int:
    return value // 1000 if value > _MICROSECONDS_ABOVE else value


def _is_header(row: list[str]) -> bool:
    return bool(row) and not row[0].strip().lstrip("-").isdigit()


_BOOLEANS = {"true": True, "false": False}


def read_aggtrades_csv(path: str | Path, symbol: str) -> list[AggTrade]:
    """Trades from a data.binance.vision aggTrades CSV.

    Columns ``agg_trade_id, price, quantity, first_trade_id, last_trade_id, transact_time, is_buyer_maker[,
    is_best_match]``; a header row is optional; timestamps may be in ms or µs (µs are floored to ms). Every
    row is validated like a live payload; a bad row raises :class:`InvalidInput` naming the file and line.
    """
    trades: list[AggTrade] = []
    with open(path, newline="", encoding="utf-8") as handle:
        for line_no, row in enumerate(csv.reader(handle), start=1):
            if not row or (line_no == 1 and _is_header(row)):
                continue
            try:
                if len(row) not in (7, 8):
                    raise InvalidInput(f"expected 7 or 8 columns, got {len(row)}")
                maker = _BOOLEANS.get(row[6].strip().lower())
                if maker is None:
                    raise InvalidInput(f"is_buyer_maker = {row[6]!r} is not true/false")
                payload = {
                    "a": _csv_int(row[0], "agg_trade_id"),
                    "p": row[1].strip(),
                    "q": row[2].strip(),
                    "f": _csv_int(row[3], "first_trade_id"),
                    "l": _csv_int(row[4], "last_trade_id"),
                    "T": _milliseconds(_csv_int(row[5], "transact_time")),
                    "m": maker,
                }
                trades.append(parse_agg_trade(payload, symbol))
            except InvalidInput as exc:
                raise InvalidInput(f"{path}:{line_no}: {exc.reason}") from None
    return trades


AGGTRADES_HEADER = (
    "agg_trade_id",
    "price",
    "quantity",
    "first_trade_id",
    "last_trade_id",
    "transact_time",
    "is_buyer_maker",
)


def write_aggtrades_csv(path: str | Path, trades: Iterable[AggTrade]) -> int:
    """Write ``trades`` in the data.binance.vision aggTrades layout (header row, ms times) that
    :func:`read_aggtrades_csv` reads back exactly; the number of rows written."""
    rows = 0
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(AGGTRADES_HEADER)
        for t in trades:
            writer.writerow((t.a, t.p, t.q, t.f, t.l, t.T, "true" if t.m else "false"))
            rows += 1
    return rows


def _csv_int(text: str, column: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise InvalidInput(f"{column} = {text!r} is not an integer") from None


def read_klines_csv(path: str | Path, symbol: str, interval: str) -> list[Kline]:
    """Klines from a data.binance.vision kline CSV (header optional; ms or µs times).

    The CSV has no first/last trade ids: ``f`` and ``L`` are set to -1. ``T`` is recomputed from ``t`` after
    checking it agrees with the file's ``close_time``.
    """
    validate_interval(interval)
    klines: list[Kline] = []
    with open(path, newline="", encoding="utf-8") as handle:
        for line_no, row in enumerate(csv.reader(handle), start=1):
            if not row or (line_no == 1 and _is_header(row)):
                continue
            try:
                if len(row) < 11:
                    raise InvalidInput(f"expected at least 11 columns, got {len(row)}")
                t = _milliseconds(_csv_int(row[0], "open_time"))
                closing = _milliseconds(_csv_int(row[6], "close_time"))
                if closing != close_time(interval, t):
                    raise InvalidInput(f"close_time {closing} does not close the {interval} kline at {t}")
                payload = {
                    "s": symbol,
                    "i": interval,
                    "t": t,
                    "T": closing,
                    "f": -1,
                    "L": -1,
                    "o": row[1].strip(),
                    "h": row[2].strip(),
                    "l": row[3].strip(),
                    "c": row[4].strip(),
                    "v": row[5].strip(),
                    "q": row[7].strip(),
                    "n": _csv_int(row[8], "count"),
                    "V": row[9].strip(),
                    "Q": row[10].strip(),
                    "x": True,
                }
                klines.append(Kline.from_dict(payload))
            except InvalidInput as exc:
                raise InvalidInput(f"{path}:{line_no}: {exc.reason}") from None
    return klines
