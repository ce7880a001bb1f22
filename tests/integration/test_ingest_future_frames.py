"""ingest against the real broker and the replay exchange: a trade whose time cannot be true is dead-lettered,
not published, and its symbol goes on (issue 15, item 5).

The exchange's ``future_time`` fault sends one trade frame stamped 2090. Ingest's reference is the exchange's
own clock (``serverTime`` = the replay's market time, which runs 120 times faster than real time here), asked
again before the trade is rejected. Oracle: every other id of the feed on ``trades`` exactly once, in order,
with no gap record; the warped id only on the dead-letter topic, with the reason.
"""

from __future__ import annotations

import json

import pytest
from test_ingest import (
    SYMBOLS,
    drained,
    exchange_config,
    for_exchange,
    gaps_of,
    ids_of,
    ingest,
    published,
    published_by_symbol,
    read_topic,
    until,
)

from services.replay import ReplayExchange
from services.replay.faults import FUTURE_TIME_MS
from services.shared.settings import Settings

pytestmark = pytest.mark.integration


async def test_a_frame_stamped_2090_is_dead_lettered_and_every_other_trade_published(settings: Settings) -> None:
    async with ReplayExchange(exchange_config(minutes=3, speed=120)) as ex:
        s = for_exchange(settings, ex)
        async with ingest(s) as service:
            ex.start_feed()
            await until(lambda: published(ex, "BTCUSDT") > 100, 10, "trades")
            ex.faults.future_time(1, "BTCUSDT")
            await drained(service, ex, SYMBOLS)
            metrics = service.metrics()
        letters = [json.loads(v or b"") for _, v in await read_topic(s, s.kafka.topics.dead_letter)]
        (letter,) = letters
        assert letter["service"] == "ingest" and letter["category"] == "time", letter
        assert f"T={FUTURE_TIME_MS}" in letter["reason"] and "serverTime" in letter["reason"]
        (warped,) = json.loads(letter["value"])["trades"]
        assert warped["T"] == FUTURE_TIME_MS
        records = await published_by_symbol(s)
        for symbol in SYMBOLS:
            expected = [t.a for t in ex.trades(symbol) if symbol != "BTCUSDT" or t.a != warped["a"]]
            assert ids_of(records[symbol]) == expected, symbol
            assert gaps_of(records[symbol]) == [], symbol  # the sequencer consumed the id: no hole, no gap
        assert metrics["trades_rejected_time"] == 1 and metrics["dead_letters_by_reason"]["time"] == 1
        assert metrics["exchange_time_syncs"] >= 2  # at start, and again before the rejection
        assert metrics["gaps_detected"] == 0 and metrics["gaps_unrepaired"] == 0
