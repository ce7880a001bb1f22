"""ingest against the real Kafka broker and the local replay exchange: every trade id exactly once, per fault.

Oracle: the exchange's full feed. After the feed is exhausted and ingest has caught up, the ``trades`` topic is
decoded and, per symbol, the published ids must equal the feed's ids exactly (each once, in order) and there
must be no gap record, unless the scenario makes a gap unrepairable on purpose (418), in which case the gap
record must name exactly the missing ids. Market time starts only once ingest is connected
(``autostart="never"``), so "the feed" and "what ingest could see" are the same thing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiokafka import TopicPartition
from ports import free_port

from services.ingest.backfill import BackfillOptions
from services.ingest.connections import ConnectionOptions
from services.ingest.service import IngestService, IngestTuning
from services.ingest.shard import shard_of
from services.replay import GeneratorFeed, ReplayConfig, ReplayExchange
from services.shared.kafka import KafkaUnreachable, make_consumer
from services.shared.messages import Gap, TradeBatch, TradesRecord, decode_trades_value
from services.shared.settings import Settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SYMBOLS = ("BTCUSDT", "ETHUSDT")

FAST = IngestTuning(
    connections=ConnectionOptions(
        stale_after_s=1.5,
        rotation_overlap_s=0.5,
        reconnect_base_s=0.05,
        reconnect_cap_s=0.5,
        open_timeout_s=3.0,
    ),
    backfill=BackfillOptions(retry_s=0.05, max_attempts=4),
    reorder_window_s=0.05,
    tick_s=0.01,
)


# --------------------------------------------------------------------------------------------------- helpers


def exchange_config(
    *, symbols: tuple[str, ...] = SYMBOLS, minutes: float = 4, speed: float = 120, **extra: Any
) -> ReplayConfig:
    feed = GeneratorFeed(symbols=symbols, seed=7, duration_ms=int(minutes * 60_000))
    return ReplayConfig(feed=feed, speed=speed, autostart="never", **extra)


def for_exchange(
    settings: Settings, ex: ReplayExchange, *, symbols: tuple[str, ...] = SYMBOLS, **market: Any
) -> Settings:
    """The test's settings pointed at ``ex`` (and at a free health port)."""
    return settings.model_copy(
        update={
            "market": settings.market.model_copy(
                update={"ws_url": ex.ws_url, "rest_url": ex.rest_url, "symbols": symbols, "venue": ex.config.venue}
                | market
            ),
            "service": settings.service.model_copy(update={"ingest_http_port": 0, "shutdown_grace_s": 5.0}),
        }
    )


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


def published(ex: ReplayExchange, symbol: str) -> int:
    return int(ex.status()["symbols"][symbol]["published"])


@contextlib.asynccontextmanager
async def ingest(settings: Settings, tuning: IngestTuning = FAST) -> AsyncIterator[IngestService]:
    """A running in-process ingest; stopped (gracefully, exit code 0 asserted) on exit."""
    service = IngestService(settings, tuning)
    task = asyncio.create_task(service.run())
    try:
        await until(lambda: service.ready() or task.done(), 20, "ingest ready")
        assert not task.done(), f"ingest exited early with {task.result()}"
        yield service
    finally:
        service.shutdown.request("test over")
        code = await asyncio.wait_for(task, 15)
    assert code == 0, f"ingest exit code {code}, fatal={service.fatal}"


async def drained(service: IngestService, ex: ReplayExchange, symbols: tuple[str, ...], timeout: float = 20) -> None:
    """The feed is over and ingest published (and Kafka acknowledged) everything it accepted up to its end."""
    await ex.wait_exhausted(timeout)
    lasts = {s: ex.trades(s)[-1].a for s in symbols}
    await until(
        lambda: (
            all(service.sequencer.last(s) == lasts[s] for s in symbols)
            and service.depth == 0
            and service.publisher is not None
            and service.publisher.idle
        ),
        timeout,
        "ingest to publish the last trade of every symbol",
    )


async def read_topic(settings: Settings, topic: str) -> list[tuple[bytes | None, bytes | None]]:
    consumer = make_consumer(settings.kafka, group_id=None, client_suffix="test-reader")
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[tuple[bytes | None, bytes | None]] = []
        remaining = {tp for tp in tps if ends[tp] > 0}
        deadline = time.monotonic() + 20
        while remaining and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend((r.key, r.value) for r in records)
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        assert not remaining, f"could not read {topic} to its end"
        return out
    finally:
        await consumer.stop()


async def published_by_symbol(settings: Settings) -> dict[str, list[TradesRecord]]:
    out: dict[str, list[TradesRecord]] = {}
    for key, value in await read_topic(settings, settings.kafka.topics.trades):
        record = decode_trades_value(value, key)
        out.setdefault(record.symbol, []).append(record)
    return out


def ids_of(records: list[TradesRecord]) -> list[int]:
    return [t.a for r in records if isinstance(r, TradeBatch) for t in r.trades]


def gaps_of(records: list[TradesRecord]) -> list[Gap]:
    return [r for r in records if isinstance(r, Gap)]


