"""The JSON carried on the project's topics: one documented, ``kcat``-readable contract per topic.

``trades`` (key = symbol). Four kinds of value, told apart by ``type`` (a raw aggTrade has ``e`` instead):

* a per-symbol batch, ordered by ``a`` (what ingest publishes: one message = a few ms of one symbol)::

      {"type": "trades", "s": "BTCUSDT",
       "trades": [{"a": 26129, "p": "0.01633102", "q": "4.70443515", "f": 27781, "l": 27781,
                   "T": 1498793709153, "m": true}, ...]}

* a single Binance aggTrade payload exactly as the WebSocket sends it: bare (``{"e": "aggTrade", ...}``, a raw
  ``/ws`` stream) or in the combined-stream envelope (``{"stream": "btcusdt@aggTrade", "data": {"e": "aggTrade",
  ...}}``; the stream's symbol and ``data.s`` must agree), accepted so that anyone can pipe Binance's own frames
  into the topic or inject a trade by hand. Its symbol is the payload's (or the stream's), upper-cased; the
  record's key is not compared (the aggregator applies a record to its key's book, which refuses another
  symbol's trade with a reason);
* an explicit gap that backfill could not repair: ``{"type": "gap", "s": "BTCUSDT", "from_a": 10, "to_a": 19,
  "reason": "..."}`` (ids ``from_a..to_a`` inclusive will never arrive);
* a symbol's lifecycle: ``{"type": "symbol", "s": "BTCUSDT", "event": "removed", "last_a": 26129, "reason":
  "..."}`` (:class:`SymbolEvent`). ``event`` is ``removed`` (the symbol left ingest's wanted set: ``POST
  /symbols`` or the ``exchangeInfo`` refresh) or ``added`` (it joined the set while ingest ran); ``last_a`` is
  the last aggregate id ingest published for the symbol before the event (``null`` if none), ``reason`` says
  why (``POST /symbols``, ``exchangeInfo``). Ingest publishes it in the symbol's order, so a removal comes
  after every trade ingest published for that life of the symbol and an addition before every trade of the
  next. Exactly these five fields (``last_a`` and ``reason`` may be omitted); anything else is rejected.

``klines.finalized`` (key = ``symbol|interval``): :meth:`Kline.to_dict` of a closed kline (``x`` true).
``klines.snapshots`` (key = ``symbol|interval``, compacted): the same for an in-progress kline plus ``seq``,
increasing per key. :func:`decode_kline_record` reads both, quickly for what :func:`encode_kline` writes.
Dead-letter topic (key = the rejected record's key): ``{"service", "reason", "category", "topic", "partition",
"offset", "value"}`` where ``category`` is the reason's kind (:data:`~services.core.models.ReasonCategory`:
``malformed``, ``field``, ``time``, ``symbol``, ``inconsistent``, ``topic``, ``late`` or ``internal``) and
``value`` is the rejected text (or ``base64:`` + bytes when not UTF-8).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from operator import le
from typing import Annotated, Any, Final, NamedTuple

import msgspec

from services.core.intervals import INTERVALS, is_kline_span
from services.core.models import (
    KLINE_SOURCES,
    MAX_ID,
    SYMBOL_PATTERN,
    AggTrade,
    InvalidInput,
    Kline,
    ReasonCategory,
    parse_agg_trade,
)


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


#: What a :class:`SymbolEvent` says happened to its symbol.
SYMBOL_EVENTS: Final = ("added", "removed")
_SYMBOL_EVENT_FIELDS: Final = frozenset({"type", "s", "event", "last_a", "reason"})


@dataclass(frozen=True, slots=True)
class SymbolEvent:
    """A symbol joined (``added``) or left (``removed``) the feed; see the module docstring for the record."""

    symbol: str
    event: str
    last_a: int | None = None
    reason: str = ""

    @property
    def removed(self) -> bool:
        return self.event == "removed"


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


def encode_symbol_event(event: SymbolEvent) -> bytes:
    return json.dumps(
        {"type": "symbol", "s": event.symbol, "event": event.event, "last_a": event.last_a, "reason": event.reason},
        separators=(",", ":"),
    ).encode()


#: A decoded ``trades`` record.
TradesRecord = TradeBatch | Gap | SymbolEvent


def decode_trades_value(raw: bytes | None, key: bytes | None = None) -> TradesRecord:
    """Decode one ``trades`` record; raise :class:`InvalidInput` with the reason for anything unusable.

    A batch with one bad trade is rejected whole: ingest validated every trade before producing, so a bad one
    means the record was not written by ingest and cannot be trusted in part.
    """
    if raw is None:
        raise InvalidInput("empty record (null value)", "malformed")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"not JSON: {exc}", "malformed") from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"expected a JSON object, got {type(obj).__name__}", "malformed")
    kind = obj.get("type")
    if kind == "trades":
        symbol = _symbol(obj, key)
        items = obj.get("trades")
        if not isinstance(items, list) or not items:
            raise InvalidInput("'trades' must be a non-empty list", "field")
        trades = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise InvalidInput(f"trades[{index}] is not an object", "malformed")
            try:
                trades.append(parse_agg_trade(item, symbol))
            except InvalidInput as exc:
                raise InvalidInput(f"trades[{index}]: {exc.reason}", exc.category) from None
        return TradeBatch(symbol, trades)
    if kind == "gap":
        symbol = _symbol(obj, key)
        from_a, to_a = obj.get("from_a"), obj.get("to_a")
        if not isinstance(from_a, int) or not isinstance(to_a, int) or isinstance(from_a, bool) or from_a > to_a:
            raise InvalidInput("gap needs integer from_a <= to_a", "field")
        return Gap(symbol, from_a, to_a, str(obj.get("reason", "")))
    if kind == "symbol":
        return _symbol_event(obj, key)
    if obj.get("e") == "aggTrade":
        trade = parse_agg_trade(obj)
        return TradeBatch(trade.s, [trade])
    if "stream" in obj or "data" in obj:
        trade = _enveloped_trade(obj)
        return TradeBatch(trade.s, [trade])
    raise InvalidInput(
        f"unknown record type {kind!r}: expected 'trades', 'gap', 'symbol', an aggTrade payload or a "
        "combined-stream envelope",
        "malformed",
    )


def _symbol_event(obj: dict[str, Any], key: bytes | None) -> SymbolEvent:
    """A lifecycle record, strictly: it ends a symbol's book, so only exactly what ingest writes is accepted."""
    extra = sorted(set(obj) - _SYMBOL_EVENT_FIELDS)
    if extra:
        raise InvalidInput(f"symbol record: unknown fields {extra[:5]}", "field")
    symbol = _symbol(obj, key)
    event = obj.get("event")
    if event not in SYMBOL_EVENTS:
        raise InvalidInput(f"symbol record: 'event' must be one of {list(SYMBOL_EVENTS)}, got {event!r:.40}", "field")
    last_a = obj.get("last_a")
    if last_a is not None and (type(last_a) is not int or not 0 <= last_a <= MAX_ID):
        raise InvalidInput(f"symbol record: 'last_a' must be null or an id in 0..2**63-1, got {last_a!r:.40}", "field")
    reason = obj.get("reason", "")
    if not isinstance(reason, str):
        raise InvalidInput(f"symbol record: 'reason' must be a string, got {type(reason).__name__}", "field")
    return SymbolEvent(symbol, event, last_a, reason)


