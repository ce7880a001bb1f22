"""Which symbols ingest follows: a base set (configured, or discovered from ``exchangeInfo``) plus run-time edits.

Pure: no I/O. The wanted set is ``(base | added) - removed``, all of it in this process's shard
(:mod:`services.ingest.shard`, ``[ingest] shard = "i/N"``):

* ``base`` is ``market.symbols``, or with ``market.discover = true`` every symbol the exchange lists with
  status ``TRADING`` and quote asset ``market.quote_asset`` (refreshed periodically, so listings and delistings
  follow without a restart); of either, only the symbols of this shard (the others are other processes');
* ``POST /symbols`` edits at run time: ``{"add": [...]}`` and ``{"remove": [...]}`` are overlays that survive
  discovery refreshes (an added symbol stays, a removed one stays out, until the opposite request); they name
  symbols of this shard only: a symbol of another shard is refused with the shard that follows it
  (:class:`WrongShard`), nothing is applied. ``{"symbols": [...]}`` is the whole set, as in the config: it
  replaces the base set with its symbols of this shard and clears the overlays.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.ingest.rest import SymbolInfo
from services.ingest.shard import Shard

_SYMBOL = re.compile(r"^[A-Z0-9]{2,30}$")
MAX_SYMBOLS = 10_000


class SymbolRequestError(ValueError):
    """A ``POST /symbols`` body that cannot be applied; the message says what is wrong."""


class WrongShard(SymbolRequestError):
    """``add``/``remove`` named symbols another shard follows; ``owners`` maps each to its shard."""

    def __init__(self, shard: Shard, owners: dict[str, Shard]) -> None:
        listed = ", ".join(f"{symbol} -> shard {owner}" for symbol, owner in sorted(owners.items()))
        super().__init__(
            f"this ingest is shard {shard} and follows only its own symbols; send these to the ingest of their "
            f"shard: {listed}"
        )
        self.shard = shard
        self.owners = owners


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
    """The base set plus run-time overlays, within one shard (see the module docstring)."""

    base: set[str] = field(default_factory=set)
    added: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    shard: Shard = field(default_factory=Shard)
    #: Symbols of the last base set (configured, discovered or posted) that other shards follow.
    elsewhere: int = 0

    def __post_init__(self) -> None:
        self.set_base(self.base)

    @property
    def wanted(self) -> frozenset[str]:
        return frozenset((self.base | self.added) - self.removed)

    def set_base(self, symbols: Iterable[str]) -> None:
        """Take this shard's part of the whole set ``symbols``."""
        every = set(symbols)
        self.base = self.shard.own(every)
        self.elsewhere = len(every) - len(self.base)

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
        foreign = {symbol: self.shard.owner(symbol) for symbol in add | remove if not self.shard.owns(symbol)}
        if foreign:
            raise WrongShard(self.shard, foreign)
        if replace is not None:
            self.set_base(replace)
            self.added.clear()
            self.removed.clear()
        self.added |= add
        self.removed -= add
        self.removed |= remove
        self.added -= remove
