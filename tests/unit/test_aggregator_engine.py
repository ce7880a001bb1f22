"""The aggregator engine's protocol, against an in-memory broker: exact output, crash/restore, rebalance, loss.

The fake broker keeps what a real one keeps across a crash: delivered records and committed offsets. Producers
deliver either at once or when the test says so; a "crash" drops the engine with whatever was still in flight.
The recovery property test crashes at random points (mid-checkpoint included) and checks that every kline the
oracle (:func:`reference_klines`) computes reaches ``klines.finalized`` with its exact values.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.aggregator import engine as engine_module
from services.aggregator import output as output_module
from services.aggregator.checkpoint import PartitionCheckpoint, decode_partition
from services.aggregator.clock import Clock, EventClock, ManualClock
from services.aggregator.engine import SEQ_LEASE, Aggregator
from services.core.book import DEFAULT_REPAIR_HORIZON_MS
from services.core.intervals import close_time
from services.core.models import AggTrade, Kline
from services.core.reference import reference_klines
from services.shared.messages import Gap, decode_kline, encode_gap, encode_trade_batch

pytestmark = pytest.mark.unit

TRADES, FINALIZED, SNAPSHOTS, DLQ, CKPT = "t.trades", "t.finalized", "t.snapshots", "t.dlq", "t.ckpt"
INTERVALS = ("1m", "5m")
PARTITIONS = 2
T0 = 1_735_689_600_000  # 2025-01-01 00:00 UTC


class Broker:
    """What survives a crash: delivered records per (topic, partition) and committed offsets."""

    def __init__(self) -> None:
        self.logs: dict[tuple[str, int], list[tuple[bytes | None, bytes | None]]] = defaultdict(list)
        self.committed: dict[int, int] = {}

    def values(self, topic: str) -> list[bytes]:
        return [v for (t, _p), log in sorted(self.logs.items()) if t == topic for _k, v in log if v is not None]

    def records(self, partition: int, start: int, count: int) -> list[ConsumerRecord[bytes, bytes]]:
        log = self.logs[(TRADES, partition)]
        return [
            ConsumerRecord(TRADES, partition, offset, 0, 0, key, value, None, 0, 0, ())
            for offset, (key, value) in enumerate(log[start : start + count], start=start)
        ]


class FakeProducer:
    """aiokafka's ``send()`` contract: a delivery future at once; suspends when ``capacity`` is reached."""

    def __init__(self, broker: Broker, *, auto: bool = True, capacity: int | None = None) -> None:
        self.broker = broker
        self.auto = auto
        self.capacity = capacity
        self.pending: list[tuple[tuple[str, int], bytes | None, bytes | None, asyncio.Future[Any]]] = []
        self.dead = False
        self.room = asyncio.Event()

    async def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, partition: int | None = None
    ) -> asyncio.Future[Any]:
        while self.capacity is not None and len(self.pending) >= self.capacity:
            self.room.clear()
            await self.room.wait()  # aiokafka: until the partition's batch is drained
        if partition is None:
            partition = zlib.crc32(key or b"") % PARTITIONS
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.dead:
            return future  # the process died: never delivered, never answered
        if self.auto:
            self.broker.logs[(topic, partition)].append((key, value))
            future.set_result(None)
        else:
            self.pending.append(((topic, partition), key, value, future))
        return future

    def deliver(self, count: int | None = None) -> None:
        ready, self.pending = self.pending[:count], self.pending[count:] if count is not None else []
        for where, key, value, future in ready:
            self.broker.logs[where].append((key, value))
            future.set_result(None)
        self.room.set()

    def fail(self, count: int) -> None:
        """The next ``count`` in-flight records fail (not written); the ones behind them may still succeed."""
        failed, self.pending = self.pending[:count], self.pending[count:]
        for _where, _key, _value, future in failed:
            future.set_exception(RuntimeError("delivery failed"))
        self.room.set()

    async def flush(self) -> None:
        self.deliver()


class FakeReader:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.reads = 0

    async def read(self, partitions: Iterable[int], timeout_s: float) -> dict[int, PartitionCheckpoint]:
        self.reads += 1
        out = {}
        for p in partitions:
            latest: dict[bytes | None, bytes | None] = {}
            for key, value in self.broker.logs[(CKPT, p)]:
                latest[key] = value
            out[p] = decode_partition(CKPT, p, latest)
        return out


class FakeGroup:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.positions: dict[int, int] = {}  # the consumer's fetch positions (the harness reads from here)

    async def seek(self, tp: TopicPartition, offset: int | None) -> None:
        self.positions[tp.partition] = offset or 0

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> bool:
        for tp, offset in offsets.items():
            self.broker.committed[tp.partition] = offset
        return True

    def highwater(self, tp: TopicPartition) -> int | None:
        return len(self.broker.logs[(TRADES, tp.partition)])


