"""Trade and kline models, and the validating parser for Binance aggTrade payloads.

Prices and quantities stay decimal strings exactly as Binance sent them (:class:`AggTrade`) and become
:class:`~decimal.Decimal` in a :class:`Kline`; nothing here goes through binary float.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, Literal, get_args

from services.core.intervals import close_time, is_kline_span, open_time, validate_interval

#: Accepted trade timestamps: 2010-01-01 .. 2100-01-01 UTC, in milliseconds.
MIN_TIME_MS: Final = 1_262_304_000_000
MAX_TIME_MS: Final = 4_102_444_800_000
#: Trade ids are non-negative and fit a signed 64-bit integer (ClickHouse Int64/UInt64, Kafka tools).
MAX_ID: Final = 2**63 - 1
#: More fractional digits than Binance ever sends (8), but a hard bound on what the core has to carry.
MAX_DECIMALS: Final = 18
MAX_INTEGER_DIGITS: Final = 24

KLINE_SOURCES: Final = frozenset({"live", "repaired", "empty", "closed"})

# A plain non-negative decimal: digits, optionally a point and more digits. No sign, exponent, NaN or Inf.
_PLAIN_DECIMAL = re.compile(rf"([0-9]{{1,{MAX_INTEGER_DIGITS}}})(?:\.([0-9]{{1,{MAX_DECIMALS}}}))?")
# Kline decimals may carry more digits than a trade (quote volume = sum of p*q, up to twice the decimals).
_KLINE_DECIMAL = re.compile(r"[0-9]{1,60}(?:\.[0-9]{1,60})?")
#: A symbol as stored: upper-case letters, digits and '_', at most 40.
SYMBOL_PATTERN: Final = r"[A-Z0-9][A-Z0-9_]{0,39}"
_SYMBOL = re.compile(SYMBOL_PATTERN)


#: The kind of a rejection: a small, fixed vocabulary next to the free-text reason, small enough to be a Prometheus
#: label (``dead_letters_by_reason{reason=...}``) and carried by each dead letter as its ``category``.
#:
#: * ``malformed``: not the contract's shape: no value, not JSON, not a JSON object, an unknown record kind or
#:   event, a combined-stream envelope whose ``stream`` or ``data`` is not what it must be;
#: * ``field``: a field missing, of the wrong type, or outside its range or format (ids, decimals, booleans, the
#:   interval, ``source``, ``version``, ``seq``; a value the ClickHouse column cannot hold exactly);
#: * ``time``: a trade time outside the accepted window (:data:`MIN_TIME_MS` .. :data:`MAX_TIME_MS`; a feed
#:   sending microseconds lands here), or, where the market's "now" is known (the aggregator's wall clock,
#:   ingest's estimate of the exchange's clock), further than the accepted skew past it or older than the
#:   trades topic's retention;
#: * ``symbol``: no usable symbol: a record without a key or with a key that is not one, a symbol that is not a
#:   symbol, a payload's symbol that disagrees with its key or stream, a symbol ingest is not subscribed to, a
#:   symbol off the aggregator's allow-list (``aggregator.symbols``), a trade handed to another symbol's book;
#: * ``inconsistent``: each field valid, but they contradict each other: ``f > l``, a kline's ``t``/``T`` not a
#:   span of its interval, prices not ``0 < l <= o,c <= h``, taker-buy volume above the total;
#: * ``topic``: a valid record that does not belong on its topic: an open kline on ``klines.finalized``, a
#:   snapshot without ``seq``;
#: * ``late``: a trade older than the book's repair horizon (its klines can no longer be corrected exactly);
#: * ``internal``: a guard against a bug fired (the book or the frame classifier raised where it should not);
#:   the record itself may be fine.
ReasonCategory = Literal["malformed", "field", "time", "symbol", "inconsistent", "topic", "late", "internal"]
REASON_CATEGORIES: Final[tuple[ReasonCategory, ...]] = get_args(ReasonCategory)


class InvalidInput(ValueError):
    """Input that must be rejected (dead-lettered), with a specific human-readable ``reason`` and its ``category``
    (:data:`ReasonCategory`).

    Every raise site on a dead-letter path names the category (a unit test holds that). The default is for the
    two readers whose rejections never become dead letters, the gateway's kline reader and the reference-file
    loader, which report only the reason; most of what they reject is a bad field.
    """

    def __init__(self, reason: str, category: ReasonCategory = "field") -> None:
        super().__init__(reason)
        self.reason = reason
        self.category: ReasonCategory = category


@dataclass(frozen=True, slots=True)
class AggTrade:
    """One Binance aggregate trade. ``p`` and ``q`` are the decimal strings exactly as Binance sent them.

    ``a`` aggregate trade id (contiguous per symbol), ``f``/``l`` first/last trade id, ``T`` trade time (ms),
    ``m`` true when the buyer was the maker (so the taker sold).
    """

    s: str
    a: int
    p: str
    q: str
    f: int
    l: int  # noqa: E741 - Binance's field name
    T: int
    m: bool


def _type_name(value: object) -> str:
    return type(value).__name__


def _require_int(
    obj: Mapping[str, Any], key: str, low: int, high: int, what: str, outside: ReasonCategory = "field"
) -> int:
    if key not in obj:
        raise InvalidInput(f"missing field {key!r} ({what})", "field")
    value = obj[key]
    if type(value) is not int:  # bool is an int subclass; reject it too
        raise InvalidInput(f"field {key!r} ({what}) must be an integer, got {_type_name(value)}", "field")
    if not low <= value <= high:
        raise InvalidInput(f"field {key!r} ({what}) = {value} is outside [{low}, {high}]", outside)
    return value


def check_positive_decimal(value: object, key: str, what: str) -> str:
    """Return ``value`` if it is a plain decimal string > 0, else raise :class:`InvalidInput`."""
    if type(value) is not str:
        raise InvalidInput(f"field {key!r} ({what}) must be a decimal string, got {_type_name(value)}", "field")
    match = _PLAIN_DECIMAL.fullmatch(value)
    if match is None:
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise InvalidInput(
            f"field {key!r} ({what}) = {shown!r} is not a plain decimal "
            f"(digits with an optional point, at most {MAX_DECIMALS} decimals; no sign, exponent, NaN or Inf)",
            "field",
        )
    if match.group(1).strip("0") == "" and (match.group(2) is None or match.group(2).strip("0") == ""):
        raise InvalidInput(f"field {key!r} ({what}) = {value!r} must be greater than zero", "field")
    return value


def _require_symbol(value: object, where: str) -> str:
    if type(value) is not str:
        raise InvalidInput(f"{where} must be a string, got {_type_name(value)}", "symbol")
    symbol = value.upper()
    if _SYMBOL.fullmatch(symbol) is None:
        raise InvalidInput(f"{where} = {value[:50]!r} is not a symbol (letters, digits, '_'; at most 40)", "symbol")
    return symbol


def parse_agg_trade(obj: Mapping[str, Any], symbol: str | None = None) -> AggTrade:
    """Validate a Binance aggTrade payload (``e E s a p q f l T m M``) and return an :class:`AggTrade`.

    ``symbol`` may be supplied separately (e.g. from the stream name); when the payload also carries ``s`` the
    two must agree (case-insensitively; symbols are returned upper-case). Unknown fields are ignored. Every
    rejection raises :class:`InvalidInput` whose ``reason`` names the field and what was wrong with it.
    """
    if not isinstance(obj, Mapping):
        raise InvalidInput(f"aggTrade payload must be a JSON object, got {_type_name(obj)}", "malformed")
    if "e" in obj and obj["e"] != "aggTrade":
        raise InvalidInput(f"field 'e' (event type) = {str(obj['e'])[:40]!r}, expected 'aggTrade'", "malformed")
    if "s" in obj:
        s = _require_symbol(obj["s"], "field 's' (symbol)")
        if symbol is not None and _require_symbol(symbol, "supplied symbol") != s:
            raise InvalidInput(f"field 's' (symbol) = {s!r} does not match the stream's symbol {symbol!r}", "symbol")
    elif symbol is not None:
        s = _require_symbol(symbol, "supplied symbol")
    else:
        raise InvalidInput("missing field 's' (symbol) and no symbol supplied", "symbol")
    a = _require_int(obj, "a", 0, MAX_ID, "aggregate trade id")
    f = _require_int(obj, "f", 0, MAX_ID, "first trade id")
    last = _require_int(obj, "l", 0, MAX_ID, "last trade id")
    if f > last:
        raise InvalidInput(f"first trade id f = {f} is greater than last trade id l = {last}", "inconsistent")
    t = _require_int(obj, "T", MIN_TIME_MS, MAX_TIME_MS, "trade time in ms, years 2010..2100", "time")
    if "p" not in obj:
        raise InvalidInput("missing field 'p' (price)", "field")
    p = check_positive_decimal(obj["p"], "p", "price")
    if "q" not in obj:
        raise InvalidInput("missing field 'q' (quantity)", "field")
    q = check_positive_decimal(obj["q"], "q", "quantity")
    if "m" not in obj:
        raise InvalidInput("missing field 'm' (buyer is maker)", "field")
    m = obj["m"]
    if type(m) is not bool:
        raise InvalidInput(f"field 'm' (buyer is maker) must be true or false, got {_type_name(m)}", "field")
    if "E" in obj and type(obj["E"]) is not int:
        raise InvalidInput(f"field 'E' (event time) must be an integer, got {_type_name(obj['E'])}", "field")
    if "M" in obj and type(obj["M"]) is not bool:
        raise InvalidInput(f"field 'M' (best match) must be true or false, got {_type_name(obj['M'])}", "field")
    return AggTrade(s, a, p, q, f, last, t, m)


# --------------------------------------------------------------------------------------------------- klines

_ZERO = Decimal(0)
_DECIMAL_FIELDS: Final = ("o", "h", "l", "c", "v", "q", "V", "Q")
_INT_FIELDS: Final = ("t", "T", "f", "L", "n")
#: The fields Binance publishes for a kline; ``version`` and ``source`` are ours.
BINANCE_FIELDS: Final = ("s", "i", "t", "T", "f", "L", "o", "h", "l", "c", "v", "n", "x", "q", "V", "Q")


def plain(value: Decimal) -> str:
    """A decimal as a plain string without exponent (``Decimal('1E+3')`` -> ``'1000'``)."""
    return format(value, "f")


@dataclass(slots=True)
class Kline:
    """A Binance kline (candlestick) plus ``version`` (corrections count up) and ``source``.

    ``source`` is ``"live"`` (built from the live stream), ``"empty"`` (an interval without trades while the
    feed was provably continuous: o=h=l=c=previous close, zero volumes, n=0, f=L=-1), ``"repaired"`` (a
    correction after a late trade, or a kline first built from late trades) or ``"closed"`` (finalized as it
    stood before its interval ended, because its symbol left the feed: :meth:`KlineBook.close
    <services.core.book.KlineBook.close>`).
    """

    s: str
    i: str
    t: int
    T: int
    f: int
    L: int
    o: Decimal
    h: Decimal
    l: Decimal  # noqa: E741 - Binance's field name
    c: Decimal
    v: Decimal
    n: int
    x: bool
    q: Decimal
    V: Decimal
    Q: Decimal
    version: int = 0
    source: str = "live"

    @classmethod
    def empty(cls, symbol: str, interval: str, open_ms: int, previous_close: Decimal, *, version: int = 0) -> Kline:
        """The kline Binance publishes for an interval without trades."""
        return cls(
            symbol,
            interval,
            open_ms,
            close_time(interval, open_ms),
            -1,
            -1,
            previous_close,
            previous_close,
            previous_close,
            previous_close,
            _ZERO,
            0,
            True,
            _ZERO,
            _ZERO,
            _ZERO,
            version,
            "empty",
        )

    @property
    def key(self) -> str:
        """Kafka / compaction key: ``symbol|interval``."""
        return f"{self.s}|{self.i}"

    def to_dict(self) -> dict[str, Any]:
        """Binance kline payload keys (decimals as plain strings) plus ``version`` and ``source``."""
        return {
            "t": self.t,
            "T": self.T,
            "s": self.s,
            "i": self.i,
            "f": self.f,
            "L": self.L,
            "o": plain(self.o),
            "c": plain(self.c),
            "h": plain(self.h),
            "l": plain(self.l),
            "v": plain(self.v),
            "n": self.n,
            "x": self.x,
            "q": plain(self.q),
            "V": plain(self.V),
            "Q": plain(self.Q),
            "version": self.version,
            "source": self.source,
        }

    def to_rest_row(self) -> list[Any]:
        """Binance REST kline row ``[t, o, h, l, c, v, T, q, n, V, Q, "0"]``."""
        return [
            self.t,
            plain(self.o),
            plain(self.h),
            plain(self.l),
            plain(self.c),
            plain(self.v),
            self.T,
            plain(self.q),
            self.n,
            plain(self.V),
            plain(self.Q),
            "0",
        ]

    def differences(self, other: Kline) -> list[str]:
        """Names of the Binance fields whose values differ (decimals compared numerically)."""
        return [name for name in BINANCE_FIELDS if getattr(self, name) != getattr(other, name)]

    def same_values(self, other: Kline) -> bool:
        """True when every Binance field is equal (decimals numerically); version and source are ignored."""
        return not self.differences(other)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Kline:
        """Inverse of :meth:`to_dict`; raises :class:`InvalidInput` on anything malformed or inconsistent."""
        if not isinstance(d, Mapping):
            raise InvalidInput(f"kline must be a JSON object, got {_type_name(d)}", "malformed")
        if "s" not in d:
            raise InvalidInput("missing field 's' (symbol)", "symbol")
        s = _require_symbol(d["s"], "field 's' (symbol)")
        i = d.get("i")
        if type(i) is not str:
            raise InvalidInput(f"field 'i' (interval) must be a string, got {_type_name(i)}", "field")
        try:
            validate_interval(i)
        except ValueError as exc:
            raise InvalidInput(f"field 'i' (interval): {exc}", "field") from None
        ints = {}
        for key in _INT_FIELDS:
            low = -1 if key in ("f", "L") else 0
            ints[key] = _require_int(d, key, low, MAX_ID, "kline integer")
        decimals = {key: _kline_decimal(d, key) for key in _DECIMAL_FIELDS}
        x = d.get("x")
        if type(x) is not bool:
            raise InvalidInput(f"field 'x' (closed) must be true or false, got {_type_name(x)}", "field")
        version = d.get("version", 0)
        if type(version) is not int or version < 0:
            raise InvalidInput(f"field 'version' must be a non-negative integer, got {version!r:.40}", "field")
        source = d.get("source", "live")
        if type(source) is not str or source not in KLINE_SOURCES:
            raise InvalidInput(f"field 'source' = {source!r:.40} is not one of {sorted(KLINE_SOURCES)}", "field")
        return cls.from_fields(
            s,
            i,
            ints["t"],
            ints["T"],
            ints["f"],
            ints["L"],
            decimals["o"],
            decimals["h"],
            decimals["l"],
            decimals["c"],
            decimals["v"],
            ints["n"],
            x,
            decimals["q"],
            decimals["V"],
            decimals["Q"],
            version,
            source,
        )

    @classmethod
    def from_fields(
        cls,
        s: str,
        i: str,
        t: int,
        T: int,
        f: int,
        L: int,
        o: Decimal,
        h: Decimal,
        l: Decimal,  # noqa: E741 - Binance's field name
        c: Decimal,
        v: Decimal,
        n: int,
        x: bool,
        q: Decimal,
        V: Decimal,
        Q: Decimal,
        version: int,
        source: str,
    ) -> Kline:
        """The kline of fields that are each valid already (types, ranges, a known interval); checks what ties
        them together: ``t`` is an open time of ``i`` and ``T`` its close time, ``0 < l <= o,c <= h``, and
        the taker-buy volumes do not exceed the totals. Raises :class:`InvalidInput` otherwise.

        :meth:`from_dict` ends here, and so does the writers' fast decoder
        (:func:`services.shared.messages.decode_kline_record`), so both accept exactly the same klines.
        """
        if not is_kline_span(i, t, T):
            if open_time(i, t) != t:
                raise InvalidInput(f"field 't' = {t} is not an open time of interval {i!r}", "inconsistent")
            raise InvalidInput(f"field 'T' = {T} is not the close time {close_time(i, t)} of t = {t}", "inconsistent")
        if not (l <= o <= h and l <= c <= h and l > 0):
            raise InvalidInput(f"inconsistent prices: o={o} h={h} l={l} c={c} (need 0 < l <= o,c <= h)", "inconsistent")
        if V > v or Q > q:
            raise InvalidInput("taker-buy volume V/Q exceeds total volume v/q", "inconsistent")
        return cls(s, i, t, T, f, L, o, h, l, c, v, n, x, q, V, Q, version, source)


def _kline_decimal(d: Mapping[str, Any], key: str) -> Decimal:
    if key not in d:
        raise InvalidInput(f"missing field {key!r}", "field")
    value = d[key]
    if type(value) is int and value >= 0:
        return Decimal(value)
    if isinstance(value, Decimal):
        if not value.is_finite() or value < 0:
            raise InvalidInput(f"field {key!r} = {value} must be a finite decimal >= 0", "field")
        return value
    if type(value) is not str:
        raise InvalidInput(f"field {key!r} must be a decimal string, got {_type_name(value)}", "field")
    if _KLINE_DECIMAL.fullmatch(value) is None:
        raise InvalidInput(f"field {key!r} = {value[:40]!r} is not a plain non-negative decimal string", "field")
    return Decimal(value)