async def assert_exactly_once(settings: Settings, ex: ReplayExchange, symbols: tuple[str, ...] = SYMBOLS) -> None:
    records = await published_by_symbol(settings)
    assert set(records) <= set(symbols)
    for symbol in symbols:
        expected = [t.a for t in ex.trades(symbol)]
        got = ids_of(records.get(symbol, []))
        assert gaps_of(records.get(symbol, [])) == [], f"{symbol}: unexpected gap records"
        missing = sorted(set(expected) - set(got))
        assert len(got) == len(set(got)), f"{symbol}: {len(got) - len(set(got))} ids published twice"
        assert not missing, f"{symbol}: {len(missing)} ids never published, first {missing[:5]}"
        assert got == expected, f"{symbol}: ids out of order"
        # Not only the ids: the trades themselves, byte for byte the exchange's.
        trades = [t for r in records[symbol] if isinstance(r, TradeBatch) for t in r.trades]
        assert trades == ex.trades(symbol)


async def run_scenario(
    settings: Settings,
    *,
    config: ReplayConfig | None = None,
    tuning: IngestTuning = FAST,
    before: Callable[[ReplayExchange], None] | None = None,
    during: Callable[[ReplayExchange, IngestService], Any] | None = None,
    symbols: tuple[str, ...] = SYMBOLS,
) -> tuple[dict[str, Any], ReplayExchange]:
    """Run ingest over a whole feed with faults ``before`` market time starts and ``during`` it; return the
    final metrics after checking exactly-once delivery."""
    config = config or exchange_config(symbols=symbols)
    async with ReplayExchange(config) as ex:
        if before is not None:
            before(ex)
        s = for_exchange(settings, ex, symbols=symbols)
        async with ingest(s, tuning) as service:
            ex.start_feed()
            if during is not None:
                await during(ex, service)
            await drained(service, ex, symbols)
            metrics = service.metrics()
        await assert_exactly_once(s, ex, symbols)
        return metrics, ex


# --------------------------------------------------------------------------------------------------- faults


async def test_clean_feed_one_stream_per_connection(settings: Settings) -> None:
    """Baseline: a shard per symbol (max 1 stream per connection); nothing dropped, nothing duplicated, trades
    travel in per-symbol batches. (Answering server pings is shown in tests/unit/test_ingest_parts.py.)"""
    tuning = replace(FAST, connections=replace(FAST.connections, max_streams_per_connection=1))
    config = exchange_config(minutes=3)
    metrics, _ = await run_scenario(settings, config=config, tuning=tuning)
    assert metrics["connections_opened"] == 2
    assert metrics["reconnects"] == 0 and metrics["connect_failures"] == 0
    assert metrics["duplicates"] == 0 and metrics["gaps_detected"] == 0
    assert metrics["records_sent"] < metrics["trades_published"] / 5, "trades must travel in per-symbol batches"


async def test_connection_drops_are_repaired(settings: Settings) -> None:
    """Abrupt drops; the URL carries one stream, the other is subscribed by message on every new connection."""
    tuning = replace(FAST, connections=replace(FAST.connections, max_url_streams=1))

    async def during(ex: ReplayExchange, service: IngestService) -> None:
        for threshold in (300, 900):
            await until(lambda t=threshold: published(ex, "BTCUSDT") > t, 10, "trades")  # type: ignore[misc]
            assert ex.faults.drop_connections() >= 1
            await asyncio.sleep(0.3)

    metrics, _ = await run_scenario(settings, during=during, tuning=tuning)
    assert metrics["reconnects"] >= 2
    assert metrics["subscribe_messages"] >= 3
    assert metrics["gaps_unrepaired"] == 0


@pytest.mark.parametrize(
    "catch_up_after_reconnect", [True, False], ids=["catch-up-after-reconnect", "repair-at-next-frame"]
)
async def test_stalled_connection_is_replaced_by_the_watchdog(
    settings: Settings, catch_up_after_reconnect: bool
) -> None:
    """A connection that receives nothing for ``stale_after_s`` is replaced, and what it held back comes from REST.

    Made exact: the exchange pings every 0.3 s, so only the stall can silence a connection; market time runs
    during the stall until every symbol has published trades the stalled connection holds, then stops until
    the replacement is open, so those trades reach ingest by REST only. They come by the catch-up that follows
    a reconnect (default), or, without it, as a hole the symbol's next frame reveals and a repair fills: exactly
    one hole per symbol, counted once however long its repair takes.
    """
    stall_s = 8.0  # longer than the watchdog needs: the stalled connection never delivers what it holds
    tuning = replace(FAST, catch_up_after_reconnect=catch_up_after_reconnect)
    missed: dict[str, int] = {}

    async def during(ex: ReplayExchange, service: IngestService) -> None:
        await until(lambda: published(ex, "BTCUSDT") > 300, 10, "trades")
        ex.faults.pause_feed()
        before = {symbol: published(ex, symbol) for symbol in SYMBOLS}
        stalled_at = time.monotonic()
        assert ex.faults.stall(stall_s) >= 1
        ex.faults.resume_feed()
        await until(lambda: all(published(ex, s) >= before[s] + 50 for s in SYMBOLS), 5, "trades during the stall")
        ex.faults.pause_feed()
        missed.update({symbol: published(ex, symbol) - before[symbol] for symbol in SYMBOLS})
        await until(
            lambda: service.pool.stats.stale >= 1 and service.pool.stats.opened >= 2,
            stall_s - (time.monotonic() - stalled_at),
            "the watchdog to replace the stalled connection before the stall ends",
        )
        ex.faults.resume_feed()

    config = exchange_config(ping_interval_s=0.3)
    metrics, _ = await run_scenario(settings, config=config, tuning=tuning, during=during)  # every trade exactly once
    assert metrics["stale_connections"] >= 1
    assert metrics["trades_backfilled"] >= sum(missed.values()), "trades published during the stall come from REST"
    if catch_up_after_reconnect:
        assert metrics["catch_ups"] >= len(SYMBOLS), "the replacement checked every symbol by REST"
    else:
        assert metrics["gaps_detected"] == metrics["gaps_repaired"] == len(SYMBOLS), (
            "each symbol's next frame revealed one hole, and REST filled it"
        )


