"""The JSON carried on the project's topics: one documented, ``kcat``-readable contract per topic.

``trades`` (key = symbol). Three kinds of value, told apart by ``type`` (a raw aggTrade has ``e`` instead):

* a per-symbol batch, ordered by ``a`` (what ingest publishes: one message = a few ms of one symbol)::

      {"type": "trades", "s": "BTCUSDT",
       "trades": [{"a": 26129, "p": "0.01633102", "q": "4.70443515", "f": 27781, "l": 27781,
                   "T": 1498793709153, "m": true}, ...]}

* a single Binance aggTrade payload exactly as the WebSocket sends it (``{"e": "aggTrade", ...}``), accepted so
  that anyone can inject a trade by hand;
* an explicit gap that backfill could not repair: ``{"type": "gap", "s": "BTCUSDT", "from_a": 10, "to_a": 19,
  "reason": "..."}`` (ids ``from_a..to_a`` inclusive will never arrive).

``klines.finalized`` (key = ``symbol|interval``): :meth:`Kline.to_dict` of a closed kline (``x`` true).
``klines.snapshots`` (key = ``symbol|interval``, compacted): the same for an in-progress kline plus ``seq``,
increasing per key.
Dead-letter topic (key = the rejected record's key): ``{"service", "reason", "topic", "partition", "offset",
"value"}`` where ``value`` is the rejected text (or ``base64:`` + bytes when not UTF-8).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.core.models import AggTrade, InvalidInput, Kline, parse_agg_trade


@dataclass(frozen=True, slots=True)
class TradeBatch:
    symbol: str
    trades: list[AggTrade]


@dataclass(frozen=True, slots=True)
class Gap:
    symbol: str
    from_a: int
    to_a: int
    reason: str


def kline_key(symbol: str, interval: str) -> bytes:
    return f"{symbol}|{interval}".encode()


def encode_trade_batch(symbol: str, trades: Sequence[AggTrade]) -> bytes:
    body = ",".join(
        f'{{"a":{t.a},"p":"{t.p}","q":"{t.q}","f":{t.f},"l":{t.l},"T":{t.T},"m":{"true" if t.m else "false"}}}'
        for t in trades
    )
    return f'{{"type":"trades","s":"{symbol}","trades":[{body}]}}'.encode()


def encode_gap(gap: Gap) -> bytes:
    return json.dumps(
        {"type": "gap", "s": gap.symbol, "from_a": gap.from_a, "to_a": gap.to_a, "reason": gap.reason},
        separators=(",", ":"),
    ).encode()


def decode_trades_value(raw: bytes | None, key: bytes | None = None) -> TradeBatch | Gap:
    """Decode one ``trades`` record; raise :class:`InvalidInput` with the reason for anything unusable.

    A batch with one bad trade is rejected whole: ingest validated every trade before producing, so a bad one
    means the record was not written by ingest and cannot be trusted in part.
    """
    if raw is None:
        raise InvalidInput("empty record (null value)")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    if kind == "trades":
        symbol = _symbol(obj, key)
        items = obj.get("trades")
        if not isinstance(items, list) or not items:
            raise InvalidInput("'trades' must be a non-empty list")
        trades = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise InvalidInput(f"trades[{index}] is not an object")
            try:
                trades.append(parse_agg_trade(item, symbol))
            except InvalidInput as exc:
                raise InvalidInput(f"trades[{index}]: {exc.reason}") from None
        return TradeBatch(symbol, trades)
    if kind == "gap":
        symbol = _symbol(obj, key)
        from_a, to_a = obj.get("from_a"), obj.get("to_a")
        if not isinstance(from_a, int) or not isinstance(to_a, int) or isinstance(from_a, bool) or from_a > to_a:
            raise InvalidInput("gap needs integer from_a <= to_a")
        return Gap(symbol, from_a, to_a, str(obj.get("reason", "")))
    if obj.get("e") == "aggTrade":
        trade = parse_agg_trade(obj)
        return TradeBatch(trade.s, [trade])
    raise InvalidInput(f"unknown record type {kind!r}: expected 'trades', 'gap' or an aggTrade payload")


def _symbol(obj: dict[str, Any], key: bytes | None) -> str:
    symbol = obj.get("s")
    if not isinstance(symbol, str) or not symbol.isalnum():
        raise InvalidInput(f"'s' must be a symbol, got {symbol!r}")
    if key is not None and key.decode(errors="replace") != symbol:
        raise InvalidInput(f"record key {key!r} does not match symbol {symbol!r}")
    return symbol


def encode_kline(kline: Kline, seq: int | None = None) -> bytes:
    payload = kline.to_dict()
    if seq is not None:
        payload["seq"] = seq
    return json.dumps(payload, separators=(",", ":")).encode()


def decode_kline(raw: bytes | None) -> tuple[Kline, int | None]:
    """Decode a ``klines.finalized`` / ``klines.snapshots`` value into the kline and its ``seq`` (if any)."""
    if raw is None:
        raise InvalidInput("empty record (null value)")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"expected a JSON object, got {type(obj).__name__}")
    seq = obj.pop("seq", None)
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 0):
        raise InvalidInput(f"'seq' must be a non-negative integer, got {seq!r}")
    return Kline.from_dict(obj), seq


def dead_letter_value(
    service: str, reason: str, value: bytes | None, *, topic: str = "", partition: int = -1, offset: int = -1
) -> bytes:
    if value is None:
        text = None
    else:
        try:
            text = value.decode()
        except UnicodeDecodeError:
            text = "base64:" + base64.b64encode(value).decode()
    return json.dumps(
        {
            "service": service,
            "reason": reason,
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "value": text,
        },
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