#: The stream type of an envelope's ``stream`` (``<symbol>@aggTrade``).
AGG_TRADE_STREAM = "aggTrade"


def _enveloped_trade(obj: dict[str, Any]) -> AggTrade:
    """The aggTrade in a combined-stream envelope ``{"stream": "<symbol>@aggTrade", "data": {...}}``."""
    stream, data = obj.get("stream"), obj.get("data")
    if not isinstance(stream, str):
        raise InvalidInput(
            f"combined-stream envelope: 'stream' must be a string, got {type(stream).__name__}", "malformed"
        )
    if not isinstance(data, dict):
        raise InvalidInput(
            f"combined-stream envelope: 'data' must be an object, got {type(data).__name__}", "malformed"
        )
    name, at, kind = stream.partition("@")
    if not at or kind != AGG_TRADE_STREAM:
        raise InvalidInput(f"combined-stream envelope: stream {stream[:60]!r} is not an aggTrade stream", "malformed")
    if not (name.isascii() and name.isalnum()):
        raise InvalidInput(f"combined-stream envelope: stream {stream[:60]!r} does not name a symbol", "symbol")
    try:
        return parse_agg_trade(data, name.upper())
    except InvalidInput as exc:
        raise InvalidInput(f"data: {exc.reason}", exc.category) from None


def _symbol(obj: dict[str, Any], key: bytes | None) -> str:
    symbol = obj.get("s")
    if not isinstance(symbol, str) or not symbol.isalnum():
        raise InvalidInput(f"'s' must be a symbol, got {symbol!r}", "symbol")
    if key is not None and key.decode(errors="replace") != symbol:
        raise InvalidInput(f"record key {key!r} does not match symbol {symbol!r}", "symbol")
    return symbol