class Harness:
    """One engine incarnation on the shared broker, with a consumer position per partition."""

    def __init__(
        self,
        broker: Broker,
        clock: Clock,
        *,
        finalized_auto: bool = True,
        capacity: int | None = None,
        checkpoints_auto: bool = True,
        intervals: tuple[str, ...] = INTERVALS,
        grace_ms: int = 0,
        max_in_flight: int = 20_000,
        repair_horizon_ms: int = DEFAULT_REPAIR_HORIZON_MS,
        monotonic: Callable[[], float] = time.monotonic,
        **options: Any,
    ) -> None:
        self.broker = broker
        self.finalized = FakeProducer(broker, auto=finalized_auto, capacity=capacity)
        self.snapshots = FakeProducer(broker)
        self.checkpoints = FakeProducer(broker, auto=checkpoints_auto)
        self.reader = FakeReader(broker)
        self.engine = Aggregator(
            trades_topic=TRADES,
            finalized_topic=FINALIZED,
            snapshots_topic=SNAPSHOTS,
            dead_letter_topic=DLQ,
            checkpoint_topic=CKPT,
            intervals=intervals,
            grace_ms=grace_ms,
            clock=clock,
            finalized=self.finalized,
            snapshots=self.snapshots,
            checkpoints=self.checkpoints,
            reader=self.reader,
            flush_timeout_s=0.2,
            max_in_flight=max_in_flight,
            repair_horizon_ms=repair_horizon_ms,
            monotonic=monotonic,
            **options,
        )
        self.group = FakeGroup(broker)
        self.engine.attach(self.group)
        self.position = self.group.positions

    async def assign(self, partitions: Sequence[int] = tuple(range(PARTITIONS))) -> None:
        auto, self.checkpoints.auto = self.checkpoints.auto, True  # the restore's lease claim lands at once
        await self.engine.on_assigned({TopicPartition(TRADES, p) for p in partitions})
        self.checkpoints.auto = auto
        for p in partitions:  # Faust seeks to the committed offset after the assignment
            self.position[p] = self.broker.committed.get(p, 0)

    async def fetch(self, partition: int, count: int) -> int:
        records = self.broker.records(partition, self.position[partition], count)
        if records:
            await self.engine.handle_batch({TopicPartition(TRADES, partition): records}, self.engine.epoch)
            self.position[partition] += len(records)
        return len(records)

    async def drain(self) -> None:
        for p in self.position:
            while await self.fetch(p, 50):
                pass

    def crash(self, delivered: int = 0) -> None:
        """The process dies; the first ``delivered`` in-flight records of each producer made it to the broker."""
        for producer in (self.finalized, self.snapshots, self.checkpoints):
            producer.deliver(delivered)
            producer.dead = True
            producer.pending.clear()
        for part in self.engine.parts.values():
            if part.flight is not None:
                part.flight.cancel()


def partition_of(symbol: str) -> int:
    return zlib.crc32(symbol.encode()) % PARTITIONS


def produce(broker: Broker, batches: Iterable[tuple[str, list[AggTrade]]]) -> None:
    for symbol, trades in batches:
        broker.logs[(TRADES, partition_of(symbol))].append((symbol.encode(), encode_trade_batch(symbol, trades)))


def make_trades(symbol: str, count: int, seed: int, start: int = T0) -> list[AggTrade]:
    out = []
    t = start
    for k in range(count):
        t += (seed * 7919 + k * 104_729) % 40_000  # 0..40 s apart: some minutes stay empty
        price = f"{100 + (seed + k * 31) % 17}.{(k * 7) % 100:02d}"
        out.append(
            AggTrade(symbol, 1000 + k, price, f"0.{(seed + k) % 9 + 1}", 5000 + 2 * k, 5001 + 2 * k, t, k % 3 == 0)
        )
    return out


def interleave(streams: dict[str, list[AggTrade]], batch: int) -> list[tuple[str, list[AggTrade]]]:
    chunks = [(ts[i].T, s, ts[i : i + batch]) for s, ts in streams.items() for i in range(0, len(ts), batch)]
    return [(s, chunk) for _t, s, chunk in sorted(chunks, key=lambda c: (c[0], c[1]))]


def finalized(broker: Broker) -> dict[tuple[str, str, int], list[Kline]]:
    out: dict[tuple[str, str, int], list[Kline]] = defaultdict(list)
    for value in broker.values(FINALIZED):
        kline, _ = decode_kline(value)
        out[(kline.s, kline.i, kline.t)].append(kline)
    return out


