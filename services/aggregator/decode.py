"""A fast path for :func:`services.shared.messages.decode_trades_value`, with exactly its verdicts.

The ``trades`` contract is :mod:`services.shared.messages`; this module only makes reading it cheaper for the
one shape ingest writes (``{"type": "trades", "s": ..., "trades": [{a, p, q, f, l, T, m}, ...]}``), which is
nearly every record the aggregator sees. It checks the same rules as
:func:`~services.core.models.parse_agg_trade` with plain type and range tests, and remembers the decimal
strings and symbols it has already validated (prices repeat a lot), so a trade costs a dictionary lookup
instead of a regular expression.

Anything else — a gap event, a raw aggTrade, a trade with extra or missing fields, and every record that fails
a check — goes through the contract's own decoder, which either accepts it or raises
:class:`~services.core.models.InvalidInput` with the reason. So the fast path can only accept what the
contract accepts, and every rejection carries the contract's reason (a property test holds the two together).
"""

from __future__ import annotations

import json
import re
from typing import Final

from services.core.models import (
    MAX_ID,
    MAX_TIME_MS,
    MIN_TIME_MS,
    AggTrade,
    InvalidInput,
    check_positive_decimal,
)
from services.shared.messages import Gap, TradeBatch, decode_trades_value

#: The fields of a trade inside a batch, exactly as ingest writes them (``encode_trade_batch``).
_BATCH_FIELDS: Final = 7
#: Symbols the fast path takes as they are: upper-case ASCII letters and digits (the contract also accepts
#: other spellings, which it upper-cases; those take the slow path).
_PLAIN_SYMBOL: Final = re.compile(r"[A-Z0-9]{1,40}")


class TradesDecoder:
    """Decode ``trades`` records; remembers up to ``cache_limit`` validated decimal strings."""

    def __init__(self, cache_limit: int = 1 << 17) -> None:
        self._decimals: set[str] = set()
        self._symbols: dict[str, bytes] = {}
        self._limit = cache_limit
        self.fast = 0
        """Records decoded by the fast path."""
        self.slow = 0
        """Records handed to the contract's decoder (accepted or rejected)."""

    def decode(self, raw: bytes | None, key: bytes | None) -> TradeBatch | Gap:
        """The record as :func:`~services.shared.messages.decode_trades_value` reads it, or its InvalidInput."""
        batch = self._fast(raw, key)
        if batch is not None:
            self.fast += 1
            return batch
        self.slow += 1
        return decode_trades_value(raw, key)

    def _fast(self, raw: bytes | None, key: bytes | None) -> TradeBatch | None:
        if raw is None or raw[:17] != b'{"type":"trades",':
            return None
        try:
            obj = json.loads(raw.decode())
        except (UnicodeDecodeError, ValueError):
            return None
        if type(obj) is not dict:
            return None
        symbol = obj.get("s")
        items = obj.get("trades")
        if type(symbol) is not str or type(items) is not list or not items:
            return None
        symbol_key = self._symbols.get(symbol)
        if symbol_key is None:
            if _PLAIN_SYMBOL.fullmatch(symbol) is None:
                return None
            symbol_key = self._symbols[symbol] = symbol.encode()
        if key is not None and key != symbol_key:
            return None
        decimals = self._decimals
        trades: list[AggTrade] = []
        append = trades.append
        for item in items:
            if type(item) is not dict or len(item) != _BATCH_FIELDS:
                return None
            try:
                a = item["a"]
                p = item["p"]
                q = item["q"]
                f = item["f"]
                last = item["l"]
                t = item["T"]
                m = item["m"]
            except KeyError:
                return None
            if (
                type(a) is not int
                or type(f) is not int
                or type(last) is not int
                or type(t) is not int
                or type(m) is not bool
                or type(p) is not str
                or type(q) is not str
                or not 0 <= a <= MAX_ID
                or not 0 <= f <= last <= MAX_ID
                or not MIN_TIME_MS <= t <= MAX_TIME_MS
            ):
                return None
            if p not in decimals and not self._valid_decimal(p):
                return None
            if q not in decimals and not self._valid_decimal(q):
                return None
            append(AggTrade(symbol, a, p, q, f, last, t, m))
        return TradeBatch(symbol, trades)

    def _valid_decimal(self, value: str) -> bool:
        try:
            text = check_positive_decimal(value, "p", "price")
        except InvalidInput:
            return False
        if len(self._decimals) >= self._limit:
            self._decimals.clear()
        self._decimals.add(text)
        return True