async def test_skipped_ids_are_backfilled_from_rest(settings: Settings) -> None:
    def before(ex: ReplayExchange) -> None:
        btc = ex.trades("BTCUSDT")
        ex.faults.skip_trades("BTCUSDT", btc[100].a, btc[1700].a)  # two REST pages and a bit
        eth = ex.trades("ETHUSDT")
        ex.faults.skip_trades("ETHUSDT", eth[50].a, eth[50].a)
        ex.faults.skip_trades("ETHUSDT", eth[-1].a, eth[-1].a)  # the very last id: no later frame reveals it

    async def during(ex: ReplayExchange, service: IngestService) -> None:
        await ex.wait_exhausted(20)
        # Nothing after the last id tells ingest it is missing: it shows up as a gap only when a later frame
        # arrives. Ask ingest to catch up as after a restart, which is what it does for a quiet symbol.
        await until(lambda: service.sequencer.last("ETHUSDT") == ex.trades("ETHUSDT")[-2].a, 10, "ETH")
        service.backfiller.catch_up("ETHUSDT")

    metrics, _ = await run_scenario(settings, before=before, during=during)
    assert metrics["gaps_detected"] >= 2 and metrics["gaps_repaired"] >= 2
    assert metrics["trades_backfilled"] >= 1602
    assert metrics["rest_requests"] >= 3


async def test_duplicated_and_reordered_frames(settings: Settings) -> None:
    def before(ex: ReplayExchange) -> None:
        ex.faults.duplicate_frames(300)
        ex.faults.reorder_frames(200, "BTCUSDT")
        ex.faults.reorder_frames(100, "ETHUSDT")

    metrics, _ = await run_scenario(settings, before=before)
    assert metrics["duplicates"] >= 300
    assert metrics["trades_held"] >= 300, "the swapped frames were held and released in order"
    assert metrics["gaps_detected"] == 0, "a swap of neighbours is absorbed by the reorder window"


async def test_malformed_frames_go_to_the_dead_letter_topic_with_reasons(settings: Settings) -> None:
    kinds = ("bad_json", "missing_field", "wrong_type", "negative_price")

    async def during(ex: ReplayExchange, service: IngestService) -> None:
        await until(lambda: published(ex, "BTCUSDT") > 200, 10, "trades")
        for kind in kinds:
            assert ex.faults.send_malformed(kind, "BTCUSDT") == 1

    metrics, _ = await run_scenario(settings, during=during)
    assert metrics["frames_rejected"] == 4 and metrics["dead_letters_published"] == 4
    letters = [json.loads(v or b"") for _, v in await read_topic(settings, settings.kafka.topics.dead_letter)]
    reasons = sorted(letter["reason"] for letter in letters)
    assert len(reasons) == 4
    assert all(letter["service"] == "ingest" and letter["value"] for letter in letters)
    assert any(r.startswith("not JSON") for r in reasons)
    assert sorted(letter["category"] for letter in letters) == ["field", "field", "field", "malformed"]
    assert any("missing field 'p'" in r for r in reasons)
    assert any("'a'" in r and "integer" in r for r in reasons)
    assert any("'p'" in r and "plain decimal" in r for r in reasons)


async def test_server_shutdown_rotates_without_a_hole(settings: Settings) -> None:
    async def during(ex: ReplayExchange, service: IngestService) -> None:
        await until(lambda: published(ex, "BTCUSDT") > 300, 10, "trades")
        assert ex.faults.server_shutdown(close_after_s=1.0) == 1
        await until(lambda: service.pool.stats.rotations >= 1, 5, "rotation")

    metrics, _ = await run_scenario(settings, during=during)
    assert metrics["server_shutdowns"] == 1 and metrics["rotations"] == 1
    assert metrics["reconnects"] == 0
    assert metrics["gaps_detected"] == 0, "the replacement was open before the old connection closed"
    assert metrics["duplicates"] >= 1, "both connections delivered during the overlap"


async def test_connection_rotates_before_its_age_limit(settings: Settings) -> None:
    tuning = replace(FAST, connections=replace(FAST.connections, max_connection_age_s=0.7, age_jitter_s=0.1))
    metrics, _ = await run_scenario(settings, tuning=tuning, config=exchange_config(minutes=6))
    assert metrics["rotations"] >= 2 and metrics["reconnects"] == 0


async def test_backpressure_keeps_everything_when_the_queue_is_small(settings: Settings) -> None:
    settings = settings.model_copy(update={"persistence": settings.persistence.model_copy(update={"queue_size": 200})})
    metrics, _ = await run_scenario(settings, config=exchange_config(speed=0, minutes=6))
    assert metrics["backpressure_pauses"] >= 1
    assert metrics["gaps_detected"] == 0