def assert_exact(broker: Broker, streams: dict[str, list[AggTrade]]) -> None:
    """Every oracle kline is on the finalized topic, and every copy of it has the oracle's values."""
    got = finalized(broker)
    for symbol, trades in streams.items():
        for interval in INTERVALS:
            for expected in reference_klines(trades, interval):
                copies = got.get((symbol, interval, expected.t))
                assert copies, f"missing {symbol} {interval} {expected.t}"
                for kline in copies:
                    assert kline.same_values(expected), (kline.differences(expected), kline, expected)


def end_of(streams: dict[str, list[AggTrade]]) -> int:
    last = max(t.T for ts in streams.values() for t in ts)
    return close_time("5m", last - last % 300_000) + 1


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("per_call", [output_module.SNAPSHOTS_PER_CALL, 3], ids=["default", "3-per-call"])
async def test_a_scripted_stream_yields_the_oracles_klines_and_snapshots_agree(
    per_call: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(output_module, "SNAPSHOTS_PER_CALL", per_call)  # a backlog published over many calls
    broker, clock = Broker(), ManualClock()
    streams = {s: make_trades(s, 60, seed) for seed, s in enumerate(["BTCUSDT", "ETHUSDT", "XRPUSDT"])}
    produce(broker, interleave(streams, 4))
    h = Harness(broker, clock)
    await h.assign()
    for _ in range(4):
        for p in range(PARTITIONS):
            await h.fetch(p, 5)
        h.engine.tick()
    await h.drain()
    clock.set(end_of(streams))
    h.engine.tick()
    h.engine.tick()
    await h.engine.stop(5.0)  # publishes the last snapshots
    assert_exact(broker, streams)
    # snapshots: seq increases per key, and the last snapshot of each kline equals its finalized record
    last: dict[tuple[str, str, int], tuple[int, Kline]] = {}
    seqs: dict[tuple[str, str], int] = {}
    for value in broker.values(SNAPSHOTS):
        kline, seq = decode_kline(value)
        assert seq is not None and seq > seqs.get((kline.s, kline.i), -1)
        seqs[(kline.s, kline.i)] = seq
        last[(kline.s, kline.i, kline.t)] = (seq, kline)
    for key, copies in finalized(broker).items():
        assert last[key][1].same_values(copies[-1]) and last[key][1].x, key
    assert h.engine.stats.data_loss == 0 and h.engine.stats.dead_letters == 0


async def test_quiet_symbols_close_by_the_clock_only_once_the_partition_is_read() -> None:
    broker, clock = Broker(), ManualClock()
    trades = make_trades("BTCUSDT", 3, 1)
    produce(broker, [("BTCUSDT", trades[:2]), ("BTCUSDT", trades[2:])])
    h = Harness(broker, clock)
    await h.assign()
    await h.fetch(partition_of("BTCUSDT"), 1)
    clock.set(T0 + 3_600_000)
    h.engine.tick()  # a backlog remains: the clock must not close anything yet
    assert finalized(broker) == {}
    await h.drain()
    h.engine.tick()
    closed = finalized(broker)
    expected = {(k.s, k.i, k.t) for i in INTERVALS for k in reference_klines(trades, i)}
    assert expected <= set(closed)


async def test_with_the_event_clock_only_a_symbols_own_trades_close_its_klines() -> None:
    # Replays: another symbol's newer trade says nothing about this one's feed (it may be behind), so a tick
    # closes nothing; the klines are exactly those a replay of each symbol's trades closes.
    broker = Broker()
    eth = [AggTrade("ETHUSDT", 1, "10", "1", 1, 1, T0 + 5_000, False)]
    btc = [AggTrade("BTCUSDT", 1 + k, "20", "1", 1 + k, 1 + k, T0 + k * 600_000, False) for k in range(3)]
    produce(broker, [("ETHUSDT", eth), ("BTCUSDT", btc)])
    h = Harness(broker, EventClock())
    await h.assign()
    await h.drain()
    for _ in range(3):
        h.engine.tick()
    closed = finalized(broker)
    assert not [key for key in closed if key[0] == "ETHUSDT"]  # its only kline is still open, as in a replay
    expected = {("BTCUSDT", i, k.t) for i in INTERVALS for k in reference_klines(btc, i)[:-1]}
    assert set(closed) == expected


async def test_a_long_batch_yields_between_slices_and_a_rebalance_there_reads_the_rest_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine_module, "SLICE_RECORDS", 2)
    ticks = iter(range(10**6))
    broker, clock = Broker(), ManualClock()
    streams = {"BTCUSDT": make_trades("BTCUSDT", 40, 3)}
    produce(broker, interleave(streams, 5))  # 8 records
    p = partition_of("BTCUSDT")
    h = Harness(broker, clock, monotonic=lambda: next(ticks) * 0.05)  # every slice "takes" 50 ms
    await h.assign()
    records = broker.records(p, 0, 8)
    batch = asyncio.create_task(h.engine.handle_batch({TopicPartition(TRADES, p): records}, h.engine.epoch))
    await asyncio.sleep(0)  # the first slice is applied, then the engine yields
    assert h.engine.parts[p].position == 2 and not batch.done()
    h.position[p] = 8  # the consumer's fetch position is past the whole batch
    await h.engine.on_revoked({TopicPartition(TRADES, p)})  # a rebalance while it yields ...
    rest = await batch  # the rest is not applied: it comes back to be read again once the rebalance is over
    assert rest is not None and [r.offset for r in rest[TopicPartition(TRADES, p)]] == list(range(2, 8))
    await h.engine.on_assigned({TopicPartition(TRADES, p)})  # ... gives the partition back (parked state)
    await h.engine.read_again(rest)  # what the consumer does once the flow resumes
    assert h.position[p] == h.engine.parts[p].position == 2  # read again from after slice 1
    await h.drain()
    clock.set(end_of(streams))
    h.engine.tick()
    assert_exact(broker, streams)
    assert h.engine.stats.records == 8  # every record applied exactly once


