"""ingest publishes a symbol's lifecycle on ``trades`` (real broker, replay exchange): ``POST /symbols`` removing
a symbol puts a removal record after the last trade it publishes for it, and adding it back puts an addition
record before the first trade of its new life, both keyed by the symbol (so in its partition, in its order).

The aggregator ends the symbol's book at the removal record (tests/unit/test_aggregator_lifecycle.py): the
record must come after every trade ingest publishes for that life, including the frames that still arrive
within ``removed_grace_s`` (counted, never published).
"""

from __future__ import annotations

from dataclasses import replace

import aiohttp
import pytest
from test_ingest import (
    FAST,
    drained,
    exchange_config,
    for_exchange,
    ids_of,
    ingest,
    published,
    read_topic,
    until,
)

from services.replay import ReplayExchange
from services.shared.messages import SymbolEvent, TradeBatch, TradesRecord, decode_trades_value
from services.shared.settings import Settings

pytestmark = pytest.mark.integration

SYMBOLS = ("BTCUSDT", "ETHUSDT")


async def records_of(settings: Settings, symbol: str) -> list[TradesRecord]:
    out = []
    for key, value in await read_topic(settings, settings.kafka.topics.trades):
        assert key is not None
        record = decode_trades_value(value, key)
        if key == symbol.encode():
            out.append(record)
    return out


async def test_post_symbols_remove_publishes_the_removal_after_the_last_trade_and_re_adding_starts_anew(
    settings: Settings,
) -> None:
    async with ReplayExchange(exchange_config(symbols=SYMBOLS, minutes=6)) as ex:
        s = for_exchange(settings, ex, symbols=SYMBOLS)
        async with ingest(s) as service:
            assert service.health is not None
            url = f"http://127.0.0.1:{service.health.port}/symbols"
            ex.start_feed()
            async with aiohttp.ClientSession() as http:
                await until(lambda: published(ex, "BTCUSDT") > 300, 10, "BTC trades")
                async with http.post(url, json={"remove": ["BTCUSDT"]}) as resp:
                    assert resp.status == 200
                removed_at = published(ex, "BTCUSDT")
                # The exchange goes on sending BTC frames until the UNSUBSCRIBE lands: counted, not published.
                await until(lambda: published(ex, "BTCUSDT") > removed_at + 200, 10, "BTC trades while removed")
                async with http.post(url, json={"add": ["BTCUSDT"]}) as resp:
                    assert resp.status == 200
                await ex.wait_exhausted(30)
            lasts = {symbol: ex.trades(symbol)[-1].a for symbol in SYMBOLS}
            await until(
                lambda: (
                    all(service.sequencer.last(symbol) == lasts[symbol] for symbol in SYMBOLS)
                    and service.publisher is not None
                    and service.publisher.idle
                ),
                30,
                "ingest to publish the last trade of every symbol",
            )
            metrics = service.metrics()
        records = await records_of(s, "BTCUSDT")

    events = [(index, r) for index, r in enumerate(records) if isinstance(r, SymbolEvent)]
    assert [(e.event, e.reason) for _i, e in events] == [("removed", "POST /symbols"), ("added", "POST /symbols")]
    (at_removal, removal), (at_addition, addition) = events
    before, between, after = records[:at_removal], records[at_removal + 1 : at_addition], records[at_addition + 1 :]
    all_ids = [t.a for t in ex.trades("BTCUSDT")]
    # The removal comes after every trade of the first life, and names the last of them.
    first_life = ids_of(before)
    assert first_life and first_life == all_ids[: len(first_life)]
    assert removal.last_a == first_life[-1]
    assert between == []  # nothing published for the symbol while it was away
    # The addition precedes every trade of the new life: a catch-up from the last published id, to the feed's end.
    assert addition.last_a == removal.last_a
    assert all(isinstance(r, TradeBatch) for r in after)
    new_life = ids_of(after)
    assert new_life == all_ids[len(first_life) :]
    assert metrics["symbol_events_published"] == 2
    # The other symbol never left: no record about it.
    eth = await records_of(s, "ETHUSDT")
    assert not [r for r in eth if isinstance(r, SymbolEvent)]
    assert ids_of(eth) == [t.a for t in ex.trades("ETHUSDT")]


async def test_a_symbol_gone_from_exchange_info_gets_its_removal_record_after_its_last_trade(
    settings: Settings,
) -> None:
    """The other way a symbol leaves: ``discover = true`` and the refresh no longer lists it as TRADING."""
    tuning = replace(FAST, discover_refresh_s=0.2)
    async with ReplayExchange(exchange_config(symbols=SYMBOLS, minutes=4)) as ex:
        s = for_exchange(settings, ex, symbols=(), discover=True, quote_asset="USDT")
        async with ingest(s, tuning) as service:
            ex.start_feed()
            await until(lambda: published(ex, "ETHUSDT") > 300, 10, "ETH trades")
            ex.set_status("ETHUSDT", "BREAK")
            await until(lambda: "ETHUSDT" not in service.sequencer.symbols, 5, "the refresh to drop ETH")
            await drained(service, ex, ("BTCUSDT",))
            metrics = service.metrics()
        records = await records_of(s, "ETHUSDT")
    events = [r for r in records if isinstance(r, SymbolEvent)]
    assert events == [SymbolEvent("ETHUSDT", "removed", ids_of(records)[-1], "exchangeInfo")]
    assert isinstance(records[-1], SymbolEvent)  # after every ETH trade published
    ids = ids_of(records)
    assert ids == [t.a for t in ex.trades("ETHUSDT")][: len(ids)] and len(ids) < len(ex.trades("ETHUSDT"))
    assert metrics["symbol_events_published"] == 1
    assert not [r for r in await records_of(s, "BTCUSDT") if isinstance(r, SymbolEvent)]
