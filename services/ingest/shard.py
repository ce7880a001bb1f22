"""Which ingest process follows which symbol: a stable shard of the symbol set.

Pure: no I/O. With ``[ingest] shard = "i/N"`` there are N ingest processes, numbered 0 to N-1, and process
``i`` follows exactly the symbols whose shard is ``i``:

    shard_of(symbol, N) = int(first 8 bytes of SHA-256(symbol, upper-case ASCII), big-endian) mod N

The hash is SHA-256, not Python's ``hash()`` (salted per process for strings): every process, every Python
version, any other tool computes the same shard. From a shell::

    printf BTCUSDT | sha256sum | cut -c1-16   # then: python3 -c 'print(0x<those 16 digits> % N)'

The N shards partition every set of symbols: each symbol in exactly one, whatever the set is (configured,
discovered from ``exchangeInfo``, or edited at run time), so N processes with the same N never publish a symbol
twice and never leave one out. A symbol's shard depends only on the symbol and N; changing N moves symbols
between processes, so every process must run with the same N: change it with every ingest stopped (each
process then resumes its symbols from the ``trades`` topic by trade id and backfills the gap by REST, as on
any restart; see the README).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass


def shard_of(symbol: str, count: int) -> int:
    """The shard (``0 <= shard < count``) of ``symbol`` among ``count`` shards (see the module docstring)."""
    if count < 1:
        raise ValueError(f"the shard count must be >= 1, got {count}")
    digest = hashlib.sha256(symbol.upper().encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True, slots=True)
class Shard:
    """This process's share of the symbols: shard ``index`` of ``count``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: expected 0 <= i < N")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def whole(self) -> bool:
        """One process follows every symbol (``0/1``)."""
        return self.count == 1

    def owns(self, symbol: str) -> bool:
        return self.count == 1 or shard_of(symbol, self.count) == self.index

    def own(self, symbols: Iterable[str]) -> set[str]:
        """The symbols of this shard among ``symbols``."""
        return {s for s in symbols if self.owns(s)}

    def owner(self, symbol: str) -> Shard:
        """The shard (of the same count) that follows ``symbol``."""
        return Shard(shard_of(symbol, self.count), self.count)
