"""A fast path for :func:`services.shared.messages.decode_trades_value`, with exactly its verdicts.

The ``trades`` contract is :mod:`services.shared.messages`; this module only makes reading its commonest kind,
the per-symbol batch ingest writes, cheaper, and hands it on as columns (:data:`~services.core.book.TradeColumns`)
so that no object is built per trade (:meth:`KlineBook.apply_columns
<services.core.book.KlineBook.apply_columns>`).

1. msgspec parses the record into typed structs in C: ``type``, ``s`` and a list of trades with exactly the
   fields ``a p q f l T m``. The structs forbid any other field (the contract checks some extra ones, such as
   ``E``, ``M`` or ``s``), and their types and bounds are the contract's: ``a f l`` integers in ``0..2**63-1``,
   ``T`` an integer in the contract's time range, ``m`` a boolean, ``p q`` strings. Like :func:`json.loads`
   it takes the last of duplicate keys and refuses what is not strict JSON.
2. What a struct cannot say is checked column-wise, with the contract's own rules: ``type`` is ``trades``,
   the symbol is the record's key (capital letters and digits), the list is not empty (:meth:`TradesDecoder.items`),
   ``f <= l`` (:meth:`TradesDecoder.columns_of`), and every price and quantity is a plain decimal
   (``[0-9]{1,24}(.[0-9]{1,18})?``) greater than zero (:meth:`TradesDecoder.checked`). The engine checks a
   symbol's consecutive records as one run and leaves the decimals of a run to :meth:`KlineBook.extend
   <services.core.book.KlineBook.extend>`, which applies the same rule while it converts them.

Anything else — a gap event, a raw aggTrade, extra fields, and every record that fails a check — goes through
the contract's own decoder, which either accepts it or raises :class:`~services.core.models.InvalidInput` with
the reason. So the fast path can only accept what the contract accepts, with the same values, and every
rejection carries the contract's reason (a property test holds the two together).
"""

from __future__ import annotations

import re
from itertools import repeat
from operator import le
from typing import Annotated, Final

import msgspec

from services.core.book import TradeColumns
from services.core.models import MAX_DECIMALS, MAX_ID, MAX_INTEGER_DIGITS, MAX_TIME_MS, MIN_TIME_MS, AggTrade
from services.shared.messages import Gap, TradeBatch, decode_trades_value

_Id = Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)]
_Time = Annotated[int, msgspec.Meta(ge=MIN_TIME_MS, le=MAX_TIME_MS)]


class Trade(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """One trade of a batch as parsed (step 1): types and bounds checked, the rest not yet."""

    a: _Id
    p: str
    q: str
    f: _Id
    l: _Id  # noqa: E741 - the contract's field name
    T: _Time
    m: bool


class _Batch(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    type: str
    s: str
    trades: list[Trade]


_DECODE: Final = msgspec.json.Decoder(_Batch).decode
_SYMBOL: Final = re.compile(r"[A-Z0-9]{1,40}")
_ONE: Final = rf"[0-9]{{1,{MAX_INTEGER_DIGITS}}}(?:\.[0-9]{{1,{MAX_DECIMALS}}})?"
#: Plain decimals (services.core.models._PLAIN_DECIMAL) joined by commas.
_DECIMALS: Final = re.compile(rf"{_ONE}(?:,{_ONE})*")


class TradesDecoder:
    """Decode ``trades`` records: the fast path for ingest's batches, the contract's decoder for the rest."""

    def __init__(self) -> None:
        self.fast = 0
        """Records parsed by the fast path (step 1)."""
        self.slow = 0
        """Records handed to the contract's decoder (accepted or rejected; after failing step 2, too)."""
        self._symbols: set[str] = set()

    def decode(self, raw: bytes | None, key: bytes | None) -> TradeBatch | Gap:
        """The record as :func:`~services.shared.messages.decode_trades_value` reads it, or its InvalidInput."""
        if key is not None:
            symbol = key.decode(errors="replace")
            columns = self.columns(raw, symbol)
            if columns is not None:
                ids, times, prices, quantities, firsts, lasts, makers = columns
                trades = list(map(AggTrade, repeat(symbol), ids, prices, quantities, firsts, lasts, times, makers))
                return TradeBatch(symbol, trades)
        self.slow += 1
        return decode_trades_value(raw, key)

    def columns(self, raw: bytes | None, symbol: str) -> TradeColumns | None:
        """The trades of a per-symbol batch for ``symbol`` (its key) as columns, or None: use :meth:`decode`.

        ``None`` says nothing about validity. The same as :meth:`checked` of :meth:`items`.
        """
        items = self.items(raw, symbol)
        return None if items is None else self.checked(items)

    def items(self, raw: bytes | None, symbol: str) -> list[Trade] | None:
        """Step 1: the record parsed, if it is a non-empty batch of ``symbol`` (its key), else None.

        The engine's hot path: it joins the items of consecutive records of one symbol and runs
        :meth:`checked` once on them all.
        """
        if raw is None:
            return None
        try:
            batch = _DECODE(raw)
        except msgspec.DecodeError:
            return None
        items = batch.trades
        if batch.type != "trades" or batch.s != symbol or not items or not self._known(symbol):
            return None
        self.fast += 1
        return items

    @staticmethod
    def columns_of(items: list[Trade]) -> TradeColumns | None:
        """``items`` as columns if ``f <= l`` for every trade, else None; prices and quantities unchecked.

        For :meth:`KlineBook.extend <services.core.book.KlineBook.extend>`, which folds a batch only if every
        price and quantity is a plain decimal > 0 as the contract defines it (and refuses it otherwise, leaving
        the record-by-record way to give the reason): checking the texts here too would only repeat that.
        """
        firsts = [t.f for t in items]
        lasts = [t.l for t in items]
        if not all(map(le, firsts, lasts)):
            return None
        return (
            [t.a for t in items], [t.T for t in items], [t.p for t in items], [t.q for t in items],
            firsts, lasts, [t.m for t in items],
        )  # fmt: skip

    @classmethod
    def checked(cls, items: list[Trade]) -> TradeColumns | None:
        """Step 2: ``items`` (of one or more records) as columns if every trade passes the checks, else None.

        The checks are per trade, so a list of several records passes exactly when each record would.
        """
        columns = cls.columns_of(items)
        if columns is None:
            return None
        texts = [*columns[2], *columns[3]]
        joined = ",".join(texts)
        if (
            joined.count(",") == len(texts) - 1  # no text holds a comma itself
            and _DECIMALS.fullmatch(joined)
            and all(map(str.strip, texts, repeat("0.")))  # zero is not a price or a quantity
        ):
            return columns
        return None

    def _known(self, symbol: str) -> bool:
        """``symbol`` is one the contract accepts as a batch's symbol and ingest writes (checked once)."""
        if symbol in self._symbols:
            return True
        if _SYMBOL.fullmatch(symbol) is None:
            return False
        if len(self._symbols) > 100_000:
            self._symbols.clear()
        self._symbols.add(symbol)
        return True
