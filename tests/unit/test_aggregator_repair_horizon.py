"""The repair horizon is a setting (``aggregator.repair_horizon_ms``), not a constant.

Before, ``DEFAULT_REPAIR_HORIZON_MS`` (10 minutes) was fixed in the books: after an outage longer than that, the
REST backfill's trades were dead-lettered as late and the klines closed during the outage stayed wrong. Now the
engine, its restore and ``klines replay`` all take the configured horizon, so a longer one repairs what the
default cannot, and pipeline and replay still agree.
"""

from __future__ import annotations

import io
import json
from decimal import Decimal
from pathlib import Path

import pytest
from test_aggregator_engine import DLQ, T0, TRADES, Broker, Harness, finalized, partition_of

from services.aggregator.clock import ManualClock
from services.core.book import DEFAULT_REPAIR_HORIZON_MS, KlineBooks
from services.core.models import AggTrade
from services.core.reference import reference_klines
from services.rebuild import CHUNK_TRADES, rebuild
from services.shared.messages import encode_trade_batch
from services.shared.settings import Settings

pytestmark = pytest.mark.unit

SYMBOL = "BTCUSDT"
MINUTE = 60_000
HOUR = 60 * MINUTE


def trade(a: int, minute: float, price: str) -> AggTrade:
    return AggTrade(SYMBOL, a, price, "0.5", 10 * a, 10 * a, T0 + int(minute * MINUTE), False)


#: A feed whose trades 2..4 (minutes 5 to 20) were missed during an outage and arrive at minute 40 by backfill.
BEFORE = [trade(1, 0.5, "100")]
MISSED = [trade(2, 5.5, "104"), trade(3, 12.5, "97"), trade(4, 20.5, "101")]
AFTER = [trade(5, 39.5, "102")]


def put(broker: Broker, trades: list[AggTrade]) -> None:
    broker.logs[(TRADES, partition_of(SYMBOL))].append((SYMBOL.encode(), encode_trade_batch(SYMBOL, trades)))


async def outage(horizon_ms: int, *, restart: bool = False) -> tuple[Broker, Harness]:
    """The live trades, the clock closing minutes 0..39 during the outage, then the backfill."""
    broker, clock = Broker(), ManualClock()
    put(broker, BEFORE)
    put(broker, AFTER)
    h = Harness(broker, clock, intervals=("1m", "5m"), repair_horizon_ms=horizon_ms)
    await h.assign()
    await h.drain()
    clock.set(T0 + 40 * MINUTE)
    h.engine.tick()
    if restart:  # the state is checkpointed and restored by a process configured with the same horizon
        h.crash(delivered=10**6)
        h = Harness(broker, clock, intervals=("1m", "5m"), repair_horizon_ms=horizon_ms)
        await h.assign()
    put(broker, MISSED)
    await h.drain()
    return broker, h


def final_1m(broker: Broker) -> dict[int, Decimal]:
    """Newest version of each 1m kline: its close."""
    got = finalized(broker)
    return {t: max(copies, key=lambda k: k.version).c for (s, i, t), copies in got.items() if i == "1m"}


async def test_the_default_horizon_refuses_a_backfill_older_than_ten_minutes() -> None:
    broker, _ = await outage(DEFAULT_REPAIR_HORIZON_MS)
    letters = [json.loads(v) for v in broker.values(DLQ)]
    assert {letter["category"] for letter in letters} == {"late"}
    assert len(letters) == 3  # trades 2..4, from 19.5 to 34.5 minutes before the book's time
    assert final_1m(broker)[T0 + 5 * MINUTE] == Decimal(100)  # the empty kline stays wrong, as before the setting


@pytest.mark.parametrize("restart", [False, True], ids=["running", "restored"])
async def test_a_longer_horizon_repairs_the_klines_closed_during_the_outage(restart: bool) -> None:
    broker, h = await outage(HOUR, restart=restart)
    assert broker.values(DLQ) == []
    everything = sorted(BEFORE + MISSED + AFTER, key=lambda t: t.a)
    got = finalized(broker)
    for interval in ("1m", "5m"):
        for want in reference_klines(everything, interval)[:-1]:  # the last is still open
            newest = max(got[(SYMBOL, interval, want.t)], key=lambda k: k.version)
            assert newest.same_values(want), (interval, want.t, newest.differences(want))
    repaired = got[(SYMBOL, "1m", T0 + 5 * MINUTE)]
    # (a restored engine sends version 0 again if the crash came before its acknowledgement: harmless)
    assert {k.version for k in repaired} == {0, 1}
    assert max(repaired, key=lambda k: k.version).source == "repaired"
    assert h.engine.stats.data_loss == 0


def test_a_restore_takes_the_configured_horizon_not_the_saved_one() -> None:
    books = KlineBooks(["1m"], 0, repair_horizon_ms=DEFAULT_REPAIR_HORIZON_MS)
    books.apply(SYMBOL, BEFORE + AFTER)
    state = books.export_state()
    assert KlineBooks.restore(state).book(SYMBOL).export_state()["repair_horizon_ms"] == DEFAULT_REPAIR_HORIZON_MS
    longer = KlineBooks.restore(state, repair_horizon_ms=HOUR)
    assert longer.book(SYMBOL).export_state()["repair_horizon_ms"] == HOUR
    longer.apply(SYMBOL, MISSED)
    assert longer.rejected == 0


def test_klines_replay_folds_with_the_configured_horizon(tmp_path: Path) -> None:
    """A tape whose late trades are 30 minutes behind: replay refuses them by default and repairs them with a
    one-hour horizon, exactly as the aggregator configured the same way does."""
    tape = tmp_path / "BTCUSDT-aggTrades.csv"
    # In arrival order: the backfilled trades come last, in the next chunk replay folds (a chunk is folded as one
    # batch, in which nothing is late).
    filler = [trade(6 + k, 39.6, "102") for k in range(CHUNK_TRADES)]
    rows = BEFORE + AFTER + filler + MISSED
    tape.write_text("".join(f"{t.a},{t.p},{t.q},{t.f},{t.l},{t.T},{str(t.m).lower()}\n" for t in rows))

    def replayed(horizon_ms: int) -> dict[int, Decimal]:
        settings = Settings.model_validate({"aggregator": {"repair_horizon_ms": horizon_ms}})
        closed = rebuild(settings, [(tape, SYMBOL)], ["1m"], store=False, err=io.StringIO())[SYMBOL]
        return {k.t: k.c for k in sorted(closed, key=lambda k: k.version)}  # the newest version of each

    assert replayed(DEFAULT_REPAIR_HORIZON_MS)[T0 + 12 * MINUTE] == Decimal(100)
    assert replayed(HOUR)[T0 + 12 * MINUTE] == Decimal(97)
