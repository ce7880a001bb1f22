"""Per-symbol sequencing by aggregate trade id ``a``: what is published is strictly increasing and contiguous.

Pure core: no I/O, no asyncio; time comes in as an argument. The service feeds it every validated trade from
every connection (a rotation overlaps two connections, so the same trade often arrives twice) and every
trade fetched by REST backfill; the sequencer decides, per symbol:

1. ``a <= last`` (``last`` = the highest id already handed to the :class:`Outbox`): a **duplicate**, dropped;
2. ``a == last + 1``: **accepted** into the outbox, followed by any held trades that are now contiguous;
3. ``a > last + 1``: **held** (a duplicate if already held). The hole is either a reordering that the next
   frames fill within ``reorder_window_s``, or a real gap: once the window passes (or too many trades are held)
   :meth:`Sequencer.due` names the symbol for REST backfill of ``last + 1 .. min(held) - 1``, once per hole;
4. backfilled trades go through the same rules (:meth:`Sequencer.offer_backfill`), so live frames and REST
   pages may overlap freely (a held trade that a page also carries is published once, from the page);
5. a hole that backfill cannot fill becomes an explicit :class:`~services.shared.messages.Gap` in the outbox
   (:meth:`Sequencer.declare_gap`), and ``last`` moves past it: those ids will never be published;
6. at a graceful stop no live frame can fill a hole any more: ``due(now, final=True)`` ends every reorder
   window at once, and :meth:`Sequencer.close` hands whatever backfill could not repair in time to the outbox
   behind explicit gaps, so nothing accepted stays held.

A trade whose time the publisher refuses (outside the window around the exchange's clock,
:mod:`services.ingest.publisher`) has been sequenced like any other: its id is real (the exchange sent it), only
its content is refused. So the sequencer never sees a hole there, reports no gap and waits for nothing; the
``trades`` topic simply lacks that id, and its dead letter carries the trade.

A symbol is *holding* exactly while it has held trades: its reorder window starts with the first trade held,
and whatever empties its held trades (live frames, a REST page that carries every held id, a declared gap, a
fresh symbol's start) ends it, so :meth:`Sequencer.due` names the symbol no more. A later hole gets a window
of its own.

A symbol whose history is unknown (never published, nothing recovered from the topic) starts at the lowest id
seen within its first reorder window, so a first pair of swapped frames loses nothing.

The outbox keeps, per symbol, the trades, gaps and lifecycle records (:class:`~services.shared.messages.SymbolEvent`,
added by the service when the symbol leaves or joins the wanted set) in publishing order; the publisher drains it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from services.ingest.frames import WireTrade
from services.shared.messages import Gap, SymbolEvent

OutboxItem = WireTrade | Gap | SymbolEvent


class Verdict(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    HELD = "held"
    UNKNOWN_SYMBOL = "unknown_symbol"


class Outbox:
    """Trades, gaps and lifecycle records ready to publish, per symbol, in publishing order; drained by the
    publisher."""

    __slots__ = ("_items", "trades")

    def __init__(self) -> None:
        self._items: dict[str, list[OutboxItem]] = {}
        self.trades = 0

    def add_trade(self, trade: WireTrade) -> None:
        items = self._items.get(trade.s)
        if items is None:
            self._items[trade.s] = [trade]
        else:
            items.append(trade)
        self.trades += 1

    def add_gap(self, gap: Gap) -> None:
        self._items.setdefault(gap.symbol, []).append(gap)

    def add_symbol_event(self, event: SymbolEvent) -> None:
        """A lifecycle record, after everything of its symbol already here (see the service's ``apply_symbols``)."""
        self._items.setdefault(event.symbol, []).append(event)

    def take(self) -> dict[str, list[OutboxItem]]:
        """Everything waiting, per symbol, and an empty outbox."""
        items, self._items, self.trades = self._items, {}, 0
        return items

    def put_back(self, items: dict[str, list[OutboxItem]]) -> None:
        """Return items taken and not sent, ahead of anything added since (they come first in ``a``)."""
        for symbol, entries in items.items():
            if not entries:
                continue
            self._items[symbol] = entries + self._items.get(symbol, [])
            self.trades += sum(1 for entry in entries if type(entry) is WireTrade)

    def __bool__(self) -> bool:
        return bool(self._items)


@dataclass(slots=True)
class _SymbolState:
    last: int | None
    held: dict[int, WireTrade] = field(default_factory=dict)
    held_since: float | None = None
    backfilling: bool = False


@dataclass(slots=True)
class SequencerStats:
    """Counters since start, served as is by the ingest ``/metrics`` (``gaps_detected``, ``gaps_repaired``, ...).

    A hole is counted by what happened to it, not by how many requests or ticks it took: one hole that outlives
    its reorder window is one ``gaps_detected``, then one ``gaps_repaired`` (its backfill ended with nothing
    missing) or one ``gaps_unrepaired`` (published as a gap: backfill gave up, or :meth:`Sequencer.close` at a
    stop), or neither if its symbol was removed meanwhile. A catch-up after a (re)start or a reconnect is not a
    detected gap and never counts as repaired; a gap it publishes counts as unrepaired.
    """

    duplicates: int = 0  # trades dropped: id already published, or already held
    held: int = 0  # trades that arrived ahead of a hole (reordered, or beyond a gap)
    gaps_detected: int = 0  # holes named by due() for REST backfill (each hole once)
    gaps_repaired: int = 0  # detected holes whose backfill ended with nothing missing
    gaps_unrepaired: int = 0  # holes published as explicit gaps (given up by backfill, or at close)
    ids_unrepaired: int = 0  # ids inside those gaps
    backfilled: int = 0  # trades accepted from REST
    dropped_on_untrack: int = 0  # held trades dropped when their symbol was removed


class Sequencer:
    """Dedup, reorder and gap detection for every tracked symbol (see the module docstring)."""

    def __init__(self, outbox: Outbox, *, reorder_window_s: float, max_held_per_symbol: int) -> None:
        if reorder_window_s < 0:
            raise ValueError(f"reorder_window_s must be >= 0, got {reorder_window_s}")
        if max_held_per_symbol < 1:
            raise ValueError(f"max_held_per_symbol must be >= 1, got {max_held_per_symbol}")
        self.outbox = outbox
        self.reorder_window_s = reorder_window_s
        self.max_held_per_symbol = max_held_per_symbol
        self.stats = SequencerStats()
        self.held_total = 0
        self._states: dict[str, _SymbolState] = {}
        self._holding: dict[str, _SymbolState] = {}  # symbols with held trades

    # ------------------------------------------------------------------ symbols
    @property
    def symbols(self) -> frozenset[str]:
        return frozenset(self._states)

    def track(self, symbol: str, last: int | None = None) -> None:
        """Start sequencing ``symbol``; ``last`` is the last id already in the topic (None: start fresh)."""
        if symbol not in self._states:
            self._states[symbol] = _SymbolState(last)

    def untrack(self, symbol: str) -> int | None:
        """Stop sequencing ``symbol``; held trades are dropped (a later catch-up refetches them).

        Returns the last id handed to the outbox (None if nothing was).
        """
        state = self._states.pop(symbol, None)
        if state is None:
            return None
        self._holding.pop(symbol, None)
        self.held_total -= len(state.held)
        self.stats.dropped_on_untrack += len(state.held)
        return state.last

    def last(self, symbol: str) -> int | None:
        state = self._states.get(symbol)
        return None if state is None else state.last

    def held(self, symbol: str) -> int:
        state = self._states.get(symbol)
        return 0 if state is None else len(state.held)

    # ------------------------------------------------------------------ live trades
    def offer(self, trade: WireTrade, now: float) -> Verdict:
        """Sequence one live trade (see the module docstring for the rules)."""
        state = self._states.get(trade.s)
        if state is None:
            return Verdict.UNKNOWN_SYMBOL
        a = trade.a
        last = state.last
        if last is not None:
            if a == last + 1:
                state.last = a
                self.outbox.add_trade(trade)
                if state.held:
                    self._release(trade.s, state, now)
                return Verdict.ACCEPTED
            if a <= last:
                self.stats.duplicates += 1
                return Verdict.DUPLICATE
        held = state.held
        if a in held:
            self.stats.duplicates += 1
            return Verdict.DUPLICATE
        held[a] = trade
        self.held_total += 1
        self.stats.held += 1
        if state.held_since is None:
            state.held_since = now
            self._holding[trade.s] = state
        return Verdict.HELD

    @property
    def holding(self) -> list[str]:
        """Symbols with held trades."""
        return list(self._holding)

    def due(self, now: float, *, final: bool = False) -> list[str]:
        """Symbols whose hole outlived the reorder window: mark them as backfilling and return them.

        A fresh symbol (no known history) is not backfilled: it starts at the lowest id held. ``final``: no live
        frame will come any more (the service is stopping), so every window is over now; a fresh symbol whose
        held trades still have a hole after its start is then backfilled like any other.
        """
        out: list[str] = []
        window = self.reorder_window_s
        for symbol, state in list(self._holding.items()):
            if state.backfilling or state.held_since is None:
                continue
            if not final and now - state.held_since < window and len(state.held) < self.max_held_per_symbol:
                continue
            if state.last is None:
                state.last = min(state.held) - 1
                self._release(symbol, state, now)
                if not final or not state.held:
                    continue
            state.backfilling = True
            self.stats.gaps_detected += 1
            out.append(symbol)
        return out

    # ------------------------------------------------------------------ backfill
    def begin_catch_up(self, symbol: str) -> bool:
        """Mark ``symbol`` as backfilling from its known ``last`` (after a restart); False if not possible."""
        state = self._states.get(symbol)
        if state is None or state.last is None or state.backfilling:
            return False
        state.backfilling = True
        return True

    def backfill_range(self, symbol: str) -> tuple[int, int | None] | None:
        """``(from_a, to_a)`` still missing (``to_a`` None: open-ended catch-up); None when nothing is."""
        state = self._states.get(symbol)
        if state is None or state.last is None:
            return None
        if not state.held:
            return state.last + 1, None
        return state.last + 1, min(state.held) - 1

    def offer_backfill(self, symbol: str, trades: Iterable[WireTrade], now: float) -> int:
        """Sequence trades fetched by REST (ordered by ``a``); returns how many were accepted."""
        state = self._states.get(symbol)
        if state is None or state.last is None:
            return 0
        accepted = 0
        held = state.held
        for trade in trades:
            a = trade.a
            if a <= state.last:
                continue
            if a == state.last + 1:
                state.last = a
                self.outbox.add_trade(trade)
                accepted += 1
                if held and held.pop(a, None) is not None:
                    self.held_total -= 1
                continue
            break  # REST skipped ids: the rest of the page cannot be published before the hole is resolved
        self.stats.backfilled += accepted
        # Also when nothing is held any more: the page may have carried every held id, and the symbol must stop
        # holding, or due() would keep naming it for a hole that no longer exists.
        self._release(symbol, state, now)
        return accepted

    def end_backfill(self, symbol: str, *, repaired: bool, now: float) -> None:
        """The backfill task for ``symbol`` ended; ``repaired`` counts a gap as repaired."""
        state = self._states.get(symbol)
        if state is None:
            return
        state.backfilling = False
        if repaired:
            self.stats.gaps_repaired += 1
        if state.held:
            state.held_since = now  # a further hole: give it its own reorder window
            self._holding[symbol] = state

    def declare_gap(self, symbol: str, reason: str, now: float, to_a: int | None = None) -> Gap | None:
        """Give up on ``last + 1 .. min(held) - 1`` (or ``.. to_a`` when nothing is held): publish a gap."""
        state = self._states.get(symbol)
        if state is None or state.last is None:
            return None
        end = min(state.held) - 1 if state.held else to_a
        if end is None or end <= state.last:
            return None
        gap = Gap(symbol, state.last + 1, end, reason)
        self.outbox.add_gap(gap)
        self.stats.gaps_unrepaired += 1
        self.stats.ids_unrepaired += end - state.last
        state.last = end
        if state.held:
            self._release(symbol, state, now)
        return gap

    def close(self, reason: str, now: float) -> list[Gap]:
        """Hand every held trade to the outbox, each hole before it as an explicit gap; returns the gaps.

        For the end of a graceful stop, once backfill had its chance: no trade the sequencer accepted is left
        behind, and what could not be repaired is marked (``last`` moves past it, as with :meth:`declare_gap`).
        A fresh symbol starts at its lowest held id, as when its first window ends.
        """
        gaps: list[Gap] = []
        for symbol, state in list(self._holding.items()):
            state.backfilling = False
            if state.last is None:
                state.last = min(state.held) - 1
                self._release(symbol, state, now)
            while state.held:
                gap = self.declare_gap(symbol, reason, now)
                # Held ids are always above last + 1 (contiguous ones are released at once): a hole precedes them.
                assert gap is not None, f"{symbol}: held trades without a hole before them"
                gaps.append(gap)
        return gaps

    # ------------------------------------------------------------------ internals
    def _release(self, symbol: str, state: _SymbolState, now: float) -> None:
        """Move held trades that became contiguous to the outbox; with nothing left held, the hole is over.

        The one place that ends a symbol's holding state: every path that takes held trades away from a tracked
        symbol calls it (:meth:`untrack` discards the whole state).
        """
        held = state.held
        assert state.last is not None
        nxt = state.last + 1
        released = 0
        add = self.outbox.add_trade
        while True:
            trade = held.pop(nxt, None)
            if trade is None:
                break
            add(trade)
            nxt += 1
            released += 1
        state.last = nxt - 1
        self.held_total -= released
        if not held:
            state.held_since = None
            self._holding.pop(symbol, None)
        elif released:
            state.held_since = now  # the next hole gets its own reorder window
