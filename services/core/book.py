"""Incremental klines for one symbol (:class:`KlineBook`) and for many (:class:`KlineBooks`).

How a trade becomes klines, and why it is cheap
------------------------------------------------

Every configured interval's boundaries lie on one common grid (:func:`~services.core.intervals.common_grain`;
usually the shortest interval). Trades are folded only into the running partial of the current grid cell, with
integer arithmetic on prices and quantities scaled by ``10**scale`` (quote volumes by ``10**(2*scale)``);
whole batches are folded with C-level builtins (``max``, ``sum``, ``map``). When a trade (or the clock) leaves
the cell, the cell becomes the shortest interval's kline if that interval is the grid itself, and is merged
into one pending state for the longer intervals; the pending state is settled into each of them only when one
of them closes or is read (``current``, ``drain_changed``, ``export_state``). So the cost per trade does not
depend on the number of intervals, and nothing goes through binary float: Decimals are built only for output.

Ordering and ids
----------------

Within a kline, trades are ordered by ``(T, a)``: ``o``/``f`` come from the first, ``c``/``L`` from the last.
Applied aggregate ids are kept as a compact set of ranges, so a redelivered trade is dropped (``duplicates``)
even when it arrives after later ones, while a trade that fills a hole in ``a`` is applied where it belongs.

Closing, empties and continuity
-------------------------------

1. A trade whose ``T`` lies past an open kline's close time closes that kline first; so does
   :meth:`KlineBook.advance` once ``close_time + grace_ms < now``.
2. A closed kline with trades is emitted with ``source="live"``. An interval without trades is emitted as an
   empty kline (o=h=l=c=previous close, zero volumes, n=0, f=L=-1, ``source="empty"``) only while the book is
   ``continuous`` and a previous close is known; otherwise it is skipped for good — a gap stays visible as a
   gap. The first kline after a fresh start therefore never comes out empty. A gap record from ingest
   (:meth:`KlineBook.mark_gap` with its last missing id) makes the book not continuous only until the first
   trade past the gap: the span the gap leaves unknown is skipped, the intervals after that trade are
   empty for certain and are emitted again.
3. A trade for a kline that is already closed (late: delivered after the clock or a later trade closed it, or
   backfilled into a hole) produces a corrected kline: same ``t``, ``version`` + 1, ``source="repaired"``, on
   the closed list. If it changes that kline's close, the empty klines after it are re-priced the same way. A
   kline that was never emitted (skipped in a gap) is emitted as ``source="repaired"`` with version 0. The
   corrections of one :meth:`KlineBook.apply` call are coalesced: each kline comes out once, one version up.
4. Closed klines are kept for ``repair_horizon_ms`` behind the current grid cell; a trade older than that can
   no longer be folded exactly and is rejected with a reason (:meth:`KlineBook.drain_rejected`), never dropped
   silently.
5. A symbol that leaves the feed (ingest's removal record) ends its book: :meth:`KlineBook.close` finalizes
   every in-progress kline as it stands, ``x`` true and ``source="closed"`` (its interval has not ended: the
   trades it would still have had were never published), and the caller drops the book
   (:meth:`KlineBooks.remove`). Nothing of it is carried over: a symbol that comes back starts a new book at its
   first trade, so no empty kline is ever made up for the span it was away.
6. A trade outside the book's time window (:meth:`KlineBook.set_time_window`: the market's "now" plus a small
   future skew above, minus the trades topic's retention below; the aggregator moves it from its clock) is
   rejected the same way (category ``time``) before it can touch anything: one hostile timestamp in 2090
   would otherwise move the book's position there, and every later real trade would be rejected as late.
   Without a window (the default, and under a clock that knows no time) every time the trade contract
   accepts is taken.

State can be exported to JSON-serialisable data at any point and restored: applying the rest of the stream to
the restored book gives exactly the klines the original would have given.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from decimal import Context, Decimal, Inexact, InvalidOperation, Overflow
from itertools import compress, islice, repeat
from operator import attrgetter, itemgetter, le, lt, mul, sub
from typing import Any, Final

from services.core.intervals import (
    common_grain,
    interval_ms,
    interval_rank,
    next_open,
    open_time,
    sort_intervals,
)
from services.core.models import MAX_DECIMALS, MAX_INTEGER_DIGITS, AggTrade, Kline, ReasonCategory

# Layout of a kline state: a plain list of ints (fast to update, compact to export).
N, O, H, LO, C, V, QV, BV, BQ, F, L, OT, OA, CT, CA = range(15)  # noqa: E741
#: Closed states carry their emitted version after the 15 value fields.
VER: Final = 15

DEFAULT_SCALE: Final = 8
#: Default of ``aggregator.repair_horizon_ms``: how long closed klines are kept for corrections by late trades.
#: Each kept closed kline costs 0.4-0.6 KiB, so a symbol's cost is that times the klines closing within the
#: horizon, summed over the intervals (``benchmarks/bench_repair_horizon.py``): ~1.5 MiB per hour of horizon
#: with ``1s`` among the intervals (3,600 ``1s`` klines), ~41 KiB per hour for the default ``1m`` to ``1w``;
#: at 2,000 symbols ~2.9 GiB and ~81 MiB per hour. So the default is not the trades retention (7 days: ~13 GiB
#: at 2,000 symbols even without ``1s``).
DEFAULT_REPAIR_HORIZON_MS: Final = 600_000
#: A single jump over more empty intervals than this is treated as unproven continuity (a runaway clock or a
#: far-future timestamp must not make the book emit millions of empty klines).
MAX_EMPTY_RUN: Final = 100_000
#: At most this many disjoint runs of applied ids are remembered; beyond it the oldest hole is forgotten.
MAX_ID_RANGES: Final = 4_096
#: Entries of the shared cache of parsed decimal texts (prices and quantities), cleared when full: ~16 MB at
#: the limit. A long run fills it within minutes to tens of minutes (most quantities are distinct), so a
#: process's memory grows by that much before it is flat.
_CACHE_LIMIT: Final = 1 << 17
#: The Decimals of output prices (o/h/l/c) are cached separately and fewer: each entry is ~100 bytes, only
#: klines read them, and with thousands of symbols the cache filled to 1 << 17 (13 MB of the aggregator's
#: 2,000 x 7 books) for a hit rate that a cache an eighth of that size also has.
_PRICE_CACHE_LIMIT: Final = 1 << 14
_NEVER: Final = 1 << 62
_MAX_TEXT: Final = 48  # longest decimal string accepted (the parser's own bound is 24 + 1 + 18)
_STATE_FORMAT: Final = 1
#: Batches up to this size are folded trade by trade; longer ones column-wise (cheaper per trade, dearer to set up).
_SCALAR_BATCH: Final = 8

_COLUMNS = attrgetter("s", "a", "T", "p", "q", "f", "l", "m")
_ORDER = attrgetter("T", "a")
_FIRST = itemgetter(0)
_CLOSE_ORDER = itemgetter(0, 1)
_POW10: Final[tuple[int, ...]] = tuple(int(10**k) for k in range(64))
_ZERO = Decimal(0)
#: A batch of one symbol's trades as columns: ``a``, ``T``, ``p``, ``q``, ``f``, ``l``, ``m``.
TradeColumns = tuple[
    Sequence[int], Sequence[int], Sequence[str], Sequence[str], Sequence[int], Sequence[int], Sequence[bool]
]
# Room for any sum the book can build; Inexact trapped so that a rounding could never pass silently.
_EXACT = Context(prec=400, traps=[Inexact, InvalidOperation, Overflow])


@dataclass(frozen=True, slots=True)
class RejectedTrade:
    """A trade the book could not apply, with the reason and its category (for the dead-letter topic)."""

    trade: AggTrade
    reason: str
    category: ReasonCategory


class _Keep:
    """The type of :data:`_KEEP`: "keep what the saved state says" (``None`` means "no horizon")."""


_KEEP: Final = _Keep()


class TimeWindow:
    """The trade times a book accepts: ``low <= T <= high`` (shared by the books of one :class:`KlineBooks`).

    ``reference`` is the "now" the window was set from (for the rejection's reason); without a window every
    bound is out of reach.
    """

    __slots__ = ("high", "low", "reference")

    def __init__(self) -> None:
        self.low = -_NEVER
        self.high = _NEVER
        self.reference: int | None = None

    def set(self, now_ms: int | None, future_ms: int | None, past_ms: int | None) -> None:
        """Accept ``now - past_ms <= T <= now + future_ms``; ``None`` for a side (or for ``now``) lifts it."""
        self.reference = now_ms
        self.high = _NEVER if now_ms is None or future_ms is None else now_ms + future_ms
        self.low = -_NEVER if now_ms is None or past_ms is None else now_ms - past_ms

    def reason(self, t: int) -> str | None:
        """Why ``t`` is outside the window, or None when it is inside."""
        if t > self.high:
            return (
                f"trade time T={t} is {t - self.high} ms past the accepted window's end {self.high} "
                f"(the market's now {self.reference} plus the accepted future skew)"
            )
        if t < self.low:
            return (
                f"trade time T={t} is {self.low - t} ms before the accepted window's start {self.low} "
                f"(the market's now {self.reference} minus the trades topic's retention)"
            )
        return None


class _NeedScale(Exception):
    """A decimal string has more significant decimals than the book's scale: the scale must grow first."""

    def __init__(self, decimals: int) -> None:
        super().__init__(decimals)
        self.decimals = decimals


# Shared across books: the scaled value of a decimal string does not depend on the symbol.
_SCALED_CACHES: dict[int, dict[str, int]] = {}


def _scaled_cache(scale: int) -> dict[str, int]:
    return _SCALED_CACHES.setdefault(scale, {})


def _parse_scaled(text: str, scale: int) -> int:
    """``text`` times ``10**scale`` as an exact int; ValueError unless it is a plain decimal > 0 as the trade
    contract defines it (:func:`~services.core.models.check_positive_decimal`: 1 to 24 digits, then optionally
    a point and 1 to 18 digits).

    Raises :class:`_NeedScale` when ``text`` has more significant decimals than ``scale``.
    """
    if type(text) is not str or not 0 < len(text) <= _MAX_TEXT:
        raise ValueError(f"{str(text)[:40]!r} is not a decimal string")
    point = text.find(".")
    if point < 0:
        digits, places = text, 0
        integer_digits = len(text)
    else:
        digits, places = text[:point] + text[point + 1 :], len(text) - point - 1
        integer_digits = point
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"{text[:40]!r} is not a plain decimal string")
    if not 0 < integer_digits <= MAX_INTEGER_DIGITS or (point >= 0 and not 0 < places <= MAX_DECIMALS):
        raise ValueError(
            f"{text[:40]!r} is not a plain decimal (1 to {MAX_INTEGER_DIGITS} digits, a point, 1 to {MAX_DECIMALS})"
        )
    if places > scale:
        needed = places - min(places, len(digits) - len(digits.rstrip("0")))
        if needed > scale:
            raise _NeedScale(needed)
        value = int(digits) // _POW10[places - scale]
    else:
        value = int(digits) * _POW10[scale - places]
    if value <= 0:
        raise ValueError(f"{text!r} is not greater than zero")
    return value


