"""A fast path for :func:`services.shared.messages.decode_trades_value`, with exactly its verdicts.

The ``trades`` contract is :mod:`services.shared.messages`; this module only makes reading its common kinds
cheaper — ingest's per-symbol batch, and Binance's own aggTrade payload, bare or in the combined-stream
envelope, one trade per record — and hands them on as columns (:data:`~services.core.book.TradeColumns`) so
that no object is built per trade (:meth:`KlineBook.apply_columns
<services.core.book.KlineBook.apply_columns>`).

1. The layout is told by the record's first bytes (``{"type":"trades"``, ``{"e":"aggTrade"``, ``{"stream":``);
   a record that starts otherwise is tried against each layout in turn. msgspec parses the record into typed
   structs in C; every trade becomes a :class:`TradeFields` with ``a p q f l T m``, whose types and bounds are
   the contract's: ``a f l`` integers in ``0..2**63-1``, ``T`` an integer in the contract's time range, ``m`` a
   boolean, ``p q`` strings. Like :func:`json.loads` it takes the last of duplicate keys and refuses what is
   not strict JSON.

   * a batch (:class:`Trade`): ``type``, ``s`` and a list of trades with exactly those fields; the structs
     forbid any other field (the contract checks some extra ones, such as ``E``, ``M`` or ``s``);
   * a bare payload (:class:`Payload`): the contract ignores unknown fields, so the struct skips them too; as
     msgspec does not check the UTF-8 of what it skips, only an ASCII record takes this way. ``E`` (an
     integer) and ``M`` (a boolean) are checked when present, as the contract does, and a ``type`` field sends
     the record to the contract (``type`` decides the kind before ``e`` does);
   * an envelope (``stream``, ``data``: a :class:`Payload`; no top-level ``type`` or ``e``, which would make it
     another kind), ASCII only, likewise.
2. What a struct cannot say is checked with the contract's own rules: the record's key is the symbol (capital
   letters and digits) and is the batch's ``s``, the payload's ``s``, or the envelope stream's symbol (which
   ``data.s``, when present, repeats exactly); ``type`` is ``trades``, ``e`` is ``aggTrade``, the stream is
   ``<symbol>@aggTrade``; the list is not empty (:meth:`TradesDecoder.items`), ``f <= l``
   (:meth:`TradesDecoder.columns_of`), and every price and quantity is a plain decimal
   (``[0-9]{1,24}(.[0-9]{1,18})?``) greater than zero (:meth:`TradesDecoder.checked`). The engine checks a
   symbol's consecutive records — batches and payloads alike — as one run and leaves the decimals of a run to
   :meth:`KlineBook.extend <services.core.book.KlineBook.extend>`, which applies the same rule while it
   converts them.

Anything else — a gap record, a symbol's lifecycle record, a payload whose symbol is not its key, a lower-case
symbol, extra top-level fields of a batch, a record that is not ASCII where that matters, and every record that
fails a check — goes through the contract's own decoder, which either accepts it or raises
:class:`~services.core.models.InvalidInput` with the reason. So the fast path can only accept what the contract
accepts, with the same values, and every rejection carries the contract's reason (a property test holds the two
together, for every layout).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import repeat
from operator import le
from typing import Annotated, Final

import msgspec
from msgspec import UNSET, UnsetType

from services.core.book import TradeColumns
from services.core.models import MAX_DECIMALS, MAX_ID, MAX_INTEGER_DIGITS, MAX_TIME_MS, MIN_TIME_MS, AggTrade
from services.shared.messages import AGG_TRADE_STREAM, TradeBatch, TradesRecord, decode_trades_value

_Id = Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)]
_Time = Annotated[int, msgspec.Meta(ge=MIN_TIME_MS, le=MAX_TIME_MS)]


class TradeFields(msgspec.Struct, gc=False):
    """One trade as parsed (step 1), whatever the layout: types and bounds checked, the rest not yet."""

    a: _Id
    p: str
    q: str
    f: _Id
    l: _Id  # noqa: E741 - the contract's field name
    T: _Time
    m: bool


class Trade(TradeFields, forbid_unknown_fields=True, gc=False):
    """One trade of a batch: exactly ``a p q f l T m``."""


class Payload(TradeFields, gc=False):
    """A Binance aggTrade payload (bare, or an envelope's ``data``); unknown fields skipped, as the contract does."""

    e: str | UnsetType = UNSET
    s: str | UnsetType = UNSET
    E: int | UnsetType = UNSET
    M: bool | UnsetType = UNSET


class _Bare(Payload, gc=False):
    type: UnsetType = UNSET  # present: the contract reads ``type`` first, so let it decide


class _Batch(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    type: str
    s: str
    trades: list[Trade]


class _Envelope(msgspec.Struct, gc=False):
    stream: str
    data: Payload
    type: UnsetType = UNSET  # either present: the record is another kind for the contract
    e: UnsetType = UNSET


_BATCH: Final = msgspec.json.Decoder(_Batch).decode
_BARE: Final = msgspec.json.Decoder(_Bare).decode
_ENVELOPE: Final = msgspec.json.Decoder(_Envelope).decode
_SYMBOL: Final = re.compile(r"[A-Z0-9]{1,40}")
_ONE: Final = rf"[0-9]{{1,{MAX_INTEGER_DIGITS}}}(?:\.[0-9]{{1,{MAX_DECIMALS}}})?"
#: Plain decimals (services.core.models._PLAIN_DECIMAL) joined by commas.
_DECIMALS: Final = re.compile(rf"{_ONE}(?:,{_ONE})*")
_STREAM_SUFFIX: Final = "@" + AGG_TRADE_STREAM


class TradesDecoder:
    """Decode ``trades`` records: the fast path for the common layouts, the contract's decoder for the rest."""

    def __init__(self) -> None:
        self.fast = 0
        """Records parsed by the fast path (step 1)."""
        self.slow = 0
        """Records handed to the contract's decoder (accepted or rejected; after failing step 2, too)."""
        self._symbols: set[str] = set()

    def decode(self, raw: bytes | None, key: bytes | None) -> TradesRecord:
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
        """The trades of a record keyed ``symbol`` as columns, or None: use :meth:`decode`.

        ``None`` says nothing about validity. The same as :meth:`checked` of :meth:`items`.
        """
        items = self.items(raw, symbol)
        return None if items is None else self.checked(items)

    def items(self, raw: bytes | None, symbol: str) -> Sequence[TradeFields] | None:
        """Step 1: the record's trades as parsed, if it is one of the fast layouts for ``symbol`` (its key).

        The engine's hot path: it joins the items of consecutive records of one symbol and runs
        :meth:`checked` once on them all.
        """
        if raw is None:
            return None
        head = raw[:16]
        items: Sequence[TradeFields] | None
        if head == b'{"type":"trades"':
            items = self._batch(raw, symbol)
        elif head == b'{"e":"aggTrade",':
            items = self._bare(raw, symbol)
        elif head[:10] == b'{"stream":':
            items = self._envelope(raw, symbol)
        else:  # another key order, spaces: try each layout
            items = self._batch(raw, symbol) or self._bare(raw, symbol) or self._envelope(raw, symbol)
        if items is None or not self._known(symbol):
            return None
        self.fast += 1
        return items

    def payloads(self, values: Sequence[bytes | None], symbols: list[str]) -> list[Payload] | None:
        """Step 1 for many records at once: one Binance payload per record, in Binance's own layout, or None.

        The engine's hot path for a slice of records (``values``, keyed ``symbols``) that each hold one trade:
        every record must be a bare payload (``{"e":"aggTrade",...``) if the first one is, or an envelope
        (``{"stream":"<symbol lower-case>@aggTrade","data":{"e":"aggTrade",...,"s":"<symbol>",...}}``) if the
        first one is; each is parsed by itself (one msgspec call per record, so no record can read into its
        neighbour) and then checked column-wise. A record that fails any check, or does not have exactly that
        layout, makes it None: read the records one by one with :meth:`items` (which decides for each, and
        accepts a few more variants). What passes is what :meth:`items` would return for each record, with the
        same checks (only stricter): step 2 follows on the trades.
        """
        count = len(values)
        if not count:
            return None
        try:
            if not b"".join(values).isascii():  # type: ignore[arg-type]  # a None value: TypeError
                return None
            head = values[0][:16]  # type: ignore[index]
            if head == b'{"e":"aggTrade",':
                payloads: list[Payload] = list(map(_BARE, values))  # type: ignore[arg-type]
            elif head[:11] == b'{"stream":"':
                envelopes = list(map(_ENVELOPE, values))  # type: ignore[arg-type]
                names = {symbol: symbol.lower() + _STREAM_SUFFIX for symbol in set(symbols)}
                if [envelope.stream for envelope in envelopes] != list(map(names.__getitem__, symbols)):
                    return None
                payloads = [envelope.data for envelope in envelopes]
            else:
                return None
        except (msgspec.DecodeError, TypeError):
            return None
        if (
            [payload.s for payload in payloads] != symbols
            or [payload.e for payload in payloads].count("aggTrade") != count
            or not all(map(self._known, set(symbols)))
        ):
            return None
        self.fast += count
        return payloads

    @staticmethod
    def _batch(raw: bytes, symbol: str) -> list[Trade] | None:
        try:
            batch = _BATCH(raw)
        except msgspec.DecodeError:
            return None
        items = batch.trades
        return items if batch.type == "trades" and batch.s == symbol and items else None

    @staticmethod
    def _bare(raw: bytes, symbol: str) -> list[Payload] | None:
        if not raw.isascii():  # msgspec does not check the UTF-8 of the fields it skips
            return None
        try:
            payload = _BARE(raw)
        except msgspec.DecodeError:
            return None
        return [payload] if payload.e == "aggTrade" and payload.s == symbol else None

    @staticmethod
    def _envelope(raw: bytes, symbol: str) -> list[Payload] | None:
        if not raw.isascii():
            return None
        try:
            envelope = _ENVELOPE(raw)
        except msgspec.DecodeError:
            return None
        name, suffix = envelope.stream[: -len(_STREAM_SUFFIX)], envelope.stream[-len(_STREAM_SUFFIX) :]
        payload = envelope.data
        if (
            suffix != _STREAM_SUFFIX
            or name.upper() != symbol
            or not (name.isascii() and name.isalnum())
            or (payload.s is not UNSET and payload.s != symbol)
            or (payload.e is not UNSET and payload.e != "aggTrade")
        ):
            return None
        return [payload]

    @staticmethod
    def columns_of(items: Sequence[TradeFields]) -> TradeColumns | None:
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
    def checked(cls, items: Sequence[TradeFields]) -> TradeColumns | None:
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
