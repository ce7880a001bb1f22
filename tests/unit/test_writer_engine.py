"""The writer engine's protocol, step by step, with a scripted consumer, a fake clock and an injected insert.

Every test checks the one invariant at every commit: an offset is committed only when each record before it is
stored (a row in the table, or a delivered dead letter, or a skipped tombstone). The fake table deduplicates by
token like ClickHouse does, so "inserted twice under the same token" shows up as exactly one copy. The real
broker and the real engine are exercised in tests/integration/test_writers.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaConnectionError

from services.core.models import InvalidInput, Kline
from services.finalized_writer import finalized_version
from services.shared.clickhouse import KLINE_COLUMNS, ClickHouseRejected, ClickHouseUnavailable, InsertSelectDenied
from services.shared.lifecycle import Shutdown
from services.shared.messages import DecodedKline, decode_kline_record, encode_kline
from services.snapshot_writer import snapshot_version
from services.writers.contract import KlineValues
from services.writers.engine import FlushAbandoned, WriterEngine
from services.writers.ports import DeadLetter
from services.writers.specs import WriterSpec

pytestmark = pytest.mark.unit

TOPIC = "klines.finalized"
T0 = 1_700_000_040_000
PARTITION = KLINE_COLUMNS.index("kafka_partition")
OFFSET = KLINE_COLUMNS.index("kafka_offset")
TOKEN = KLINE_COLUMNS.index("batch_token")
VERSION = KLINE_COLUMNS.index("version")


def tp(partition: int) -> TopicPartition:
    return TopicPartition(TOPIC, partition)


def kline_value(n: int, *, version: int = 0, x: bool = True, seq: int | None = None) -> bytes:
    t = T0 + n * 60_000
    d = Decimal
    k = Kline("BTCUSDT", "1m", t, t + 59_999, 1, 2, d("1"), d("2"), d("1"), d("1.5"), d("3"), 3, x, d("4"),
              d("1"), d("1"), version)  # fmt: skip
    return encode_kline(k, seq)


class FakeClock:
    """Monotonic time that moves only when the engine waits (an empty poll, a backoff sleep)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0.002)  # a little real time, so the keepalive polls can be observed


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass
class ScriptedConsumer:
    """Per-partition logs, an assignment, pause/resume and committed offsets, like a group member's view."""

    clock: FakeClock
    partitions: tuple[int, ...] = (0, 1, 2)
    logs: dict[TopicPartition, list[Record]] = field(default_factory=dict)
    positions: dict[TopicPartition, int] = field(default_factory=dict)
    assigned: set[TopicPartition] = field(default_factory=set)
    paused_tps: set[TopicPartition] = field(default_factory=set)
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    commit_log: list[dict[TopicPartition, tuple[int, str]]] = field(default_factory=list)
    polls: int = 0
    polls_while_paused: int = 0
    pause_calls: int = 0
    listener: Any = None

    def __post_init__(self) -> None:
        for p in self.partitions:
            self.logs[tp(p)] = []
            self.positions[tp(p)] = 0
        self.assigned = set(self.logs)

    def produce(self, partition: int, value: bytes | None, key: bytes | None = b"BTCUSDT|1m") -> int:
        log = self.logs[tp(partition)]
        log.append(Record(TOPIC, partition, len(log), key, value))
        return len(log) - 1

    async def getmany(self, *partitions: Any, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, Any]:
        self.polls += 1
        if self.paused_tps:
            self.polls_while_paused += 1
        out: dict[TopicPartition, list[Record]] = {}
        budget = max_records or 10**9
        for part in sorted(self.assigned - self.paused_tps):
            take = self.logs[part][self.positions[part] : self.positions[part] + budget]
            if take:
                out[part] = take
                self.positions[part] += len(take)
                budget -= len(take)
            if budget <= 0:
                break
        if not out:
            self.clock.now += timeout_ms / 1000  # waited for data that did not come
            await asyncio.sleep(0.001)
        return out

    def assignment(self) -> set[Any]:
        return set(self.assigned)

    def pause(self, *partitions: Any) -> None:
        self.pause_calls += 1
        self.paused_tps |= set(partitions) & self.assigned

    def resume(self, *partitions: Any) -> None:
        self.paused_tps -= set(partitions)

    def highwater(self, partition: Any) -> int | None:
        return len(self.logs[partition])

    async def commit(self, offsets: Mapping[Any, tuple[int, str]]) -> None:
        for part in offsets:
            if part not in self.assigned:
                raise IllegalStateError(f"Partition {part} is not assigned")
        self.commit_log.append(dict(offsets))
        for part, (offset, _meta) in offsets.items():
            self.committed[part] = offset

    async def rebalance(self, new_assignment: set[TopicPartition]) -> None:
        """An eager rebalance: revoke everything, then assign ``new_assignment`` from the committed offsets."""
        await self.listener.on_partitions_revoked(set(self.assigned))
        self.assigned = set(new_assignment)
        self.paused_tps = set()
        for part in new_assignment:
            self.positions[part] = self.committed.get(part, 0)
        await self.listener.on_partitions_assigned(set(new_assignment))