def _dec(value: int, scale: int) -> Decimal:
    """Exact Decimal of ``value / 10**scale``; at most 8 decimals shown when that is exact (as Binance does)."""
    if scale > 8 and value % _POW10[scale - 8] == 0:
        value //= _POW10[scale - 8]
        scale = 8
    return Decimal(value).scaleb(-scale, _EXACT)


# Decimal conversions of prices repeat (o/h/l/c across intervals, empty klines): cache them per scale.
_PRICE_DECIMALS: dict[int, dict[int, Decimal]] = {}


def _price_decimals(scale: int) -> dict[int, Decimal]:
    return _PRICE_DECIMALS.setdefault(scale, {})


def _trade_state(t: int, a: int, p: int, q: int, f: int, last: int, m: bool) -> list[int]:
    pq = p * q
    return [last - f + 1, p, p, p, p, q, pq, 0 if m else q, 0 if m else pq, f, last, t, a, t, a]


def _empty_state(price: int) -> list[int]:
    return [0, price, price, price, price, 0, 0, 0, 0, -1, -1, 0, 0, 0, 0]


def _fold(st: list[int], t: int, a: int, p: int, q: int, f: int, last: int, m: bool) -> bool:
    """Fold one trade into a non-empty state; True when it became the state's last trade (its close)."""
    st[N] += last - f + 1
    if p > st[H]:
        st[H] = p
    if p < st[LO]:
        st[LO] = p
    pq = p * q
    st[V] += q
    st[QV] += pq
    if not m:
        st[BV] += q
        st[BQ] += pq
    if t < st[OT] or (t == st[OT] and a < st[OA]):
        st[O], st[F], st[OT], st[OA] = p, f, t, a
    if t > st[CT] or (t == st[CT] and a > st[CA]):
        st[C], st[L], st[CT], st[CA] = p, last, t, a
        return True
    return False


def _merge(acc: list[int], part: list[int]) -> None:
    """Merge the non-empty state ``part`` into the non-empty state ``acc``."""
    acc[N] += part[N]
    if part[H] > acc[H]:
        acc[H] = part[H]
    if part[LO] < acc[LO]:
        acc[LO] = part[LO]
    acc[V] += part[V]
    acc[QV] += part[QV]
    acc[BV] += part[BV]
    acc[BQ] += part[BQ]
    if part[OT] < acc[OT] or (part[OT] == acc[OT] and part[OA] < acc[OA]):
        acc[O], acc[F], acc[OT], acc[OA] = part[O], part[F], part[OT], part[OA]
    if part[CT] > acc[CT] or (part[CT] == acc[CT] and part[CA] > acc[CA]):
        acc[C], acc[L], acc[CT], acc[CA] = part[C], part[L], part[CT], part[CA]


def _rescale_state(st: list[int], price_factor: int) -> None:
    if st[N] == 0:
        st[O] = st[H] = st[LO] = st[C] = st[C] * price_factor
        return
    for index in (O, H, LO, C, V, BV):
        st[index] *= price_factor
    for index in (QV, BQ):
        st[index] *= price_factor * price_factor


class _Track:
    """One interval's position: its open kline and the recently closed ones (for corrections)."""

    __slots__ = ("acc", "closed", "first_t", "last_close", "last_key", "name", "nt", "rank", "size", "t")

    def __init__(self, name: str) -> None:
        self.name = name
        self.rank = interval_rank(name)
        self.size = interval_ms(name)
        self.t = 0  # open time of the open kline
        self.nt = 0  # next open time (close time + 1)
        self.acc: list[int] | None = None  # trades of the open kline, except the current grid cell's
        self.last_close: int | None = None  # close of the latest trade before t: the price of an empty kline
        self.last_key: tuple[int, int] = (-1, -1)  # (T, a) of that trade
        self.first_t = 0  # earliest kline this book knows about; older ones are "before the start"
        self.closed: dict[int, list[int]] = {}  # open time -> state + [version], for corrections

    def close_of(self, t: int) -> int:
        if self.size is not None:
            return t + self.size - 1
        return next_open(self.name, t) - 1

    def count_between(self, start: int, end: int) -> int:
        """Number of klines opening in [start, end)."""
        if end <= start:
            return 0
        if self.size is not None:
            return (end - start) // self.size
        count = 0
        while start < end and count <= MAX_EMPTY_RUN:
            start = next_open(self.name, start)
            count += 1
        return count