_quote = json.encoder.encode_basestring_ascii  # json.dumps's own (C) string quoting


def encode_kline(kline: Kline, seq: int | None = None) -> bytes:
    """``kline.to_dict()`` (plus ``seq``) as compact JSON, byte for byte what ``json.dumps`` writes, built
    directly: this runs for every finalized kline and every snapshot (a burst closes 10^5 at once), and the
    generic encoder costs several times more. Decimals print as plain digits, which need no quoting."""
    k = kline
    text = (
        f'{{"t":{k.t},"T":{k.T},"s":{_quote(k.s)},"i":{_quote(k.i)},"f":{k.f},"L":{k.L},'
        f'"o":"{k.o:f}","c":"{k.c:f}","h":"{k.h:f}","l":"{k.l:f}","v":"{k.v:f}","n":{k.n},'
        f'"x":{"true" if k.x else "false"},"q":"{k.q:f}","V":"{k.V:f}","Q":"{k.Q:f}",'
        f'"version":{k.version},"source":{_quote(k.source)}'
    )
    return (text + ("}" if seq is None else f',"seq":{seq}}}')).encode()


class DecodedKline(NamedTuple):
    """A decoded ``klines.*`` value: the kline, its ``seq`` (snapshots only) and, when the fast path read it,
    ``text``: ``s i source o h l c v q V Q`` exactly as sent, tab-separated, as verified: a symbol of letters,
    digits and ``_``, a known interval and source, and eight plain decimals that fit ``Decimal(38, 18)`` exactly
    (no sign, exponent or leading zero; at most 20 integer and 18 fraction digits). No field contains a tab, a
    newline or a backslash, so a writer can store this text as it is (``TabSeparated``). ``text`` is ``None``
    when the full path read the value."""

    kline: Kline
    seq: int | None
    text: str | None = None

    @property
    def decimals(self) -> tuple[str, ...] | None:
        """``o h l c v q V Q`` as sent (fast path), else ``None``."""
        return None if self.text is None else tuple(self.text.split("\t")[3:])


def decode_kline(raw: bytes | None) -> tuple[Kline, int | None]:
    """Decode a ``klines.finalized`` / ``klines.snapshots`` value into the kline and its ``seq`` (if any)."""
    record = decode_kline_record(raw)
    return record.kline, record.seq


def decode_kline_record(raw: bytes | None) -> DecodedKline:
    """Decode and validate a ``klines.*`` value; raise :class:`InvalidInput` with the reason for anything unusable.

    Two paths that accept exactly the same values and build the same kline:

    * the **fast path** (about a tenth of the cost) takes ASCII JSON whose fields have the types and ranges of
      the contract and whose symbol, interval, source and decimals are in the canonical form that
      :func:`encode_kline` writes, checked by one compiled pattern; the cross-field rules are
      :meth:`Kline.from_fields`, as for the full path;
    * anything else (bad input, but also valid variants: a lower-case symbol, a decimal sent as a JSON number or
      with more digits than the table keeps) goes through the **full path**, :func:`json.loads` and
      :meth:`Kline.from_dict`, which accepts it or names what is wrong. The fast path never rejects.
    """
    if raw is not None and raw.isascii():  # msgspec skips unknown fields without checking their UTF-8
        try:
            wire = _KLINE_WIRE.decode(raw)
        except msgspec.MsgspecError:
            pass
        else:
            record = _from_wire(wire)
            if record is not None:
                return record
    kline, seq = _decode_kline_fully(raw)
    return DecodedKline(kline, seq)


# msgspec bounds fit an int64; a version or seq above MAX_ID (rare but valid up to UInt64) takes the full path.
_Id = Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)]
_TradeId = Annotated[int, msgspec.Meta(ge=-1, le=MAX_ID)]


class KlineWire(msgspec.Struct, gc=False):
    """A ``klines.*`` value as parsed: the kline contract's field types and ranges (ints exact JSON integers,
    never booleans); unknown fields are ignored, as :meth:`Kline.from_dict` ignores them. Decimals stay text."""

    t: _Id
    T: _Id
    s: str
    i: str
    f: _TradeId
    L: _TradeId
    o: str
    c: str
    h: str
    l: str  # noqa: E741 - Binance's field name
    v: str
    n: _Id
    x: bool
    q: str
    V: str
    Q: str
    version: _Id = 0
    source: str = "live"
    seq: _Id | None = None