async def test_crash_before_any_checkpoint_replays_from_the_start() -> None:
    broker, clock = Broker(), ManualClock()
    streams = {"BTCUSDT": make_trades("BTCUSDT", 40, 3)}
    produce(broker, interleave(streams, 3))
    h = Harness(broker, clock)
    await h.assign()
    await h.drain()
    h.crash()
    h2 = Harness(broker, clock)
    await h2.assign()
    await h2.drain()
    clock.set(end_of(streams))
    h2.engine.tick()
    assert_exact(broker, streams)


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    symbols = draw(
        st.lists(st.sampled_from(["BTCUSDT", "ETHUSDT", "XRPUSDT", "SOLUSDT"]), min_size=1, max_size=4, unique=True)
    )
    streams = {s: make_trades(s, draw(st.integers(5, 50)), draw(st.integers(0, 99))) for s in symbols}
    steps = draw(
        st.lists(
            st.one_of(
                st.tuples(st.just("fetch"), st.integers(0, PARTITIONS - 1), st.integers(1, 6)),
                st.tuples(st.just("tick"), st.just(0), st.just(0)),
                st.tuples(st.just("deliver"), st.integers(0, 1), st.integers(0, 5)),
                st.tuples(st.just("fail"), st.just(1), st.integers(1, 2)),
                st.tuples(st.just("crash"), st.integers(0, 4), st.integers(0, 3)),
            ),
            min_size=5,
            max_size=60,
        )
    )
    layout = draw(st.sampled_from(["batch", "batch", "bare", "envelope"]))  # payloads: one trade per record
    return {"streams": streams, "batch": draw(st.integers(1, 5)), "steps": steps, "layout": layout}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_crashes_at_any_point_lose_nothing_and_corrupt_nothing(scenario: dict[str, Any]) -> None:
    asyncio.run(_crash_scenario(scenario))


async def _crash_scenario(scenario: dict[str, Any]) -> None:
    broker, clock = Broker(), ManualClock()
    streams = scenario["streams"]
    if scenario["layout"] == "batch":
        produce(broker, interleave(streams, scenario["batch"]))
    else:
        for symbol, chunk in interleave(streams, 1):
            value = binance_payload(chunk[0], envelope=scenario["layout"] == "envelope")
            broker.logs[(TRADES, partition_of(symbol))].append((symbol.encode(), value))
    h = Harness(broker, clock, finalized_auto=False, checkpoints_auto=False)
    await h.assign()
    for action, which, amount in scenario["steps"]:
        if action == "fetch":
            await h.fetch(which, amount)
        elif action == "tick":
            h.engine.tick()
        elif action == "deliver":
            (h.finalized, h.checkpoints)[which].deliver(amount)
        elif action == "fail":
            (h.finalized, h.checkpoints)[which].fail(amount)
        else:
            for _ in range(which):  # let a checkpoint get part of the way
                await asyncio.sleep(0)
            h.crash(delivered=amount)
            h = Harness(broker, clock, finalized_auto=False, checkpoints_auto=False)
            await h.assign()
        await asyncio.sleep(0)
    for producer in (h.finalized, h.checkpoints):
        producer.auto = True
        producer.deliver()
    await h.drain()
    clock.set(end_of(streams))
    h.engine.tick()
    await asyncio.sleep(0)
    assert_exact(broker, streams)
    # every record was applied once per state lineage: a restored book never saw a trade twice
    assert h.engine.metrics()["duplicate_trades"] == 0