class KlineBook:
    """The open klines of every configured interval for one symbol; see the module docstring for the rules.

    Not thread-safe; one owner applies trades, advances the clock and drains the output.
    """

    def __init__(
        self,
        symbol: str,
        intervals: Sequence[str],
        *,
        grace_ms: int = 0,
        repair_horizon_ms: int | None = DEFAULT_REPAIR_HORIZON_MS,
        window: TimeWindow | None = None,
    ) -> None:
        if isinstance(intervals, str):
            raise TypeError("intervals must be a sequence of interval names, not a string")
        names = sort_intervals(intervals)
        if not names:
            raise ValueError("KlineBook needs at least one interval")
        if grace_ms < 0:
            raise ValueError(f"grace_ms must be >= 0, got {grace_ms}")
        if repair_horizon_ms is not None and repair_horizon_ms < 0:
            raise ValueError(f"repair_horizon_ms must be >= 0 or None, got {repair_horizon_ms}")
        self._symbol = symbol
        self._names = names
        self._grace = grace_ms
        self._horizon = repair_horizon_ms
        self._window = TimeWindow() if window is None else window
        self._grain, self._grain_offset = common_grain(names)
        self._tracks = [_Track(name) for name in names]
        shortest = self._tracks[0]
        # The shortest interval may be the grid itself: its open kline is then the current cell's partial.
        aligned = shortest.size == self._grain and open_time(shortest.name, self._grain_offset) == self._grain_offset
        self._grain_track = 0 if aligned else -1
        self._pending: list[int] | None = None  # cells already left, not yet merged into the longer intervals
        self._next_close = _NEVER  # earliest close among those longer intervals
        self._gs: int | None = None  # start of the current grid cell
        self._ge = 0  # its end (exclusive)
        self._part: list[int] | None = None  # trades of the current grid cell
        self._ranges: list[list[int]] = []  # applied aggregate ids, disjoint sorted [low, high] runs
        self._hi: tuple[int, int] = (-1, -1)  # greatest (T, a) applied
        self._next_evict = 0  # grid position at which closed klines are next checked against the horizon
        self._scale = DEFAULT_SCALE
        self._cache = _scaled_cache(DEFAULT_SCALE)
        self._prices = _price_decimals(DEFAULT_SCALE)
        self._continuous = True
        #: An open gap's last missing id (``mark_gap(through_a)``): continuity returns with the first trade past it.
        self._gap_until: int | None = None
        self._closed_out: list[Kline] = []
        self._rejected: list[RejectedTrade] = []
        self._dirty: set[int] = set()
        self._dirty_all = False
        self._touched: dict[tuple[int, int], bool] = {}  # closed klines corrected in this batch -> created empty
        self.duplicates = 0
        """Trades dropped because their aggregate id was already applied."""
        self.late = 0
        """Trades that corrected (or created) an already-closed kline."""
        self.rejected = 0
        """Trades rejected (wrong symbol, bad numbers, older than the repair horizon)."""
        self.empty_runs_skipped = 0
        """Runs of more than MAX_EMPTY_RUN empty klines that were skipped instead of emitted."""
        self.forgotten_holes = 0
        """Holes in the applied ids forgotten because more than MAX_ID_RANGES were open."""

    # ------------------------------------------------------------------------------------------- properties

    @property
    def symbol(self) -> str:
        return self._symbol

    @property
    def intervals(self) -> tuple[str, ...]:
        """Configured intervals, shortest first."""
        return self._names

    @property
    def grace_ms(self) -> int:
        return self._grace

    @property
    def window(self) -> TimeWindow:
        """The trade times this book accepts (rule 5 of the module docstring)."""
        return self._window

    def set_time_window(self, now_ms: int | None, future_ms: int | None, past_ms: int | None) -> None:
        """Accept only trades with ``now - past_ms <= T <= now + future_ms`` (:meth:`TimeWindow.set`); a book of
        a :class:`KlineBooks` shares its window with the others (:meth:`KlineBooks.set_time_window`)."""
        self._window.set(now_ms, future_ms, past_ms)

    @property
    def last_a(self) -> int | None:
        """Greatest aggregate id applied so far (None before the first trade)."""
        return self._ranges[-1][1] if self._ranges else None

    @property
    def continuous(self) -> bool:
        """Whether empty klines may be emitted (the caller vouches that the feed has no unrepaired gap)."""
        return self._continuous

    @continuous.setter
    def continuous(self, value: bool) -> None:
        if bool(value) != self._continuous:
            self._continuous = bool(value)
            self._dirty_all = self._gs is not None  # an empty open kline appears or disappears

    def mark_gap(self, through_a: int | None = None) -> None:
        """The feed has an unrepaired gap: intervals without trades are skipped, not emitted, while it is open.

        With ``through_a`` (the gap's last missing id: ingest publishes a gap record in the symbol's order, and
        every trade after it is above that id and contiguous again), the gap closes by itself with the first
        trade past it: the intervals between the last trade before the gap and that trade are unknown and stay
        skipped; from that trade on the feed is continuous and empty intervals are emitted again. A gap whose
        ids are all below a trade already applied is history (a record read again) and changes nothing. Without
        ``through_a`` the gap stays open until :meth:`mark_continuous`.
        """
        if through_a is not None:
            last = self.last_a
            if last is not None and last > through_a:
                return
            gap_until = self._gap_until
            self._gap_until = through_a if gap_until is None else max(gap_until, through_a)
        self.continuous = False

    def mark_continuous(self) -> None:
        """The feed is provably continuous again: empty klines are emitted from now on (not retroactively)."""
        self._gap_until = None
        self.continuous = True

    def holes(self) -> list[tuple[int, int]]:
        """Missing aggregate ids between the first and the last applied one: inclusive (low, high) ranges."""
        runs = self._ranges
        return [(runs[k][1] + 1, runs[k + 1][0] - 1) for k in range(len(runs) - 1)]

    # ----------------------------------------------------------------------------------------------- input

    def apply_columns(self, columns: TradeColumns) -> None:
        """:meth:`apply` for a batch given as columns ``(a, T, p, q, f, l, m)`` instead of :class:`AggTrade` s.

        The values must be what :func:`~services.core.models.parse_agg_trade` accepts (ints in range, ``f <= l``,
        plain decimal strings > 0): the aggregator's decoder checks exactly that. The usual batch — this
        symbol's next trades, in order — is folded without building one object per trade; any other batch
        (late, duplicate, out of order) takes :meth:`apply`'s way with the same results.
        """
        if not self.extend(columns):
            self.apply(self._trades_of(columns))

    def extend(self, columns: TradeColumns) -> bool:
        """Fold the batch if it simply continues the stream, else change nothing and return False.

        "Continues": ids strictly increasing and above every applied id, times not decreasing and not before
        the newest applied trade (a hole in the ids is fine: it is remembered). Values as for
        :meth:`apply_columns`, except that prices and quantities need not be checked: a batch with a text that
        is not a plain decimal > 0 as the trade contract defines it is refused. The cheap case of
        :meth:`apply_columns`, for callers that handle the rest themselves (the aggregator joins consecutive
        records of a symbol and falls back record by record).
        """
        if self._gap_until is not None:
            return False  # apply() ends the open gap at its first trade past it
        ids, times, prices, quantities, firsts, lasts, makers = columns
        if len(ids) == 1:
            return self._next(ids[0], times[0], prices[0], quantities[0], firsts[0], lasts[0], makers[0])
        return bool(ids) and self._extend(columns)

    def _trades_of(self, columns: TradeColumns) -> list[AggTrade]:
        ids, times, prices, quantities, firsts, lasts, makers = columns
        return list(map(AggTrade, repeat(self._symbol), ids, prices, quantities, firsts, lasts, times, makers))

    def apply(self, trades: Sequence[AggTrade]) -> None:
        """Fold a batch of this symbol's trades (any order; sorted by ``(T, a)`` here when needed).

        Corrections caused by late trades of one batch are coalesced: each corrected kline is emitted once per
        batch, with its version raised by one.
        """
        if self._gap_until is not None:
            self._apply_across_gap(trades)
            return
        self._apply(trades)

    def _apply_across_gap(self, trades: Sequence[AggTrade]) -> None:
        """:meth:`apply` while a gap is open: the trades up to the first one past the gap still close the unknown
        span without empty klines; that trade proves the feed continuous (:meth:`mark_gap`), so the rest are
        folded with empty intervals emitted again."""
        through = self._gap_until
        assert through is not None
        try:
            ordered = sorted(trades, key=_ORDER)
        except TypeError:  # not comparable: each trade is rejected with its reason by the usual way
            self._apply(trades)
            return
        for k, trade in enumerate(ordered):
            if type(trade.a) is int and trade.a > through:
                self._apply(ordered[: k + 1])
                self.mark_continuous()
                if k + 1 < len(ordered):
                    self._apply(ordered[k + 1 :])
                return
        self._apply(ordered)

    def _apply(self, trades: Sequence[AggTrade]) -> None:
        if len(trades) == 1 and self._apply_next(trades[0]):
            return  # the common case of a quiet symbol: one trade that simply continues the stream
        self._apply_batch(trades)
        if self._touched:
            self._flush_repairs()

    def _apply_batch(self, trades: Sequence[AggTrade]) -> None:
        count = len(trades)
        if count <= _SCALAR_BATCH:
            if count == 1:
                self._apply_each(trades)  # apply() already tried the quick way
                return
            if count == 0:
                return
            try:
                ordered = sorted(trades, key=_ORDER)
            except TypeError:  # not comparable: each trade is rejected with its reason below
                ordered = list(trades)
            for trade in ordered:
                if not self._apply_next(trade):
                    self._apply_one_or_reject(trade)
            return
        symbols, ids, times, prices, quantities, firsts, lasts, makers = zip(*map(_COLUMNS, trades), strict=True)
        if symbols.count(self._symbol) != count:
            self._apply_each(trades)
            return
        ranges = self._ranges
        if ranges and ids[0] <= ranges[-1][1] and len(ranges) == 1 and ids[0] >= ranges[0][0]:
            # A redelivered prefix (replay after a restart): drop it in one step when it is all known.
            try:
                cut = bisect_right(ids, ranges[-1][1]) if all(map(lt, ids, ids[1:])) else 0
            except TypeError:
                cut = 0
            if cut:
                self.duplicates += cut
                if cut < count:
                    self._apply_batch(trades[cut:])
                return
        if not self._extend((ids, times, prices, quantities, firsts, lasts, makers)):
            self._apply_each(trades)

    def _extend(self, columns: TradeColumns) -> bool:
        """:meth:`extend` for two or more trades; the book is unchanged when it returns False (but a rescale)."""
        ids, times, prices, quantities, firsts, lasts, makers = columns
        try:
            if not (all(map(lt, ids, ids[1:])) and all(map(le, times, times[1:])) and ids[0] >= 0):
                return False
        except TypeError:
            return False
        window = self._window
        if times[-1] > window.high or times[0] < window.low:
            return False  # the long way rejects what is outside the window
        ranges = self._ranges
        if ranges and ids[0] <= ranges[-1][1]:
            return False
        gs = self._gs
        if gs is not None and (times[0] < gs or (times[0], ids[0]) <= self._hi):
            return False
        scale = -1
        scaled_p: list[int] | None = None
        scaled_q: list[int] | None = None
        while scale != self._scale:
            scale = self._scale
            scaled_p = self._scaled_all(prices, True)
            scaled_q = self._scaled_all(quantities, False) if scaled_p is not None else None
            if scaled_q is None:
                return False
        assert scaled_p is not None and scaled_q is not None
        if gs is None:
            self._start(times[0])
        self._fold_sorted(ids, times, scaled_p, scaled_q, firsts, lasts, makers)
        self._record_ids(ids)
        return True

    def _apply_next(self, trade: AggTrade) -> bool:
        """Fold ``trade`` if it simply continues the stream (next id, not older); False to take the long way."""
        a, t, first, last = trade.a, trade.T, trade.f, trade.l
        if (
            trade.s != self._symbol
            or type(a) is not int
            or type(t) is not int
            or type(first) is not int
            or type(last) is not int
            or first > last
        ):
            return False
        return self._next(a, t, trade.p, trade.q, first, last, trade.m)

    def _next(self, a: int, t: int, p_text: str, q_text: str, first: int, last: int, m: bool) -> bool:
        """:meth:`_apply_next` for checked values (ints, ``first <= last``)."""
        ranges = self._ranges
        gs = self._gs
        window = self._window
        if (
            gs is None
            or not ranges
            or a != ranges[-1][1] + 1
            or t < gs
            or t < self._hi[0]
            or t > window.high
            or t < window.low
        ):
            return False
        cache = self._cache
        scale = self._scale
        try:
            p = cache.get(p_text)
            if p is None:
                p = _parse_scaled(p_text, scale)
                if len(cache) > _CACHE_LIMIT:
                    cache.clear()
                cache[p_text] = p
            q = _parse_scaled(q_text, scale)
        except (ValueError, TypeError, _NeedScale):  # the long way rejects or rescales
            return False
        if t >= self._ge:
            self._roll(self._cell_of(t))
        part = self._part
        if part is None:
            self._part = _trade_state(t, a, p, q, first, last, bool(m))
        else:
            part[N] += last - first + 1
            if p > part[H]:
                part[H] = p
            elif p < part[LO]:
                part[LO] = p
            pq = p * q
            part[V] += q
            part[QV] += pq
            if not m:
                part[BV] += q
                part[BQ] += pq
            part[C] = p
            part[L] = last
            part[CT] = t
            part[CA] = a
        ranges[-1][1] = a
        self._hi = (t, a)
        self._dirty_all = True
        return True

    def _apply_one_or_reject(self, trade: AggTrade) -> None:
        rejected = self._apply_one(trade)
        if rejected is not None:
            self.rejected += 1
            self._rejected.append(rejected)

    def _scaled_all(self, texts: Sequence[str], cached: bool) -> list[int] | None:
        """Scaled ints for ``texts``, or None if one is not a valid decimal > 0. May raise the book's scale.

        With ``cached`` (prices, which repeat) the shared cache answers first. Otherwise, and on a miss, the
        whole batch is converted with C-level ``map`` calls when every string has the same number of decimals
        (Binance pads to the symbol's precision), else one string at a time.
        """
        cache = self._cache
        if cached:
            try:
                return list(map(cache.__getitem__, texts))
            except (KeyError, TypeError):
                pass
        scale = self._scale
        try:
            # Every text the quick way takes is a plain decimal as the trade contract defines it: 1 to 24
            # digits (the point's position), a point and 1 to scale (<= 18) digits, or no point at all.
            dots = list(map(str.find, texts, repeat(".")))
            if 0 < min(dots) and max(dots) <= MAX_INTEGER_DIGITS:
                decimals = set(map(sub, map(len, texts), dots))
                digits = list(map(str.replace, texts, repeat("."), repeat(""), repeat(1)))
                places = decimals.pop() - 1 if len(decimals) == 1 else scale + 1
                if places == 0:
                    places = scale + 1  # "5.": the long way refuses it
            elif max(dots) < 0 and max(map(len, texts)) <= MAX_INTEGER_DIGITS:
                digits, places = list(texts), 0
            else:
                places = scale + 1
            if places <= scale:
                joined = "".join(digits)
                if joined.isascii() and joined.isdigit():
                    values = list(map(int, digits))
                    if places < scale:
                        values = list(map(mul, values, repeat(_POW10[scale - places])))
                    if min(values) > 0:
                        if cached:
                            if len(cache) > _CACHE_LIMIT:
                                cache.clear()
                            cache.update(zip(texts, values, strict=True))
                        return values
        except (TypeError, ValueError):
            return None
        values = []
        for text in texts:
            try:
                values.append(_parse_scaled(text, self._scale))
            except _NeedScale as need:
                self._rescale(need.decimals)
                return self._scaled_all(texts, cached)
            except ValueError:
                return None
        return values

    def _scaled(self, text: str) -> int:
        value = self._cache.get(text) if type(text) is str else None
        if value is None:
            try:
                value = _parse_scaled(text, self._scale)
            except _NeedScale as need:
                self._rescale(need.decimals)
                return self._scaled(text)
            if len(self._cache) > _CACHE_LIMIT:  # bounded like the column paths' cache fills
                self._cache.clear()
            self._cache[text] = value
        return value

    def _fold_sorted(
        self,
        ids: Sequence[int],
        times: Sequence[int],
        prices: list[int],
        quantities: list[int],
        firsts: Sequence[int],
        lasts: Sequence[int],
        makers: Sequence[bool],
    ) -> None:
        """Fold trades that are in (T, a) order, all newer than anything applied, into the grid cells."""
        count = len(ids)
        start = 0
        while start < count:
            if times[start] >= self._ge:
                self._roll(self._cell_of(times[start]))
            end = count if times[-1] < self._ge else bisect_left(times, self._ge, start)
            if end - start == 1 and self._part is None:  # a lone trade in its cell: no column work
                self._part = _trade_state(
                    times[start], ids[start], prices[start], quantities[start], firsts[start], lasts[start],
                    bool(makers[start]),
                )  # fmt: skip
                start = end
                continue
            if start == 0 and end == count:
                ps, qs, ms = prices, quantities, makers
                n_trades = sum(lasts) - sum(firsts) + count
            else:
                ps, qs, ms = prices[start:end], quantities[start:end], makers[start:end]
                n_trades = sum(lasts[start:end]) - sum(firsts[start:end]) + end - start
            pqs = list(map(mul, ps, qs))
            volume = sum(qs)
            quote = sum(pqs)
            if True in ms:
                buy_volume = volume - sum(compress(qs, ms))
                buy_quote = quote - sum(compress(pqs, ms))
            else:
                buy_volume, buy_quote = volume, quote
            high = max(ps)
            low = min(ps)
            last = end - 1
            part = self._part
            if part is None:
                self._part = [
                    n_trades,
                    ps[0],
                    high,
                    low,
                    ps[-1],
                    volume,
                    quote,
                    buy_volume,
                    buy_quote,
                    firsts[start],
                    lasts[last],
                    times[start],
                    ids[start],
                    times[last],
                    ids[last],
                ]
            else:
                part[N] += n_trades
                if high > part[H]:
                    part[H] = high
                if low < part[LO]:
                    part[LO] = low
                part[C] = ps[-1]
                part[V] += volume
                part[QV] += quote
                part[BV] += buy_volume
                part[BQ] += buy_quote
                part[L] = lasts[last]
                part[CT] = times[last]
                part[CA] = ids[last]
            start = end
        self._hi = (times[-1], ids[-1])
        self._dirty_all = True

    def _record_ids(self, ids: Sequence[int]) -> None:
        """Add strictly increasing ids, all greater than any applied, to the applied ranges."""
        ranges = self._ranges
        if ids[-1] - ids[0] == len(ids) - 1:
            if ranges and ranges[-1][1] + 1 == ids[0]:
                ranges[-1][1] = ids[-1]
            else:
                ranges.append([ids[0], ids[-1]])
        else:
            for a in ids:
                if ranges and ranges[-1][1] + 1 == a:
                    ranges[-1][1] = a
                else:
                    ranges.append([a, a])
        if len(ranges) > MAX_ID_RANGES:
            self._forget_oldest_hole()

    def _apply_each(self, trades: Iterable[AggTrade]) -> None:
        """The general path: one trade at a time, in (T, a) order, any of them late, duplicate or invalid."""
        try:
            ordered = sorted(trades, key=_ORDER)
        except TypeError:
            ordered = list(trades)
        for trade in ordered:
            self._apply_one_or_reject(trade)

    def _apply_one(self, trade: AggTrade) -> RejectedTrade | None:
        if trade.s != self._symbol:
            return RejectedTrade(trade, f"trade of symbol {trade.s!r} given to the book of {self._symbol!r}", "symbol")
        a, t, f, last, m = trade.a, trade.T, trade.f, trade.l, trade.m
        if type(a) is not int or type(t) is not int or type(f) is not int or type(last) is not int:
            return RejectedTrade(trade, "a, T, f and l must be integers", "field")
        if a < 0 or f > last:
            return RejectedTrade(trade, f"invalid ids a={a} f={f} l={last}", "field")
        if not self._window.low <= t <= self._window.high:
            outside = self._window.reason(t)
            assert outside is not None
            return RejectedTrade(trade, outside, "time")
        if self._seen(a):
            self.duplicates += 1
            return None
        try:
            while True:
                scale = self._scale
                p = self._scaled(trade.p)
                q = self._scaled(trade.q)
                if scale == self._scale:
                    break
        except ValueError as exc:
            return RejectedTrade(trade, f"bad price or quantity: {exc}", "field")
        if self._gs is None:
            self._start(t)
        assert self._gs is not None
        if t >= self._gs:
            if t >= self._ge:
                self._roll(self._cell_of(t))
            part = self._part
            if part is None:
                self._part = _trade_state(t, a, p, q, f, last, bool(m))
            else:
                _fold(part, t, a, p, q, f, last, bool(m))
            self._dirty_all = True
        else:
            horizon = self._horizon
            if horizon is not None and t < self._gs - horizon:
                return RejectedTrade(
                    trade,
                    f"trade time {t} is more than the repair horizon ({horizon} ms) before the book's "
                    f"position {self._gs}; its klines can no longer be corrected exactly",
                    "late",
                )
            self._fold_late(t, a, p, q, f, last, bool(m))
        self._mark(a)
        if (t, a) > self._hi:
            self._hi = (t, a)
        return None

    # ------------------------------------------------------------------------------------------ id ranges

    def _seen(self, a: int) -> bool:
        ranges = self._ranges
        if not ranges or a > ranges[-1][1]:
            return False
        k = bisect_right(ranges, a, key=_FIRST) - 1
        return k >= 0 and ranges[k][1] >= a

    def _mark(self, a: int) -> None:
        ranges = self._ranges
        if ranges and ranges[-1][1] + 1 == a:
            ranges[-1][1] = a
            return
        k = bisect_right(ranges, a, key=_FIRST)  # ranges[k-1].low <= a < ranges[k].low
        joins_left = k > 0 and ranges[k - 1][1] + 1 == a
        joins_right = k < len(ranges) and ranges[k][0] - 1 == a
        if joins_left and joins_right:
            ranges[k - 1][1] = ranges[k][1]
            del ranges[k]
        elif joins_left:
            ranges[k - 1][1] = a
        elif joins_right:
            ranges[k][0] = a
        else:
            ranges.insert(k, [a, a])
            if len(ranges) > MAX_ID_RANGES:
                self._forget_oldest_hole()

    def _forget_oldest_hole(self) -> None:
        ranges = self._ranges
        ranges[0][1] = ranges[1][1]
        del ranges[1]
        self.forgotten_holes += 1

    # --------------------------------------------------------------------------------------- grid & close

    def _cell_of(self, t: int) -> int:
        return (t - self._grain_offset) // self._grain * self._grain + self._grain_offset

    def _start(self, t: int) -> None:
        """Position a fresh book at the trade time ``t``: nothing before it is known."""
        self._gs = self._cell_of(t)
        self._ge = self._gs + self._grain
        for track in self._tracks:
            track.t = track.first_t = open_time(track.name, t)
            track.nt = next_open(track.name, track.t)
        self._next_close = self._first_close()

    def _roll(self, cell: int) -> None:
        """Move to the grid cell starting at ``cell`` (> current): merge the partial, close passed klines."""
        if self._touched:
            self._flush_repairs()  # before anything can be evicted, and in order with the closes that follow
        part = self._part
        tracks = self._tracks
        grain_track = self._grain_track
        if part is not None:
            # The cell's trades go to the interval whose klines are the cells themselves (if any) at once, and
            # to the longer intervals lazily: merged into one pending state, settled only when one of them
            # closes or is read. So a roll costs O(1) until a longer kline actually closes.
            if grain_track >= 0:
                tracks[grain_track].acc = part
                part = part.copy() if len(tracks) > 1 else None
            if part is not None:
                if self._pending is None:
                    self._pending = part
                else:
                    _merge(self._pending, part)
            self._part = None
        emitted: list[tuple[int, int, Kline]] = []
        if grain_track >= 0:  # its kline is the cell just left: it always closes
            self._close_track(tracks[grain_track], cell, emitted)
            self._dirty.add(grain_track)
        if cell >= self._next_close:
            self._settle()
            for index, track in enumerate(tracks):
                if index != grain_track and cell >= track.nt:
                    self._close_track(track, cell, emitted)
                    self._dirty.add(index)
            self._next_close = self._first_close()
        self._gs = cell
        self._ge = cell + self._grain
        if emitted:
            if len(emitted) > 1:
                emitted.sort(key=_CLOSE_ORDER)
            self._closed_out.extend([kline for _, _, kline in emitted])
            if cell >= self._next_evict:
                self._evict()

    def _first_close(self) -> int:
        """Earliest next-open among the intervals that receive cells lazily (those needing a settle)."""
        return min(
            (track.nt for index, track in enumerate(self._tracks) if index != self._grain_track),
            default=_NEVER,
        )

    def _settle(self) -> None:
        """Merge the pending cells into the open kline of every interval longer than the grid."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        for index, track in enumerate(self._tracks):
            if index == self._grain_track:
                continue
            if track.acc is None:
                track.acc = pending.copy()
            else:
                _merge(track.acc, pending)

    def _close_track(self, track: _Track, cell: int, out: list[tuple[int, int, Kline]]) -> None:
        """Close ``track``'s open kline and any wholly passed ones, up to the kline containing ``cell``."""
        acc = track.acc
        continuous = self._continuous
        rank = track.rank
        if acc is not None:
            track.closed[track.t] = [*acc, 0]
            out.append((track.nt, rank, self._kline(track, track.t, acc, True, 0, "live")))
            track.last_close = acc[C]
            track.last_key = (acc[CT], acc[CA])
            track.acc = None
        elif continuous and track.last_close is not None:
            out.append((track.nt, rank, self._empty_closed(track, track.t)))
        target = open_time(track.name, cell)
        t = track.nt
        if t < target and continuous and track.last_close is not None:
            if track.count_between(t, target) > MAX_EMPTY_RUN:
                self.empty_runs_skipped += 1
            else:
                self._empty_run(track, t, target, out, cell)
        track.t = target
        track.nt = next_open(track.name, target)

    def _empty_run(self, track: _Track, t: int, end: int, out: list[tuple[int, int, Kline]], cell: int) -> None:
        """Record and emit the empty klines opening in [t, end): the hot loop of quiet symbols.

        Only those within the repair horizon of ``cell`` (the grid cell the book moves to) are recorded for
        corrections: a trade for an older one is rejected anyway (it is older than the horizon), so recording
        it would only cost its eviction (a quiet stretch of weeks closes ~10^5 at once).
        """
        price = track.last_close
        assert price is not None
        shown = self._price_decimal(price)
        closed, size, name, rank, symbol = track.closed, track.size, track.name, track.rank, self._symbol
        horizon = self._horizon
        keep_after = cell - horizon if horizon is not None else -_NEVER  # a kline ending after this is kept
        while t < end:
            following = t + size if size is not None else next_open(name, t)
            if following > keep_after:
                closed[t] = [0, price, price, price, price, 0, 0, 0, 0, -1, -1, 0, 0, 0, 0, 0]
            kline = Kline(
                symbol, name, t, following - 1, -1, -1, shown, shown, shown, shown, _ZERO, 0, True, _ZERO,
                _ZERO, _ZERO, 0, "empty",
            )  # fmt: skip
            out.append((following, rank, kline))
            t = following

    def _price_decimal(self, price: int) -> Decimal:
        prices = self._prices
        shown = prices.get(price)
        if shown is None:
            if len(prices) > _PRICE_CACHE_LIMIT:
                prices.clear()
            shown = prices[price] = _dec(price, self._scale)
        return shown

    def _empty_closed(self, track: _Track, t: int) -> Kline:
        """Record and build the closed empty kline at ``t`` (priced at the track's previous close)."""
        assert track.last_close is not None
        state = _empty_state(track.last_close)
        track.closed[t] = [*state, 0]
        return self._kline(track, t, state, True, 0, "empty")

    def _evict(self) -> None:
        """Forget closed klines that ended before the repair horizon (late trades that old are rejected).

        Closed klines are kept in insertion order, which is their time order except for klines created by
        late trades; those are forgotten a little later, when the ones in front of them go.

        One pass per track: a dict's first key after deleting from its front is found by scanning the deleted
        slots, so deleting one ``next(iter(...))`` at a time is quadratic (seconds after a quiet stretch of
        weeks, which closes ~10^5 empty klines at once). When most entries go, the dict is rebuilt instead.
        """
        if self._horizon is None or self._gs is None:
            return
        low_water = self._gs - self._horizon
        self._next_evict = self._gs + max(self._grain, self._horizon // 8)
        for track in self._tracks:
            closed = track.closed
            stale = 0
            close_of = track.close_of
            for t in closed:
                if close_of(t) >= low_water:
                    break
                stale += 1
            if not stale:
                continue
            if stale * 2 >= len(closed):
                track.closed = dict(islice(closed.items(), stale, None))
            else:
                for t in list(islice(closed, stale)):
                    del closed[t]

    def advance(self, now_ms: int) -> None:
        """Close every kline with ``close_time + grace_ms < now_ms``; quiet symbols finalize this way."""
        if self._gs is None:
            return
        position = now_ms - self._grace
        if position >= self._ge:
            self._roll(self._cell_of(position))

    # ---------------------------------------------------------------------------------------- late trades

    def _fold_late(self, t: int, a: int, p: int, q: int, f: int, last: int, m: bool) -> None:
        """A trade older than the current grid cell: fold into open klines, correct closed ones."""
        corrected = False
        for index, track in enumerate(self._tracks):
            if t >= track.t:
                if track.acc is None:
                    track.acc = _trade_state(t, a, p, q, f, last, m)
                else:
                    _fold(track.acc, t, a, p, q, f, last, m)
                self._dirty.add(index)
                continue
            corrected = True
            self._repair(index, track, t, a, p, q, f, last, m)
            if (t, a) > track.last_key:
                track.last_close = p
                track.last_key = (t, a)
                self._dirty.add(index)  # an empty open kline shows the previous close
        if corrected:
            self.late += 1

    def _touch(self, index: int, t: int, stored: list[int], *, created: bool, empty: bool = False) -> None:
        """Mark a closed kline for (re-)emission at the end of the batch; the version rises once per batch."""
        key = (index, t)
        if key in self._touched:
            return
        if not created:
            stored[VER] += 1
        self._touched[key] = created and empty

    def _flush_repairs(self) -> None:
        """Emit the klines corrected or created by late trades, each once, in the order first touched."""
        for (index, t), created_empty in self._touched.items():
            track = self._tracks[index]
            stored = track.closed[t]
            source = "empty" if created_empty and stored[N] == 0 else "repaired"
            self._closed_out.append(self._kline(track, t, stored, True, stored[VER], source))
        self._touched.clear()

    def _repair(self, index: int, track: _Track, t: int, a: int, p: int, q: int, f: int, last: int, m: bool) -> None:
        kline_t = open_time(track.name, t)
        stored = track.closed.get(kline_t)
        if stored is None:
            stored = track.closed[kline_t] = [*_trade_state(t, a, p, q, f, last, m), 0]
            self._touch(index, kline_t, stored, created=True)
            new_close = True
        elif stored[N] == 0:
            stored[:VER] = _trade_state(t, a, p, q, f, last, m)
            self._touch(index, kline_t, stored, created=False)
            new_close = True
        else:
            new_close = _fold(stored, t, a, p, q, f, last, m)
            self._touch(index, kline_t, stored, created=False)
        if not new_close:
            return
        following = next_open(track.name, kline_t)
        if kline_t < track.first_t:
            # Before the book's first kline: with a continuous feed the intervals in between are empty.
            if self._continuous and track.count_between(following, track.first_t) <= MAX_EMPTY_RUN:
                while following < track.first_t:
                    if following not in track.closed:
                        empty = track.closed[following] = [*_empty_state(p), 0]
                        self._touch(index, following, empty, created=True, empty=True)
                    following = next_open(track.name, following)
            track.first_t = kline_t
        # Empty klines after it showed the old close: re-price them, up to the next kline with trades.
        while following < track.t:
            stored = track.closed.get(following)
            if stored is not None:
                if stored[N] > 0:
                    break
                if stored[C] != p:
                    stored[O] = stored[H] = stored[LO] = stored[C] = p
                    self._touch(index, following, stored, created=False)
            following = next_open(track.name, following)

    # ---------------------------------------------------------------------------------------------- output

    def _kline(self, track: _Track, t: int, st: Sequence[int], closed: bool, version: int, source: str) -> Kline:
        scale = self._scale
        cached = self._prices.get
        price = self._price_decimal
        close = cached(st[C]) or price(st[C])  # prices are > 0, so a cached Decimal is truthy
        if st[N] == 0:
            return Kline(
                self._symbol,
                track.name,
                t,
                track.close_of(t),
                -1,
                -1,
                close,
                close,
                close,
                close,
                _ZERO,
                0,
                closed,
                _ZERO,
                _ZERO,
                _ZERO,
                version,
                source,
            )
        return Kline(
            self._symbol,
            track.name,
            t,
            track.close_of(t),
            st[F],
            st[L],
            cached(st[O]) or price(st[O]),
            cached(st[H]) or price(st[H]),
            cached(st[LO]) or price(st[LO]),
            close,
            _dec(st[V], scale),
            st[N],
            closed,
            _dec(st[QV], 2 * scale),
            _dec(st[BV], scale),
            _dec(st[BQ], 2 * scale),
            version,
            source,
        )

    def _open_kline(self, index: int) -> Kline | None:
        self._settle()
        track = self._tracks[index]
        acc, part = track.acc, self._part
        if acc is not None and part is not None:
            merged = acc.copy()
            _merge(merged, part)
            return self._kline(track, track.t, merged, False, 0, "live")
        state = acc if acc is not None else part
        if state is not None:
            return self._kline(track, track.t, state, False, 0, "live")
        if self._continuous and track.last_close is not None:
            return self._kline(track, track.t, _empty_state(track.last_close), False, 0, "empty")
        return None

    def drain_closed(self) -> list[Kline]:
        """Klines closed (x=True) since the last call, in order of close; corrections in order of arrival."""
        out, self._closed_out = self._closed_out, []
        return out

    def drain_changed(self) -> list[Kline]:
        """In-progress klines (x=False) whose values changed since the last call."""
        if self._gs is None:
            return []
        indexes = range(len(self._tracks)) if self._dirty_all else sorted(self._dirty)
        self._dirty_all = False
        self._dirty = set()
        return [kline for kline in map(self._open_kline, indexes) if kline is not None]

    def current(self) -> list[Kline]:
        """All in-progress klines now (x=False), shortest interval first."""
        if self._gs is None:
            return []
        return [kline for kline in map(self._open_kline, range(len(self._tracks))) if kline is not None]

    def drain_rejected(self) -> list[RejectedTrade]:
        """Trades rejected since the last call, each with its reason."""
        out, self._rejected = self._rejected, []
        return out

    def close(self) -> list[Kline]:
        """End the book (module docstring, rule 5): the klines closed and not drained yet, then every
        in-progress kline finalized as it stands (``x`` true, ``source="closed"``, shortest interval first).

        The book has nothing open afterwards; the caller drops it (a later trade of the symbol belongs to a new
        book). Rejections are left to :meth:`drain_rejected`.
        """
        out = self.drain_closed()
        out.extend(replace(kline, x=True, source="closed") for kline in self.current())
        self._gs = None  # nothing open: advance() and current() see an empty book
        self._part = self._pending = None
        for track in self._tracks:
            track.acc = None
        self._dirty_all = False
        self._dirty = set()
        return out

    # ------------------------------------------------------------------------------------------ scale

    def _rescale(self, decimals: int) -> None:
        """Carry more decimal places (a price or quantity with more than ``scale`` of them arrived)."""
        self._settle()
        factor = _POW10[decimals - self._scale]
        for track in self._tracks:
            if track.acc is not None:
                _rescale_state(track.acc, factor)
            if track.last_close is not None:
                track.last_close *= factor
            for stored in track.closed.values():
                _rescale_state(stored, factor)
        if self._part is not None:
            _rescale_state(self._part, factor)
        self._scale = decimals
        self._cache = _scaled_cache(decimals)
        self._prices = _price_decimals(decimals)

    # ------------------------------------------------------------------------------------------ state

    def export_state(self) -> dict[str, Any]:
        """JSON-serialisable state (ints, strings, lists); :meth:`restore` continues exactly from it.

        Klines and rejections not yet drained are included, so exporting never loses output.
        """
        self._settle()
        return {
            "format": _STATE_FORMAT,
            "symbol": self._symbol,
            "intervals": list(self._names),
            "grace_ms": self._grace,
            "repair_horizon_ms": self._horizon,
            "scale": self._scale,
            "continuous": self._continuous,
            "gap_until": self._gap_until,
            "ranges": [list(r) for r in self._ranges],
            "hi": list(self._hi),
            "gs": self._gs,
            "part": None if self._part is None else list(self._part),
            "tracks": [
                [
                    track.t,
                    track.nt,
                    None if track.acc is None else list(track.acc),
                    track.last_close,
                    list(track.last_key),
                    track.first_t,
                    [[t, *state] for t, state in track.closed.items()],
                ]
                for track in self._tracks
            ],
            "counters": [
                self.duplicates,
                self.late,
                self.rejected,
                self.empty_runs_skipped,
                self.forgotten_holes,
            ],
            "pending": [kline.to_dict() for kline in self._closed_out],
            "rejected": [
                [
                    [r.trade.s, r.trade.a, r.trade.p, r.trade.q, r.trade.f, r.trade.l, r.trade.T, r.trade.m],
                    r.reason,
                    r.category,
                ]
                for r in self._rejected
            ],
        }

    @classmethod
    def restore(cls, state: dict[str, Any], *, repair_horizon_ms: int | _Keep | None = _KEEP) -> KlineBook:
        """Rebuild a book from :meth:`export_state` output; raises ``ValueError`` if it is not such state.

        ``repair_horizon_ms``, when given, replaces the saved horizon (a setting changed across a restart): a
        shorter one forgets the older closed klines at the next trade or tick, a longer one keeps the klines
        that close from now on longer (those already forgotten stay forgotten).
        """
        try:
            if state["format"] != _STATE_FORMAT:
                raise ValueError(f"unsupported KlineBook state format {state['format']!r}")
            book = cls(
                state["symbol"],
                state["intervals"],
                grace_ms=state["grace_ms"],
                repair_horizon_ms=state["repair_horizon_ms"]
                if isinstance(repair_horizon_ms, _Keep)
                else repair_horizon_ms,
            )
            if len(state["tracks"]) != len(book._tracks):
                raise ValueError("state has a different number of intervals")
            book._scale = int(state["scale"])
            book._cache = _scaled_cache(book._scale)
            book._prices = _price_decimals(book._scale)
            book._continuous = bool(state["continuous"])
            gap_until = state.get("gap_until")  # absent from checkpoints written before it existed
            book._gap_until = None if gap_until is None else int(gap_until)
            book._ranges = [[int(low), int(high)] for low, high in state["ranges"]]
            book._hi = (int(state["hi"][0]), int(state["hi"][1]))
            book._gs = None if state["gs"] is None else int(state["gs"])
            if book._gs is not None:
                book._ge = book._gs + book._grain
            book._part = None if state["part"] is None else [int(v) for v in state["part"]]
            for track, saved in zip(book._tracks, state["tracks"], strict=True):
                t, nt, acc, last_close, last_key, first_t, closed = saved
                track.t, track.nt, track.first_t = int(t), int(nt), int(first_t)
                track.acc = None if acc is None else [int(v) for v in acc]
                track.last_close = None if last_close is None else int(last_close)
                track.last_key = (int(last_key[0]), int(last_key[1]))
                track.closed = {int(row[0]): [int(v) for v in row[1:]] for row in closed}
            if book._gs is not None:
                book._next_close = book._first_close()
            (
                book.duplicates,
                book.late,
                book.rejected,
                book.empty_runs_skipped,
                book.forgotten_holes,
            ) = (int(v) for v in state["counters"])
            book._closed_out = [Kline.from_dict(d) for d in state["pending"]]
            book._rejected = [
                RejectedTrade(
                    AggTrade(*entry[0]), str(entry[1]), entry[2] if len(entry) > 2 else _category_of(entry[1])
                )
                for entry in state["rejected"]
            ]
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"not a KlineBook state: {exc!r}") from None
        book._dirty_all = book._gs is not None
        return book


