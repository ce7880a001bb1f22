"""KlineBook and KlineBooks behaviour, one rule at a time (the property tests cover the combinations)."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.core.book import MAX_EMPTY_RUN, KlineBook, KlineBooks
from services.core.models import AggTrade, Kline
from services.core.reference import reference_klines

pytestmark = pytest.mark.unit

T0 = 1_709_164_800_000  # 2024-02-29 00:00 UTC (a leap day)
M = 60_000


def tr(a: int, t: int, p: str = "10", q: str = "1", *, m: bool = False, symbol: str = "BTCUSDT") -> AggTrade:
    return AggTrade(symbol, a, p, q, a, a, t, m)


def book_with(*trades: AggTrade, intervals: tuple[str, ...] = ("1m",), **kwargs: int | None) -> KlineBook:
    book = KlineBook("BTCUSDT", intervals, **kwargs)  # type: ignore[arg-type]
    book.apply(list(trades))
    return book


def test_trade_past_the_close_closes_the_kline() -> None:
    book = book_with(tr(1, T0 + 5, "10"), tr(2, T0 + 6, "12", m=True))
    assert book.drain_closed() == []
    book.apply([tr(3, T0 + M, "11")])
    (closed,) = book.drain_closed()
    assert (closed.t, closed.T, closed.o, closed.h, closed.l, closed.c) == (
        T0, T0 + M - 1, Decimal(10), Decimal(12), Decimal(10), Decimal(12),
    )  # fmt: skip
    assert (closed.v, closed.q, closed.V, closed.Q, closed.n, closed.f, closed.L) == (
        Decimal(2), Decimal(22), Decimal(1), Decimal(10), 2, 1, 2,
    )  # fmt: skip
    assert (closed.x, closed.version, closed.source) == (True, 0, "live")
    assert book.last_a == 3


def test_empty_klines_while_continuous() -> None:
    book = book_with(tr(1, T0 + 5, "10"), tr(2, T0 + 7, "10.5"))
    book.advance(T0 + 3 * M + 1)
    live, first_empty, second_empty = book.drain_closed()
    assert live.source == "live"
    for kline, t in ((first_empty, T0 + M), (second_empty, T0 + 2 * M)):
        assert kline.same_values(Kline.empty("BTCUSDT", "1m", t, Decimal("10.5")))
        assert (kline.o, kline.h, kline.l, kline.c) == (Decimal("10.5"),) * 4
        assert (kline.v, kline.q, kline.V, kline.Q, kline.n, kline.f, kline.L) == (0, 0, 0, 0, 0, -1, -1)
        assert kline.source == "empty" and kline.x
    # the kline in progress is empty too: shown at the previous close
    (current,) = book.current()
    assert (current.t, current.n, current.c, current.x) == (T0 + 3 * M, 0, Decimal("10.5"), False)


def test_fresh_start_never_emits_an_empty_first_kline() -> None:
    book = KlineBook("BTCUSDT", ["1m", "5m"])
    book.advance(T0 + 10 * M)
    assert book.drain_closed() == [] and book.current() == [] and book.drain_changed() == []
    book.apply([tr(1, T0 + 7 * M, "10")])
    book.advance(T0 + 9 * M)
    assert [(k.i, k.t, k.source) for k in book.drain_closed()] == [
        ("1m", T0 + 7 * M, "live"),
        ("1m", T0 + 8 * M, "empty"),
    ]


def test_gap_skips_empties_and_they_are_not_emitted_retroactively() -> None:
    book = book_with(tr(1, T0 + 5))
    book.mark_gap()
    assert not book.continuous
    book.advance(T0 + 3 * M)
    assert [k.t for k in book.drain_closed()] == [T0]  # 00:01 and 00:02 skipped, not emitted as empty
    assert [k.n for k in book.current()] == []  # no previous-close display while the feed is gapped
    book.mark_continuous()
    book.advance(T0 + 5 * M)
    assert [(k.t, k.source) for k in book.drain_closed()] == [(T0 + 3 * M, "empty"), (T0 + 4 * M, "empty")]
    book.continuous = False
    book.apply([tr(2, T0 + 7 * M, "11")])
    assert [k.t for k in book.drain_closed()] == []  # 00:04 .. 00:06 had no trades: skipped


def test_late_trade_corrects_the_closed_kline_and_reprices_empties() -> None:
    book = book_with(tr(1, T0 + 5, "10"), tr(2, T0 + 50, "10"))
    book.advance(T0 + 3 * M)
    assert [k.version for k in book.drain_closed()] == [0, 0, 0]  # 00:00 live, 00:01 and 00:02 empty
    book.apply([tr(3, T0 + 59_999, "9", q="2", m=True)])  # late: belongs to 00:00, now its close
    corrected, empty1, empty2 = book.drain_closed()
    assert (corrected.t, corrected.version, corrected.source, corrected.c, corrected.l) == (
        T0, 1, "repaired", Decimal(9), Decimal(9),
    )  # fmt: skip
    assert (corrected.v, corrected.V, corrected.n, corrected.L) == (Decimal(4), Decimal(2), 3, 3)
    for empty, t in ((empty1, T0 + M), (empty2, T0 + 2 * M)):
        assert (empty.t, empty.version, empty.source, empty.c, empty.n) == (t, 1, "repaired", Decimal(9), 0)
    assert book.late == 1
    (current,) = book.current()
    assert current.c == Decimal(9)  # the open, still empty kline shows the corrected previous close
    book.apply([tr(4, T0 + 1, "8")])  # a second late trade: not the close, so only 00:00 changes
    (again,) = book.drain_closed()
    assert (again.t, again.version, again.l, again.c, again.f) == (T0, 2, Decimal(8), Decimal(9), 4)
    assert book.late == 2


def test_trade_in_a_kline_skipped_by_a_gap_is_emitted_as_repaired() -> None:
    book = book_with(tr(1, T0 + 5))
    book.mark_gap()
    book.apply([tr(5, T0 + 3 * M)])
    assert book.holes() == [(2, 4)]
    assert [k.t for k in book.drain_closed()] == [T0]
    book.apply([tr(3, T0 + M + 5, "12"), tr(2, T0 + M + 1, "11"), tr(4, T0 + 2 * M, "13")])  # the backfill
    assert book.holes() == [] and book.duplicates == 0
    # one emission per kline and batch, even though two backfilled trades landed in 00:01
    assert [(k.t, k.version, k.source, k.n) for k in book.drain_closed()] == [
        (T0 + M, 0, "repaired", 2),
        (T0 + 2 * M, 0, "repaired", 1),
    ]
    book.apply([tr(6, T0 + M + 7), tr(7, T0 + M + 8)])  # the same kline again, in a later batch
    assert [(k.t, k.version, k.n) for k in book.drain_closed()] == [(T0 + M, 1, 4)]


def test_duplicates_are_dropped_wherever_they_arrive() -> None:
    book = book_with(tr(1, T0), tr(2, T0 + 1), tr(3, T0 + 2))
    book.apply([tr(2, T0 + 1), tr(3, T0 + 2), tr(4, T0 + 3)])  # replay overlap
    book.apply([tr(1, T0)])
    book.apply([tr(4, T0 + 3), tr(4, T0 + 3)])
    assert book.duplicates == 5
    (current,) = book.current()
    assert current.n == 4 and current.v == 4


def test_unsorted_batch_is_ordered_by_time_then_id() -> None:
    trades = [tr(3, T0 + 5, "3"), tr(1, T0 + 5, "1"), tr(2, T0 + 4, "2"), tr(4, T0 + M, "4")]
    book = book_with(*trades)
    (closed,) = book.drain_closed()
    (expected, _) = reference_klines(trades, "1m")
    assert closed.same_values(expected)
    assert (closed.o, closed.c, closed.f, closed.L) == (Decimal(2), Decimal(3), 2, 3)


def test_grace_keeps_a_quiet_kline_open() -> None:
    book = book_with(tr(1, T0), grace_ms=2_000)
    book.advance(T0 + M - 1 + 2_000)
    assert book.drain_closed() == []
    book.apply([tr(2, T0 + 100)])  # still in time
    book.advance(T0 + M - 1 + 2_001)
    (closed,) = book.drain_closed()
    assert closed.n == 2 and closed.version == 0


def test_trades_older_than_the_repair_horizon_are_rejected_with_a_reason() -> None:
    book = book_with(tr(2, T0 + 20 * M), repair_horizon_ms=10 * M)
    book.apply([tr(1, T0 + 5 * M)])
    (rejected,) = book.drain_rejected()
    assert rejected.trade.a == 1 and "repair horizon" in rejected.reason and rejected.category == "late"
    assert book.rejected == 1 and book.late == 0 and book.holes() == []
    book.apply([tr(3, T0 + 11 * M)])  # within the horizon: accepted as late
    assert book.late == 1 and book.drain_rejected() == []


def test_bad_trades_are_rejected_not_raised() -> None:
    book = book_with(tr(1, T0))
    book.apply([tr(2, T0 + 1, symbol="ETHUSDT"), tr(3, T0 + 2, p="-1"), tr(4, T0 + 3, q="0"), tr(5, T0 + 4, p="x")])
    rejections = book.drain_rejected()
    reasons = [r.reason for r in rejections]
    assert len(reasons) == 4 and "ETHUSDT" in reasons[0] and all("price or quantity" in r for r in reasons[1:])
    assert [r.category for r in rejections] == ["symbol", "field", "field", "field"]
    book.apply([tr(6, T0 + 5, p="NaN")])
    assert book.rejected == 5
    assert book.current()[0].n == 1


def test_more_decimals_raise_the_scale_exactly() -> None:
    trades = [tr(1, T0, "0.1", "3"), tr(2, T0 + 1, "0.000000000123", "0.5000000000001"), tr(3, T0 + M, "1")]
    book = book_with(*trades)
    (closed,) = book.drain_closed()
    (expected, _) = reference_klines(trades, "1m")
    assert closed.same_values(expected)
    assert closed.q == Decimal("0.3") + Decimal("0.000000000123") * Decimal("0.5000000000001")


def test_a_runaway_clock_does_not_flood_empty_klines() -> None:
    book = book_with(tr(1, T0), intervals=("1s",))
    book.advance(T0 + (MAX_EMPTY_RUN + 10) * 1_000)
    assert len(book.drain_closed()) == 1
    assert book.empty_runs_skipped == 1


def test_drain_changed_reports_each_change_once() -> None:
    book = book_with(tr(1, T0), intervals=("1m", "1h"))
    assert [k.i for k in book.drain_changed()] == ["1m", "1h"]
    assert book.drain_changed() == []
    book.advance(T0 + M)
    changed = book.drain_changed()
    assert [(k.i, k.t, k.n, k.x) for k in changed] == [("1m", T0 + M, 0, False)]  # the new, empty minute
    book.apply([tr(2, T0 - 1)])  # late for 1m, in progress for 1h
    assert [k.i for k in book.drain_changed()] == ["1h"]


def test_snapshot_shows_the_empty_open_kline_once_the_feed_is_continuous_again() -> None:
    book = book_with(tr(1, T0, "7"), intervals=("1s",))
    book.drain_changed()
    book.mark_gap()
    book.advance(T0 + 1_000)
    assert book.drain_changed() == [] and book.current() == []
    book.mark_continuous()
    (empty,) = book.drain_changed()
    assert (empty.t, empty.n, empty.c, empty.x) == (T0 + 1_000, 0, Decimal(7), False)
    assert book.current() == [empty]


def test_state_is_json_and_restores_exactly() -> None:
    book = book_with(tr(1, T0, "10"), tr(2, T0 + M, "11"), intervals=("1m", "5m"))
    book.mark_gap()
    state = json.loads(json.dumps(book.export_state()))
    restored = KlineBook.restore(state)
    assert restored.export_state() == book.export_state()
    assert [k.to_dict() for k in restored.drain_closed()] == [k.to_dict() for k in book.drain_closed()]
    assert not restored.continuous and restored.last_a == 2
    for each in (book, restored):
        each.apply([tr(3, T0 + 2 * M, "12")])
    assert [k.to_dict() for k in restored.drain_closed()] == [k.to_dict() for k in book.drain_closed()]
    with pytest.raises(ValueError, match="not a KlineBook state"):
        KlineBook.restore({"format": 1})


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="unknown interval"):
        KlineBook("X", ["1m", "2m"])
    with pytest.raises(TypeError):
        KlineBook("X", "1m")
    with pytest.raises(ValueError, match="grace_ms"):
        KlineBook("X", ["1m"], grace_ms=-1)
    assert KlineBook("X", ["1w", "1m", "1m"]).intervals == ("1m", "1w")


def test_kline_books_hold_every_symbol() -> None:
    books = KlineBooks(["1m", "5m"], grace_ms=0)
    books.apply("BTCUSDT", [tr(1, T0)])
    books.apply("ETHUSDT", [tr(7, T0 + 1, "2", symbol="ETHUSDT"), tr(7, T0 + 1, "2", symbol="ETHUSDT")])
    assert books.symbols() == ["BTCUSDT", "ETHUSDT"]
    assert len(books.current()) == 4
    assert [k.s for k in books.current("ETHUSDT", "5m")] == ["ETHUSDT"]
    assert books.current("NOPE") == []
    assert len(books.drain_changed()) == 4 and books.drain_changed() == []
    books.advance(T0 + M)
    assert sorted((k.s, k.i) for k in books.drain_closed()) == [("BTCUSDT", "1m"), ("ETHUSDT", "1m")]
    assert books.duplicates == 1 and books.late == 0 and books.rejected == 0
    books.apply("ETHUSDT", [tr(8, T0 + 2, symbol="BTCUSDT")])
    assert books.rejected == 1 and len(books.drain_rejected()) == 1
    restored = KlineBooks.restore(json.loads(json.dumps(books.export_state())))
    assert restored.export_state() == books.export_state()
    assert restored.intervals == ("1m", "5m")
    books.mark_gap("BTCUSDT")
    assert not books.book("BTCUSDT").continuous
    books.mark_continuous("BTCUSDT")
    assert books.remove("ETHUSDT") is not None and books.symbols() == ["BTCUSDT"]


JUNK_INTS = st.one_of(st.integers(-3, 40), st.none(), st.text(max_size=2), st.floats(allow_nan=True))
JUNK_TEXT = st.one_of(st.sampled_from(["1", "0.5", "-1", "0", "1e3", "NaN", "1.2.3", " 2", "0.0000000001"]),
                      st.text(max_size=6), st.none(), st.integers())  # fmt: skip
JUNK_TRADES = st.builds(
    AggTrade,
    s=st.sampled_from(["BTCUSDT", "BTCUSDT", "ETHUSDT"]),
    a=JUNK_INTS,
    p=JUNK_TEXT,
    q=JUNK_TEXT,
    f=JUNK_INTS,
    l=JUNK_INTS,
    T=st.one_of(st.integers(T0, T0 + 5 * M), st.none(), st.text(max_size=1)),
    m=st.one_of(st.booleans(), st.none()),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(JUNK_TRADES, max_size=12), max_size=4), st.integers(T0, T0 + 6 * M))
def test_malformed_trades_are_rejected_never_raised(batches: list[list[AggTrade]], now: int) -> None:
    """AggTrades built without the parser (wrong types, bad numbers, other symbols) never crash the book."""
    book = KlineBook("BTCUSDT", ["1m", "5m"])
    for batch in batches:
        book.apply(batch)
        book.advance(now)
    assert all(r.reason for r in book.drain_rejected())
    for kline in book.drain_closed() + book.current():
        assert kline.l > 0 and kline.v >= 0 and kline.n >= 0


@pytest.mark.parametrize("path", ["objects", "columns"])
def test_the_cache_of_parsed_decimals_stays_bounded(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Every way a trade's decimals are parsed fills the shared cache only up to its limit (then it starts over;
    a batch's column parse may pass it by that batch's texts); the klines are those of an unbounded cache."""
    from services.core import book as book_module

    step = 2 if path == "objects" else 1  # ids that skip one take the per-trade parse (AggTrade objects)
    trades = [tr(a, T0 + a * 100, f"{10 + a / 1000:.3f}", f"{1 + a / 10_000:.4f}") for a in range(1, 2001, step)]
    chunk = 1 if path == "objects" else 20

    def klines() -> list[dict[str, object]]:
        book = KlineBook("BTCUSDT", ("1m",))
        for start in range(0, len(trades), chunk):
            book.apply(trades[start : start + chunk])
        return [k.to_dict() for k in [*book.drain_closed(), *book.current()]]

    expected = klines()
    monkeypatch.setattr(book_module, "_CACHE_LIMIT", 50)
    monkeypatch.setattr(book_module, "_SCALED_CACHES", {})
    assert klines() == expected
    sizes = [len(cache) for cache in book_module._SCALED_CACHES.values()]
    assert sizes and max(sizes) <= 50 + 2 * chunk + 1, sizes