async def test_rest_rate_limit_429_is_respected(settings: Settings) -> None:
    def before(ex: ReplayExchange) -> None:
        btc = ex.trades("BTCUSDT")
        ex.faults.skip_trades("BTCUSDT", btc[10].a, btc[2500].a)  # three pages at weight 4
        ex.faults.set_rate_limit(6, window_s=1.0)

    metrics, _ = await run_scenario(settings, before=before)
    assert metrics["rest_rate_limited"] >= 1
    assert metrics["gaps_repaired"] >= 1 and metrics["gaps_unrepaired"] == 0


async def test_usdm_routed_market_path(settings: Settings) -> None:
    metrics, _ = await run_scenario(settings, config=exchange_config(venue="usdm", minutes=3))
    assert metrics["reconnects"] == 0


# --------------------------------------------------------------------------------------------------- gaps


async def test_ban_418_publishes_an_explicit_gap(settings: Settings) -> None:
    """REST answers 418: backfill stops and the hole becomes a gap record naming exactly the missing ids."""
    requests: list[str] = []

    async def banned(request: web.Request) -> web.Response:
        requests.append(str(request.rel_url))
        return web.json_response(
            {"code": -1003, "msg": "Way too many requests; IP banned"}, status=418, headers={"Retry-After": "120"}
        )

    app = web.Application()
    app.router.add_get("/api/v3/aggTrades", banned)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with ReplayExchange(exchange_config()) as ex:
            btc = ex.trades("BTCUSDT")
            skipped = (btc[200].a, btc[260].a)
            ex.faults.skip_trades("BTCUSDT", *skipped)
            s = for_exchange(settings, ex, rest_url=f"http://127.0.0.1:{port}")
            async with ingest(s) as service:
                ex.start_feed()
                await drained(service, ex, SYMBOLS)
                metrics = service.metrics()
            records = await published_by_symbol(s)
    finally:
        await runner.cleanup()
    assert len(requests) == 1, "no request is sent while banned"
    assert metrics["rest_bans"] == 1 and metrics["gaps_unrepaired"] == 1 and metrics["data_loss_events"] == 1
    gaps = gaps_of(records["BTCUSDT"])
    assert [(g.from_a, g.to_a) for g in gaps] == [skipped]
    assert "418" in gaps[0].reason
    expected = [t.a for t in btc if not skipped[0] <= t.a <= skipped[1]]
    assert ids_of(records["BTCUSDT"]) == expected
    # The gap sits exactly where the ids are missing.
    position = next(i for i, r in enumerate(records["BTCUSDT"]) if isinstance(r, Gap))
    assert ids_of(records["BTCUSDT"][:position])[-1] == skipped[0] - 1
    assert ids_of(records["BTCUSDT"][position:])[0] == skipped[1] + 1
    assert ids_of(records["ETHUSDT"]) == [t.a for t in ex.trades("ETHUSDT")]


# --------------------------------------------------------------------------------------------------- graceful stop


def _stop_log(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "services.ingest" and r.getMessage() == message]


async def _all_frames_read(service: IngestService, ex: ReplayExchange, skipped: int, timeout: float = 20) -> int:
    """The burst is over and ingest has read every frame the exchange sent; returns how many trades that is."""
    await ex.wait_exhausted(timeout)
    sent = sum(len(ex.trades(s)) for s in ex.symbols) - skipped
    await until(lambda: service.trades_received == sent, timeout, "ingest to read every frame")
    return sent