_KLINE_WIRE = msgspec.json.Decoder(KlineWire)
_new_record = tuple.__new__  # a third of the cost of calling the NamedTuple (its __new__ is Python code)
# A plain decimal that Decimal(38, 18) holds exactly: at most 20 integer digits without a leading zero, at most
# 18 fraction digits.
_DECIMAL_38_18 = r"(?:0|[1-9][0-9]{0,19})(?:\.[0-9]{1,18})?"
# Symbol, interval, source and the eight decimals, joined by tabs (which none of them may contain).
_CANONICAL = re.compile(
    "\t".join(
        [
            SYMBOL_PATTERN,
            "(?:" + "|".join(sorted(INTERVALS, key=len, reverse=True)) + ")",
            "(?:" + "|".join(sorted(KLINE_SOURCES)) + ")",
            *[_DECIMAL_38_18] * 8,
        ]
    )
)


def _from_wire(w: KlineWire) -> DecodedKline | None:
    """The fast path's kline, or ``None`` to leave the value to the full path (which then decides)."""
    text = "\t".join((w.s, w.i, w.source, w.o, w.h, w.l, w.c, w.v, w.q, w.V, w.Q))
    if _CANONICAL.fullmatch(text) is None:
        return None
    d = Decimal  # eight direct calls: half the cost of map() here
    try:
        kline = Kline.from_fields(
            w.s, w.i, w.t, w.T, w.f, w.L, d(w.o), d(w.h), d(w.l), d(w.c), d(w.v), w.n, w.x, d(w.q), d(w.V), d(w.Q),
            w.version, w.source,
        )  # fmt: skip
    except InvalidInput:
        return None
    return _new_record(DecodedKline, (kline, w.seq, text))


def decode_kline_run(values: Sequence[bytes | None]) -> tuple[list[KlineWire], list[str]] | None:
    """The fast path of :func:`decode_kline_record` for many values at once, or None if any value is not for it.

    Returns each value's fields as parsed (a :class:`KlineWire`: what a writer's row needs of a kline, without
    building the :class:`Kline` and its Decimals) and its verified ``text`` (:attr:`DecodedKline.text`). The
    checks are the fast path's, run column-wise over the run: the same types and ranges (msgspec), the same
    canonical pattern per value, and the rules of :meth:`Kline.from_fields` (``t``/``T`` a span of ``i``,
    ``0 < l <= o,c <= h``, ``V <= v``, ``Q <= q``). Each is a check of one value, so the run passes exactly
    when :func:`decode_kline_record` would take the fast path for every value; on None, decode them one by one.
    """
    if not values:
        return [], []
    if not b"".join([v or b"\xff" for v in values]).isascii():  # None and non-ASCII take the long way
        return None
    decode = _KLINE_WIRE.decode
    try:
        wires = [decode(v) for v in values]  # type: ignore[arg-type]  # None was excluded above
    except msgspec.MsgspecError:
        return None
    texts = ["\t".join((w.s, w.i, w.source, w.o, w.h, w.l, w.c, w.v, w.q, w.V, w.Q)) for w in wires]
    if not all(map(_CANONICAL.fullmatch, texts)):
        return None
    d = Decimal
    lows = list(map(d, [w.l for w in wires]))
    opens = list(map(d, [w.o for w in wires]))
    highs = list(map(d, [w.h for w in wires]))
    closes = list(map(d, [w.c for w in wires]))
    if not (
        all(map(is_kline_span, [w.i for w in wires], [w.t for w in wires], [w.T for w in wires]))
        and all(map(le, lows, opens))
        and all(map(le, opens, highs))
        and all(map(le, lows, closes))
        and all(map(le, closes, highs))
        and min(lows) > 0
        and all(map(le, map(d, [w.V for w in wires]), map(d, [w.v for w in wires])))
        and all(map(le, map(d, [w.Q for w in wires]), map(d, [w.q for w in wires])))
    ):
        return None
    return wires, texts


def _decode_kline_fully(raw: bytes | None) -> tuple[Kline, int | None]:
    if raw is None:
        raise InvalidInput("empty record (null value)", "malformed")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"not JSON: {exc}", "malformed") from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"expected a JSON object, got {type(obj).__name__}", "malformed")
    seq = obj.pop("seq", None)
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 0):
        raise InvalidInput(f"'seq' must be a non-negative integer, got {seq!r}", "field")
    return Kline.from_dict(obj), seq


def dead_letter_value(
    service: str,
    reason: str,
    value: bytes | None,
    *,
    category: ReasonCategory,
    topic: str = "",
    partition: int = -1,
    offset: int = -1,
) -> bytes:
    """A dead-letter record's value (see the module docstring): ``category`` is the reason's kind, one of
    :data:`~services.core.models.REASON_CATEGORIES`, what the services count dead letters by."""
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
            "category": category,
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "value": text,
        },
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