async def test_a_full_finalized_buffer_queues_the_klines_and_stops_the_input_until_they_are_delivered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker, clock = Broker(), ManualClock()
    trades = [AggTrade("BTCUSDT", 1 + k, "10", "1", 1 + k, 1 + k, T0 + k * 60_000, False) for k in range(4)]
    produce(broker, [("BTCUSDT", trades)])
    h = Harness(broker, clock, finalized_auto=False, capacity=1, max_in_flight=2)
    await h.assign()
    with caplog.at_level(logging.ERROR, logger="services.aggregator"):
        await h.drain()  # closes three 1m klines at once; the producer's buffer holds one
        assert len(h.finalized.pending) == 1 and h.engine.metrics()["finalized_queued"] == 2
        assert not h.engine.has_room()
        room = asyncio.create_task(h.engine.wait_for_room())
        await asyncio.sleep(0.05)
        assert not room.done()  # the input waits: the consumer fetches nothing meanwhile
        for _ in range(3):
            h.finalized.deliver()
            await asyncio.sleep(0.01)  # the outbox hands over the next kline once the buffer drained
        await asyncio.wait_for(room, 1.0)
    assert h.engine.stats.data_loss == 0 and not [r for r in caplog.records if r.levelno >= logging.ERROR]
    got = finalized(broker)
    assert sorted(t for (_s, i, t), copies in got.items() if i == "1m" and len(copies) == 1) == [
        T0,
        T0 + 60_000,
        T0 + 120_000,
    ]
    assert h.engine.metrics()["unconfirmed_finalized"] == 0


async def test_a_failed_delivery_is_sent_again_and_never_lost() -> None:
    broker, clock = Broker(), ManualClock()
    trades = [AggTrade("BTCUSDT", 1 + k, "10", "1", 1 + k, 1 + k, T0 + k * 60_000, False) for k in range(3)]
    produce(broker, [("BTCUSDT", trades)])
    h = Harness(broker, clock, finalized_auto=False)
    await h.assign()
    await h.drain()
    assert len(h.finalized.pending) == 2
    h.finalized.fail(2)  # the broker did not acknowledge them (request timed out, connection lost)
    await asyncio.sleep(0.01)
    assert h.engine.stats.finalized_resent == 2 and h.engine.metrics()["unconfirmed_finalized"] == 2
    h.finalized.deliver()
    await asyncio.sleep(0.01)  # delivery callbacks run on the loop
    assert sorted(t for (_s, i, t) in finalized(broker) if i == "1m") == [T0, T0 + 60_000]
    assert h.engine.stats.data_loss == 0 and h.engine.metrics()["unconfirmed_finalized"] == 0


async def test_unconfirmed_finalized_klines_are_sent_again_after_a_restore() -> None:
    broker, clock = Broker(), ManualClock()
    trades = [AggTrade("BTCUSDT", 1 + k, "10", "1", 1 + k, 1 + k, T0 + k * 60_000, False) for k in range(3)]
    produce(broker, [("BTCUSDT", trades)])
    h = Harness(broker, clock, finalized_auto=False)
    await h.assign()
    await h.drain()
    h.engine.tick()  # checkpoint: the two closed klines are still unconfirmed
    await asyncio.sleep(0.01)
    assert broker.committed[partition_of("BTCUSDT")] == 1
    h.crash()  # their sends die with the process
    assert finalized(broker) == {}
    h2 = Harness(broker, clock)
    await h2.assign()
    assert h2.engine.stats.resent_finalized == 2
    assert {key[2] for key in finalized(broker) if key[1] == "1m"} == {T0, T0 + 60_000}


async def test_rebalance_keeps_a_partition_given_back_and_restores_a_new_one() -> None:
    broker, clock = Broker(), ManualClock()
    streams = {s: make_trades(s, 30, n) for n, s in enumerate(["BTCUSDT", "ETHUSDT", "XRPUSDT", "SOLUSDT"])}
    produce(broker, interleave(streams, 2))
    a, b = Harness(broker, clock), Harness(broker, clock)
    await a.assign([0, 1])
    await a.fetch(0, 7)
    await a.fetch(1, 4)
    epoch = a.engine.epoch
    stale = broker.records(0, a.position[0], 3)
    # b joins: a keeps 0, gives 1 to b
    await a.engine.on_revoked({TopicPartition(TRADES, 0), TopicPartition(TRADES, 1)})
    await a.assign([0])
    await b.assign([1])
    assert a.engine.stats.reused_partitions == 1 and a.reader.reads == 1  # partition 0 continued in memory
    a.position[0] += len(stale)  # as if the consumer had fetched past them
    await a.engine.handle_batch({TopicPartition(TRADES, 0): stale}, epoch)
    assert a.engine.stats.stale_batches == 1  # fetched across the rebalance: not applied, and read again
    assert a.position[0] == a.engine.parts[0].resume_offset()
    await a.drain()
    await b.drain()
    clock.set(end_of(streams))
    a.engine.tick()
    b.engine.tick()
    await asyncio.sleep(0.01)
    assert_exact(broker, streams)