async def test_graceful_stop_publishes_every_held_trade_after_repairing_their_holes(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The stop comes while every accepted trade is held: both symbols are fresh (nothing in the topic) and
    still in their first reorder window, BTC with a hole that only REST can fill. The stop ends the windows,
    backfills the hole and publishes everything, exactly once per ``a``, with no gap. (Before: all dropped,
    and a restart would have started the fresh symbols from the live stream, losing them for good.)"""
    caplog.set_level(logging.INFO, logger="services.ingest")
    settings = settings.model_copy(
        update={"persistence": settings.persistence.model_copy(update={"queue_size": 1_000_000})}
    )
    tuning = replace(FAST, reorder_window_s=3600.0, max_held_per_symbol=1_000_000)
    async with ReplayExchange(exchange_config(minutes=2, speed=0)) as ex:
        btc = ex.trades("BTCUSDT")
        ex.faults.skip_trades("BTCUSDT", btc[300].a, btc[1500].a)  # two REST pages and a bit
        s = for_exchange(settings, ex)
        service = IngestService(s, tuning)
        task = asyncio.create_task(service.run())
        try:
            await until(lambda: service.ready() or task.done(), 20, "ingest ready")
            ex.start_feed()
            accepted = await _all_frames_read(service, ex, skipped=1201)
            assert service.sequencer.held_total == accepted, "every accepted trade is held when the stop comes"
            assert service.publisher is not None and service.publisher.trades_published == 0
            service.shutdown.request("SIGTERM")
            code = await asyncio.wait_for(task, 15)
        finally:
            if not task.done():
                task.cancel()
        assert code == 0
        await assert_exactly_once(s, ex)  # every id of the feed once, in order, no gap record
    total = len(btc) + len(ex.trades("ETHUSDT"))
    [flushed] = _stop_log(caplog, "flushed")
    assert flushed.dropped_held == 0  # type: ignore[attr-defined]
    assert flushed.held_at_stop == accepted  # type: ignore[attr-defined]
    assert flushed.trades_published == total  # type: ignore[attr-defined]
    assert flushed.gaps_at_stop == 0 and flushed.unacknowledged == 0  # type: ignore[attr-defined]
    assert service.metrics()["trades_backfilled"] >= 1201, "the hole came from REST"


async def test_graceful_stop_cuts_a_hanging_backfill_and_marks_its_hole_as_a_gap(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A backfill is in flight when the stop comes and REST never answers: at half the remaining grace the
    stop gives up, publishes the hole as a gap record in its place and every held trade after it."""
    caplog.set_level(logging.INFO, logger="services.ingest")
    release = asyncio.Event()
    requests: list[str] = []

    async def hanging(request: web.Request) -> web.Response:
        requests.append(str(request.rel_url))
        await release.wait()
        return web.json_response([])

    app = web.Application()
    app.router.add_get("/api/v3/aggTrades", hanging)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with ReplayExchange(exchange_config(minutes=2, speed=0)) as ex:
            btc = ex.trades("BTCUSDT")
            skipped = (btc[200].a, btc[260].a)
            ex.faults.skip_trades("BTCUSDT", *skipped)
            s = for_exchange(settings, ex, rest_url=f"http://127.0.0.1:{port}")
            service = IngestService(s, FAST)
            task = asyncio.create_task(service.run())
            try:
                await until(lambda: service.ready() or task.done(), 20, "ingest ready")
                ex.start_feed()
                await _all_frames_read(service, ex, skipped=61)
                await until(lambda: len(requests) == 1, 10, "the backfill request")
                held = service.sequencer.held("BTCUSDT")
                assert held == len(btc) - 261, "everything after the hole is held"
                assert service.backfiller.active == 1
                service.shutdown.request("SIGTERM")
                code = await asyncio.wait_for(task, 15)
            finally:
                release.set()
                if not task.done():
                    task.cancel()
            assert code == 0
            records = await published_by_symbol(s)
    finally:
        await runner.cleanup()
    assert [(g.from_a, g.to_a) for g in gaps_of(records["BTCUSDT"])] == [skipped]
    assert "stopped" in gaps_of(records["BTCUSDT"])[0].reason
    expected = [t.a for t in btc if not skipped[0] <= t.a <= skipped[1]]
    assert ids_of(records["BTCUSDT"]) == expected, "every accepted id once, in order"
    position = next(i for i, r in enumerate(records["BTCUSDT"]) if isinstance(r, Gap))
    assert ids_of(records["BTCUSDT"][:position])[-1] == skipped[0] - 1
    assert ids_of(records["BTCUSDT"][position:])[0] == skipped[1] + 1
    assert ids_of(records["ETHUSDT"]) == [t.a for t in ex.trades("ETHUSDT")]
    [flushed] = _stop_log(caplog, "flushed")
    assert flushed.dropped_held == 0 and flushed.held_at_stop == held  # type: ignore[attr-defined]
    assert flushed.gaps_at_stop == 1 and flushed.ids_gap_marked_at_stop == 61  # type: ignore[attr-defined]
    assert [r.levelno for r in _stop_log(caplog, "unrepairable gap published")] == [logging.ERROR]


# --------------------------------------------------------------------------------------------------- symbols


async def test_symbols_added_and_removed_at_run_time(settings: Settings) -> None:
    symbols = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
    async with ReplayExchange(exchange_config(symbols=symbols, minutes=6)) as ex:
        s = for_exchange(settings, ex, symbols=("BTCUSDT",))
        async with ingest(s) as service:
            assert service.health is not None
            url = f"http://127.0.0.1:{service.health.port}/symbols"
            ex.start_feed()
            async with aiohttp.ClientSession() as http:
                await until(lambda: published(ex, "ETHUSDT") > 300, 10, "ETH trades")
                async with http.post(url, json={"add": ["ethusdt", "SOLUSDT"]}) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["symbols"] == ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
                await until(lambda: service.sequencer.last("SOLUSDT") is not None, 10, "SOL trades")
                await until(lambda: service.pool.stats.subscribe_messages >= 1, 5, "SUBSCRIBE")
                assert service.pool.stats.opened == 1, "added on the live connection"
                async with http.post(url, json={"remove": ["BTCUSDT"]}) as resp:
                    assert resp.status == 200
                removed_at = published(ex, "BTCUSDT")
                async with http.post(url, json={"add": ["not a symbol"]}) as resp:
                    assert resp.status == 400
                    assert "not a symbol" in (await resp.json())["error"]
                async with http.get(url) as resp:
                    assert (await resp.json())["symbols"] == ["ETHUSDT", "SOLUSDT"]
            await drained(service, ex, ("ETHUSDT", "SOLUSDT"))
        records = await published_by_symbol(s)
    assert service.metrics()["frames_rejected"] == 0
    for symbol in ("ETHUSDT", "SOLUSDT"):  # from the first trade seen on, contiguous to the feed's end
        got = ids_of(records[symbol])
        all_ids = [t.a for t in ex.trades(symbol)]
        assert got == all_ids[all_ids.index(got[0]) :]
    btc = ids_of(records["BTCUSDT"])
    assert btc == [t.a for t in ex.trades("BTCUSDT")][: len(btc)]
    assert len(btc) <= removed_at < len(ex.trades("BTCUSDT"))


ADMIN_TOKEN = "t0ken-for-the-admin-api-7f3a"


def with_admin(settings: Settings, *, host: str, token_file: Path | None) -> Settings:
    return settings.model_copy(
        update={"service": settings.service.model_copy(update={"http_host": host, "admin_token_file": token_file})}
    )


async def _open_endpoints_answer(http: aiohttp.ClientSession, base: str) -> None:
    """Health, readiness and metrics never ask for the token."""
    for path in ("/healthz", "/readyz", "/metrics", "/metrics.json", "/symbols"):
        async with http.get(base + path) as resp:
            assert resp.status == 200, path


async def _auth_failures(http: aiohttp.ClientSession, base: str) -> tuple[int, float]:
    """admin_auth_failures in /metrics.json and in the Prometheus exposition."""
    async with http.get(f"{base}/metrics.json") as resp:
        figures = await resp.json()
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("klines_ingest_admin_auth_failures_total ")]
    return figures["admin_auth_failures"], float(line.split()[1])


