"""KlineBook against the reference oracle, on random streams delivered the hard way.

Random trade streams (millisecond ties, empty intervals, prices with up to 12 decimals) start just before a
calendar boundary (leap day, month, week, year change) and are delivered in random batches, partly out of order,
with duplicates, with the clock advanced and the state exported/restored through JSON at random points, as trade
objects or as columns (the aggregator's form; a batch the fast way refuses must leave the book untouched). After
everything, the LAST version of every kline the book emitted must equal the reference computed over all trades,
field by field; every reference kline must have been emitted (or still be open); versions only increase; and the
in-progress snapshots (drain_changed) always agree with current().
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from services.core.book import KlineBook, TradeColumns
from services.core.intervals import DAY_MS, INTERVALS, interval_ms, next_open, open_time
from services.core.models import AggTrade, Kline
from services.core.reference import reference_klines

pytestmark = pytest.mark.unit

SYMBOL = "TESTUSDT"


def _ms(year: int, month: int, day: int) -> int:
    return int(datetime(year, month, day, tzinfo=UTC).timestamp()) * 1000


BOUNDARIES = (
    _ms(2024, 2, 29),  # leap day (a Thursday)
    _ms(2024, 3, 1),  # month change after Feb 29
    _ms(2024, 8, 1),  # inside the week Mon Jul 29 .. Sun Aug 4, which spans a month change
    _ms(2024, 7, 29),  # a Monday: week change
    _ms(2025, 1, 1),  # year change (a Wednesday)
    _ms(2017, 7, 3),  # Binance's documented weekly kline opens on this Monday
)


def _unit(intervals: list[str]) -> int:
    """Shortest interval length (months count as a day: the scale on which trades are spread)."""
    return min(interval_ms(name) or DAY_MS for name in intervals)


def _decimal_text(mantissa: int, places: int) -> str:
    if places == 0:
        return str(mantissa)
    return f"{mantissa // 10**places}.{mantissa % 10**places:0{places}d}"


@st.composite
def decimal_texts(draw: st.DrawFn, *, many_places: bool) -> str:
    places = draw(st.integers(0, 12 if many_places else 8))
    mantissa = draw(st.one_of(st.integers(1, 2_000), st.integers(1, 10**12)))
    return _decimal_text(mantissa, places)


@dataclass
class Scenario:
    intervals: list[str]
    trades: list[AggTrade]
    delivery: list[list[AggTrade]]  # batches, in delivery order
    steps: list[tuple[str, int]]  # per batch: ("advance", now) / ("restore", 0) / ("gap", 0) / ("ok", 0) ...
    grace_ms: int
    duplicates: int
    gaps: bool = field(default=False)
    as_columns: bool = field(default=False)


@st.composite
def scenarios(draw: st.DrawFn, *, gaps: bool = False) -> Scenario:
    intervals = draw(st.lists(st.sampled_from(INTERVALS), min_size=1, max_size=4, unique=True))
    unit = _unit(intervals)
    start = draw(st.sampled_from(BOUNDARIES)) - draw(st.integers(0, 3 * unit))
    count = draw(st.integers(1, 30))
    many_places = draw(st.booleans())
    prices = draw(st.lists(decimal_texts(many_places=many_places), min_size=1, max_size=4))
    t = start
    a = draw(st.integers(0, 10**12))
    trade_id = draw(st.integers(0, 10**12))
    trades = []
    for _ in range(count):
        step = draw(
            st.one_of(
                st.just(0),  # millisecond ties are common
                st.integers(0, 999),
                st.integers(0, unit),
                st.integers(0, 4 * unit),  # intervals without trades
            )
        )
        t += step
        span = draw(st.integers(0, 3))
        trades.append(
            AggTrade(
                s=SYMBOL,
                a=a,
                p=draw(st.one_of(st.sampled_from(prices), decimal_texts(many_places=many_places))),
                q=draw(decimal_texts(many_places=many_places)),
                f=trade_id,
                l=trade_id + span,
                T=t,
                m=draw(st.booleans()),
            )
        )
        a += 1
        trade_id += span + 1

    order = list(range(count))
    disorder = draw(st.sampled_from(["none", "swaps", "shuffle"]))
    if disorder == "shuffle":
        order = draw(st.permutations(order))
    elif disorder == "swaps":
        for _ in range(draw(st.integers(0, 4))):
            i = draw(st.integers(0, count - 1))
            j = draw(st.integers(0, count - 1))
            order[i], order[j] = order[j], order[i]
    deliveries = [trades[k] for k in order]
    duplicates = 0
    for _ in range(draw(st.integers(0, 3))):
        source = draw(st.integers(0, len(deliveries) - 1))
        target = draw(st.integers(source + 1, len(deliveries)))
        deliveries.insert(target, deliveries[source])
        duplicates += 1
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(deliveries) - 1)), max_size=8, unique=True)))
    batches = [deliveries[i:j] for i, j in zip([0, *cuts], [*cuts, len(deliveries)], strict=True) if i < j]

    steps = []
    delivered_max = start
    kinds = ["none", "advance", "advance", "restore"] + (["gap", "continuous"] if gaps else [])
    for batch in batches:
        delivered_max = max(delivered_max, *(tr.T for tr in batch))
        kind = draw(st.sampled_from(kinds))
        value = delivered_max + draw(st.integers(-unit, 3 * unit)) if kind == "advance" else 0
        steps.append((kind, value))
    grace = draw(st.sampled_from([0, 0, 1, 500, unit // 2]))
    return Scenario(intervals, trades, batches, steps, grace, duplicates, gaps, draw(st.booleans()))


def columns_of(batch: list[AggTrade]) -> TradeColumns:
    return (
        [t.a for t in batch], [t.T for t in batch], [t.p for t in batch], [t.q for t in batch],
        [t.f for t in batch], [t.l for t in batch], [t.m for t in batch],
    )  # fmt: skip


def _restore(book: KlineBook) -> KlineBook:
    return KlineBook.restore(json.loads(json.dumps(book.export_state())))


def _check_snapshots(book: KlineBook, snapshot: dict[str, Kline]) -> None:
    for kline in book.drain_changed():
        assert not kline.x
        snapshot[kline.i] = kline
    assert book.drain_changed() == []
    for kline in book.current():
        assert not kline.x
        seen = snapshot.get(kline.i)
        assert seen is not None and seen.t == kline.t and seen.same_values(kline), (seen, kline)


def _check_open_against_reference(book: KlineBook, applied: dict[int, AggTrade]) -> None:
    for kline in book.current():
        if kline.n == 0:
            continue
        expected = [k for k in reference_klines(applied.values(), kline.i, fill_empty=False) if k.t == kline.t]
        assert len(expected) == 1
        expected[0].x = False
        assert kline.same_values(expected[0]), (kline, expected[0], kline.differences(expected[0]))


def run_scenario(scenario: Scenario) -> tuple[KlineBook, list[Kline]]:
    book = KlineBook(SYMBOL, scenario.intervals, grace_ms=scenario.grace_ms, repair_horizon_ms=None)
    emitted: list[Kline] = []
    snapshot: dict[str, Kline] = {}
    applied: dict[int, AggTrade] = {}
    for batch, (kind, value) in zip(scenario.delivery, scenario.steps, strict=True):
        if scenario.as_columns:
            columns = columns_of(batch)
            before = book.export_state()
            if book.extend(columns):
                event("columns: extended")
            else:
                assert book.export_state() == before, "a refused batch changed the book"
                book.apply_columns(columns)
        else:
            book.apply(batch)
        for trade in batch:
            applied.setdefault(trade.a, trade)
        if kind == "advance":
            book.advance(value)
        elif kind == "restore":
            book = _restore(book)
        elif kind == "gap":
            book.mark_gap()
        elif kind == "continuous":
            book.mark_continuous()
        emitted.extend(book.drain_closed())
        _check_snapshots(book, snapshot)
        _check_open_against_reference(book, applied)
        assert book.drain_rejected() == []
    return book, emitted


def check_against_reference(scenario: Scenario, book: KlineBook, emitted: list[Kline]) -> None:
    event(f"late trades: {min(book.late, 3)}{'+' if book.late >= 3 else ''}")
    event(f"repaired klines: {any(k.source == 'repaired' and k.version > 0 for k in emitted)}")
    event(f"empty klines: {any(k.source == 'empty' for k in emitted)}")
    event(f"scale raised: {book.export_state()['scale'] > 8}")
    event(f"closed klines: {'0' if not emitted else '1-9' if len(emitted) < 10 else '10+'}")
    assert book.duplicates == scenario.duplicates
    assert book.last_a == max(tr.a for tr in scenario.trades)
    assert book.holes() == []
    latest: dict[tuple[str, int], Kline] = {}
    for kline in emitted:
        assert kline.x and kline.s == SYMBOL
        previous = latest.get((kline.i, kline.t))
        if previous is not None:
            assert kline.version > previous.version, (previous, kline)
            assert kline.source == "repaired"
        latest[(kline.i, kline.t)] = kline
    open_klines = {kline.i: kline for kline in book.current()}
    for interval in scenario.intervals:
        reference = reference_klines(scenario.trades, interval)
        by_t = {kline.t: kline for kline in reference}
        produced = {t: kline for (name, t), kline in latest.items() if name == interval}
        current = open_klines.get(interval)
        if current is not None:
            assert current.t not in produced, "a kline is both open and closed"
            assert current.t >= max(produced, default=current.t)
            produced[current.t] = current
        last = reference[-1]
        for t, kline in produced.items():
            if t in by_t:
                expected = by_t[t]
                expected.x = kline.x
                assert kline.same_values(expected), (interval, kline, expected, kline.differences(expected))
            else:
                # after the last trade the clock may have closed empty klines: priced at the last close
                assert t > last.t, (interval, kline)
                assert kline.n == 0 and kline.v == 0 and kline.f == kline.L == -1 and kline.c == last.c, kline
                assert t == open_time(interval, t) and kline.T == next_open(interval, t) - 1
        for t, expected in by_t.items():
            if t in produced:
                continue
            # only a feed marked as gapped may leave out klines, and only empty ones
            assert scenario.gaps and expected.n == 0, (interval, expected)


COMMON = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@COMMON
@given(scenarios())
def test_book_matches_reference_on_a_continuous_feed(scenario: Scenario) -> None:
    book, emitted = run_scenario(scenario)
    check_against_reference(scenario, book, emitted)


@settings(COMMON, max_examples=80)
@given(scenarios(gaps=True))
def test_book_matches_reference_when_gaps_are_marked(scenario: Scenario) -> None:
    book, emitted = run_scenario(scenario)
    check_against_reference(scenario, book, emitted)


@settings(COMMON, max_examples=60)
@given(scenarios(), st.data())
def test_restore_midway_gives_the_same_klines_as_never_stopping(scenario: Scenario, data: st.DataObject) -> None:
    """Exporting and restoring at any point changes nothing in what comes out afterwards."""
    plain = KlineBook(SYMBOL, scenario.intervals, grace_ms=scenario.grace_ms, repair_horizon_ms=None)
    restored = KlineBook(SYMBOL, scenario.intervals, grace_ms=scenario.grace_ms, repair_horizon_ms=None)
    stop = data.draw(st.integers(0, len(scenario.delivery)))
    out_plain: list[dict[str, object]] = []
    out_restored: list[dict[str, object]] = []
    for index, (batch, (kind, value)) in enumerate(zip(scenario.delivery, scenario.steps, strict=True)):
        if index == stop:
            restored = _restore(restored)
        for book, out in ((plain, out_plain), (restored, out_restored)):
            book.apply(batch)
            if kind == "advance":
                book.advance(value)
            out.extend(kline.to_dict() for kline in book.drain_closed())
    assert out_restored == out_plain
    assert [k.to_dict() for k in restored.current()] == [k.to_dict() for k in plain.current()]
    assert restored.export_state() == plain.export_state()