async def test_a_batch_dropped_while_the_flow_was_stopped_is_read_again_from_where_it_resumes() -> None:
    # The consumer stops the flow for a rebalance; a fetch that returns after the rebalance's own seek has
    # moved the fetch position past its records, and the batch is not applied (the flow was stopped). The
    # partition, given back, continues from its parked state: the records must be read again, not skipped.
    broker, clock = Broker(), ManualClock()
    streams = {s: make_trades(s, 30, n) for n, s in enumerate(["BTCUSDT", "ETHUSDT", "XRPUSDT", "SOLUSDT"])}
    produce(broker, interleave(streams, 2))
    a = Harness(broker, clock)
    await a.assign([0, 1])
    await a.fetch(0, 7)
    await a.fetch(1, 4)
    await a.engine.on_revoked({TopicPartition(TRADES, 0), TopicPartition(TRADES, 1)})
    await a.assign([0, 1])  # both given back: the parked state continues
    dropped = broker.records(0, a.position[0], 3)
    assert dropped
    a.position[0] += len(dropped)  # fetched after the seek, then dropped
    await a.engine.read_again({TopicPartition(TRADES, 0): dropped})
    assert a.position[0] == a.engine.parts[0].resume_offset() == dropped[0].offset
    await a.drain()
    clock.set(end_of(streams))
    a.engine.tick()
    await asyncio.sleep(0.01)
    assert_exact(broker, streams)


async def test_bad_records_go_to_the_dead_letter_topic_with_the_reason() -> None:
    broker, clock = Broker(), ManualClock()
    p = partition_of("BTCUSDT")
    broker.logs[(TRADES, p)] += [
        (b"BTCUSDT", b"{not json"),
        (None, encode_trade_batch("BTCUSDT", make_trades("BTCUSDT", 1, 0))),
        (b"BTCUSDT", json.dumps({"type": "trades", "s": "BTCUSDT", "trades": [{"a": -1}]}).encode()),
        (b"BTCUSDT", encode_gap(Gap("BTCUSDT", 1, 5, "test"))),
        (b"BTCUSDT", encode_trade_batch("BTCUSDT", make_trades("BTCUSDT", 2, 0))),
    ]
    h = Harness(broker, clock)
    await h.assign()
    await h.drain()
    letters = sorted((json.loads(v)["offset"], json.loads(v)["reason"]) for v in broker.values(DLQ))
    assert [offset for offset, _ in letters] == [0, 1, 2]
    assert "not JSON" in letters[0][1] and "no key" in letters[1][1] and "field 'a'" in letters[2][1]
    categories = [json.loads(v)["category"] for v in broker.values(DLQ)]
    assert sorted(categories) == ["field", "malformed", "symbol"]
    by_reason = h.engine.metrics()["dead_letters_by_reason"]
    assert {k: n for k, n in by_reason.items() if n} == {"field": 1, "malformed": 1, "symbol": 1}
    assert h.engine.stats.gaps == 1 and h.engine.stats.trades_applied == 2
    # The trades after the gap record (ids 1000, 1001, past its 1..5) prove the feed continuous again.
    assert h.engine.parts[p].books.book("BTCUSDT").continuous


async def test_a_bad_record_inside_a_run_is_dead_lettered_and_its_neighbours_are_applied() -> None:
    """Consecutive batch records of a symbol are checked and folded as one run; one that fails a check, or a
    batch that does not continue the stream, sends the run record by record: nothing valid is lost."""
    broker, clock = Broker(), ManualClock()
    p = partition_of("BTCUSDT")
    trades = make_trades("BTCUSDT", 40, 3)
    zero_price = json.loads(encode_trade_batch("BTCUSDT", trades[10:12]))
    zero_price["trades"][1]["p"] = "0.000"
    late = trades[20:22]  # delivered after trades[22:30]: out of order, still exact
    log = broker.logs[(TRADES, p)]
    log += [(b"BTCUSDT", encode_trade_batch("BTCUSDT", trades[k : k + 2])) for k in range(0, 10, 2)]
    log.append((b"BTCUSDT", json.dumps(zero_price, separators=(",", ":")).encode()))
    log += [(b"BTCUSDT", encode_trade_batch("BTCUSDT", chunk)) for chunk in (trades[12:20], trades[22:30], late)]
    log += [(b"BTCUSDT", encode_trade_batch("BTCUSDT", trades[k : k + 5])) for k in range(30, 40, 5)]
    h = Harness(broker, clock)
    await h.assign()
    await h.drain()
    letters = [json.loads(v) for v in broker.values(DLQ)]
    assert [(letter["offset"], letter["reason"]) for letter in letters] == [
        (5, "trades[1]: field 'p' (price) = '0.000' must be greater than zero")
    ]
    applied = trades[:10] + trades[12:]
    assert h.engine.stats.trades_applied == len(applied)
    clock.set(end_of({"BTCUSDT": applied}))
    h.engine.tick()
    await asyncio.sleep(0.01)
    got = finalized(broker)
    for interval in INTERVALS:
        for expected in reference_klines(applied, interval):
            newest = max(got[("BTCUSDT", interval, expected.t)], key=lambda kline: kline.version)
            assert newest.same_values(expected), (newest.differences(expected), newest, expected)