class FakeTable:
    """An insert target that deduplicates by token (as ClickHouse does within its window) and can fail."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.rows: list[tuple[Any, ...]] = []
        self.tokens: list[str] = []
        self.calls = 0
        self.call_times: list[float] = []
        self.fail_before = 0
        self.fail_after = 0
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def insert(self, rows: Sequence[tuple[Any, ...]], token: str) -> None:
        self.calls += 1
        self.call_times.append(self.clock.now)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        if self.fail_before > 0:
            self.fail_before -= 1
            raise ClickHouseUnavailable("connection refused (before the rows landed)")
        if token not in self.tokens:
            self.tokens.append(token)
            self.rows.extend(rows)
        if self.fail_after > 0:
            self.fail_after -= 1
            raise ClickHouseUnavailable("timeout (after the rows landed)")

    def stored(self) -> set[tuple[int, int]]:
        return {(row[PARTITION], row[OFFSET]) for row in self.rows}


class ContractTable(FakeTable):
    """A :class:`FakeTable` that also takes batches as fetched (:class:`KlineValues`) and, as ClickHouse's contract
    check does, refuses a batch whole when any of its records is not valid for the validating path (the real
    check is held to that in tests/integration/test_clickhouse_insert.py)."""

    def __init__(self, clock: FakeClock, version_of: Callable[[Any, int | None], int]) -> None:
        super().__init__(clock)
        self.version_of = version_of
        self.payloads: list[tuple[str, str]] = []  # (kind, token) of every call
        self.refused = 0
        self.deny_values = False  # the login may not run the INSERT ... SELECT

    def insert(self, rows: Any, token: str) -> None:
        self.payloads.append((type(rows).__name__, token))
        if not isinstance(rows, KlineValues):
            super().insert(rows, token)
            return
        if self.deny_values:
            raise InsertSelectDenied("Code: 497. Not enough privileges")
        parsed = []
        for line in rows.body.splitlines():
            partition, offset, value = line.split(b"\t")
            try:
                record = decode_kline_record(value)
                version = self.version_of(record.kline, record.seq)
            except InvalidInput:
                parsed = None
                break
            row = [None] * len(KLINE_COLUMNS)
            row[PARTITION], row[OFFSET], row[VERSION], row[TOKEN] = int(partition), int(offset), version, token
            parsed.append(tuple(row))
        if parsed is None:
            self.calls += 1
            self.refused += 1
            raise ClickHouseRejected("a record breaks the kline contract")
        super().insert(parsed, token)


class FakeDeadLetters:
    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []
        self.fail = 0

    async def deliver(self, letters: Sequence[DeadLetter]) -> None:
        if self.fail > 0:
            self.fail -= 1
            raise KafkaConnectionError("broker unreachable")
        self.letters.extend(letters)


@dataclass
class Rig:
    clock: FakeClock
    consumer: ScriptedConsumer
    table: FakeTable
    dlq: FakeDeadLetters
    shutdown: Shutdown
    engine: WriterEngine
    skipped: set[tuple[int, int]] = field(default_factory=set)
    commit_failures: int = 0

    def settled(self) -> set[tuple[int, int]]:
        return self.table.stored() | {(d.partition, d.offset) for d in self.dlq.letters} | self.skipped

    def assert_nothing_committed_unstored(self, offsets: Mapping[Any, tuple[int, str]]) -> None:
        settled = self.settled()
        for part, (offset, _token) in offsets.items():
            missing = [o for o in range(offset) if (part.partition, o) not in settled]
            assert not missing, f"commit of p{part.partition}={offset} before offsets {missing} were stored"

    async def run_until(self, condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
        """Run the engine until ``condition`` holds, then request a stop and wait for a clean return."""
        task = asyncio.create_task(self.engine.run())
        deadline = time.monotonic() + timeout_s
        while not condition():
            if task.done():
                task.result()
                raise AssertionError("the engine returned before the condition held")
            assert time.monotonic() < deadline, "condition not reached in time"
            await asyncio.sleep(0.001)
        self.shutdown.request("test")
        await asyncio.wait_for(task, timeout_s)


def rig(
    *,
    buffer_size: int = 100,
    flush_interval_ms: int = 1000,
    version_of: Callable[[Kline, int | None], int] = finalized_version,
    skip_tombstones: bool = False,
    failing_commits: int = 0,
    grace_s: float = 5.0,
    **options: Any,
) -> Rig:
    clock = FakeClock()
    consumer = ScriptedConsumer(clock)
    table = FakeTable(clock)
    dlq = FakeDeadLetters()
    shutdown = Shutdown(grace_s, clock=clock.monotonic)
    spec = WriterSpec("finalized", "finalized_writer", TOPIC, "klines_finalized", "g", buffer_size,
                      flush_interval_ms, version_of, skip_tombstones)  # fmt: skip
    holder: list[Rig] = []

    async def checked_commit(offsets: Mapping[Any, tuple[int, str]]) -> None:
        r = holder[0]
        r.assert_nothing_committed_unstored(offsets)
        if r.commit_failures > 0:
            r.commit_failures -= 1
            raise CommitFailedError("injected: the group coordinator refused the commit")
        await consumer.commit(offsets)

    if options.get("parse_in_clickhouse"):
        table = ContractTable(clock, version_of)
    defaults: dict[str, Any] = {"keepalive_s": 0.005, "poll_timeout_s": 0.05, "retry_initial_s": 0.01,
                                "retry_max_s": 0.1, "revoke_wait_s": 2.0}  # fmt: skip
    defaults.update(options)
    engine = WriterEngine(spec, consumer, insert=table.insert, dead_letters=dlq, shutdown=shutdown, clock=clock,
                          commit=checked_commit, **defaults)  # fmt: skip
    consumer.listener = engine.listener
    r = Rig(clock, consumer, table, dlq, shutdown, engine, commit_failures=failing_commits)
    holder.append(r)
    return r


async def assigned(r: Rig) -> Rig:
    await r.engine.on_partitions_assigned(r.consumer.assignment())
    return r


# --- steps 1-4: poll, decode, buffer, flush, commit --------------------------------------------------------


async def test_a_batch_is_inserted_with_its_token_then_exactly_its_offsets_are_committed() -> None:
    r = await assigned(rig())
    for n in range(5):
        r.consumer.produce(0, kline_value(n, version=n % 2))
    for n in range(3):
        r.consumer.produce(1, kline_value(10 + n))
    await r.run_until(lambda: r.consumer.committed == {tp(0): 5, tp(1): 3})

    assert len(r.table.rows) == 8 and r.table.calls == 1
    [token] = r.table.tokens
    assert token.startswith("finalized:p0=0-4,p1=0-2#")
    assert {row[TOKEN] for row in r.table.rows} == {token}
    assert sorted((row[PARTITION], row[OFFSET], row[VERSION]) for row in r.table.rows) == [
        (0, 0, 0), (0, 1, 1), (0, 2, 0), (0, 3, 1), (0, 4, 0), (1, 0, 0), (1, 1, 0), (1, 2, 0)]  # fmt: skip
    assert r.consumer.commit_log == [{tp(0): (5, token), tp(1): (3, token)}]  # the token is the commit metadata
    assert r.engine.counters.get("rows_inserted") == 8 and r.engine.counters.get("batches") == 1
    assert not r.consumer.paused_tps


async def test_a_full_buffer_flushes_at_buffer_size() -> None:
    r = await assigned(rig(buffer_size=4, flush_interval_ms=60_000))
    for n in range(8):
        r.consumer.produce(0, kline_value(n))
    await r.run_until(lambda: r.consumer.committed.get(tp(0)) == 8)
    assert [t.split("#")[0] for t in r.table.tokens] == ["finalized:p0=0-3", "finalized:p0=4-7"]


async def test_the_flush_interval_runs_from_the_first_buffered_record() -> None:
    r = await assigned(rig(flush_interval_ms=1000))
    r.clock.now = 2000.0
    r.consumer.produce(0, kline_value(0))
    await r.run_until(lambda: r.consumer.committed.get(tp(0)) == 1)
    [inserted_at] = r.table.call_times
    assert 1.0 <= inserted_at - 2000.0 <= 1.002  # 1 s after the record, not a poll timeout later


async def test_invalid_records_are_dead_lettered_with_the_reason_and_committed_past() -> None:
    r = await assigned(rig())
    r.consumer.produce(0, kline_value(0))
    r.consumer.produce(0, b"not json")
    r.consumer.produce(0, kline_value(1, x=False))
    r.consumer.produce(0, b'{"s": "BTCUSDT"}')
    r.consumer.produce(0, None)
    r.consumer.produce(0, kline_value(2))
    await r.run_until(lambda: r.consumer.committed.get(tp(0)) == 6)

    assert sorted(row[OFFSET] for row in r.table.rows) == [0, 5]
    reasons = {d.offset: d.reason for d in r.dlq.letters}
    assert set(reasons) == {1, 2, 3, 4}
    assert reasons[1].startswith("not JSON")
    assert "not closed" in reasons[2]
    assert "missing field" in reasons[3] or "field 'i'" in reasons[3]
    assert "null value" in reasons[4]
    assert all(d.key == b"BTCUSDT|1m" and b'"service":"finalized_writer"' in d.value for d in r.dlq.letters)
    assert r.engine.counters.get("dead_letters") == 4
    categories = {d.offset: json.loads(d.value)["category"] for d in r.dlq.letters}
    assert categories == {1: "malformed", 2: "topic", 3: "field", 4: "malformed"}
    assert {k: n for k, n in r.engine.dead_letters_by_reason.items() if n} == {"malformed": 2, "topic": 1, "field": 1}


async def test_tombstones_on_the_snapshot_topic_are_skipped_not_dead_lettered() -> None:
    r = await assigned(rig(version_of=snapshot_version, skip_tombstones=True))
    r.consumer.produce(0, kline_value(0, x=False, seq=7))
    r.consumer.produce(0, None)
    r.skipped.add((0, 1))
    r.consumer.produce(0, kline_value(0, x=False, seq=8))
    await r.run_until(lambda: r.consumer.committed.get(tp(0)) == 3)
    assert [row[VERSION] for row in r.table.rows] == [7, 8]  # snapshot rows are versioned by seq
    assert not r.dlq.letters and r.engine.counters.get("tombstones_skipped") == 1


async def test_an_unexpected_decode_error_stops_the_engine_with_the_batch_uncommitted() -> None:
    calls = []

    def decode(raw: bytes | None) -> DecodedKline:
        calls.append(raw)
        if raw == b"boom":
            raise RuntimeError("a bug in decoding")
        return decode_kline_record(raw)

    r = await assigned(rig(buffer_size=3, decode=decode))
    for n in range(3):
        r.consumer.produce(0, kline_value(n))
    r.consumer.produce(0, kline_value(3))
    r.consumer.produce(0, b"boom")
    task = asyncio.create_task(r.engine.run())
    with pytest.raises(RuntimeError, match="a bug in decoding"):
        await asyncio.wait_for(task, 10)
    assert r.consumer.committed == {tp(0): 3}  # the first (full) batch; nothing of the failed one
    assert r.table.stored() == {(0, 0), (0, 1), (0, 2)}


# --- step 3: insert failures and backpressure -------------------------------------------------------------


async def test_insert_failing_before_the_rows_land_pauses_retries_keeps_polling_then_commits() -> None:
    r = await assigned(rig())
    r.table.fail_before = 6
    for n in range(4):
        r.consumer.produce(n % 2, kline_value(n))
    await r.run_until(lambda: len(r.consumer.committed) == 2)

    assert r.table.calls == 7 and len(r.table.rows) == 4
    assert r.engine.counters.get("insert_retries") == 6
    assert r.consumer.polls_while_paused > 0  # kept polling during the outage: the member stays in the group
    assert r.consumer.commit_log and all(len(c) == 2 for c in r.consumer.commit_log)  # one commit, after success
    backoff = r.clock.sleeps
    assert len(backoff) == 6 and max(backoff) <= 0.1 and backoff[-1] > backoff[0]  # exponential, capped
    assert not r.consumer.paused_tps  # resumed


async def test_insert_failing_after_the_rows_landed_stores_them_once() -> None:
    r = await assigned(rig())
    r.table.fail_after = 2
    for n in range(5):
        r.consumer.produce(0, kline_value(n))
    await r.run_until(lambda: r.consumer.committed.get(tp(0)) == 5)
    assert r.table.calls == 3  # the same token three times ...
    assert len(r.table.rows) == 5  # ... and the rows once
    assert r.engine.counters.get("insert_retries") == 2


async def test_partitions_stay_paused_while_the_insert_is_in_flight() -> None:
    r = await assigned(rig())
    r.table.gate = threading.Event()
    r.consumer.produce(0, kline_value(0))
    task = asyncio.create_task(r.engine.run())
    await asyncio.to_thread(r.table.entered.wait, 5)
    while not r.engine.metrics()["paused"]:  # the insert outlasted keepalive_s: backpressure is on
        await asyncio.sleep(0.001)
    r.consumer.produce(0, kline_value(1))  # arrives while ClickHouse is busy: not fetched yet
    await asyncio.sleep(0.05)
    assert r.consumer.paused_tps == r.consumer.assigned
    assert r.consumer.positions[tp(0)] == 1
    assert r.engine.metrics()["paused"] == 1 and r.consumer.committed == {}
    r.table.gate.set()
    deadline = time.monotonic() + 5
    while r.consumer.committed.get(tp(0)) != 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    r.shutdown.request("test")
    await asyncio.wait_for(task, 5)


async def test_a_writer_stuck_on_clickhouse_is_not_ready() -> None:
    r = rig(stuck_after_s=2.0)
    assert not r.engine.ready  # not joined yet
    await r.engine.on_partitions_assigned(r.consumer.assignment())
    assert r.engine.ready
    r.table.fail_before = 10**6
    r.consumer.produce(0, kline_value(0))
    task = asyncio.create_task(r.engine.run())
    deadline = time.monotonic() + 5
    while r.engine.ready:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    assert r.engine.stuck and r.engine.metrics()["flush_age_s"] > 2.0
    assert r.consumer.committed == {}
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- step 4: dead letters ---------------------------------------------------------------------------------


async def test_dead_letters_are_delivered_before_the_commit_and_retried() -> None:
    r = await assigned(rig())
    r.dlq.fail = 3
    r.consumer.produce(0, b"garbage")
    r.consumer.produce(0, kline_value(0))
    await r.run_until(lambda: r.consumer.committed.get(tp(0)) == 2)
    assert [d.offset for d in r.dlq.letters] == [0]
    assert r.engine.counters.get("dead_letter_retries") == 3


# --- step 6: commit failures ------------------------------------------------------------------------------


async def test_a_failed_commit_keeps_the_stored_offsets_for_the_next_commit() -> None:
    r = await assigned(rig(failing_commits=2, commit_retry_s=0.5))
    for n in range(3):
        r.consumer.produce(0, kline_value(n))
    await r.run_until(lambda: r.engine.counters.get("commit_failures") >= 1)
    assert r.consumer.committed == {} and r.table.stored() == {(0, 0), (0, 1), (0, 2)}
    assert set(r.engine.uncommitted) == {tp(0)}

    # Restart the loop: the retry (after commit_retry_s of idle) and the next batch commit everything.
    r.shutdown = Shutdown(5, clock=r.clock.monotonic)
    r.engine._shutdown = r.shutdown
    r.consumer.produce(1, kline_value(9))
    await r.run_until(lambda: r.consumer.committed == {tp(0): 3, tp(1): 1})
    assert r.engine.counters.get("commit_failures") == 2 and not r.engine.uncommitted


async def test_a_partition_lost_without_a_callback_is_never_committed() -> None:
    r = await assigned(rig(failing_commits=2, commit_retry_s=0.2))
    r.consumer.produce(0, kline_value(0))
    r.consumer.produce(1, kline_value(1))
    await r.run_until(lambda: r.engine.counters.get("commit_failures") >= 1)  # the stop's commit fails too
    assert r.consumer.committed == {} and set(r.engine.uncommitted) == {tp(0), tp(1)}
    r.consumer.assigned = {tp(0)}  # p1 went elsewhere (the callback may not have run yet)
    r.shutdown = Shutdown(5, clock=r.clock.monotonic)
    r.engine._shutdown = r.shutdown
    await r.run_until(lambda: tp(0) in r.consumer.committed)
    assert r.consumer.committed == {tp(0): 1}  # and no IllegalStateError: p1 was never attempted
    assert all(tp(1) not in c for c in r.consumer.commit_log)


# --- rebalancing ------------------------------------------------------------------------------------------


async def test_revoke_waits_for_the_inflight_flush_and_commits_it_while_still_owned() -> None:
    r = await assigned(rig())
    r.table.gate = threading.Event()
    r.consumer.produce(0, kline_value(0))
    r.consumer.produce(1, kline_value(1))
    task = asyncio.create_task(r.engine.run())
    await asyncio.to_thread(r.table.entered.wait, 5)
    threading.Timer(0.05, r.table.gate.set).start()
    await r.consumer.rebalance({tp(0), tp(2)})  # p1 moves to another member
    # The revoke callback committed both partitions of the finished batch before giving them up.
    assert r.consumer.commit_log[0] == {tp(0): (1, r.table.tokens[0]), tp(1): (1, r.table.tokens[0])}
    assert r.engine.counters.get("revocations") == 1
    await asyncio.sleep(0.05)
    r.shutdown.request("test")
    await asyncio.wait_for(task, 5)
    assert len(r.table.rows) == 2
    assert all(set(c) <= {tp(0), tp(2)} for c in r.consumer.commit_log[1:])


async def test_revoke_forfeits_the_offsets_of_a_flush_that_does_not_finish_in_time() -> None:
    r = await assigned(rig(revoke_wait_s=0.05))
    r.table.gate = threading.Event()
    r.consumer.produce(0, kline_value(0))
    r.consumer.produce(1, kline_value(1))
    task = asyncio.create_task(r.engine.run())
    await asyncio.to_thread(r.table.entered.wait, 5)
    await r.consumer.rebalance({tp(0)})  # the insert is still blocked: nothing can be committed
    assert r.consumer.commit_log == []
    r.table.gate.set()  # the rows land late
    # p0 is re-read from its last commit (0) and committed after a second insert under the same token.
    deadline = time.monotonic() + 5
    while r.consumer.committed.get(tp(0)) != 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    r.shutdown.request("test")
    await asyncio.wait_for(task, 5)
    assert tp(1) not in r.consumer.committed  # never committed a partition no longer owned
    # p0's row landed twice, under two tokens (the re-read batch has other ranges): FINAL collapses them.
    assert r.table.stored() == {(0, 0), (1, 0)}
    assert sorted((row[PARTITION], row[OFFSET]) for row in r.table.rows) == [(0, 0), (0, 0), (1, 0)]


async def test_revoked_partitions_lose_their_unstored_buffer_and_are_reread_by_the_owner() -> None:
    r = await assigned(rig(flush_interval_ms=60_000))
    r.consumer.produce(0, kline_value(0))
    r.consumer.produce(1, kline_value(1))
    task = asyncio.create_task(r.engine.run())
    while len(r.engine._buffer) < 2:
        await asyncio.sleep(0.001)
    await r.consumer.rebalance({tp(0)})
    assert len(r.engine._buffer) == 0 and r.consumer.commit_log == []
    while len(r.engine._buffer) < 1:  # p0 comes back from its last commit
        await asyncio.sleep(0.001)
    r.shutdown.request("test")
    await asyncio.wait_for(task, 5)
    assert r.table.stored() == {(0, 0)}  # p0 re-read after the rebalance and stored at the stop; p1 left alone
    assert r.consumer.committed == {tp(0): 1}


async def test_partitions_assigned_while_backpressure_is_on_are_paused_too() -> None:
    r = await assigned(rig())
    r.consumer.assigned = {tp(0)}
    r.table.gate = threading.Event()
    r.consumer.produce(0, kline_value(0))
    task = asyncio.create_task(r.engine.run())
    while not r.engine.metrics()["paused"]:  # the insert outlasted keepalive_s: backpressure is on
        await asyncio.sleep(0.001)
    r.consumer.produce(2, kline_value(2))
    r.consumer.assigned.add(tp(2))  # aiokafka sets the new assignment, then calls the listener
    await r.consumer.listener.on_partitions_assigned({tp(2)})
    assert tp(2) in r.consumer.paused_tps
    await asyncio.sleep(0.03)
    assert r.consumer.positions[tp(2)] == 0  # nothing fetched from it while ClickHouse is busy
    r.table.gate.set()
    deadline = time.monotonic() + 5
    while r.consumer.committed.get(tp(2)) != 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    r.shutdown.request("test")
    await asyncio.wait_for(task, 5)


async def test_a_quick_insert_pauses_nothing_so_prefetched_records_are_kept() -> None:
    r = await assigned(rig(keepalive_s=5.0, buffer_size=2))
    for n in range(6):
        r.consumer.produce(0, kline_value(n))
    await r.run_until(lambda: r.consumer.committed.get(tp(0)) == 6)
    assert r.engine.counters.get("batches") == 3
    assert r.consumer.pause_calls == 0 and r.consumer.polls_while_paused == 0


# --- stopping ---------------------------------------------------------------------------------------------


async def test_a_stop_flushes_and_commits_the_buffer() -> None:
    r = await assigned(rig(flush_interval_ms=60_000))
    for n in range(3):
        r.consumer.produce(0, kline_value(n))
    await r.run_until(lambda: len(r.engine._buffer) == 3)  # stop requested with a full, unflushed buffer
    assert r.consumer.committed == {tp(0): 3} and len(r.table.rows) == 3


async def test_a_stop_with_clickhouse_down_gives_up_at_the_deadline_and_commits_nothing() -> None:
    r = await assigned(rig(flush_interval_ms=60_000, grace_s=1.0, retry_max_s=0.3))
    r.table.fail_before = 10**6
    r.consumer.produce(0, kline_value(0))
    task = asyncio.create_task(r.engine.run())
    while len(r.engine._buffer) < 1:
        await asyncio.sleep(0.001)
    r.shutdown.request("test")
    with pytest.raises(FlushAbandoned, match="deadline"):
        await asyncio.wait_for(task, 10)
    assert r.consumer.committed == {} and r.table.rows == []
    assert r.shutdown.remaining() == 0.0


async def test_records_fetched_during_a_quick_insert_are_decoded_but_committed_with_their_own_batch() -> None:
    r = await assigned(rig(keepalive_s=5.0, buffer_size=3))
    r.table.gate = threading.Event()
    for n in range(3):
        r.consumer.produce(0, kline_value(n))
    task = asyncio.create_task(r.engine.run())
    await asyncio.to_thread(r.table.entered.wait, 5)
    for n in range(3, 6):
        r.consumer.produce(0, kline_value(n))
    r.consumer.produce(1, b"garbage")
    while len(r.engine._buffer) < 3:  # decoded into the next batch while the first one is being inserted
        await asyncio.sleep(0.001)
    assert len(r.engine._buffer) == 3 and r.consumer.positions[tp(1)] == 0  # no more than buffer_size
    assert r.consumer.committed == {} and r.table.rows == []
    r.table.gate.set()
    deadline = time.monotonic() + 5
    while r.consumer.committed != {tp(0): 6, tp(1): 1}:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.002)
    r.shutdown.request("test")
    await asyncio.wait_for(task, 5)
    assert [t.split("#")[0] for t in r.table.tokens] == ["finalized:p0=0-2", "finalized:p0=3-5"]  # p1: a dead letter
    assert [c[tp(0)][0] for c in r.consumer.commit_log if tp(0) in c] == [3, 6]  # each batch after its insert
    assert r.consumer.pause_calls == 0 and [d.offset for d in r.dlq.letters] == [0]


# --- ClickHouse parses: the batch as fetched, the validating path only for a refused batch -----------------


async def test_a_valid_batch_goes_to_clickhouse_as_fetched_in_one_insert() -> None:
    r = await assigned(rig(parse_in_clickhouse=True))
    assert isinstance(r.table, ContractTable)
    for n in range(5):
        r.consumer.produce(n % 2, kline_value(n, version=n % 2))
    await r.run_until(lambda: r.consumer.committed == {tp(0): 3, tp(1): 2})

    [(kind, token)] = r.table.payloads
    assert kind == "KlineValues" and token.startswith("finalized:p0=0-2,p1=0-1#")
    assert sorted((row[PARTITION], row[OFFSET], row[VERSION]) for row in r.table.rows) == [
        (0, 0, 0), (0, 1, 0), (0, 2, 0), (1, 0, 1), (1, 1, 1)]  # fmt: skip
    assert r.consumer.commit_log == [{tp(0): (3, token), tp(1): (2, token)}]
    assert r.engine.counters.get("rows_inserted") == 5 and r.engine.counters.get("batches") == 1
    assert not r.dlq.letters


async def test_a_refused_batch_is_validated_and_only_its_bad_records_are_dead_lettered() -> None:
    r = await assigned(rig(parse_in_clickhouse=True))
    r.consumer.produce(0, kline_value(0))
    r.consumer.produce(0, kline_value(1, x=False))  # an open kline on the finalized topic
    r.consumer.produce(0, None)
    r.consumer.produce(0, kline_value(2))
    r.consumer.produce(1, kline_value(3))
    await r.run_until(lambda: r.consumer.committed == {tp(0): 4, tp(1): 1})

    # Refused as fetched (nothing stored), then the validated rows under the same token.
    [(first, token), (second, again)] = r.table.payloads
    assert (first, second) == ("KlineValues", "KlineRows") and again == token and r.table.refused == 1
    assert r.table.stored() == {(0, 0), (0, 3), (1, 0)}
    assert sorted((d.offset, d.reason) for d in r.dlq.letters) == [
        (1, "kline is not closed (x=false) on the finalized topic"), (2, "empty record (null value)")]  # fmt: skip
    assert r.engine.counters.get("dead_letters") == 2 and r.engine.counters.get("rows_inserted") == 3
    assert r.engine.counters.get("insert_retries") == 0  # a refusal is not retried
    assert {k: n for k, n in r.engine.dead_letters_by_reason.items() if n} == {"topic": 1, "malformed": 1}


async def test_values_whose_insert_answer_is_lost_are_retried_as_they_were_and_stored_once() -> None:
    r = await assigned(rig(parse_in_clickhouse=True))
    r.table.fail_after = 2
    for n in range(5):
        r.consumer.produce(0, kline_value(n))
    await r.run_until(lambda: r.consumer.committed.get(tp(0)) == 5)
    assert [kind for kind, _token in r.table.payloads] == ["KlineValues"] * 3
    assert len({token for _kind, token in r.table.payloads}) == 1  # the same token three times ...
    assert len(r.table.rows) == 5  # ... and the rows once
    assert r.engine.counters.get("insert_retries") == 2


async def test_a_value_that_would_break_the_framing_is_validated_without_a_round_trip() -> None:
    r = await assigned(rig(parse_in_clickhouse=True))
    r.consumer.produce(0, kline_value(0))
    r.consumer.produce(0, kline_value(1).replace(b",", b",\n", 1))  # valid JSON across two lines
    await r.run_until(lambda: r.consumer.committed.get(tp(0)) == 2)
    assert [kind for kind, _token in r.table.payloads] == ["KlineRows"]
    assert r.table.stored() == {(0, 0), (0, 1)} and not r.dlq.letters


async def test_tombstones_are_skipped_from_the_fetched_batch_and_counted_once() -> None:
    r = await assigned(rig(version_of=snapshot_version, skip_tombstones=True, parse_in_clickhouse=True))
    r.consumer.produce(0, kline_value(0, x=False, seq=7))
    r.consumer.produce(0, None)
    r.skipped.add((0, 1))
    r.consumer.produce(0, kline_value(0, x=False, seq=8))
    r.consumer.produce(0, kline_value(1, x=False))  # no seq: the batch is refused and validated
    await r.run_until(lambda: r.consumer.committed.get(tp(0)) == 4)
    assert [row[VERSION] for row in r.table.rows] == [7, 8]
    assert [d.offset for d in r.dlq.letters] == [3]
    assert r.engine.counters.get("tombstones_skipped") == 1


async def test_a_bug_in_the_validating_path_stops_the_engine_with_the_refused_batch_uncommitted() -> None:
    def decode(raw: bytes | None) -> DecodedKline:
        raise RuntimeError("a bug in decoding")

    r = await assigned(rig(buffer_size=3, decode=decode, parse_in_clickhouse=True))
    for n in range(3):
        r.consumer.produce(0, kline_value(n))
    r.consumer.produce(0, kline_value(3))
    r.consumer.produce(0, b"not json")
    task = asyncio.create_task(r.engine.run())
    with pytest.raises(RuntimeError, match="a bug in decoding"):
        await asyncio.wait_for(task, 10)
    assert r.consumer.committed == {tp(0): 3}  # the first (valid) batch needed no decoding; the second did
    assert r.table.stored() == {(0, 0), (0, 1), (0, 2)}


async def test_a_login_that_may_not_insert_select_falls_back_to_the_validating_path_for_good() -> None:
    r = await assigned(rig(parse_in_clickhouse=True, buffer_size=2))
    r.table.deny_values = True
    for n in range(4):
        r.consumer.produce(0, kline_value(n))
    await r.run_until(lambda: r.consumer.committed.get(tp(0)) == 4)
    # One refused attempt, then rows only: the first batch validated at flush, the next as it was polled.
    assert [kind for kind, _token in r.table.payloads] == ["KlineValues", "KlineRows", "KlineRows"]
    assert r.table.stored() == {(0, n) for n in range(4)} and not r.dlq.letters