def _category_of(reason: str) -> ReasonCategory:
    """The category of a rejection saved by a book from before categories (its state has only the reason)."""
    if reason.startswith("trade of symbol"):
        return "symbol"
    return "late" if reason.startswith("trade time") else "field"


class KlineBooks:
    """One :class:`KlineBook` per symbol, created on first use; what the aggregator service holds."""

    def __init__(
        self,
        intervals: Sequence[str],
        grace_ms: int = 0,
        *,
        repair_horizon_ms: int | None = DEFAULT_REPAIR_HORIZON_MS,
    ) -> None:
        if isinstance(intervals, str):
            raise TypeError("intervals must be a sequence of interval names, not a string")
        self._names = sort_intervals(intervals)
        if not self._names:
            raise ValueError("KlineBooks needs at least one interval")
        if grace_ms < 0:
            raise ValueError(f"grace_ms must be >= 0, got {grace_ms}")
        self._grace = grace_ms
        self._horizon = repair_horizon_ms
        self._window = TimeWindow()
        self._books: dict[str, KlineBook] = {}

    @property
    def intervals(self) -> tuple[str, ...]:
        return self._names

    @property
    def window(self) -> TimeWindow:
        """The trade times every book here accepts (one window, shared)."""
        return self._window

    def set_time_window(self, now_ms: int | None, future_ms: int | None, past_ms: int | None) -> None:
        """Move every book's window at once (:meth:`TimeWindow.set`): O(1), so it may run before each batch."""
        self._window.set(now_ms, future_ms, past_ms)

    def book(self, symbol: str) -> KlineBook:
        """The book of ``symbol``, created empty if needed."""
        book = self._books.get(symbol)
        if book is None:
            book = self._books[symbol] = KlineBook(
                symbol, self._names, grace_ms=self._grace, repair_horizon_ms=self._horizon, window=self._window
            )
        return book

    def symbols(self) -> list[str]:
        return list(self._books)

    def get(self, symbol: str) -> KlineBook | None:
        """The book of ``symbol`` if there is one (unlike :meth:`book`, never creates it)."""
        return self._books.get(symbol)

    def remove(self, symbol: str) -> KlineBook | None:
        """Stop tracking ``symbol``; returns its book (drain it first if its output matters)."""
        return self._books.pop(symbol, None)

    def apply(self, symbol: str, trades: Sequence[AggTrade]) -> None:
        book = self._books.get(symbol)
        if book is None:
            book = self.book(symbol)
        book.apply(trades)

    def advance(self, now_ms: int) -> None:
        for book in self._books.values():
            book.advance(now_ms)

    def mark_gap(self, symbol: str, through_a: int | None = None) -> None:
        self.book(symbol).mark_gap(through_a)

    def mark_continuous(self, symbol: str) -> None:
        self.book(symbol).mark_continuous()

    def drain_closed(self) -> list[Kline]:
        out: list[Kline] = []
        for book in self._books.values():
            if book._closed_out:
                out.extend(book.drain_closed())
        return out

    def drain_changed(self) -> list[Kline]:
        out: list[Kline] = []
        for book in self._books.values():
            if book._dirty_all or book._dirty:
                out.extend(book.drain_changed())
        return out

    def drain_rejected(self) -> list[RejectedTrade]:
        out: list[RejectedTrade] = []
        for book in self._books.values():
            if book._rejected:
                out.extend(book.drain_rejected())
        return out

    def current(self, symbol: str | None = None, interval: str | None = None) -> list[Kline]:
        """In-progress klines, optionally of one symbol and/or one interval."""
        books = self._books.values() if symbol is None else [b for b in [self._books.get(symbol)] if b]
        out = [kline for book in books for kline in book.current()]
        if interval is not None:
            out = [kline for kline in out if kline.i == interval]
        return out

    @property
    def duplicates(self) -> int:
        return sum(book.duplicates for book in self._books.values())

    @property
    def late(self) -> int:
        return sum(book.late for book in self._books.values())

    @property
    def rejected(self) -> int:
        return sum(book.rejected for book in self._books.values())

    def export_state(self) -> dict[str, Any]:
        return {
            "format": _STATE_FORMAT,
            "intervals": list(self._names),
            "grace_ms": self._grace,
            "repair_horizon_ms": self._horizon,
            "books": {symbol: book.export_state() for symbol, book in self._books.items()},
        }

    @classmethod
    def restore(cls, state: dict[str, Any], *, repair_horizon_ms: int | _Keep | None = _KEEP) -> KlineBooks:
        """Rebuild from :meth:`export_state` output; ``repair_horizon_ms``, when given, replaces the saved
        horizon of every book (see :meth:`KlineBook.restore`)."""
        try:
            if state["format"] != _STATE_FORMAT:
                raise ValueError(f"unsupported KlineBooks state format {state['format']!r}")
            horizon = state["repair_horizon_ms"] if isinstance(repair_horizon_ms, _Keep) else repair_horizon_ms
            books = cls(state["intervals"], state["grace_ms"], repair_horizon_ms=horizon)
            books._books = {
                symbol: KlineBook.restore(saved, repair_horizon_ms=horizon) for symbol, saved in state["books"].items()
            }
            for book in books._books.values():
                book._window = books._window
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a KlineBooks state: {exc!r}") from None
        return books
