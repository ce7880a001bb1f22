"""The sequencer: duplicates dropped, reordering absorbed, holes detected, backfilled or declared as gaps."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.core.models import AggTrade
from services.ingest.frames import WireTrade, wire_trade
from services.ingest.sequencer import Outbox, OutboxItem, Sequencer, Verdict
from services.shared.messages import Gap

pytestmark = pytest.mark.unit

T0 = 1_767_225_600_000


def trade(a: int, symbol: str = "BTCUSDT") -> WireTrade:
    return wire_trade(AggTrade(symbol, a, "1.5", "0.1", a * 2, a * 2 + 1, T0 + a, a % 2 == 0))


def make(window: float = 0.1, max_held: int = 100) -> Sequencer:
    return Sequencer(Outbox(), reorder_window_s=window, max_held_per_symbol=max_held)


def drain(seq: Sequencer, symbol: str = "BTCUSDT") -> list[OutboxItem]:
    return seq.outbox.take().get(symbol, [])


def ids(items: list[OutboxItem]) -> list[int]:
    return [i.a for i in items if isinstance(i, WireTrade)]


def test_contiguous_trades_pass_and_duplicates_drop() -> None:
    seq = make()
    seq.track("BTCUSDT", 9)
    assert [seq.offer(trade(a), 0) for a in (10, 11, 11, 9, 12)] == [
        Verdict.ACCEPTED,
        Verdict.ACCEPTED,
        Verdict.DUPLICATE,
        Verdict.DUPLICATE,
        Verdict.ACCEPTED,
    ]
    assert ids(drain(seq)) == [10, 11, 12]
    assert seq.stats.duplicates == 2
    assert seq.offer(trade(1, "ETHUSDT"), 0) is Verdict.UNKNOWN_SYMBOL


def test_a_swap_is_absorbed_without_backfill() -> None:
    seq = make()
    seq.track("BTCUSDT", 9)
    assert seq.offer(trade(11), 0.0) is Verdict.HELD
    assert seq.offer(trade(11), 0.01) is Verdict.DUPLICATE
    assert seq.held_total == 1
    assert seq.offer(trade(10), 0.02) is Verdict.ACCEPTED
    assert ids(drain(seq)) == [10, 11]
    assert seq.held_total == 0
    assert seq.due(1.0) == []


def test_a_hole_outliving_the_window_is_backfilled() -> None:
    seq = make(window=0.1)
    seq.track("BTCUSDT", 9)
    seq.offer(trade(10), 0)
    for a in (15, 16):
        seq.offer(trade(a), 0.0)
    assert seq.due(0.05) == []
    assert seq.due(0.11) == ["BTCUSDT"]
    assert seq.due(0.5) == [], "already backfilling"
    assert seq.backfill_range("BTCUSDT") == (11, 14)
    # REST pages may overlap what is held, and each other.
    assert seq.offer_backfill("BTCUSDT", [trade(a) for a in (10, 11, 12)], 0.2) == 2
    assert seq.backfill_range("BTCUSDT") == (13, 14)
    assert seq.offer_backfill("BTCUSDT", [trade(a) for a in range(13, 18)], 0.3) == 5  # 15, 16 were held
    assert seq.backfill_range("BTCUSDT") == (18, None)
    seq.end_backfill("BTCUSDT", repaired=True, now=0.3)
    assert ids(drain(seq)) == list(range(10, 18))
    assert seq.stats.gaps_detected == 1 and seq.stats.gaps_repaired == 1
    assert seq.held_total == 0
    assert seq.offer(trade(17), 0.4) is Verdict.DUPLICATE


def test_a_backfill_that_releases_every_held_trade_ends_the_hole() -> None:
    """A REST page that fills the hole and reaches past every held trade leaves nothing held: the symbol is no
    longer holding, so ``due`` names it no more, and one hole counts as one gap detected and one repaired."""
    seq = make(window=0.1)
    seq.track("BTCUSDT", 9)
    for a in (15, 16):
        seq.offer(trade(a), 0.0)
    assert seq.due(0.11) == ["BTCUSDT"]
    # The page covers the hole and the held ids: every held trade is dropped as the REST copy is published.
    assert seq.offer_backfill("BTCUSDT", [trade(a) for a in range(10, 18)], 0.2) == 8
    assert seq.held("BTCUSDT") == 0 and seq.held_total == 0
    assert seq.holding == []
    assert seq.backfill_range("BTCUSDT") == (18, None)
    seq.end_backfill("BTCUSDT", repaired=True, now=0.2)
    assert seq.holding == []
    assert [seq.due(t) for t in (0.3, 1.0, 5.0)] == [[], [], []], "no hole is left"
    assert seq.close("stopped", 6.0) == []
    assert ids(drain(seq)) == list(range(10, 18))
    assert seq.stats.gaps_detected == 1 and seq.stats.gaps_repaired == 1
    # A later hole is a new gap with its own reorder window, measured from when it appears.
    assert seq.offer(trade(20), 10.0) is Verdict.HELD
    assert seq.due(10.05) == [], "a fresh window, not the one of the first hole"
    assert seq.due(10.11) == ["BTCUSDT"]
    assert seq.stats.gaps_detected == 2


def test_too_many_held_trades_trigger_backfill_at_once() -> None:
    seq = make(window=10, max_held=3)
    seq.track("BTCUSDT", 0)
    for a in (5, 6, 7):
        seq.offer(trade(a), 0)
    assert seq.due(0) == ["BTCUSDT"]


def test_an_unrepairable_hole_becomes_a_gap_in_place() -> None:
    seq = make()
    seq.track("BTCUSDT", 9)
    seq.offer(trade(10), 0)
    seq.offer(trade(20), 0)
    seq.offer(trade(21), 0)
    assert seq.due(1) == ["BTCUSDT"]
    gap = seq.declare_gap("BTCUSDT", "banned", 1)
    assert gap == Gap("BTCUSDT", 11, 19, "banned")
    seq.end_backfill("BTCUSDT", repaired=False, now=1)
    items = drain(seq)
    assert [i.a if isinstance(i, WireTrade) else (i.from_a, i.to_a) for i in items] == [10, (11, 19), 20, 21]
    assert seq.stats.gaps_unrepaired == 1 and seq.stats.ids_unrepaired == 9
    assert seq.offer(trade(15), 2) is Verdict.DUPLICATE, "ids inside a published gap never come back"


def test_declare_gap_without_a_known_end_does_nothing() -> None:
    seq = make()
    seq.track("BTCUSDT", 9)
    assert seq.declare_gap("BTCUSDT", "x", 0) is None
    assert seq.declare_gap("BTCUSDT", "x", 0, to_a=12) == Gap("BTCUSDT", 10, 12, "x")
    assert seq.last("BTCUSDT") == 12


def test_fresh_symbol_starts_at_the_lowest_id_of_its_first_window() -> None:
    seq = make(window=0.1)
    seq.track("BTCUSDT")
    assert seq.offer(trade(101), 0) is Verdict.HELD
    assert seq.offer(trade(100), 0.01) is Verdict.HELD
    assert seq.due(0.05) == []
    assert seq.due(0.2) == [], "no history: nothing to backfill"
    assert ids(drain(seq)) == [100, 101]
    assert seq.last("BTCUSDT") == 101


def test_catch_up_range_is_open_ended_and_untrack_drops_held() -> None:
    seq = make()
    seq.track("BTCUSDT", 50)
    assert seq.begin_catch_up("BTCUSDT")
    assert not seq.begin_catch_up("BTCUSDT")
    assert seq.backfill_range("BTCUSDT") == (51, None)
    seq.offer(trade(70), 0)
    assert seq.backfill_range("BTCUSDT") == (51, 69)
    assert seq.untrack("BTCUSDT") == 50
    assert seq.held_total == 0 and seq.stats.dropped_on_untrack == 1
    assert seq.backfill_range("BTCUSDT") is None
    seq.track("ETHUSDT")
    assert not seq.begin_catch_up("ETHUSDT"), "no known history"


def shape(items: list[OutboxItem]) -> list[int | tuple[int, int]]:
    return [i.a if isinstance(i, WireTrade) else (i.from_a, i.to_a) for i in items]


def test_a_stop_ends_every_reorder_window_at_once() -> None:
    """No live frame can fill a hole once the connections are closed: a fresh symbol starts at its lowest held
    id and every other hole goes to backfill now, however young its window."""
    seq = make(window=60)
    seq.track("BTCUSDT", 9)
    seq.track("ETHUSDT")  # fresh: everything held during its first window
    seq.track("SOLUSDT")  # fresh, with a hole after its start
    seq.offer(trade(12), 0)
    for a in (101, 100, 102):
        seq.offer(trade(a, "ETHUSDT"), 0)
    for a in (7, 9):
        seq.offer(trade(a, "SOLUSDT"), 0)
    assert seq.due(1) == [], "the windows are young"
    assert sorted(seq.due(1, final=True)) == ["BTCUSDT", "SOLUSDT"]
    out = seq.outbox.take()
    assert ids(out["ETHUSDT"]) == [100, 101, 102] and ids(out["SOLUSDT"]) == [7] and "BTCUSDT" not in out
    assert seq.backfill_range("BTCUSDT") == (10, 11)
    assert seq.backfill_range("SOLUSDT") == (8, 8)
    assert seq.due(2, final=True) == [], "already backfilling"


def test_close_publishes_every_held_trade_behind_explicit_gaps() -> None:
    seq = make(window=60)
    seq.track("BTCUSDT", 9)
    seq.track("ETHUSDT")
    for a in (10, 13, 14, 20):
        seq.offer(trade(a), 0)
    for a in (51, 50, 55):
        seq.offer(trade(a, "ETHUSDT"), 0)
    assert seq.held_total == 6
    gaps = seq.close("stopped", 1)
    assert seq.held_total == 0 and seq.holding == []
    assert gaps == [
        Gap("BTCUSDT", 11, 12, "stopped"),
        Gap("BTCUSDT", 15, 19, "stopped"),
        Gap("ETHUSDT", 52, 54, "stopped"),
    ]
    out = seq.outbox.take()
    assert shape(out["BTCUSDT"]) == [10, (11, 12), 13, 14, (15, 19), 20]
    assert shape(out["ETHUSDT"]) == [50, 51, (52, 54), 55]
    assert seq.last("BTCUSDT") == 20 and seq.last("ETHUSDT") == 55
    assert seq.stats.gaps_unrepaired == 3 and seq.stats.ids_unrepaired == 2 + 5 + 3
    assert seq.close("stopped", 2) == [], "nothing left"


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=60),
    swaps=st.lists(st.integers(min_value=0, max_value=59), max_size=20),
    dups=st.lists(st.integers(min_value=0, max_value=59), max_size=20),
    lost=st.sets(st.integers(min_value=1, max_value=58), max_size=10),
)
def test_any_mix_of_duplicates_swaps_and_losses_publishes_each_id_once_in_order(
    n: int, swaps: list[int], dups: list[int], lost: set[int]
) -> None:
    """Live frames duplicated, swapped and lost; REST serves everything: the outbox is 0..n-1, once, in order."""
    feed = list(range(n))
    for i in swaps:
        if i + 1 < len(feed):
            feed[i], feed[i + 1] = feed[i + 1], feed[i]
    for i in dups:
        if i < len(feed):
            feed.insert(i, feed[i])
    feed = [a for a in feed if a not in lost or a == 0]
    seq = make(window=0.05, max_held=8)
    seq.track("BTCUSDT")
    seq.offer(trade(0), 0)  # the first live trade fixes where a fresh symbol starts
    seq.due(1)
    now = 1.0
    out: list[int] = ids(drain(seq))
    for a in feed:
        now += 0.01
        seq.offer(trade(a), now)
        for symbol in seq.due(now):
            missing = seq.backfill_range(symbol)
            assert missing is not None
            start = missing[0]
            seq.offer_backfill(symbol, [trade(x) for x in range(start, min(n, start + 5))], now)
            seq.end_backfill(symbol, repaired=True, now=now)
        out += ids(drain(seq))
    # The end of the feed: let every window expire and backfill what is still missing.
    for _ in range(n):
        now += 1
        for symbol in seq.due(now):
            missing = seq.backfill_range(symbol)
            assert missing is not None
            seq.offer_backfill(symbol, [trade(x) for x in range(missing[0], n)], now)
            seq.end_backfill(symbol, repaired=True, now=now)
        out += ids(drain(seq))
    last = seq.last("BTCUSDT")
    assert last is not None
    if last < n - 1:  # ids lost at the very end: nothing later reveals them; a catch-up does
        assert seq.begin_catch_up("BTCUSDT")
        seq.offer_backfill("BTCUSDT", [trade(x) for x in range(last + 1, n)], now)
        out += ids(drain(seq))
    assert out == list(range(n))
    assert seq.held_total == 0