async def test_snapshot_sequence_continues_above_the_previous_owners_lease() -> None:
    broker, clock = Broker(), ManualClock()
    produce(broker, [("BTCUSDT", make_trades("BTCUSDT", 5, 0))])
    h = Harness(broker, clock)
    await h.assign()
    await h.drain()
    h.engine.tick()
    await asyncio.sleep(0.01)
    first = max(decode_kline(v)[1] or 0 for v in broker.values(SNAPSHOTS))
    h.crash()
    produce(broker, [("BTCUSDT", make_trades("BTCUSDT", 8, 0)[5:])])
    h2 = Harness(broker, clock)
    await h2.assign()
    await h2.drain()
    h2.engine.tick()
    await asyncio.sleep(0.01)
    seqs = [decode_kline(v)[1] or 0 for v in broker.values(SNAPSHOTS)]
    assert seqs == sorted(seqs) and min(seqs[seqs.index(first) + 1 :]) >= SEQ_LEASE


def checkpoint_keys(broker: Broker, partition: int) -> list[bytes | None]:
    return [key for key, _ in broker.logs[(CKPT, partition)]]


async def test_a_failed_checkpoint_record_blocks_the_marker_and_is_written_again() -> None:
    broker, clock = Broker(), ManualClock()
    symbols = [s for s in ("BTCUSDT", "ETHUSDT", "XRPUSDT", "SOLUSDT", "ADAUSDT") if partition_of(s) == 0][:2]
    produce(broker, [(s, make_trades(s, 3, n)) for n, s in enumerate(symbols)])
    h = Harness(broker, clock, checkpoints_auto=False)
    await h.assign([0])
    written = len(checkpoint_keys(broker, 0))  # the restore's lease claim (a marker)
    await h.drain()
    h.engine.tick()
    await asyncio.sleep(0)
    first = h.checkpoints.pending[0][1]
    h.checkpoints.fail(1)  # the first symbol record fails, the second one is written
    h.checkpoints.deliver()
    await asyncio.sleep(0.01)
    assert checkpoint_keys(broker, 0)[written:] == [k for k in (symbols[0].encode(), symbols[1].encode()) if k != first]
    assert h.engine.stats.checkpoint_failures == 1 and 0 not in broker.committed  # no marker, no commit
    h.engine.tick()  # the next checkpoint writes the failed symbol again, then the marker, then commits
    for _ in range(3):
        await asyncio.sleep(0)
        h.checkpoints.deliver()
    await asyncio.sleep(0.01)
    keys = checkpoint_keys(broker, 0)
    assert keys[-1] == b"@marker" and first in keys[-3:-1]
    assert broker.committed[0] == 2


async def test_a_restore_refuses_other_intervals_and_keeps_the_checkpointed_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker, clock = Broker(), ManualClock()
    produce(broker, [("BTCUSDT", make_trades("BTCUSDT", 5, 0))])
    h = Harness(broker, clock)
    await h.assign()
    await h.drain()
    h.engine.tick()
    await asyncio.sleep(0.01)
    with caplog.at_level(logging.WARNING, logger="services.aggregator"):
        await Harness(broker, clock, grace_ms=500).assign()
    assert any("keep the grace_ms" in r.getMessage() for r in caplog.records)
    with pytest.raises(RuntimeError, match=r"market\.intervals"):
        await Harness(broker, clock, intervals=("1m", "1h")).assign()


def binance_payload(trade: AggTrade, *, envelope: bool = False) -> bytes:
    """``trade`` as Binance sends it on a raw stream, or in a combined-stream envelope."""
    m = "true" if trade.m else "false"
    payload = (
        f'{{"e":"aggTrade","E":{trade.T + 2},"s":"{trade.s}","a":{trade.a},"p":"{trade.p}","q":"{trade.q}",'
        f'"f":{trade.f},"l":{trade.l},"T":{trade.T},"m":{m},"M":true}}'
    )
    return (f'{{"stream":"{trade.s.lower()}@aggTrade","data":{payload}}}' if envelope else payload).encode()


