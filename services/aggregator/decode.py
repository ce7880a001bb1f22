"""A fast path for :func:`services.shared.messages.decode_trades_value`, with exactly its verdicts.

The ``trades`` contract is :mod:`services.shared.messages`; this module only makes reading it cheaper for the
one byte layout ingest writes (:func:`~services.shared.messages.encode_trade_batch`: no whitespace, fields in
the order ``a p q f l T m``), which is nearly every record the aggregator sees. One regular expression pass
reads every trade of a record: the pattern admits only JSON the contract also admits (integers without sign,
exponent, fraction or leading zero; decimals as plain digit strings; ``true``/``false``), a length check proves
the matched trades tile the whole record, and what a pattern cannot say (id and time ranges, ``f <= l``,
non-zero prices and quantities, the key) is checked in code with the contract's own bounds.

Anything else — a gap event, a raw aggTrade, another layout (whitespace, other field order, extra fields), and
every record that fails a check — goes through the contract's own decoder, which either accepts it or raises
:class:`~services.core.models.InvalidInput` with the reason. So the fast path can only accept what the contract
accepts, and every rejection carries the contract's reason (a property test holds the two together).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from itertools import chain
from typing import Final

from services.core.models import MAX_ID, MAX_TIME_MS, MIN_TIME_MS, AggTrade
from services.shared.messages import Gap, TradeBatch, decode_trades_value

_HEAD: Final = re.compile(r'\{"type":"trades","s":"([A-Z0-9]{1,40})","trades":\[')
_INT: Final = r"(0|[1-9][0-9]{0,18})"
_DECIMAL: Final = r'"([0-9]{1,24}(?:\.[0-9]{1,18})?)"'  # services.core.models._PLAIN_DECIMAL, quoted
_TRADE: Final = re.compile(
    r'\{"a":' + _INT + r',"p":' + _DECIMAL + r',"q":' + _DECIMAL + r',"f":' + _INT + r',"l":' + _INT
    + r',"T":' + _INT + r',"m":(true|false)\}(,|\]\}\Z)'
)  # fmt: skip
#: The characters of one trade that are not in its groups (the separator is a group).
_TRADE_FRAME: Final = len('{"a":,"p":"","q":"","f":,"l":,"T":,"m":}')

TradeFactory = Callable[[str, int, str, str, int, int, int, bool], AggTrade]


def _slot_factory() -> TradeFactory:
    """Build :class:`AggTrade` instances through their slots, or plainly if its fields ever change.

    ``AggTrade`` is a frozen, slotted dataclass: its generated ``__init__`` sets each field through
    ``object.__setattr__``, which is about a fifth of this module's cost per trade. Setting the same slots
    through their own descriptors gives an identical instance (equal, same hash) for half the price. The
    shortcut is taken only while the class's slots are exactly the eight fields assigned here.
    """
    if getattr(AggTrade, "__slots__", None) != ("s", "a", "p", "q", "f", "l", "T", "m"):
        return AggTrade
    new = object.__new__
    set_s, set_a, set_p, set_q, set_f, set_l, set_t, set_m = (
        getattr(AggTrade, name).__set__ for name in AggTrade.__slots__
    )

    def make(s: str, a: int, p: str, q: str, f: int, last: int, t: int, m: bool) -> AggTrade:
        trade: AggTrade = new(AggTrade)
        set_s(trade, s)
        set_a(trade, a)
        set_p(trade, p)
        set_q(trade, q)
        set_f(trade, f)
        set_l(trade, last)
        set_t(trade, t)
        set_m(trade, m)
        return trade

    return make


make_trade: Final = _slot_factory()


class TradesDecoder:
    """Decode ``trades`` records: the fast path for ingest's layout, the contract's decoder for the rest."""

    def __init__(self) -> None:
        self.fast = 0
        """Records decoded by the fast path."""
        self.slow = 0
        """Records handed to the contract's decoder (accepted or rejected)."""

    def decode(self, raw: bytes | None, key: bytes | None) -> TradeBatch | Gap:
        """The record as :func:`~services.shared.messages.decode_trades_value` reads it, or its InvalidInput."""
        if raw is not None and key is not None:
            trades = self.trades(raw, key.decode(errors="replace"))
            if trades is not None:
                return TradeBatch(trades[0].s, trades)
        self.slow += 1
        return decode_trades_value(raw, key)

    def trades(self, raw: bytes | None, symbol: str) -> list[AggTrade] | None:
        """The trades of a record in ingest's layout for ``symbol`` (its key), or None: use :meth:`decode`.

        The engine's hot path: no :class:`TradeBatch` is built, and ``None`` says nothing about validity.
        """
        if raw is None:
            return None
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            return None
        head = _HEAD.match(text)
        if head is None or head.group(1) != symbol:
            return None
        start = head.end()
        found = _TRADE.findall(text, start)
        if (
            not found
            or found[-1][7] != "]}"
            or _TRADE_FRAME * len(found) + sum(map(len, chain.from_iterable(found))) != len(text) - start
        ):
            return None  # the trades do not tile the rest of the record: not this layout
        trades: list[AggTrade] = []
        append = trades.append
        make = make_trade
        for a_text, p, q, f_text, l_text, t_text, m_text, _sep in found:
            a, f, last, t = int(a_text), int(f_text), int(l_text), int(t_text)
            if not (
                a <= MAX_ID
                and f <= last <= MAX_ID
                and MIN_TIME_MS <= t <= MAX_TIME_MS
                and p.strip("0.")  # zero is not a price
                and q.strip("0.")
            ):
                return None
            append(make(symbol, a, p, q, f, last, t, m_text == "true"))
        self.fast += 1
        return trades
