"""The aggregator worker in-process against the real Kafka broker, driven by a scripted trade stream.

The oracle is :func:`services.core.reference.reference_klines` over the same trades. Market time is a
:class:`ManualClock` the test moves, so "quiet symbols close by the clock" happens exactly when the test says.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiokafka import TopicPartition

from services.aggregator.app import checkpoint_topic
from services.aggregator.clock import ManualClock
from services.aggregator.worker import AggregatorWorker
from services.core.intervals import close_time, open_time
from services.core.models import AggTrade, Kline
from services.core.reference import reference_klines
from services.shared.kafka import delete_topics, make_consumer, make_producer
from services.shared.messages import decode_kline, encode_trade_batch
from services.shared.settings import Settings

pytestmark = pytest.mark.integration

INTERVALS = ("1m", "5m")
T0 = 1_735_689_600_000  # 2025-01-01 00:00 UTC


SPARSE_GAPS_MS = (0, 0, 17, 250, 900, 4_000, 45_000, 130_000)  # ties, bursts and empty minutes
DENSE_GAPS_MS = (0, 0, 3, 17, 90, 250, 900, 4_000)


def scripted_trades(
    symbols: list[str], minutes: int, seed: int, gaps_ms: tuple[int, ...] = SPARSE_GAPS_MS
) -> dict[str, list[AggTrade]]:
    """Per symbol, trades in (T, a) order; the last symbol goes quiet after a third of the time."""
    rng = random.Random(seed)
    out: dict[str, list[AggTrade]] = {}
    for n, symbol in enumerate(symbols):
        end = T0 + (minutes // 3 if n == len(symbols) - 1 else minutes) * 60_000
        t, a, tick = T0 + rng.randrange(5_000), 1_000 * (n + 1), 10_000 + rng.randrange(5_000)
        trades = []
        while t < end:
            tick = max(1, tick + rng.randrange(-5, 6))
            first = a * 3
            trades.append(
                AggTrade(
                    symbol,
                    a,
                    f"{tick // 100}.{tick % 100:02d}",
                    f"{rng.randrange(1, 10**6) / 10**4:.4f}",
                    first,
                    first + rng.randrange(3),
                    t,
                    rng.random() < 0.5,
                )
            )
            a += 1
            t += rng.choice(gaps_ms)
        out[symbol] = trades
    return out


def batches(streams: dict[str, list[AggTrade]], seed: int) -> list[tuple[str, list[AggTrade]]]:
    """Per-symbol batches of 1-6 trades, interleaved across symbols in time order (what ingest writes)."""
    rng = random.Random(seed)
    chunks = []
    for symbol, trades in streams.items():
        i = 0
        while i < len(trades):
            size = rng.randrange(1, 7)
            chunks.append((trades[i].T, symbol, trades[i : i + size]))
            i += size
    return [(symbol, chunk) for _t, symbol, chunk in sorted(chunks, key=lambda c: (c[0], c[1]))]


def oracle(streams: dict[str, list[AggTrade]]) -> dict[tuple[str, str, int], Kline]:
    return {(k.s, k.i, k.t): k for trades in streams.values() for i in INTERVALS for k in reference_klines(trades, i)}


def end_of_stream(streams: dict[str, list[AggTrade]], grace_ms: int) -> int:
    """A market time at which every kline with trades has closed (close + grace passed)."""
    last = max(t.T for trades in streams.values() for t in trades)
    return close_time("5m", open_time("5m", last)) + grace_ms + 1


async def read_topic(settings: Settings, topic: str) -> list[tuple[bytes | None, bytes]]:
    """Every record of ``topic`` up to its current end, in partition order."""
    consumer = make_consumer(settings.kafka, group_id=None)
    await consumer.start()
    try:
        await consumer._client._wait_on_metadata(topic)
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[tuple[bytes | None, bytes]] = []
        for tp in tps:
            while await consumer.position(tp) < ends[tp]:
                for record in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                    if record.offset < ends[tp]:
                        out.append((record.key, record.value))
        return out
    finally:
        await consumer.stop()


async def eventually(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def agg_settings(settings: Settings) -> AsyncIterator[Settings]:
    s = settings.model_copy(
        update={
            "market": settings.market.model_copy(update={"intervals": INTERVALS}),
            "aggregator": settings.aggregator.model_copy(update={"snapshot_interval_ms": 200, "http_port": 0}),
        }
    )
    yield s
    await delete_topics(s.kafka, [checkpoint_topic(s)])


async def produce(settings: Settings, records: list[tuple[bytes | None, bytes]]) -> None:
    producer = make_producer(settings.kafka)
    await producer.start()
    try:
        for key, value in records:
            await producer.send(settings.kafka.topics.trades, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


async def run_worker(
    settings: Settings, clock: ManualClock, body: Callable[[AggregatorWorker], Awaitable[Any]], **options: Any
) -> Any:
    worker = AggregatorWorker(settings, clock, **options)
    await worker.start()
    try:
        return await body(worker)
    finally:
        await worker.stop()


async def test_a_scripted_stream_gives_exactly_the_oracles_klines_and_agreeing_snapshots(
    agg_settings: Settings,
) -> None:
    s = agg_settings
    streams = scripted_trades(["BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "QUIETUSDT"], minutes=25, seed=11)
    records: list[tuple[bytes | None, bytes]] = [
        (sym.encode(), encode_trade_batch(sym, b)) for sym, b in batches(streams, 3)
    ]
    records.insert(len(records) // 2, (b"BTCUSDT", b'{"type":"trades","s":"BTCUSDT","trades":[{"a":1}]}'))
    clock = ManualClock()
    grace = s.aggregator.grace_ms

    async def body(worker: AggregatorWorker) -> None:
        engine = worker.engine
        assert engine is not None
        await produce(s, records)
        await eventually(
            lambda: engine.ready and engine.lag() == 0 and engine.stats.records == len(records), 30, "all records"
        )
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{worker.port}/snapshot?symbol=btcusdt") as response:
                body = await response.json()
            assert body["ready"] and {k["i"] for k in body["klines"]} == set(INTERVALS)
            assert [Kline.from_dict(k) for k in body["klines"]] == engine.current("BTCUSDT")
            async with http.get(f"http://127.0.0.1:{worker.port}/metrics.json") as response:
                metrics = await response.json()
            assert metrics["dead_letters"] == 1 and metrics["data_loss"] == 0 and metrics["lag"] == 0
        clock.set(end_of_stream(streams, grace))  # the quiet symbol's klines close only now
        expected = len(oracle(streams))
        await eventually(lambda: engine.stats.finalized_confirmed >= expected, 15, "finalized klines")
        await asyncio.sleep(0.5)  # one more tick: the last snapshots

    await run_worker(s, clock, body)

    want = oracle(streams)
    limit: dict[tuple[str, str], int] = {}
    for sym, interval, t in want:
        limit[(sym, interval)] = max(t, limit.get((sym, interval), t))
    finalized = [decode_kline(v)[0] for _k, v in await read_topic(s, s.kafka.topics.finalized)]
    # after its last trade a symbol's klines go on as empty ones until the clock's end: not the oracle's business
    in_range = [k for k in finalized if k.t <= limit.get((k.s, k.i), -1)]
    assert len(in_range) == len({(k.s, k.i, k.t) for k in in_range}), "no duplicates without a crash"
    got = {(k.s, k.i, k.t): k for k in in_range}
    assert set(want) <= set(got)
    for key, kline in want.items():
        assert got[key].same_values(kline) and got[key].x, (key, got[key].differences(kline))
    quiet_last = max(k.t for (sym, i, _), k in want.items() if sym == "QUIETUSDT" and i == "5m")
    assert ("QUIETUSDT", "5m", quiet_last) in got  # closed by the clock, not by a trade

    last_snapshot: dict[tuple[str, str, int], Kline] = {}
    last_seq: dict[bytes, int] = defaultdict(lambda: -1)
    for key, value in await read_topic(s, s.kafka.topics.snapshots):
        kline, seq = decode_kline(value)
        assert key is not None and seq is not None and seq > last_seq[key], "snapshot seq must increase per key"
        last_seq[key] = seq
        last_snapshot[(kline.s, kline.i, kline.t)] = kline
    for key, kline in want.items():
        assert last_snapshot[key].same_values(kline) and last_snapshot[key].x, key

    letters = await read_topic(s, s.kafka.topics.dead_letter)
    assert len(letters) == 1 and b"trades[0]" in letters[0][1]


async def test_a_full_finalized_producer_stops_the_input_and_loses_nothing(
    agg_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # A producer batch holds about one kline; minute 1 closes 24 klines at once. The agent queues what the
    # producer does not take, stops fetching while more than 5 are in flight (the unit tests show the wait
    # itself), and every kline reaches the topic once.
    s = agg_settings.model_copy(
        update={"persistence": agg_settings.persistence.model_copy(update={"max_in_flight": 5})}
    )
    symbols = [f"S{n:02d}USDT" for n in range(24)]
    minute0 = [
        (sym.encode(), encode_trade_batch(sym, [AggTrade(sym, 1, "10", "1", 1, 1, T0 + n, False)]))
        for n, sym in enumerate(symbols)
    ]
    minute1 = [
        (sym.encode(), encode_trade_batch(sym, [AggTrade(sym, 2, "11", "1", 2, 2, T0 + 60_000 + n, True)]))
        for n, sym in enumerate(symbols)
    ]
    clock = ManualClock()

    async def body(worker: AggregatorWorker) -> None:
        engine = worker.engine
        assert engine is not None
        await produce(s, minute0 + minute1)
        await eventually(lambda: engine.stats.records == 48, 30, "all records")
        await eventually(lambda: engine.stats.finalized_confirmed >= 24, 60, "every closed kline acknowledged")
        applied = engine.stats.trades_applied
        await produce(
            s,
            [
                (sym.encode(), encode_trade_batch(sym, [AggTrade(sym, 3, "12", "1", 3, 3, T0 + 61_000, True)]))
                for sym in symbols
            ],
        )
        await eventually(lambda: engine.stats.trades_applied == applied + 24, 15, "the agent keeps applying")
        return None

    with caplog.at_level(logging.ERROR, logger="services.aggregator"):
        await run_worker(s, clock, body, finalized_producer_options={"max_batch_size": 600, "linger_ms": 2000})
    assert not [r for r in caplog.records if getattr(r, "log_type", None) == "DATA_LOSS"]
    finalized = [decode_kline(v)[0] for _k, v in await read_topic(s, s.kafka.topics.finalized)]
    minute0_klines = sorted(k.s for k in finalized if k.i == "1m" and k.t == T0)
    assert minute0_klines == symbols  # every one of them, once