async def test_post_symbols_needs_the_admin_token(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Token configured, bound to every interface (as in compose and Kubernetes): no token or a wrong one is
    401 with WWW-Authenticate: Bearer, logged and counted, and changes nothing; the right one applies."""
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    async with ReplayExchange(exchange_config(symbols=SYMBOLS, minutes=2)) as ex:
        s = with_admin(for_exchange(settings, ex, symbols=("BTCUSDT",)), host="0.0.0.0", token_file=token_file)
        async with ingest(s) as service, aiohttp.ClientSession() as http:
            assert service.health is not None
            base = f"http://127.0.0.1:{service.health.port}"
            await _open_endpoints_answer(http, base)
            assert await _auth_failures(http, base) == (0, 0.0)
            caplog.set_level(logging.WARNING, logger="services.shared.admin")
            for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": ADMIN_TOKEN}):
                async with http.post(f"{base}/symbols", json={"add": ["ETHUSDT"]}, headers=headers) as resp:
                    assert resp.status == 401, headers
                    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                    assert (await resp.json())["ok"] is False
            assert service.selection.wanted == {"BTCUSDT"}, "a refused request changes nothing"
            assert await _auth_failures(http, base) == (3, 3.0)
            refused = [r for r in caplog.records if r.getMessage() == "admin request refused"]
            assert len(refused) == 3 and all(r.levelno == logging.WARNING for r in refused)
            assert all(getattr(r, "remote", None) == "127.0.0.1" for r in refused)
            assert all(ADMIN_TOKEN not in str(vars(r)) for r in caplog.records), "the token is never logged"
            await _open_endpoints_answer(http, base)
            headers = {"Authorization": f"bearer   {ADMIN_TOKEN}"}
            async with http.post(f"{base}/symbols", json={"add": ["ETHUSDT"]}, headers=headers) as resp:
                assert resp.status == 200
                assert (await resp.json())["symbols"] == ["BTCUSDT", "ETHUSDT"]
            async with http.get(f"{base}/symbols") as resp:
                assert (await resp.json())["symbols"] == ["BTCUSDT", "ETHUSDT"]
            assert service.selection.wanted == {"BTCUSDT", "ETHUSDT"}
            assert await _auth_failures(http, base) == (3, 3.0)


async def test_post_symbols_is_off_without_a_token_on_every_interface(settings: Settings) -> None:
    async with ReplayExchange(exchange_config(symbols=SYMBOLS, minutes=2)) as ex:
        s = with_admin(for_exchange(settings, ex, symbols=("BTCUSDT",)), host="0.0.0.0", token_file=None)
        async with ingest(s) as service, aiohttp.ClientSession() as http:
            assert service.health is not None
            base = f"http://127.0.0.1:{service.health.port}"
            headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}  # no token configured: nothing opens it
            async with http.post(f"{base}/symbols", json={"remove": ["BTCUSDT"]}, headers=headers) as resp:
                assert resp.status == 403
                assert "service.admin_token_file" in (await resp.json())["error"]
            assert service.selection.wanted == {"BTCUSDT"}
            assert await _auth_failures(http, base) == (1, 1.0)
            await _open_endpoints_answer(http, base)


async def test_post_symbols_is_open_on_loopback_without_a_token(settings: Settings) -> None:
    """The local run: bound to 127.0.0.1, nothing configured, POST /symbols works as it always did."""
    async with ReplayExchange(exchange_config(symbols=SYMBOLS, minutes=2)) as ex:
        s = with_admin(for_exchange(settings, ex, symbols=("BTCUSDT",)), host="127.0.0.1", token_file=None)
        async with ingest(s) as service, aiohttp.ClientSession() as http:
            assert service.health is not None
            base = f"http://127.0.0.1:{service.health.port}"
            async with http.post(f"{base}/symbols", json={"add": ["ETHUSDT"]}) as resp:
                assert resp.status == 200
            assert service.selection.wanted == {"BTCUSDT", "ETHUSDT"}
            assert await _auth_failures(http, base) == (0, 0.0)
            await _open_endpoints_answer(http, base)


async def test_discovered_symbols_follow_exchange_info(settings: Settings) -> None:
    """``discover = true``: every TRADING symbol quoted in USDT, nothing else; health endpoints answer."""
    listed = ("BTCUSDT", "ETHBTC", "SOLUSDT")
    async with ReplayExchange(exchange_config(symbols=listed, minutes=2)) as ex:
        s = for_exchange(settings, ex, symbols=(), discover=True, quote_asset="USDT")
        async with ingest(s) as service:
            assert service.sequencer.symbols == {"BTCUSDT", "SOLUSDT"}
            assert service.health is not None
            base = f"http://127.0.0.1:{service.health.port}"
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{base}/readyz") as resp:
                    assert resp.status == 200
                async with http.get(f"{base}/healthz") as resp:
                    assert resp.status == 200
                ex.start_feed()
                await drained(service, ex, ("BTCUSDT", "SOLUSDT"))
                async with http.get(f"{base}/metrics.json") as resp:
                    metrics = await resp.json()
        records = await published_by_symbol(s)
    assert set(records) == {"BTCUSDT", "SOLUSDT"}
    assert metrics["symbol_refreshes"] == 1 and metrics["symbols"] == 2
    for key in (
        "trades_published",
        "duplicates",
        "gaps_detected",
        "gaps_repaired",
        "gaps_unrepaired",
        "dead_letters",
        "reconnects",
        "queue_depth",
    ):
        assert key in metrics
    assert metrics["trades_published"] == sum(len(ex.trades(sym)) for sym in ("BTCUSDT", "SOLUSDT"))


async def test_unreachable_kafka_is_a_startup_error(settings: Settings) -> None:
    s = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"bootstrap": f"127.0.0.1:{free_port()}"})}
    )
    started = time.monotonic()
    with pytest.raises(KafkaUnreachable, match=r"cannot reach Kafka at 127\.0\.0\.1:"):
        await IngestService(s, FAST).run()  # exit code 2 in the process (tests/integration/test_service_startup.py)
    assert time.monotonic() - started < 15


# --------------------------------------------------------------------------------------------------- process


def _start_ingest(
    settings: Settings, ex: ReplayExchange, port: int, log_path: Path, **extra_env: str
) -> subprocess.Popen[bytes]:
    kafka = settings.kafka
    env = dict(os.environ)
    env.update(
        KAFKA_BOOTSTRAP=kafka.bootstrap,
        KLINES_KAFKA__TOPICS__TRADES=kafka.topics.trades,
        KLINES_KAFKA__TOPICS__DEAD_LETTER=kafka.topics.dead_letter,
        KLINES_KAFKA__TRADES_PARTITIONS=str(kafka.trades_partitions),
        KLINES_MARKET__WS_URL=ex.ws_url,
        KLINES_MARKET__REST_URL=ex.rest_url,
        KLINES_MARKET__SYMBOLS=json.dumps(list(SYMBOLS)),
        KLINES_SERVICE__INGEST_HTTP_PORT=str(port),
        KLINES_SERVICE__SHUTDOWN_GRACE_S="5",
        KLINES_SERVICE__LOG_FORMAT="json",
    )
    env.update(extra_env)
    env.pop("KLINES_CONFIG", None)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "services.ingest", "--config", str(REPO / "config" / "klines.toml")],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def _ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"ingest exited with {proc.returncode}"
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise AssertionError("ingest never became ready")


async def _exit_code(proc: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"ingest did not exit within {timeout:g} s")
        await asyncio.sleep(0.05)
    return proc.returncode


async def test_sigterm_sigkill_and_restarts_publish_every_id_once(settings: Settings, tmp_path: Path) -> None:
    """``python -m services.ingest``: SIGTERM (exit 0, everything flushed), restart (recovers the last ids from
    the topic, backfills what happened while it was down), SIGKILL mid-stream, restart again: every id of
    the feed is in the topic exactly once."""
    log_path = tmp_path / "ingest.log"
    async with ReplayExchange(exchange_config(minutes=8, speed=90)) as ex:
        port = free_port()
        first = _start_ingest(settings, ex, port, log_path)
        try:
            await _ready(port, first)
            ex.start_feed()
            await until(lambda: published(ex, "BTCUSDT") > 500, 15, "trades")
            first.send_signal(signal.SIGTERM)
            assert await _exit_code(first, 8) == 0
        finally:
            if first.poll() is None:
                first.kill()
        down_at = published(ex, "BTCUSDT")
        await asyncio.sleep(0.7)  # trades keep coming while ingest is down
        assert published(ex, "BTCUSDT") > down_at

        second = _start_ingest(settings, ex, port, log_path)
        try:
            await _ready(port, second)
            await until(lambda: published(ex, "BTCUSDT") > down_at + 1500, 15, "more trades")
            second.send_signal(signal.SIGKILL)
            assert await _exit_code(second, 5) == -signal.SIGKILL
        finally:
            if second.poll() is None:
                second.kill()

        third = _start_ingest(settings, ex, port, log_path)
        try:
            await _ready(port, third)
            await ex.wait_exhausted(30)
            lasts = {s: ex.trades(s)[-1].a for s in SYMBOLS}

            async def complete() -> bool:
                records = await published_by_symbol(settings)
                return all(ids_of(records.get(s, []))[-1:] == [lasts[s]] for s in SYMBOLS)

            deadline = time.monotonic() + 20
            while not await complete():
                assert time.monotonic() < deadline, "the restarted ingest did not catch up"
                await asyncio.sleep(0.3)
            third.send_signal(signal.SIGTERM)
            assert await _exit_code(third, 8) == 0
        finally:
            if third.poll() is None:
                third.kill()
        await assert_exactly_once(settings, ex)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    recovered = [line for line in lines if line["message"] == "recovered last ids from the topic"]
    assert [line["recovered"] for line in recovered] == [0, 2, 2]
    assert all(line["component"] == "ingest" for line in lines)
    stops = [line for line in lines if line["message"] == "ingest stopped"]
    assert [line["exit_code"] for line in stops] == [0, 0]


# --------------------------------------------------------------------------------------------------- shards

SHARDED = ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT")


async def _get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as resp:
        assert resp.status == 200, url
        return await resp.json()


async def test_two_shards_split_the_symbols_and_take_over_from_one_process(settings: Settings, tmp_path: Path) -> None:
    """Adding a replica: one ingest (shard 0/1) runs and is stopped; two processes with shards 0/2 and 1/2, both
    discovering the symbols from exchangeInfo, take over. Each follows exactly its own shard's symbols (a
    POST /symbols for the other's is refused with its owner); together, with the first run, they publish every
    id of every symbol exactly once: no symbol published by both, none left out, nothing lost at the hand-over."""
    own = {i: {s for s in SHARDED if shard_of(s, 2) == i} for i in (0, 1)}
    assert own[0] and own[1], "the test's symbols must fall in both shards"
    logs = {name: tmp_path / f"ingest-{name}.log" for name in ("single", "0", "1")}
    discover = {"KLINES_MARKET__DISCOVER": "true", "KLINES_MARKET__SYMBOLS": "[]"}
    async with ReplayExchange(exchange_config(symbols=SHARDED, minutes=8, speed=60)) as ex:
        port = free_port()
        single = _start_ingest(settings, ex, port, logs["single"], KLINES_INGEST__SHARD="0/1", **discover)
        try:
            await _ready(port, single)
            ex.start_feed()
            await until(lambda: published(ex, "BTCUSDT") > 300, 15, "trades")
            single.send_signal(signal.SIGTERM)
            assert await _exit_code(single, 8) == 0
        finally:
            if single.poll() is None:
                single.kill()
        ports = {i: free_port() for i in (0, 1)}
        shards = {
            i: _start_ingest(settings, ex, ports[i], logs[str(i)], KLINES_INGEST__SHARD=f"{i}/2", **discover)
            for i in (0, 1)
        }
        try:
            for i in (0, 1):
                await _ready(ports[i], shards[i])
            async with aiohttp.ClientSession() as http:
                for i in (0, 1):
                    listed = await _get_json(http, f"http://127.0.0.1:{ports[i]}/symbols")
                    assert set(listed["symbols"]) == own[i], f"shard {i}/2"
                    assert listed["shard"] == f"{i}/2" and listed["other_shards"] == len(own[1 - i])
                foreign = sorted(own[1])[0]
                async with http.post(f"http://127.0.0.1:{ports[0]}/symbols", json={"add": [foreign]}) as resp:
                    assert resp.status == 409
                    answer = await resp.json()
                assert answer["owners"] == {foreign: "1/2"} and answer["shard"] == "0/2"
                assert "send these to the ingest of their shard" in answer["error"]
                await ex.wait_exhausted(40)
                lasts = {s: ex.trades(s)[-1].a for s in SHARDED}

                async def complete() -> bool:
                    records = await published_by_symbol(settings)
                    return all(ids_of(records.get(s, []))[-1:] == [lasts[s]] for s in SHARDED)

                deadline = time.monotonic() + 30
                while not await complete():
                    assert time.monotonic() < deadline, "the shards did not catch up"
                    await asyncio.sleep(0.3)
                figures = {i: await _get_json(http, f"http://127.0.0.1:{ports[i]}/metrics.json") for i in (0, 1)}
            for i in (0, 1):
                shards[i].send_signal(signal.SIGTERM)
            for i in (0, 1):
                assert await _exit_code(shards[i], 8) == 0
        finally:
            for proc in shards.values():
                if proc.poll() is None:
                    proc.kill()
        await assert_exactly_once(settings, ex, SHARDED)
        total = sum(len(ex.trades(s)) for s in SHARDED)
    for i in (0, 1):
        assert (figures[i]["shard_index"], figures[i]["shard_count"]) == (i, 2)
        assert figures[i]["symbols"] == len(own[i]) and figures[i]["symbols_other_shards"] == len(own[1 - i])
    lines = {
        name: [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
        for name, path in logs.items()
    }
    for i in (0, 1):
        added = {line["symbol"] for line in lines[str(i)] if line["message"] == "symbol added"}
        assert added == own[i], f"shard {i}/2 followed {sorted(added)}"
        (running,) = [line for line in lines[str(i)] if line["message"] == "ingest running"]
        assert running["shard"] == f"{i}/2"
        (recovered,) = [line for line in lines[str(i)] if line["message"] == "recovered last ids from the topic"]
        assert recovered["recovered"] == len(own[i]), "each shard resumes its symbols from the first run's records"
    flushed = [line for name in lines for line in lines[name] if line["message"] == "flushed"]
    assert len(flushed) == 3 and all(line["dropped_held"] == 0 for line in flushed)
    assert sum(line["trades_published"] for line in flushed) == total, "every trade published once, by one process"
