"""The real broker and the real ClickHouse engine, through the project's own factories and schema."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
from aiokafka import TopicPartition

from services.shared import clickhouse
from services.shared.kafka import KafkaUnreachable, check_reachable, make_consumer, make_producer
from services.shared.settings import Settings, load_settings

pytestmark = pytest.mark.integration


async def test_keyed_messages_through_a_consumer_group_with_manual_commit(settings: Settings) -> None:
    topic = settings.kafka.topics.trades
    producer = make_producer(settings.kafka)
    await producer.start()
    try:
        for i in range(30):
            await producer.send(topic, key=f"SYM{i % 3}".encode(), value=f"v{i}".encode())
        await producer.flush()
    finally:
        await producer.stop()

    group = f"group-{topic}"
    consumer = make_consumer(settings.kafka, topic, group_id=group)
    await consumer.start()
    received: dict[bytes, list[bytes]] = {}
    try:
        while sum(len(v) for v in received.values()) < 30:
            batch = await consumer.getmany(timeout_ms=5000)
            assert batch, "no message within 5 s"
            for records in batch.values():
                for r in records:
                    received.setdefault(r.key, []).append(r.value)
        await consumer.commit()
        committed = {tp: await consumer.committed(tp) for tp in consumer.assignment()}
    finally:
        await consumer.stop()
    # Same key, same partition, in order.
    for key, values in received.items():
        assert values == [f"v{i}".encode() for i in range(30) if f"SYM{i % 3}".encode() == key]
    assert sum(v or 0 for v in committed.values()) == 30

    # A new member of the same group starts after the commit: nothing is read again.
    again = make_consumer(settings.kafka, topic, group_id=group)
    await again.start()
    try:
        assert await again.getmany(timeout_ms=1500) == {}
        parts = {TopicPartition(topic, p) for p in range(settings.kafka.trades_partitions)}
        assert sum([await again.committed(tp) or 0 for tp in parts]) == 30
    finally:
        await again.stop()


async def test_unreachable_bootstrap_gives_one_actionable_line() -> None:
    s = load_settings(kafka={"bootstrap": "127.0.0.1:1"})
    with pytest.raises(KafkaUnreachable) as info:
        await check_reachable(s.kafka, timeout_s=2)
    message = str(info.value)
    assert "\n" not in message
    assert "127.0.0.1:1" in message and "KAFKA_BOOTSTRAP" in message


async def test_reachable_broker_passes_the_check(settings: Settings) -> None:
    await check_reachable(settings.kafka, timeout_s=10)


def _row(open_time: int, close: str, version: int, token: str) -> tuple[object, ...]:
    p = Decimal(close)
    return (
        "BTCUSDT",
        "1m",
        open_time,
        open_time + 59_999,
        1,
        2,
        p,
        p,
        p,
        p,
        Decimal("1.5"),
        p * Decimal("1.5"),
        2,
        Decimal("0.5"),
        p * Decimal("0.5"),
        version,
        "live",
        0,
        open_time // 60_000,
        token,
    )


def test_schema_applies_once_and_a_replayed_batch_adds_nothing(settings: Settings) -> None:
    ch = settings.clickhouse
    client = clickhouse.connect(ch)
    assert clickhouse.apply_schema(client, ch) == ["001_klines_finalized.sql", "002_klines_snapshots.sql"]
    assert clickhouse.apply_schema(client, ch) == []
    for table in clickhouse.table_names(ch):
        clickhouse.check_table(client, ch, table)

    batch = [_row(1_700_000_040_000 + i * 60_000, "42000.12345678", 0, "t") for i in range(5)]
    for _ in range(2):  # the same batch twice, same token: a retry after an unknown outcome
        clickhouse.insert_klines(client, ch, ch.finalized_table, batch, token="batch-p0-o0-4")
    table = f"{ch.database}.{ch.finalized_table}"
    assert clickhouse.query_rows(client, f"SELECT count() FROM {table}") == [(5,)]

    # A corrected kline (higher version) replaces the old one under FINAL.
    fixed = [_row(1_700_000_040_000, "42001", 1, "t2")]
    clickhouse.insert_klines(client, ch, ch.finalized_table, fixed, token="batch-p0-o5-5")
    rows = clickhouse.query_rows(
        client, f"SELECT open_time, close, version FROM {table} FINAL ORDER BY open_time LIMIT 1"
    )
    assert rows == [(1_700_000_040_000, Decimal("42001"), 1)]
    assert clickhouse.query_rows(client, f"SELECT count() FROM {table} FINAL") == [(5,)]


def test_writers_refuse_a_table_without_dedup_or_version(settings: Settings) -> None:
    ch = settings.clickhouse
    client = clickhouse.connect(ch)
    with pytest.raises(clickhouse.SchemaError, match=r"does not exist.*klines schema apply"):
        clickhouse.check_table(client, ch, ch.finalized_table)
    client.command(
        f"CREATE TABLE {ch.database}.{ch.finalized_table} (symbol String, interval String, open_time Int64) "
        "ENGINE = MergeTree ORDER BY (symbol, interval, open_time)"
    )
    with pytest.raises(clickhouse.SchemaError, match="ReplacingMergeTree"):
        clickhouse.check_table(client, ch, ch.finalized_table)
    client.command(
        f"CREATE TABLE {ch.database}.{ch.snapshots_table} (symbol String, interval String, open_time Int64, "
        "version UInt64) ENGINE = ReplacingMergeTree(version) ORDER BY (symbol, interval, open_time)"
    )
    with pytest.raises(clickhouse.SchemaError, match="deduplication_window"):
        clickhouse.check_table(client, ch, ch.snapshots_table)


def test_event_loop_is_free_while_inserting(settings: Settings) -> None:
    """The sync client runs in a worker thread; the loop keeps ticking meanwhile."""
    ch = settings.clickhouse
    client = clickhouse.connect(ch)
    clickhouse.apply_schema(client, ch)
    rows = [_row(1_600_000_020_000 + i * 60_000, "1.1", 0, "x") for i in range(2000)]

    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        task = asyncio.create_task(ticker())
        await asyncio.to_thread(clickhouse.insert_klines, client, ch, ch.finalized_table, rows, "big")
        task.cancel()
        return ticks

    assert asyncio.run(main()) >= 1
    table = f"{ch.database}.{ch.finalized_table}"
    assert clickhouse.query_rows(client, f"SELECT count() FROM {table} FINAL") == [(2000,)]
