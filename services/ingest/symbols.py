"""Which symbols ingest follows: a base set (configured, or discovered from ``exchangeInfo``) plus run-time edits.

Pure: no I/O. The wanted set is ``(base | added) - removed``:

* ``base`` is ``market.symbols``, or with ``market.discover = true`` every symbol the exchange lists with
  status ``TRADING`` and quote asset ``market.quote_asset`` (refreshed periodically, so listings and delistings
  follow without a restart);
* ``POST /symbols`` edits at run time: ``{"add": [...]}`` and ``{"remove": [...]}`` are overlays that survive
  discovery refreshes (an added symbol stays, a removed one stays out, until the opposite request);
  ``{"symbols": [...]}`` replaces the base set and clears the overlays.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.ingest.rest import SymbolInfo

_SYMBOL = re.compile(r"^[A-Z0-9]{2,30}$")
MAX_SYMBOLS = 10_000


class SymbolRequestError(ValueError):
    """A ``POST /symbols`` body that cannot be applied; the message says what is wrong."""


def normalize_symbols(values: object, what: str) -> set[str]:
    """Validate a JSON list of symbols (case-insensitive) and return them upper-case."""
    if not isinstance(values, list):
        raise SymbolRequestError(f"{what!r} must be a list of symbols, got {type(values).__name__}")
    if len(values) > MAX_SYMBOLS:
        raise SymbolRequestError(f"{what!r} has {len(values)} symbols; at most {MAX_SYMBOLS}")
    out = set()
    for value in values:
        if not isinstance(value, str) or not _SYMBOL.match(value.upper()):
            raise SymbolRequestError(f"{what!r}: {str(value)[:40]!r} is not a symbol (2-30 letters or digits)")
        out.add(value.upper())
    return out


def tradable(infos: Iterable[SymbolInfo], quote_asset: str) -> set[str]:
    """Symbols with status ``TRADING`` quoted in ``quote_asset`` (empty quote asset: any)."""
    quote = quote_asset.upper()
    return {i.symbol for i in infos if i.status == "TRADING" and (not quote or i.quote_asset == quote)}


@dataclass
class SymbolSelection:
    """The base set plus run-time overlays (see the module docstring)."""

    base: set[str] = field(default_factory=set)
    added: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)

    @property
    def wanted(self) -> frozenset[str]:
        return frozenset((self.base | self.added) - self.removed)

    def set_base(self, symbols: Iterable[str]) -> None:
        self.base = set(symbols)

    def apply(self, body: Mapping[str, Any]) -> None:
        """Apply a ``POST /symbols`` body; raises :class:`SymbolRequestError` without changing anything."""
        known = {"add", "remove", "symbols"}
        unknown = set(body) - known
        if unknown:
            raise SymbolRequestError(f"unknown keys {sorted(unknown)}; expected 'add', 'remove' or 'symbols'")
        if not body:
            raise SymbolRequestError("empty request; expected 'add', 'remove' or 'symbols'")
        replace = normalize_symbols(body["symbols"], "symbols") if "symbols" in body else None
        add = normalize_symbols(body.get("add", []), "add")
        remove = normalize_symbols(body.get("remove", []), "remove")
        both = add & remove
        if both:
            raise SymbolRequestError(f"{sorted(both)} both added and removed")
        if replace is not None:
            self.base = replace
            self.added.clear()
            self.removed.clear()
        self.added |= add
        self.removed -= add
        self.removed |= remove
        self.added -= remove