@pytest.mark.parametrize("layout", ["bare", "envelope", "mixed"])
async def test_binance_payloads_one_per_record_are_folded_as_runs_with_the_oracles_klines(
    layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Raw payloads or envelopes of a symbol, one trade per record (alone: the engine's slice path; mixed with
    each other and with batches: the record loop), reach the book as one run of columns per fetch (one fold,
    no trade object), with exactly the oracle's klines."""
    broker, clock = Broker(), ManualClock()
    streams = {s: make_trades(s, 60, seed) for seed, s in enumerate(["BTCUSDT", "ETHUSDT", "XRPUSDT"])}
    for k, (symbol, chunk) in enumerate(interleave(streams, 1)):
        if layout == "mixed":
            envelope = k % 2 == 1
            value = encode_trade_batch(symbol, chunk) if k % 7 == 0 else binance_payload(chunk[0], envelope=envelope)
        else:
            value = binance_payload(chunk[0], envelope=layout == "envelope")
        broker.logs[(TRADES, partition_of(symbol))].append((symbol.encode(), value))
    folds: list[int] = []
    original = engine_module.KlineBook.extend

    def extend(book: Any, columns: Any) -> bool:
        folds.append(len(columns[0]))
        return original(book, columns)

    monkeypatch.setattr(engine_module.KlineBook, "extend", extend)
    h = Harness(broker, clock)
    record_loop: list[int] = []
    apply_run = h.engine._apply_run
    monkeypatch.setattr(h.engine, "_apply_run", lambda *run: record_loop.append(1) or apply_run(*run))
    await h.assign()
    for p in range(PARTITIONS):
        await h.fetch(p, 1000)
    assert bool(record_loop) is (layout == "mixed"), "payloads alone take the slice path, a mix the record loop"
    clock.set(end_of(streams))
    h.engine.tick()
    await asyncio.sleep(0.01)
    assert_exact(broker, streams)
    stats = h.engine.stats
    assert stats.trades_applied == 180 and stats.dead_letters == 0
    assert h.engine.metrics()["decoded_fast"] == 180 and h.engine.metrics()["decoded_slow"] == 0
    assert sorted(folds) == [60, 60, 60], "each symbol's records of one fetch are one run"


async def test_a_binance_payload_of_another_symbol_than_its_key_is_dead_lettered_by_the_book() -> None:
    """The contract reads a payload's symbol from the payload; the record's key picks the book, which refuses
    another symbol's trade with its reason (as before the fast path)."""
    broker, clock = Broker(), ManualClock()
    p = partition_of("BTCUSDT")
    eth = make_trades("ETHUSDT", 1, 0)[0]
    btc = make_trades("BTCUSDT", 3, 0)
    broker.logs[(TRADES, p)] += [
        (b"BTCUSDT", binance_payload(btc[0])),
        (b"BTCUSDT", binance_payload(eth, envelope=True)),
        (b"BTCUSDT", binance_payload(btc[1], envelope=True)),
        (b"BTCUSDT", binance_payload(btc[2]).replace(b'"a":', b'"a":-')),
    ]
    h = Harness(broker, clock)
    await h.assign()
    await h.drain()
    letters = [(json.loads(v)["offset"], json.loads(v)["reason"]) for v in broker.values(DLQ)]
    assert letters == [
        (1, "trade of symbol 'ETHUSDT' given to the book of 'BTCUSDT'"),
        (3, "field 'a' (aggregate trade id) = -1002 is outside [0, 9223372036854775807]"),
    ]
    book = h.engine.parts[p].books.book("BTCUSDT")
    assert book.last_a == btc[1].a and book.rejected == 1


async def test_a_slice_of_payloads_with_a_late_trade_and_a_bad_price_falls_back_record_by_record() -> None:
    """In a slice of payloads only, a symbol whose run the book refuses (a late trade, a zero price) is applied
    record by record: the bad record is dead-lettered with the contract's reason, the rest is exact."""
    broker, clock = Broker(), ManualClock()
    p = partition_of("BTCUSDT")
    trades = make_trades("BTCUSDT", 30, 5)
    order = [*trades[:10], *trades[12:20], *trades[10:12], *trades[20:]]  # two trades late
    values = [binance_payload(t, envelope=True) for t in order]
    values[25] = values[25].replace(f'"p":"{order[25].p}"'.encode(), b'"p":"0.00"')
    broker.logs[(TRADES, p)] += [(b"BTCUSDT", value) for value in values]
    h = Harness(broker, clock)
    await h.assign()
    await h.fetch(p, 1000)
    letters = [(json.loads(v)["offset"], json.loads(v)["reason"]) for v in broker.values(DLQ)]
    assert letters == [(25, "data: field 'p' (price) = '0.00' must be greater than zero")]
    applied = [t for k, t in enumerate(order) if k != 25]
    clock.set(end_of({"BTCUSDT": applied}))
    h.engine.tick()
    await asyncio.sleep(0.01)
    got = finalized(broker)
    for interval in INTERVALS:
        for expected in reference_klines(sorted(applied, key=lambda t: (t.T, t.a)), interval):
            newest = max(got[("BTCUSDT", interval, expected.t)], key=lambda kline: kline.version)
            assert newest.same_values(expected), (newest.differences(expected), newest, expected)
